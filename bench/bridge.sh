#!/usr/bin/env bash
# Benchmark: malai ssh against direct OpenSSH, in one run, on loopback.
#
#   bash bench/bridge.sh            # builds the release binary if needed
#   SIZE_MIB=256 RUNS=10 bash bench/bridge.sh
#
# Prints one table: `ssh true` latency (median of RUNS), scp of SIZE_MIB, and native exec
# (`malai ssh foo true`, SIZE_MIB through stdin and stdout) — each direct to sshd vs through
# malai, with the ratio, and the CPU seconds all processes spent (client + malai both ends +
# sshd), since on 2 cores the tunnel is CPU-bound. Needs root (starts its own sshd on a
# high loopback port) and the packages .ci/run installs. Nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-20}
. bench/lib.sh
bench_init bridge
start_sshd

start_cluster

"${DIRECT[@]}" true
"${PROXY[@]}" true

# CPU seconds (user+sys) of sshd and the malai server so far, their reaped children (sshd's
# per-connection processes, the commands the server ran) included.
server_cpu() { python3 - "$SSHD_PID" "$SERVER_PID" <<'PY'
import os, sys
tot = 0.0
hz = os.sysconf("SC_CLK_TCK")
for pid in sys.argv[1:]:
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        tot += sum(int(x) for x in f[11:15]) / hz
    except OSError:
        pass
print(f"{tot:.3f}")
PY
}

median_ms() { # runs "$@" RUNS times, prints the median wall time in ms
    python3 - "$RUNS" "$@" <<'PY'
import subprocess, sys, time, statistics
n = int(sys.argv[1]); cmd = sys.argv[2:]
ts = []
for _ in range(n):
    t = time.perf_counter()
    subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
    ts.append((time.perf_counter() - t) * 1000)
print(f"{statistics.median(ts):.1f}")
PY
}

# Wall seconds and CPU seconds of one command: its own process tree (ssh, scp, the proxy or
# native exec client) plus sshd and the malai server. (Before 2026-12-07 the client side was
# left out: the CPU rows in docs/benchmarks.md from earlier runs count only sshd and the server.)
timed() {
    local s0 s1 out
    s0=$(server_cpu)
    out=$(python3 - "$@" <<'PY'
import os, subprocess, sys, time
t = time.perf_counter()
subprocess.run(sys.argv[1:], check=True)
wall = time.perf_counter() - t
c = os.times()
print(f"{wall:.3f} {c.children_user + c.children_system:.3f}")
PY
)
    s1=$(server_cpu)
    awk -v o="$out" -v a="$s0" -v b="$s1" 'BEGIN { split(o, f, " "); printf "%.3f %.3f\n", f[1], f[2] + b - a }'
}

head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$W/blob"
rows=()
row() { rows+=("$(printf '%-38s %12s %12s %8s' "$1" "$2" "$3" "$4")"); }
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{b/a:.2f}x')" "$1" "$2"; }
mbps() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.0f} MiB/s')" "$SIZE_MIB" "$1"; }

# 1. latency
d=$(median_ms "${DIRECT[@]}" true)
p=$(median_ms "${PROXY[@]}" true)
n=$(median_ms "${NATIVE[@]}" true)
row "ssh true, median of $RUNS (ms)" "$d" "$p" "$(ratio "$d" "$p")"
row "malai ssh foo true vs ssh true (ms)" "$d" "$n" "$(ratio "$d" "$n")"

# 2. scp upload
read -r dw dc < <(timed "${SCP_DIRECT[@]}" "$W/blob" root@127.0.0.1:"$W/up_direct")
read -r pw pc < <(timed "${SCP_PROXY[@]}" "$W/blob" root@foo.bench:"$W/up_proxy")
cmp -s "$W/blob" "$W/up_proxy" || { echo "scp through malai corrupted the file" >&2; exit 1; }
row "scp ${SIZE_MIB} MiB upload (throughput)" "$(mbps "$dw")" "$(mbps "$pw")" "$(ratio "$pw" "$dw")"
row "  CPU seconds, all processes" "$(printf %.2f "$dc")" "$(printf %.2f "$pc")" "$(ratio "$dc" "$pc")"
rm -f "$W/up_direct" "$W/up_proxy"

# 3. native exec streams vs ssh cat
read -r dw dc < <(timed sh -c '"$@" "cat > /dev/null" < "'"$W/blob"'"' _ "${DIRECT[@]}")
read -r nw nc < <(timed sh -c '"$@" "cat > /dev/null" < "'"$W/blob"'"' _ "${NATIVE[@]}")
row "${SIZE_MIB} MiB via stdin: ssh cat vs native" "$(mbps "$dw")" "$(mbps "$nw")" "$(ratio "$nw" "$dw")"
row "  CPU seconds, all processes" "$(printf %.2f "$dc")" "$(printf %.2f "$nc")" "$(ratio "$dc" "$nc")"
read -r dw dc < <(timed sh -c '"$@" "cat '"$W/blob"'" > /dev/null' _ "${DIRECT[@]}")
read -r nw nc < <(timed sh -c '"$@" "cat '"$W/blob"'" > /dev/null' _ "${NATIVE[@]}")
row "${SIZE_MIB} MiB via stdout: ssh cat vs native" "$(mbps "$dw")" "$(mbps "$nw")" "$(ratio "$nw" "$dw")"
row "  CPU seconds, all processes" "$(printf %.2f "$dc")" "$(printf %.2f "$nc")" "$(ratio "$dc" "$nc")"

echo
echo "malai ssh bench — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), $("$MALAI" --version)"
printf '%-38s %12s %12s %8s\n' "measure" "direct ssh" "malai" "ratio"
printf '%s\n' "${rows[@]}"
echo "(ratio: malai/direct for times, malai throughput/direct throughput for MiB/s rows)"
