#!/usr/bin/env bash
# Benchmark: the cost of resumable sessions (issue 18) on a bulk transfer, on loopback:
# scp through the ProxyCommand, and native exec `cat > f`.
#
#   bash bench/resume.sh            # builds the release binary if needed
#   SIZE_MIB=256 RUNS=5 bash bench/resume.sh
#
# scp of SIZE_MIB up through `malai ssh proxy`, and the same up by native exec, RUNS times
# each, alternating the same build with the resumable layer on (default) and off
# (`MALAI_RESUME=off`: the plain session), and direct OpenSSH for reference. Prints median throughput and CPU seconds of all processes
# (client, both malai ends, sshd) per variant, and the ratio on/off (goal: ≤ 3 % slower).
# Needs root (its own sshd on a high loopback port). Nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE_MIB=${SIZE_MIB:-512}
RUNS=${RUNS:-5}
. bench/lib.sh
bench_init resume
start_sshd

start_cluster
SCP_ON=("${SCP_PROXY[@]}")
SCP_OFF=(scp -q "${COMMON[@]}" -o "ProxyCommand=env MALAI_RESUME=off MALAI_HOME=$W/alice MALAI_RELAY=disabled MALAI_USE_KEYRING=false $MALAI ssh proxy %h %p")

"${DIRECT[@]}" true
"${PROXY[@]}" true

cpu_now() { python3 - "$SSHD_PID" "$SERVER_PID" <<'PY'
import os, sys
t = os.times()
tot = t.children_user + t.children_system
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
timed() {
    local c0 c1 t0 t1
    c0=$(cpu_now); t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N); c1=$(cpu_now)
    awk -v a="$t0" -v b="$t1" -v c="$c0" -v d="$c1" 'BEGIN { printf "%.3f %.3f\n", b - a, d - c }'
}

head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$W/blob"
: > "$W/direct"; : > "$W/on"; : > "$W/off"; : > "$W/xon"; : > "$W/xoff"
for i in $(seq "$RUNS"); do
    timed "${SCP_DIRECT[@]}" "$W/blob" root@127.0.0.1:"$W/up" >> "$W/direct"
    timed "${SCP_ON[@]}" "$W/blob" root@foo.bench:"$W/up" >> "$W/on"
    cmp -s "$W/blob" "$W/up" || { echo "resumable scp corrupted the file" >&2; exit 1; }
    timed "${SCP_OFF[@]}" "$W/blob" root@foo.bench:"$W/up" >> "$W/off"
    cmp -s "$W/blob" "$W/up" || { echo "plain scp corrupted the file" >&2; exit 1; }
    timed "${NATIVE[@]}" "cat > $W/up" < "$W/blob" >> "$W/xon"
    cmp -s "$W/blob" "$W/up" || { echo "resumable exec corrupted the file" >&2; exit 1; }
    timed env MALAI_RESUME=off "${NATIVE[@]}" "cat > $W/up" < "$W/blob" >> "$W/xoff"
    cmp -s "$W/blob" "$W/up" || { echo "plain exec corrupted the file" >&2; exit 1; }
    rm -f "$W/up"
done
grep -q "resumable tunnel" "$W/alice/logs/ssh/"proxy.log* || { echo "the proxy never got a resumable tunnel" >&2; exit 1; }

echo
echo "malai resume bench — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg), $("$MALAI" --version)"
python3 - "$SIZE_MIB" "$W/direct" "$W/off" "$W/on" "$W/xoff" "$W/xon" <<'PY'
import statistics, sys
size = float(sys.argv[1])
def load(p):
    rows = [tuple(map(float, l.split())) for l in open(p) if l.strip()]
    return statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
d, off, on, xoff, xon = (load(p) for p in sys.argv[2:7])
print(f"{str(int(size)) + ' MiB up, median':34} {'MiB/s':>8} {'CPU s':>8}")
for name, (w, c) in [("scp direct OpenSSH", d), ("scp via malai, plain (off)", off), ("scp via malai, resumable (on)", on),
                     ("native exec, plain (off)", xoff), ("native exec, resumable (on)", xon)]:
    print(f"{name:34} {size / w:8.0f} {c:8.2f}")
print(f"scp, resumable vs plain: throughput {off[0] / on[0] * 100 - 100:+.1f} %, CPU {on[1] / off[1] * 100 - 100:+.1f} %")
print(f"exec, resumable vs plain: throughput {xoff[0] / xon[0] * 100 - 100:+.1f} %, CPU {xon[1] / xoff[1] * 100 - 100:+.1f} %")
PY
