//! Reusable end-to-end harness: real `sshd`, simulated malai machines (one `MALAI_HOME` each),
//! `malai ssh server` processes and a `TestCluster` built through the CLI like a user would.
//!
//! Rules every helper follows, so tests can run in parallel threads of one binary:
//! - everything a test creates lives under one `tempfile::TempDir` (owned by `TestCluster`, or
//!   by the test itself when it uses the pieces directly);
//! - loopback only, ports picked per test (`free_tcp_port`, `free_udp_port`);
//! - every child runs under a watchdog (`CHILD_TIMEOUT`) in its own process group, so a hang
//!   fails the test instead of hanging CI, and long-lived children (`Sshd`, `ServerProcess`)
//!   are killed and reaped on `Drop`;
//! - readiness is polled (log lines, process state), never assumed after a sleep.
//!
//! `MALAI_E2E_KEEP=1` keeps a failed test's directory (`always`: every test's) and prints
//! its path.

#![allow(dead_code)] // Helpers for later issues; not every test binary uses every one.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

/// The binary under test.
pub const MALAI: &str = env!("CARGO_BIN_EXE_malai");
/// Upper bound for any one child command (ssh, scp, rsync, git, a malai CLI call).
pub const CHILD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `malai ssh server` may take to print `server ready`.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERM'd process may take before it gets SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// Where the tests expect OpenSSH's server.
pub const SSHD: &str = "/usr/sbin/sshd";

const POLL: Duration = Duration::from_millis(20);

/// Serializes the load tests (hundreds of transfers, 1,000 execs) with the tests that
/// measure how fast a client notices a killed server. Running both at once on 2 cores stalls
/// the QUIC timers behind CPU starvation and measures the machine, not malai; every other
/// test still runs in parallel. Hold the guard for the whole test.
pub fn heavy_lock() -> std::sync::MutexGuard<'static, ()> {
    static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A failed (panicked) holder poisons it; the next test must still run.
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// Ports, ids, small utilities
// ---------------------------------------------------------------------------------------------

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0/tcp");
    l.local_addr().expect("local_addr").port()
}

/// A UDP port on 127.0.0.1 that was free a moment ago (for `malai ssh server --bind`).
pub fn free_udp_port() -> u16 {
    let s = UdpSocket::bind("127.0.0.1:0").expect("bind 127.0.0.1:0/udp");
    s.local_addr().expect("local_addr").port()
}

/// Panics unless `s` looks like an id52 (52 chars of BASE32_DNSSEC: `0-9a-v`).
pub fn assert_id52(s: &str, what: &str) {
    let ok = s.len() == 52
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'v').contains(&b));
    assert!(
        ok,
        "{what}: expected an id52 (52 chars of 0-9a-v), got {s:?}"
    );
}

/// `stdout`, `stderr` and status of an `Output`, for assertion messages.
pub fn fmt_output(out: &Output) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Lossy UTF-8 stdout.
pub fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Lossy UTF-8 stderr.
pub fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Panics with the whole output unless the command exited 0.
pub fn assert_success(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed\n{}", fmt_output(out));
}

/// Panics unless the command exited with `code`.
pub fn assert_exit_code(out: &Output, code: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: expected exit {code}\n{}",
        fmt_output(out)
    );
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(POLL);
    }
}

/// Reads a file that may not exist yet (lossy UTF-8).
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `n` lines of `text` (for failure dumps).
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn signal_pid(pid: u32, sig: Signal) {
    let _ = signal::kill(Pid::from_raw(pid as i32), sig);
}

fn signal_group(pgid: u32, sig: Signal) {
    let _ = signal::killpg(Pid::from_raw(pgid as i32), sig);
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&shell_quote(a));
    }
    s
}

fn shell_quote(a: &OsStr) -> String {
    let a = a.to_string_lossy();
    if !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@%+,".contains(&b))
    {
        a.into_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// `program`, or `ip netns exec <netns> program` (which execs it: the child's pid is
/// `program`'s own, so kill-on-drop still reaches it).
pub fn in_netns(netns: Option<&str>, program: &str) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, program]);
            c
        }
        None => Command::new(program),
    }
}

