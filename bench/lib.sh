# Shared set-up for the bench scripts (sourced, not run): the malai binary, a scratch folder
# cleaned on exit, free loopback ports, and a real sshd on a high port with its own keys.
# A script may define `bench_before_cleanup` (e.g. to stop an agent) before exiting.

# MALAI: $MALAI_BIN, else the $BUILD_PROFILE build (default release; built if needed).
bench_init() { # $1: a tag for the scratch folder name
    MALAI=${MALAI_BIN:-}
    if [ -z "$MALAI" ]; then
        local profile=${BUILD_PROFILE:-release}
        cargo build --profile "$profile" --quiet
        MALAI="${CARGO_TARGET_DIR:-target}/$profile/malai"
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

# A one-server cluster on loopback (needs start_sshd first): manager mgr, server foo (its ssh
# is our sshd; malai server pid $SERVER_PID on UDP $UDP), device alice allowed on foo. Sets
# the command arrays DIRECT/PROXY/NATIVE (ssh direct, ssh through `malai ssh proxy`, native
# exec) and SCP_DIRECT/SCP_PROXY.
start_cluster() {
    export MALAI_RELAY=disabled MALAI_USE_KEYRING=false
    m() { local h=$1; shift; MALAI_HOME="$W/$h" "$MALAI" "$@"; }
    MGR=$(m mgr ssh cluster init bench 2>/dev/null)
    FOO=$(m foo ssh cluster join bench "$MGR")
    ALICE=$(m alice ssh cluster join bench "$MGR")
    m mgr ssh cluster add server foo "$FOO"
    m mgr ssh cluster add device alice "$ALICE"
    m mgr ssh cluster allow foo alice
    UDP=$(free_port udp)
    local f="$W/mgr/ssh/clusters/bench/cluster-manager.toml"
    sed -i "s|^\[server.foo\]$|[server.foo]\nssh = \"127.0.0.1:$SSHD_PORT\"\naddrs = [\"127.0.0.1:$UDP\"]|" "$f"
    m foo ssh cluster import bench "$f"
    m alice ssh cluster import bench "$f"
    MALAI_HOME="$W/foo" "$MALAI" ssh server --bind "127.0.0.1:$UDP" 2>"$W/server.err" &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    for _ in $(seq 100); do grep -q "server ready" "$W/server.err" 2>/dev/null && break; sleep 0.1; done

    COMMON=(-o BatchMode=yes -o IdentitiesOnly=yes -i "$W/client_key" -o UserKnownHostsFile="$W/known_hosts" -o StrictHostKeyChecking=accept-new -o LogLevel=ERROR)
    DIRECT=(ssh "${COMMON[@]}" -p "$SSHD_PORT" root@127.0.0.1)
    PROXY=(ssh "${COMMON[@]}" -o "ProxyCommand=env MALAI_HOME=$W/alice MALAI_RELAY=disabled MALAI_USE_KEYRING=false $MALAI ssh proxy %h %p" root@foo.bench)
    NATIVE=(env MALAI_HOME="$W/alice" "$MALAI" ssh foo.bench)
    SCP_DIRECT=(scp -q "${COMMON[@]}" -P "$SSHD_PORT")
    SCP_PROXY=(scp -q "${COMMON[@]}" -o "ProxyCommand=env MALAI_HOME=$W/alice MALAI_RELAY=disabled MALAI_USE_KEYRING=false $MALAI ssh proxy %h %p")
}
