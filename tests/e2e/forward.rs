//! Port forwarding end to end (issue 13) with real OpenSSH clients through
//! `ProxyCommand malai ssh proxy`: `ssh -L` to an HTTP server on the far side fetched with
//! curl, `ssh -D` with `curl --socks5-hostname`, `ssh -R` with a connection coming back,
//! `ssh -W` as a ProxyJump hop, `-L` over unix sockets, `ssh -A` with `ssh-add -l` on the
//! remote, and the VS Code Remote-SSH shape `ssh -T -D <port> host bash` — against the
//! embedded server, and `-L`/`-D` also through a real sshd tunnel.
//!
//! The ACL twins: a command-scoped peer gets no forward of any kind (refused as OpenSSH
//! reports it, and audited), and `forwarding = false` refuses full-access peers too.
//!
//! Cluster `acme`: manager `mgr`; server `foo` (embedded, or sshd); devices `alice` (full
//! access) and `bob` (may run only `ls`).
//!
//! Everything is loopback: "the far side" is the server process's view of 127.0.0.1.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::*;
use crate::http::{HttpServer, curl};

/// How long a forward may take to come up (ssh start, key exchange, dial) on a loaded box.
const UP_WITHIN: Duration = Duration::from_secs(30);
const BODY_LEN: usize = 3 * 1024 * 1024 + 17;

fn acme(foo: SshTarget) -> TestCluster {
    TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", foo)
        .device("alice")
        .device("bob")
        .allow("foo", &["alice"])
        .allow("foo.ls", &["bob"])
        .build()
}

/// A web root with one random file; returns (dir, sha256).
fn web_root(c: &TestCluster) -> (PathBuf, String) {
    let dir = c.scratch("web");
    let f = dir.join("blob.bin");
    write_random_file(&f, BODY_LEN, 13);
    let sum = sha256_file(&f);
    (dir, sum)
}

/// A background `ssh` (a forward), killed with its process group on drop.
pub(crate) struct Bg {
    child: Child,
    err: PathBuf,
}

impl Bg {
    fn spawn(mut cmd: Command, err: PathBuf) -> Bg {
        let f = fs::File::create(&err).unwrap();
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(f);
        let child = cmd.spawn().expect("spawn ssh");
        Bg { child, err }
    }

    fn stderr(&self) -> String {
        read_lossy(&self.err)
    }

    /// SIGTERM to the process group, as a user's Ctrl-C or `kill` would (a SIGKILLed
    /// client's connection is only noticed after the transport's idle limit), then wait.
    fn stop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.wait_exit(Duration::from_secs(10));
    }

    /// Waits for the process to exit; its status code (None: still running at the deadline).
    fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        poll_until(within, || {
            self.child
                .try_wait()
                .ok()
                .flatten()
                .map(|s| s.code().unwrap_or(-1))
        })
    }
}

impl Drop for Bg {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.child.wait();
    }
}

fn wait_port(port: u16, bg: &mut Bg) {
    let up = poll_until(UP_WITHIN, || {
        if let Ok(Some(st)) = bg.child.try_wait() {
            panic!(
                "ssh exited ({st}) before the forward came up:\n{}",
                bg.stderr()
            );
        }
        TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
    });
    assert!(
        up.is_some(),
        "forward on {port} never came up:\n{}",
        bg.stderr()
    );
}

fn wait_path(path: &Path, bg: &mut Bg) {
    let up = poll_until(UP_WITHIN, || {
        if let Ok(Some(st)) = bg.child.try_wait() {
            panic!(
                "ssh exited ({st}) before the forward came up:\n{}",
                bg.stderr()
            );
        }
        UnixStream::connect(path).ok().map(|_| ())
    });
    assert!(
        up.is_some(),
        "{} never came up:\n{}",
        path.display(),
        bg.stderr()
    );
}

/// `ssh -F <cfg> -N -o ExitOnForwardFailure=yes <fwd…> foo.acme` as `device`, in the background.
fn ssh_forward(c: &TestCluster, device: &str, fwd: &[&str], tag: &str) -> Bg {
    let mut cmd = c.ssh_cmd(device);
    cmd.args(["-N", "-o", "ExitOnForwardFailure=yes"])
        .args(fwd)
        .arg(c.host("foo"));
    Bg::spawn(cmd, c.dir().join(format!("ssh-{tag}.err")))
}

/// GET http://<host>:<port>/blob.bin (optionally through a SOCKS proxy); its sha256.
fn fetch_sum(c: &TestCluster, url: &str, socks: Option<u16>, tag: &str) -> String {
    let out_file = c.dir().join(format!("got-{tag}.bin"));
    let mut args = vec!["-fo".to_string(), out_file.display().to_string()];
    if let Some(p) = socks {
        args.push("--socks5-hostname".into());
        args.push(format!("127.0.0.1:{p}"));
    }
    args.push(url.into());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let out = curl(None, &a);
    assert_success(&out, &format!("curl {tag}"));
    sha256_file(&out_file)
}