/// Path to a program, panicking with a clear message if it is missing.
pub fn require_program(name: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` not found in PATH: install Debian package `{package}` (`bash .ci/run` does it)"
    );
}

/// Panics with a clear message unless sshd tests can run here (root + OpenSSH server).
pub fn require_sshd() {
    assert!(
        Path::new(SSHD).is_file(),
        "{SSHD} is missing: the end-to-end tests need OpenSSH's server \
         (apt-get install openssh-server, or run `bash .ci/run`)"
    );
    assert!(
        nix::unistd::geteuid().is_root(),
        "the end-to-end tests start a real sshd that logs in as root: run them as root \
         (e.g. in the CI container via `bash .ci/run`)"
    );
    require_program("ssh", "openssh-client");
    require_program("ssh-keygen", "openssh-client");
}

// ---------------------------------------------------------------------------------------------
// Running a child with a watchdog
// ---------------------------------------------------------------------------------------------

fn pipe_reader<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

/// Runs `cmd` to completion with stdin from /dev/null, capturing stdout and stderr, killing its
/// whole process group after `CHILD_TIMEOUT`.
pub fn run_cmd(cmd: &mut Command) -> Output {
    run_cmd_with(cmd, None, CHILD_TIMEOUT)
}

/// Like `run_cmd`, with optional stdin bytes and a custom timeout. Panics on timeout, with
/// whatever output the command produced.
pub fn run_cmd_with(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let what = describe(cmd);
    cmd.process_group(0)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
    let pgid = child.id();
    if let Some(data) = stdin {
        let mut w = child.stdin.take().expect("piped stdin");
        let data = data.to_vec();
        // Detached: finishes when the data is written or the reader goes away (EPIPE).
        thread::spawn(move || {
            let _ = w.write_all(&data);
        });
    }
    let out_rx = pipe_reader(child.stdout.take().expect("piped stdout"));
    let err_rx = pipe_reader(child.stderr.take().expect("piped stderr"));

    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            break Some(s);
        }
        if Instant::now() >= deadline {
            break None;
        }
        thread::sleep(Duration::from_millis(10));
    };
    let Some(status) = status else {
        signal_group(pgid, Signal::SIGKILL);
        let _ = child.wait();
        let out = out_rx.recv_timeout(TERM_GRACE).unwrap_or_default();
        let err = err_rx.recv_timeout(TERM_GRACE).unwrap_or_default();
        panic!(
            "timed out after {timeout:?} (killed): {what}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&out),
            String::from_utf8_lossy(&err)
        );
    };
    // The pipes close when every holder has exited. Something that outlives the child (e.g. a
    // ProxyCommand ssh left behind) gets a grace period, then the group is killed; the group
    // id cannot have been reused while such a member is alive.
    let grace = Instant::now() + TERM_GRACE;
    let collect = |rx: &mpsc::Receiver<Vec<u8>>, name: &str| -> Vec<u8> {
        let left = grace.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) => v,
            Err(_) => {
                eprintln!(
                    "harness: {name} of `{what}` still open {TERM_GRACE:?} after it exited; \
                     killing its process group"
                );
                signal_group(pgid, Signal::SIGKILL);
                rx.recv_timeout(TERM_GRACE).unwrap_or_default()
            }
        }
    };
    let stdout = collect(&out_rx, "stdout");
    let stderr = collect(&err_rx, "stderr");
    Output {
        status,
        stdout,
        stderr,
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL the process group and reap. Returns the status.
fn terminate(child: &mut Child, grace: Duration) -> ExitStatus {
    if let Ok(Some(s)) = child.try_wait() {
        return s;
    }
    signal_pid(child.id(), Signal::SIGTERM);
    if let Some(s) = poll_until(grace, || child.try_wait().ok().flatten()) {
        return s;
    }
    signal_group(child.id(), Signal::SIGKILL);
    child.wait().expect("wait after SIGKILL")
}

// ---------------------------------------------------------------------------------------------
// sshd
// ---------------------------------------------------------------------------------------------

/// A real OpenSSH server on 127.0.0.1:<free port>, with its own host key, config,
/// `authorized_keys` and a client key allowed to log in as root. Killed on drop.
pub struct Sshd {
    dir: PathBuf,
    port: u16,
    child: Child,
    log_path: PathBuf,
    client_key: PathBuf,
    authorized_keys: PathBuf,
}

impl Sshd {
    /// Starts sshd with everything under `dir` (created). Panics with a clear message if sshd
    /// is missing, we are not root, the config is invalid or it does not come up.
    pub fn start(dir: &Path) -> Sshd {
        Sshd::start_with(dir, None, "127.0.0.1")
    }

    /// Like `start`, but sshd runs inside network namespace `netns` (`ip netns exec`) and
    /// listens on that namespace's 127.0.0.1 (its `lo` must be up, as `netsim` leaves it).
    pub fn start_in_netns(dir: &Path, netns: &str) -> Sshd {
        Sshd::start_with(dir, Some(netns), "127.0.0.1")
    }

    /// Like `start_in_netns`, listening on every address of the namespace (`0.0.0.0`), for
    /// plain OpenSSH from another namespace (benchmarks' baseline). Never outside a namespace.
    pub fn start_in_netns_on_all_addresses(dir: &Path, netns: &str) -> Sshd {
        Sshd::start_with(dir, Some(netns), "0.0.0.0")
    }

    fn start_with(dir: &Path, netns: Option<&str>, listen: &str) -> Sshd {
        require_sshd();
        fs::create_dir_all(dir).expect("create sshd dir");
        fs::create_dir_all("/run/sshd").expect("mkdir -p /run/sshd (privilege separation dir)");
        let host_key = dir.join("ssh_host_ed25519_key");
        let client_key = dir.join("client_ed25519");
        keygen(&host_key);
        keygen(&client_key);
        let authorized_keys = dir.join("authorized_keys");
        let pubkey = fs::read_to_string(client_key.with_extension("pub")).expect("client pubkey");
        fs::write(&authorized_keys, pubkey).expect("write authorized_keys");
        let config = dir.join("sshd_config");

        let mut last_log = String::new();
        for attempt in 1..=5 {
            let port = free_tcp_port();
            fs::write(
                &config,
                format!(
                    "Port {port}\n\
                     ListenAddress {listen}\n\
                     HostKey {host_key}\n\
                     PidFile {pid}\n\
                     AuthorizedKeysFile {ak}\n\
                     UsePAM no\n\
                     StrictModes no\n\
                     PasswordAuthentication no\n\
                     KbdInteractiveAuthentication no\n\
                     PubkeyAuthentication yes\n\
                     PermitRootLogin prohibit-password\n\
                     Subsystem sftp internal-sftp\n\
                     LogLevel VERBOSE\n\
                     AcceptEnv LANG LC_*\n",
                    host_key = host_key.display(),
                    pid = dir.join("sshd.pid").display(),
                    ak = authorized_keys.display(),
                ),
            )
            .expect("write sshd_config");
            let check = run_cmd(Command::new(SSHD).arg("-t").arg("-f").arg(&config));
            assert!(
                check.status.success(),
                "sshd -t rejected {}:\n{}",
                config.display(),
                fmt_output(&check)
            );

            let log_path = dir.join(format!("sshd.{attempt}.log"));
            let log = fs::File::create(&log_path).expect("create sshd log");
            let mut child = in_netns(netns, SSHD)
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {SSHD}: {e}"));
            // `Server listening on` is logged right after listen(): polling the log instead of
            // connecting keeps the log free of probe connections ("Connection from").
            let ready = poll_until(Duration::from_secs(15), || {
                if read_lossy(&log_path).contains("Server listening on") {
                    return Some(true);
                }
                match child.try_wait() {
                    Ok(Some(_)) => Some(false),
                    _ => None,
                }
            });
            if ready == Some(true) {
                return Sshd {
                    dir: dir.to_path_buf(),
                    port,
                    child,
                    log_path,
                    client_key,
                    authorized_keys,
                };
            }
            terminate(&mut child, TERM_GRACE);
            last_log = read_lossy(&log_path);
            if !last_log.contains("Address already in use") {
                break;
            }
        }
        panic!(
            "sshd did not start (config {}):\n{last_log}",
            config.display()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>`, the value for a cluster file's `ssh = ...`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Private key (ed25519, no passphrase) that may log in as root.
    pub fn client_key(&self) -> &Path {
        &self.client_key
    }

    /// The client key's public line (`ssh-ed25519 AAAA… comment`).
    pub fn client_pubkey(&self) -> String {
        fs::read_to_string(self.client_key.with_extension("pub"))
            .expect("client pubkey")
            .trim()
            .to_string()
    }

    /// Appends a line to `authorized_keys` (e.g. `command="…",restrict ssh-ed25519 …`).
    /// sshd reads the file on every login, so no restart is needed.
    pub fn add_authorized_key_line(&self, line: &str) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&self.authorized_keys)
            .expect("open authorized_keys");
        writeln!(f, "{}", line.trim_end()).expect("append authorized_keys");
    }

    /// Replaces `authorized_keys` entirely.
    pub fn set_authorized_keys(&self, text: &str) {
        fs::write(&self.authorized_keys, text).expect("write authorized_keys");
    }

    /// Generates another client key pair in the sshd dir; returns the private key path.
    pub fn new_client_key(&self, name: &str) -> PathBuf {
        let key = self.dir.join(name);
        keygen(&key);
        key
    }

    /// Everything sshd logged so far (LogLevel VERBOSE, one "Connection from" per connection).
    pub fn log(&self) -> String {
        read_lossy(&self.log_path)
    }

    /// How many TCP connections sshd has seen.
    pub fn connection_count(&self) -> usize {
        self.log().matches("Connection from").count()
    }

    /// `ssh` straight to this sshd (no malai), as root with the client key; append the
    /// remote command.
    pub fn direct_ssh(&self) -> Command {
        self.direct_ssh_with_key(&self.client_key)
    }

    /// Like `direct_ssh`, authenticating with `key` only.
    pub fn direct_ssh_with_key(&self, key: &Path) -> Command {
        let mut c = Command::new("ssh");
        c.env_remove("RUST_LOG")
            .arg("-F")
            .arg("/dev/null")
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-i")
            .arg(key)
            .args(["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"])
            .arg("-o")
            .arg(format!(
                "UserKnownHostsFile={}",
                self.dir.join("direct_known_hosts").display()
            ))
            .args([
                "-o",
                "StrictHostKeyChecking=accept-new",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg("root@127.0.0.1");
        c
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        terminate(&mut self.child, TERM_GRACE);
    }
}

fn keygen(path: &Path) {
    let out = run_cmd(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "malai-e2e", "-f"])
            .arg(path),
    );
    assert_success(&out, "ssh-keygen");
}

