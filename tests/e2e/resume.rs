//! Sessions that outlive their connection (issue 18): the ProxyCommand tunnel, native
//! exec and native `-L` channels are resumable streams, so ssh and scp through `malai ssh proxy`, and `malai ssh foo
//! <command>`, ride out a stopped client or a network cut longer than the QUIC idle limit; a restarted server is said so in one line;
//! a peer revoked while detached is refused; at the caps tunnels work as before.
//!
//! The idle limit is shortened by `MALAI_IDLE_TIMEOUT` to keep these fast; the mechanism is
//! the same at the 60 s default.

use std::io::BufRead;
use std::process::{Child, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::harness::*;
use crate::netsim::{self, NatNet};

/// The QUIC idle limit these tests give every machine (seconds).
const IDLE: &str = "3";
/// Longer than [`IDLE`] with room: the connection is surely dead on both ends.
const PAST_IDLE: Duration = Duration::from_secs(9);
/// A restarted server must be noticed within this long after it is back (issue 11/18).
const RESTART_NOTICE: Duration = Duration::from_secs(2);
/// Room for a loaded 2-core machine on top of a promised deadline.
const ROOM: Duration = Duration::from_secs(4);

fn cluster(env: &[(&str, &str)]) -> TestCluster {
    cluster_with(SshTarget::Sshd, env)
}

/// [`cluster`] with foo's ssh target `target`.
fn cluster_with(target: SshTarget, env: &[(&str, &str)]) -> TestCluster {
    let mut b = TestCluster::builder("acme")
        .server_with("foo", target)
        .device("alice")
        .device("bob")
        .allow("foo", &["alice", "bob"])
        .env("MALAI_IDLE_TIMEOUT", IDLE);
    for (k, v) in env {
        b = b.env(k, v);
    }
    b.build()
}

/// How a test's session reaches foo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// OpenSSH's `ssh` through `malai ssh proxy` (the ProxyCommand).
    Proxy,
    /// Native exec: `malai ssh -T foo.acme <script>`.
    Native,
    /// `ssh` through the ProxyCommand with alice's agent holding the key: the proxy hands
    /// its stdio to the agent, which runs the resumable session on its pool. The client
    /// process stopped is the agent.
    Agent,
    /// Native exec with alice's agent holding the key (the agent runs the session).
    AgentNative,
}

impl Via {
    fn through_agent(self) -> bool {
        matches!(self, Via::Agent | Via::AgentNative)
    }
    /// Whether the command on foo is malai's own child (native), not sshd's.
    fn native(self) -> bool {
        matches!(self, Via::Native | Via::AgentNative)
    }
}

/// `ssh foo.acme <script>` through the ProxyCommand (or natively), stdout lines on a
/// channel.
struct Ssh {
    child: Child,
    lines: Receiver<String>,
    seen: String,
}

impl Ssh {
    fn start(c: &TestCluster, device: &str, script: &str) -> Ssh {
        Ssh::spawn(c, device, Via::Proxy, script, Stdio::null())
    }

    fn start_via(c: &TestCluster, device: &str, via: Via, script: &str) -> Ssh {
        Ssh::spawn(c, device, via, script, Stdio::null())
    }

    /// `sh` on foo reading lines from our [`Ssh::send`].
    fn interactive(c: &TestCluster, device: &str) -> Ssh {
        Ssh::spawn(c, device, Via::Proxy, "sh", Stdio::piped())
    }

    fn send(&mut self, line: &str) {
        use std::io::Write;
        let w = self.child.stdin.as_mut().expect("stdin open");
        w.write_all(format!("{line}\n").as_bytes())
            .expect("write to ssh");
        w.flush().expect("flush ssh");
    }

    fn spawn(c: &TestCluster, device: &str, via: Via, script: &str, stdin: Stdio) -> Ssh {
        Ssh::spawn_env(c, device, via, script, stdin, &[])
    }

    fn spawn_env(
        c: &TestCluster,
        device: &str,
        via: Via,
        script: &str,
        stdin: Stdio,
        env: &[(&str, &str)],
    ) -> Ssh {
        use std::os::unix::process::CommandExt;
        let mut cmd = match via {
            Via::Proxy | Via::Agent => c.ssh_cmd(device),
            Via::Native | Via::AgentNative => c.machine(device).cmd(["ssh"]),
        };
        cmd.envs(env.iter().copied());
        let mut child = cmd
            .arg("-T")
            .arg("foo.acme")
            .arg(script)
            .stdin(stdin)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("spawn ssh");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ssh {
            child,
            lines: rx,
            seen: String::new(),
        }
    }

    fn expect_line(&mut self, want: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push_str(&l);
                    self.seen.push('\n');
                    if l == want {
                        return true;
                    }
                }
                Err(_) => return false,
            }
        }
    }

    /// Waits for the exit; returns the status and stderr.
    fn wait(mut self, timeout: Duration) -> (Option<std::process::ExitStatus>, String) {
        self.child.stdin.take();
        let status = poll_until(timeout, || self.child.try_wait().ok().flatten());
        if status.is_none() {
            self.kill();
        }
        let mut err = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        (status, err)
    }

    fn kill(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

impl Drop for Ssh {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
    }
}

/// The pid of `device`'s running malai client of a [`Via`] session: `malai ssh proxy`, or
/// `malai ssh -T` (its `MALAI_HOME` says whose).
fn client_pid(c: &TestCluster, device: &str, via: Via) -> Option<i32> {
    let home = format!("MALAI_HOME={}", c.machine(device).home().display());
    let sub: &[u8] = match via {
        Via::Proxy => b"proxy",
        Via::Native => b"-T",
        Via::Agent | Via::AgentNative => b"agent",
    };
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_proxy = args.windows(2).any(|w| w[0] == b"ssh" && w[1] == sub)
            && !args.first().is_some_and(|a| a.ends_with(b"env"));
        if !is_proxy {
            continue;
        }
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|v| v == home.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig).expect("signal the proxy");
}

fn foo_log_has(c: &TestCluster, what: &str) -> bool {
    c.machine("foo").logs().contains(what)
}

/// Whether a running process of `machine` logs `what` soon: its log file is written by a
/// background thread (`tracing_appender::non_blocking`), so a line logged before the bytes
/// the test just read can still be on its way to the file on a loaded machine.
fn log_shows(c: &TestCluster, machine: &str, what: &str) -> bool {
    poll_until(Duration::from_secs(10), || {
        c.machine(machine).logs().contains(what).then_some(())
    })
    .is_some()
}

fn audit_of_foo(c: &TestCluster) -> String {
    std::fs::read_to_string(c.machine("foo").home().join("logs/ssh/audit.log")).unwrap_or_default()
}

/// Both ends say the session resumed: alice's log (her client's or her agent's) and foo's
/// audit log.
fn assert_resumed(c: &TestCluster) {
    assert!(
        c.machine("alice").logs().contains("resumed"),
        "alice's log does not say it resumed"
    );
    let audit = audit_of_foo(c);
    assert!(
        audit.contains("\"resumed\""),
        "no resumed line in foo's audit log:\n{audit}"
    );
}

/// The deny side of a resume after revocation: foo audited `resume-denied` and ended the
/// revoked peer's detached `what` (session, forward) within 10 s.
fn assert_denied_while_detached(c: &TestCluster, what: &str) {
    // The client may see its stream end (foo closing the revoked session's target) before
    // its resume reaches foo: the audit line follows within moments, not at once (r22,
    // loaded: the -R twin read its EOF before alice's resume had arrived).
    let denied = poll_until(Duration::from_secs(10), || {
        audit_of_foo(c).contains("\"resume-denied\"").then_some(())
    });
    assert!(
        denied.is_some(),
        "no resume-denied line in foo's audit log:\n{}",
        audit_of_foo(c)
    );
    assert!(
        log_shows(c, "foo", "revoked while detached"),
        "foo kept the revoked {what}\n{}",
        tail(&c.machine("foo").logs(), 20)
    );
}

/// The client's stderr says in exactly one `malai:` line that its `what` could not be
/// resumed.
fn assert_one_line_not_resumed(err: &str, what: &str) {
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("malai: ")).collect();
    assert!(
        ours.len() == 1 && ours[0].contains("could not be resumed"),
        "stderr does not say in one line that the {what} could not be resumed:\n{err}"
    );
}

/// Stops alice's proxy (SIGSTOP) until foo has detached the session (its connection timed
/// out), then waits `PAST_IDLE` in all; returns the stopped pid.
fn stop_proxy_past_the_idle_limit(c: &TestCluster, ssh: &mut Ssh) -> i32 {
    stop_client_past_the_idle_limit(c, ssh, Via::Proxy)
}

/// [`stop_proxy_past_the_idle_limit`] for the malai client of a [`Via`] session.
fn stop_client_past_the_idle_limit(c: &TestCluster, ssh: &mut Ssh, via: Via) -> i32 {
    let pid = poll_until(Duration::from_secs(10), || client_pid(c, "alice", via))
        .unwrap_or_else(|| panic!("no {via:?} client process of alice's found"));
    let t0 = Instant::now();
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let detached = poll_until(Duration::from_secs(30), || {
        foo_log_has(c, "session detached").then_some(())
    });
    if detached.is_none() {
        signal(pid, nix::sys::signal::Signal::SIGCONT);
        ssh.kill();
        panic!(
            "foo never detached the session of a stopped client\n{}",
            tail(&c.machine("foo").logs(), 40)
        );
    }
    if let Some(left) = PAST_IDLE.checked_sub(t0.elapsed()) {
        std::thread::sleep(left);
    }
    pid
}

