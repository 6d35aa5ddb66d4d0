#!/usr/bin/env bash
# make demo: the seed's setup on a namespace topology with lbctl in front
# (test/demo). Needs root. Arguments go to the demo: --hold keeps the
# topology up until Ctrl-C (make demo DEMO_ARGS=--hold).
set -euo pipefail
cd "$(dirname "$0")/.."
exec go run ./test/demo --lbctl "${BIN:-bin/lbctl}" "$@"