// ---------------------------------------------------------------------------------------------
// Machines and servers
// ---------------------------------------------------------------------------------------------

/// One simulated malai machine: its own `MALAI_HOME`.
#[derive(Debug, Clone)]
pub struct Machine {
    name: String,
    home: PathBuf,
    /// Network namespace every command of this machine runs in (`ip netns exec`), if any.
    netns: Option<String>,
    /// Environment overrides on top of `env()`'s defaults (e.g. `MALAI_RELAY`).
    env_overrides: Vec<(String, String)>,
    /// Variables removed from `env()` and from the inherited environment.
    env_removed: Vec<String>,
}

impl Machine {
    /// A machine whose `MALAI_HOME` is `<root>/<name>` (created).
    pub fn new(root: &Path, name: &str) -> Machine {
        let home = root.join(name);
        fs::create_dir_all(&home).expect("create MALAI_HOME");
        Machine {
            name: name.to_string(),
            home,
            netns: None,
            env_overrides: Vec::new(),
            env_removed: Vec::new(),
        }
    }

    /// This machine with every command (`malai`, the ProxyCommand, servers) run inside
    /// network namespace `netns` (see `netsim`).
    pub fn in_netns(mut self, netns: &str) -> Machine {
        self.netns = Some(netns.to_string());
        self
    }

    /// The network namespace this machine's commands run in, if any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Sets (or replaces) one variable of `env()` for every later command of this machine.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env_removed.retain(|k| k != key);
        self.env_overrides.retain(|(k, _)| k != key);
        self.env_overrides
            .push((key.to_string(), value.to_string()));
    }

    /// Removes one variable (a default of `env()` such as `MALAI_RELAY`, or an inherited
    /// one) from every later command of this machine.
    pub fn unset_env(&mut self, key: &str) {
        self.env_overrides.retain(|(k, _)| k != key);
        self.env_removed.push(key.to_string());
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The environment every malai process of this machine gets (besides removing
    /// `RUST_LOG`, `MALAI_SSH_AGENT` and `MALAI_LOCKDOWN_MODE`).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = vec![
            ("MALAI_HOME".into(), self.home.display().to_string()),
            ("MALAI_RELAY".into(), "disabled".into()),
            // Loopback tests stay on loopback by saying so (no production default does).
            ("MALAI_BIND".into(), "127.0.0.1:0".into()),
            ("MALAI_USE_KEYRING".into(), "false".into()),
            ("RUST_BACKTRACE".into(), "1".into()),
        ];
        for (k, v) in &self.env_overrides {
            env.retain(|(kk, _)| kk != k);
            env.push((k.clone(), v.clone()));
        }
        env.retain(|(k, _)| !self.env_removed.contains(k));
        env
    }

    /// `env -u … K=V … malai`: the prefix for a ProxyCommand (OpenSSH `exec`s it, so plain
    /// `K=V cmd` would not work).
    pub fn env_command_prefix(&self) -> String {
        let mut s = match &self.netns {
            Some(ns) => format!("ip netns exec {ns} "),
            None => String::new(),
        };
        s.push_str("env -u RUST_LOG -u MALAI_SSH_AGENT -u MALAI_LOCKDOWN_MODE");
        for k in &self.env_removed {
            s.push_str(&format!(" -u {k}"));
        }
        for (k, v) in self.env() {
            s.push_str(&format!(" {k}={v}"));
        }
        s.push(' ');
        s.push_str(MALAI);
        s
    }

    /// `malai <args>` as this machine.
    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = in_netns(self.netns.as_deref(), MALAI);
        c.args(args)
            .env_remove("RUST_LOG")
            .env_remove("MALAI_SSH_AGENT")
            .env_remove("MALAI_LOCKDOWN_MODE")
            .envs(self.env());
        for k in &self.env_removed {
            c.env_remove(k);
        }
        c
    }

    /// Runs `malai <args>` (stdin /dev/null, watchdog) and returns its output.
    pub fn run<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        run_cmd(&mut self.cmd(args))
    }

    /// Runs `malai <args>`, panics with stdout+stderr unless it exits 0; returns trimmed stdout.
    pub fn run_ok<I, S>(&self, args: I) -> String
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.cmd(args);
        let what = format!("[{}] {}", self.name, describe(&c));
        let out = run_cmd(&mut c);
        assert_success(&out, &what);
        stdout_of(&out).trim().to_string()
    }

    /// `DATADIR/ssh/clusters/<alias>/cluster-manager.toml` of this machine.
    pub fn cluster_file(&self, alias: &str) -> PathBuf {
        self.home
            .join("ssh")
            .join("clusters")
            .join(alias)
            .join("cluster-manager.toml")
    }

    /// Everything under `$MALAI_HOME/logs` (for failure dumps).
    pub fn logs(&self) -> String {
        let mut s = String::new();
        collect_files(&self.home.join("logs"), &mut s);
        s
    }

    /// `malai ssh server --bind <bind>`, waiting for `server ready`.
    pub fn spawn_server(&self, bind: SocketAddr) -> ServerProcess {
        ServerProcess::spawn(self, &["--bind".to_string(), bind.to_string()])
    }

    /// `malai ssh server <extra args>`, waiting for `server ready`.
    pub fn spawn_server_with_args(&self, args: &[String]) -> ServerProcess {
        ServerProcess::spawn(self, args)
    }
}

