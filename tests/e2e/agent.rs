//! `malai ssh agent` end to end: `eval "$(malai ssh agent -e)"`, then real `ssh` (through
//! `malai ssh proxy`) and native exec go through the agent's pooled iroh connection
//! (asserted with the agent's own counters, never with timing); lockdown keeps every key in
//! the agent; a killed agent means a direct connection (or a clear error under lockdown)
//! and its stale socket is cleaned up by the next `agent -e`; idle and broken connections
//! are replaced; clusters joined after the agent started are served too.
//!
//! Cluster `acme`: manager `mgr`; server `foo` with a real sshd behind it; device `alice`
//! (full access to foo).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::*;

/// How long the agent may take to notice something (idle close, a new cluster).
const AGENT_SETTLE: Duration = Duration::from_secs(20);

fn acme() -> TestCluster {
    TestCluster::builder("acme")
        .manager("mgr")
        .server("foo")
        .device("alice")
        .allow("foo", &["alice"])
        .build()
}

/// A started agent of one machine: its exported environment; stopped on drop (the agent
/// also exits by itself once the test directory, and so its socket, is gone).
pub struct Agent {
    machine: Machine,
    pub exports: BTreeMap<String, String>,
    extra_env: Vec<(String, String)>,
    /// False for a second handle on the same agent, or one that is already gone.
    stop_on_drop: bool,
}

impl Agent {
    /// `malai ssh agent -e <flags>` as `machine`; asserts stdout is only `export` lines.
    pub fn start(machine: &Machine, flags: &[&str]) -> Agent {
        Agent::start_with_env(machine, flags, &[])
    }

    /// Like [`Agent::start`], with extra environment for the agent process.
    pub fn start_with_env(machine: &Machine, flags: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut cmd = machine.cmd(["ssh", "agent", "-e"]);
        cmd.args(flags);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = run_cmd(&mut cmd);
        assert_success(&out, &format!("[{}] malai ssh agent -e", machine.name()));
        let exports = parse_exports(&stdout_of(&out));
        Agent {
            machine: machine.clone(),
            exports,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            stop_on_drop: true,
        }
    }

    /// Don't stop the agent when this handle goes (it is another handle's, or dead).
    pub fn keep_running(mut self) {
        self.stop_on_drop = false;
    }

    pub fn socket(&self) -> PathBuf {
        PathBuf::from(&self.exports["MALAI_SSH_AGENT"])
    }

    /// `malai <args>` as the machine, with the agent's exports in the environment.
    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut c = self.machine.cmd(args);
        c.envs(&self.exports);
        c
    }

    /// `malai ssh agent status` fields as `key: value` pairs (first occurrence wins).
    pub fn status(&self) -> BTreeMap<String, String> {
        let out = run_cmd(&mut self.cmd(["ssh", "agent", "status"]));
        assert_success(&out, "malai ssh agent status");
        let mut m = BTreeMap::new();
        for line in stdout_of(&out).lines() {
            if let Some((k, v)) = line.split_once(": ") {
                m.entry(k.to_string())
                    .or_insert_with(|| v.trim().to_string());
            }
        }
        m.insert("raw".into(), stdout_of(&out));
        m
    }

    pub fn dials(&self) -> u64 {
        self.status()["dials"].parse().expect("dials is a number")
    }

    pub fn pid(&self) -> i32 {
        let out = run_cmd(&mut self.cmd(["ssh", "agent", "status", "--json"]));
        assert_success(&out, "malai ssh agent status --json");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
        v["pid"].as_i64().expect("pid") as i32
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if !self.stop_on_drop {
            return;
        }
        let mut c = self.machine.cmd(["ssh", "agent", "stop"]);
        c.envs(&self.exports);
        for (k, v) in &self.extra_env {
            c.env(k, v);
        }
        let _ = run_cmd_with(&mut c, None, Duration::from_secs(20));
    }
}

