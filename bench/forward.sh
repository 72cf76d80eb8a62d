#!/usr/bin/env bash
# Benchmark: one large HTTP download through a port forward (issue 13), in one run:
#   - `ssh -L` straight to sshd: the tool users would otherwise use, the baseline;
#   - `malai ssh -N -L` (native: one iroh connection, one stream for the download);
#   - `ssh -L` through `ProxyCommand malai ssh proxy` to the same sshd (ssh inside QUIC);
#   - the agent's HTTP proxy (`http://web.foo.bench/`), as a forward-free alternative;
#   - plain loopback curl, the ceiling.
#
#   bash bench/forward.sh                 # builds the release binary if needed
#   SIZE_MIB=256 bash bench/forward.sh
#
# Each download: one checked byte for byte, then best of 3 into /dev/null; CPU seconds of
# all processes for that best run. Needs root (its own sshd on a high loopback port),
# python3 and curl. Nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE_MIB=${SIZE_MIB:-256}
. bench/lib.sh
bench_before_cleanup() { MALAI_HOME="$W/alice" "$MALAI" ssh agent stop 2>/dev/null; }
bench_init forward
start_sshd

HTTP_PORT=$(free_port tcp)
mkdir -p "$W/www"
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$W/www/blob"
(cd "$W/www" && exec python3 -m http.server --bind 127.0.0.1 "$HTTP_PORT" >/dev/null 2>&1) &
PIDS+=("$!")
HTTPD_PID=$!

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

wait_port() { for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never came up" >&2; exit 1; }

SSH_OPTS=(-o BatchMode=yes -o IdentitiesOnly=yes -i "$W/client_key" -o UserKnownHostsFile="$W/known_hosts" -o StrictHostKeyChecking=accept-new -o LogLevel=ERROR)
# Baseline: ssh -L straight to sshd.
P_SSH=$(free_port tcp)
ssh "${SSH_OPTS[@]}" -N -L "$P_SSH:127.0.0.1:$HTTP_PORT" -p "$SSHD_PORT" root@127.0.0.1 &
PIDS+=("$!"); SSH_PID=$!
# Native malai ssh -L.
P_MALAI=$(free_port tcp)
MALAI_HOME="$W/alice" "$MALAI" ssh -N -L "$P_MALAI:127.0.0.1:$HTTP_PORT" foo.bench 2>"$W/malai-L.err" &
PIDS+=("$!"); MALAI_L_PID=$!
# ssh -L through the ProxyCommand (ssh to the same sshd, carried by malai).
P_PROXY=$(free_port tcp)
PROXY_CMD="env MALAI_HOME=$W/alice MALAI_RELAY=disabled MALAI_USE_KEYRING=false $MALAI ssh proxy %h %p"
ssh "${SSH_OPTS[@]}" -o UserKnownHostsFile="$W/known_hosts_proxy" -o "ProxyCommand=$PROXY_CMD" \
    -N -L "$P_PROXY:127.0.0.1:$HTTP_PORT" root@foo.bench &
PIDS+=("$!"); SSH_PROXY_PID=$!
wait_port "$P_SSH"; wait_port "$P_MALAI"; wait_port "$P_PROXY"
AGENT_PID=""

cpu_now() { python3 - "$SSHD_PID" "$SERVER_PID" "$HTTPD_PID" "$AGENT_PID" "$SSH_PID" "$MALAI_L_PID" "$SSH_PROXY_PID" <<'PY'
import os, sys
t = os.times()
tot = t.children_user + t.children_system
hz = os.sysconf("SC_CLK_TCK")
for pid in [p for p in sys.argv[1:] if p.isdigit()]:
    try:
        f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        tot += sum(int(x) for x in f[11:15]) / hz
        # sshd forks a child per connection: count the children of the listed pids too.
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    s = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
                    if s[1] == pid:
                        tot += sum(int(x) for x in s[11:15]) / hz
                except OSError:
                    pass
    except (OSError, IndexError):
        pass
print(f"{tot:.3f}")
PY
}

timed_best() {
    local best="" bestc="" c0 c1 t0 t1 w
    "$@" -s -o "$W/got"
    cmp -s "$W/www/blob" "$W/got" || { echo "download corrupted: $*" >&2; head -c 300 "$W/got" >&2; ls -la "$W" >&2; cat "$W"/alice/logs/ssh/agent*.log* 2>/dev/null | tail -20 >&2; exit 1; }
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

mbps() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.0f}')" "$SIZE_MIB" "$1"; }
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}x')" "$1" "$2"; }

