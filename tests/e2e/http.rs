//! The agent's HTTP proxy end to end: a real HTTP server (`python3 -m http.server`) on the
//! server machine's loopback behind `[server.foo.service.web]`, reached with real `curl`
//! through `HTTP_PROXY` and through `malai ssh curl`: content, CONNECT, a 64 MiB download
//! byte for byte, 403 for a device the service ACL does not list, 404 for an unknown
//! service, 502 for a service that is down, and plain loopback hosts still proxied directly.
//!
//! Cluster `acme`: manager `mgr`; server `foo` (embedded ssh, no sshd needed) with service
//! `web`; device `alice` (allowed on `web` only), device `bob` (a member, not allowed).

use std::fs;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use crate::agent::Agent;
use crate::harness::*;

/// `python3 -m http.server` on 127.0.0.1:<port> serving a directory; killed on drop.
pub struct HttpServer {
    child: Child,
    pub port: u16,
}

impl HttpServer {
    pub fn start(dir: &Path) -> HttpServer {
        assert!(
            Command::new("python3")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "python3 is needed for the HTTP tests (apt-get install python3)"
        );
        let port = free_tcp_port();
        let child = Command::new("python3")
            .args(["-m", "http.server", "--bind", "127.0.0.1"])
            .arg(port.to_string())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start python3 -m http.server");
        let up = poll_until(Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        assert!(up.is_some(), "python3 http.server did not listen on {port}");
        HttpServer { child, port }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The cluster, with `web` on `port` (a port nothing may listen on, for the 502 case, is
/// `down`).
fn acme(port: u16, down: u16) -> TestCluster {
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Embedded)
        .device("alice")
        .device("bob")
        .build();
    c.edit_manager_file(|t| {
        t + &format!(
            "\n[server.foo.service.web]\nhttp = {port}\nallow-from = \"alice\"\n\
             \n[server.foo.service.down]\nhttp = {down}\nallow-from = \"alice\"\n"
        )
    });
    c.distribute();
    c
}

/// `curl -sS <args>` with only the proxy environment we choose (no inherited NO_PROXY).
pub fn curl(proxy: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new("curl");
    for k in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        cmd.env_remove(k);
    }
    if let Some(p) = proxy {
        cmd.env("http_proxy", p);
    }
    cmd.arg("-sS").args(args);
    run_cmd(&mut cmd)
}

/// `malai ssh curl <args>` as `m` (starts that machine's agent if needed).
fn malai_curl(m: &Machine, args: &[&str]) -> Output {
    let mut cmd = m.cmd(["ssh", "curl"]);
    for k in ["http_proxy", "HTTP_PROXY", "no_proxy", "NO_PROXY"] {
        cmd.env_remove(k);
    }
    cmd.args(args);
    run_cmd(&mut cmd)
}

/// Stops the agent `malai ssh curl` started for `m`, whatever the test's outcome.
struct StopAgent<'a>(&'a Machine);

impl Drop for StopAgent<'_> {
    fn drop(&mut self) {
        let _ = run_cmd_with(
            &mut self.0.cmd(["ssh", "agent", "stop"]),
            None,
            Duration::from_secs(20),
        );
    }
}