/// A short directory for unix sockets (sun_path is 108 bytes; test dirs can be longer).
pub(crate) struct SockDir(pub(crate) PathBuf);

impl SockDir {
    pub(crate) fn new(tag: &str) -> SockDir {
        let p = std::env::temp_dir().join(format!("mf-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        SockDir(p)
    }
}

impl Drop for SockDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A unix-socket server answering each line with `echo:<line>`; runs until the test ends.
fn unix_echo(path: &Path) {
    let l = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines() {
                    let Ok(line) = line else { return };
                    if writeln!(w, "echo:{line}").is_err() {
                        return;
                    }
                }
            });
        }
    });
}

fn unix_roundtrip(path: &Path, msg: &str) -> String {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    writeln!(s, "{msg}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

/// A running `ssh-agent -D` on a socket in `d`, holding one key commented
/// `forwarded-key`; returns its socket (and the agent, killed on drop).
pub(crate) fn ssh_agent_with_key(c: &TestCluster, d: &SockDir) -> (PathBuf, Bg) {
    let sock = d.0.join("agent.sock");
    let mut agent = Bg::spawn(
        {
            let mut a = Command::new("ssh-agent");
            a.arg("-D").arg("-a").arg(&sock);
            a
        },
        c.dir().join(format!(
            "{}.err",
            d.0.file_name().unwrap().to_string_lossy()
        )),
    );
    wait_path(&sock, &mut agent);
    let key = c.dir().join("agent_key");
    assert_success(
        &run_cmd(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "forwarded-key", "-f"])
                .arg(&key),
        ),
        "ssh-keygen",
    );
    let out = run_cmd(
        Command::new("ssh-add")
            .arg(&key)
            .env("SSH_AUTH_SOCK", &sock),
    );
    assert_success(&out, "ssh-add");
    (sock, agent)
}

fn audit_of(c: &TestCluster) -> String {
    read_lossy(&c.machine("foo").home().join("logs/ssh/audit.log"))
}

// ---------------------------------------------------------------------------------------------
// Embedded server
// ---------------------------------------------------------------------------------------------

#[test]
fn embedded_local_dynamic_remote_forwards_with_curl() {
    let c = acme(SshTarget::Embedded);
    let (web, sum) = web_root(&c);
    let http = HttpServer::start(&web);

    // ssh -L: the server connects to the HTTP server.
    let lport = free_tcp_port();
    let spec = format!("127.0.0.1:{lport}:127.0.0.1:{}", http.port);
    let mut bg = ssh_forward(&c, "alice", &["-L", &spec], "L");
    wait_port(lport, &mut bg);
    let url = format!("http://127.0.0.1:{lport}/blob.bin");
    assert_eq!(fetch_sum(&c, &url, None, "L"), sum, "ssh -L body");
    drop(bg);

    // ssh -D: curl's SOCKS5 with the host name resolved on the server.
    let dport = free_tcp_port();
    let mut bg = ssh_forward(&c, "alice", &["-D", &format!("127.0.0.1:{dport}")], "D");
    wait_port(dport, &mut bg);
    let url = format!("http://localhost:{}/blob.bin", http.port);
    assert_eq!(fetch_sum(&c, &url, Some(dport), "D"), sum, "ssh -D body");
    // A closed port on the far side: curl reports the SOCKS failure, ssh keeps running.
    let dead = free_tcp_port();
    let out = curl(
        None,
        &[
            "--socks5-hostname",
            &format!("127.0.0.1:{dport}"),
            &format!("http://127.0.0.1:{dead}/"),
        ],
    );
    assert!(!out.status.success(), "{}", fmt_output(&out));
    assert!(bg.child.try_wait().unwrap().is_none(), "ssh -D died");
    drop(bg);

    // ssh -R: the server listens, the connection comes back to the client's HTTP server.
    let rport = free_tcp_port();
    let spec = format!("{rport}:127.0.0.1:{}", http.port);
    let mut bg = ssh_forward(&c, "alice", &["-R", &spec], "R");
    wait_port(rport, &mut bg);
    let url = format!("http://127.0.0.1:{rport}/blob.bin");
    assert_eq!(fetch_sum(&c, &url, None, "R"), sum, "ssh -R body");
    bg.stop();
    // The listener goes with the session.
    let gone = poll_until(UP_WITHIN, || {
        TcpStream::connect(("127.0.0.1", rport)).err().map(|_| ())
    });
    assert!(gone.is_some(), "-R listener outlived its session");

    let audit = audit_of(&c);
    for kind in ["forward-local", "forward-remote"] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains(kind) && l.contains("\"allow\"")),
            "no allowed {kind} in the audit log:\n{audit}"
        );
    }
}