/// ssh through the ProxyCommand, its proxy stopped (SIGSTOP) for longer than the idle
/// limit, so both ends' connection timed out: after SIGCONT the session goes on (same sshd
/// session, its command prints after the outage) and ssh exits 0. The client's log says it
/// resumed, foo's audit log has the `resumed` line.
#[test]
fn resume_ssh_survives_a_stopped_proxy_past_the_idle_limit() {
    let c = cluster(&[]);
    let mut ssh = Ssh::start(&c, "alice", "echo up; sleep 14; echo survived");
    assert!(
        ssh.expect_line("up", Duration::from_secs(30)),
        "ssh did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    let pid = stop_proxy_past_the_idle_limit(&c, &mut ssh);
    // `malai ssh status` on foo lists the detached session, its age and buffered bytes.
    let status = c.machine("foo").run(["ssh", "status"]);
    let shown = stdout_of(&status);
    let listed = shown
        .lines()
        .any(|l| l.contains("session acme/alice: detached") && l.contains("bytes buffered"));
    if !listed {
        signal(pid, nix::sys::signal::Signal::SIGCONT);
        panic!(
            "status does not list the detached session:\n{}",
            fmt_output(&status)
        );
    }
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    let resumed_at = Instant::now();
    let ok = ssh.expect_line("survived", Duration::from_secs(40));
    let seen = ssh.seen.clone();
    let (status, err) = ssh.wait(Duration::from_secs(20));
    assert!(
        ok,
        "the session did not survive; saw {seen:?}\nstderr: {err}\n{}\n{}",
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "ssh did not exit 0 after resuming: {status:?}\n{err}"
    );
    eprintln!(
        "resume: session resumed; survived {:?} after SIGCONT",
        resumed_at.elapsed()
    );
    assert_resumed(&c);
    // A clean end removes the session (nothing stays detached on foo).
    assert!(
        log_shows(&c, "foo", "resumable session ended"),
        "foo did not end the session\n{}",
        tail(&c.machine("foo").logs(), 20)
    );
}

/// With alice's agent holding the key, the ProxyCommand hands its stdio to the agent,
/// which runs the resumable session on its pooled connection (issue 18's agent path). The
/// agent stopped past the idle limit (its connection timed out on both ends): after
/// SIGCONT it redials through its pool and the session goes on; ssh exits 0, the agent's
/// log says it resumed, foo audits `resumed`.
#[test]
fn resume_ssh_through_the_agent_survives_a_stopped_agent_past_the_idle_limit() {
    let c = cluster(&[]);
    let _agent = Agent::start(c.machine("alice"), &[]);
    let mut ssh = Ssh::start_via(&c, "alice", Via::Agent, "echo up; sleep 14; echo survived");
    assert!(
        ssh.expect_line("up", Duration::from_secs(30)),
        "ssh did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    assert!(
        log_shows(&c, "alice", "resumable tunnel through the pool"),
        "the agent did not run the tunnel as a resumable session\n{}",
        tail(&c.machine("alice").logs(), 30)
    );
    let pid = stop_client_past_the_idle_limit(&c, &mut ssh, Via::Agent);
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    let ok = ssh.expect_line("survived", Duration::from_secs(40));
    let seen = ssh.seen.clone();
    let (status, err) = ssh.wait(Duration::from_secs(20));
    assert!(
        ok,
        "the session did not survive; saw {seen:?}\nstderr: {err}\n{}\n{}",
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "ssh did not exit 0 after resuming: {status:?}\n{err}"
    );
    assert_resumed(&c);
    assert!(
        log_shows(&c, "foo", "resumable session ended"),
        "foo did not end the session\n{}",
        tail(&c.machine("foo").logs(), 20)
    );
}

/// The deny twin of the agent path: revoked while detached, the agent's resume is refused
/// and ssh's ProxyCommand exits 255 with one line.
#[test]
fn resume_through_the_agent_refused_after_revocation_while_detached() {
    refused_after_revocation_while_detached(Via::Agent);
}

/// Foo restarted under a session the agent runs: one line, within 2 s of foo being back.
#[test]
fn resume_through_the_agent_after_a_server_restart_says_so_in_one_line() {
    restart_says_so_in_one_line(Via::Agent);
}

/// A tunnel to the embedded SSH server (foo has no sshd) is resumable too: ssh through the
/// ProxyCommand, its proxy stopped past the idle limit, goes on after SIGCONT and exits 0.
#[test]
fn resume_ssh_to_the_embedded_server_survives_a_stopped_proxy() {
    let c = cluster_with(SshTarget::Embedded, &[]);
    let mut ssh = Ssh::start(&c, "alice", "echo up; sleep 14; echo survived");
    assert!(
        ssh.expect_line("up", Duration::from_secs(30)),
        "ssh did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    let pid = stop_proxy_past_the_idle_limit(&c, &mut ssh);
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    let ok = ssh.expect_line("survived", Duration::from_secs(40));
    let seen = ssh.seen.clone();
    let (status, err) = ssh.wait(Duration::from_secs(20));
    assert!(
        ok,
        "the embedded session did not survive; saw {seen:?}\nstderr: {err}\n{}\n{}",
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "ssh did not exit 0 after resuming: {status:?}\n{err}"
    );
    assert!(c.machine("alice").logs().contains("resumed"));
    assert!(
        log_shows(&c, "foo", "resumable session ended"),
        "foo did not end the session\n{}",
        tail(&c.machine("foo").logs(), 20)
    );
}

/// Deny twin: alice is dropped from foo's `allow-from` while her session is detached; when
/// her proxy comes back the resume is refused (the ACL is asked again), ssh exits 255 with
/// one clear line, foo audits `resume-denied` and ends the detached session.
#[test]
fn resume_refused_after_revocation_while_detached() {
    refused_after_revocation_while_detached(Via::Proxy);
}

/// Alice's client of a [`Via`] session, stopped past the idle limit, is dropped from
/// foo's `allow-from` meanwhile: when it comes back the resume is refused, it exits 255
/// with one line, foo audits `resume-denied` and ends the session (natively, its command).
fn refused_after_revocation_while_detached(via: Via) {
    let c = cluster(&[]);
    let _agent = via
        .through_agent()
        .then(|| Agent::start(c.machine("alice"), &[]));
    let marker = format!("sleep 4{}{}", std::process::id(), via as u8);
    let mut ssh = Ssh::start_via(&c, "alice", via, &format!("echo up; {marker}"));
    assert!(
        ssh.expect_line("up", Duration::from_secs(30)),
        "{via:?} did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    let pid = stop_client_past_the_idle_limit(&c, &mut ssh, via);
    assert!(
        !via.native() || running(&marker),
        "the command ended while detached"
    );
    c.edit_manager_file(|t| set_table_keys(&t, "server.foo", &[("allow-from", toml_str("bob"))]));
    c.import_on("foo");
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    let (status, err) = ssh.wait(Duration::from_secs(40));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(255),
        "a revoked resume must fail with 255: {status:?}\n{err}"
    );
    assert_one_line_not_resumed(&err, "session");
    assert_denied_while_detached(&c, "session");
    // Through sshd the command is sshd's: without a pty, sshd leaves a command that never
    // writes running when its connection closes (OpenSSH's own behaviour). Natively, malai
    // hangs it up.
    if !via.native() {
        return;
    }
    assert!(
        poll_until(Duration::from_secs(10), || (!running(&marker))
            .then_some(()))
        .is_some(),
        "the revoked peer's command still runs on foo\n{}",
        tail(&c.machine("foo").logs(), 20)
    );
}

/// A server killed and started again has lost its sessions: the ProxyCommand says so in
/// one line and exits 255 within 2 s of the server being back.
#[test]
fn resume_after_a_server_restart_says_so_in_one_line() {
    restart_says_so_in_one_line(Via::Proxy);
}

/// Foo's server killed and started again under a [`Via`] session: the client says in one
/// line that the server restarted and exits 255 within 2 s of the server being back.
fn restart_says_so_in_one_line(via: Via) {
    let mut c = cluster(&[]);
    let _agent = via
        .through_agent()
        .then(|| Agent::start(c.machine("alice"), &[]));
    let mut ssh = Ssh::start_via(&c, "alice", via, "echo up; sleep 60");
    assert!(
        ssh.expect_line("up", Duration::from_secs(30)),
        "{via:?} did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    restart_foo_and_expect_one_line(&mut c, ssh, &format!("{via:?}"));
}

/// SIGKILL foo's server and start it again under `ssh`'s session: the client exits 255
/// with exactly the "server restarted" line, within [`RESTART_NOTICE`] (and room) of foo
/// being back.
fn restart_foo_and_expect_one_line(c: &mut TestCluster, ssh: Ssh, what: &str) {
    let p = c.server_process("foo");
    let pid = nix::unistd::Pid::from_raw(p.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL foo");
    assert!(
        poll_until(Duration::from_secs(10), || (!p.is_running()).then_some(())).is_some(),
        "foo's server survived SIGKILL"
    );
    c.start_server("foo");
    let back = Instant::now();
    let (status, err) = ssh.wait(Duration::from_secs(60));
    let took = back.elapsed();
    eprintln!("resume: {what} gave up {took:?} after foo's server was back");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(255),
        "expected 255: {status:?}\n{err}"
    );
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("malai: ")).collect();
    assert_eq!(
        ours,
        ["malai: foo.acme: the server restarted; the session could not be resumed"],
        "stderr:\n{err}"
    );
    assert!(
        took <= RESTART_NOTICE + ROOM,
        "{what} noticed the restart only {took:?} after foo was back"
    );
}

/// At the caps (here: no resumable session allowed at all) a tunnel is served as before,
/// without resume: ssh works, foo logs why.
#[test]
fn resume_at_the_caps_tunnels_work_as_before() {
    let c = cluster(&[("MALAI_RESUME_MAX_PER_PEER", "0")]);
    let out = c.ssh("alice", "foo.acme", "echo ok");
    assert_success(&out, "ssh at the resume caps");
    assert_eq!(stdout_of(&out).trim(), "ok");
    assert!(
        log_shows(&c, "foo", "caps reached"),
        "foo does not say the caps were reached\n{}",
        tail(&c.machine("foo").logs(), 20)
    );
    // Allowed twin: under the caps the same tunnel is resumable.
    let c = cluster(&[]);
    let out = c.ssh("alice", "foo.acme", "echo ok");
    assert_success(&out, "ssh under the caps");
    assert!(c.machine("alice").logs().contains("resumable tunnel"));
}

// ---------------------------------------------------------------------------------------------
// Native exec (`malai ssh foo.acme <command>`) on the same resumable stream
// ---------------------------------------------------------------------------------------------

/// Whether a process whose command line contains `marker` runs on this machine (foo's
/// commands are its server's children here).
fn running(marker: &str) -> bool {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten().any(|e| {
                // Arguments are NUL-separated: `sleep 47` is `sleep\047`.
                let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
                String::from_utf8_lossy(&cmdline)
                    .replace('\0', " ")
                    .contains(marker)
            })
        })
        .unwrap_or(false)
}

