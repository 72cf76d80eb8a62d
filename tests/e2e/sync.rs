//! Config sync and cluster management end to end (DESIGN §4, §5): the manager's `malai ssh
//! server` pushes its file (key settings stripped) to every server member, members refuse
//! what is not theirs, an offline member catches up when it comes back, `cluster status`
//! and `cluster remove` work, a member joins by domain through a real DNS server (dnsmasq on
//! loopback), and one machine serves two clusters.
//!
//! Every cluster here is built with the harness (`cluster init/join/add/allow/import` through
//! the CLI); the manager's server is started by the test after giving the manager an `addrs`
//! hint, which is what members pull from.

use std::fs;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;

use crate::harness::*;

/// How long a change may take to reach every member (the goal is a few seconds).
const CONVERGE: Duration = Duration::from_secs(15);

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Gives the manager an `addrs` hint at a fresh port and starts its `malai ssh server` there
/// (which runs the sync loop). Returns the process and the address, for restarts.
fn start_manager(c: &TestCluster) -> (ServerProcess, SocketAddr) {
    let bind: SocketAddr = format!("127.0.0.1:{}", free_udp_port())
        .parse()
        .expect("addr");
    let hint = format!("[{}]", toml_str(&bind.to_string()));
    c.edit_manager_file(|t| set_table_keys(&t, "cluster-manager", &[("addrs", hint)]));
    (c.manager().spawn_server(bind), bind)
}

/// The file exactly as members get it (`cluster push --dry-run` prints the bytes the sync
/// loop sends) and its hash.
fn pushed(c: &TestCluster) -> (String, String) {
    let out = c.manager().run(["ssh", "cluster", "push", "--dry-run"]);
    assert_success(&out, "cluster push --dry-run");
    (stdout_of(&out), sha256_hex(&out.stdout))
}

fn member_file(c: &TestCluster, name: &str) -> Vec<u8> {
    fs::read(c.machine(name).cluster_file(&c.alias)).unwrap_or_default()
}

/// Waits until every listed member's file is byte for byte what the manager pushes; returns
/// how long that took.
fn wait_synced(c: &TestCluster, members: &[&str]) -> Duration {
    let started = Instant::now();
    let (_, want) = pushed(c);
    let done = poll_until(CONVERGE, || {
        members
            .iter()
            .all(|m| sha256_hex(&member_file(c, m)) == want)
            .then_some(())
    });
    if done.is_none() {
        let behind: Vec<&str> = members
            .iter()
            .copied()
            .filter(|m| sha256_hex(&member_file(c, m)) != want)
            .collect();
        panic!(
            "members {behind:?} did not get the manager's file within {CONVERGE:?}\n{}",
            c.diagnostics()
        );
    }
    started.elapsed()
}

/// Waits until the manager's persisted sync state records `member`'s acknowledgement of the
/// current file (what survives a manager restart).
fn wait_acked(c: &TestCluster, member: &str) {
    let (_, want) = pushed(c);
    let state = c
        .manager_file()
        .parent()
        .expect("cluster dir")
        .join("sync-state.json");
    let id = c.id52(member).to_string();
    poll_until(CONVERGE, || {
        let v: serde_json::Value = serde_json::from_slice(&fs::read(&state).ok()?).ok()?;
        (v["members"][&id]["acked"] == want.as_str()).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the manager never recorded {member}'s acknowledgement:\n{}",
            read_lossy(&state)
        )
    });
}

