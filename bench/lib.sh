# Shared set-up for the bench scripts (sourced, not run): the malai binary, a scratch folder
# cleaned on exit, free loopback ports, and a real sshd on a high port with its own keys.
# A script may define `bench_before_cleanup` (e.g. to stop an agent) before exiting.

# MALAI: $MALAI_BIN, else the release build (built if needed).
bench_init() { # $1: a tag for the scratch folder name
    MALAI=${MALAI_BIN:-}
    if [ -z "$MALAI" ]; then
        cargo build --release --quiet
        MALAI="${CARGO_TARGET_DIR:-target}/release/malai"
    fi
    MALAI=$(readlink -f "$MALAI")
    W=$(mktemp -d "/tmp/malai-bench-$1.XXXXXX")
    PIDS=()
    trap bench_cleanup EXIT
}

bench_cleanup() {
    if declare -F bench_before_cleanup >/dev/null; then bench_before_cleanup || true; fi
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$W"
}

free_port() { python3 -c 'import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM if sys.argv[1]=="udp" else socket.SOCK_STREAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' "$1"; }

# Starts sshd on 127.0.0.1:$SSHD_PORT (pid $SSHD_PID); client key $W/client_key.
start_sshd() {
    SSHD_PORT=$(free_port tcp)
    mkdir -p /run/sshd "$W/sshd"
    ssh-keygen -q -t ed25519 -N '' -f "$W/sshd/host_key"
    ssh-keygen -q -t ed25519 -N '' -f "$W/client_key"
    cp "$W/client_key.pub" "$W/sshd/authorized_keys"
    cat > "$W/sshd/config" <<CFG
Port $SSHD_PORT
ListenAddress 127.0.0.1
HostKey $W/sshd/host_key
PidFile $W/sshd/pid
AuthorizedKeysFile $W/sshd/authorized_keys
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
CFG
    /usr/sbin/sshd -D -e -f "$W/sshd/config" 2>"$W/sshd/log" &
    SSHD_PID=$!
    PIDS+=("$SSHD_PID")
}
