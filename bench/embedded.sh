#!/usr/bin/env bash
# Benchmark: the embedded SSH server against sshd, in one run, on loopback.
#
#   bash bench/embedded.sh          # builds the release binary if needed
#   SIZE_MIB=256 RUNS=10 bash bench/embedded.sh
#
# Three ways to the same machine: direct OpenSSH to sshd; OpenSSH through
# `ProxyCommand malai ssh proxy` to a server tunnelling to that sshd (`foo`); and the same
# ProxyCommand to a server with `ssh = "embedded"` (`emb`, russh inside malai, no sshd).
# Prints `ssh host true` (median of RUNS) and an scp upload of SIZE_MIB (SFTP, scp's
# default) for each, with CPU seconds of all processes (client, malai both ends, sshd or
# sftp-server). Needs root (starts its own sshd on a high loopback port) and the packages
# .ci/run installs. Nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE_MIB=${SIZE_MIB:-1024}
RUNS=${RUNS:-20}
. bench/lib.sh
bench_init emb
start_sshd

# --- cluster: manager, servers foo (sshd) and emb (embedded), device alice ----------------
export MALAI_RELAY=disabled MALAI_USE_KEYRING=false
m() { local h=$1; shift; MALAI_HOME="$W/$h" "$MALAI" "$@"; }
MGR=$(m mgr ssh cluster init bench 2>/dev/null)
FOO=$(m foo ssh cluster join bench "$MGR")
EMB=$(m emb ssh cluster join bench "$MGR")
ALICE=$(m alice ssh cluster join bench "$MGR")
m mgr ssh cluster add server foo "$FOO"
m mgr ssh cluster add server emb "$EMB"
m mgr ssh cluster add device alice "$ALICE"
m mgr ssh cluster allow foo alice
m mgr ssh cluster allow emb alice
UDP_FOO=$(free_port udp)
UDP_EMB=$(free_port udp)
F="$W/mgr/ssh/clusters/bench/cluster-manager.toml"
sed -i "s|^\[server.foo\]$|[server.foo]\nssh = \"127.0.0.1:$SSHD_PORT\"\naddrs = [\"127.0.0.1:$UDP_FOO\"]|" "$F"
sed -i "s|^\[server.emb\]$|[server.emb]\nssh = \"embedded\"\naddrs = [\"127.0.0.1:$UDP_EMB\"]|" "$F"
for h in foo emb alice; do m "$h" ssh cluster import bench "$F"; done
MALAI_HOME="$W/foo" "$MALAI" ssh server --bind "127.0.0.1:$UDP_FOO" 2>"$W/foo.err" &
FOO_PID=$!
PIDS+=("$FOO_PID")
MALAI_HOME="$W/emb" "$MALAI" ssh server --bind "127.0.0.1:$UDP_EMB" 2>"$W/emb.err" &
EMB_PID=$!
PIDS+=("$EMB_PID")
for f in foo emb; do
    for _ in $(seq 100); do grep -q "server ready" "$W/$f.err" 2>/dev/null && break; sleep 0.1; done
done
m alice ssh known-hosts > "$W/emb_known_hosts"

PROXYCMD="ProxyCommand=env MALAI_HOME=$W/alice MALAI_RELAY=disabled MALAI_USE_KEYRING=false $MALAI ssh proxy %h %p"
COMMON=(-o BatchMode=yes -o IdentitiesOnly=yes -i "$W/client_key" -o LogLevel=ERROR)
DIRECT=(ssh "${COMMON[@]}" -o UserKnownHostsFile="$W/known_hosts" -o StrictHostKeyChecking=accept-new -p "$SSHD_PORT" root@127.0.0.1)
TUNNEL=(ssh "${COMMON[@]}" -o UserKnownHostsFile="$W/known_hosts" -o StrictHostKeyChecking=accept-new -o "$PROXYCMD" root@foo.bench)
EMBED=(ssh "${COMMON[@]}" -o UserKnownHostsFile="$W/emb_known_hosts" -o StrictHostKeyChecking=yes -o "$PROXYCMD" root@emb.bench)
SCP_DIRECT=(scp -q "${COMMON[@]}" -o UserKnownHostsFile="$W/known_hosts" -o StrictHostKeyChecking=accept-new -P "$SSHD_PORT")
SCP_TUNNEL=(scp -q "${COMMON[@]}" -o UserKnownHostsFile="$W/known_hosts" -o StrictHostKeyChecking=accept-new -o "$PROXYCMD")
SCP_EMBED=(scp -q "${COMMON[@]}" -o UserKnownHostsFile="$W/emb_known_hosts" -o StrictHostKeyChecking=yes -o "$PROXYCMD")

"${DIRECT[@]}" true
"${TUNNEL[@]}" true
"${EMBED[@]}" true

# CPU seconds (user+sys) of this shell's children + sshd + both malai servers (their
# children — sftp-server, shells — are counted once reaped, via cutime/cstime).
cpu_now() { python3 - "$SSHD_PID" "$FOO_PID" "$EMB_PID" <<'PY'
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

timed() {
    local c0 c1 t0 t1
    c0=$(cpu_now); t0=$(date +%s.%N)
    "$@"
    t1=$(date +%s.%N); c1=$(cpu_now)
    awk -v a="$t0" -v b="$t1" -v c="$c0" -v d="$c1" 'BEGIN { printf "%.3f %.3f\n", b - a, d - c }'
}
mbps() { python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.0f} MiB/s')" "$SIZE_MIB" "$1"; }

head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$W/blob"

d=$(median_ms "${DIRECT[@]}" true)
t=$(median_ms "${TUNNEL[@]}" true)
e=$(median_ms "${EMBED[@]}" true)

read -r dw dc < <(timed "${SCP_DIRECT[@]}" "$W/blob" root@127.0.0.1:"$W/up_direct")
rm -f "$W/up_direct"
read -r tw tc < <(timed "${SCP_TUNNEL[@]}" "$W/blob" root@foo.bench:"$W/up_tunnel")
cmp -s "$W/blob" "$W/up_tunnel" || { echo "scp through the tunnel corrupted the file" >&2; exit 1; }
rm -f "$W/up_tunnel"
read -r ew ec < <(timed "${SCP_EMBED[@]}" "$W/blob" root@emb.bench:"$W/up_embed")
cmp -s "$W/blob" "$W/up_embed" || { echo "scp through the embedded server corrupted the file" >&2; exit 1; }
rm -f "$W/up_embed"

echo
echo "malai ssh embedded-server bench — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), $("$MALAI" --version), $(ssh -V 2>&1)"
printf '%-34s %14s %16s %16s\n' "measure" "direct sshd" "malai → sshd" "malai embedded"
printf '%-34s %14s %16s %16s\n' "ssh host true, median of $RUNS (ms)" "$d" "$t" "$e"
printf '%-34s %14s %16s %16s\n' "scp ${SIZE_MIB} MiB upload" "$(mbps "$dw")" "$(mbps "$tw")" "$(mbps "$ew")"
printf '%-34s %14.2f %16.2f %16.2f\n' "  CPU seconds, all processes" "$dc" "$tc" "$ec"