#[test]
fn embedded_unix_socket_forwards_both_ways() {
    let c = acme(SshTarget::Embedded);
    let d = SockDir::new("unix");
    let far = d.0.join("far.sock");
    unix_echo(&far);
    let near = d.0.join("near.sock");
    let spec = format!("{}:{}", near.display(), far.display());
    let mut bg = ssh_forward(&c, "alice", &["-L", &spec], "Lunix");
    wait_path(&near, &mut bg);
    assert_eq!(unix_roundtrip(&near, "hello"), "echo:hello");
    drop(bg);

    // -R with a unix socket on the server, back to a unix socket on the client.
    let back = d.0.join("back.sock");
    let spec = format!("{}:{}", back.display(), far.display());
    let mut bg = ssh_forward(&c, "alice", &["-R", &spec], "Runix");
    wait_path(&back, &mut bg);
    assert_eq!(unix_roundtrip(&back, "again"), "echo:again");
    bg.stop();
    let gone = poll_until(UP_WITHIN, || (!back.exists()).then_some(()));
    assert!(gone.is_some(), "-R socket file outlived its session");
}

#[test]
fn embedded_w_as_proxyjump_hop_to_a_real_sshd() {
    require_sshd();
    let c = acme(SshTarget::Embedded);
    let target = Sshd::start(&c.scratch("target-sshd"));
    // ssh to the target sshd, through `ssh -W` to foo.acme as the jump host.
    let jump = format!(
        "ProxyCommand=ssh -F {} -W %h:%p {}",
        c.ssh_config("alice").display(),
        c.host("foo")
    );
    let out = run_cmd(target.direct_ssh().args(["-o", &jump, "echo via-jump"]));
    assert_success(&out, "ssh through an ssh -W hop");
    assert_eq!(stdout_of(&out), "via-jump\n");
}

#[test]
fn embedded_agent_forwarding_lists_the_clients_key() {
    require_program("ssh-agent", "openssh-client");
    let c = acme(SshTarget::Embedded);
    let d = SockDir::new("agent");
    let (sock, _agent) = ssh_agent_with_key(&c, &d);
    let out = run_cmd(c.ssh_cmd("alice").env("SSH_AUTH_SOCK", &sock).args([
        "-A",
        &c.host("foo"),
        "ssh-add -l; echo sock=$SSH_AUTH_SOCK",
    ]));
    assert_success(&out, "ssh -A … ssh-add -l");
    let text = stdout_of(&out);
    assert!(text.contains("forwarded-key"), "{}", fmt_output(&out));
    // Without -A the remote has no agent.
    let out = run_cmd(c.ssh_cmd("alice").env("SSH_AUTH_SOCK", &sock).args([
        "-a",
        &c.host("foo"),
        "echo sock=$SSH_AUTH_SOCK",
    ]));
    assert_success(&out, "ssh -a");
    assert_eq!(stdout_of(&out), "sock=\n");
}

/// VS Code Remote-SSH: `ssh -T -D <port> host bash`, bash driven on stdin while a request
/// goes over the SOCKS port.
#[test]
fn embedded_vscode_shape_bash_on_stdin_plus_socks() {
    let c = acme(SshTarget::Embedded);
    let (web, sum) = web_root(&c);
    let http = HttpServer::start(&web);
    let dport = free_tcp_port();
    let mut cmd = c.ssh_cmd("alice");
    cmd.args(["-T", "-D", &dport.to_string(), &c.host("foo"), "bash"])
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    writeln!(stdin, "echo ready-$((40+2))").unwrap();
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line, "ready-42\n");
    let up = poll_until(UP_WITHIN, || {
        TcpStream::connect(("127.0.0.1", dport)).ok().map(|_| ())
    });
    assert!(up.is_some(), "SOCKS port never came up");
    let url = format!("http://localhost:{}/blob.bin", http.port);
    assert_eq!(fetch_sum(&c, &url, Some(dport), "vscode"), sum);
    writeln!(stdin, "echo still-$((6*7)); exit 3").unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "still-42\n");
    drop(stdin);
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(3));
}

// ---------------------------------------------------------------------------------------------
// ACL twins (embedded)
// ---------------------------------------------------------------------------------------------