fn status_json(c: &TestCluster) -> serde_json::Value {
    let out = c.manager().run_ok(["ssh", "cluster", "status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

fn member_status<'a>(s: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    s["members"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == name))
        .unwrap_or_else(|| panic!("no member {name} in status {s}"))
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[test]
fn allow_change_reaches_members_and_remove_denies_again() {
    let c = TestCluster::builder("acme")
        .server("foo")
        .server_with("bar", SshTarget::Unset)
        .device("alice")
        .build();
    let (_mgr, _) = start_manager(&c);
    wait_synced(&c, &["foo", "bar"]);

    let out = c.ssh("alice", "foo.acme", "echo in");
    assert_exit_code(&out, 255, "alice before allow");
    assert!(
        stderr_of(&out).to_lowercase().contains("denied"),
        "{}",
        fmt_output(&out)
    );

    let t0 = Instant::now();
    c.manager()
        .run_ok(["ssh", "cluster", "allow", "foo", "alice"]);
    let ok = poll_until(CONVERGE, || {
        let out = c.ssh("alice", "foo.acme", "echo in");
        out.status.success().then_some(out)
    });
    let ok = ok.unwrap_or_else(|| {
        panic!(
            "alice still denied {CONVERGE:?} after `allow`\n{}",
            c.diagnostics()
        )
    });
    assert_eq!(stdout_of(&ok), "in\n");
    eprintln!(
        "allow reached foo and alice got in after {:?}",
        t0.elapsed()
    );
    wait_synced(&c, &["foo", "bar"]);

    let s = status_json(&c);
    for server in ["foo", "bar"] {
        let m = member_status(&s, server);
        assert_eq!(m["online"], true, "{s}");
        assert_eq!(m["in_sync"], true, "{s}");
        assert_eq!(m["kind"], "server", "{s}");
    }
    let alice = member_status(&s, "alice");
    assert_eq!(alice["kind"], "device");
    assert!(alice["online"].is_null(), "devices are not probed: {s}");
    let table = c.manager().run_ok(["ssh", "cluster", "status"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("foo ") && l.contains("in sync")),
        "{table}"
    );

    c.manager().run_ok(["ssh", "cluster", "remove", "alice"]);
    let denied = poll_until(CONVERGE, || {
        let out = c.ssh("alice", "foo.acme", "echo in");
        (!out.status.success()).then_some(out)
    });
    let denied = denied.unwrap_or_else(|| {
        panic!(
            "alice still let in {CONVERGE:?} after `remove`\n{}",
            c.diagnostics()
        )
    });
    assert_exit_code(&denied, 255, "alice after remove");
    // Removed, alice is a stranger to foo: her connection is closed right after the
    // handshake (issue 12, finding 3), before any request could be denied; the client
    // shows the reason foo gave ("not a member of the cluster"), or, when the file lands
    // while the tunnel is up, the tunnel is cut and the reason said.
    let err = stderr_of(&denied).to_lowercase();
    assert!(
        err.contains("denied")
            || err.contains("this machine is not a member of the cluster")
            // The file can also land mid-session: the live tunnel is cut (finding 8).
            || err.contains("access revoked")
            || err.contains("connection lost"),
        "{}",
        fmt_output(&denied)
    );
    wait_synced(&c, &["foo", "bar"]);
    let foo_file = String::from_utf8_lossy(&member_file(&c, "foo")).into_owned();
    assert!(!foo_file.contains(c.id52("alice")), "{foo_file}");

    // A removed server is still told: its copy drops it, so it grants nothing any more.
    c.manager().run_ok(["ssh", "cluster", "remove", "bar"]);
    wait_synced(&c, &["foo", "bar"]);
    let bar_file = String::from_utf8_lossy(&member_file(&c, "bar")).into_owned();
    assert!(!bar_file.contains("[server.bar]"), "{bar_file}");
}

#[test]
fn a_device_pulls_the_file_from_the_manager() {
    let c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Unset)
        .device("alice")
        .build();
    let (_mgr, _) = start_manager(&c);
    wait_synced(&c, &["foo"]);
    // Devices get no pushes (they run no server): alice still has the imported file.
    let (_, want) = pushed(&c);
    assert_ne!(sha256_hex(&member_file(&c, "alice")), want);
    // With relays off a pull needs the manager's `addrs` hint, which alice's copy predates;
    // importing the current file once gives it (with relays, the manager's id52 suffices).
    c.import_on("alice");
    c.manager()
        .run_ok(["ssh", "cluster", "allow", "foo", "alice"]);
    wait_synced(&c, &["foo"]);
    let out = c.machine("alice").run(["ssh", "cluster", "pull"]);
    assert_success(&out, "alice: cluster pull");
    assert!(
        stderr_of(&out).contains("cluster file updated"),
        "{}",
        fmt_output(&out)
    );
    assert_eq!(stdout_of(&out), "");
    wait_synced(&c, &["alice"]);
    let out = c.machine("alice").run(["ssh", "cluster", "pull"]);
    assert_success(&out, "alice: second pull");
    assert!(
        stderr_of(&out).contains("already current"),
        "{}",
        fmt_output(&out)
    );
    // The manager saw it (recorded by its sync loop a moment later).
    poll_until(Duration::from_secs(5), || {
        member_status(&status_json(&c), "alice")["last_seen"]
            .is_u64()
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no last seen for alice:\n{}", c.diagnostics()));
    let out = c.machine("alice").run(["ssh", "foo.acme", "echo", "in"]);
    assert_success(&out, "alice after pulling her grant");
}

#[test]
fn offline_member_catches_up_and_manager_restart_does_not_repush() {
    let mut c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Unset)
        .server_with("bar", SshTarget::Unset)
        .device("alice")
        .build();
    let (mgr, mgr_bind) = start_manager(&c);
    wait_synced(&c, &["foo", "bar"]);
    wait_acked(&c, "bar");

    c.stop_server("bar");
    let bar_before = member_file(&c, "bar");
    c.manager()
        .run_ok(["ssh", "cluster", "allow", "foo", "alice"]);
    wait_synced(&c, &["foo"]);
    assert_eq!(member_file(&c, "bar"), bar_before, "bar was down");
    let s = status_json(&c);
    assert_eq!(member_status(&s, "bar")["online"], false, "{s}");
    assert_eq!(member_status(&s, "bar")["in_sync"], false, "{s}");
    assert_eq!(member_status(&s, "foo")["in_sync"], true, "{s}");

    // Back up: it pulls at start (and the manager's retries would get there too).
    c.start_server("bar");
    let took = wait_synced(&c, &["bar"]);
    eprintln!("bar caught up {took:?} after its restart");
    assert!(took < Duration::from_secs(10), "{took:?}");
    // (The log line follows the file write: poll for it.)
    poll_until(Duration::from_secs(5), || {
        c.machine("bar")
            .logs()
            .contains("pulled the cluster file from the manager")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("bar did not pull at start:\n{}", c.machine("bar").logs()));

    // The manager remembers what every member acknowledged: a restart re-pushes nothing.
    let mgr_log = |c: &TestCluster| c.manager().logs();
    wait_acked(&c, "foo");
    wait_acked(&c, "bar");
    drop(mgr);
    let pushes_before = count(&mgr_log(&c), "pushed cluster file");
    let _mgr = c.manager().spawn_server(mgr_bind);
    std::thread::sleep(Duration::from_secs(3));
    let after = mgr_log(&c);
    assert!(after.contains("config sync started"), "{after}");
    assert_eq!(
        count(&after, "pushed cluster file"),
        pushes_before,
        "the restarted manager pushed again:\n{after}"
    );
}

#[test]
fn push_from_a_non_manager_is_denied_and_changes_nothing() {
    let c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Unset)
        .device("mallory")
        .build();
    let before = member_file(&c, "foo");
    let evil = c.dir().join("evil.toml");
    let text = fs::read_to_string(c.manager_file()).unwrap();
    fs::write(
        &evil,
        set_table_keys(&text, "server.foo", &[("allow-from", toml_str("mallory"))]),
    )
    .unwrap();
    let out = c.machine("mallory").run([
        "ssh",
        "cluster",
        "push",
        "--cluster",
        "acme",
        "--to",
        "foo",
        "--file",
        evil.to_str().unwrap(),
    ]);
    assert_exit_code(&out, 255, "push from mallory");
    assert!(
        stdout_of(&out).contains("foo: failed: denied: only the cluster manager may push config"),
        "{}",
        fmt_output(&out)
    );
    assert_eq!(member_file(&c, "foo"), before, "foo's file changed");
    let logs = c.machine("foo").logs();
    assert!(
        logs.lines().any(|l| l.contains("deny")
            && l.contains("config-push")
            && l.contains(c.id52("mallory"))),
        "the denial is not logged:\n{logs}"
    );
    // And mallory did not get in either.
    let out = c.machine("mallory").run(["ssh", "foo.acme", "echo", "in"]);
    assert_exit_code(&out, 255, "mallory exec");
}

#[test]
fn mismatched_or_invalid_pushes_are_refused_and_the_old_file_kept() {
    let c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Unset)
        .device("alice")
        .build();
    let text = fs::read_to_string(c.manager_file()).unwrap();
    let other_id = data_encoding::BASE32_DNSSEC.encode(&[7u8; 32]);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "other alias",
            set_table_keys(&text, "cluster-manager", &[("alias", toml_str("other"))]),
            "file is for another cluster",
        ),
        (
            "other manager",
            set_table_keys(&text, "cluster-manager", &[("id52", toml_str(&other_id))]),
            "file is for another cluster",
        ),
        (
            "unknown key",
            set_table_keys(&text, "server.foo", &[("allow-frum", toml_str("alice"))]),
            "invalid cluster file",
        ),
    ];
    let before = member_file(&c, "foo");
    for (what, body, want) in cases {
        let f = c.dir().join("push.toml");
        fs::write(&f, body).unwrap();
        let out = c.manager().run([
            "ssh",
            "cluster",
            "push",
            "--to",
            "foo",
            "--file",
            f.to_str().unwrap(),
        ]);
        assert_exit_code(&out, 255, what);
        let line = stdout_of(&out);
        assert!(
            line.starts_with("foo: refused: ") && line.contains(want),
            "{what}: {}",
            fmt_output(&out)
        );
        assert_eq!(member_file(&c, "foo"), before, "{what}: foo's file changed");
    }
    // Text that is not TOML cannot be stripped of key settings, so the manager refuses to
    // send it at all (it used to send it as it was).
    let f = c.dir().join("push.toml");
    fs::write(
        &f,
        "[cluster-manager\nid52 = \"x\"\nprivate-key = \"s3cret\"\n",
    )
    .unwrap();
    let out = c.manager().run([
        "ssh",
        "cluster",
        "push",
        "--to",
        "foo",
        "--file",
        f.to_str().unwrap(),
    ]);
    assert_exit_code(&out, 255, "not TOML");
    assert!(!stdout_of(&out).contains("foo: "), "{}", fmt_output(&out));
    assert_eq!(
        member_file(&c, "foo"),
        before,
        "not TOML: foo's file changed"
    );
    // foo still serves with its old file, and a good push still applies.
    let out = c.machine("alice").run(["ssh", "foo.acme", "true"]);
    assert_exit_code(&out, 255, "alice has no access yet");
    c.manager()
        .run_ok(["ssh", "cluster", "allow", "foo", "alice"]);
    let out = c
        .manager()
        .run_ok(["ssh", "cluster", "push", "--to", "foo"]);
    assert!(out.starts_with("foo: applied "), "{out}");
    let out = c.machine("alice").run(["ssh", "foo.acme", "echo", "in"]);
    assert_success(&out, "alice after a good push");
    assert_eq!(stdout_of(&out), "in\n");
}