#[test]
fn services_through_http_proxy_and_malai_ssh_curl() {
    let www = tempfile::tempdir().unwrap();
    fs::write(www.path().join("index.html"), "hello from web\n").unwrap();
    let big = www.path().join("big.bin");
    write_random_file(&big, 64 << 20, 0x6874_7470_2121);
    let server = HttpServer::start(www.path());
    let c = acme(server.port, free_tcp_port());
    let alice = c.machine("alice");
    let agent = Agent::start(alice, &[]);
    let proxy = agent.exports["http_proxy"].clone();

    // Plain HTTP through HTTP_PROXY, in all three name forms.
    let forms = [
        "web.foo.acme".to_string(),
        format!("web.foo.{}", c.id52("mgr")),
        format!("web.{}.{}", c.id52("foo"), c.id52("mgr")),
    ];
    for host in &forms {
        let out = curl(Some(&proxy), &[&format!("http://{host}/index.html")]);
        assert_success(&out, &format!("curl http://{host}/ via the proxy"));
        assert_eq!(stdout_of(&out), "hello from web\n");
    }
    // CONNECT (curl -p) tunnels to the service too.
    let out = curl(Some(&proxy), &["-p", "http://web.foo.acme/index.html"]);
    assert_success(&out, "curl -p (CONNECT)");
    assert_eq!(stdout_of(&out), "hello from web\n");

    // 64 MiB, byte for byte.
    let got = c.scratch("dl").join("big.bin");
    let out = curl(
        Some(&proxy),
        &["-o", got.to_str().unwrap(), "http://web.foo.acme/big.bin"],
    );
    assert_success(&out, "64 MiB through the proxy");
    assert_eq!(sha256_file(&got), sha256_file(&big), "download differs");

    // Unknown service: 404 with a one-line reason; curl -f's exit status passes through
    // `malai ssh curl`.
    let out = curl(
        Some(&proxy),
        &["-w", "\n%{http_code}", "http://nosuch.foo.acme/"],
    );
    assert_success(&out, "curl unknown service");
    let text = stdout_of(&out);
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "404", "{text}");
    assert!(body.contains("unknown service \"nosuch\""), "{body}");
    assert_eq!(body.trim_end().lines().count(), 1, "one line: {body:?}");

    // A service that is down: 502, with the reason.
    let out = curl(
        Some(&proxy),
        &["-w", "\n%{http_code}", "http://down.foo.acme/"],
    );
    let text = stdout_of(&out);
    assert!(text.ends_with("\n502"), "{text}");
    assert!(text.contains("not answering"), "{text}");

    // Hosts outside the cluster are proxied directly (a plain loopback URL).
    let out = curl(
        Some(&proxy),
        &[&format!("http://127.0.0.1:{}/index.html", server.port)],
    );
    assert_success(&out, "non-cluster host through the proxy");
    assert_eq!(stdout_of(&out), "hello from web\n");

    // `malai ssh curl`: the running agent's proxy, curl's exit status passed through.
    let out = malai_curl(alice, &["-sS", "http://web.foo.acme/index.html"]);
    assert_success(&out, "malai ssh curl");
    assert_eq!(stdout_of(&out), "hello from web\n");
    let out = malai_curl(alice, &["-sSf", "http://nosuch.foo.acme/"]);
    assert_exit_code(&out, 22, "malai ssh curl -f on a 404");
    assert!(out.stdout.is_empty());

    // The proxy asked for its own address (as a web server) answers, never loops.
    let out = curl(None, &["-w", "\n%{http_code}", &format!("{proxy}/")]);
    assert!(stdout_of(&out).ends_with("\n400"), "{}", fmt_output(&out));

    // Another local user may not spend alice's keys through her proxy.
    let mut cmd = Command::new("runuser");
    cmd.args([
        "-u",
        "nobody",
        "--",
        "curl",
        "-sS",
        "-w",
        "\n%{http_code}",
        "--proxy",
    ])
    .arg(&proxy)
    .arg("http://web.foo.acme/index.html")
    .env_remove("no_proxy")
    .env_remove("NO_PROXY");
    let out = run_cmd(&mut cmd);
    let text = stdout_of(&out);
    assert!(text.ends_with("\n403"), "{}", fmt_output(&out));
    assert!(text.contains("belongs to uid"), "{text}");
    assert!(!text.contains("hello from web"));

    let status = agent.status();
    assert_eq!(
        status["dials"], "1",
        "every request reused one connection:\n{}",
        status["raw"]
    );
}

#[test]
fn a_device_the_service_acl_does_not_list_gets_403() {
    let www = tempfile::tempdir().unwrap();
    fs::write(www.path().join("index.html"), "secret\n").unwrap();
    let server = HttpServer::start(www.path());
    let c = acme(server.port, free_tcp_port());
    let bob = c.machine("bob");
    // No agent yet: `malai ssh curl` starts one.
    let _stop = StopAgent(bob);
    let out = malai_curl(
        bob,
        &["-sS", "-w", "\n%{http_code}", "http://web.foo.acme/"],
    );
    assert_success(&out, "bob: malai ssh curl");
    let text = stdout_of(&out);
    let (body, code) = text.rsplit_once('\n').unwrap();
    assert_eq!(code, "403", "{text}");
    assert!(body.contains("permission denied"), "{body}");
    assert!(!text.contains("secret"));
    // Denied over CONNECT too.
    let out = malai_curl(bob, &["-sS", "-p", "http://web.foo.acme/"]);
    assert_ne!(out.status.code(), Some(0), "{}", fmt_output(&out));
    assert!(!stdout_of(&out).contains("secret"));
    // `malai ssh curl` left bob's agent running for the next call.
    let socket = bob.home().join("run").join("agent.sock");
    assert!(
        socket.exists(),
        "malai ssh curl left no agent at {}",
        socket.display()
    );
}
