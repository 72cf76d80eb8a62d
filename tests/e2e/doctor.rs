//! `malai ssh doctor [host]` (issue 20): each check both ways, against real processes — a
//! working cluster (every line ✔, exit 0), a peer the ACL refuses, a stopped sshd behind
//! the server, a stopped (SIGSTOP) and a missing key holder, and on the simulated internet
//! the cluster's own relay with and without its CA, and a relay that refuses connections.

use std::time::Instant;

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::harness::*;
use crate::netsim::{self, NatNet};

fn acme() -> TestCluster {
    TestCluster::builder("acme")
        .server_with("foo", SshTarget::Sshd)
        .device("alice")
        .device("bob")
        .allow("foo", &["alice"])
        .build()
}

/// Doctor's output and exit status, with the whole output in every failure message.
struct Doctor {
    out: std::process::Output,
    text: String,
}

fn doctor(m: &Machine, args: &[&str]) -> Doctor {
    let mut all = vec!["ssh", "doctor"];
    all.extend_from_slice(args);
    let out = m.run(all);
    let text = stdout_of(&out);
    Doctor { out, text }
}

impl Doctor {
    fn ok(&self, what: &str) -> &Self {
        assert_exit_code(&self.out, 0, what);
        assert!(
            !self.text.contains('✘'),
            "{what}: a check failed:\n{}",
            self.text
        );
        self
    }

    fn failed(&self, what: &str) -> &Self {
        assert_exit_code(&self.out, 1, what);
        self
    }

    /// A line starting with `prefix` (`✔ dial foo.acme`) that contains every one of `parts`.
    fn line(&self, prefix: &str, parts: &[&str]) -> &Self {
        let found = self
            .text
            .lines()
            .any(|l| l.starts_with(prefix) && parts.iter().all(|p| l.contains(p)));
        assert!(
            found,
            "no line {prefix:?} containing {parts:?}:\n{}",
            fmt_output(&self.out)
        );
        self
    }

    fn fix(&self, part: &str) -> &Self {
        assert!(
            self.text
                .lines()
                .any(|l| l.starts_with("    fix: ") && l.contains(part)),
            "no fix containing {part:?}:\n{}",
            self.text
        );
        self
    }
}

/// Shown in the test log (straight to stderr: libtest captures `eprintln!`), with how long
/// doctor took.
fn print_report(what: &str, started: Instant, d: &Doctor) {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "{what} ({:.1} s):\n{}",
        started.elapsed().as_secs_f64(),
        d.text
    );
}

/// Healthy: every check passes for a device dialing its server (direct path, ACL admits,
/// sshd answers) and for the server itself (it holds its key and answers); `--json` says
/// the same. Its deny twin: a member the ACL refuses fails the access check with the
/// server's reason, and the server's sshd is never reached.
#[test]
fn doctor_healthy_cluster_and_a_refused_peer() {
    require_sshd();
    let c = acme();
    let alice = doctor(c.machine("alice"), &["foo.acme"]);
    alice
        .ok("alice: doctor foo.acme")
        .line("✔ cluster acme", &["device alice"])
        .line("✔ key acme", &["mode 600"])
        .line("✔ relays acme", &["disabled"])
        .line(
            "✔ name foo.acme",
            &["server foo of cluster acme", c.id52("foo")],
        )
        .line("✔ dial foo.acme", &["connected", "direct 127.0.0.1:"])
        .line("✔ access foo.acme", &["admits us"])
        .line(
            "✔ sshd behind foo.acme",
            &["reaches its sshd at", "OpenSSH"],
        );
    assert!(alice.text.contains("checks passed"), "{}", alice.text);

    let json = c
        .machine("alice")
        .run(["ssh", "doctor", "--json", "foo.acme"]);
    assert_success(&json, "doctor --json");
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("doctor --json");
    assert_eq!(v["ok"], true, "{v}");
    let checks = v["checks"].as_array().expect("checks");
    assert!(checks.iter().all(|c| c["ok"] == true), "{v}");
    assert!(checks.iter().any(|c| c["check"] == "dial foo.acme"), "{v}");

    doctor(c.machine("foo"), &[])
        .ok("foo: doctor")
        .line("✔ cluster acme", &["server foo"])
        .line(
            "✔ key holder acme",
            &["malai ssh server (pid", "answers on"],
        );
    doctor(c.machine("mgr"), &[])
        .ok("mgr: doctor")
        .line("✔ cluster acme", &["manager"]);

    let before = c.sshd("foo").connection_count();
    doctor(c.machine("bob"), &["foo.acme"])
        .failed("bob: doctor foo.acme")
        .line("✔ dial foo.acme", &["answered"])
        .line("✘ access foo.acme", &["refuses us"])
        .fix("cluster allow");
    assert_eq!(
        c.sshd("foo").connection_count(),
        before,
        "a refused peer's doctor reached sshd"
    );
}

/// Through the agent: doctor names it as the key's holder and the dial goes through it (its
/// pooled connection's path); once it is gone, a `MALAI_SSH_AGENT` still naming its socket
/// fails with the fix.
#[test]
fn doctor_through_the_agent_and_a_stale_agent_socket() {
    require_sshd();
    let c = acme();
    let agent = crate::agent::Agent::start(c.machine("alice"), &[]);
    let out = run_cmd(&mut agent.cmd(["ssh", "doctor", "foo.acme"]));
    let d = Doctor {
        text: stdout_of(&out),
        out,
    };
    d.ok("alice: doctor foo.acme through the agent")
        .line("✔ agent ", &["answers (pid", "acme"])
        .line("✔ key holder acme", &["malai ssh agent (pid", "answers on"])
        .line("✔ dial foo.acme", &["via the agent (pid", "direct"]);
    let socket = agent.socket();
    drop(agent);
    let out = run_cmd(
        c.machine("alice")
            .cmd(["ssh", "doctor"])
            .env("MALAI_SSH_AGENT", &socket),
    );
    let d = Doctor {
        text: stdout_of(&out),
        out,
    };
    d.failed("doctor with a stale MALAI_SSH_AGENT")
        .line(
            &format!("✘ agent {}", socket.display()),
            &["does not answer"],
        )
        .fix("malai ssh agent -e");
}

