#!/usr/bin/env bash
# Benchmark over long links (issue 21), release build: two NAT'd machines whose uplinks each
# go through the tests' userspace delay line (tests/e2e/netsim.rs `Wan`: a quarter of the RTT
# each way per uplink, tbf rate limit), one run per link of: scp through the ProxyCommand,
# native exec `cat > f`, a `malai ssh -L` download (curl), rsync through the ProxyCommand —
# on the hole-punched direct path and relay-only — and scp and rsync by plain OpenSSH between
# the same namespaces. Ratios against direct OpenSSH scp on the same link, and against the
# link's rate. The link is measured (ping, a plain TCP socket) before and after; when it is
# off (a loaded machine) the figures say so and are not a judgement.
#
# The measurement is the ignored e2e test `wan::bench_wan` (it asserts only that the files
# arrive intact). Needs root (network namespaces), `ip`, `nft`, `tc`, python3, curl, rsync.
#
#   bash bench/wan.sh                      # 50 ms / 400 Mbit and 200 ms / 100 Mbit, 64 MiB
#   MALAI_BENCH_MIB=256 bash bench/wan.sh
#   MALAI_WAN_LINKS="200:100" bash bench/wan.sh   # RTT ms:Mbit pairs
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
echo "# $(date -u +%Y-%m-%dT%H:%MZ) $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)$([ -e /work/LOADED ] && echo ' (LOADED)')"
for link in ${MALAI_WAN_LINKS:-50:400 200:100}; do
    MALAI_WAN_RTT_MS=${link%%:*} MALAI_WAN_MBIT=${link##*:} \
        cargo test --release --quiet --test e2e wan::bench_wan -- \
        --ignored --exact --nocapture 2>&1 | grep -E '^(BENCH|SKIPPED)|panicked|FAILED' | sed 's/^BENCH //'
done