#[test]
fn command_scoped_peer_gets_no_forwarding_of_any_kind() {
    let c = acme(SshTarget::Embedded);
    let (web, _) = web_root(&c);
    let http = HttpServer::start(&web);

    // -L: ssh runs, the channel is refused with malai's reason.
    let lport = free_tcp_port();
    let spec = format!("127.0.0.1:{lport}:127.0.0.1:{}", http.port);
    // LogLevel INFO: OpenSSH logs a refused channel's reason at INFO.
    let mut bg = ssh_forward(&c, "bob", &["-o", "LogLevel=INFO", "-L", &spec], "bob-L");
    wait_port(lport, &mut bg);
    let out = curl(None, &["-f", &format!("http://127.0.0.1:{lport}/blob.bin")]);
    assert!(
        !out.status.success(),
        "bob's -L worked: {}",
        fmt_output(&out)
    );
    let said = poll_until(UP_WITHIN, || {
        let e = bg.stderr();
        e.contains("administratively prohibited").then_some(e)
    });
    let said = said.unwrap_or_else(|| bg.stderr());
    assert!(
        said.contains("needs full access"),
        "ssh did not show malai's reason:\n{said}"
    );
    drop(bg);

    // -D: same refusal per connection.
    let dport = free_tcp_port();
    let mut bg = ssh_forward(&c, "bob", &["-D", &dport.to_string()], "bob-D");
    wait_port(dport, &mut bg);
    let out = curl(
        None,
        &[
            "-f",
            "--socks5-hostname",
            &format!("127.0.0.1:{dport}"),
            &format!("http://localhost:{}/blob.bin", http.port),
        ],
    );
    assert!(
        !out.status.success(),
        "bob's -D worked: {}",
        fmt_output(&out)
    );
    drop(bg);

    // -R with ExitOnForwardFailure: ssh exits 255.
    let rport = free_tcp_port();
    let mut bg = ssh_forward(
        &c,
        "bob",
        &["-R", &format!("{rport}:127.0.0.1:{}", http.port)],
        "bob-R",
    );
    assert_eq!(bg.wait_exit(UP_WITHIN), Some(255), "{}", bg.stderr());
    assert!(bg.stderr().contains("forwarding failed"), "{}", bg.stderr());
    assert!(TcpStream::connect(("127.0.0.1", rport)).is_err());

    // -W: refused, ssh exits 255.
    let out =
        run_cmd(
            c.ssh_cmd("bob")
                .args(["-W", &format!("127.0.0.1:{}", http.port), &c.host("foo")]),
        );
    assert_exit_code(&out, 255, "bob's ssh -W");

    // Unix sockets both ways: -L's channel refused, -R's request refused (exit 255).
    let ud = SockDir::new("bob-unix");
    let far = ud.0.join("far.sock");
    unix_echo(&far);
    let near = ud.0.join("near.sock");
    let spec = format!("{}:{}", near.display(), far.display());
    let mut bg = ssh_forward(&c, "bob", &["-L", &spec], "bob-Lunix");
    wait_path(&near, &mut bg);
    let mut s = UnixStream::connect(&near).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = writeln!(s, "hello");
    let mut got = String::new();
    let _ = s.read_to_string(&mut got);
    assert_eq!(got, "", "bob's unix -L reached the socket");
    drop(bg);
    let back = ud.0.join("back.sock");
    let spec = format!("{}:{}", back.display(), far.display());
    let mut bg = ssh_forward(&c, "bob", &["-R", &spec], "bob-Runix");
    assert_eq!(bg.wait_exit(UP_WITHIN), Some(255), "{}", bg.stderr());
    assert!(!back.exists());

    // -A (ssh asks only when it has an agent): refused; bob's permitted command still
    // runs, with no agent.
    let d = SockDir::new("bob-agent");
    let (sock, _agent) = ssh_agent_with_key(&c, &d);
    let out = run_cmd(c.ssh_cmd("bob").env("SSH_AUTH_SOCK", &sock).args([
        "-A",
        &c.host("foo"),
        "ls",
        "/",
    ]));
    assert_success(&out, "bob's ls with -A");

    let audit = audit_of(&c);
    for kind in [
        "forward-local\"",
        "forward-remote\"",
        "forward-local-unix",
        "forward-remote-unix",
        "forward-agent",
    ] {
        assert!(
            audit.lines().any(|l| l.contains(kind)
                && l.contains("\"deny\"")
                && l.contains("needs full access")),
            "no denied {kind} in the audit log:\n{audit}"
        );
    }
    assert!(
        !audit
            .lines()
            .any(|l| l.contains("\"forward-") && l.contains("\"allow\"")),
        "a forward of bob's was allowed:\n{audit}"
    );
}

#[test]
fn forwarding_false_denies_full_access_peers_too() {
    let c = acme(SshTarget::Embedded);
    c.edit_manager_file(|t| set_table_keys(&t, "server.foo", &[("forwarding", "false".into())]));
    c.distribute();
    let (web, _) = web_root(&c);
    let http = HttpServer::start(&web);
    let rport = free_tcp_port();
    let mut bg = ssh_forward(
        &c,
        "alice",
        &["-R", &format!("{rport}:127.0.0.1:{}", http.port)],
        "off-R",
    );
    assert_eq!(bg.wait_exit(UP_WITHIN), Some(255), "{}", bg.stderr());
    let out = run_cmd(c.ssh_cmd("alice").args([
        "-W",
        &format!("127.0.0.1:{}", http.port),
        &c.host("foo"),
    ]));
    assert_exit_code(&out, 255, "alice's ssh -W with forwarding = false");
    // A shell still works: only forwarding is off.
    let out = c.ssh("alice", &c.host("foo"), "echo shell-ok");
    assert_success(&out, "shell with forwarding = false");
    assert_eq!(stdout_of(&out), "shell-ok\n");
    let audit = audit_of(&c);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("forward-local") && l.contains("forwarding = false")),
        "{audit}"
    );
}

// ---------------------------------------------------------------------------------------------
// Through a real sshd tunnel (sshd does the forwarding)
// ---------------------------------------------------------------------------------------------