/// Native exec, its client stopped (SIGSTOP) past the idle limit while the command prints
/// 200,000 lines: after SIGCONT every line arrives once and in order, stderr stays apart,
/// the command's exit code (7) is ours; alice's log says it resumed, foo audits `resumed`
/// and ends the session cleanly.
#[test]
fn resume_native_exec_survives_a_stopped_client_past_the_idle_limit() {
    native_exec_survives_a_stopped_client(Via::Native);
}

/// The same with alice's agent holding the key: the agent runs the resumable exec for the
/// command and is the process stopped.
#[test]
fn resume_native_exec_through_the_agent_survives_a_stopped_agent() {
    native_exec_survives_a_stopped_client(Via::AgentNative);
}

/// A machine that is a server and a client: foo's own commands go through foo's server
/// (it holds the key), which runs the resumable session on its pool. Foo's server stopped
/// past the idle limit (bar detaches the session): after SIGCONT the exec from foo to bar
/// goes on and its output arrives whole.
#[test]
fn resume_native_exec_through_the_local_server_survives_a_stopped_server() {
    exec_through_the_local_server_survives_a_stopped_server(false);
}

/// The same asked of foo's agent, started while foo's server holds the key: the agent
/// passes the request and the command's descriptors on to the server, which runs the
/// resumable session (before, the agent relayed a plain stream that ended with its
/// connection).
#[test]
fn resume_native_exec_through_an_agent_beside_the_server_survives_a_stopped_server() {
    exec_through_the_local_server_survives_a_stopped_server(true);
}

fn exec_through_the_local_server_survives_a_stopped_server(agent: bool) {
    let mut c = TestCluster::builder("acme")
        .server("foo")
        .server("bar")
        .allow("bar", &["foo"])
        .env("MALAI_IDLE_TIMEOUT", IDLE)
        .build();
    let agent = agent.then(|| Agent::start(c.machine("foo"), &[]));
    let args = [
        "ssh",
        "-T",
        "bar.acme",
        "echo up; sleep 6; seq 1 50000; echo survived",
    ];
    let mut cmd = match &agent {
        Some(a) => a.cmd(args),
        None => c.machine("foo").cmd(args),
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn malai ssh");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    out.read_line(&mut first).expect("first line");
    assert_eq!(first, "up\n", "exec did not start\n{}", c.diagnostics());
    assert!(
        log_shows(&c, "foo", "resumable exec through the pool"),
        "foo's server did not run the exec as a resumable session\n{}",
        tail(&c.machine("foo").logs(), 30)
    );
    assert!(
        agent.is_none() || log_shows(&c, "foo", "open passed on to the key's holder"),
        "foo's agent did not pass the request on to foo's server\n{}",
        tail(&c.machine("foo").logs(), 30)
    );
    let pid = c.server_process("foo").pid() as i32;
    let t0 = Instant::now();
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let detached = poll_until(Duration::from_secs(30), || {
        c.machine("bar")
            .logs()
            .contains("session detached")
            .then_some(())
    });
    if let Some(left) = PAST_IDLE.checked_sub(t0.elapsed()) {
        std::thread::sleep(left);
    }
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    assert!(
        detached.is_some(),
        "bar never detached the session\n{}",
        tail(&c.machine("bar").logs(), 30)
    );
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).expect("read the rest");
    let status = poll_until(Duration::from_secs(30), || child.try_wait().ok().flatten());
    let want: String = (1..=50_000).map(|n| format!("{n}\n")).collect();
    assert!(
        rest == format!("{want}survived\n"),
        "stdout lost or doubled bytes across the resume ({} bytes, want {})\n{}",
        rest.len(),
        want.len() + 9,
        tail(&c.machine("foo").logs(), 30)
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "malai ssh did not exit 0: {status:?}"
    );
    assert!(
        c.machine("foo").logs().contains("resumed"),
        "foo's server does not say it resumed"
    );
}

/// Deny twin of the agent's resumable exec: revoked while detached, refused in one line,
/// the command hung up on foo.
#[test]
fn resume_native_exec_through_the_agent_refused_after_revocation_while_detached() {
    refused_after_revocation_while_detached(Via::AgentNative);
}

/// Native exec whose client (`via`) is stopped past the idle limit: stdout, stderr and
/// the exit code arrive whole after SIGCONT.
fn native_exec_survives_a_stopped_client(via: Via) {
    let c = cluster(&[]);
    let _agent = via
        .through_agent()
        .then(|| Agent::start(c.machine("alice"), &[]));
    let script =
        "echo up; sleep 4; seq 1 200000; echo to-stderr >&2; sleep 6; echo survived; exit 7";
    let mut ssh = Ssh::start_via(&c, "alice", via, script);
    assert!(
        ssh.expect_line("up", Duration::from_secs(30)),
        "malai ssh did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    let pid = stop_client_past_the_idle_limit(&c, &mut ssh, via);
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    let ok = ssh.expect_line("survived", Duration::from_secs(60));
    let seen = std::mem::take(&mut ssh.seen);
    let (status, err) = ssh.wait(Duration::from_secs(20));
    assert!(
        ok,
        "the session did not survive; stderr: {err}\n{}\n{}",
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    let want: String = (1..=200_000).map(|n| format!("{n}\n")).collect();
    assert!(
        seen == format!("up\n{want}survived\n"),
        "stdout lost or doubled bytes across the resume ({} bytes, want {})",
        seen.len(),
        want.len() + "up\nsurvived\n".len()
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(7),
        "the remote exit code is not ours: {status:?}\n{err}"
    );
    assert!(
        err.lines().any(|l| l == "to-stderr"),
        "stderr lost its line:\n{err}"
    );
    assert_resumed(&c);
    assert!(
        log_shows(&c, "foo", "resumable session ended"),
        "foo did not end the session\n{}",
        tail(&c.machine("foo").logs(), 20)
    );
}

/// Deny twin of the native resume: alice is dropped from `allow-from` while her exec is
/// detached; her client exits 255 with one line, foo audits `resume-denied`, and the
/// command is hung up on foo.
#[test]
fn resume_native_exec_refused_after_revocation_while_detached() {
    refused_after_revocation_while_detached(Via::Native);
}

/// A live native exec whose peer is dropped from `allow-from` is cut at once (not kept
/// detached): the client's resume is told why, it exits 255 with one line saying access
/// was revoked, and the command is hung up on foo.
#[test]
fn resume_native_exec_revoked_while_attached_says_access_revoked() {
    let c = cluster(&[]);
    let marker = format!("sleep 4{}5", std::process::id());
    let mut ssh = Ssh::start_via(&c, "alice", Via::Native, &format!("echo up; {marker}"));
    assert!(
        ssh.expect_line("up", Duration::from_secs(30)),
        "malai ssh did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    c.edit_manager_file(|t| set_table_keys(&t, "server.foo", &[("allow-from", toml_str("bob"))]));
    c.import_on("foo");
    let (status, err) = ssh.wait(Duration::from_secs(30));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(255),
        "a revoked session must fail with 255: {status:?}\n{err}"
    );
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("malai: ")).collect();
    assert!(
        ours.len() == 1 && ours[0].contains("access revoked"),
        "stderr does not say in one line that access was revoked:\n{err}"
    );
    assert!(
        poll_until(Duration::from_secs(10), || (!running(&marker))
            .then_some(()))
        .is_some(),
        "the revoked peer's command still runs on foo\n{}",
        tail(&c.machine("foo").logs(), 20)
    );
}

/// A native client SIGKILLed mid-command says nothing: foo keeps its session detached and
/// the command running, as for an outage. The next resumable session alice starts finds
/// the record the dead process left and asks foo to end that session: the command is
/// hung up, foo audits `closed`, and alice's status no longer lists it.
#[test]
fn resume_a_killed_clients_session_is_ended_by_the_next_one() {
    let c = cluster(&[]);
    let marker = format!("sleep 4{}7", std::process::id());
    let mut ssh = Ssh::start_via(&c, "alice", Via::Native, &format!("echo up; {marker}"));
    assert!(
        ssh.expect_line("up", Duration::from_secs(30)),
        "malai ssh did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    let pid = poll_until(Duration::from_secs(10), || {
        client_pid(&c, "alice", Via::Native)
    })
    .expect("alice's client process");
    signal(pid, nix::sys::signal::Signal::SIGKILL);
    assert!(
        poll_until(Duration::from_secs(30), || foo_log_has(
            &c,
            "session detached"
        )
        .then_some(()))
        .is_some(),
        "foo never detached the killed client's session\n{}",
        tail(&c.machine("foo").logs(), 20)
    );
    assert!(running(&marker), "the command ended with its silent client");
    let out = c.machine("alice").run(["ssh", "foo.acme", "echo", "next"]);
    assert_success(&out, "the next command");
    assert!(
        poll_until(Duration::from_secs(15), || (!running(&marker))
            .then_some(()))
        .is_some(),
        "the killed client's command still runs on foo\n{}\n{}",
        tail(&c.machine("alice").logs(), 20),
        tail(&c.machine("foo").logs(), 20)
    );
    assert!(
        audit_of_foo(&c).contains("\"closed\""),
        "no closed line in foo's audit log"
    );
    let status = stdout_of(&c.machine("alice").run(["ssh", "status"]));
    assert!(!status.contains("session acme/foo"), "{status}");
}