/// `export K=V` lines → map (values may be single-quoted). Panics on any other line.
pub fn parse_exports(stdout: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for line in stdout.lines() {
        let rest = line
            .strip_prefix("export ")
            .unwrap_or_else(|| panic!("agent -e printed a non-export line: {line:?}\n{stdout}"));
        let (k, v) = rest.split_once('=').expect("export K=V");
        let v = shlex::split(v)
            .and_then(|mut w| (w.len() == 1).then(|| w.remove(0)))
            .unwrap_or_else(|| panic!("bad value in {line:?}"));
        m.insert(k.to_string(), v);
    }
    m
}

/// `ssh` to `host` through `malai ssh proxy` with the agent's environment (the harness's
/// own ssh config deliberately clears it).
fn ssh_via_agent(
    c: &TestCluster,
    agent: &Agent,
    host: &str,
    remote: &str,
    stdin: Option<&[u8]>,
) -> Output {
    let m = c.machine("alice");
    let mut env = String::from("env -u RUST_LOG");
    for (k, v) in m.env().into_iter().chain(agent.exports.clone()) {
        env.push_str(&format!(" {k}={v}"));
    }
    let cfg = c.dir().join("ssh_config-agent");
    let text = format!(
        "Host *.{alias}\n  ProxyCommand {env} {MALAI} ssh proxy %h %p\n  User root\n  \
         IdentityFile {key}\n  IdentitiesOnly yes\n  BatchMode yes\n  UserKnownHostsFile {kh}\n  \
         StrictHostKeyChecking accept-new\n  LogLevel ERROR\n",
        alias = c.alias,
        key = c.sshd("foo").client_key().display(),
        kh = c.dir().join("known_hosts-agent").display(),
    );
    write_atomic(&cfg, text.as_bytes());
    let mut cmd = Command::new("ssh");
    cmd.env_remove("RUST_LOG")
        .arg("-F")
        .arg(&cfg)
        .arg(host)
        .arg(remote);
    run_cmd_with(&mut cmd, stdin, CHILD_TIMEOUT)
}

fn exec(agent: &Agent, args: &[&str]) -> Output {
    let mut full = vec!["ssh"];
    full.extend_from_slice(args);
    run_cmd(&mut agent.cmd(full))
}

fn secret_key(m: &Machine, alias: &str) -> PathBuf {
    m.home()
        .join("ssh")
        .join("clusters")
        .join(alias)
        .join("secret-key")
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

#[test]
fn eval_agent_e_then_ssh_and_exec_reuse_one_connection() {
    let c = acme();
    let alice = c.machine("alice");
    let agent = Agent::start(alice, &[]);
    let keys: Vec<&str> = agent.exports.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "HTTP_PROXY",
            "MALAI_LOCKDOWN_MODE",
            "MALAI_SSH_AGENT",
            "http_proxy"
        ],
        "{:?}",
        agent.exports
    );
    assert_eq!(agent.exports["MALAI_LOCKDOWN_MODE"], "true");
    assert!(agent.exports["HTTP_PROXY"].starts_with("http://127.0.0.1:"));
    assert_eq!(agent.exports["HTTP_PROXY"], agent.exports["http_proxy"]);
    // Socket 0600 in a 0700 runtime dir.
    let sock = agent.socket();
    assert_eq!(mode(&sock), 0o600, "{}", sock.display());
    assert_eq!(mode(sock.parent().unwrap()), 0o700);

    // Lockdown is on: these can only succeed through the agent.
    let out = ssh_via_agent(&c, &agent, "foo.acme", "echo through-agent", None);
    assert_success(&out, "ssh through the agent");
    assert_eq!(stdout_of(&out), "through-agent\n");

    let out = exec(&agent, &["foo.acme", "true"]);
    assert_success(&out, "malai ssh foo.acme true (1st)");
    let out = exec(&agent, &["foo.acme", "true"]);
    assert_success(&out, "malai ssh foo.acme true (2nd)");
    let status = agent.status();
    assert_eq!(
        status["dials"], "1",
        "one iroh connection for everything:\n{}",
        status["raw"]
    );
    assert!(
        status["raw"].contains("connection acme/foo: active 0, requests 3"),
        "{}",
        status["raw"]
    );

    // Streams, stderr and exit code pass through the agent like a direct exec.
    let out = run_cmd_with(
        &mut agent.cmd(["ssh", "foo.acme", "cat; echo oops >&2; exit 3"]),
        Some(b"stdin bytes\n"),
        CHILD_TIMEOUT,
    );
    assert_exit_code(&out, 3, "exec with stdin through the agent");
    assert_eq!(stdout_of(&out), "stdin bytes\n");
    assert_eq!(stderr_of(&out), "oops\n");

    // A second `-e` finds the running agent instead of starting another.
    let pid = agent.pid();
    let again = Agent::start(alice, &[]);
    assert_eq!(again.socket(), sock);
    assert_eq!(again.pid(), pid);
    again.keep_running(); // the same agent: stop it once
    assert_eq!(agent.dials(), 1);
}

