//! First use, as a newcomer meets it (issue 24): a device's agent picks up the manager's
//! changes with no command typed; lockdown keeps every key-reading command away from the
//! key when no agent runs (and lets each work through one); the messages of the usual
//! mistakes say what happened and what to do, once.
//!
//! Cluster `acme`: manager `mgr` (its server runs the sync loop, reachable by an `addrs`
//! hint), server `foo` (embedded ssh) with HTTP service `web`, device `alice`.

use std::fs;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::agent::{Agent, parse_exports};
use crate::harness::*;
use crate::http::{HttpServer, curl};

/// The schedule the test's agents use (`MALAI_SYNC_POLL_SECS`).
const POLL_SECS: u64 = 2;
/// What the test allows for it: the bound (`poll + poll/4`) plus the request, generously
/// (two cores shared by many tests).
const FOLLOW_BOUND: Duration = Duration::from_secs(POLL_SECS * 6);
/// How long the manager's push to a server may take under load.
const CONVERGE: Duration = Duration::from_secs(30);

/// The cluster, with the manager's server running and every member holding a file that
/// carries the manager's `addrs` hint (relays are off in tests).
fn acme(web: u16) -> (TestCluster, ServerProcess) {
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Embedded)
        .device("alice")
        .build();
    let bind: SocketAddr = format!("127.0.0.1:{}", free_udp_port())
        .parse()
        .expect("addr");
    let hint = format!("[{}]", toml_str(&bind.to_string()));
    c.edit_manager_file(|t| {
        set_table_keys(&t, "cluster-manager", &[("addrs", hint)])
            + &format!("\n[server.foo.service.web]\nhttp = {web}\nallow-from = \"alice\"\n")
    });
    c.distribute();
    let mgr = c.manager().spawn_server(bind);
    (c, mgr)
}

#[test]
fn a_device_with_an_agent_sees_a_new_service_with_no_command_typed() {
    let www = tempfile::tempdir().unwrap();
    fs::write(www.path().join("index.html"), "hello from web\n").unwrap();
    let http = HttpServer::start(www.path());
    let (c, _mgr) = acme(http.port);
    let alice = c.machine("alice");
    let poll = POLL_SECS.to_string();
    let agent = Agent::start_with_env(alice, &[], &[("MALAI_SYNC_POLL_SECS", &poll)]);
    let proxy = agent.exports["http_proxy"].clone();
    let get = |svc: &str| {
        curl(
            Some(&proxy),
            &[&format!("http://{svc}.foo.acme/index.html")],
        )
    };

    let out = get("web");
    assert_success(&out, "alice: curl web");
    assert_eq!(stdout_of(&out), "hello from web\n");
    assert!(stdout_of(&get("new")).contains("unknown service"));

    // The manager adds a service; alice types nothing.
    c.edit_manager_file(|t| {
        t + &format!(
            "\n[server.foo.service.new]\nhttp = {}\nallow-from = \"alice\"\n",
            http.port
        )
    });
    let changed = Instant::now();
    let file = alice.cluster_file("acme");
    poll_until(FOLLOW_BOUND, || {
        read_lossy(&file)
            .contains("[server.foo.service.new]")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "alice's agent did not pull the new file within {FOLLOW_BOUND:?}:\n{}",
            c.diagnostics()
        )
    });
    eprintln!(
        "alice's file followed the manager in {:?}",
        changed.elapsed()
    );
    // foo got the push meanwhile (servers are pushed to); the new service answers.
    let out = poll_until(CONVERGE, || {
        let out = get("new");
        (stdout_of(&out) == "hello from web\n").then_some(out)
    });
    assert!(
        out.is_some(),
        "new service never answered:\n{}",
        c.diagnostics()
    );
    poll_until(Duration::from_secs(5), || {
        alice
            .logs()
            .contains("pulled the cluster file from the manager")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("no pull in alice's log:\n{}", alice.logs()));
}

fn secret_key(m: &Machine) -> std::path::PathBuf {
    m.home().join("ssh/clusters/acme/secret-key")
}

/// Moves `m`'s secret key away for the guard's life: a command that still succeeds did not
/// read it.
struct HiddenKey {
    key: std::path::PathBuf,
    hidden: std::path::PathBuf,
}

impl HiddenKey {
    fn new(m: &Machine) -> HiddenKey {
        let key = secret_key(m);
        let hidden = key.with_file_name("secret-key.hidden");
        fs::rename(&key, &hidden).expect("hide the key");
        HiddenKey { key, hidden }
    }
}

