#!/usr/bin/env bash
# Profile: where the CPU goes while scp moves a file through malai's ProxyCommand.
#
#   bash bench/profile.sh                 # builds the `profiling` profile (release + symbols)
#   SIZE_MIB=256 FREQ=1999 bash bench/profile.sh
#   STRACE=1 bash bench/profile.sh        # also: syscalls per MiB of each malai end
#   PERF=0 STRACE=1 bash bench/profile.sh # only that
#
# Sets up the same loopback cluster and sshd as bench/bridge.sh, then runs, each under a
# system-wide `perf record` (cpu-clock samples, no call graphs: one sample = 1/FREQ s of CPU):
#   1. scp SIZE_MIB direct to sshd, 2. scp through `malai ssh proxy`,
#   3. `ssh cat > /dev/null` direct, 4. native `malai ssh foo 'cat > /dev/null'`.
# For each it prints the CPU seconds of every process (ssh/scp, sshd, the malai server, the
# malai client end) and the CPU per MiB; for the two malai ends it sorts their samples into
# buckets (crypto, QUIC packet building, kernel UDP/TCP send+receive, kernel copies, user
# copies, allocation, tokio, the pump, …) with percentages and the top symbols.
# Needs root (sshd on a high loopback port, perf system-wide). Nothing leaves 127.0.0.1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

SIZE_MIB=${SIZE_MIB:-512}
FREQ=${FREQ:-1999}
TOP=${TOP:-12}
export BUILD_PROFILE=${BUILD_PROFILE:-profiling}
. bench/lib.sh
bench_init profile
start_sshd
start_cluster
"${DIRECT[@]}" true
"${PROXY[@]}" true
head -c $((SIZE_MIB * 1024 * 1024)) /dev/urandom > "$W/blob"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)$([ -e /work/LOADED ] && echo ' (LOADED)')"

# The machine is shared: only samples of this script's own processes count. A poller
# writes "pid comm" of every descendant of this shell (sshd, its sessions, ssh/scp, the
# malai server and the ProxyCommand) every 10 ms while perf runs.
watch_pids() { # $1: output file; runs until killed
    python3 - "$$" "$1" <<'PY'
import os, sys, time
root, out = sys.argv[1], sys.argv[2]
seen = {}
while True:
    parent = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                st = open(f"/proc/{p}/stat").read()
                comm = st[st.index("(") + 1:st.rindex(")")]
                parent[p] = (st[st.rindex(")") + 2:].split()[1], comm)
            except (OSError, ValueError):
                pass
    for p, (pp, comm) in parent.items():
        q, hops = pp, 0
        while q in parent and q != root and hops < 20:
            q, hops = parent[q][0], hops + 1
        if q == root and seen.get(p) != comm:
            seen[p] = comm
            with open(out, "a") as f:
                f.write(f"{p} {comm}\n")
    time.sleep(0.01)
PY
}

# perf_run NAME CMD...: CMD under a system-wide perf record; samples kept in $W/NAME.data,
# this run's own pids in $W/NAME.pids.
perf_run() {
    local name=$1; shift
    watch_pids "$W/$name.pids" &
    local watcher=$!
    sleep 0.2
    perf record -q -a -F "$FREQ" -o "$W/$name.data" -- "$@" >/dev/null 2>"$W/$name.perf.err" \
        || { cat "$W/$name.perf.err" >&2; kill "$watcher"; exit 1; }
    kill "$watcher"; wait "$watcher" 2>/dev/null || true
}

if [ "${PERF:-1}" = 1 ]; then
perf_run scp_direct "${SCP_DIRECT[@]}" "$W/blob" root@127.0.0.1:"$W/up"
perf_run scp_proxy "${SCP_PROXY[@]}" "$W/blob" root@foo.bench:"$W/up"
cmp -s "$W/blob" "$W/up" || { echo "scp through malai corrupted the file" >&2; exit 1; }
rm -f "$W/up"
perf_run cat_direct sh -c '"$@" "cat > /dev/null" < "'"$W/blob"'"' _ "${DIRECT[@]}"
perf_run cat_native sh -c '"$@" "cat > /dev/null" < "'"$W/blob"'"' _ "${NATIVE[@]}"

for name in scp_direct scp_proxy cat_direct cat_native; do
    perf script -i "$W/$name.data" -F pid,tid,comm,ip,sym,dso 2>/dev/null > "$W/$name.txt"
