//! One endpoint per id52 per machine (issue 11): a machine that is a server *and* a client
//! in one cluster binds that cluster's key once. The server holds it; the machine's own
//! CLI commands (exec, the ProxyCommand, `cluster status/push`) and its agent go through
//! the server's control socket. An agent that held the key first hands it over when the
//! server starts, and takes it back when the server stops.
//!
//! On loopback two endpoints with one key would still work (direct paths); what breaks
//! through a relay (it delivers to the newest) is shown on the namespace network
//! (`nat.rs`). Here the rule itself is checked: who holds the lock, and that every path
//! works while it is held elsewhere.

use std::fs;
use std::time::Duration;

use crate::agent::Agent;
use crate::harness::*;

/// The holder record in `endpoint.lock` (`{"pid":…,"role":…,"socket":…}`), if held.
fn holder_of(m: &Machine, cluster: &str) -> Option<serde_json::Value> {
    let text = fs::read_to_string(
        m.home()
            .join("ssh/clusters")
            .join(cluster)
            .join("endpoint.lock"),
    )
    .ok()?;
    serde_json::from_str(text.trim()).ok()
}

fn role_pid(m: &Machine, cluster: &str) -> (String, u64) {
    let h = holder_of(m, cluster).expect("a holder record");
    (
        h["role"].as_str().unwrap_or_default().to_string(),
        h["pid"].as_u64().unwrap_or_default(),
    )
}

fn two_servers() -> TestCluster {
    TestCluster::builder("acme")
        .manager("mgr")
        .server("foo")
        .server("bar")
        .device("alice")
        .allow("foo", &["alice"])
        .allow("bar", &["foo", "alice"])
        .server("baz")
        .allow("baz", &["alice"])
        .build()
}

