#!/usr/bin/env bash
# Installs what building, testing and benchmarking lbctl needs on Debian:
# clang-19 for the BPF objects, bpftool, and the real peers the tests and
# benchmarks use (nginx with the stream module, unbound, dig, dnsperf, wrk).
set -euo pipefail
pkgs=(clang-19 llvm-19 libbpf-dev bpftool iproute2 ethtool tcpdump iptables nftables
      nginx libnginx-mod-stream unbound dnsutils dnsperf wrk iperf3 iputils-ping libcap2-bin procps curl podman runc make git)
missing=()
for p in "${pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q
	apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
# nginx's Debian package starts a server on port 80 of the root namespace; the
# tests start their own inside namespaces, so stop that one if it runs.
if command -v systemctl >/dev/null && systemctl is-active -q nginx 2>/dev/null; then
	systemctl stop nginx || true
fi
go mod download
