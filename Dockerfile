# Static lbctl image. The BPF objects are committed (pkg/dataplane/*_bpfel.o),
# so the build needs Go only, no clang.
#
# Run it on the LB host with the capabilities lbctl needs and nothing more:
#   podman run --rm --network host \
#     --cap-add BPF --cap-add NET_ADMIN --cap-add NET_RAW \
#     -v /sys/fs/bpf:/sys/fs/bpf -v $PWD/lbctl.yaml:/etc/lbctl.yaml:ro \
#     lbctl run -c /etc/lbctl.yaml
FROM docker.io/library/golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o /out/lbctl ./cmd/lbctl

FROM scratch
COPY --from=build /out/lbctl /lbctl
ENTRYPOINT ["/lbctl"]