read -r bw bc < <(timed_best curl "http://127.0.0.1:$P_SSH/blob")
read -r nw nc < <(timed_best curl "http://127.0.0.1:$P_MALAI/blob")
read -r tw tc < <(timed_best curl "http://127.0.0.1:$P_PROXY/blob")
read -r dw dc < <(timed_best curl "http://127.0.0.1:$HTTP_PORT/blob")

# The agent can only hold alice's key once no command does (one endpoint per id52): stop
# the standalone malai -L and the ProxyCommand ssh, then start it.
kill "$MALAI_L_PID" "$SSH_PROXY_PID"; wait "$MALAI_L_PID" "$SSH_PROXY_PID" 2>/dev/null || true
# ssh's ProxyCommand child (`malai ssh proxy`) exits on the EOF that follows.
for _ in $(seq 100); do pgrep -f "$MALAI ssh proxy" >/dev/null || break; sleep 0.1; done
eval "$(MALAI_HOME="$W/alice" "$MALAI" ssh agent -e)"
AGENT_PID=$(MALAI_HOME="$W/alice" "$MALAI" ssh agent status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
PROXY=$http_proxy
unset http_proxy HTTP_PROXY
read -r aw ac < <(timed_best curl --proxy "$PROXY" "http://web.foo.bench/blob")
# malai ssh -L again, now through the agent's pooled connection.
P_VIA=$(free_port tcp)
MALAI_HOME="$W/alice" "$MALAI" ssh -N -L "$P_VIA:127.0.0.1:$HTTP_PORT" foo.bench 2>"$W/malai-L-via.err" &
PIDS+=("$!"); MALAI_L_PID=$!
wait_port "$P_VIA"
read -r vw vc < <(timed_best curl "http://127.0.0.1:$P_VIA/blob")

echo
echo "malai forward bench — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg), $("$MALAI" --version)"
printf '%-46s %10s %10s %12s\n' "curl ${SIZE_MIB} MiB through" "MiB/s" "CPU s" "vs ssh -L"
printf '%-46s %10s %10s %12s\n' "ssh -L to sshd (baseline)" "$(mbps "$bw")" "$bc" "1.00x"
printf '%-46s %10s %10s %12s\n' "malai ssh -N -L (native)" "$(mbps "$nw")" "$nc" "$(ratio "$bw" "$nw")"
printf '%-46s %10s %10s %12s\n' "ssh -L via ProxyCommand malai ssh proxy" "$(mbps "$tw")" "$tc" "$(ratio "$bw" "$tw")"
printf '%-46s %10s %10s %12s\n' "agent HTTP proxy (web.foo.bench)" "$(mbps "$aw")" "$ac" "$(ratio "$bw" "$aw")"
printf '%-46s %10s %10s %12s\n' "malai ssh -N -L through the agent" "$(mbps "$vw")" "$vc" "$(ratio "$bw" "$vw")"
printf '%-46s %10s %10s %12s\n' "plain loopback curl (ceiling)" "$(mbps "$dw")" "$dc" "$(ratio "$bw" "$dw")"
echo "(vs ssh -L: throughput ratio, >1 is faster than ssh -L; CPU s: sshd and its children, the ssh clients, malai server/agent/client, python; not curl; best run)"