impl Drop for HiddenKey {
    fn drop(&mut self) {
        let _ = fs::rename(&self.hidden, &self.key);
    }
}

/// One command that can read a cluster key: its arguments, its stdin, and what its stdout
/// must start with when it works.
struct KeyReader {
    args: Vec<String>,
    stdin: &'static [u8],
    out: &'static str,
}

fn key_readers(http_port: u16) -> Vec<KeyReader> {
    let a = |s: &[&str]| s.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    vec![
        // Native exec.
        KeyReader {
            args: a(&["ssh", "foo.acme", "echo", "exec-ok"]),
            stdin: b"",
            out: "exec-ok\n",
        },
        // A group.
        KeyReader {
            args: a(&["ssh", "web.acme", "echo", "group-ok"]),
            stdin: b"",
            out: "foo: group-ok\n",
        },
        // The ProxyCommand: the embedded server's SSH banner.
        KeyReader {
            args: a(&["ssh", "proxy", "foo.acme", "22"]),
            stdin: b"",
            out: "SSH-2.0-",
        },
        // A stdio forward to the HTTP server on foo.
        KeyReader {
            args: a(&["ssh", "-W", &format!("127.0.0.1:{http_port}"), "foo.acme"]),
            stdin: b"GET /index.html HTTP/1.0\r\n\r\n",
            out: "HTTP/1.0 200",
        },
        // Config sync from a member.
        KeyReader {
            args: a(&["ssh", "cluster", "pull"]),
            stdin: b"",
            out: "",
        },
    ]
}

fn run_reader(mut cmd: std::process::Command, r: &KeyReader) -> std::process::Output {
    cmd.args(&r.args).env("MALAI_LOCKDOWN_MODE", "true");
    run_cmd_with(&mut cmd, Some(r.stdin), Duration::from_secs(60))
}

fn assert_refused(out: &std::process::Output, what: &str) {
    assert_exit_code(out, 255, what);
    let err = stderr_of(out);
    assert!(
        err.contains("lockdown mode") && err.contains("malai ssh agent -e"),
        "{what}: {err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: one line: {err}");
    assert!(out.stdout.is_empty(), "{what}: {}", fmt_output(out));
}