#[test]
fn a_server_uses_its_own_key_through_its_server_and_stays_reachable() {
    let mut c = two_servers();
    let foo_pid = c.server_process("foo").pid() as u64;
    let foo = c.machine("foo");
    assert_eq!(
        role_pid(foo, "acme"),
        ("server".to_string(), foo_pid),
        "foo's server holds foo's key"
    );

    // foo as a client of bar, through its own server (exec, ssh via the ProxyCommand).
    let out = foo.run(["ssh", &c.host("bar"), "echo", "from-foo"]);
    assert_success(&out, "exec foo -> bar while foo's server runs");
    assert_eq!(stdout_of(&out), "from-foo\n");
    let out = c.ssh("foo", &c.host("bar"), "echo via-sshd");
    assert_success(&out, "ssh foo -> bar through the ProxyCommand");
    assert_eq!(stdout_of(&out), "via-sshd\n");
    // Meanwhile foo is still reachable by others.
    let out = c
        .machine("alice")
        .run(["ssh", &c.host("foo"), "echo", "to-foo"]);
    assert_success(&out, "alice -> foo");
    assert_eq!(stdout_of(&out), "to-foo\n");
    // The key was never bound by the CLI: the server still holds it, nobody else did.
    assert_eq!(role_pid(foo, "acme").1, foo_pid);
    let cli_log = foo.logs();
    assert!(
        !cli_log.contains("agent holds the key of cluster"),
        "some other process bound foo's key:\n{}",
        tail(&cli_log, 40)
    );

    // `malai ssh status`: the server's pooled connection to bar, direct, with its RTT.
    let out = foo.run(["ssh", "status"]);
    assert_success(&out, "malai ssh status");
    let st = stdout_of(&out);
    let row = st
        .lines()
        .find(|l| l.starts_with("server") && l.contains(" bar ") && l.contains(" out "))
        .unwrap_or_else(|| panic!("no row for the server's connection to bar:\n{st}"));
    assert!(
        row.contains("direct") && row.contains("127.0.0.1:") && row.contains(" ms"),
        "{st}"
    );
    let out = foo.run(["ssh", "status", "--json"]);
    assert_success(&out, "malai ssh status --json");
    let v: serde_json::Value = serde_json::from_str(&stdout_of(&out)).expect("status JSON");
    assert_eq!(v[0]["role"], "server", "{v}");

    // An agent on foo does not bind acme: it uses the server's endpoint.
    let agent = Agent::start(foo, &[]);
    let st = agent.status();
    assert!(
        !st["clusters"].contains("acme"),
        "the agent holds acme although the server does:\n{}",
        st["raw"]
    );
    // And both status commands say why (issue 22 item 3).
    assert!(
        st["raw"].contains("not serving acme: its key is held by malai ssh server (pid "),
        "agent status does not say why acme is not served:\n{}",
        st["raw"]
    );
    let out = run_cmd(&mut agent.cmd(["ssh", "status"]));
    assert_success(&out, "malai ssh status with the agent");
    assert!(
        stdout_of(&out).contains("does not serve acme: its key is held by malai ssh server"),
        "{}",
        stdout_of(&out)
    );
    let out = run_cmd(&mut agent.cmd(["ssh", &c.host("bar"), "echo", "agent-via-server"]));
    assert_success(
        &out,
        "exec through foo's agent while foo's server holds the key",
    );
    assert_eq!(stdout_of(&out), "agent-via-server\n");
    // The agent passes such a request on to the server whole (descriptors and all), so
    // the server runs it on its pool (resumable when bar offers it).
    assert!(
        foo.logs().contains("open passed on to the key's holder"),
        "the agent did not pass the exec on to foo's server\n{}",
        tail(&foo.logs(), 30)
    );
    // ssh through the ProxyCommand with the agent set: the tunnel goes the same way.
    let out = run_cmd(
        c.ssh_cmd("foo")
            .env("MALAI_SSH_AGENT", agent.socket())
            .arg(c.host("bar"))
            .arg("echo tunnel-via-agent-and-server"),
    );
    assert_success(&out, "ssh foo -> bar through the agent and foo's server");
    assert_eq!(stdout_of(&out), "tunnel-via-agent-and-server\n");
    // Deny twin: a request baz refuses (foo is not in its `allow-from`) fails through the
    // agent with the same line and exit code as straight through foo's server.
    let direct = foo.run(["ssh", &c.host("baz"), "true"]);
    let passed_on = run_cmd(&mut agent.cmd(["ssh", &c.host("baz"), "true"]));
    assert_exit_code(&direct, 255, "foo -> baz, not allowed");
    assert!(
        stderr_of(&direct).contains("not allowed") || stderr_of(&direct).contains("denied"),
        "foo -> baz must be a refusal: {}",
        stderr_of(&direct)
    );
    assert_exit_code(&passed_on, 255, "foo -> baz through the agent, not allowed");
    assert_eq!(
        stderr_of(&passed_on),
        stderr_of(&direct),
        "a refusal passed on through the agent must read as the server's own"
    );

    // The server stops: the agent takes the key (its next rescan) and keeps working.
    c.stop_server("foo");
    let foo = c.machine("foo");
    let agent_pid = agent.pid() as u64;
    let took = poll_until(Duration::from_secs(10), || {
        (holder_of(foo, "acme").and_then(|h| h["pid"].as_u64()) == Some(agent_pid)).then_some(())
    });
    assert!(
        took.is_some(),
        "the agent did not take the key: {:?}",
        holder_of(foo, "acme")
    );
    let out = run_cmd(&mut agent.cmd(["ssh", &c.host("bar"), "echo", "agent-own"]));
    assert_success(&out, "exec through the agent holding the key");

    // The server starts again: the agent hands the key over, and everything still works.
    c.start_server("foo");
    let foo_pid = c.server_process("foo").pid() as u64;
    let foo = c.machine("foo");
    assert_eq!(role_pid(foo, "acme"), ("server".to_string(), foo_pid));
    let out = run_cmd(&mut agent.cmd(["ssh", &c.host("bar"), "echo", "handed-over"]));
    assert_success(&out, "exec through the agent after the handover");
    assert_eq!(stdout_of(&out), "handed-over\n");
    let out = c
        .machine("alice")
        .run(["ssh", &c.host("foo"), "echo", "still-reachable"]);
    assert_success(&out, "alice -> foo after the handover");
}

#[test]
fn cluster_status_and_push_on_the_manager_go_through_its_server() {
    let c = two_servers();
    let mgr = c.manager();
    let bind: std::net::SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let server = mgr.spawn_server(bind);
    let out = mgr.run(["ssh", "cluster", "status"]);
    assert_success(&out, "cluster status while the manager's server runs");
    let text = stdout_of(&out);
    assert!(text.contains("foo") && text.contains("bar"), "{text}");
    let out = mgr.run(["ssh", "cluster", "push"]);
    assert_success(&out, "cluster push while the manager's server runs");
    assert_eq!(
        role_pid(mgr, "acme"),
        ("server".to_string(), server.pid() as u64),
        "the manager's server holds its key"
    );
}

/// With neither a server nor an agent, a command binds the key for its own length only:
/// afterwards nobody holds it.
#[test]
fn a_command_alone_binds_the_key_only_for_its_length() {
    let c = two_servers();
    let alice = c.machine("alice");
    let out = alice.run(["ssh", &c.host("foo"), "true"]);
    assert_success(&out, "alice -> foo");
    assert!(
        holder_of(alice, "acme").is_none(),
        "{:?}",
        holder_of(alice, "acme")
    );
    // And an agent started now can claim it at once.
    let agent = Agent::start(alice, &[]);
    assert!(agent.status()["clusters"].contains("acme"));
}