#[test]
fn pushed_bytes_carry_no_key_settings() {
    let c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Unset)
        .server_with("bar", SshTarget::Unset)
        .build();
    let key_file = "/e2e/secret/manager-key-file";
    let key = "e2e0secret0private0key0material";
    // A key named in the file is refused (malai keeps it in the keyring or `secret-key`).
    let before = fs::read_to_string(c.manager_file()).unwrap();
    c.edit_manager_file(|t| {
        set_table_keys(&t, "cluster-manager", &[("private-key", toml_str(key))])
    });
    let out = c.manager().run(["ssh", "cluster", "push", "--dry-run"]);
    assert_exit_code(&out, 255, "push with private-key set");
    assert!(
        stderr_of(&out).contains("cluster-manager.private-key") && !stdout_of(&out).contains(key),
        "{}",
        fmt_output(&out)
    );
    fs::write(c.manager_file(), &before).unwrap();
    // Empty settings (the seed format) and commented-out keys are fine locally, and never
    // pushed: no comment leaves the manager.
    c.edit_manager_file(|t| {
        let t = set_table_keys(
            &t,
            "cluster-manager",
            &[
                ("use-keyring", "false".into()),
                ("private-key-file", toml_str("")),
                ("private-key", toml_str("")),
            ],
        );
        format!("# private-key-file = \"{key_file}\"\n{t}\n# private-key = \"{key}\"\n")
    });
    let (_mgr, _) = start_manager(&c);
    wait_synced(&c, &["foo", "bar"]);

    let (capture, _) = pushed(&c);
    let files = [
        ("the bytes pushed", capture),
        (
            "foo's file",
            String::from_utf8_lossy(&member_file(&c, "foo")).into_owned(),
        ),
        (
            "bar's file",
            String::from_utf8_lossy(&member_file(&c, "bar")).into_owned(),
        ),
    ];
    for (what, text) in &files {
        assert!(
            !text.contains(key) && !text.contains(key_file),
            "{what}:\n{text}"
        );
        for setting in ["use-keyring", "private-key-file", "private-key"] {
            assert!(
                !text.lines().any(|l| {
                    let l = l.trim_start();
                    l.strip_prefix(setting)
                        .is_some_and(|r| r.trim_start().starts_with('='))
                }),
                "{what} sets {setting}:\n{text}"
            );
        }
    }
    // The manager's own file keeps them.
    let own = fs::read_to_string(c.manager_file()).unwrap();
    assert!(own.contains(key) && own.contains(key_file));
}