/// A restarted server has lost the command too: native exec says so in one line and exits
/// 255 within 2 s of the server being back.
#[test]
fn resume_native_exec_after_a_server_restart_says_so_in_one_line() {
    restart_says_so_in_one_line(Via::Native);
}

// ---------------------------------------------------------------------------------------------
// On the namespace network: a real cut (foo's router forwards nothing)
// ---------------------------------------------------------------------------------------------

/// How long foo is cut off: well past the idle limit.
const CUT: Duration = Duration::from_secs(12);

/// The NAT'd network with its relay, foo (real sshd) and alice behind their own NATs, the
/// idle limit shortened to [`IDLE`].
fn nat_cluster(relay_dir: &tempfile::TempDir) -> (NatNet, TestCluster) {
    nat_cluster_idle(relay_dir, Some(IDLE))
}

/// [`nat_cluster`] with the idle limit `idle` (seconds), or the default (60 s) for `None`.
fn nat_cluster_idle(relay_dir: &tempfile::TempDir, idle: Option<&str>) -> (NatNet, TestCluster) {
    let mut net = NatNet::new(&["mgr", "foo", "alice"]);
    let relay = net.start_relay(relay_dir.path());
    let relays = format!("[{}]", toml_str(&relay.url()));
    let ca = format!("\"\"\"\n{}\"\"\"", relay.ca_pem());
    let mut b = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Sshd)
        .device("alice")
        .netns("mgr", net.ns("mgr"))
        .netns("foo", net.ns("foo"))
        .netns("alice", net.ns("alice"))
        .env_remove("MALAI_RELAY")
        .env_remove("MALAI_BIND");
    b = match idle {
        Some(secs) => b.env("MALAI_IDLE_TIMEOUT", secs),
        None => b.env_remove("MALAI_IDLE_TIMEOUT"),
    };
    let c = b
        .server_bind("foo", None)
        .manager_key("relays", &relays)
        .manager_key("relay-ca", &ca)
        .allow("foo", &["alice"])
        .build();
    (net, c)
}

