//! Several relays with failover (issue 21): a cluster file naming two relays, hole punching
//! blocked so the relays are the only path, and the home relay killed — while nothing runs
//! and while a session runs. New connections must find the members through the other relay
//! within seconds (iroh alone re-checks its home relay only every 20–26 s; malai's watcher,
//! `transport::failover`, sets a dead home relay aside), members re-home (`malai ssh status`
//! says which relay is home), and a relay the file does not name is never used — not even
//! a running, trusted one.

use std::time::{Duration, Instant};

use crate::harness::*;
use crate::netsim::{self, NatNet, RELAY_IP, RELAY2_IP, RELAY3_IP};

/// What the issue asks of new connections after the home relay died. Asserted with room for
/// a loaded machine (2 shared cores); the measured time is printed.
const FAILOVER_GOAL: Duration = Duration::from_secs(10);
const FAILOVER_LIMIT: Duration = Duration::from_secs(40);

/// `machine`'s holders' relays for cluster `acme` (`malai ssh status --json`): (url, home,
/// connected, set aside).
fn relays_of(c: &TestCluster, machine: &str) -> Vec<(String, bool, bool, bool)> {
    let out = c.machine(machine).run(["ssh", "status", "--json"]);
    if !out.status.success() {
        return vec![];
    }
    let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(_) => return vec![],
    };
    let mut r = vec![];
    for h in v.as_array().into_iter().flatten() {
        for x in h["status"]["relays"].as_array().into_iter().flatten() {
            if x["cluster"] == "acme" {
                r.push((
                    x["url"].as_str().unwrap_or_default().to_string(),
                    x["home"].as_bool().unwrap_or(false),
                    x["connected"].as_bool().unwrap_or(false),
                    !x["set_aside_secs"].is_null(),
                ));
            }
        }
    }
    r
}

/// The relay `machine`'s server is connected to as its home, if one.
fn home_of(c: &TestCluster, machine: &str) -> Option<String> {
    relays_of(c, machine)
        .into_iter()
        .find(|(_, home, connected, _)| *home && *connected)
        .map(|(u, ..)| u)
}