#[test]
fn a_torn_write_leaves_the_old_file_in_force() {
    let mut c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Unset)
        .device("alice")
        .allow("foo", &["alice"])
        .build();
    let (_mgr, _) = start_manager(&c);
    wait_synced(&c, &["foo"]);
    let dir = c
        .machine("foo")
        .cluster_file("acme")
        .parent()
        .unwrap()
        .to_path_buf();
    let good = member_file(&c, "foo");

    // What a crash between writing the temp file and renaming it leaves behind.
    let pid = c.server_process("foo").pid();
    fs::write(
        dir.join(format!(".cluster-manager.toml.tmp.{pid}")),
        &good[..good.len() / 2],
    )
    .unwrap();
    fs::write(
        dir.join(".cluster-manager.toml.tmp.1"),
        b"[cluster-manager\n",
    )
    .unwrap();
    assert_eq!(member_file(&c, "foo"), good);
    let out = c.machine("alice").run(["ssh", "foo.acme", "echo", "ok"]);
    assert_success(&out, "alice with a torn temp file beside the real one");

    // Kill the member hard while the manager pushes a burst of changes: whatever instant the
    // kill hits, the file left is one complete version.
    for i in 0..12 {
        c.manager().run_ok([
            "ssh",
            "cluster",
            "add",
            "device",
            &format!("d{i}"),
            &data_encoding::BASE32_DNSSEC.encode(&[i as u8 + 100; 32]),
        ]);
        if i == 6 {
            let pid = c.server_process("foo").pid();
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .unwrap();
        }
    }
    c.stop_server("foo");
    let left = String::from_utf8(member_file(&c, "foo")).expect("utf-8");
    assert!(
        left.contains("[cluster-manager]") && left.contains("[server.foo]"),
        "{left}"
    );
    c.start_server("foo");
    wait_synced(&c, &["foo"]);
    let out = c.machine("alice").run(["ssh", "foo.acme", "echo", "ok"]);
    assert_success(&out, "alice after the member's restart");
}

