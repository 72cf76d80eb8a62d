//! Security review findings (issue 12) that need whole processes: concurrent `cluster
//! add` runs do not lose an edit; revoking a peer cuts its live session within seconds;
//! a stranger's connection is closed right after the handshake. (Most findings are proven next to the feature they
//! touch: `shim` for stdinserver identities, `sync` for join by domain and pushed key
//! settings, `secrets` for logs and comments, `exec` for pinned arguments, `agent` for
//! planted sockets.)

use std::fs;
use std::process::Stdio;
use std::time::Duration;

use crate::harness::*;

#[test]
fn concurrent_cluster_adds_lose_no_edit() {
    let root = tempfile::Builder::new()
        .prefix("malai-e2e-lock-")
        .tempdir()
        .unwrap();
    let mgr = Machine::new(root.path(), "mgr");
    mgr.run_ok(["ssh", "cluster", "init", "acme"]);
    const N: u8 = 16;
    let mut children = vec![];
    for n in 0..N {
        let id = data_encoding::BASE32_DNSSEC.encode(&[n + 10; 32]);
        let name = format!("d{n}");
        let mut cmd = mgr.cmd(["ssh", "cluster", "add", "device", &name, &id]);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        children.push((name, cmd.spawn().expect("spawn malai")));
    }
    for (name, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cluster add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = fs::read_to_string(mgr.cluster_file("acme")).unwrap();
    let missing: Vec<String> = (0..N)
        .map(|n| format!("[device.d{n}]"))
        .filter(|t| !text.contains(t.as_str()))
        .collect();
    assert!(missing.is_empty(), "edits lost: {missing:?}\n{text}");
}

/// `malai ssh foo.acme <cmd>` as `device`, stdout piped; returns once the first line is
/// out (the command is running).
fn start_exec(c: &TestCluster, device: &str, cmd: &str) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = c
        .machine(device)
        .cmd(["ssh", "foo.acme", cmd])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn malai ssh");
    let mut line = String::new();
    let stdout = child.stdout.take().unwrap();
    let mut reader = std::io::BufReader::new(stdout);
    reader.read_line(&mut line).unwrap();
    // Keep draining so the remote side never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut reader, &mut sink);
    });
    (child, line)
}

/// A connection to foo with `device`'s key that opens no stream; the thread returns how
/// long it lived until foo closed it, or `None` if it stayed open 20 s (foo's idle limit
/// is 60 s, so a close within 20 s is foo's doing).
fn idle_connection(c: &TestCluster, device: &str) -> std::thread::JoinHandle<Option<Duration>> {
    use malai::transport::iroh::{NetConfig, Node};
    let key = malai::keys::load(&c.machine(device).home().join("ssh/clusters/acme")).unwrap();
    let foo: malai::id52::Id52 = c.id52("foo").parse().unwrap();
    let addr = c.server_bind("foo");
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let net = NetConfig::disabled(Some("127.0.0.1:0".parse().unwrap()));
            let node = Node::bind(&key, &net, None, false).await.unwrap();
            let conn = node.connect(&foo, &[addr]).await.unwrap();
            tx.send(()).unwrap();
            let t = std::time::Instant::now();
            let r = tokio::time::timeout(Duration::from_secs(20), conn.closed())
                .await
                .ok()
                .map(|_| t.elapsed());
            node.close_within(Duration::from_millis(100)).await;
            r
        })
    });
    rx.recv().expect("the idle connection was not made");
    h
}

fn running_on_foo(marker: &str) -> bool {
    let out = std::process::Command::new("pgrep")
        .args(["-f", marker])
        .output()
        .expect("pgrep");
    out.status.success()
}