#[test]
fn sshd_tunnel_local_and_dynamic_forwards_with_curl() {
    require_sshd();
    let c = acme(SshTarget::Sshd);
    let (web, sum) = web_root(&c);
    let http = HttpServer::start(&web);
    let lport = free_tcp_port();
    let spec = format!("127.0.0.1:{lport}:127.0.0.1:{}", http.port);
    let mut bg = ssh_forward(&c, "alice", &["-L", &spec], "sshd-L");
    wait_port(lport, &mut bg);
    let url = format!("http://127.0.0.1:{lport}/blob.bin");
    assert_eq!(fetch_sum(&c, &url, None, "sshd-L"), sum);
    drop(bg);

    let dport = free_tcp_port();
    let mut bg = ssh_forward(&c, "alice", &["-D", &dport.to_string()], "sshd-D");
    wait_port(dport, &mut bg);
    let url = format!("http://localhost:{}/blob.bin", http.port);
    assert_eq!(fetch_sum(&c, &url, Some(dport), "sshd-D"), sum);
}

/// `env` requests as OpenSSH sends them (`SendEnv`, only LANG/LC_* pass, like sshd's default
/// AcceptEnv) and `exit-signal` for a remote killed by a signal (ssh exits 255).
#[test]
fn embedded_env_and_exit_signal_as_openssh_sends_them() {
    let c = acme(SshTarget::Embedded);
    let out = run_cmd(
        c.ssh_cmd("alice")
            .env("LC_MALAI_TEST", "hello")
            .env("MALAI_NOT_SENT", "secret")
            .args([
                "-o",
                "SendEnv=LC_MALAI_TEST MALAI_NOT_SENT",
                &c.host("foo"),
                "echo \"$LC_MALAI_TEST/$MALAI_NOT_SENT\"; kill -TERM $$",
            ]),
    );
    assert_exit_code(&out, 255, "remote killed by SIGTERM");
    assert_eq!(stdout_of(&out), "hello/\n", "{}", fmt_output(&out));
}

// ---------------------------------------------------------------------------------------------
// Native `malai ssh` forwards (no OpenSSH anywhere)
// ---------------------------------------------------------------------------------------------

/// `malai ssh <args…> foo.acme` as `device`, in the background.
fn malai_forward(c: &TestCluster, device: &str, args: &[&str], tag: &str) -> Bg {
    let mut cmd = c.machine(device).cmd(["ssh"]);
    cmd.args(args).arg(c.host("foo"));
    Bg::spawn(cmd, c.dir().join(format!("malai-{tag}.err")))
}

#[test]
fn native_local_dynamic_and_stdio_forwards() {
    require_sshd();
    let c = acme(SshTarget::Unset);
    let (web, sum) = web_root(&c);
    let http = HttpServer::start(&web);

    // -N -L
    let lport = free_tcp_port();
    let spec = format!("{lport}:127.0.0.1:{}", http.port);
    let mut bg = malai_forward(&c, "alice", &["-N", "-L", &spec], "L");
    wait_port(lport, &mut bg);
    let url = format!("http://127.0.0.1:{lport}/blob.bin");
    assert_eq!(fetch_sum(&c, &url, None, "native-L"), sum, "malai ssh -L");
    // A target that is down: that connection fails, the forward stays up.
    let dead = free_tcp_port();
    drop(bg);
    let lport2 = free_tcp_port();
    let spec_dead = format!("{lport2}:127.0.0.1:{dead}");
    let mut bg = malai_forward(&c, "alice", &["-N", "-L", &spec, "-L", &spec_dead], "L2");
    wait_port(lport, &mut bg);
    wait_port(lport2, &mut bg);
    let out = curl(None, &["-f", &format!("http://127.0.0.1:{lport2}/")]);
    assert!(!out.status.success(), "{}", fmt_output(&out));
    assert_eq!(fetch_sum(&c, &url, None, "native-L2"), sum);
    assert!(bg.child.try_wait().unwrap().is_none(), "malai ssh -N died");
    let said = poll_until(UP_WITHIN, || {
        let e = bg.stderr();
        e.contains("open failed").then_some(e)
    });
    assert!(said.is_some(), "no open-failed line:\n{}", bg.stderr());
    drop(bg);

    // -D: SOCKS5 with the name resolved on the server, and SOCKS4a.
    let dport = free_tcp_port();
    let mut bg = malai_forward(&c, "alice", &["-N", "-D", &dport.to_string()], "D");
    wait_port(dport, &mut bg);
    let url = format!("http://localhost:{}/blob.bin", http.port);
    assert_eq!(
        fetch_sum(&c, &url, Some(dport), "native-D"),
        sum,
        "malai ssh -D"
    );
    let out_file = c.dir().join("got-socks4a.bin");
    let out = curl(
        None,
        &[
            "-fo",
            &out_file.display().to_string(),
            "--socks4a",
            &format!("127.0.0.1:{dport}"),
            &url,
        ],
    );
    assert_success(&out, "curl --socks4a");
    assert_eq!(sha256_file(&out_file), sum, "SOCKS4a body");
    drop(bg);

    // -L with a remote command: the forward works while the command runs.
    let lport = free_tcp_port();
    let spec = format!("{lport}:127.0.0.1:{}", http.port);
    let mut cmd = c.machine("alice").cmd(["ssh", "-L", &spec]);
    cmd.arg(c.host("foo")).arg("echo started; sleep 60");
    let mut bg = Bg::spawn(cmd, c.dir().join("malai-L-cmd.err"));
    wait_port(lport, &mut bg);
    let url = format!("http://127.0.0.1:{lport}/blob.bin");
    assert_eq!(fetch_sum(&c, &url, None, "native-L-cmd"), sum);
    drop(bg);

    // -W as OpenSSH's ProxyCommand to a real sshd on the far side.
    let target = Sshd::start(&c.scratch("target-sshd"));
    let proxy = format!(
        "ProxyCommand={} ssh -W %h:%p {}",
        c.machine("alice").env_command_prefix(),
        c.host("foo")
    );
    let out = run_cmd(target.direct_ssh().args(["-o", &proxy, "echo via-malai-W"]));
    assert_success(&out, "ssh through malai ssh -W");
    assert_eq!(stdout_of(&out), "via-malai-W\n");
}