// ---------------------------------------------------------------------------------------------
// Join by domain
// ---------------------------------------------------------------------------------------------

/// A real DNS server (dnsmasq) on 127.0.0.1 answering only for `*.test`, with the given TXT
/// records. Killed on drop.
struct Dnsmasq {
    child: Child,
    port: u16,
}

impl Dnsmasq {
    fn start(dir: &Path, txt: &[(&str, String)]) -> Dnsmasq {
        let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq", "/sbin/dnsmasq"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("dnsmasq is not installed (Debian package dnsmasq-base; .ci/run installs it)");
        // A port free for both UDP and TCP (dnsmasq listens on both).
        let port = (0..50)
            .find_map(|_| {
                let u = UdpSocket::bind("127.0.0.1:0").ok()?;
                let p = u.local_addr().ok()?.port();
                std::net::TcpListener::bind(("127.0.0.1", p)).ok()?;
                Some(p)
            })
            .expect("a free port");
        let mut cmd = Command::new(bin);
        cmd.args([
            "--no-daemon",
            &format!("--port={port}"),
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--local=/test/",
            &format!("--pid-file={}", dir.join("dnsmasq.pid").display()),
        ]);
        for (name, value) in txt {
            cmd.arg(format!("--txt-record={name},{value}"));
        }
        let log = fs::File::create(dir.join("dnsmasq.log")).expect("dnsmasq log");
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("start dnsmasq");
        let d = Dnsmasq { child, port };
        poll_until(Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        })
        .unwrap_or_else(|| {
            panic!(
                "dnsmasq did not start:\n{}",
                read_lossy(&dir.join("dnsmasq.log"))
            )
        });
        d
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn join_by_domain_through_dnsmasq_then_first_push() {
    let root = tempfile::Builder::new()
        .prefix("malai-e2e-dns-")
        .tempdir()
        .unwrap();
    let mgr = Machine::new(root.path(), "mgr");
    let mgr_id = mgr.run_ok(["ssh", "cluster", "init", "acme.test"]);
    let record = mgr.run_ok(["ssh", "cluster", "dns-record", "acme.test"]);
    assert_eq!(
        record,
        format!("acme.test. IN TXT \"malai-cluster={mgr_id}\"")
    );
    let value = record
        .split('"')
        .nth(1)
        .expect("quoted TXT value")
        .to_string();
    let other = data_encoding::BASE32_DNSSEC.encode(&[9u8; 32]);
    let dns = Dnsmasq::start(
        root.path(),
        &[
            ("acme.test", value),
            ("acme.test", "v=spf1 -all".into()),
            ("dup.test", format!("malai-cluster={mgr_id}")),
            ("dup.test", format!("malai-cluster={other}")),
            ("bad.test", "malai-cluster=not-an-id52".into()),
            ("plain.test", "v=spf1 -all".into()),
        ],
    );
    let foo = Machine::new(root.path(), "foo");
    let join = |domain: &str| {
        run_cmd(
            foo.cmd(["ssh", "cluster", "join", domain])
                .env("MALAI_DNS_SERVER", dns.addr()),
        )
    };

    for (domain, want) in [
        ("dup.test", "several different"),
        ("bad.test", "does not hold a valid id52"),
        ("plain.test", "has no TXT record"),
        ("missing.test", "has no TXT record"),
    ] {
        let out = join(domain);
        assert_exit_code(&out, 255, domain);
        assert!(
            stderr_of(&out).contains(want),
            "{domain}: {}",
            fmt_output(&out)
        );
        assert_eq!(stdout_of(&out), "", "{domain}: stdout must stay empty");
        assert!(
            !foo.home().join("ssh/clusters").join(domain).exists(),
            "{domain}: a failed join left a cluster folder"
        );
    }

    // DNS is not trusted: without a terminal to confirm on, a found manager is refused
    // with the id52 and a hint, and nothing is joined.
    let out = join("acme.test");
    assert_exit_code(&out, 255, "join acme.test by DNS without confirmation");
    let err = stderr_of(&out);
    assert!(
        err.contains(&mgr_id)
            && err.contains("NOT validated by DNSSEC")
            && err.contains("--manager <id52>"),
        "{}",
        fmt_output(&out)
    );
    assert_eq!(stdout_of(&out), "");
    assert!(!foo.home().join("ssh/clusters/acme.test").exists());
    // A pin that disagrees with DNS (a forged answer, as the member sees it) is refused.
    let out = run_cmd(
        foo.cmd(["ssh", "cluster", "join", "acme.test", "--manager", &other])
            .env("MALAI_DNS_SERVER", dns.addr()),
    );
    assert_exit_code(&out, 255, "join acme.test --manager <other>");
    assert!(stderr_of(&out).contains("refusing"), "{}", fmt_output(&out));
    assert!(!foo.home().join("ssh/clusters/acme.test").exists());
    // On a terminal the user is asked; "n" joins nothing, "y" joins.
    require_program("script", "bsdutils");
    let on_tty = |who: &Machine, answer: &str| {
        let line = format!("{} ssh cluster join acme.test", who.env_command_prefix());
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &line, "/dev/null"])
            .env("MALAI_DNS_SERVER", dns.addr());
        run_cmd_with(&mut cmd, Some(answer.as_bytes()), CHILD_TIMEOUT)
    };
    let bar = Machine::new(root.path(), "bar");
    let out = on_tty(&bar, "n\n");
    assert_exit_code(&out, 255, "join on a tty, answered n");
    let all = format!("{}{}", stdout_of(&out), stderr_of(&out));
    assert!(
        all.contains("Join? [y/N]") && all.contains(&mgr_id),
        "{}",
        fmt_output(&out)
    );
    assert!(!bar.home().join("ssh/clusters/acme.test").exists());
    let out = on_tty(&bar, "y\n");
    assert_success(&out, "join on a tty, answered y");
    let joined =
        fs::read_to_string(bar.home().join("ssh/clusters/acme.test/manager-id52")).unwrap();
    assert_eq!(joined.trim(), mgr_id);

    // The pinned, matching id52 joins without asking.
    let out = run_cmd(
        foo.cmd(["ssh", "cluster", "join", "acme.test", "--manager", &mgr_id])
            .env("MALAI_DNS_SERVER", dns.addr()),
    );
    assert_success(&out, "join acme.test by DNS --manager <mgr>");
    let foo_id = stdout_of(&out).trim().to_string();
    assert_id52(&foo_id, "joined id52");
    let joined =
        fs::read_to_string(foo.home().join("ssh/clusters/acme.test/manager-id52")).unwrap();
    assert_eq!(joined.trim(), mgr_id);

    // The manager adds it; the member's server has no file yet and gets its first one pushed.
    let foo_bind: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let mgr_bind: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    mgr.run_ok(["ssh", "cluster", "add", "server", "foo", &foo_id]);
    let file = mgr.cluster_file("acme.test");
    let text = fs::read_to_string(&file).unwrap();
    let text = set_table_keys(
        &text,
        "server.foo",
        &[("addrs", format!("[{}]", toml_str(&foo_bind.to_string())))],
    );
    let text = set_table_keys(
        &text,
        "cluster-manager",
        &[("addrs", format!("[{}]", toml_str(&mgr_bind.to_string())))],
    );
    fs::write(&file, text).unwrap();
    let _foo_server = foo.spawn_server(foo_bind);
    let _mgr_server = mgr.spawn_server(mgr_bind);
    let want = {
        let out = mgr.run(["ssh", "cluster", "push", "--dry-run"]);
        sha256_hex(&out.stdout)
    };
    let member = foo.cluster_file("acme.test");
    poll_until(CONVERGE, || {
        (sha256_hex(&fs::read(&member).unwrap_or_default()) == want).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "the joined member never got its first file\n{}\n{}",
            mgr.logs(),
            foo.logs()
        )
    });
}