done

python3 - "$W" "$FREQ" "$SIZE_MIB" "$SERVER_PID" "$TOP" <<'PY'
import collections, re, sys
w, freq, mib, server, top = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])

# perf script line: "comm pid/tid ip sym (dso)" (sym may contain spaces and generics).
LINE = re.compile(r"^\s*(?P<comm>.+?)\s+(?P<pid>\d+)/(?P<tid>\d+)\s+(?P<ip>[0-9a-f]+)\s+(?P<sym>.*?)\s+\((?P<dso>[^()]*)\)\s*$")

def who(comm, pid):
    if pid == server:
        return "malai server"
    if comm == "swapper":
        return "idle"
    if pid not in ours:
        return "not this benchmark"
    comm = ours[pid]
    for name in ("scp", "sshd", "ssh"):
        if comm == name or comm.startswith(name + "-") or comm == "sftp-server":
            return "sftp-server" if comm == "sftp-server" else name
    if comm.startswith("malai") or comm.startswith("tokio"):
        return "malai client"
    if comm in ("cat", "sh"):
        return "cat/sh"
    if comm in ("python3", "perf", "sleep"):
        return "bench tooling"
    return "other"

BUCKETS = [  # first match wins; (bucket, test on (sym, dso))
    ("crypto: AEAD (AES-GCM/ChaCha20)", lambda s, d: re.search(r"aes|gcm|ghash|chacha|poly1305|gfmul|clmul", s, re.I) and "kernel" not in d),
    ("crypto: other (ring/rustls)", lambda s, d: "ring" in d or s.startswith(("ring", "rustls", "<ring", "<rustls")) or "ring_core" in s),
    ("kernel: copies to/from user", lambda s, d: "kernel" in d and re.search(r"copy_user|copy_to_iter|copy_from_iter|rep_movs|copy_page|memcpy|memmove|csum_partial_copy", s)),
    ("kernel: UDP/TCP/IP + loopback", lambda s, d: "kernel" in d and re.search(r"udp|tcp|ip_|ip6|skb|sock|net_|dev_|loopback|gro|gso|__sys_|sendmsg|recvmsg|sendto|recvfrom|nf_|inet|napi|netif|do_softirq|__napi|csum", s)),
    # In this VM cpu-clock samples taken with interrupts off land where they are re-enabled
    # (`_raw_spin_unlock_irqrestore`, mostly waking another task) and `finish_task_switch`.
    ("kernel: wake-ups, context switches, epoll, futex", lambda s, d: "kernel" in d and re.search(r"epoll|futex|schedule|sched|switch|wake|ep_|pick_|enqueue|dequeue|update_curr|select_task|irqrestore|spin_on_owner|_raw_spin|irqentry", s)),
    ("kernel: pipes/fs (stdin/stdout)", lambda s, d: "kernel" in d and re.search(r"pipe|vfs_|fsnotify|file|rw_verify|ksys_", s)),
    ("kernel: syscall entry/exit, other", lambda s, d: "kernel" in d),
    ("user copies (memcpy/memmove)", lambda s, d: re.search(r"memcpy|memmove|__memset|memset", s)),
    ("allocation (malloc/free)", lambda s, d: re.search(r"malloc|free|realloc|_int_|calloc|tcache|arena", s) and "libc" in d),
    ("QUIC: noq-proto (packets, frames, ACKs, streams)", lambda s, d: "noq_proto" in s),
    ("QUIC: noq + noq-udp (endpoint driver, socket)", lambda s, d: re.search(r"\bnoq(_udp)?::|<noq(_udp)?::", s) is not None),
    ("iroh (socket, paths, transports)", lambda s, d: "iroh" in s),
    ("tokio runtime + mio", lambda s, d: re.search(r"tokio|mio::", s) is not None),
    ("malai (pump, stdio, session)", lambda s, d: "malai" in s),
    ("libc other", lambda s, d: "libc" in d),
    ("other", lambda s, d: True),
]

def bucket(sym, dso):
    for name, test in BUCKETS:
        if test(sym, dso):
            return name

runs = [("scp_direct", "scp direct to sshd"), ("scp_proxy", "scp via malai ssh proxy"),
        ("cat_direct", "ssh 'cat > /dev/null'"), ("cat_native", "malai ssh foo 'cat > /dev/null'")]