#[test]
fn native_forwards_denied_for_command_scoped_peers_and_when_off() {
    let c = acme(SshTarget::Unset);
    let (web, _) = web_root(&c);
    let http = HttpServer::start(&web);

    // bob (ls only): -W is refused with malai's reason, exit 255, one line.
    let out = c.machine("bob").run([
        "ssh",
        "-W",
        &format!("127.0.0.1:{}", http.port),
        &c.host("foo"),
    ]);
    assert_exit_code(&out, 255, "bob's malai ssh -W");
    let err = stderr_of(&out);
    assert!(err.contains("needs full access"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    // bob's -L: the listener is local, each connection is refused by the server.
    let lport = free_tcp_port();
    let spec = format!("{lport}:127.0.0.1:{}", http.port);
    let mut bg = malai_forward(&c, "bob", &["-N", "-L", &spec], "bob-L");
    wait_port(lport, &mut bg);
    let out = curl(None, &["-f", &format!("http://127.0.0.1:{lport}/blob.bin")]);
    assert!(!out.status.success(), "{}", fmt_output(&out));
    let said = poll_until(UP_WITHIN, || {
        let e = bg.stderr();
        e.contains("needs full access").then_some(e)
    });
    assert!(said.is_some(), "{}", bg.stderr());
    drop(bg);

    // bob's -D: the SOCKS reply says "not allowed".
    let dport = free_tcp_port();
    let mut bg = malai_forward(&c, "bob", &["-N", "-D", &dport.to_string()], "bob-D");
    wait_port(dport, &mut bg);
    let out = curl(
        None,
        &[
            "-f",
            "--socks5-hostname",
            &format!("127.0.0.1:{dport}"),
            &format!("http://localhost:{}/", http.port),
        ],
    );
    assert!(!out.status.success(), "{}", fmt_output(&out));
    drop(bg);

    let audit = audit_of(&c);
    assert!(
        audit
            .lines()
            .filter(|l| l.contains("\"kind\":\"forward\"") && l.contains("\"deny\""))
            .count()
            >= 3,
        "{audit}"
    );
    assert!(
        !audit
            .lines()
            .any(|l| l.contains("\"kind\":\"forward\"") && l.contains("\"allow\"")),
        "{audit}"
    );

    // forwarding = false: alice is refused too, naming the setting.
    c.edit_manager_file(|t| set_table_keys(&t, "server.foo", &[("forwarding", "false".into())]));
    c.distribute();
    let out = c.machine("alice").run([
        "ssh",
        "-W",
        &format!("127.0.0.1:{}", http.port),
        &c.host("foo"),
    ]);
    assert_exit_code(&out, 255, "alice's -W with forwarding = false");
    assert!(
        stderr_of(&out).contains("forwarding = false"),
        "{}",
        fmt_output(&out)
    );
    // Exec still works.
    let out = c
        .machine("alice")
        .run(["ssh", &c.host("foo"), "echo exec-ok"]);
    assert_success(&out, "exec with forwarding = false");

    // ExitOnForwardFailure: a port already taken is fatal, exit 255.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = c.machine("alice").run([
        "ssh",
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-L",
        &format!("{port}:127.0.0.1:1"),
        &c.host("foo"),
    ]);
    assert_exit_code(&out, 255, "ExitOnForwardFailure with the port taken");
    assert!(
        stderr_of(&out).contains("could not request local forwarding"),
        "{}",
        fmt_output(&out)
    );
}