#[test]
fn revocation_cuts_live_sessions_within_seconds() {
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Unset)
        .device("alice")
        .device("bob")
        .allow("foo", &["alice", "bob"])
        .build();
    // Unique markers so pgrep finds only this test's commands.
    let tag = format!("{}", std::process::id());
    let a_marker = format!("sleep 3{tag}1");
    let b_marker = format!("sleep 3{tag}2");
    let (mut alice, first) = start_exec(&c, "alice", &format!("echo up; {a_marker}"));
    assert_eq!(first, "up\n");
    let (mut bob, first) = start_exec(&c, "bob", &format!("echo up; {b_marker}"));
    assert_eq!(first, "up\n");
    assert!(running_on_foo(&a_marker) && running_on_foo(&b_marker));
    // An idle pooled connection of alice's (her key, no stream open).
    let pooled = idle_connection(&c, "alice");

    // The manager drops alice from foo; foo receives the new file.
    c.edit_manager_file(|t| set_table_keys(&t, "server.foo", &[("allow-from", toml_str("bob"))]));
    c.import_on("foo");
    let received = std::time::Instant::now();

    // Alice's live session ends within a few seconds, and its command with it.
    let gone = poll_until(Duration::from_secs(10), || alice.try_wait().unwrap());
    let st = gone.unwrap_or_else(|| {
        let _ = alice.kill();
        panic!(
            "alice's session outlived her revocation by 10 s\n{}",
            tail(&c.machine("foo").logs(), 40)
        )
    });
    assert!(!st.success(), "a revoked session must not look successful");
    let took = received.elapsed();
    poll_until(Duration::from_secs(5), || {
        (!running_on_foo(&a_marker)).then_some(())
    })
    .expect("alice's command still runs on foo after the revocation");
    eprintln!("revocation: alice's session ended {took:?} after foo received the file");

    // Still a member (only her access to foo went), alice's idle connection may stay: new
    // requests on it are decided against the new file. Removing her from the cluster
    // closes it.
    c.manager().run_ok(["ssh", "cluster", "remove", "alice"]);
    c.import_on("foo");
    let closed = pooled.join().unwrap();
    assert!(
        closed.is_some_and(|d| d < Duration::from_secs(10)),
        "alice's idle connection outlived her removal: {closed:?}"
    );

    // Allowed twin: bob, still in allow-from, keeps his session.
    assert!(
        bob.try_wait().unwrap().is_none(),
        "bob's session was cut too"
    );
    assert!(running_on_foo(&b_marker));
    let _ = bob.kill();
    let _ = bob.wait();
    let audit =
        fs::read_to_string(c.machine("foo").home().join("logs/ssh/audit.log")).unwrap_or_default();
    assert!(
        audit.contains("\"revoked\""),
        "no revoked entry in the audit log"
    );
}

#[test]
fn a_stranger_is_closed_right_after_the_handshake() {
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Unset)
        .device("alice")
        .allow("foo", &["alice"])
        .build();
    // mallory has a key and a copy of the file (files are not secret), but is in no list.
    let mallory = Machine::new(c.dir(), "mallory");
    let mgr_id = c.id52("mgr").to_string();
    mallory.run_ok(["ssh", "cluster", "join", "acme", &mgr_id]);
    let f = c.manager_file();
    mallory.run_ok([
        std::ffi::OsStr::new("ssh"),
        std::ffi::OsStr::new("cluster"),
        std::ffi::OsStr::new("import"),
        std::ffi::OsStr::new("acme"),
        f.as_os_str(),
    ]);
    let out = mallory.run(["ssh", "foo.acme", "echo", "in"]);
    assert_exit_code(&out, 255, "a stranger's exec");
    assert!(!stdout_of(&out).contains("in"), "{}", fmt_output(&out));
    // Closed before any request was read: no ACL answer, no audit entry.
    assert!(
        !stderr_of(&out).contains("permission denied"),
        "the stranger got as far as the ACL:\n{}",
        fmt_output(&out)
    );
    let audit =
        fs::read_to_string(c.machine("foo").home().join("logs/ssh/audit.log")).unwrap_or_default();
    let mallory_id = mallory.run_ok(["ssh", "id52", "acme"]);
    assert!(
        !audit.contains(mallory_id.trim()),
        "a stranger's request reached the ACL"
    );
    // Allowed twin: a member on the same server.
    let out = c.machine("alice").run(["ssh", "foo.acme", "echo", "in"]);
    assert_success(&out, "alice");
    assert_eq!(stdout_of(&out), "in\n");
}

fn rss_kib(pid: u32) -> u64 {
    read_lossy(std::path::Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// `n` handshakes to `target` at `addr`, each from a fresh key (a fresh endpoint),
/// `conc` at a time. Returns (handshakes completed, failed).
fn flood(target: &str, addr: std::net::SocketAddr, n: usize, conc: usize) -> (usize, usize) {
    use malai::transport::iroh::{NetConfig, Node, generate_secret};
    let target: malai::id52::Id52 = target.parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(conc));
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..n {
            let permit = sem.clone().acquire_owned().await.unwrap();
            set.spawn(async move {
                let net = NetConfig::disabled(Some("127.0.0.1:0".parse().unwrap()));
                let Ok(node) = Node::bind(&generate_secret(), &net, None, false).await else {
                    return false;
                };
                let ok = matches!(
                    tokio::time::timeout(Duration::from_secs(10), node.connect(&target, &[addr]))
                        .await,
                    Ok(Ok(_))
                );
                node.close_within(Duration::from_millis(100)).await;
                drop(permit);
                ok
            });
        }
        let (mut ok, mut failed) = (0, 0);
        while let Some(r) = set.join_next().await {
            if matches!(r, Ok(true)) {
                ok += 1
            } else {
                failed += 1
            }
        }
        (ok, failed)
    })
}