results = {}
for key, title in runs:
    per = collections.Counter()
    sym_by_end = {"malai server": collections.Counter(), "malai client": collections.Counter()}
    buck_by_end = {"malai server": collections.Counter(), "malai client": collections.Counter()}
    ours = dict(l.split(None, 1) for l in open(f"{w}/{key}.pids").read().splitlines() if " " in l)
    ours = {p: c.strip() for p, c in ours.items()}
    for line in open(f"{w}/{key}.txt", errors="replace"):
        m = LINE.match(line)
        if not m:
            continue
        p = who(m["comm"], m["pid"])
        per[p] += 1
        if p in sym_by_end:
            sym, dso = m["sym"], m["dso"].rsplit("/", 1)[-1]
            sym_by_end[p][(sym, dso)] += 1
            buck_by_end[p][bucket(sym, dso)] += 1
    results[key] = (title, per, sym_by_end, buck_by_end)

print(f"\nCPU seconds per process (perf samples / {freq} Hz), {mib} MiB each")
print(f"{'path':34} {'process':14} {'CPU s':>7} {'ms/MiB':>7}")
for key, (title, per, _, _) in results.items():
    busy = sum(v for k, v in per.items() if k not in ("idle", "not this benchmark", "bench tooling"))
    for p, n in sorted(per.items(), key=lambda kv: -kv[1]):
        if p == "idle" or n < freq // 100:
            continue
        print(f"{title:34} {p:14} {n / freq:7.2f} {1000 * n / freq / mib:7.2f}")
    print(f"{title:34} {'this benchmark':14} {busy / freq:7.2f} {1000 * busy / freq / mib:7.2f}")

def ends(key):
    _, per, _, _ = results[key]
    return (per["malai server"] + per["malai client"]) / freq
def ssh_pair(key):
    _, per, _, _ = results[key]
    return sum(per[k] for k in ("ssh", "scp", "sshd", "sftp-server")) / freq
print(f"\nmalai's two ends vs ssh + sshd: scp {ends('scp_proxy'):.2f} s vs {ssh_pair('scp_direct'):.2f} s "
      f"({ends('scp_proxy') / max(ssh_pair('scp_direct'), 1e-9):.2f}x); "
      f"cat {ends('cat_native'):.2f} s vs {ssh_pair('cat_direct'):.2f} s "
      f"({ends('cat_native') / max(ssh_pair('cat_direct'), 1e-9):.2f}x)")

for key in ("scp_proxy", "cat_native"):
    title, per, syms, bucks = results[key]
    for end in ("malai server", "malai client"):
        total = sum(bucks[end].values())
        if not total:
            continue
        print(f"\n{title} — {end}: {total / freq:.2f} CPU s, {1000 * total / freq / mib:.2f} ms/MiB")
        for b, n in bucks[end].most_common():
            print(f"  {100 * n / total:5.1f} %  {b}")
        print(f"  top symbols:")
        for (s, d), n in syms[end].most_common(top):
            print(f"  {100 * n / total:5.1f} %  {s[:90]}  [{d}]")
PY
fi

if [ "${STRACE:-0}" = 1 ]; then
    # Syscalls per MiB of each end during one scp (strace slows everything: counts only).
    strace -c -f -q -o "$W/strace.server" -p "$SERVER_PID" &
    ST=$!
    sleep 0.5
    "${SCP_PROXY[@]/ProxyCommand=env/ProxyCommand=strace -c -f -q -o $W/strace.client env}" "$W/blob" root@foo.bench:"$W/up"
    kill -INT "$ST"; wait "$ST" 2>/dev/null || true
    for _ in $(seq 50); do grep -q total "$W/strace.client" 2>/dev/null && break; sleep 0.1; done
    ls -la "$W"/strace.* >&2
    for end in server client; do
        echo; echo "syscalls of the malai $end during one scp of $SIZE_MIB MiB (per MiB in the last column)"
        awk -v mib="$SIZE_MIB" '/^ *[0-9.]+ +[0-9.]+ +[0-9]+ +[0-9]+/ && $NF != "total" { printf "%-18s %10d %8.1f\n", $NF, $4, $4 / mib }' "$W/strace.$end" \
            | sort -k2 -n -r | head -8
    done
fi
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