#[test]
fn big_upload_through_the_agent_proxy_keeps_half_close() {
    let c = acme();
    let agent = Agent::start(c.machine("alice"), &[]);
    let src = c.scratch("up").join("blob");
    write_random_file(&src, 16 << 20, 0x6167_656e_7421);
    let data = fs::read(&src).unwrap();
    let dst = c.scratch("remote").join("blob");
    let out = ssh_via_agent(
        &c,
        &agent,
        "foo.acme",
        &format!("cat > {}", dst.display()),
        Some(&data),
    );
    assert_success(&out, "ssh cat > file through the agent");
    assert_eq!(sha256_file(&dst), sha256_file(&src));
    // Native exec the other way: the whole file on stdout.
    let out = exec(&agent, &["foo.acme", &format!("cat {}", dst.display())]);
    assert_success(&out, "exec cat through the agent");
    assert!(
        out.stdout == data,
        "exec stdout differs ({} bytes)",
        out.stdout.len()
    );
}

#[test]
fn killed_agent_means_direct_or_a_clear_lockdown_error_and_stale_socket_is_replaced() {
    let c = acme();
    let alice = c.machine("alice");
    let agent = Agent::start(alice, &[]);
    assert_success(
        &exec(&agent, &["foo.acme", "true"]),
        "exec through the agent",
    );
    let pid = agent.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill agent");
    assert!(
        poll_until(Duration::from_secs(5), || {
            (!Path::new(&format!("/proc/{pid}")).exists()
                || fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")))
            .then_some(())
        })
        .is_some(),
        "agent {pid} did not die"
    );
    assert!(
        agent.socket().exists(),
        "SIGKILL leaves the socket file behind"
    );

    // Lockdown: a clear error that says how to start an agent.
    let out = exec(&agent, &["foo.acme", "true"]);
    assert_exit_code(&out, 255, "exec under lockdown with a dead agent");
    let err = stderr_of(&out);
    assert!(
        err.contains("lockdown") && err.contains("malai ssh agent -e"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(out.stdout.is_empty());

    // Without lockdown: a direct connection, as if there were no agent.
    let out = run_cmd(
        agent
            .cmd(["ssh", "foo.acme", "echo direct"])
            .env("MALAI_LOCKDOWN_MODE", "false"),
    );
    assert_success(&out, "exec with a dead agent, no lockdown");
    assert_eq!(stdout_of(&out), "direct\n");

    // The next `-e` removes the stale socket and starts a fresh agent.
    let fresh = Agent::start(alice, &[]);
    assert_eq!(fresh.socket(), agent.socket());
    assert_ne!(fresh.pid(), pid);
    assert_success(
        &exec(&fresh, &["foo.acme", "true"]),
        "exec through the new agent",
    );
    agent.keep_running(); // dead already
}

#[test]
fn lockdown_cli_never_needs_the_key_the_agent_holds_it() {
    let c = acme();
    let alice = c.machine("alice");
    let agent = Agent::start(alice, &[]);
    // Keys are read when the agent starts; then take the key file away.
    let key = secret_key(alice, "acme");
    let hidden = c.dir().join("alice-secret-key.hidden");
    fs::rename(&key, &hidden).expect("hide alice's key");

    let out = exec(&agent, &["foo.acme", "echo locked-down"]);
    assert_success(&out, "exec through the agent without a key file");
    assert_eq!(stdout_of(&out), "locked-down\n");

    // Without MALAI_SSH_AGENT the CLI still finds the agent: it holds the cluster key on
    // this machine, and commands of that identity go through it (one endpoint per id52).
    let mut cmd = alice.cmd(["ssh", "foo.acme", "echo", "via-holder"]);
    cmd.env("MALAI_LOCKDOWN_MODE", "true");
    let out = run_cmd(&mut cmd);
    assert_success(
        &out,
        "lockdown, no MALAI_SSH_AGENT, the agent holds the key",
    );
    assert_eq!(stdout_of(&out), "via-holder\n");

    // With the agent gone the CLI alone has no key: lockdown says how to fix it, without
    // lockdown the key read fails — proof that the agent path never needed it.
    drop(agent);
    let mut cmd = alice.cmd(["ssh", "foo.acme", "true"]);
    cmd.env("MALAI_LOCKDOWN_MODE", "true");
    let out = run_cmd(&mut cmd);
    assert_exit_code(&out, 255, "lockdown without an agent");
    let err = stderr_of(&out);
    assert!(
        err.contains("MALAI_SSH_AGENT is not set") && err.contains("agent -e"),
        "{err}"
    );
    let out = alice.run(["ssh", "foo.acme", "true"]);
    assert_exit_code(&out, 255, "no agent, no lockdown, no key");
    fs::rename(&hidden, &key).expect("restore key");
}

#[test]
fn idle_connections_are_closed_then_redialed() {
    let c = acme();
    let agent = Agent::start_with_env(c.machine("alice"), &[], &[("MALAI_AGENT_IDLE_SECS", "1")]);
    assert_success(&exec(&agent, &["foo.acme", "true"]), "exec 1");
    assert_eq!(agent.dials(), 1);
    // Idle: closed by the agent after about a second.
    let closed = poll_until(AGENT_SETTLE, || {
        (!agent.status()["raw"].contains("connection acme/foo")).then_some(())
    });
    assert!(
        closed.is_some(),
        "idle connection still open:\n{}",
        agent.status()["raw"]
    );
    assert_success(&exec(&agent, &["foo.acme", "true"]), "exec 2");
    assert_eq!(agent.dials(), 2, "a closed idle connection is redialed");
}

#[test]
fn a_broken_connection_is_replaced_transparently() {
    let mut c = acme();
    let agent = Agent::start(c.machine("alice"), &[]);
    assert_success(
        &exec(&agent, &["foo.acme", "true"]),
        "exec before the restart",
    );
    assert_eq!(agent.dials(), 1);
    // The server restarts under the agent's live connection.
    c.stop_server("foo");
    c.start_server("foo");
    let out = exec(&agent, &["foo.acme", "echo after-restart"]);
    assert_success(&out, "exec after the server restarted");
    assert_eq!(stdout_of(&out), "after-restart\n");
    assert_eq!(agent.dials(), 2, "the broken connection was replaced");
}

#[test]
fn flags_stop_and_a_second_foreground_agent() {
    let c = acme();
    let alice = c.machine("alice");
    let agent = Agent::start(alice, &["--lockdown=false", "--http=false"]);
    let keys: Vec<&str> = agent.exports.keys().map(String::as_str).collect();
    assert_eq!(keys, ["MALAI_SSH_AGENT"]);
    assert!(agent.status()["raw"].contains("http proxy: off"));

    // A foreground agent refuses to start beside a running one.
    let out = run_cmd_with(
        &mut alice.cmd(["ssh", "agent"]),
        None,
        Duration::from_secs(30),
    );
    assert_exit_code(&out, 255, "second agent");
    assert!(
        stderr_of(&out).contains("already running"),
        "{}",
        fmt_output(&out)
    );

    // stop: the socket goes away, and status says there is no agent.
    let out = run_cmd(&mut agent.cmd(["ssh", "agent", "stop"]));
    assert_success(&out, "agent stop");
    assert!(!agent.socket().exists(), "socket left behind after stop");
    let out = run_cmd(&mut agent.cmd(["ssh", "agent", "status"]));
    assert_exit_code(&out, 255, "status without an agent");
    assert!(stderr_of(&out).contains("no agent"), "{}", fmt_output(&out));
    agent.keep_running();
}

#[test]
fn one_agent_serves_a_cluster_joined_after_it_started() {
    let c = acme();
    let alice = c.machine("alice");
    let agent = Agent::start(alice, &[]);
    assert_success(&exec(&agent, &["foo.acme", "true"]), "exec in acme");

    // A second cluster `beta` with its own manager; foo serves it too (the running server
    // picks it up, on --bind port + 1), alice is allowed.
    let mgr2 = Machine::new(c.dir(), "mgr2");
    let beta_mgr = mgr2.run_ok(["ssh", "cluster", "init", "beta"]);
    let foo_id = c
        .machine("foo")
        .run_ok(["ssh", "cluster", "join", "beta", &beta_mgr]);
    let alice_id = alice.run_ok(["ssh", "cluster", "join", "beta", &beta_mgr]);
    mgr2.run_ok(["ssh", "cluster", "add", "server", "foo", &foo_id]);
    mgr2.run_ok(["ssh", "cluster", "add", "device", "alice", &alice_id]);
    mgr2.run_ok(["ssh", "cluster", "allow", "foo", "alice"]);
    let mut bind = c.server_bind("foo");
    bind.set_port(bind.port() + 1);
    let file = mgr2.cluster_file("beta");
    let text = fs::read_to_string(&file).unwrap();
    let text = set_table_keys(
        &text,
        "server.foo",
        &[
            ("addrs", format!("[{}]", toml_str(&bind.to_string()))),
            ("ssh", toml_str(&c.sshd("foo").addr())),
        ],
    );
    fs::write(&file, text).unwrap();
    for m in [c.machine("foo"), alice] {
        m.run_ok([
            std::ffi::OsStr::new("ssh"),
            "cluster".as_ref(),
            "import".as_ref(),
            "beta".as_ref(),
            file.as_os_str(),
        ]);
    }
    // The same agent (no restart) reaches foo.beta once the server serves beta.
    let out = poll_until(AGENT_SETTLE, || {
        let out = exec(&agent, &["foo.beta", "echo beta"]);
        out.status.success().then_some(out)
    })
    .unwrap_or_else(|| {
        panic!(
            "foo.beta never worked through the agent:\n{}",
            fmt_output(&exec(&agent, &["foo.beta", "true"]))
        )
    });
    assert_eq!(stdout_of(&out), "beta\n");
    let status = agent.status();
    assert!(
        status["clusters"].contains("acme") && status["clusters"].contains("beta"),
        "{}",
        status["raw"]
    );
    assert!(
        status["raw"].contains("connection beta/foo"),
        "{}",
        status["raw"]
    );
}

#[test]
fn a_group_command_goes_through_the_agent_under_lockdown() {
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Embedded)
        .server_with("bar", SshTarget::Embedded)
        .device("alice")
        .allow("foo", &["alice"])
        .allow("bar", &["alice"])
        .build();
    c.edit_manager_file(|t| t + "\n[group.web]\nmembers = \"foo, bar\"\n");
    c.distribute();
    let agent = Agent::start(c.machine("alice"), &[]);
    let out = exec(&agent, &["web.acme", "echo hi; echo oops >&2"]);
    assert_success(&out, "group exec through the agent");
    let text = stdout_of(&out);
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort();
    assert_eq!(lines, ["bar: hi", "foo: hi"], "{}", fmt_output(&out));
    let mut err: Vec<String> = stderr_of(&out).lines().map(str::to_string).collect();
    err.sort();
    assert_eq!(err, ["bar: oops", "foo: oops"], "{}", fmt_output(&out));
    let out = exec(&agent, &["web.acme", "exit 4"]);
    assert_exit_code(&out, 4, "group exit status through the agent");
    assert_eq!(agent.dials(), 2, "one connection per member, reused");
}

#[test]
fn pty_through_the_agent_follows_the_window_and_restores_the_terminal() {
    let c = acme();
    let agent = Agent::start(c.machine("alice"), &[]);
    let mut env = String::from("env -u RUST_LOG");
    for (k, v) in c
        .machine("alice")
        .env()
        .into_iter()
        .chain(agent.exports.clone())
    {
        env.push_str(&format!(" {k}={v}"));
    }
    let ssh = format!("{env} {MALAI} ssh");
    let d = c.scratch("marks");
    let d = d.display();
    let inner = format!(
        "stty cols 100 rows 30; a=$(stty -g); \
         (while [ ! -e {d}/waiting ]; do sleep 0.05; done; stty cols 120 rows 40 </dev/tty) & \
         {ssh} -t foo.acme 'tty; touch {d}/waiting; i=0; \
           while [ \"$(stty size)\" = \"30 100\" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; \
           echo size: $(stty size)'; s=$?; \
         [ \"$(stty -g)\" = \"$a\" ] && echo RESTORED $s"
    );
    let out =
        run_cmd(
            Command::new("script")
                .env_remove("RUST_LOG")
                .args(["-qec", &inner, "/dev/null"]),
        );
    let text = stdout_of(&out).replace('\r', "");
    assert!(
        text.contains("/dev/pts/"),
        "no remote tty\n{}",
        fmt_output(&out)
    );
    assert!(
        text.contains("size: 40 120"),
        "the remote pty did not follow the window change\n{}",
        fmt_output(&out)
    );
    assert!(
        text.lines().any(|l| l.trim().ends_with("RESTORED 0")),
        "terminal mode not restored, or non-zero exit\n{}",
        fmt_output(&out)
    );
    assert_eq!(agent.dials(), 1);
}

#[test]
fn a_killed_client_ends_the_remote_command() {
    let c = acme();
    let agent = Agent::start(c.machine("alice"), &[]);
    let pid_file = c.scratch("pids").join("remote");
    let remote = format!("echo $$ >'{}'; exec sleep 300", pid_file.display());
    let mut cmd = agent.cmd(["ssh", "foo.acme", &remote]);
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut client = cmd.spawn().expect("spawn malai ssh");
    let pid: i32 = poll_until(Duration::from_secs(20), || {
        read_lossy(&pid_file).trim().parse().ok()
    })
    .expect("remote pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(client.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = client.wait().unwrap();
    assert_eq!(status.code(), Some(255), "client exit after SIGTERM");
    let gone = poll_until(Duration::from_secs(20), || {
        (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
    });
    assert!(gone.is_some(), "remote sleep {pid} survived its client");
    // The pooled connection survives an abandoned request.
    assert_success(&exec(&agent, &["foo.acme", "true"]), "exec after the kill");
    assert_eq!(agent.dials(), 1);
}

#[test]
fn rsync_and_git_with_malai_ssh_go_through_the_agent() {
    let c = acme();
    let agent = Agent::start(c.machine("alice"), &[]);
    let mut ssh = String::from("env -u RUST_LOG");
    for (k, v) in c
        .machine("alice")
        .env()
        .into_iter()
        .chain(agent.exports.clone())
    {
        ssh.push_str(&format!(" {k}={v}"));
    }
    ssh.push_str(&format!(" {MALAI} ssh"));

    // rsync -e: both directions, a tree with a binary file.
    let src = c.scratch("tree-src");
    fs::create_dir_all(src.join("a/b")).unwrap();
    fs::write(src.join("top.txt"), "top\n").unwrap();
    write_random_file(&src.join("a/b/blob.bin"), 3 << 20, 11);
    let remote = c.dir().join("tree-remote");
    let back = c.dir().join("tree-back");
    for (from, to) in [
        (
            format!("{}/", src.display()),
            format!("foo.acme:{}/", remote.display()),
        ),
        (
            format!("foo.acme:{}/", remote.display()),
            format!("{}/", back.display()),
        ),
    ] {
        let out = run_cmd(
            Command::new("rsync")
                .env_remove("RUST_LOG")
                .args(["-a", "-e", &ssh, &from, &to]),
        );
        assert_success(&out, &format!("rsync -e 'malai ssh' {from} {to}"));
    }
    assert_eq!(tree_listing(&back), tree_listing(&src));

    // GIT_SSH_COMMAND: clone an empty bare repo, commit, push, clone again.
    let bare = c.dir().join("srv/repo.git");
    fs::create_dir_all(&bare).unwrap();
    assert_success(
        &run_cmd(
            git_command(c.dir())
                .args(["init", "--bare", "-q", "-b", "main"])
                .arg(&bare),
        ),
        "git init --bare",
    );
    let url = format!("foo.acme:{}", bare.display());
    let git = |cwd: &Path, args: &[&str]| {
        run_cmd(
            git_command(cwd)
                .env("GIT_SSH_COMMAND", &ssh)
                .args(["-c", "user.name=t", "-c", "user.email=t@e"])
                .args(args),
        )
    };
    assert_success(&git(c.dir(), &["clone", "-q", &url, "work"]), "git clone");
    let work = c.dir().join("work");
    fs::write(work.join("f.txt"), "through the agent\n").unwrap();
    assert_success(&git(&work, &["add", "f.txt"]), "git add");
    assert_success(&git(&work, &["commit", "-q", "-m", "m"]), "git commit");
    assert_success(
        &git(&work, &["push", "-q", "origin", "HEAD:main"]),
        "git push",
    );
    assert_success(
        &git(c.dir(), &["clone", "-q", &url, "again"]),
        "git clone again",
    );
    assert_eq!(
        fs::read_to_string(c.dir().join("again/f.txt")).unwrap(),
        "through the agent\n"
    );
    assert_eq!(
        agent.dials(),
        1,
        "rsync and git reused the agent's connection"
    );
}

#[test]
fn a_socket_planted_in_a_shared_directory_gets_nothing() {
    let c = acme();
    // Someone else's "agent": a listener in a world-writable directory.
    let shared = c.dir().join("shared");
    fs::create_dir_all(&shared).unwrap();
    fs::set_permissions(&shared, fs::Permissions::from_mode(0o1777)).unwrap();
    let sock = shared.join("agent.sock");
    let fake = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    fake.set_nonblocking(true).unwrap();
    let host = c.host("foo");
    let mut cmd = c.machine("alice").cmd(["ssh", &host, "echo", "direct"]);
    cmd.env("MALAI_SSH_AGENT", &sock);
    let out = run_cmd(&mut cmd);
    // Allowed twin: the command still runs (directly); the user is told why.
    assert_success(&out, "exec with MALAI_SSH_AGENT in a shared dir");
    assert_eq!(stdout_of(&out), "direct\n");
    assert!(
        stderr_of(&out).contains("not trusted") && stderr_of(&out).contains("writable by others"),
        "{}",
        fmt_output(&out)
    );
    // Deny: the planted socket never saw a connection (so no stdio or tty fds).
    assert!(
        matches!(fake.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the CLI connected to a socket in a shared directory"
    );
    // Under lockdown it is a clear error instead.
    let mut cmd = c.machine("alice").cmd(["ssh", &host, "echo", "direct"]);
    cmd.env("MALAI_SSH_AGENT", &sock)
        .env("MALAI_LOCKDOWN_MODE", "true");
    let out = run_cmd(&mut cmd);
    assert_exit_code(&out, 255, "lockdown with an untrusted agent socket");
    assert!(
        stderr_of(&out).contains("not trusted"),
        "{}",
        fmt_output(&out)
    );
    assert!(matches!(fake.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock));
}