/// Issue 12, finding 3: 2,000 handshakes from fresh keys while a member copies 64 MiB
/// with scp. The member's copy completes intact and the server's memory stays bounded
/// (strangers are closed after the handshake; handshakes in flight are capped).
#[test]
fn a_handshake_flood_from_fresh_keys_does_not_stop_a_member() {
    let _heavy = heavy_lock();
    let mut c = TestCluster::builder("acme")
        .manager("mgr")
        .server("foo")
        .device("alice")
        .allow("foo", &["alice"])
        .build();
    let foo_pid = c.server_process("foo").pid();
    let foo_id = c.id52("foo").to_string();
    let addr = c.server_bind("foo");
    let src = c.scratch("local").join("big.bin");
    write_random_file(&src, 64 << 20, 12);
    let want = sha256_file(&src);
    let dst = c.scratch("remote").join("big.bin");
    let before = rss_kib(foo_pid);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(before));
    let sampler = {
        let (stop, peak) = (stop.clone(), peak.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kib(foo_pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let flooder = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        let r = flood(&foo_id, addr, 2000, 64);
        (r, t.elapsed())
    });
    let t = std::time::Instant::now();
    let out = c.scp(
        "alice",
        &[
            src.display().to_string(),
            format!("foo.acme:{}", dst.display()),
        ],
    );
    let scp_took = t.elapsed();
    let ((ok, failed), flood_took) = flooder.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let after = rss_kib(foo_pid);
    eprintln!(
        "flood: 2000 fresh-key handshakes ({ok} completed, {failed} refused or failed) in {flood_took:?}; \
         scp 64 MiB in {scp_took:?}; foo RSS {before} KiB before, peak {peak} KiB, {after} KiB after"
    );
    assert_success(&out, "alice's scp during the flood");
    assert_eq!(sha256_file(&dst), want, "the copy was corrupted");
    assert!(
        c.server_process("foo").is_running(),
        "foo died under the flood"
    );
    // Bounded: the strangers' connections are gone right after their handshakes.
    assert!(
        peak < before + 256 * 1024,
        "foo's RSS grew from {before} KiB to {peak} KiB under the flood"
    );
    // The member still gets in afterwards.
    let out = c.machine("alice").run(["ssh", "foo.acme", "echo", "after"]);
    assert_success(&out, "alice after the flood");
}

/// Issue 19, finding 1: a connection to the server's control socket from its own uid but
/// without the holder's token — what sshd's `-L x.sock:<run dir>/server-control.sock`
/// gives a key bound to `stdinserver` without `restrict` — gets a hello and nothing more.
#[test]
fn the_control_socket_wants_its_token_not_just_the_uid() {
    use malai::control::protocol::{self, FromHolder, ToHolder, VERSION};
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Unset)
        .device("alice")
        .allow("foo", &["alice"])
        .build();
    let sock = c.machine("foo").home().join("run/server-control.sock");
    assert!(sock.exists(), "no control socket at {}", sock.display());
    let alice: malai::id52::Id52 = c.id52("alice").parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ask = |token: Option<String>, request: ToHolder| {
        rt.block_on(async {
            let mut s = tokio::net::UnixStream::connect(&sock).await.unwrap();
            protocol::write(
                &mut s,
                &ToHolder::Hello {
                    version: VERSION,
                    token,
                },
            )
            .await
            .unwrap();
            let hello: FromHolder = protocol::read(&mut s).await.unwrap();
            assert!(matches!(hello, FromHolder::Hello(_)), "{hello:?}");
            // Refused right after the hello, the socket may be closed already.
            let _ = protocol::write(&mut s, &request).await;
            tokio::time::timeout(
                Duration::from_secs(10),
                protocol::read::<_, FromHolder>(&mut s),
            )
            .await
            .expect("no answer")
        })
    };
    // A `stream` needs no descriptors: without the token it must not dial anyone as foo.
    let stream = || ToHolder::Stream {
        cluster: "acme".into(),
        peer: alice,
        hints: vec![],
        request: malai::protocol::Request::Ping,
    };
    for req in [ToHolder::Status, stream()] {
        let got = ask(None, req);
        assert!(
            matches!(&got, Ok(FromHolder::Failed { message, .. }) if message.contains("token")),
            "served without the token: {got:?}"
        );
        let got = ask(Some("0".repeat(64)), ToHolder::Status);
        assert!(
            matches!(&got, Ok(FromHolder::Failed { .. })),
            "served with a wrong token: {got:?}"
        );
    }
    // Allowed twin: malai's own processes read the token next to the socket.
    let token = malai::control::token::read(&sock).expect("no token file");
    let got = ask(Some(token), ToHolder::Status);
    assert!(
        matches!(got, Ok(FromHolder::Status(_))),
        "the token's holder was refused: {got:?}"
    );
}
