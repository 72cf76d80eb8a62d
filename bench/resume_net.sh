#!/usr/bin/env bash
# Benchmark: time from the network coming back to bytes flowing again (issue 18; goal ≤ 1 s
# on the namespace network), with the relay rejoin (transport::relay_rejoin) on and off.
#
#   bash bench/resume_net.sh             # RUNS=3 per test and mode
#   RUNS=5 bash bench/resume_net.sh
#
# Runs the end-to-end tests that cut a machine's network (interactive ssh through the
# ProxyCommand, two NATs, the tests' own relay; see tests/e2e/resume.rs) and reads the
# figure each prints: "bytes flowed again <t> after the network was back". Hole-punched and
# relay-only, the server's or the client's network cut, past the idle limit (resumed) and
# within it (the same connection). Direct OpenSSH has no row here: a TCP connection does not
# come back from a cut past its peer's timeouts at all. Debug build (the tests' own), as the
# figures in docs/benchmarks.md. Needs root (network namespaces).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

RUNS=${RUNS:-3}
TESTS=(
    resume::nat_resume_interactive_ssh_bytes_flow_again_after_a_cut
    resume::nat_resume_interactive_ssh_relay_only_through_a_cut
    resume::nat_resume_interactive_ssh_relay_only_through_a_cut_of_the_client
    resume::nat_relay_only_interactive_ssh_through_a_cut_within_the_idle_limit
    resume::nat_relay_only_interactive_ssh_through_a_client_cut_within_the_idle_limit
    resume::nat_resume_interactive_ssh_after_the_client_roams_during_a_cut
    resume::nat_interactive_ssh_survives_the_client_roaming
)

cargo test --test e2e --no-run >/dev/null 2>&1
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for t in "${TESTS[@]}"; do
    for mode in on off; do
        for _ in $(seq "$RUNS"); do
            fig=$(MALAI_RELAY_REJOIN=$mode cargo test -q --test e2e -- --exact "$t" --nocapture 2>&1 |
                grep -o 'bytes flowed again [^ ]* after' | awk '{print $4}' || true)
            echo "$t $mode ${fig:-failed}" >> "$out"
        done
    done
done

python3 - "$out" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    test, mode, fig = line.split()
    m = re.fullmatch(r"([0-9.]+)(ns|µs|ms|s)", fig)
    secs = float(m.group(1)) * {"ns": 1e-9, "µs": 1e-6, "ms": 1e-3, "s": 1}[m.group(2)] if m else None
    rows.setdefault(test.split("::")[1], {}).setdefault(mode, []).append(secs)
def cell(v):
    ok = [x for x in v if x is not None]
    bad = len(v) - len(ok)
    if not ok:
        return "failed"
    s = f"{statistics.median(ok):.2f} s ({', '.join(f'{x:.2f}' for x in ok)})"
    return s + (f", {bad} failed" if bad else "")
print("| test | rejoin on: median (runs) | off |")
print("|---|---|---|")
for test, modes in rows.items():
    print(f"| {test} | {cell(modes.get('on', []))} | {cell(modes.get('off', []))} |")
PY