#[test]
fn native_remote_forwards_and_agent_forwarding() {
    let c = acme(SshTarget::Unset);
    let (web, sum) = web_root(&c);
    let http = HttpServer::start(&web);

    // -R: the server listens, connections come back to our HTTP server.
    let rport = free_tcp_port();
    let spec = format!("{rport}:127.0.0.1:{}", http.port);
    let mut bg = malai_forward(&c, "alice", &["-N", "-R", &spec], "R");
    wait_port(rport, &mut bg);
    let url = format!("http://127.0.0.1:{rport}/blob.bin");
    assert_eq!(fetch_sum(&c, &url, None, "native-R"), sum, "malai ssh -R");
    assert_eq!(
        fetch_sum(&c, &url, None, "native-R2"),
        sum,
        "second connection"
    );
    bg.stop();
    let gone = poll_until(UP_WITHIN, || {
        TcpStream::connect(("127.0.0.1", rport)).err().map(|_| ())
    });
    assert!(gone.is_some(), "-R listener outlived its client");

    // -R port 0: ssh's "Allocated port" line, and the port works.
    let mut bg = malai_forward(
        &c,
        "alice",
        &["-N", "-R", &format!("0:127.0.0.1:{}", http.port)],
        "R0",
    );
    let port = poll_until(UP_WITHIN, || {
        let e = bg.stderr();
        e.split_whitespace()
            .skip_while(|w| *w != "port")
            .nth(1)
            .and_then(|p| p.parse::<u16>().ok())
    })
    .unwrap_or_else(|| panic!("no Allocated port line:\n{}", bg.stderr()));
    wait_port(port, &mut bg);
    let url = format!("http://127.0.0.1:{port}/blob.bin");
    assert_eq!(fetch_sum(&c, &url, None, "native-R0"), sum);
    drop(bg);

    // -R unix socket on the server back to a unix socket here.
    let d = SockDir::new("native-unix");
    let far = d.0.join("far.sock");
    unix_echo(&far);
    let back = d.0.join("back.sock");
    let spec = format!("{}:{}", back.display(), far.display());
    let mut bg = malai_forward(&c, "alice", &["-N", "-R", &spec], "Runix");
    wait_path(&back, &mut bg);
    assert_eq!(unix_roundtrip(&back, "native"), "echo:native");
    drop(bg);
    // -L unix to unix.
    let near = d.0.join("near.sock");
    let spec = format!("{}:{}", near.display(), far.display());
    let mut bg = malai_forward(&c, "alice", &["-N", "-L", &spec], "Lunix");
    wait_path(&near, &mut bg);
    assert_eq!(unix_roundtrip(&near, "native-L"), "echo:native-L");
    drop(bg);

    // -A: ssh-add -l on the remote lists our key.
    let ad = SockDir::new("native-agent");
    let (sock, _agent) = ssh_agent_with_key(&c, &ad);
    let out = run_cmd(
        c.machine("alice")
            .cmd(["ssh", "-A", &c.host("foo"), "ssh-add -l"])
            .env("SSH_AUTH_SOCK", &sock),
    );
    assert_success(&out, "malai ssh -A … ssh-add -l");
    assert!(
        stdout_of(&out).contains("forwarded-key"),
        "{}",
        fmt_output(&out)
    );
    // Without -A: no agent there.
    let out = run_cmd(
        c.machine("alice")
            .cmd(["ssh", &c.host("foo"), "echo sock=$SSH_AUTH_SOCK"])
            .env("SSH_AUTH_SOCK", &sock),
    );
    assert_eq!(stdout_of(&out), "sock=\n", "{}", fmt_output(&out));

    // Deny twins: bob's -R with ExitOnForwardFailure exits 255; bob's -A gets no agent
    // (his `ls` still runs) and the refusal is audited.
    let out = c.machine("bob").run([
        "ssh",
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-R",
        &format!("{}:127.0.0.1:{}", free_tcp_port(), http.port),
        &c.host("foo"),
    ]);
    assert_exit_code(&out, 255, "bob's -R");
    assert!(
        stderr_of(&out).contains("needs full access"),
        "{}",
        fmt_output(&out)
    );
    let out = run_cmd(
        c.machine("bob")
            .cmd(["ssh", "-A", &c.host("foo"), "ls", "/"])
            .env("SSH_AUTH_SOCK", &sock),
    );
    assert_success(&out, "bob's ls with -A");
    assert!(
        stderr_of(&out).contains("agent forwarding refused"),
        "{}",
        fmt_output(&out)
    );
    let audit = audit_of(&c);
    for detail in ["\"detail\":\"agent\"", "\"detail\":\"localhost:"] {
        assert!(
            audit.lines().any(|l| l.contains("\"alias\":\"bob\"")
                && l.contains("remote-forward")
                && l.contains(detail)
                && l.contains("\"deny\"")),
            "no denied bob remote-forward ({detail}):\n{audit}"
        );
    }
}

