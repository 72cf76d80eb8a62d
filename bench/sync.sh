#!/usr/bin/env bash
# Benchmark: config sync convergence with N members, and the manager's idle cost.
#
#   bash bench/sync.sh                 # N = 10 100 500 1000
#   bash bench/sync.sh 10 100          # chosen sizes
#
# Builds and runs bench/sync.rs (release profile): the manager is the real `malai ssh
# server` process; the N members are `malai::server::run` instances inside the bench process,
# each with its own MALAI_HOME, key and iroh endpoint on 127.0.0.1 (relays off). Prints a
# markdown table: time until every member has the manager's file from a cold start, time for
# one edit to reach all, the manager's idle CPU over 10 s and its RSS. Needs no root and no
# network beyond loopback; raise `ulimit -n` above ~10 per member for large N.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

echo "# $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, $(uname -sr), $(rustc --version)" >&2
exec cargo bench --quiet --bench sync -- "$@"