/// Issue 24, item 4: a cluster whose alias is not the domain its members join by. The
/// domain join takes the manager's file (the manager id52 is what must match), and the
/// cluster's servers answer to both names on the member.
#[test]
fn a_domain_join_takes_a_file_with_another_alias() {
    let root = tempfile::Builder::new()
        .prefix("malai-e2e-dns-")
        .tempdir()
        .unwrap();
    let mgr = Machine::new(root.path(), "mgr");
    let mgr_id = mgr.run_ok(["ssh", "cluster", "init", "acme"]);
    let dns = Dnsmasq::start(
        root.path(),
        &[("acme.example.test", format!("malai-cluster={mgr_id}"))],
    );
    let alice = Machine::new(root.path(), "alice");
    let out = run_cmd(
        alice
            .cmd([
                "ssh",
                "cluster",
                "join",
                "acme.example.test",
                "--manager",
                &mgr_id,
            ])
            .env("MALAI_DNS_SERVER", dns.addr()),
    );
    assert_success(&out, "join acme.example.test by DNS --manager <mgr>");
    let alice_id = stdout_of(&out).trim().to_string();
    mgr.run_ok(["ssh", "cluster", "add", "device", "alice", &alice_id]);
    let mgr_bind: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let _mgr_server = mgr.spawn_server(mgr_bind);
    let from = mgr_bind.to_string();
    let out = alice.run([
        "ssh",
        "cluster",
        "pull",
        "--cluster",
        "acme.example.test",
        "--from",
        &from,
    ]);
    assert_success(&out, "alice: first pull of a file whose alias is acme");
    let text = read_lossy(&alice.cluster_file("acme.example.test"));
    assert!(text.contains("alias = \"acme\""), "{text}");
    // Both names reach the cluster here: the ssh config block lists both.
    let cfg = alice.run_ok(["ssh", "config"]);
    let words: Vec<&str> = cfg.split_whitespace().collect();
    assert!(
        words.contains(&"*.acme.example.test") && words.contains(&"*.acme"),
        "{cfg}"
    );
    // A folder joined by id52 (not by domain) still refuses a file of another alias.
    let bob = Machine::new(root.path(), "bob");
    let bob_id = bob.run_ok(["ssh", "cluster", "join", "other.example.test", &mgr_id]);
    mgr.run_ok(["ssh", "cluster", "add", "device", "bob", &bob_id]);
    let out = bob.run([
        "ssh",
        "cluster",
        "pull",
        "--cluster",
        "other.example.test",
        "--from",
        &from,
    ]);
    assert_exit_code(&out, 255, "bob: pull into a folder of another name");
    assert!(
        stderr_of(&out).contains("another cluster"),
        "{}",
        fmt_output(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// Several clusters on one machine
// ---------------------------------------------------------------------------------------------

/// Two consecutive free UDP ports (a server with `--bind P` serves its n-th cluster on P+n).
fn free_udp_pair() -> u16 {
    (0..100)
        .find_map(|_| {
            let a = UdpSocket::bind("127.0.0.1:0").ok()?;
            let p = a.local_addr().ok()?.port();
            UdpSocket::bind(("127.0.0.1", p.checked_add(1)?)).ok()?;
            Some(p)
        })
        .expect("two consecutive free UDP ports")
}

fn add_server(mgr: &Machine, cluster: &str, name: &str, id: &str, addr: SocketAddr) {
    mgr.run_ok(["ssh", "cluster", "add", "server", name, id]);
    let file = mgr.cluster_file(cluster);
    let text = fs::read_to_string(&file).unwrap();
    let table = format!("server.{name}");
    let addrs = format!("[{}]", toml_str(&addr.to_string()));
    fs::write(&file, set_table_keys(&text, &table, &[("addrs", addrs)])).unwrap();
}

#[test]
fn one_machine_in_two_clusters_serves_both_with_the_right_keys() {
    let root = tempfile::Builder::new()
        .prefix("malai-e2e-2c-")
        .tempdir()
        .unwrap();
    let m = |n: &str| Machine::new(root.path(), n);
    let (mgr_a, mgr_b, afoo, bfoo, shared, client) = (
        m("mgr-a"),
        m("mgr-b"),
        m("afoo"),
        m("bfoo"),
        m("shared"),
        m("client"),
    );
    let ida = mgr_a.run_ok(["ssh", "cluster", "init", "a"]);
    let idb = mgr_b.run_ok(["ssh", "cluster", "init", "b"]);
    let join = |who: &Machine, cluster: &str, mgr: &str| {
        who.run_ok(["ssh", "cluster", "join", cluster, mgr])
    };
    let afoo_id = join(&afoo, "a", &ida);
    let bfoo_id = join(&bfoo, "b", &idb);
    let shared_a = join(&shared, "a", &ida);
    let shared_b = join(&shared, "b", &idb);
    let client_a = join(&client, "a", &ida);
    let client_b = join(&client, "b", &idb);
    assert_ne!(shared_a, shared_b, "one key per cluster");
    assert_ne!(client_a, client_b, "one key per cluster");

    let afoo_bind: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let bfoo_bind: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let p = free_udp_pair();
    let shared_bind: SocketAddr = format!("127.0.0.1:{p}").parse().unwrap();
    let shared_b_addr: SocketAddr = format!("127.0.0.1:{}", p + 1).parse().unwrap();

    for (mgr, cluster, foo_id, foo_bind, common_id, common_addr, me_id) in [
        (
            &mgr_a,
            "a",
            &afoo_id,
            afoo_bind,
            &shared_a,
            shared_bind,
            &client_a,
        ),
        (
            &mgr_b,
            "b",
            &bfoo_id,
            bfoo_bind,
            &shared_b,
            shared_b_addr,
            &client_b,
        ),
    ] {
        add_server(mgr, cluster, "foo", foo_id, foo_bind);
        add_server(mgr, cluster, "common", common_id, common_addr);
        mgr.run_ok(["ssh", "cluster", "add", "device", "me", me_id]);
        mgr.run_ok(["ssh", "cluster", "allow", "foo", "me"]);
        mgr.run_ok(["ssh", "cluster", "allow", "common", "me"]);
        let file: PathBuf = mgr.cluster_file(cluster);
        for member in [&afoo, &bfoo, &shared, &client] {
            if member.home().join("ssh/clusters").join(cluster).is_dir() {
                member.run_ok(["ssh", "cluster", "import", cluster, file.to_str().unwrap()]);
            }
        }
    }
    let _afoo = afoo.spawn_server(afoo_bind);
    let _bfoo = bfoo.spawn_server(bfoo_bind);
    let shared_server = shared.spawn_server(shared_bind);
    let log = shared_server.stderr_log();
    assert!(
        log.contains("serving cluster a as") && log.contains("serving cluster b as"),
        "one server process serves both clusters:\n{log}"
    );

    // Which machine answered (its server's MALAI_HOME) and which key asked.
    let probe =
        "tr '\\0' '\\n' < /proc/$PPID/environ | grep '^MALAI_HOME='; echo peer=$MALAI_PEER_ID52";
    for (host, machine, key) in [
        ("foo.a", &afoo, &client_a),
        ("foo.b", &bfoo, &client_b),
        ("common.a", &shared, &client_a),
        ("common.b", &shared, &client_b),
    ] {
        let out = client.run(["ssh", host, probe]);
        assert_success(&out, host);
        assert_eq!(
            stdout_of(&out),
            format!("MALAI_HOME={}\npeer={key}\n", machine.home().display()),
            "{host}"
        );
    }

    let out = client.run(["ssh", "foo", "true"]);
    assert_exit_code(&out, 255, "bare foo");
    let err = stderr_of(&out);
    assert!(
        err.contains("ambiguous") && err.contains("foo.a") && err.contains("foo.b"),
        "{err}"
    );
}

/// Issue 19, finding 7: the manager's sync loop noticed a change by mtime and size, so an
/// edit that kept both was never pushed (and the old ACL stayed in force on the members).
#[test]
fn a_same_length_edit_with_the_mtime_kept_is_still_pushed() {
    let c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Unset)
        .device("alice")
        .device("carol")
        .allow("foo", &["alice"])
        .build();
    let (_mgr, _) = start_manager(&c);
    wait_synced(&c, &["foo"]);
    let path = c.manager_file();
    let before = fs::read_to_string(&path).unwrap();
    let mtime = fs::metadata(&path).unwrap().modified().unwrap();
    let after = before.replacen("\"alice\"", "\"carol\"", 1);
    assert!(
        after != before && after.len() == before.len(),
        "no same-length edit to make:\n{before}"
    );
    // Give the sync loop a tick to have seen the first version, then edit in place.
    std::thread::sleep(Duration::from_secs(2));
    fs::write(&path, &after).unwrap();
    let f = fs::File::options().write(true).open(&path).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(mtime))
        .unwrap();
    drop(f);
    assert_eq!(fs::metadata(&path).unwrap().modified().unwrap(), mtime);
    wait_synced(&c, &["foo"]);
    let got = String::from_utf8(member_file(&c, "foo")).unwrap();
    assert!(got.contains("\"carol\""), "{got}");
}
