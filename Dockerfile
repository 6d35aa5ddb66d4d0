# Static lbctl image. The BPF objects are committed (pkg/dataplane/*_bpfel.o),
# so the build needs Go only, no clang.
#
# Run it on the LB host with the capabilities lbctl needs and nothing more
# (verified with podman 4.3.1 / runc on Debian 12, see docs/operations.md):
#   podman run --rm --network host \
#     --cap-drop all --cap-add BPF --cap-add NET_ADMIN --cap-add NET_RAW \
#     --security-opt seccomp=/etc/lbctl/seccomp-bpf.json \
#     -v /sys/fs/bpf:/sys/fs/bpf -v /run/lbctl:/run/lbctl \
#     -v $PWD/lbctl.yaml:/etc/lbctl.yaml:ro \
#     lbctl run -c /etc/lbctl.yaml
# seccomp-bpf.json is podman's default profile (/usr/share/containers/
# seccomp.json) with bpf(2) allowed: the default allows it only with
# CAP_SYS_ADMIN. Where the engine's default nofile/nproc limits exceed the
# host's hard limits, add --ulimit nofile=1024:1024 --ulimit nproc=1024:1024.
FROM docker.io/library/golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o /out/lbctl ./cmd/lbctl

FROM scratch
COPY --from=build /out/lbctl /lbctl
ENTRYPOINT ["/lbctl"]