/// `-f`: the command returns once the forward is up; the background child serves it while
/// the remote command runs and exits with it.
#[test]
fn native_f_backgrounds_after_the_forward_is_up() {
    let c = acme(SshTarget::Unset);
    let (web, sum) = web_root(&c);
    let http = HttpServer::start(&web);
    let lport = free_tcp_port();
    let spec = format!("{lport}:127.0.0.1:{}", http.port);
    let err = c.dir().join("malai-f.err");
    // stdout/stderr to files: the background child keeps them open, as ssh -f does.
    let started = std::time::Instant::now();
    let st = c
        .machine("alice")
        .cmd(["ssh", "-f", "-L", &spec, &c.host("foo"), "sleep 8"])
        .stdin(Stdio::null())
        .stdout(fs::File::create(c.dir().join("malai-f.out")).unwrap())
        .stderr(fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    assert!(st.success(), "malai ssh -f: {st}\n{}", read_lossy(&err));
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "-f waited for the remote command"
    );
    // Up already when -f returned: no polling needed.
    let url = format!("http://127.0.0.1:{lport}/blob.bin");
    assert_eq!(
        fetch_sum(&c, &url, None, "native-f"),
        sum,
        "{}",
        read_lossy(&err)
    );
    // The child goes with its remote command.
    let gone = poll_until(UP_WITHIN, || {
        TcpStream::connect(("127.0.0.1", lport)).err().map(|_| ())
    });
    assert!(gone.is_some(), "the -f child outlived its command");
    // Without a command or -N, -f is an error like ssh's.
    let out = c.machine("alice").run(["ssh", "-f", &c.host("foo")]);
    assert_exit_code(&out, 255, "-f without a command");
    assert!(
        stderr_of(&out).contains("background"),
        "{}",
        fmt_output(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// Load: 100 concurrent connections through one -L forward
// ---------------------------------------------------------------------------------------------

/// A TCP echo server (each connection: echo until EOF, then close); returns its port.
fn tcp_echo() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    port
}

/// `n` concurrent connections to `port`, each sending its own seeded `len` bytes and
/// checking the echo's sha256; returns how many came back wrong or not at all.
fn concurrent_echo(port: u16, n: usize, len: usize) -> usize {
    use sha2::{Digest, Sha256};
    let handles: Vec<_> = (0..n)
        .map(|i| {
            std::thread::spawn(move || -> Result<(), String> {
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64 + 1);
                let body: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        x as u8
                    })
                    .collect();
                let want = Sha256::digest(&body);
                let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut w = s.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    w.write_all(&body)?;
                    w.shutdown(std::net::Shutdown::Write)
                });
                let mut got = Vec::with_capacity(len);
                s.read_to_end(&mut got).map_err(|e| e.to_string())?;
                writer.join().unwrap().map_err(|e| e.to_string())?;
                if got.len() != len || Sha256::digest(&got) != want {
                    return Err(format!(
                        "connection {i}: {} bytes, checksum mismatch",
                        got.len()
                    ));
                }
                Ok(())
            })
        })
        .collect();
    let mut bad = 0;
    for h in handles {
        if let Err(e) = h.join().unwrap() {
            eprintln!("{e}");
            bad += 1;
        }
    }
    bad
}

#[test]
fn hundred_concurrent_connections_through_one_forward_lose_nothing() {
    let _heavy = heavy_lock();
    let c = acme(SshTarget::Embedded);
    let echo = tcp_echo();
    const N: usize = 100;
    const LEN: usize = 256 * 1024;

    // Native malai ssh -L.
    let lport = free_tcp_port();
    let mut bg = malai_forward(
        &c,
        "alice",
        &["-N", "-L", &format!("{lport}:127.0.0.1:{echo}")],
        "load-native",
    );
    wait_port(lport, &mut bg);
    assert_eq!(
        concurrent_echo(lport, N, LEN),
        0,
        "native -L lost connections:\n{}",
        bg.stderr()
    );
    drop(bg);

    // OpenSSH -L to the embedded server.
    let lport = free_tcp_port();
    let mut bg = ssh_forward(
        &c,
        "alice",
        &["-L", &format!("{lport}:127.0.0.1:{echo}")],
        "load-ssh",
    );
    wait_port(lport, &mut bg);
    assert_eq!(
        concurrent_echo(lport, N, LEN),
        0,
        "ssh -L (embedded) lost connections:\n{}",
        bg.stderr()
    );
}

/// With alice's agent holding her key, native forwards go through it (one pooled
/// connection): -L and -R still work, and the agent reports a single dial.
#[test]
fn native_forwards_through_the_key_holder() {
    let c = acme(SshTarget::Unset);
    let (web, sum) = web_root(&c);
    let http = HttpServer::start(&web);
    let agent = crate::agent::Agent::start(c.machine("alice"), &["--http=false"]);
    let lport = free_tcp_port();
    let rport = free_tcp_port();
    let mut cmd = agent.cmd(["ssh", "-N", "-L"]);
    cmd.arg(format!("{lport}:127.0.0.1:{}", http.port))
        .arg("-R")
        .arg(format!("{rport}:127.0.0.1:{}", http.port))
        .arg(c.host("foo"));
    let mut bg = Bg::spawn(cmd, c.dir().join("malai-via.err"));
    wait_port(lport, &mut bg);
    wait_port(rport, &mut bg);
    for (port, tag) in [(lport, "via-L"), (rport, "via-R")] {
        let url = format!("http://127.0.0.1:{port}/blob.bin");
        assert_eq!(fetch_sum(&c, &url, None, tag), sum, "{tag}");
    }
    bg.stop();
    assert_eq!(agent.dials(), 1, "{}", agent.status()["raw"]);
}