/// `ssh foo 'sleep N; echo survived'` through the ProxyCommand while foo's network is cut
/// for longer than the idle limit: the session survives.
#[test]
fn nat_resume_ssh_sleep_through_a_cut_past_the_idle_limit() {
    if !netsim::available("resume::nat_resume_ssh_sleep_through_a_cut_past_the_idle_limit") {
        return;
    }
    let _lock = netsim::heavy_net_lock();
    let relay_dir = tempfile::tempdir().expect("tempdir");
    let (net, c) = nat_cluster(&relay_dir);
    let script = format!("echo up; sleep {}; echo survived", CUT.as_secs() + 8);
    let mut ssh = Ssh::start(&c, "alice", &script);
    assert!(
        ssh.expect_line("up", Duration::from_secs(30)),
        "ssh did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    net.cut("foo");
    std::thread::sleep(CUT);
    net.restore("foo");
    let restored = Instant::now();
    let ok = ssh.expect_line("survived", Duration::from_secs(60));
    let seen = ssh.seen.clone();
    let (status, err) = ssh.wait(Duration::from_secs(20));
    assert!(
        ok,
        "the session did not survive a {CUT:?} cut; saw {seen:?}\nstderr: {err}\n{}\n{}",
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "ssh did not exit 0: {status:?}\n{err}"
    );
    eprintln!(
        "resume (netsim): survived {:?} after the network was back",
        restored.elapsed()
    );
    assert!(c.machine("alice").logs().contains("resumed"));
}

/// 64 MiB up through the ProxyCommand by `tool` (`scp` or `rsync`) with foo cut off
/// mid-transfer for longer than the idle limit: it arrives byte-identical (sha256).
fn transfer_through_a_cut(tool: &str) {
    let _lock = netsim::heavy_net_lock();
    let relay_dir = tempfile::tempdir().expect("tempdir");
    let (net, c) = nat_cluster(&relay_dir);
    const BIG: usize = 64 << 20;
    let local = c.scratch("local");
    let remote = c.scratch("remote");
    let src = local.join("cut.bin");
    write_random_file(&src, BIG, 0x7265_7375_6d65 ^ tool.len() as u64);
    let want = sha256_file(&src);
    let dst = remote.join("cut.bin");
    // rsync writes a temporary file first: count every file in the folder.
    let arrived = || -> u64 {
        std::fs::read_dir(&remote)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    std::thread::scope(|s| {
        let run = s.spawn(|| {
            let t0 = Instant::now();
            let args = [
                src.display().to_string(),
                format!("foo.acme:{}", dst.display()),
            ];
            let out = match tool {
                "rsync" => c.rsync("alice", &args),
                _ => c.scp("alice", &args),
            };
            (out, t0.elapsed())
        });
        let started = poll_until(Duration::from_secs(60), || (arrived() > 0).then_some(()));
        assert!(
            started.is_some(),
            "{tool} never started\n{}",
            c.diagnostics()
        );
        net.cut("foo");
        let at_cut = arrived();
        std::thread::sleep(CUT);
        net.restore("foo");
        assert!(
            (at_cut as usize) < BIG,
            "the {tool} finished before the cut: nothing was tested"
        );
        let (out, took) = run.join().expect("transfer thread");
        if !out.status.success() {
            panic!(
                "{tool} through a {CUT:?} cut\n{}\n{}\n{}",
                fmt_output(&out),
                tail(&c.machine("alice").logs(), 30),
                tail(&c.machine("foo").logs(), 30)
            );
        }
        eprintln!(
            "resume (netsim): {tool} 64 MiB with a {CUT:?} cut at {:.1} MiB took {took:?}",
            at_cut as f64 / 1048576.0
        );
    });
    assert_eq!(
        sha256_file(&dst),
        want,
        "{tool} through the cut corrupted the file"
    );
    assert!(c.machine("alice").logs().contains("resumed"));
}

#[test]
fn nat_resume_scp_64mib_through_a_cut_past_the_idle_limit() {
    if !netsim::available("resume::nat_resume_scp_64mib_through_a_cut_past_the_idle_limit") {
        return;
    }
    transfer_through_a_cut("scp");
}

#[test]
fn nat_resume_rsync_64mib_through_a_cut_past_the_idle_limit() {
    if !netsim::available("resume::nat_resume_rsync_64mib_through_a_cut_past_the_idle_limit") {
        return;
    }
    transfer_through_a_cut("rsync");
}

/// Bytes under `dir`, all files at any depth (a clone in progress writes a temporary pack).
fn bytes_under(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_under(&e.path()),
            _ => e.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// `git clone` of a repository holding a 64 MiB file, through the ProxyCommand, with foo
/// cut off mid-download for longer than the idle limit: the clone completes and the file
/// is byte-identical (the download direction, where scp and rsync above upload).
#[test]
fn nat_resume_git_clone_64mib_through_a_cut_past_the_idle_limit() {
    if !netsim::available("resume::nat_resume_git_clone_64mib_through_a_cut_past_the_idle_limit") {
        return;
    }
    let _lock = netsim::heavy_net_lock();
    let relay_dir = tempfile::tempdir().expect("tempdir");
    let (net, c) = nat_cluster(&relay_dir);
    const BIG: usize = 64 << 20;
    let repo = c.scratch("remote").join("repo");
    std::fs::create_dir_all(&repo).expect("repo folder");
    let git = |cwd: &std::path::Path, args: &[&str]| {
        let out = run_cmd(git_command(cwd).args(args));
        assert_success(&out, &format!("git {args:?}"));
    };
    git(&repo, &["init", "-q", "-b", "main"]);
    write_random_file(&repo.join("big.bin"), BIG, 0x6769_7421);
    let want = sha256_file(&repo.join("big.bin"));
    git(&repo, &["add", "big.bin"]);
    git(&repo, &["commit", "-q", "-m", "big"]);
    let work = c.scratch("work");
    let url = format!("foo.acme:{}", repo.display());
    std::thread::scope(|s| {
        let run = s.spawn(|| c.git("alice", &work, &["clone", "-q", &url, "clone"]));
        let started = poll_until(Duration::from_secs(60), || {
            (bytes_under(&work) > 1 << 20).then_some(())
        });
        assert!(
            started.is_some(),
            "the clone never started\n{}",
            c.diagnostics()
        );
        net.cut("foo");
        let at_cut = bytes_under(&work);
        std::thread::sleep(CUT);
        net.restore("foo");
        let out = run.join().expect("clone thread");
        assert!(
            out.status.success(),
            "git clone through a {CUT:?} cut\n{}\n{}\n{}",
            fmt_output(&out),
            tail(&c.machine("alice").logs(), 30),
            tail(&c.machine("foo").logs(), 30)
        );
        assert!(
            (at_cut as usize) < BIG,
            "the clone finished before the cut: nothing was tested"
        );
        eprintln!(
            "resume (netsim): git clone 64 MiB with a {CUT:?} cut at {:.1} MiB",
            at_cut as f64 / 1048576.0
        );
    });
    assert_eq!(
        sha256_file(&work.join("clone/big.bin")),
        want,
        "the clone through the cut corrupted the file"
    );
    assert!(c.machine("alice").logs().contains("resumed"));
}

/// 64 MiB up by native exec (`malai ssh foo.acme 'cat > f' < f`) with foo cut off
/// mid-transfer for longer than the idle limit: it arrives byte-identical and the command's
/// exit status comes back.
#[test]
fn nat_resume_native_exec_64mib_upload_through_a_cut() {
    if !netsim::available("resume::nat_resume_native_exec_64mib_upload_through_a_cut") {
        return;
    }
    let _lock = netsim::heavy_net_lock();
    let relay_dir = tempfile::tempdir().expect("tempdir");
    let (net, c) = nat_cluster(&relay_dir);
    const BIG: usize = 64 << 20;
    let src = c.scratch("local").join("cut.bin");
    write_random_file(&src, BIG, 0x6e61_7469_7665);
    let want = sha256_file(&src);
    let dst = c.scratch("remote").join("cut.bin");
    let script = format!("cat > {} && echo stored", dst.display());
    let mut child = c
        .machine("alice")
        .cmd(["ssh", "foo.acme", &script])
        .stdin(std::fs::File::open(&src).expect("open the source"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn malai ssh");
    let arrived = || std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0);
    let started = poll_until(Duration::from_secs(60), || (arrived() > 0).then_some(()));
    if started.is_none() {
        let _ = child.kill();
        panic!("the upload never started\n{}", c.diagnostics());
    }
    net.cut("foo");
    let cut_at = Instant::now();
    let at_cut = arrived();
    // `malai ssh status` on alice lists the session as reconnecting once its connection
    // timed out (the cut lasts until it does, and at least CUT).
    let status_line = poll_until(Duration::from_secs(30), || {
        let out = c.machine("alice").run(["ssh", "status"]);
        stdout_of(&out)
            .lines()
            .find(|l| l.contains("session acme/foo (malai ssh): reconnecting for"))
            .map(str::to_string)
    });
    if let Some(left) = CUT.checked_sub(cut_at.elapsed()) {
        std::thread::sleep(left);
    }
    net.restore("foo");
    let status = poll_until(Duration::from_secs(180), || child.try_wait().ok().flatten());
    if status.is_none() {
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("malai ssh output");
    assert!(
        status.is_some_and(|s| s.success()) && stdout_of(&out) == "stored\n",
        "native upload through a {CUT:?} cut: {status:?}\n{}\n{}\n{}",
        fmt_output(&out),
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    assert!(
        (at_cut as usize) < BIG,
        "the upload finished before the cut: nothing was tested"
    );
    assert_eq!(
        sha256_file(&dst),
        want,
        "the upload through the cut corrupted the file"
    );
    let line = status_line.expect("alice's status never listed the session as reconnecting");
    assert!(line.contains("bytes buffered"), "{line}");
    // Over, the session leaves no record behind.
    let after = stdout_of(&c.machine("alice").run(["ssh", "status"]));
    assert!(!after.contains("session acme/foo"), "{after}");
    assert!(c.machine("alice").logs().contains("resumed"));
    eprintln!(
        "resume (netsim): native exec 64 MiB up with a {CUT:?} cut at {:.1} MiB",
        at_cut as f64 / 1048576.0
    );
}

/// An interactive ssh (ProxyCommand) through a cut past the idle limit: a line typed the
/// moment the network is back comes back through the resumed session. Prints how long
/// after the restore the bytes flowed again (the benchmark figure; not asserted).
#[test]
fn nat_resume_interactive_ssh_bytes_flow_again_after_a_cut() {
    if !netsim::available("resume::nat_resume_interactive_ssh_bytes_flow_again_after_a_cut") {
        return;
    }
    interactive_through_a_cut(Some(IDLE), CUT, false);
}

/// The same with no direct path at all (UDP between the NATs blocked): the session, and
/// every redial, goes through the cluster's relay.
#[test]
fn nat_resume_interactive_ssh_relay_only_through_a_cut() {
    if !netsim::available("resume::nat_resume_interactive_ssh_relay_only_through_a_cut") {
        return;
    }
    interactive_through_a_cut(Some(IDLE), CUT, true);
}

/// Relay only, a 12 s cut inside the default 60 s idle limit: the connection itself lives
/// through it (nothing to resume), and foo's relay connection, whose TCP retransmissions
/// back off through the cut, is replaced once the network is back
/// (`transport::relay_rejoin`) instead of waiting for the kernel's next retry.
#[test]
fn nat_relay_only_interactive_ssh_through_a_cut_within_the_idle_limit() {
    if !netsim::available(
        "resume::nat_relay_only_interactive_ssh_through_a_cut_within_the_idle_limit",
    ) {
        return;
    }
    interactive_through_a_cut(None, CUT, true);
}

/// The same with alice's network cut (the client's): her live connection's relay path
/// moves to her fresh relay connection.
#[test]
fn nat_relay_only_interactive_ssh_through_a_client_cut_within_the_idle_limit() {
    if !netsim::available(
        "resume::nat_relay_only_interactive_ssh_through_a_client_cut_within_the_idle_limit",
    ) {
        return;
    }
    interactive_cut_of(None, CUT, true, "alice");
}

/// Relay only, and the cut is alice's (the client's network: a laptop in a tunnel) past
/// the idle limit: alice's redials fail until her relay connection is replaced.
#[test]
fn nat_resume_interactive_ssh_relay_only_through_a_cut_of_the_client() {
    if !netsim::available(
        "resume::nat_resume_interactive_ssh_relay_only_through_a_cut_of_the_client",
    ) {
        return;
    }
    interactive_cut_of(Some(IDLE), CUT, true, "alice");
}

/// Roaming: alice's network goes away past the idle limit and she comes back from another
/// public address (her NAT router's address changed, its mappings gone): the session
/// resumes from the new address (it is bound to her id52 and the session's secret, never
/// to an address).
#[test]
fn nat_resume_interactive_ssh_after_the_client_roams_during_a_cut() {
    if !netsim::available("resume::nat_resume_interactive_ssh_after_the_client_roams_during_a_cut")
    {
        return;
    }
    roaming_interactive(Some(IDLE), Some(CUT));
}

/// Roaming with no outage to speak of, default settings: alice's public address changes
/// under a live session (a Wi-Fi to LTE hand-over); the session goes on.
#[test]
fn nat_interactive_ssh_survives_the_client_roaming() {
    if !netsim::available("resume::nat_interactive_ssh_survives_the_client_roaming") {
        return;
    }
    roaming_interactive(None, None);
}

fn roaming_interactive(idle: Option<&str>, cut: Option<Duration>) {
    let _lock = netsim::heavy_net_lock();
    let relay_dir = tempfile::tempdir().expect("tempdir");
    let (net, c) = nat_cluster_idle(&relay_dir, idle);
    let mut ssh = Ssh::interactive(&c, "alice");
    ssh.send("echo before");
    assert!(
        ssh.expect_line("before", Duration::from_secs(30)),
        "ssh did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    if let Some(cut) = cut {
        net.cut("alice");
        std::thread::sleep(cut / 2);
        net.roam("alice");
        std::thread::sleep(cut / 2);
        net.restore("alice");
    } else {
        net.roam("alice");
    }
    let back = Instant::now();
    ssh.send("echo after");
    let ok = ssh.expect_line("after", Duration::from_secs(60));
    let flowing = back.elapsed();
    assert!(
        ok,
        "the interactive session did not survive alice roaming; saw {:?}\n{}\n{}",
        ssh.seen,
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    eprintln!(
        "roaming (netsim, idle {}, cut {cut:?}): bytes flowed again {flowing:?} after alice came back from her new address",
        idle.unwrap_or("default")
    );
    if cut.is_some() {
        assert!(
            c.machine("alice").logs().contains("resumed"),
            "the cut did not outlast the connection: nothing was resumed"
        );
    }
    let (status, err) = ssh.wait(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "ssh did not exit 0: {status:?}\n{err}"
    );
}

/// The same with the default settings (60 s idle limit) and a 70 s cut: what a user gets.
#[test]
fn nat_resume_interactive_ssh_with_defaults_through_a_70s_cut() {
    if !netsim::available("resume::nat_resume_interactive_ssh_with_defaults_through_a_70s_cut") {
        return;
    }
    interactive_through_a_cut(None, Duration::from_secs(70), false);
}

fn interactive_through_a_cut(idle: Option<&str>, cut: Duration, relay_only: bool) {
    interactive_cut_of(idle, cut, relay_only, "foo");
}

/// Interactive ssh through the ProxyCommand while `who`'s network is cut for `cut`.
fn interactive_cut_of(idle: Option<&str>, cut: Duration, relay_only: bool, who: &str) {
    let _lock = netsim::heavy_net_lock();
    let relay_dir = tempfile::tempdir().expect("tempdir");
    let (net, c) = nat_cluster_idle(&relay_dir, idle);
    if relay_only {
        net.block_udp_between_nats();
    }
    let mut ssh = Ssh::interactive(&c, "alice");
    ssh.send("echo before");
    assert!(
        ssh.expect_line("before", Duration::from_secs(30)),
        "ssh did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    net.cut(who);
    std::thread::sleep(cut);
    net.restore(who);
    let restored = Instant::now();
    ssh.send("echo after");
    let ok = ssh.expect_line("after", Duration::from_secs(60));
    let flowing = restored.elapsed();
    assert!(
        ok,
        "the interactive session did not come back; saw {:?}\n{}\n{}",
        ssh.seen,
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    eprintln!(
        "resume (netsim, idle {}, {who}'s network cut {cut:?}, relay only: {relay_only}): bytes flowed again {flowing:?} after the network was back",
        idle.unwrap_or("default")
    );
    let past_idle = idle.map_or(cut > Duration::from_secs(60), |i| {
        cut > Duration::from_secs(i.parse().expect("idle seconds"))
    });
    if past_idle {
        assert!(
            c.machine("alice").logs().contains("resumed"),
            "the cut did not outlast the connection: nothing was resumed"
        );
    }
    if relay_only {
        assert!(
            log_shows(&c, who, "reconnecting to it now"),
            "{who} did not rejoin its relay after the cut:\n{}",
            tail(&c.machine(who).logs(), 30)
        );
    }
    let (status, err) = ssh.wait(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "ssh did not exit 0: {status:?}\n{err}"
    );
}

/// The `malai ssh -N` process of `device` (a forwarding run), if it runs.
fn forwarding_pid(c: &TestCluster, device: &str) -> Option<i32> {
    let home = format!("MALAI_HOME={}", c.machine(device).home().display());
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if !args.windows(2).any(|w| w[0] == b"ssh" && w[1] == b"-N") {
            continue;
        }
        let environ = std::fs::read(e.path().join("environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|v| v == home.as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// A download through `malai ssh -N -L`: a TCP source on foo's side sends 16 MiB, the
/// forwarding process is stopped (SIGSTOP) for longer than the idle limit after the first
/// MiB arrived, and after SIGCONT the rest arrives byte-identical on the same local TCP
/// connection (the server kept the forward's target connection detached).
#[test]
fn resume_forward_download_survives_a_stopped_client_past_the_idle_limit() {
    forward_download_through_a_stop(false, false);
}

/// The same through alice's agent: the agent runs the forward's resumable session on its
/// pool (`keyholder::serve`'s `stream`) and is the process stopped; the forwarding process
/// relays plain bytes to it and never notices the outage.
#[test]
fn resume_forward_download_through_the_agent_survives_a_stopped_agent() {
    forward_download_through_a_stop(false, true);
}

/// Deny twin: alice is dropped from `allow-from` while her forward is detached; after
/// SIGCONT the download ends short, foo audits `resume-denied` and drops the forward's
/// target connection, and the forwarding process says in one line that the channel could
/// not be resumed.
#[test]
fn resume_forward_refused_after_revocation_while_detached() {
    forward_download_through_a_stop(true, false);
}

/// Stops alice's forwarding process (or her agent) until foo has detached a session of it,
/// then waits `PAST_IDLE` in all; with `revoke`, drops alice from foo's `allow-from`
/// meanwhile; then SIGCONT. Whether foo detached anything.
fn stop_forwarder_past_the_idle_limit(c: &TestCluster, agent: bool, revoke: bool) -> bool {
    let pid = poll_until(Duration::from_secs(10), || {
        if agent {
            client_pid(c, "alice", Via::Agent)
        } else {
            forwarding_pid(c, "alice")
        }
    })
    .expect("no forwarding process (or agent) of alice's found");
    let t0 = Instant::now();
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let detached = poll_until(Duration::from_secs(30), || {
        foo_log_has(c, "session detached").then_some(())
    });
    if let Some(left) = PAST_IDLE.checked_sub(t0.elapsed()) {
        std::thread::sleep(left);
    }
    if revoke && detached.is_some() {
        c.edit_manager_file(|t| {
            set_table_keys(&t, "server.foo", &[("allow-from", toml_str("bob"))])
        });
        c.import_on("foo");
    }
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    detached.is_some()
}

fn forward_download_through_a_stop(revoke: bool, agent: bool) {
    use std::io::{Read, Write};
    const LEN: usize = 16 << 20;
    let c = cluster(&[]);
    let _agent = agent.then(|| Agent::start(c.machine("alice"), &[]));
    let pattern = |i: usize| (i * 7 + i / 4093) as u8;
    let source = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the source");
    let source_port = source.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = source.accept() {
            let data: Vec<u8> = (0..LEN).map(pattern).collect();
            let _ = s.write_all(&data);
        }
    });
    let lport = free_tcp_port();
    let mut cmd = c.machine("alice").cmd([
        "ssh",
        "-N",
        "-L",
        &format!("{lport}:127.0.0.1:{source_port}"),
        "foo.acme",
    ]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut fwd = cmd.spawn().expect("malai ssh -N -L");
    let mut local = poll_until(Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", lport)).ok()
    })
    .expect("the forward never listened");
    local
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut got = vec![0u8; 1 << 20];
    local.read_exact(&mut got).expect("the first MiB");
    let detached = stop_forwarder_past_the_idle_limit(&c, agent, revoke);
    assert!(
        detached,
        "foo never detached the forward of a stopped client\n{}",
        tail(&c.machine("foo").logs(), 40)
    );
    let mut rest = Vec::new();
    let read = local.read_to_end(&mut rest);
    got.extend_from_slice(&rest);
    if revoke {
        assert!(
            got.len() < LEN,
            "a revoked peer's forward went on after the outage"
        );
        assert_denied_while_detached(&c, "forward");
        let _ = fwd.kill();
        let out = fwd.wait_with_output().expect("wait for the forward");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_one_line_not_resumed(&err, "channel");
        return;
    }
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert!(
        read.is_ok() && got.len() == LEN,
        "the download broke after the outage ({read:?}, {} of {LEN} bytes)\n{}\n{}",
        got.len(),
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
        "the download lost or doubled bytes across the resume"
    );
    assert_resumed(&c);
}

/// `-R`: foo listens for alice (`malai ssh -N -R`), and a download from alice's side through
/// foo's listener is in flight when alice's forwarding process is stopped past the idle
/// limit. After SIGCONT the download goes on byte for byte, foo's listener is still there
/// (a new connection through it reaches alice), and both ends say they resumed.
#[test]
fn resume_remote_forward_survives_a_stopped_client_past_the_idle_limit() {
    remote_forward_through_a_stop(false, false);
}

/// The same through alice's agent: it runs the `-R` stream and each connection's stream
/// resumable on its pool and is the process stopped; the forwarding process relays plain
/// bytes to it.
#[test]
fn resume_remote_forward_through_the_agent_survives_a_stopped_agent() {
    remote_forward_through_a_stop(false, true);
}

/// Deny twin: alice is dropped from `allow-from` while her `-R` is detached: after SIGCONT
/// the download ends short, foo audits `resume-denied` and closes its listener, and the
/// `-N` run exits 255 with one line saying it could not be resumed.
#[test]
fn resume_remote_forward_refused_after_revocation_while_detached() {
    remote_forward_through_a_stop(true, false);
}

fn remote_forward_through_a_stop(revoke: bool, agent: bool) {
    use std::io::{Read, Write};
    const LEN: usize = 16 << 20;
    let c = cluster(&[]);
    let _agent = agent.then(|| Agent::start(c.machine("alice"), &[]));
    let pattern = |i: usize| (i * 7 + i / 4093) as u8;
    // Alice's side: the first connection gets the download, later ones a short line.
    let source = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the source");
    let source_port = source.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for (n, s) in source.incoming().enumerate() {
            let Ok(mut s) = s else { continue };
            if n == 0 {
                std::thread::spawn(move || {
                    let data: Vec<u8> = (0..LEN).map(pattern).collect();
                    let _ = s.write_all(&data);
                });
            } else {
                let _ = s.write_all(b"again\n");
            }
        }
    });
    let rport = free_tcp_port();
    let mut fwd = c
        .machine("alice")
        .cmd([
            "ssh",
            "-N",
            "-R",
            &format!("{rport}:127.0.0.1:{source_port}"),
            "foo.acme",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("malai ssh -N -R");
    let connect = || std::net::TcpStream::connect(("127.0.0.1", rport)).ok();
    let Some(mut remote) = poll_until(Duration::from_secs(30), connect) else {
        let _ = fwd.kill();
        panic!("foo never listened for the -R\n{}", c.diagnostics());
    };
    remote
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut got = vec![0u8; 1 << 20];
    remote.read_exact(&mut got).expect("the first MiB");
    let detached = stop_forwarder_past_the_idle_limit(&c, agent, revoke);
    assert!(
        detached,
        "foo never detached the -R of a stopped client\n{}",
        tail(&c.machine("foo").logs(), 40)
    );
    let mut rest = Vec::new();
    let read = remote.read_to_end(&mut rest);
    got.extend_from_slice(&rest);
    if revoke {
        assert!(
            got.len() < LEN,
            "a revoked peer's remote forward went on after the outage"
        );
        assert_denied_while_detached(&c, "remote forward");
        let status = poll_until(Duration::from_secs(30), || fwd.try_wait().ok().flatten());
        if status.is_none() {
            let _ = fwd.kill();
        }
        let out = fwd.wait_with_output().expect("wait for the -R run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(255),
            "the -N -R run did not end 255 once its forward was refused:\n{err}"
        );
        assert_one_line_not_resumed(&err, "remote forward");
        assert!(
            poll_until(Duration::from_secs(10), || connect()
                .is_none()
                .then_some(()))
            .is_some(),
            "foo still listens for a revoked peer's -R"
        );
        return;
    }
    assert!(
        read.is_ok() && got.len() == LEN,
        "the download through -R broke after the outage ({read:?}, {} of {LEN} bytes)\n{}\n{}",
        got.len(),
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
        "the download through -R lost or doubled bytes across the resume"
    );
    let mut again = String::new();
    let mut second = connect().expect("foo's -R listener is gone after the resume");
    second
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let _ = second.read_to_string(&mut again);
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert_eq!(
        again, "again\n",
        "a new connection through -R after the resume"
    );
    assert_resumed(&c);
}

/// `-A` beside a native command, its client stopped past the idle limit: the forwarded
/// agent's socket on foo outlives the outage (the `remote-forward` behind it resumes with
/// the exec), so `ssh-add -l` run after it lists alice's key.
#[test]
fn resume_forwarded_agent_survives_a_stopped_client_past_the_idle_limit() {
    let c = cluster(&[]);
    let ad = crate::forward::SockDir::new("resume-agent");
    let (sock, _ssh_agent) = crate::forward::ssh_agent_with_key(&c, &ad);
    let flag = ad.0.join("go");
    let script = format!(
        "while [ ! -e {} ]; do sleep 0.2; done; ssh-add -l",
        flag.display()
    );
    let child = c
        .machine("alice")
        .cmd(["ssh", "-T", "-A", "foo.acme", &script])
        .env("SSH_AUTH_SOCK", &sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("malai ssh -T -A");
    let listening =
        log_shows(&c, "foo", "remote forward listening") && log_shows(&c, "foo", "exec started");
    let pid = client_pid(&c, "alice", Via::Native);
    let (true, Some(pid)) = (listening, pid) else {
        let out = child.wait_with_output().expect("malai ssh output");
        panic!(
            "the -A run did not start\n{}\n{}",
            fmt_output(&out),
            c.diagnostics()
        );
    };
    let t0 = Instant::now();
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let detached = poll_until(Duration::from_secs(30), || {
        foo_log_has(&c, "session detached").then_some(())
    });
    if let Some(left) = PAST_IDLE.checked_sub(t0.elapsed()) {
        std::thread::sleep(left);
    }
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    assert!(
        detached.is_some(),
        "foo never detached the -A run's sessions"
    );
    // The command goes on now: a connection ssh-add makes before the agent's forward has
    // resumed waits on foo's listener (kept while detached) until it is announced.
    std::fs::write(&flag, b"").expect("write the flag");
    let status = {
        let mut child = child;
        let s = poll_until(Duration::from_secs(90), || child.try_wait().ok().flatten());
        if s.is_none() {
            let _ = child.kill();
        }
        (s, child.wait_with_output().expect("malai ssh output"))
    };
    let both = poll_until(Duration::from_secs(30), || {
        (audit_of_foo(&c).matches("\"resumed\"").count() >= 2).then_some(())
    });
    let (status, out) = status;
    assert!(
        both.is_some(),
        "foo did not resume both the exec and the -A forward:\n{}",
        audit_of_foo(&c)
    );
    assert!(
        status.is_some_and(|s| s.success()) && stdout_of(&out).contains("forwarded-key"),
        "ssh-add -l through the forwarded agent after the resume: {status:?}\n{}\n{}",
        fmt_output(&out),
        tail(&c.machine("alice").logs(), 30)
    );
}

/// A `-L` forward carrying a 64 MiB download across the namespace network while foo's
/// network is cut past the idle limit (`malai ssh -N -L`, own endpoint): the download goes
/// on after the cut, byte for byte, and both ends say the channel resumed.
#[test]
fn nat_resume_forward_download_64mib_through_a_cut() {
    if !netsim::available("resume::nat_resume_forward_download_64mib_through_a_cut") {
        return;
    }
    use std::io::{Read, Write};
    const LEN: usize = 64 << 20;
    let _lock = netsim::heavy_net_lock();
    let relay_dir = tempfile::tempdir().expect("tempdir");
    let (net, c) = nat_cluster(&relay_dir);
    let pattern = |i: usize| (i * 7 + i / 4093) as u8;
    // The source listens in foo's namespace: the forward's target is foo's own loopback.
    let source = netsim::in_netns_thread(net.ns("foo"), || {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind the source")
    });
    let source_port = source.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = source.accept() {
            let data: Vec<u8> = (0..LEN).map(pattern).collect();
            let _ = s.write_all(&data);
        }
    });
    let lport = free_tcp_port();
    let mut fwd = c
        .machine("alice")
        .cmd([
            "ssh",
            "-N",
            "-L",
            &format!("{lport}:127.0.0.1:{source_port}"),
            "foo.acme",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("malai ssh -N -L");
    let alice_ns = net.ns("alice").to_string();
    let local = poll_until(Duration::from_secs(60), || {
        netsim::in_netns_thread(&alice_ns, move || {
            std::net::TcpStream::connect(("127.0.0.1", lport)).ok()
        })
    });
    let Some(mut local) = local else {
        let _ = fwd.kill();
        panic!("the forward never listened\n{}", c.diagnostics());
    };
    local
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut got = vec![0u8; 1 << 20];
    local.read_exact(&mut got).expect("the first MiB");
    net.cut("foo");
    std::thread::sleep(CUT);
    net.restore("foo");
    let mut rest = Vec::new();
    let read = local.read_to_end(&mut rest);
    got.extend_from_slice(&rest);
    let _ = fwd.kill();
    let _ = fwd.wait();
    assert!(
        read.is_ok() && got.len() == LEN,
        "the download broke across the cut ({read:?}, {} of {LEN} bytes)\n{}\n{}",
        got.len(),
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    assert!(
        got.iter().enumerate().all(|(i, b)| *b == pattern(i)),
        "the download lost or doubled bytes across the resume"
    );
    assert_resumed(&c);
}

/// A group command (`malai ssh -T web.acme …`: one native exec per member, all on one
/// endpoint), its client stopped past the idle limit: foo's output arrives whole, once and
/// in order after SIGCONT, and foo audits `resumed`. Deny twin in the same run: bar drops
/// alice from its `allow-from` while she is detached, so bar's resume is refused (bar
/// audits `resume-denied`, one summary line on stderr) and the group exits 255.
#[test]
fn resume_group_exec_survives_a_stopped_client_and_a_revoked_member_is_refused() {
    group_exec_through_a_stop(false);
}

/// The same with alice's agent holding the key: it runs each member's resumable exec on
/// its pool and is the process stopped.
#[test]
fn resume_group_exec_through_the_agent_survives_a_stopped_agent() {
    group_exec_through_a_stop(true);
}

fn group_exec_through_a_stop(agent: bool) {
    let c = TestCluster::builder("acme")
        .server("foo")
        .server("bar")
        .device("alice")
        .device("bob")
        .allow("foo", &["alice"])
        .allow("bar", &["alice"])
        .group("web", &["foo", "bar"])
        .env("MALAI_IDLE_TIMEOUT", IDLE)
        .build();
    let _agent = agent.then(|| Agent::start(c.machine("alice"), &[]));
    let via = if agent { Via::AgentNative } else { Via::Native };
    let script = "echo up; sleep 4; seq 1 20000; sleep 4; echo survived";
    use std::os::unix::process::CommandExt;
    let mut child = c
        .machine("alice")
        .cmd(["ssh", "-T", "web.acme", script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("spawn malai ssh web.acme");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        let mut lines = std::io::BufReader::new(out).lines();
        let mut ups = 0;
        while let Some(Ok(l)) = lines.next() {
            if l.ends_with(": up") {
                ups += 1;
                if ups == 2 {
                    let _ = tx.send(());
                }
            }
            all.push_str(&l);
            all.push('\n');
        }
        all
    });
    let ssh = Ssh {
        child,
        lines: std::sync::mpsc::channel().1,
        seen: String::new(),
    };
    assert!(
        rx.recv_timeout(Duration::from_secs(30)).is_ok(),
        "the group did not start on both members\n{}",
        c.diagnostics()
    );
    let pid = poll_until(Duration::from_secs(10), || client_pid(&c, "alice", via))
        .expect("alice's client process");
    let t0 = Instant::now();
    signal(pid, nix::sys::signal::Signal::SIGSTOP);
    let detached = poll_until(Duration::from_secs(30), || {
        ["foo", "bar"]
            .iter()
            .all(|m| c.machine(m).logs().contains("session detached"))
            .then_some(())
    });
    if detached.is_none() {
        signal(pid, nix::sys::signal::Signal::SIGCONT);
        panic!(
            "foo and bar did not both detach the sessions of a stopped client\n{}\n{}",
            tail(&c.machine("foo").logs(), 20),
            tail(&c.machine("bar").logs(), 20)
        );
    }
    if let Some(left) = PAST_IDLE.checked_sub(t0.elapsed()) {
        std::thread::sleep(left);
    }
    c.edit_manager_file(|t| set_table_keys(&t, "server.bar", &[("allow-from", toml_str("bob"))]));
    c.import_on("bar");
    signal(pid, nix::sys::signal::Signal::SIGCONT);
    let (status, err) = ssh.wait(Duration::from_secs(60));
    let seen = reader.join().expect("stdout reader");
    let foo: Vec<&str> = seen.lines().filter(|l| l.starts_with("foo: ")).collect();
    let want: Vec<String> = std::iter::once("foo: up".to_string())
        .chain((1..=20_000).map(|n| format!("foo: {n}")))
        .chain(std::iter::once("foo: survived".to_string()))
        .collect();
    assert!(
        foo == want,
        "foo's output lost or doubled lines across the resume ({} lines, want {}); stderr: {err}\n{}\n{}",
        foo.len(),
        want.len(),
        tail(&c.machine("alice").logs(), 30),
        tail(&c.machine("foo").logs(), 30)
    );
    assert_eq!(
        seen.lines()
            .filter(|l| l.starts_with("bar: "))
            .collect::<Vec<_>>(),
        ["bar: up"],
        "bar, revoked while detached, must not go on"
    );
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(255),
        "a group with a refused member must exit 255: {status:?}\n{err}"
    );
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("malai: ")).collect();
    assert!(
        ours.len() == 1
            && ours[0].starts_with("malai: bar: ")
            && ours[0].contains("could not be resumed"),
        "stderr does not say in one line that bar's session could not be resumed:\n{err}"
    );
    assert!(
        audit_of_foo(&c).contains("\"resumed\""),
        "no resumed line in foo's audit log:\n{}",
        audit_of_foo(&c)
    );
    let bar_audit = std::fs::read_to_string(c.machine("bar").home().join("logs/ssh/audit.log"))
        .unwrap_or_default();
    assert!(
        bar_audit.contains("\"resume-denied\""),
        "no resume-denied line in bar's audit log:\n{bar_audit}"
    );
}

// ---------------------------------------------------------------------------------------------
// Through ssh-via: the session is carried by an `ssh` child to foo's sshd, whose forced
// command is `malai ssh stdinserver`; a fresh ssh resumes it.
// ---------------------------------------------------------------------------------------------

/// An ssh-via cluster (`shim`) whose `ssh` fails at once while `block` exists: an outage of
/// any length for new ssh connections. Returns the shim and the wrapper's command.
fn via_with_block(block: &std::path::Path) -> (crate::shim::Shim, String) {
    let s = crate::shim::shim();
    let cmd = format!(
        "sh -c 'test -e {} && exit 255; exec \"$@\"' sh {}",
        block.display(),
        s.ssh_command
    );
    (s, cmd)
}

/// SIGKILL every `ssh` carrying a malai session to the sshd on `port` (its argv names the
/// port and the forced command's fallback): the connection under the session dies.
fn kill_via_ssh(port: u16) -> usize {
    let port = port.to_string();
    let mut n = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let ours = args.first().is_some_and(|a| a.ends_with(b"ssh"))
            && args
                .windows(2)
                .any(|w| w[0] == b"-p" && w[1] == port.as_bytes())
            && args
                .iter()
                .any(|a| a.windows(11).any(|w| w == b"stdinserver"));
        if ours {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            n += 1;
        }
    }
    n
}

/// A session to foo through ssh-via ([`Via::Proxy`]: OpenSSH through the ProxyCommand;
/// [`Via::Native`]: native exec) whose ssh is killed while new ones fail for 4 s: the
/// command goes on and its output arrives after the outage; both ends say it resumed.
/// With `revoke`, alice loses foo meanwhile: one line, 255, `resume-denied` on foo.
fn via_session_through_an_outage(via: Via, revoke: bool) {
    let block = tempfile::NamedTempFile::new().expect("block file");
    let (s, ssh_command) = via_with_block(block.path());
    let c = &s.c;
    let port = c.sshd("foo").port();
    // Removed at once; created again for the outage.
    let block_path = block.into_temp_path();
    std::fs::remove_file(&block_path).expect("unblock");
    let env = [("MALAI_SSH_COMMAND", ssh_command.as_str())];
    let mut ssh = Ssh::spawn_env(
        c,
        "alice",
        via,
        "echo up; sleep 8; echo survived",
        Stdio::null(),
        &env,
    );
    assert!(
        ssh.expect_line("up", Duration::from_secs(30)),
        "{via:?} over ssh-via did not start; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    std::fs::write(&block_path, b"").expect("block");
    assert!(kill_via_ssh(port) >= 1, "no ssh-via process found to kill");
    std::thread::sleep(Duration::from_secs(2));
    if revoke {
        c.edit_manager_file(|t| {
            set_table_keys(&t, "server.foo", &[("allow-from", toml_str("eve"))])
        });
        c.import_on("foo");
    }
    std::thread::sleep(Duration::from_secs(2));
    std::fs::remove_file(&block_path).expect("unblock");
    if revoke {
        let (status, err) = ssh.wait(Duration::from_secs(60));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(255),
            "a revoked resume must fail with 255: {status:?}\n{err}"
        );
        assert_one_line_not_resumed(&err, "session");
        let denied = poll_until(Duration::from_secs(10), || {
            audit_of_foo(c).contains("\"resume-denied\"").then_some(())
        });
        assert!(
            denied.is_some(),
            "no resume-denied line in foo's audit log:\n{}",
            audit_of_foo(c)
        );
        return;
    }
    assert!(
        ssh.expect_line("survived", Duration::from_secs(60)),
        "the session did not survive its ssh; saw {:?}\n{}",
        ssh.seen,
        c.diagnostics()
    );
    let (status, err) = ssh.wait(Duration::from_secs(30));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{err}");
    assert!(
        !err.contains("malai:"),
        "the resume showed on stderr (only the log may say it):\n{err}"
    );
    assert!(
        log_shows(c, "alice", "resumed"),
        "alice's log does not say it resumed\n{}",
        tail(&c.machine("alice").logs(), 30)
    );
    assert!(
        audit_of_foo(c).contains("\"resumed\""),
        "no resumed line in foo's audit log:\n{}",
        audit_of_foo(c)
    );
}

#[test]
fn resume_over_ssh_via_proxy_survives_its_ssh_dying_through_an_outage() {
    via_session_through_an_outage(Via::Proxy, false);
}

#[test]
fn resume_over_ssh_via_native_exec_survives_its_ssh_dying_through_an_outage() {
    via_session_through_an_outage(Via::Native, false);
}

#[test]
fn resume_over_ssh_via_refused_after_revocation_while_detached() {
    via_session_through_an_outage(Via::Native, true);
}

/// Native exec's stdin through ssh-via, 16 MiB streamed while its ssh is killed twice
/// (each paced chunk waits 50 ms, so the stream lasts over 3 s after the grant):
/// `sha256sum` on foo sees exactly the bytes sent, none lost, none twice.
#[test]
fn resume_over_ssh_via_native_exec_stdin_is_byte_exact_through_killed_ssh() {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    let s = crate::shim::shim();
    let c = &s.c;
    let port = c.sshd("foo").port();
    let src = c.dir().join("upload.bin");
    write_random_file(&src, 16 << 20, 18);
    let want = sha256_file(&src);
    let mut cmd = c.machine("alice").cmd(["ssh", "foo.acme", "sha256sum"]);
    let mut child = cmd
        .env("MALAI_SSH_COMMAND", &s.ssh_command)
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn malai ssh");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = std::fs::read(&src).expect("read source");
    let writer = std::thread::spawn(move || {
        // 64 chunks of 256 KiB, paced over ~3 s so the kills fall mid-stream.
        for (i, chunk) in data.chunks(256 << 10).enumerate() {
            if stdin.write_all(chunk).is_err() {
                return Err(i);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    });
    // Each kill falls on an attachment that is up: the first once the session was
    // granted, the second once it resumed (a kill before the grant would fail the open).
    for (n, granted) in ["resumable exec through ssh", "resumed"].iter().enumerate() {
        let said = poll_until(Duration::from_secs(60), || {
            c.machine("alice").logs().contains(granted).then_some(())
        });
        assert!(
            said.is_some(),
            "kill {n}: alice's log never said {granted:?}\n{}",
            tail(&c.machine("alice").logs(), 30)
        );
        std::thread::sleep(Duration::from_millis(300));
        kill_via_ssh(port);
    }
    let wrote = writer.join().expect("writer");
    let out = wait_small_output(child, Duration::from_secs(120));
    assert!(
        wrote.is_ok(),
        "malai stopped reading stdin at chunk {wrote:?}\n{}",
        fmt_output(&out)
    );
    assert_success(&out, "sha256sum through killed ssh-via connections");
    let got = stdout_of(&out);
    assert_eq!(
        got.split_whitespace().next(),
        Some(want.as_str()),
        "foo received other bytes\n{}",
        fmt_output(&out)
    );
    assert!(
        log_shows(c, "alice", "resumed"),
        "alice's log does not say it resumed (were the kills too late?)\n{}",
        tail(&c.machine("alice").logs(), 30)
    );
}

/// Waits up to `timeout` for `child` (its own process group) to exit, killing the group
/// past it, then reads its output (small: it cannot fill a pipe meanwhile).
fn wait_small_output(mut child: Child, timeout: Duration) -> std::process::Output {
    use std::io::Read;
    let status = poll_until(timeout, || child.try_wait().ok().flatten()).unwrap_or_else(|| {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        child.wait().expect("wait")
    });
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_end(&mut stdout);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut stderr);
    }
    std::process::Output {
        status,
        stdout,
        stderr,
    }
}

/// Foo's server killed and started again under a native exec through ssh-via: its ssh
/// ends with it, the fresh one's resume finds no session and a new boot id, and the client
/// says in one line that the server restarted (exit 255), soon after it is back.
#[test]
fn resume_over_ssh_via_after_a_server_restart_says_so_in_one_line() {
    let mut s = crate::shim::shim();
    let ssh = native_over_via_running(&s);
    // Two ssh logins (the resume, then the ping for the boot id) after a redial tick.
    restart_foo_and_expect_one_line(&mut s.c, ssh, "ssh-via");
}

/// Foo's server stopped for good under a native exec through ssh-via: the fresh ssh's
/// forced command finds no server and says so in-band, so the client ends at once with one
/// line (exit 255) instead of redialling for the keep time.
#[test]
fn resume_over_ssh_via_after_the_server_stopped_says_so_in_one_line() {
    let mut s = crate::shim::shim();
    let ssh = native_over_via_running(&s);
    s.c.stop_server("foo");
    let (status, err) = ssh.wait(Duration::from_secs(60));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(255),
        "expected 255: {status:?}\n{err}"
    );
    let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("malai: ")).collect();
    assert!(
        ours.len() == 1
            && ours[0].contains("could not be resumed")
            && ours[0].contains("no malai ssh server is running"),
        "stderr does not say in one line that the server is gone:\n{err}"
    );
}

/// Alice's native exec to foo through ssh-via, `sleep 60` running after its first line.
fn native_over_via_running(s: &crate::shim::Shim) -> Ssh {
    let env = [("MALAI_SSH_COMMAND", s.ssh_command.as_str())];
    let mut ssh = Ssh::spawn_env(
        &s.c,
        "alice",
        Via::Native,
        "echo up; sleep 60",
        Stdio::null(),
        &env,
    );
    assert!(
        ssh.expect_line("up", Duration::from_secs(30)),
        "native exec over ssh-via did not start; saw {:?}\n{}",
        ssh.seen,
        s.c.diagnostics()
    );
    ssh
}