/// `malai ssh foo.acme echo ok` as alice, given at most `limit`: Ok on success, else what
/// it said (killed at the limit; never panics).
fn try_exec(c: &TestCluster, limit: Duration) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = c.machine("alice").cmd(["ssh", "foo.acme", "echo", "ok"]);
    cmd.process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn malai ssh");
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let out = child.wait_with_output().expect("output");
            return if status.success() && stdout_of(&out) == "ok\n" {
                Ok(())
            } else {
                Err(fmt_output(&out))
            };
        }
        if t0.elapsed() >= limit {
            let pg = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(pg, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            return Err(format!("no answer within {limit:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long after `since` alice's new connections to foo work again (one attempt after
/// another, each up to 10 s), or panics after [`FAILOVER_LIMIT`].
fn reconnect_time(c: &TestCluster, net: &NatNet, since: Instant, what: &str) -> Duration {
    let mut last = String::new();
    while since.elapsed() < FAILOVER_LIMIT {
        match try_exec(c, Duration::from_secs(10)) {
            Ok(()) => return since.elapsed(),
            Err(e) => last = e,
        }
    }
    panic!(
        "{what}: no new connection through the other relay within {FAILOVER_LIMIT:?}; last \
         attempt: {last}\nfoo's relays: {:?}\n{}\nrelay 1:\n{}\nrelay 2:\n{}",
        relays_of(c, "foo"),
        c.diagnostics(),
        tail(&net.relay_at(RELAY_IP).log(), 20),
        tail(&net.relay_at(RELAY2_IP).log(), 20)
    );
}

fn ip_of(url: &str) -> std::net::Ipv4Addr {
    [RELAY_IP, RELAY2_IP]
        .into_iter()
        .find(|ip| url.contains(&ip.to_string()))
        .unwrap_or_else(|| panic!("{url} is neither relay"))
}

/// Relay-only (UDP between the NATs dropped), two relays in the cluster file (the second
/// started only once every member homed on the first) and a third, trusted, running but not
/// named. Kill foo's home relay while nothing runs: new connections
/// from alice work again through the other relay, and foo re-homes; bring it back (the
/// watcher puts it back in use once it answers); then kill the new home relay while a
/// session runs: new connections work again, and the session's fate is printed. The third
/// relay never sees a byte.
#[test]
fn failover_home_relay_killed_idle_and_during_a_session() {
    if !netsim::available("failover::failover_home_relay_killed_idle_and_during_a_session") {
        return;
    }
    let _lock = netsim::heavy_net_lock();
    let d1 = tempfile::tempdir().expect("tempdir");
    let d2 = tempfile::tempdir().expect("tempdir");
    let d3 = tempfile::tempdir().expect("tempdir");
    let mut net = NatNet::new(&["mgr", "foo", "alice"]);
    let ca1 = net.start_relay(d1.path()).ca_pem();
    let ca2 = net.start_relay_at(d2.path(), RELAY2_IP).ca_pem();
    let ca3 = net.start_relay_at(d3.path(), RELAY3_IP).ca_pem();
    let relays = format!(
        "[{}, {}]",
        toml_str(&net.relay_at(RELAY_IP).url()),
        toml_str(&net.relay_at(RELAY2_IP).url())
    );
    // All three CAs trusted: only the list keeps the third relay out.
    let ca = format!("\"\"\"\n{ca1}{ca2}{ca3}\"\"\"");
    // The second relay is down while the cluster starts, so every member homes on the
    // first and none holds a connection to the second (iroh keeps one to any relay it
    // talks through for 60 s): when the first dies, nobody is reachable through the second
    // until they move there.
    net.kill_relay(RELAY2_IP);
    net.block_udp_between_nats();
    let c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Sshd)
        .device("alice")
        .netns("mgr", net.ns("mgr"))
        .netns("foo", net.ns("foo"))
        .netns("alice", net.ns("alice"))
        .env_remove("MALAI_RELAY")
        .env_remove("MALAI_BIND")
        .server_bind("foo", None)
        .manager_key("relays", &relays)
        .manager_key("relay-ca", &ca)
        .allow("foo", &["alice"])
        .build();

    try_exec(&c, Duration::from_secs(60)).unwrap_or_else(|e| panic!("first exec: {e}"));
    let home = poll_until(Duration::from_secs(30), || home_of(&c, "foo"))
        .unwrap_or_else(|| panic!("foo has no home relay: {:?}", relays_of(&c, "foo")));
    assert_eq!(
        ip_of(&home),
        RELAY_IP,
        "foo homed on the relay that was down"
    );
    net.restart_relay(RELAY2_IP);
    let status = stdout_of(&c.machine("foo").run(["ssh", "status"]));
    eprintln!("FAILOVER foo's status before:\n{status}");
    assert!(
        status.contains(&format!("relay for acme: {home} (home, connected)")),
        "malai ssh status does not name the home relay {home}:\n{status}"
    );

    // 1. Nothing running: kill foo's home relay.
    let first = ip_of(&home);
    net.kill_relay(first);
    let t0 = Instant::now();
    let idle = reconnect_time(&c, &net, t0, "idle");
    let rehomed = poll_until(FAILOVER_LIMIT, || {
        home_of(&c, "foo").filter(|h| ip_of(h) != first)
    });
    eprintln!(
        "FAILOVER idle: home relay {home} killed; alice's new connection worked after \
         {idle:.1?} (goal {FAILOVER_GOAL:?}); foo's status showed it re-homed to {rehomed:?} by {:.1?}",
        t0.elapsed()
    );
    let rehomed =
        rehomed.unwrap_or_else(|| panic!("foo did not re-home: {:?}", relays_of(&c, "foo")));
    let status = stdout_of(&c.machine("foo").run(["ssh", "status"]));
    assert!(
        status.contains("set aside"),
        "the dead relay is not shown as set aside:\n{status}"
    );

    // The dead relay comes back: the watcher puts it back in use.
    net.restart_relay(first);
    let back = poll_until(Duration::from_secs(30), || {
        relays_of(&c, "foo")
            .iter()
            .any(|(u, _, _, aside)| ip_of(u) == first && !aside)
            .then_some(())
    });
    assert!(
        back.is_some(),
        "the restarted relay was not put back: {:?}",
        relays_of(&c, "foo")
    );

    // 2. A session runs: kill the relay foo is homed on now.
    let mut session = c.machine("alice").cmd([
        "ssh",
        "foo.acme",
        "for i in $(seq 1 30); do echo $i; sleep 1; done",
    ]);
    use std::os::unix::process::CommandExt;
    session
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let session = session.spawn().expect("spawn session");
    std::thread::sleep(Duration::from_secs(3));
    let second = ip_of(&rehomed);
    net.kill_relay(second);
    let t0 = Instant::now();
    let during = reconnect_time(&c, &net, t0, "during a session");
    let session_out = {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut child = session;
        loop {
            if child.try_wait().expect("try_wait").is_some() || Instant::now() >= deadline {
                let pg = nix::unistd::Pid::from_raw(-(child.id() as i32));
                let _ = nix::sys::signal::kill(pg, nix::sys::signal::Signal::SIGKILL);
                break child.wait_with_output().expect("session output");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let lines = stdout_of(&session_out).lines().count();
    eprintln!(
        "FAILOVER during a session: relay {rehomed} killed; new connection worked after \
         {during:.1?}; the running session printed {lines}/30 lines, exit {:?}: {}",
        session_out.status.code(),
        stderr_of(&session_out).trim()
    );
    assert!(
        poll_until(FAILOVER_LIMIT, || home_of(&c, "foo")
            .filter(|h| ip_of(h) == first))
        .is_some(),
        "foo did not re-home to the restarted relay: {:?}",
        relays_of(&c, "foo")
    );

    // Deny twin: the relay the file does not name never saw a byte.
    assert_eq!(
        net.relay_bytes(RELAY3_IP),
        0,
        "the relay not in the cluster file was used"
    );
}
