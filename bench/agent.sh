#!/usr/bin/env bash
# Benchmark: the agent — exec latency cold vs through a warm agent, and HTTP throughput
# through the agent's proxy vs directly, on loopback.
#
#   bash bench/agent.sh              # builds the release binary if needed
#   SIZE_MIB=256 RUNS=20 bash bench/agent.sh
#
# Prints one table:
#   - `ssh true` straight to sshd (the baseline), `malai ssh foo true` with no agent (a
#     fresh process dials: cold), and the same through a warm agent (pooled connection);
#     medians of RUNS. Goal: warm ≤ 0.1× `ssh true`.
#   - curl of a SIZE_MIB file from `python3 -m http.server` directly vs through the agent's
#     HTTP proxy as `web.foo.bench` (plain HTTP, and CONNECT with `curl -p`), plus the CPU
#     seconds all processes spent. Goal: proxy ≥ 0.8× direct.
# Needs root (starts its own sshd on a high loopback port), python3 and curl. Nothing leaves
# 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE_MIB=${SIZE_MIB:-256}
RUNS=${RUNS:-20}
. bench/lib.sh
bench_before_cleanup() { MALAI_HOME="$W/alice" "$MALAI" ssh agent stop 2>/dev/null; }
bench_init agent
start_sshd

# --- HTTP service: python3 -m http.server with one SIZE_MIB file ----------------------------
HTTP_PORT=$(free_port tcp)
mkdir -p "$W/www"
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$W/www/blob"
(cd "$W/www" && exec python3 -m http.server --bind 127.0.0.1 "$HTTP_PORT" >/dev/null 2>&1) &
PIDS+=("$!")
HTTPD_PID=$!

# --- cluster: manager, server foo (sshd + service web), device alice ------------------------
export MALAI_RELAY=disabled MALAI_USE_KEYRING=false
unset MALAI_SSH_AGENT MALAI_LOCKDOWN_MODE http_proxy HTTP_PROXY no_proxy NO_PROXY
m() { local h=$1; shift; MALAI_HOME="$W/$h" "$MALAI" "$@"; }
MGR=$(m mgr ssh cluster init bench 2>/dev/null)
FOO=$(m foo ssh cluster join bench "$MGR")
ALICE=$(m alice ssh cluster join bench "$MGR")
m mgr ssh cluster add server foo "$FOO"
m mgr ssh cluster add device alice "$ALICE"
m mgr ssh cluster allow foo alice
UDP=$(free_port udp)
F="$W/mgr/ssh/clusters/bench/cluster-manager.toml"
sed -i "s|^\[server.foo\]$|[server.foo]\nssh = \"127.0.0.1:$SSHD_PORT\"\naddrs = [\"127.0.0.1:$UDP\"]|" "$F"
printf '\n[server.foo.service.web]\nhttp = %s\nallow-from = "alice"\n' "$HTTP_PORT" >> "$F"
m foo ssh cluster import bench "$F"
m alice ssh cluster import bench "$F"
MALAI_HOME="$W/foo" "$MALAI" ssh server --bind "127.0.0.1:$UDP" 2>"$W/server.err" &
PIDS+=("$!")
SERVER_PID=$!
for _ in $(seq 100); do grep -q "server ready" "$W/server.err" 2>/dev/null && break; sleep 0.1; done
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$HTTP_PORT/" && break; sleep 0.1; done

DIRECT=(ssh -o BatchMode=yes -o IdentitiesOnly=yes -i "$W/client_key" -o UserKnownHostsFile="$W/known_hosts" -o StrictHostKeyChecking=accept-new -o LogLevel=ERROR -p "$SSHD_PORT" root@127.0.0.1)
COLD=(env -u MALAI_SSH_AGENT -u MALAI_LOCKDOWN_MODE MALAI_HOME="$W/alice" "$MALAI" ssh foo.bench)
"${DIRECT[@]}" true
"${COLD[@]}" true