/// An agent started while commands bind the key themselves (two long native execs, each its
/// own endpoint) serves the cluster at once: it holds the key, new commands and its HTTP
/// proxy go through it, and the older commands finish on their own endpoints (issue 22).
#[test]
fn an_agent_started_while_commands_bind_the_key_serves_at_once() {
    use std::io::BufRead;
    use std::process::Stdio;
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Embedded)
        .device("alice")
        .allow("foo", &["alice"])
        .build();
    let site = c.scratch("site");
    fs::write(site.join("hello.txt"), "hello through the agent\n").unwrap();
    let web = crate::http::HttpServer::start(&site);
    c.edit_manager_file(|t| {
        t + &format!(
            "\n[server.foo.service.web]\nhttp = {}\nallow-from = \"alice\"\n",
            web.port
        )
    });
    c.distribute();
    let alice = c.machine("alice");

    // Two commands, neither server nor agent running: each binds the key itself. Each
    // prints a line once its session is up (it is on stdout, so after the accept).
    let mut older = vec![];
    for i in 1..=2 {
        let remote = format!("echo up-{i}; sleep 4; echo older-{i}");
        let mut child = alice
            .cmd(["ssh", &c.host("foo"), &remote])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn an older command");
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).expect("first line");
        assert_eq!(
            first,
            format!("up-{i}\n"),
            "older command {i} did not start"
        );
        older.push((child, out));
    }
    assert!(
        holder_of(alice, "acme").is_none(),
        "no holder while only commands run"
    );

    // The agent takes the key at once.
    let agent = Agent::start(alice, &[]);
    let st = agent.status();
    assert!(
        st["clusters"].contains("acme"),
        "the agent does not serve acme while older commands run:\n{}",
        st["raw"]
    );
    assert_eq!(role_pid(alice, "acme").1, agent.pid() as u64);
    // New commands go through it: native exec (the agent handover) and the HTTP proxy.
    let out = run_cmd(&mut agent.cmd(["ssh", &c.host("foo"), "echo", "via-agent"]));
    assert_success(&out, "exec through the agent that took the key");
    assert_eq!(stdout_of(&out), "via-agent\n");
    let proxy = agent.exports["http_proxy"].clone();
    let got = crate::http::curl(
        Some(&proxy),
        &["-f", &format!("http://web.{}/hello.txt", c.host("foo"))],
    );
    assert_success(&got, "curl through the agent's HTTP proxy");
    assert_eq!(stdout_of(&got), "hello through the agent\n");
    // And a command without the agent's environment finds it through the lock file.
    let out = alice.run(["ssh", &c.host("foo"), "echo", "via-lock-file"]);
    assert_success(&out, "exec routed to the agent by the lock file");

    // The older commands end as they would have, on their own endpoints.
    for (i, (mut child, mut out)) in older.into_iter().enumerate() {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "older command {} failed: {status:?}",
            i + 1
        );
        assert_eq!(rest, format!("older-{}\n", i + 1));
    }
}

/// A request in flight through the agent when the server takes the key over (issue 17 item
/// 7, the handover race): it finishes on the agent's connection, while new requests go
/// through the server at once. Before, the handover closed the agent's connections and the
/// exec failed with "connection closed before the command's exit status arrived".
#[test]
fn a_request_in_flight_through_the_agent_survives_the_handover_to_the_server() {
    use std::io::BufRead;
    use std::process::Stdio;
    let mut c = two_servers();
    c.stop_server("foo");
    let foo = c.machine("foo");
    let agent = Agent::start(foo, &[]);
    let agent_pid = agent.pid() as u64;
    let took = poll_until(Duration::from_secs(10), || {
        (holder_of(foo, "acme").and_then(|h| h["pid"].as_u64()) == Some(agent_pid)).then_some(())
    });
    assert!(took.is_some(), "the agent did not take foo's key");

    // foo -> bar through the agent, running while the server starts.
    let mut inflight = agent
        .cmd(["ssh", &c.host("bar"), "echo up; sleep 3; echo finished"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the in-flight exec");
    let mut inflight_out = std::io::BufReader::new(inflight.stdout.take().unwrap());
    let mut first = String::new();
    inflight_out.read_line(&mut first).expect("first line");
    assert_eq!(first, "up\n", "the in-flight exec did not start");

    c.start_server("foo");
    let server_pid = c.server_process("foo").pid() as u64;
    assert_eq!(
        role_pid(c.machine("foo"), "acme"),
        ("server".to_string(), server_pid)
    );
    // New requests go through the server at once, also from the agent's environment.
    let out = run_cmd(&mut agent.cmd(["ssh", &c.host("bar"), "echo", "after"]));
    assert_success(&out, "exec through the agent right after the handover");
    assert_eq!(stdout_of(&out), "after\n");

    // The one in flight ends as it would have.
    let mut tail_out = String::new();
    std::io::Read::read_to_string(&mut inflight_out, &mut tail_out).unwrap();
    let status = inflight.wait().unwrap();
    let mut err = String::new();
    if let Some(mut e) = inflight.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(
        status.success(),
        "the in-flight exec failed: {status:?}: {err}"
    );
    assert_eq!(tail_out, "finished\n", "{err}");
}