#[test]
fn lockdown_refuses_every_key_reader_without_an_agent_and_each_works_with_one() {
    let www = tempfile::tempdir().unwrap();
    fs::write(www.path().join("index.html"), "hello from web\n").unwrap();
    let http = HttpServer::start(www.path());
    let (c, mgr) = acme(http.port);
    c.edit_manager_file(|t| t + "\n[group.web]\nmembers = \"foo\"\n");
    c.manager()
        .run_ok(["ssh", "cluster", "allow", "foo", "alice"]);
    // Everyone has the file with alice's grant and the group.
    let file = c.machine("foo").cluster_file("acme");
    let want = c.manager().run_ok(["ssh", "cluster", "push", "--dry-run"]);
    poll_until(CONVERGE, || {
        (read_lossy(&file).trim() == want).then_some(())
    })
    .unwrap_or_else(|| panic!("foo never got the file:\n{}", c.diagnostics()));
    c.import_on("alice");
    let alice = c.machine("alice");

    for r in key_readers(http.port) {
        let _hidden = HiddenKey::new(alice);
        let what = format!("alice, lockdown, no agent: {}", r.args.join(" "));
        assert_refused(&run_reader(alice.cmd(Vec::<String>::new()), &r), &what);
    }
    // A native session that bound the key itself: `malai ssh status` says one runs
    // (issue 24, item 9: it said "no cluster connections").
    let mut session = alice
        .cmd(["ssh", "foo.acme", "sleep", "20"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn a native session");
    let seen = poll_until(Duration::from_secs(15), || {
        let out = alice.run(["ssh", "status"]);
        stdout_of(&out)
            .contains("acme: commands that bound the key themselves are running")
            .then_some(())
    });
    let _ = session.kill();
    let _ = session.wait();
    assert!(
        seen.is_some(),
        "{}",
        fmt_output(&alice.run(["ssh", "status"]))
    );

    let agent = Agent::start(alice, &["--http=false"]);
    let _hidden = HiddenKey::new(alice);
    for r in key_readers(http.port) {
        let what = format!("alice through her agent: {}", r.args.join(" "));
        let out = run_reader(agent.cmd(Vec::<String>::new()), &r);
        assert_success(&out, &what);
        assert!(
            stdout_of(&out).starts_with(r.out),
            "{what}: {}",
            fmt_output(&out)
        );
    }
    drop(_hidden);
    // Every request has ended: no pooled connection still counts one (issue 24, item 9:
    // after a `cluster pull` one stayed "active" and was never closed).
    let idle = poll_until(Duration::from_secs(10), || {
        let raw = agent.status()["raw"].clone();
        (!raw
            .lines()
            .any(|l| l.contains("connection ") && !l.contains("active 0")))
        .then_some(())
    });
    assert!(idle.is_some(), "{}", agent.status()["raw"]);

    // The manager's commands, with its server (the usual key holder) stopped.
    drop(mgr);
    let m = c.manager();
    let admin = |args: &[&str]| KeyReader {
        args: args.iter().map(|s| s.to_string()).collect(),
        stdin: b"",
        out: "",
    };
    let admins = [
        admin(&["ssh", "cluster", "push"]),
        admin(&["ssh", "cluster", "status"]),
    ];
    for r in &admins {
        let _hidden = HiddenKey::new(m);
        let what = format!("mgr, lockdown, no agent: {}", r.args.join(" "));
        assert_refused(&run_reader(m.cmd(Vec::<String>::new()), r), &what);
    }
    let agent = Agent::start(m, &["--http=false"]);
    let _hidden = HiddenKey::new(m);
    for r in &admins {
        let what = format!("mgr through its agent: {}", r.args.join(" "));
        assert_success(&run_reader(agent.cmd(Vec::<String>::new()), r), &what);
    }
}

/// One line on stderr that contains every `want`, and none of `never`.
fn assert_one_line(out: &std::process::Output, what: &str, want: &[&str], never: &[&str]) {
    let err = stderr_of(out);
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{what}: one line:\n{err}"
    );
    for w in want {
        assert!(err.contains(w), "{what}: no {w:?} in: {err}");
    }
    for n in never {
        assert!(!err.contains(n), "{what}: {n:?} in: {err}");
    }
    // No text twice: no clause of 12+ characters appears two times.
    for part in err.trim_end().split(": ").filter(|p| p.len() >= 12) {
        assert_eq!(
            err.matches(part).count(),
            1,
            "{what}: {part:?} twice in: {err}"
        );
    }
}

#[test]
fn messages_of_the_usual_mistakes_point_the_right_way() {
    let (c, _mgr) = acme(free_tcp_port());
    let alice = c.machine("alice");

    // `ssh config` pins what its ProxyCommand depends on, as this shell has it.
    let cfg = alice.run_ok(["ssh", "config"]);
    let home = format!("MALAI_HOME={}", alice.home().display());
    for want in [
        home.as_str(),
        "MALAI_RELAY=disabled",
        "MALAI_BIND=127.0.0.1:0",
    ] {
        assert!(cfg.contains(want), "no {want} in:\n{cfg}");
    }

    // No agent: status and stop say so, nothing about trust or unreadable directories.
    let out = alice.run(["ssh", "agent", "status"]);
    assert_exit_code(&out, 255, "agent status, no agent");
    assert_one_line(
        &out,
        "agent status",
        &["no agent is running", "agent -e"],
        &["trusted", "unreadable"],
    );
    let out = alice.run(["ssh", "agent", "stop"]);
    assert_success(&out, "agent stop, no agent");
    assert_one_line(
        &out,
        "agent stop",
        &["no agent is running"],
        &["trusted", "unreadable"],
    );

    // A thread count that is no number is refused in one line, never run with a default;
    // a good one changes nothing a user sees.
    for bad in ["0", "two", ""] {
        let out = alice
            .cmd(["ssh", "server"])
            .env("MALAI_WORKER_THREADS", bad)
            .output()
            .expect("run malai");
        assert_exit_code(&out, 255, "server with a bad MALAI_WORKER_THREADS");
        assert_one_line(
            &out,
            "bad MALAI_WORKER_THREADS",
            &["MALAI_WORKER_THREADS", "1 or more"],
            &["panicked"],
        );
    }
    let out = alice
        .cmd(["ssh", "agent", "status"])
        .env("MALAI_WORKER_THREADS", "3")
        .output()
        .expect("run malai");
    assert_exit_code(&out, 255, "agent status, 3 workers");
    assert_one_line(
        &out,
        "agent status, 3 workers",
        &["no agent is running"],
        &[],
    );

    // A stranger (it has the file, the file does not list it) is told it is the one unknown.
    let eve = Machine::new(c.dir(), "eve");
    eve.run_ok(["ssh", "cluster", "join", "acme", c.id52("mgr")]);
    let file = c.manager_file();
    eve.run_ok([
        std::ffi::OsStr::new("ssh"),
        std::ffi::OsStr::new("cluster"),
        std::ffi::OsStr::new("import"),
        std::ffi::OsStr::new("acme"),
        file.as_os_str(),
    ]);
    let out = eve.run(["ssh", "foo.acme", "true"]);
    assert_exit_code(&out, 255, "stranger's exec");
    assert_one_line(
        &out,
        "stranger's exec",
        &[
            "foo.acme",
            "this machine is not a member of the cluster",
            "manager",
        ],
        &["not known to this cluster"],
    );

    // A removed member's pull says why, not "protocol error: i/o: connection lost".
    let out = alice.run(["ssh", "cluster", "pull"]);
    assert_success(&out, "alice's pull while a member");
    c.manager().run_ok(["ssh", "cluster", "remove", "alice"]);
    let out = alice.run(["ssh", "cluster", "pull"]);
    assert_exit_code(&out, 255, "removed member's pull");
    assert_one_line(
        &out,
        "removed member's pull",
        &["manager", "this machine is not a member of the cluster"],
        &["protocol error", "i/o"],
    );
}

#[test]
fn agent_stop_names_the_stale_variables_and_a_new_agent_takes_the_port_back() {
    let (c, _mgr) = acme(free_tcp_port());
    let alice = c.machine("alice");
    let agent = Agent::start(alice, &[]);
    let old = agent.exports.clone();
    let proxy = old["HTTP_PROXY"].clone();
    agent.keep_running();

    let out = run_cmd(alice.cmd(["ssh", "agent", "stop"]).envs(&old));
    assert_success(&out, "agent stop");
    assert_one_line(
        &out,
        "agent stop",
        &[
            "stopped the agent (pid",
            &format!("HTTP_PROXY/http_proxy ({proxy})"),
            "MALAI_SSH_AGENT",
            "stale",
        ],
        &[],
    );
    // That shell's `agent -e` (or `malai ssh curl`) brings the agent back on the port its
    // variables name, so they work again.
    let again = parse_exports(&stdout_of(&run_cmd(
        alice.cmd(["ssh", "agent", "-e"]).envs(&old),
    )));
    assert_eq!(again["HTTP_PROXY"], proxy, "{again:?}");
    let out = run_cmd(alice.cmd(["ssh", "agent", "stop"]).envs(&again));
    assert_success(&out, "second stop");
    // A fresh shell (no variables): the last agent's port, when free.
    let fresh = Agent::start(alice, &[]);
    assert_eq!(fresh.exports["HTTP_PROXY"], proxy, "{:?}", fresh.exports);
}

#[test]
fn a_command_with_no_agent_brings_the_device_up_to_date_alongside() {
    let (c, _mgr) = acme(free_tcp_port());
    c.manager()
        .run_ok(["ssh", "cluster", "allow", "foo", "alice"]);
    let alice = c.machine("alice");
    let file = alice.cluster_file("acme");
    let run = || {
        let mut cmd = alice.cmd(["ssh", "foo.acme", "echo", "ok"]);
        cmd.env("MALAI_SYNC_POLL_SECS", "1");
        run_cmd(&mut cmd)
    };
    // alice's copy predates her grant: foo (pushed to) lets her in, and the command that
    // dialed with her own key brought her copy up to date alongside.
    let foo_file = c.machine("foo").cluster_file("acme");
    let want = c.manager().run_ok(["ssh", "cluster", "push", "--dry-run"]);
    poll_until(CONVERGE, || {
        (read_lossy(&foo_file).trim() == want).then_some(())
    })
    .unwrap_or_else(|| panic!("foo never got the file:\n{}", c.diagnostics()));
    assert_ne!(read_lossy(&file).trim(), want);
    let out = run();
    assert_success(&out, "alice's exec, no agent");
    assert_eq!(stdout_of(&out), "ok\n");
    assert_eq!(
        read_lossy(&file).trim(),
        want,
        "alice's copy was not brought up to date"
    );
    // Once per poll interval: a command right after does not ask again (its own log says).
    let stamp = alice.home().join("ssh/clusters/acme/last-manager-check");
    let before = fs::metadata(&stamp).and_then(|m| m.modified()).ok();
    assert!(before.is_some(), "no check stamp");
    let mut cmd = alice.cmd(["ssh", "foo.acme", "true"]);
    cmd.env("MALAI_SYNC_POLL_SECS", "600");
    assert_success(&run_cmd(&mut cmd), "second exec");
    assert_eq!(fs::metadata(&stamp).and_then(|m| m.modified()).ok(), before);
}

/// The fenced blocks of README's walk-through, in order: (language, text).
fn walk_through_blocks() -> Vec<(String, String)> {
    let readme =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README.md");
    let start = readme
        .find("## Walk-through")
        .expect("walk-through section");
    let rest = &readme[start..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    let mut blocks = vec![];
    let mut lines = rest[..end].lines();
    while let Some(l) = lines.next() {
        if let Some(lang) = l.strip_prefix("```")
            && !lang.is_empty()
        {
            let body: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            blocks.push((lang.to_string(), body.join("\n")));
        }
    }
    blocks
}

/// README's walk-through, run from its own text (issue 24: README and behaviour must not
/// drift apart). Only what a test must change is changed: the folders (`/tmp/m` → a
/// temporary one), the ports (7744 and sshd's 22 → free ones), `~/.ssh` (→ a scratch
/// file), a wait for the server that the reader starts with `&`, and the interactive `ssh
/// foo.acme` gets a command and the harness sshd's client key.
#[test]
fn readme_walk_through_runs_as_written() {
    require_sshd();
    let root = tempfile::tempdir().unwrap();
    let sshd = Sshd::start(&root.path().join("sshd"));
    let m = root.path().join("m");
    let port = free_udp_port().to_string();
    let ssh_config = root.path().join("ssh_config");
    let known = root.path().join("known_hosts");
    let blocks = walk_through_blocks();
    let kinds: Vec<&str> = blocks.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        ["sh", "toml", "sh"],
        "the walk-through's shape changed"
    );
    let adapt = |t: &str| {
        t.replace("/tmp/m", &m.display().to_string())
            .replace("7744", &port)
    };
    let bin = std::path::Path::new(MALAI)
        .parent()
        .unwrap()
        .display()
        .to_string();
    let prelude = format!(
        "set -euo pipefail\nexport PATH={bin}:$PATH MALAI_BIND=127.0.0.1:0 MALAI_USE_KEYRING=false\n\
         trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n"
    );
    let bash = |script: &str| {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg("-c")
            .arg(script)
            .env_remove("MALAI_SSH_AGENT")
            .env_remove("MALAI_LOCKDOWN_MODE")
            .env_remove("RUST_LOG");
        run_cmd_with(&mut cmd, None, Duration::from_secs(120))
    };

    // 1. Init, join, add, allow.
    let first = adapt(&blocks[0].1);
    let out = bash(&format!("{prelude}{first}\n"));
    assert_success(&out, "README walk-through, first block");

    // 2. The hand edit, from the README's TOML block (foo's id52 is already in the file).
    let toml: toml::Table = toml::from_str(&adapt(&blocks[1].1)).expect("README's TOML block");
    let foo = &toml["server"]["foo"];
    let addrs = foo["addrs"].as_array().unwrap();
    let sshd_addr = foo["ssh"]
        .as_str()
        .unwrap()
        .replace(":22", &format!(":{}", sshd.port()));
    let file = m.join("mgr/ssh/clusters/acme/cluster-manager.toml");
    let text = fs::read_to_string(&file).unwrap();
    let text = set_table_keys(
        &text,
        "server.foo",
        &[
            (
                "addrs",
                format!("[{}]", toml_str(addrs[0].as_str().unwrap())),
            ),
            ("ssh", toml_str(&sshd_addr)),
        ],
    );
    fs::write(&file, text).unwrap();

    // 3. Import, serve, exec, ssh config, OpenSSH.
    let functions: String = first
        .lines()
        .filter(|l| l.starts_with("export ") || (l.contains("()") && l.contains("{")))
        .map(|l| format!("{l}\n"))
        .collect();
    let mut second = String::new();
    for line in adapt(&blocks[2].1).lines() {
        let code = line.split(" #").next().unwrap_or(line).trim_end();
        let code = code.replace("~/.ssh/config", &ssh_config.display().to_string());
        if code == "ssh foo.acme" {
            second.push_str(&format!(
                "ssh -F {} -i {} -o BatchMode=yes -o StrictHostKeyChecking=accept-new \
                 -o UserKnownHostsFile={} foo.acme echo through-openssh\n",
                ssh_config.display(),
                sshd.client_key().display(),
                known.display()
            ));
            continue;
        }
        second.push_str(&code);
        second.push('\n');
        if code.ends_with('&') {
            // The reader waits for "server ready"; the script waits for it to answer.
            second.push_str(
                "for i in $(seq 100); do laptop ssh foo.acme true 2>/dev/null && break; sleep 0.2; done\n",
            );
        }
    }
    let out = bash(&format!("{prelude}{functions}{second}"));
    assert_success(&out, "README walk-through, last block");
    let text = stdout_of(&out);
    assert!(text.contains("Linux"), "uname -a: {text}");
    assert!(text.ends_with("through-openssh\n"), "{text}");
}

/// The admin commands for what used to need a hand edit (issue 24 item 9): `cluster group`,
/// `cluster allow <server>.<command>`, `cluster args`, `cluster service`, `cluster allow
/// <server>.service.<service>` and `cluster remove` of a group, each taking effect on a
/// running cluster, with the deny twin of every grant.
#[test]
fn groups_services_and_args_from_the_command_line_take_effect() {
    let www = tempfile::tempdir().unwrap();
    fs::write(www.path().join("index.html"), "hello from api\n").unwrap();
    let http = HttpServer::start(www.path());
    let mut c = TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Embedded)
        .device("alice")
        .device("bob")
        .start_servers(false)
        .build();
    let port = http.port.to_string();
    for args in [
        vec!["group", "ops", "alice"],
        vec!["allow", "foo.echo", "ops"],
        vec!["args", "foo.echo", "hi *", "ok"],
        vec!["service", "foo", "api", &port],
        vec!["allow", "foo.service.api", "bob"],
    ] {
        let mut full = vec!["ssh", "cluster"];
        full.extend(args.iter().copied());
        c.manager().run_ok(full);
    }
    let text = read_lossy(&c.manager_file());
    assert!(
        text.contains("[group.ops]\nmembers = \"alice\"\n"),
        "{text}"
    );
    assert!(text.contains("args = [\"hi *\", \"ok\"]"), "{text}");
    assert!(
        text.contains(&format!("[server.foo.service.api]\nhttp = {port}\n")),
        "{text}"
    );
    c.distribute();
    c.start_server("foo");

    let exec = |who: &str, words: &[&str]| {
        let mut full = vec!["ssh", "foo.acme"];
        full.extend_from_slice(words);
        c.machine(who).run(full)
    };
    // alice is in ops, which may run `echo` with the pinned arguments only.
    let out = exec("alice", &["echo", "hi", "there"]);
    assert_success(&out, "alice: echo hi there");
    assert_eq!(stdout_of(&out), "hi there\n");
    assert_success(&exec("alice", &["echo", "ok"]), "alice: echo ok");
    let denied = exec("alice", &["echo", "bye"]);
    assert_exit_code(&denied, 255, "alice: echo bye (arguments not pinned)");
    assert!(
        stderr_of(&denied).contains("arguments not allowed for echo"),
        "{}",
        fmt_output(&denied)
    );
    // bob is not in ops.
    let denied = exec("bob", &["echo", "hi"]);
    assert_exit_code(&denied, 255, "bob: echo hi (not in the group)");

    // bob may use the service, alice (not a full-access peer of foo) may not.
    let get = |who: &str| {
        let mut cmd = c
            .machine(who)
            .cmd(["ssh", "curl", "-sS", "http://api.foo.acme/index.html"]);
        for k in ["http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"] {
            cmd.env_remove(k);
        }
        let out = run_cmd(&mut cmd);
        let _ = run_cmd_with(
            &mut c.machine(who).cmd(["ssh", "agent", "stop"]),
            None,
            Duration::from_secs(20),
        );
        out
    };
    let out = get("bob");
    assert_success(&out, "bob: curl api");
    assert_eq!(stdout_of(&out), "hello from api\n");
    let out = get("alice");
    assert!(
        !stdout_of(&out).contains("hello from api"),
        "alice must not reach api: {}",
        fmt_output(&out)
    );

    // Removing the group takes every grant made through it.
    c.manager().run_ok(["ssh", "cluster", "remove", "ops"]);
    let text = read_lossy(&c.manager_file());
    assert!(!text.contains("ops"), "{text}");
    c.manager()
        .run_ok(["ssh", "cluster", "args", "foo.echo", "--any"]);
    assert!(!read_lossy(&c.manager_file()).contains("args ="));
    c.distribute();
    poll_until(CONVERGE, || {
        (exec("alice", &["echo", "hi"]).status.code() == Some(255)).then_some(())
    })
    .expect("alice is denied once the group is gone");
}
