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

use crate::agent::Agent;
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
