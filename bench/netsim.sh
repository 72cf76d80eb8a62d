#!/usr/bin/env bash
# Benchmark on the simulated namespace network (issue 11), one run, release build:
# scp of MALAI_BENCH_MIB (default 256) MiB between two machines each behind its own NAT,
# through malai with a hole-punched direct path, through the tests' own relay only (UDP
# between the NATs dropped), and plain OpenSSH between the same namespaces routed without
# NAT; cold `malai ssh foo true` through the relay and with hole punching; how soon UDP flows
# between the NATs after a client starts.
#
# The network and the relay are tests/e2e/netsim.rs; the measurement is the ignored e2e test
# `nat::bench_namespace_network` (it asserts only that the files arrive intact). Needs root
# (network namespaces), `ip` and `nft` (`bash .ci/run` installs them).
#
#   bash bench/netsim.sh            # 256 MiB
#   MALAI_BENCH_MIB=64 bash bench/netsim.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $(uname -r)"
cargo test --release --quiet --test e2e nat::bench_namespace_network -- \
    --ignored --exact --nocapture 2>&1 | grep -E '^(BENCH|SKIPPED)|panicked|FAILED' | sed 's/^BENCH //'