# The warm agent: started once, then every exec reuses its connection.
eval "$(MALAI_HOME="$W/alice" "$MALAI" ssh agent -e)"
AGENT_PID=$(MALAI_HOME="$W/alice" "$MALAI" ssh agent status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
WARM=(env MALAI_HOME="$W/alice" MALAI_SSH_AGENT="$MALAI_SSH_AGENT" MALAI_LOCKDOWN_MODE=true "$MALAI" ssh foo.bench)
"${WARM[@]}" true
PROXY=$http_proxy
unset http_proxy HTTP_PROXY

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

# CPU seconds (user+sys) of this shell's children + the long-lived processes so far.
cpu_now() { python3 - "$SSHD_PID" "$SERVER_PID" "$HTTPD_PID" "$AGENT_PID" <<'PY'
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

# Best of 3 wall seconds (and that run's CPU seconds) of one download into /dev/null; one
# more untimed download into a file checks the bytes.
timed_best() {
    local best="" bestc="" c0 c1 t0 t1 w
    "$@" -s -o "$W/got"
    cmp -s "$W/www/blob" "$W/got" || { echo "download corrupted: $*" >&2; exit 1; }
    rm -f "$W/got"
    for _ in 1 2 3; do
        c0=$(cpu_now); t0=$(date +%s.%N)
        "$@" -s -o /dev/null
        t1=$(date +%s.%N); c1=$(cpu_now)
        w=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
        if [ -z "$best" ] || awk -v a="$w" -v b="$best" 'BEGIN { exit !(a < b) }'; then
            best=$w; bestc=$(awk -v c="$c0" -v d="$c1" 'BEGIN { printf "%.2f", d - c }')
        fi
    done
    echo "$best $bestc"
}

timed_best_exec() {
    local best="" bestc="" c0 c1 t0 t1 w
    for _ in 1 2 3; do
        c0=$(cpu_now); t0=$(date +%s.%N)
        "${WARM[@]}" "cat $W/www/blob" > /dev/null
        t1=$(date +%s.%N); c1=$(cpu_now)
        w=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
        if [ -z "$best" ] || awk -v a="$w" -v b="$best" 'BEGIN { exit !(a < b) }'; then
            best=$w; bestc=$(awk -v c="$c0" -v d="$c1" 'BEGIN { printf "%.2f", d - c }')
        fi
    done
    echo "$best $bestc"
}

rows=()
row() { rows+=("$(printf '%-44s %14s %14s %8s' "$1" "$2" "$3" "$4")"); }
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{b/a:.2f}x')" "$1" "$2"; }
mbps() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.0f} MiB/s')" "$SIZE_MIB" "$1"; }

d=$(median_ms "${DIRECT[@]}" true)
cold=$(median_ms "${COLD[@]}" true)
warm=$(median_ms "${WARM[@]}" true)
row "ssh true vs malai ssh foo true, cold (ms)" "$d" "$cold" "$(ratio "$d" "$cold")"
row "ssh true vs malai ssh foo true, warm agent" "$d" "$warm" "$(ratio "$d" "$warm")"
row "  warm agent vs cold malai (ms)" "$cold" "$warm" "$(ratio "$cold" "$warm")"

read -r dw dc < <(timed_best curl "http://127.0.0.1:$HTTP_PORT/blob")
read -r pw pc < <(timed_best curl --proxy "$PROXY" "http://web.foo.bench/blob")
read -r cw cc < <(timed_best curl -p --proxy "$PROXY" "http://web.foo.bench/blob")
row "curl ${SIZE_MIB} MiB: direct vs proxy (plain HTTP)" "$(mbps "$dw")" "$(mbps "$pw")" "$(ratio "$pw" "$dw")"
row "  CPU seconds, all processes" "$dc" "$pc" "$(ratio "$dc" "$pc")"
row "curl ${SIZE_MIB} MiB: direct vs proxy (CONNECT)" "$(mbps "$dw")" "$(mbps "$cw")" "$(ratio "$cw" "$dw")"
row "  CPU seconds, all processes" "$dc" "$cc" "$(ratio "$dc" "$cc")"
# The QUIC ceiling for comparison: the same file as native exec stdout through the agent.
read -r ew ec < <(timed_best_exec)
row "  ceiling: same file as exec stdout (agent)" "$(mbps "$dw")" "$(mbps "$ew")" "$(ratio "$ew" "$dw")"
dials=$(MALAI_HOME="$W/alice" "$MALAI" ssh agent status | sed -n 's/^dials: //p')

echo
echo "malai ssh agent bench — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), $("$MALAI" --version)"
printf '%-44s %14s %14s %8s\n' "measure" "baseline" "malai" "ratio"
printf '%s\n' "${rows[@]}"
echo "(ratio: malai/baseline for times, malai/direct throughput for MiB/s rows; agent dials: $dials)"