fn collect_files(dir: &Path, out: &mut String) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            collect_files(&p, out);
        } else {
            out.push_str(&format!(
                "=== {} ===\n{}\n",
                p.display(),
                tail(&read_lossy(&p), 200)
            ));
        }
    }
}

/// A running `malai ssh server`; stderr is teed into `<home>/server.stderr`. Killed (SIGTERM,
/// SIGKILL after 5 s) and reaped on drop.
pub struct ServerProcess {
    name: String,
    child: Option<Child>,
    pid: u32,
    stderr_path: PathBuf,
    exit: Option<ExitStatus>,
}

impl ServerProcess {
    fn spawn(machine: &Machine, extra: &[String]) -> ServerProcess {
        let stderr_path = machine.home.join("server.stderr");
        let stdout_path = machine.home.join("server.stdout");
        let stdout = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stdout_path)
            .expect("open server.stdout");
        let mut tee = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .expect("open server.stderr");
        let mut cmd = machine.cmd(["ssh", "server"]);
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .process_group(0);
        let what = describe(&cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{what}`: {e}"));
        let pid = child.id();
        let stderr = child.stderr.take().expect("piped stderr");
        let (ready_tx, ready_rx) = mpsc::channel();
        // Chunks, not lines: `server ready` is found even before its newline arrives.
        thread::spawn(move || {
            let mut r = stderr;
            let mut buf = [0u8; 8192];
            let mut seen: Vec<u8> = Vec::new();
            let mut ready_tx = Some(ready_tx);
            loop {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let _ = tee.write_all(&buf[..n]);
                        let _ = tee.flush();
                        if ready_tx.is_some() {
                            seen.extend_from_slice(&buf[..n]);
                            if String::from_utf8_lossy(&seen).contains("server ready")
                                && let Some(tx) = ready_tx.take()
                            {
                                let _ = tx.send(());
                                seen = Vec::new();
                            }
                        }
                    }
                }
            }
        });
        let mut sp = ServerProcess {
            name: machine.name.clone(),
            child: Some(child),
            pid,
            stderr_path,
            exit: None,
        };
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        loop {
            match ready_rx.recv_timeout(Duration::from_millis(100)) {
                Ok(()) => return sp,
                // stderr closed without `server ready`: the exit check below reports it.
                Err(mpsc::RecvTimeoutError::Disconnected) => thread::sleep(POLL),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            let exited = sp.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                // Let the tee thread drain what is left.
                let _ = poll_until(Duration::from_secs(1), || {
                    ready_rx
                        .try_recv()
                        .err()
                        .filter(|e| *e == mpsc::TryRecvError::Disconnected)
                });
                sp.exit = Some(status);
                panic!(
                    "[{}] `{what}` exited ({status}) before printing `server ready`:\n{}",
                    sp.name,
                    sp.stderr_log()
                );
            }
            if Instant::now() >= deadline {
                let log = sp.stderr_log();
                drop(sp);
                panic!(
                    "[{}] `{what}` did not print `server ready` within {SERVER_READY_TIMEOUT:?}:\n{log}",
                    machine.name
                );
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr_log(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => match c.try_wait() {
                Ok(Some(s)) => {
                    self.exit = Some(s);
                    self.child = None;
                    false
                }
                _ => true,
            },
            None => false,
        }
    }

    /// Sends SIGTERM and waits (up to 15 s, then SIGKILL and panic) for the exit status.
    pub fn stop_gracefully(&mut self) -> ExitStatus {
        if let Some(s) = self.exit {
            return s;
        }
        let mut child = self.child.take().expect("server child");
        signal_pid(self.pid, Signal::SIGTERM);
        match poll_until(Duration::from_secs(15), || child.try_wait().ok().flatten()) {
            Some(s) => {
                self.exit = Some(s);
                s
            }
            None => {
                signal_group(self.pid, Signal::SIGKILL);
                let _ = child.wait();
                panic!(
                    "[{}] malai ssh server did not exit within 15 s of SIGTERM:\n{}",
                    self.name,
                    self.stderr_log()
                );
            }
        }
    }

    /// Describes an exit status ("exit 0", "signal 9").
    pub fn describe_status(s: &ExitStatus) -> String {
        match (s.code(), s.signal()) {
            (Some(c), _) => format!("exit {c}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => format!("{s}"),
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            terminate(&mut c, TERM_GRACE);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster file text edits
// ---------------------------------------------------------------------------------------------

fn header_name(line: &str) -> Option<String> {
    let t = line.trim();
    if t.starts_with("[[") || !t.starts_with('[') {
        return None;
    }
    let end = t.find(']')?;
    Some(
        t[1..end]
            .split('.')
            .map(|p| p.trim().trim_matches('"').trim_matches('\''))
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// Sets `key = value` (value is raw TOML, e.g. `"\"127.0.0.1:22\""`) in table `[table]` of a
/// TOML text: replaces an existing `key = …` line of that table, else inserts right after the
/// header. Panics if the table is missing.
pub fn set_table_keys(text: &str, table: &str, kvs: &[(&str, String)]) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines
        .iter()
        .position(|l| header_name(l).as_deref() == Some(table))
        .unwrap_or_else(|| panic!("no [{table}] table in:\n{text}"));
    let end = lines[start + 1..]
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .map(|i| start + 1 + i)
        .unwrap_or(lines.len());
    let key_of = |l: &str| {
        l.split_once('=')
            .map(|(k, _)| k.trim().trim_matches('"').to_string())
    };
    let mut out: Vec<String> = Vec::with_capacity(lines.len() + kvs.len());
    out.extend(lines[..=start].iter().map(|s| s.to_string()));
    for (k, v) in kvs {
        out.push(format!("{k} = {v}"));
    }
    for l in &lines[start + 1..end] {
        let replaced = key_of(l).is_some_and(|k| kvs.iter().any(|(kk, _)| *kk == k));
        if !replaced {
            out.push(l.to_string());
        }
    }
    out.extend(lines[end..].iter().map(|s| s.to_string()));
    let mut s = out.join("\n");
    s.push('\n');
    s
}

/// A TOML basic string literal.
pub fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

// ---------------------------------------------------------------------------------------------
// TestCluster
// ---------------------------------------------------------------------------------------------

/// What a server's `ssh = …` points at.
#[derive(Debug, Clone)]
pub enum SshTarget {
    /// Start a harness `Sshd` and point `ssh` at it.
    Sshd,
    /// `ssh = "embedded"`.
    Embedded,
    /// `ssh = "<addr>"` verbatim.
    Addr(String),
    /// Leave `ssh` unset (malai's default).
    Unset,
}

/// Describes a cluster; `build()` creates it through the CLI.
pub struct ClusterBuilder {
    alias: String,
    manager: String,
    servers: Vec<(String, SshTarget)>,
    devices: Vec<String>,
    allows: Vec<(String, Vec<String>)>,
    start_servers: bool,
    groups: Vec<(String, Vec<String>)>,
    /// Machine name -> network namespace its commands (and sshd) run in.
    netns: BTreeMap<String, String>,
    /// Environment overrides for every machine (`None`: remove the variable).
    env: Vec<(String, Option<String>)>,
    /// Keys set in `[cluster-manager]` before the file is distributed.
    manager_keys: Vec<(String, String)>,
    /// Server name -> `--bind` address; `None`: no `--bind`, no `addrs` hint.
    binds: BTreeMap<String, Option<SocketAddr>>,
}

impl ClusterBuilder {
    pub fn new(alias: &str) -> ClusterBuilder {
        ClusterBuilder {
            alias: alias.to_string(),
            manager: "mgr".to_string(),
            servers: Vec::new(),
            devices: Vec::new(),
            allows: Vec::new(),
            start_servers: true,
            groups: Vec::new(),
            netns: BTreeMap::new(),
            env: Vec::new(),
            manager_keys: Vec::new(),
            binds: BTreeMap::new(),
        }
    }

    /// Runs machine `name`'s commands, server and sshd inside network namespace `netns`
    /// (`netsim`).
    pub fn netns(mut self, name: &str, netns: &str) -> Self {
        self.netns.insert(name.to_string(), netns.to_string());
        self
    }

    /// Sets `key=value` in every machine's environment (e.g. `MALAI_RELAY`).
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), Some(value.to_string())));
        self
    }

    /// Removes `key` from every machine's environment (e.g. `MALAI_RELAY`, so the cluster
    /// file's `relays` apply).
    pub fn env_remove(mut self, key: &str) -> Self {
        self.env.push((key.to_string(), None));
        self
    }

    /// Sets `key = <raw TOML value>` in the manager's `[cluster-manager]` table before the
    /// file is imported by the members (e.g. `relays`, `relay-ca`).
    pub fn manager_key(mut self, key: &str, toml_value: &str) -> Self {
        self.manager_keys
            .push((key.to_string(), toml_value.to_string()));
        self
    }

    /// Server `name` runs `malai ssh server --bind <bind>` and the cluster file gives it
    /// `addrs = [<bind>]`; `None`: no `--bind` and no `addrs` (found by id52 alone). Default:
    /// a free port on 127.0.0.1.
    pub fn server_bind(mut self, name: &str, bind: Option<SocketAddr>) -> Self {
        self.binds.insert(name.to_string(), bind);
        self
    }

    /// Name of the manager machine (default `mgr`).
    pub fn manager(mut self, name: &str) -> Self {
        self.manager = name.to_string();
        self
    }

    /// A server machine with a real sshd behind it.
    pub fn server(self, name: &str) -> Self {
        self.server_with(name, SshTarget::Sshd)
    }

    pub fn server_with(mut self, name: &str, target: SshTarget) -> Self {
        self.servers.push((name.to_string(), target));
        self
    }

    pub fn device(mut self, name: &str) -> Self {
        self.devices.push(name.to_string());
        self
    }

    /// `malai ssh cluster allow <target> <who…>` on the manager (target `foo` or `foo.ls`).
    pub fn allow(mut self, target: &str, who: &[&str]) -> Self {
        self.allows.push((
            target.to_string(),
            who.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }

    /// A `[group.<name>]` table with these members, written into the manager's file by hand
    /// (there is no CLI for groups).
    pub fn group(mut self, name: &str, members: &[&str]) -> Self {
        self.groups.push((
            name.to_string(),
            members.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }

    /// Whether `build()` starts `malai ssh server` on every server (default true).
    pub fn start_servers(mut self, yes: bool) -> Self {
        self.start_servers = yes;
        self
    }

    pub fn build(self) -> TestCluster {
        let root = tempfile::Builder::new()
            .prefix("malai-e2e-")
            .tempdir()
            .expect("create test dir");
        let alias = self.alias.clone();
        let place = |m: Machine| -> Machine {
            let mut m = match self.netns.get(m.name()) {
                Some(ns) => m.in_netns(ns),
                None => m,
            };
            for (k, v) in &self.env {
                match v {
                    Some(v) => m.set_env(k, v),
                    None => m.unset_env(k),
                }
            }
            m
        };
        let manager = place(Machine::new(root.path(), &self.manager));
        let mgr_id = manager.run_ok(["ssh", "cluster", "init", &alias]);
        assert_single_id52(&mgr_id, &format!("`cluster init {alias}` stdout"));

        let mut c = TestCluster {
            alias: alias.clone(),
            servers: BTreeMap::new(),
            machines: BTreeMap::new(),
            id52s: BTreeMap::new(),
            manager: self.manager.clone(),
            root: Some(root),
        };
        c.id52s.insert(self.manager.clone(), mgr_id.clone());
        c.machines.insert(self.manager.clone(), manager);

        let members: Vec<(&str, bool)> = self
            .servers
            .iter()
            .map(|(n, _)| (n.as_str(), true))
            .chain(self.devices.iter().map(|n| (n.as_str(), false)))
            .collect();
        for (name, _) in &members {
            let m = place(Machine::new(c.dir(), name));
            let id = m.run_ok(["ssh", "cluster", "join", &alias, &mgr_id]);
            assert_single_id52(&id, &format!("[{name}] `cluster join` stdout"));
            c.id52s.insert(name.to_string(), id);
            c.machines.insert(name.to_string(), m);
        }
        for (name, is_server) in &members {
            let kind = if *is_server { "server" } else { "device" };
            let id = c.id52(name).to_string();
            c.manager()
                .run_ok(["ssh", "cluster", "add", kind, name, id.as_str()]);
        }
        for (target, who) in &self.allows {
            let mut args = vec!["ssh", "cluster", "allow", target.as_str()];
            args.extend(who.iter().map(String::as_str));
            c.manager().run_ok(args);
        }
        if !self.manager_keys.is_empty() {
            let kvs: Vec<(&str, String)> = self
                .manager_keys
                .iter()
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            c.edit_manager_file(|t| set_table_keys(&t, "cluster-manager", &kvs));
        }
        for (name, target) in &self.servers {
            let bind: Option<SocketAddr> = match self.binds.get(name) {
                Some(b) => *b,
                None => Some(
                    format!("127.0.0.1:{}", free_udp_port())
                        .parse()
                        .expect("addr"),
                ),
            };
            let sshd = match target {
                SshTarget::Sshd => {
                    let dir = c.dir().join(format!("sshd-{name}"));
                    Some(match self.netns.get(name) {
                        Some(ns) => Sshd::start_in_netns(&dir, ns),
                        None => Sshd::start(&dir),
                    })
                }
                _ => None,
            };
            let ssh_value = match target {
                SshTarget::Sshd => Some(sshd.as_ref().expect("sshd").addr()),
                SshTarget::Embedded => Some("embedded".to_string()),
                SshTarget::Addr(a) => Some(a.clone()),
                SshTarget::Unset => None,
            };
            let mut kvs = Vec::new();
            if let Some(bind) = bind {
                kvs.push(("addrs", format!("[{}]", toml_str(&bind.to_string()))));
            }
            if let Some(v) = ssh_value {
                kvs.push(("ssh", toml_str(&v)));
            }
            let table = format!("server.{name}");
            c.edit_manager_file(|t| set_table_keys(&t, &table, &kvs));
            c.servers.insert(
                name.clone(),
                ServerEntry {
                    process: None,
                    sshd,
                    bind,
                },
            );
        }
        for (name, members) in &self.groups {
            let table = format!(
                "\n[group.{name}]\nmembers = {}\n",
                toml_str(&members.join(", "))
            );
            c.edit_manager_file(|t| t + &table);
        }
        c.distribute();
        if self.start_servers {
            let names: Vec<String> = c.servers.keys().cloned().collect();
            for n in names {
                c.start_server(&n);
            }
        }
        c
    }
}

fn assert_single_id52(stdout: &str, what: &str) {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: expected exactly one line, got {stdout:?}"
    );
    assert_id52(lines[0].trim(), what);
}

struct ServerEntry {
    // Field order is drop order: the malai server goes before the sshd behind it.
    process: Option<ServerProcess>,
    sshd: Option<Sshd>,
    bind: Option<SocketAddr>,
}

/// A cluster of simulated machines, all under one temp dir, created through the CLI.
pub struct TestCluster {
    pub alias: String,
    servers: BTreeMap<String, ServerEntry>,
    machines: BTreeMap<String, Machine>,
    id52s: BTreeMap<String, String>,
    manager: String,
    // Last: removed after every process above is gone.
    root: Option<tempfile::TempDir>,
}

impl TestCluster {
    pub fn builder(alias: &str) -> ClusterBuilder {
        ClusterBuilder::new(alias)
    }

    /// The test's root directory (use it for scratch files too).
    pub fn dir(&self) -> &Path {
        self.root.as_ref().expect("root").path()
    }

    /// A fresh directory `<root>/<name>` (created).
    pub fn scratch(&self, name: &str) -> PathBuf {
        let p = self.dir().join(name);
        fs::create_dir_all(&p).expect("create scratch dir");
        p
    }

    pub fn machine(&self, name: &str) -> &Machine {
        self.machines
            .get(name)
            .unwrap_or_else(|| panic!("no machine {name:?} in this cluster"))
    }

    pub fn manager(&self) -> &Machine {
        self.machine(&self.manager)
    }

    /// Mutable access, e.g. to change one machine's environment mid-test.
    pub fn machine_mut(&mut self, name: &str) -> &mut Machine {
        self.machines
            .get_mut(name)
            .unwrap_or_else(|| panic!("no machine {name:?} in this cluster"))
    }

    pub fn id52(&self, name: &str) -> &str {
        self.id52s
            .get(name)
            .unwrap_or_else(|| panic!("no machine {name:?} in this cluster"))
    }

    /// `foo` → `foo.<alias>`.
    pub fn host(&self, name: &str) -> String {
        format!("{name}.{}", self.alias)
    }

    fn entry(&self, server: &str) -> &ServerEntry {
        self.servers
            .get(server)
            .unwrap_or_else(|| panic!("no server {server:?} in this cluster"))
    }

    fn entry_mut(&mut self, server: &str) -> &mut ServerEntry {
        self.servers
            .get_mut(server)
            .unwrap_or_else(|| panic!("no server {server:?} in this cluster"))
    }

    /// The sshd behind `server` (panics if it has none).
    pub fn sshd(&self, server: &str) -> &Sshd {
        self.entry(server)
            .sshd
            .as_ref()
            .unwrap_or_else(|| panic!("server {server:?} has no harness sshd"))
    }

    /// The UDP address `server`'s malai listens on (panics if it was started without
    /// `--bind`).
    pub fn server_bind(&self, server: &str) -> SocketAddr {
        self.entry(server)
            .bind
            .unwrap_or_else(|| panic!("server {server:?} has no --bind address"))
    }

    /// The running `malai ssh server` of `server`.
    pub fn server_process(&mut self, server: &str) -> &mut ServerProcess {
        self.entry_mut(server)
            .process
            .as_mut()
            .unwrap_or_else(|| panic!("malai ssh server of {server:?} is not running"))
    }

    /// Starts `malai ssh server --bind <its addr>` on `server` (waits for `server ready`).
    pub fn start_server(&mut self, server: &str) {
        let p = match self.entry(server).bind {
            Some(bind) => self.machine(server).spawn_server(bind),
            None => self.machine(server).spawn_server_with_args(&[]),
        };
        self.entry_mut(server).process = Some(p);
    }

    /// SIGTERMs `server`'s malai server and returns its exit status.
    pub fn stop_server(&mut self, server: &str) -> ExitStatus {
        let mut p = self
            .entry_mut(server)
            .process
            .take()
            .unwrap_or_else(|| panic!("malai ssh server of {server:?} is not running"));
        p.stop_gracefully()
    }

    /// The manager's own cluster file.
    pub fn manager_file(&self) -> PathBuf {
        self.manager().cluster_file(&self.alias)
    }

    /// Rewrites the manager's cluster file with `f(old text)`.
    pub fn edit_manager_file(&self, f: impl FnOnce(String) -> String) {
        let path = self.manager_file();
        let old =
            fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        fs::write(&path, f(old)).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }

    /// `malai ssh cluster import <alias> <manager file>` on `member`.
    pub fn import_on(&self, member: &str) {
        let file = self.manager_file();
        self.machine(member).run_ok([
            OsStr::new("ssh"),
            OsStr::new("cluster"),
            OsStr::new("import"),
            OsStr::new(&self.alias),
            file.as_os_str(),
        ]);
    }

    /// Imports the manager's file on every member.
    pub fn distribute(&self) {
        for name in self.machines.keys() {
            if *name != self.manager {
                self.import_on(name);
            }
        }
    }

    /// Writes (and returns) an ssh_config that reaches `*.<alias>` as `device` through
    /// `malai ssh proxy`, logging in as root with every harness sshd's client key.
    pub fn ssh_config(&self, device: &str) -> PathBuf {
        let m = self.machine(device);
        let path = self.dir().join(format!("ssh_config-{device}"));
        let mut s = format!(
            "Host *.{alias}\n  ProxyCommand {proxy} ssh proxy %h %p\n  User root\n",
            alias = self.alias,
            proxy = m.env_command_prefix(),
        );
        for e in self.servers.values() {
            if let Some(sshd) = &e.sshd {
                s.push_str(&format!("  IdentityFile {}\n", sshd.client_key().display()));
            }
        }
        s.push_str(&format!(
            "  IdentitiesOnly yes\n  BatchMode yes\n  UserKnownHostsFile {kh}\n  \
             StrictHostKeyChecking accept-new\n  LogLevel ERROR\n",
            kh = self.dir().join(format!("known_hosts-{device}")).display()
        ));
        write_atomic(&path, s.as_bytes());
        path
    }

    /// `ssh -F <cfg of device>` with a clean environment, no further args.
    pub fn ssh_cmd(&self, device: &str) -> Command {
        let cfg = self.ssh_config(device);
        let mut c = Command::new("ssh");
        c.env_remove("RUST_LOG").arg("-F").arg(cfg);
        c
    }

    /// `ssh -F <cfg> <host> <remote command>` as `device`.
    pub fn ssh(&self, device: &str, host: &str, remote_cmd: &str) -> Output {
        run_cmd(self.ssh_cmd(device).arg(host).arg(remote_cmd))
    }

    /// `scp -F <cfg> <args…>` as `device`.
    pub fn scp<S: AsRef<OsStr>>(&self, device: &str, args: &[S]) -> Output {
        self.scp_within(device, args, CHILD_TIMEOUT)
    }

    /// [`TestCluster::scp`], killed after `timeout`.
    pub fn scp_within<S: AsRef<OsStr>>(
        &self,
        device: &str,
        args: &[S],
        timeout: Duration,
    ) -> Output {
        require_program("scp", "openssh-client");
        let cfg = self.ssh_config(device);
        run_cmd_with(
            Command::new("scp")
                .env_remove("RUST_LOG")
                .arg("-F")
                .arg(cfg)
                .args(args),
            None,
            timeout,
        )
    }

    /// `rsync -e "ssh -F <cfg>" <args…>` as `device`.
    pub fn rsync<S: AsRef<OsStr>>(&self, device: &str, args: &[S]) -> Output {
        self.rsync_within(device, args, CHILD_TIMEOUT)
    }

    /// [`TestCluster::rsync`], killed after `timeout`.
    pub fn rsync_within<S: AsRef<OsStr>>(
        &self,
        device: &str,
        args: &[S],
        timeout: Duration,
    ) -> Output {
        require_program("rsync", "rsync");
        let cfg = self.ssh_config(device);
        run_cmd_with(
            Command::new("rsync")
                .env_remove("RUST_LOG")
                .arg("-e")
                .arg(format!("ssh -F {}", cfg.display()))
                .args(args),
            None,
            timeout,
        )
    }

    /// `git <args…>` in `cwd` as `device`, with `GIT_SSH_COMMAND="ssh -F <cfg>"` and no
    /// user/system git config.
    pub fn git<S: AsRef<OsStr>>(&self, device: &str, cwd: &Path, args: &[S]) -> Output {
        let cfg = self.ssh_config(device);
        run_cmd(
            git_command(cwd)
                .env("GIT_SSH_COMMAND", format!("ssh -F {}", cfg.display()))
                .args(args),
        )
    }

    /// `malai ssh proxy <host>` run directly as `device` (stdin /dev/null).
    pub fn proxy(&self, device: &str, host: &str) -> Output {
        self.machine(device).run(["ssh", "proxy", host])
    }

    /// Server stderr, sshd logs and malai log files, for failure messages.
    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        for (name, e) in &self.servers {
            let log = read_lossy(&self.machine(name).home().join("server.stderr"));
            s.push_str(&format!(
                "=== [{name}] malai ssh server stderr ===\n{}\n",
                tail(&log, 200)
            ));
            if let Some(sshd) = &e.sshd {
                s.push_str(&format!(
                    "=== [{name}] sshd log ===\n{}\n",
                    tail(&sshd.log(), 100)
                ));
            }
        }
        for m in self.machines.values() {
            s.push_str(&m.logs());
        }
        s
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        let keep = std::env::var("MALAI_E2E_KEEP").unwrap_or_default();
        let failed = thread::panicking();
        if failed {
            eprintln!("{}", self.diagnostics());
        }
        if (keep == "always" || (failed && !keep.is_empty()))
            && let Some(root) = self.root.take()
        {
            eprintln!("harness: kept test dir {}", root.keep().display());
        }
        // Processes before the directory they live in.
        self.servers.clear();
    }
}

/// `git` in `cwd` with no user/system config and a fixed identity.
pub fn git_command(cwd: &Path) -> Command {
    require_program("git", "git");
    let mut c = Command::new("git");
    c.current_dir(cwd)
        .env_remove("RUST_LOG")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_AUTHOR_NAME", "e2e")
        .env("GIT_AUTHOR_EMAIL", "e2e@example.invalid")
        .env("GIT_COMMITTER_NAME", "e2e")
        .env("GIT_COMMITTER_EMAIL", "e2e@example.invalid");
    c
}

// ---------------------------------------------------------------------------------------------
// Files
// ---------------------------------------------------------------------------------------------

/// Writes `data` to `path` via a temp file + rename, so concurrent readers never see half.
pub fn write_atomic(path: &Path, data: &[u8]) {
    let tag = format!("{:?}", thread::current().id()).replace(['(', ')'], "");
    let tmp = path.with_extension(format!("tmp.{tag}"));
    fs::write(&tmp, data).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}

/// Writes `len` bytes of a seeded xorshift64* stream to `path` (fast, reproducible).
pub fn write_random_file(path: &Path, len: usize, seed: u64) {
    let mut state = seed | 1;
    let mut f = std::io::BufWriter::with_capacity(1 << 20, fs::File::create(path).expect("create"));
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        for chunk in buf[..n].chunks_mut(8) {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let v = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
        f.write_all(&buf[..n]).expect("write");
        left -= n;
    }
    f.flush().expect("flush");
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let mut f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// A sorted listing of a tree: `path kind detail` per entry (file: sha256, symlink: target,
/// dir: nothing), for comparing trees.
pub fn tree_listing(root: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let mut entries: Vec<_> = fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p.strip_prefix(root).expect("prefix").display().to_string();
            let meta = fs::symlink_metadata(&p).expect("lstat");
            if meta.file_type().is_symlink() {
                let t = fs::read_link(&p).expect("readlink");
                out.push(format!("{rel} symlink {}", t.display()));
            } else if meta.is_dir() {
                out.push(format!("{rel} dir"));
                walk(root, &p, out);
            } else {
                out.push(format!("{rel} file {}", sha256_file(&p)));
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Smoke tests of the harness itself (they need no working `malai`)
// ---------------------------------------------------------------------------------------------

mod smoke {
    use super::*;

    #[test]
    fn harness_sshd_accepts_direct_login_and_forced_commands() {
        let root = tempfile::tempdir().expect("tempdir");
        let sshd = Sshd::start(&root.path().join("sshd"));
        assert_eq!(sshd.connection_count(), 0, "{}", sshd.log());

        let out = run_cmd(sshd.direct_ssh().arg("echo hi; exit 3"));
        assert_exit_code(&out, 3, "direct ssh");
        assert_eq!(stdout_of(&out), "hi\n");
        assert_eq!(sshd.connection_count(), 1, "{}", sshd.log());

        // A second key with a forced command.
        let key = sshd.new_client_key("forced");
        let pubkey = fs::read_to_string(key.with_extension("pub")).unwrap();
        sshd.add_authorized_key_line(&format!(
            "command=\"echo forced:$SSH_ORIGINAL_COMMAND\",restrict {}",
            pubkey.trim()
        ));
        let mut cmd = sshd.direct_ssh_with_key(&key);
        cmd.arg("whatever");
        let out = run_cmd(&mut cmd);
        assert_success(&out, "ssh with forced-command key");
        assert_eq!(stdout_of(&out), "forced:whatever\n");
    }

    #[test]
    fn harness_run_cmd_kills_on_timeout() {
        let started = Instant::now();
        let r = std::panic::catch_unwind(|| {
            run_cmd_with(
                Command::new("sh").args(["-c", "echo before; sleep 60"]),
                None,
                Duration::from_millis(300),
            )
        });
        let msg = *r.expect_err("must time out").downcast::<String>().unwrap();
        assert!(msg.contains("timed out") && msg.contains("before"), "{msg}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn harness_run_cmd_feeds_stdin_and_separates_streams() {
        let out = run_cmd_with(
            Command::new("sh").args(["-c", "cat; echo err >&2; exit 4"]),
            Some(b"in\n"),
            CHILD_TIMEOUT,
        );
        assert_exit_code(&out, 4, "sh");
        assert_eq!(stdout_of(&out), "in\n");
        assert_eq!(stderr_of(&out), "err\n");
    }

    #[test]
    fn harness_set_table_keys_replaces_or_inserts() {
        let text = "[cluster-manager]\nid52 = \"m\"\n\n[server.foo]\nid52 = \"f\"\nssh = \"old\"\n\n[server.foo.ls]\nallow-from = \"bob\"\n";
        let out = set_table_keys(
            text,
            "server.foo",
            &[
                ("ssh", toml_str("127.0.0.1:2222")),
                ("addrs", "[\"127.0.0.1:1\"]".into()),
            ],
        );
        assert_eq!(
            out,
            "[cluster-manager]\nid52 = \"m\"\n\n[server.foo]\nssh = \"127.0.0.1:2222\"\naddrs = [\"127.0.0.1:1\"]\nid52 = \"f\"\n\n[server.foo.ls]\nallow-from = \"bob\"\n"
        );
    }

    #[test]
    fn harness_malai_binary_starts() {
        let root = tempfile::tempdir().expect("tempdir");
        let m = Machine::new(root.path(), "m");
        let out = m.run(["ssh", "--help"]);
        assert_success(&out, "malai ssh --help");
    }
}
