#!/usr/bin/env bash
# A/B benchmark: two malai binaries on the same loopback cluster set-up, their runs
# alternating, so that a noisy VM (other tenants, CPU steal) hits both alike.
#
#   A=/path/to/old/malai B=target/release/malai ROUNDS=5 SIZE_MIB=1024 bash bench/ab.sh
#
# For each binary it starts its own cluster and malai server (one sshd serves both), then per
# round runs, A then B: scp upload through `malai ssh proxy`, native `cat > /dev/null` fed
# from a file on stdin, native `cat file` to /dev/null, and two of the stdin ones at once. Prints the median wall time and the
# median CPU seconds of malai's two ends (the client process and the server, from /proc) per
# case — CPU per byte is what issue 23 is about, and it survives a noisy machine far better
# than wall time. Needs root (sshd) and the packages .ci/run installs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

: "${A:?A=path to the first malai binary}" "${B:?B=path to the second malai binary}"
ROUNDS=${ROUNDS:-5}
SIZE_MIB=${SIZE_MIB:-1024}
MALAI_BIN=$A
. bench/lib.sh
bench_init ab
start_sshd
ROOT=$W
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$ROOT/blob"

declare -A SERVER NATIVE_CMD PROXY_CMD
for side in A B; do
    W=$ROOT/$side
    mkdir -p "$W"
    cp "$ROOT/client_key" "$W/client_key"
    MALAI=$(readlink -f "${!side}")
    start_cluster
    SERVER[$side]=$SERVER_PID
    NATIVE_CMD[$side]=$(printf '%q ' "${NATIVE[@]}")
    PROXY_CMD[$side]=$(printf '%q ' "${SCP_PROXY[@]}")
done
W=$ROOT

# CPU seconds (user+sys) of one pid.
pid_cpu() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"; }

# Run "$@" (a shell string) and print: wall seconds, client CPU seconds, server CPU seconds.
measure() { # $1 server pid, $2 command
    local s0 s1
    s0=$(pid_cpu "$1")
    python3 - "$2" <<'PY'
import os, subprocess, sys, time
t = time.perf_counter()
subprocess.run(["sh", "-c", sys.argv[1]], check=True)
wall = time.perf_counter() - t
c = os.times()
print(f"{wall:.3f} {c.children_user + c.children_system:.3f}", end=" ")
PY
    s1=$(pid_cpu "$1")
    awk -v a="$s0" -v b="$s1" 'BEGIN { printf "%.3f\n", b - a }'
}

declare -A RESULTS
for r in $(seq "$ROUNDS"); do
    for side in A B; do
        srv=${SERVER[$side]}
        # The client CPU of scp includes ssh's own (one process tree); the malai proxy's share
        # is not separable here: bench/profile.sh splits it.
        RESULTS[scp,$side]+="$(measure "$srv" "${PROXY_CMD[$side]} $ROOT/blob root@foo.bench:$ROOT/$side/up")"$'\n'
        RESULTS[stdin,$side]+="$(measure "$srv" "${NATIVE_CMD[$side]} 'cat > /dev/null' < $ROOT/blob")"$'\n'
        RESULTS[stdout,$side]+="$(measure "$srv" "${NATIVE_CMD[$side]} 'cat $ROOT/blob' > /dev/null")"$'\n'
        # Two at once through one server: what a server's thread count costs or buys.
        RESULTS[two,$side]+="$(measure "$srv" "${NATIVE_CMD[$side]} 'cat > /dev/null' < $ROOT/blob & ${NATIVE_CMD[$side]} 'cat > /dev/null' < $ROOT/blob; wait")"$'\n'
        rm -f "$ROOT/$side/up"
    done
done

echo
echo "malai A/B — $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r), $SIZE_MIB MiB, median of $ROUNDS"
echo "A=$A"
echo "B=$B"
printf '%-34s %9s %9s %7s   %9s %9s %7s\n' "case (wall s | malai CPU s)" "A wall" "B wall" "B/A" "A CPU" "B CPU" "B/A"
for case in scp stdin stdout two; do
    python3 - "$case" "${RESULTS[$case,A]}" "${RESULTS[$case,B]}" <<'PY'
import statistics, sys
case, a, b = sys.argv[1], sys.argv[2], sys.argv[3]
def parse(t):
    rows = [list(map(float, l.split())) for l in t.strip().splitlines()]
    wall = statistics.median(r[0] for r in rows)
    # scp: the client tree is ssh + scp + the proxy; count only the server there.
    cpu = statistics.median((r[2] if case == "scp" else r[1] + r[2]) for r in rows)
    return wall, cpu
(aw, ac), (bw, bc) = parse(a), parse(b)
names = {"scp": "scp up via proxy (server CPU)", "stdin": "native stdin < file", "stdout": "native stdout > /dev/null", "two": "two native stdin at once"}
print(f"{names[case]:<34} {aw:9.3f} {bw:9.3f} {bw/aw:6.2f}x   {ac:9.3f} {bc:9.3f} {bc/ac:6.2f}x")
PY
done
