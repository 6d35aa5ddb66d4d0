#!/usr/bin/env bash
# `make bench`: builds the benchmark's helpers and runs test/bench, which
# builds its own namespace topology, measures every line (routed floor,
# nginx, lbctl's modes, BPF_PROG_TEST_RUN) and prints the table. Needs root.
# Extra flags through BENCH_ARGS, e.g. BENCH_ARGS='-duration 5s -run nginx'.
# Results: bin/bench-results/bench-<time>.md (bin/ is not committed). Method: docs/bench.md.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
mkdir -p bin
$GO build -o bin/backend ./test/backend
$GO build -o bin/lbctl-bench ./test/bench
$GO test -c -o bin/dataplane.test ./pkg/dataplane
# exec: Ctrl-C reaches the benchmark itself, which stops what it started
# and removes its namespaces before exiting.
# shellcheck disable=SC2086 # BENCH_ARGS is a list of flags
exec bin/lbctl-bench -lbctl bin/lbctl -backend bin/backend -dataplane-test bin/dataplane.test \
	-out bin/bench-results ${BENCH_ARGS:-}