/// sshd behind the server stopped: the server answers the tunnel with its embedded SSH
/// server, whose host key is not sshd's. Doctor says so (and the fix) instead of ssh's
/// "host key changed"; the twin (sshd running) is the healthy test.
#[test]
fn doctor_names_a_stopped_sshd_behind_the_server() {
    require_sshd();
    let c = acme();
    signal::kill(Pid::from_raw(c.sshd("foo").pid() as i32), Signal::SIGTERM).unwrap();
    let gone = poll_until(std::time::Duration::from_secs(10), || {
        std::net::TcpStream::connect(c.sshd("foo").addr())
            .is_err()
            .then_some(())
    });
    assert!(gone.is_some(), "sshd still listening");
    let t0 = Instant::now();
    let d = doctor(c.machine("alice"), &["foo.acme"]);
    print_report("doctor foo.acme with sshd stopped", t0, &d);
    d.failed("doctor with sshd stopped")
        .line("✔ access foo.acme", &["admits us"])
        .line(
            "✘ sshd behind foo.acme",
            &[
                &format!("nothing listens at {}", c.sshd("foo").addr()),
                "embedded",
            ],
        )
        .fix("start sshd on foo");
}

/// A key holder that stopped answering (SIGSTOP) is named with its pid and the fix; once
/// it runs again, the same check passes. A server machine whose server is not running
/// fails its own check.
#[test]
fn doctor_names_a_stopped_and_a_missing_key_holder() {
    require_sshd();
    let mut c = acme();
    let pid = c.server_process("foo").pid();
    signal::kill(Pid::from_raw(pid as i32), Signal::SIGSTOP).unwrap();
    let stopped = doctor(c.machine("foo"), &[]);
    signal::kill(Pid::from_raw(pid as i32), Signal::SIGCONT).unwrap();
    stopped
        .failed("doctor with the server stopped")
        .line(
            "✘ key holder acme",
            &[&format!("malai ssh server (pid {pid})"), "does not answer"],
        )
        .fix(&format!("kill -CONT {pid}"));
    doctor(c.machine("foo"), &[])
        .ok("doctor once the server runs again")
        .line("✔ key holder acme", &["answers"]);

    c.stop_server("foo");
    doctor(c.machine("foo"), &[])
        .failed("doctor with no server running")
        .line("✔ key holder acme", &["no server or agent holds it"])
        .line("✘ server foo.acme", &["no `malai ssh server` runs here"])
        .fix("systemctl start malai-ssh-server");
    doctor(c.machine("alice"), &["foo.acme"])
        .failed("alice: doctor foo.acme with foo's server down")
        .line("✘ dial foo.acme", &[]);
}

/// On the simulated internet with the tests' own relay: with its CA every relay check
/// passes (reachable, latency, QUIC address discovery with the public address alice's NAT
/// gives her) and the host dials through it; without the CA the relay is "untrusted
/// certificate" with the fix, and the failed dial names the relay instead of only timing
/// out; a relay port with nothing behind it is "connection refused".
#[test]
fn doctor_relay_with_and_without_its_ca() {
    if !netsim::available("doctor::doctor_relay_with_and_without_its_ca") {
        return;
    }
    let _lock = netsim::heavy_net_lock();
    let relay_dir = tempfile::tempdir().expect("tempdir");
    let mut net = NatNet::new(&["mgr", "foo", "alice"]);
    let relay = net.start_relay(relay_dir.path());
    let url = relay.url();
    let ca = relay.ca_path().display().to_string();
    let mut c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Embedded)
        .device("alice")
        .allow("foo", &["alice"])
        .netns("mgr", net.ns("mgr"))
        .netns("foo", net.ns("foo"))
        .netns("alice", net.ns("alice"))
        .env("MALAI_RELAY", &url)
        .env("MALAI_RELAY_CA", &ca)
        .env_remove("MALAI_BIND")
        .server_bind("foo", None)
        .build();
    let public = net.public_ip("alice").to_string();
    let t0 = Instant::now();
    let d = doctor(c.machine("alice"), &["foo.acme"]);
    print_report("doctor foo.acme through the relay", t0, &d);
    d.ok("alice: doctor foo.acme through the relay")
        .line(&format!("✔ relay {url}"), &["reachable", " ms"])
        .line("✔ address discovery acme", &["answers", &public])
        .line("✔ dial foo.acme", &["connected"])
        .line("✔ sshd behind foo.acme", &["embedded SSH server answers"]);

    c.machine_mut("alice").unset_env("MALAI_RELAY_CA");
    let t0 = Instant::now();
    let d = doctor(c.machine("alice"), &["foo.acme"]);
    print_report("doctor foo.acme without the relay CA", t0, &d);
    d.failed("doctor without the relay's CA")
        .line(&format!("✘ relay {url}"), &["untrusted certificate"])
        .fix("relay-ca")
        .line(
            "✘ dial foo.acme",
            &[&format!("relay {url}: untrusted certificate")],
        )
        .fix("fix the relay problems above first");

    c.machine_mut("alice")
        .set_env("MALAI_RELAY", &format!("https://{}:1", netsim::RELAY_IP));
    doctor(c.machine("alice"), &[])
        .failed("doctor with a refused relay port")
        .line("✘ relay https://", &["connection refused"])
        .line("✘ address discovery acme", &["no relay is reachable"]);
}
