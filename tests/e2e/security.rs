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
