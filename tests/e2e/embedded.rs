//! The embedded SSH server: no sshd anywhere, yet `ssh`, `scp` (both modes), `sftp`,
//! `rsync` and `git` work unchanged through `ProxyCommand malai ssh proxy %h`, with
//! `StrictHostKeyChecking yes` against a known_hosts file printed by `malai ssh known-hosts`.
//!
//! Cluster `acme`: manager `mgr`; server `foo` with `ssh = "embedded"`; devices `alice`
//! (full access), `bob` (may run only `ls`: `[server.foo.ls] allow-from = "bob"`) and `eve`
//! (a member with no access).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness::*;

fn acme() -> TestCluster {
    TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Embedded)
        .device("alice")
        .device("bob")
        .device("eve")
        .allow("foo", &["alice"])
        .allow("foo.ls", &["bob"])
        .build()
}

/// An ssh_config for `device` that trusts only the host keys `malai ssh known-hosts`
/// printed on that device, and offers no key at all (the embedded server needs none).
fn strict_config(c: &TestCluster, device: &str) -> PathBuf {
    let kh = c.dir().join(format!("strict_known_hosts-{device}"));
    if !kh.exists() {
        let lines = c.machine(device).run_ok(["ssh", "known-hosts"]);
        fs::write(&kh, lines + "\n").unwrap();
    }
    let cfg = c.dir().join(format!("strict_ssh_config-{device}"));
    fs::write(
        &cfg,
        format!(
            "Host *\n  ProxyCommand {} ssh proxy %h %p\n  User root\n  \
             UserKnownHostsFile {}\n  GlobalKnownHostsFile /dev/null\n  \
             StrictHostKeyChecking yes\n  BatchMode yes\n  IdentitiesOnly yes\n  \
             LogLevel ERROR\n",
            c.machine(device).env_command_prefix(),
            kh.display()
        ),
    )
    .unwrap();
    cfg
}

fn ssh(c: &TestCluster, device: &str) -> Command {
    let mut cmd = Command::new("ssh");
    cmd.env_remove("RUST_LOG")
        .arg("-F")
        .arg(strict_config(c, device));
    cmd
}

fn run_ssh(c: &TestCluster, device: &str, args: &[&str]) -> Output {
    run_cmd(ssh(c, device).args(args))
}

fn ssh_e(c: &TestCluster, device: &str) -> String {
    format!("ssh -F {}", strict_config(c, device).display())
}

#[test]
fn known_hosts_lines_and_strict_host_key_checking() {
    let c = acme();
    let lines = c.machine("alice").run_ok(["ssh", "known-hosts"]);
    let foo = c.id52("foo");
    let mgr = c.id52("mgr");
    assert_eq!(lines.lines().count(), 1, "one embedded server: {lines}");
    let (names, key) = lines.split_once(' ').unwrap();
    let names: Vec<&str> = names.split(',').collect();
    for want in [
        "foo".to_string(),
        "foo.acme".to_string(),
        format!("foo.{mgr}"),
        format!("{foo}.{mgr}"),
    ] {
        assert!(names.contains(&want.as_str()), "{want} missing in {lines}");
    }
    assert!(key.starts_with("ssh-ed25519 AAAA"), "{lines}");

    // With those lines and StrictHostKeyChecking=yes, every name form connects.
    for host in ["foo.acme".to_string(), format!("{foo}.{mgr}")] {
        let out = run_ssh(&c, "alice", &[&host, "echo ok"]);
        assert_success(&out, &format!("ssh {host} (strict host key checking)"));
        assert_eq!(stdout_of(&out), "ok\n");
    }
    let out = run_ssh(&c, "alice", &["foo.acme", "echo out; echo err >&2; exit 7"]);
    assert_exit_code(&out, 7, "exit 7 through the embedded server");
    assert_eq!(stdout_of(&out), "out\n");
    assert_eq!(stderr_of(&out), "err\n");
    let out = run_cmd_with(
        ssh(&c, "alice").args(["foo.acme", "wc -c"]),
        Some(&[7u8; 300_000]),
        CHILD_TIMEOUT,
    );
    assert_success(&out, "stdin through the embedded server");
    assert_eq!(stdout_of(&out).trim(), "300000");
    let out = run_ssh(&c, "alice", &["foo.acme", "kill -TERM $$"]);
    assert_exit_code(&out, 255, "remote killed by a signal");

    // Deny twin: a known_hosts entry with another key is a host key mismatch.
    let other = c.dir().join("other_key");
    assert_success(
        &run_cmd(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&other),
        ),
        "ssh-keygen",
    );
    let other_pub = fs::read_to_string(other.with_extension("pub")).unwrap();
    let wrong = c.dir().join("wrong_known_hosts");
    fs::write(&wrong, format!("foo.acme {}", other_pub.trim_start())).unwrap();
    let out = run_cmd(
        ssh(&c, "alice")
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", wrong.display()))
            .args(["foo.acme", "echo ok"]),
    );
    assert_exit_code(&out, 255, "wrong host key");
    assert!(!stdout_of(&out).contains("ok"), "{}", fmt_output(&out));
}

#[test]
fn interactive_pty_sessions() {
    let c = acme();
    // A real terminal on our side (script), a login shell with a pty on the server.
    let cmd = format!("{} foo.acme", ssh_e(&c, "alice"));
    let out = run_cmd_with(
        Command::new("script").args(["-qec", &cmd, "/dev/null"]),
        Some(b"tty; echo $((6*7)); stty size\nexit 3\n"),
        CHILD_TIMEOUT,
    );
    assert_exit_code(&out, 3, "interactive shell under script");
    let text = stdout_of(&out);
    assert!(text.contains("42"), "{}", fmt_output(&out));
    assert!(
        text.contains("/dev/pts/"),
        "no pty on the server:\n{}",
        fmt_output(&out)
    );

    // `ssh -tt host cmd`: a command with a pty, its exit status passed through.
    let out = run_ssh(
        &c,
        "alice",
        &["-tt", "foo.acme", "test -t 0 && tty && exit 5"],
    );
    assert_exit_code(&out, 5, "ssh -tt with a command");
    assert!(
        stdout_of(&out).contains("/dev/pts/"),
        "{}",
        fmt_output(&out)
    );
}

#[test]
fn scp_both_modes_and_sftp_batch() {
    require_program("scp", "openssh-client");
    require_program("sftp", "openssh-client");
    let c = acme();
    let local = c.scratch("local");
    let remote = c.scratch("remote");
    let src = local.join("big.bin");
    write_random_file(&src, 16 << 20, 99);
    let want = sha256_file(&src);
    let cfg = strict_config(&c, "alice");
    for (mode, flags) in [("sftp", &[][..]), ("legacy", &["-O"][..])] {
        let up = remote.join(format!("up-{mode}.bin"));
        let out = run_cmd(
            Command::new("scp")
                .arg("-F")
                .arg(&cfg)
                .args(flags)
                .arg(&src)
                .arg(format!("foo.acme:{}", up.display())),
        );
        assert_success(&out, &format!("scp ({mode}) upload"));
        assert_eq!(sha256_file(&up), want, "scp ({mode}) upload");
        let down = local.join(format!("down-{mode}.bin"));
        let out = run_cmd(
            Command::new("scp")
                .arg("-F")
                .arg(&cfg)
                .args(flags)
                .arg(format!("foo.acme:{}", up.display()))
                .arg(&down),
        );
        assert_success(&out, &format!("scp ({mode}) download"));
        assert_eq!(sha256_file(&down), want, "scp ({mode}) download");
    }

    let batch = c.dir().join("sftp.batch");
    let r = remote.display();
    let l = local.display();
    fs::write(
        &batch,
        format!(
            "mkdir {r}/d\nput {l}/big.bin {r}/d/a.bin\nrename {r}/d/a.bin {r}/d/b.bin\n\
             ls -l {r}/d\nget {r}/d/b.bin {l}/via-sftp.bin\nrm {r}/d/b.bin\nrmdir {r}/d\n"
        ),
    )
    .unwrap();
    let out = run_cmd(
        Command::new("sftp")
            .arg("-F")
            .arg(&cfg)
            .arg("-b")
            .arg(&batch)
            .arg("foo.acme"),
    );
    assert_success(&out, "sftp -b");
    assert!(stdout_of(&out).contains("b.bin"), "{}", fmt_output(&out));
    assert_eq!(sha256_file(&local.join("via-sftp.bin")), want);
    assert!(!remote.join("d").exists(), "sftp rmdir did not happen");
}

fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("top.txt"), "top\n").unwrap();
    fs::write(root.join("a/b/two.txt"), "two\n".repeat(1000)).unwrap();
    write_random_file(&root.join("a/blob.bin"), 3 << 20, 5);
    std::os::unix::fs::symlink("b/two.txt", root.join("a/link")).unwrap();
}

#[test]
fn rsync_both_ways() {
    require_program("rsync", "rsync");
    let c = acme();
    let src = c.scratch("src");
    make_tree(&src);
    let remote = c.dir().join("remote");
    let back = c.dir().join("back");
    let e = ssh_e(&c, "alice");
    let rsync = |from: String, to: String| {
        run_cmd(
            Command::new("rsync")
                .env_remove("RUST_LOG")
                .args(["-a", "-e", &e])
                .arg(from)
                .arg(to),
        )
    };
    let out = rsync(
        format!("{}/", src.display()),
        format!("foo.acme:{}/", remote.display()),
    );
    assert_success(&out, "rsync up");
    assert_eq!(tree_listing(&remote), tree_listing(&src));
    let out = rsync(
        format!("foo.acme:{}/", remote.display()),
        format!("{}/", back.display()),
    );
    assert_success(&out, "rsync down");
    assert_eq!(tree_listing(&back), tree_listing(&src));
}

#[test]
fn git_clone_and_push() {
    let c = acme();
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
    let work = c.scratch("work");
    let e = ssh_e(&c, "alice");
    let git =
        |cwd: &Path, args: &[&str]| run_cmd(git_command(cwd).env("GIT_SSH_COMMAND", &e).args(args));
    assert_success(&git(&work, &["clone", "-q", &url, "clone"]), "git clone");
    let clone = work.join("clone");
    fs::write(clone.join("README"), "embedded\n").unwrap();
    assert_success(&git(&clone, &["add", "README"]), "git add");
    assert_success(
        &git(&clone, &["commit", "-q", "-m", "via embedded"]),
        "commit",
    );
    assert_success(
        &git(&clone, &["push", "-q", "origin", "HEAD:main"]),
        "git push",
    );
    let out = run_cmd(
        git_command(c.dir())
            .arg(format!("--git-dir={}", bare.display()))
            .args(["log", "--format=%s", "main"]),
    );
    assert_eq!(
        stdout_of(&out).trim(),
        "via embedded",
        "{}",
        fmt_output(&out)
    );
    assert_success(
        &git(&work, &["clone", "-q", &url, "clone2"]),
        "second clone",
    );
    assert_eq!(
        fs::read_to_string(work.join("clone2/README")).unwrap(),
        "embedded\n"
    );
}

#[test]
fn command_scoped_peer_runs_only_its_command() {
    let c = acme();
    let out = run_ssh(&c, "bob", &["foo.acme", "ls /"]);
    assert_success(&out, "bob: ls / through the embedded server");
    assert!(
        stdout_of(&out).lines().any(|l| l == "etc"),
        "{}",
        fmt_output(&out)
    );

    for cmd in ["id", "ls; id", "sh -c id"] {
        let out = run_ssh(&c, "bob", &["foo.acme", cmd]);
        // 255, as natively: a denial is malai's refusal (issue 24, item 9).
        assert_exit_code(&out, 255, &format!("bob: {cmd:?}"));
        assert!(!stdout_of(&out).contains("uid="), "{}", fmt_output(&out));
        assert!(
            stderr_of(&out).contains("command not allowed"),
            "{}",
            fmt_output(&out)
        );
    }
    // No shell, with or without a pty, and no sftp.
    let out = run_cmd_with(
        ssh(&c, "bob").args(["-tt", "foo.acme"]),
        Some(b"id\nexit\n"),
        CHILD_TIMEOUT,
    );
    assert_ne!(out.status.code(), Some(0), "{}", fmt_output(&out));
    assert!(!stdout_of(&out).contains("uid="), "{}", fmt_output(&out));
    let batch = c.dir().join("bob.batch");
    fs::write(&batch, "ls /\n").unwrap();
    let out = run_cmd(
        Command::new("sftp")
            .arg("-F")
            .arg(strict_config(&c, "bob"))
            .arg("-b")
            .arg(&batch)
            .arg("foo.acme"),
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "bob got sftp:\n{}",
        fmt_output(&out)
    );

    // Control: alice (full access) gets what bob did not.
    let out = run_ssh(&c, "alice", &["foo.acme", "id -u"]);
    assert_success(&out, "alice: id -u");
}

#[test]
fn unlisted_peer_never_sees_an_ssh_banner() {
    let c = acme();
    let out = c.proxy("eve", "foo.acme");
    assert_exit_code(&out, 255, "eve: malai ssh proxy foo.acme");
    assert!(
        out.stdout.is_empty(),
        "eve got bytes from the server:\n{}",
        fmt_output(&out)
    );
    assert!(
        stderr_of(&out).to_lowercase().contains("permission denied"),
        "{}",
        fmt_output(&out)
    );
    let out = run_ssh(&c, "eve", &["foo.acme", "echo ok"]);
    assert_exit_code(&out, 255, "eve: ssh foo.acme");
    assert!(!stdout_of(&out).contains("ok"));
}

#[test]
fn refused_sshd_falls_back_to_the_embedded_server() {
    // `ssh` points at a port where nothing listens: connection refused → embedded.
    let dead = format!("127.0.0.1:{}", free_tcp_port());
    let c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Addr(dead.clone()))
        .device("alice")
        .allow("foo", &["alice"])
        .build();
    let out = c.ssh("alice", "foo.acme", "echo fallback");
    assert_success(&out, "ssh to a server whose sshd refuses");
    assert_eq!(stdout_of(&out), "fallback\n");
    let log = c.machine("foo").logs();
    assert!(
        log.contains("refused the connection") && log.contains(&dead),
        "the fallback was not logged:\n{}",
        tail(&log, 40)
    );
}

// ---------------------------------------------------------------------------------------------
// Security review round two (issue 19): revocation and channel caps inside a session
// ---------------------------------------------------------------------------------------------

/// `ssh <args>` as `device` with stdout piped; returns once the first line is out.
fn start_ssh(c: &TestCluster, device: &str, args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = ssh(c, device)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn ssh");
    let mut reader = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut reader, &mut sink);
    });
    (child, line)
}

fn pids_matching(marker: &str) -> bool {
    Command::new("pgrep")
        .args(["-f", &format!("^{marker}")])
        .output()
        .expect("pgrep")
        .status
        .success()
}

/// One line from a TCP server on foo's loopback (a remote forward's listener), if any.
fn fetch_line(port: u16) -> Option<String> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn revocation_reaches_every_channel_and_forward_of_an_embedded_session() {
    use std::time::Duration;
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Embedded)
        .device("alice")
        .device("bob")
        .allow("foo", &["alice", "bob"])
        .allow("foo.ls", &["alice"])
        .build();
    // A target for alice's remote forward: answers "hi" to every connection.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target_port = target.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in target.incoming().flatten() {
            let _ = std::io::Write::write_all(&mut { s }, b"hi\n");
        }
    });
    let tag = std::process::id();
    let a_marker = format!("sleep 4{tag}1");
    let b_marker = format!("sleep 4{tag}2");
    let listen = free_port();
    let rspec = format!("127.0.0.1:{listen}:127.0.0.1:{target_port}");
    // One SSH connection of alice's: a shell command and a remote forward.
    let (mut alice, first) = start_ssh(
        &c,
        "alice",
        &["-R", &rspec, "foo.acme", &format!("echo up; {a_marker}")],
    );
    assert_eq!(first, "up\n");
    let (mut bob, first) = start_ssh(&c, "bob", &["foo.acme", &format!("echo up; {b_marker}")]);
    assert_eq!(first, "up\n");
    let served = poll_until(Duration::from_secs(10), || fetch_line(listen));
    assert_eq!(served.as_deref(), Some("hi\n"), "alice's -R does not serve");

    // `forwarding = false`: her existing -R stops, her command in the same session goes on.
    c.edit_manager_file(|t| set_table_keys(&t, "server.foo", &[("forwarding", "false".into())]));
    c.import_on("foo");
    poll_until(Duration::from_secs(10), || {
        fetch_line(listen).is_none().then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "alice's remote forward outlived `forwarding = false` by 10 s\n{}",
            tail(&c.machine("foo").logs(), 30)
        )
    });
    assert!(
        alice.try_wait().unwrap().is_none(),
        "alice's command was cut with her forward"
    );

    // Demoted to an `ls` scope: her running shell command is cut, with its process.
    c.edit_manager_file(|t| set_table_keys(&t, "server.foo", &[("allow-from", toml_str("bob"))]));
    c.import_on("foo");
    let received = std::time::Instant::now();
    let st =
        poll_until(Duration::from_secs(10), || alice.try_wait().unwrap()).unwrap_or_else(|| {
            let _ = alice.kill();
            panic!(
                "alice's shell outlived her demotion by 10 s\n{}",
                tail(&c.machine("foo").logs(), 30)
            )
        });
    assert_eq!(st.code(), Some(255), "a revoked command exits 255: {st:?}");
    eprintln!(
        "embedded revocation: alice's shell ended {:?} after foo received the file",
        received.elapsed()
    );
    poll_until(Duration::from_secs(5), || {
        (!pids_matching(&a_marker)).then_some(())
    })
    .expect("alice's command still runs on foo");
    // What she still has works: a new `ls` through the embedded server.
    let out = run_ssh(&c, "alice", &["foo.acme", "ls /"]);
    assert_success(&out, "alice: ls / after the demotion");

    // Allowed twin: bob's session, in the same server, goes on.
    assert!(bob.try_wait().unwrap().is_none(), "bob's session was cut");
    assert!(pids_matching(&b_marker));
    let _ = bob.kill();
    let _ = bob.wait();
    let audit =
        fs::read_to_string(c.machine("foo").home().join("logs/ssh/audit.log")).unwrap_or_default();
    let revoked: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"revoked\""))
        .collect();
    assert!(
        revoked.iter().any(|l| l.contains("\"forward\""))
            && revoked.iter().any(|l| l.contains("\"exec\"")),
        "the audit log lacks the revoked forward and exec:\n{audit}"
    );
}

#[test]
fn channels_of_one_embedded_connection_count_in_the_per_peer_cap() {
    use std::time::Duration;
    // Small per-peer cap: the connection's `tunnel` takes one slot, each channel another.
    const MAX: usize = 4;
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Embedded)
        .device("bob")
        .device("carol")
        .allow("foo.sleep", &["bob"])
        .allow("foo.ls", &["carol"])
        .start_servers(false)
        .build();
    let bind = c.server_bind("foo");
    let _server = c.machine("foo").spawn_server_with_args(&[
        "--bind".to_string(),
        bind.to_string(),
        "--max-requests-per-peer".to_string(),
        MAX.to_string(),
    ]);
    // One OpenSSH connection of bob's, multiplexed: every `ssh -S` is a channel on it.
    let mux = c.dir().join("bob.mux");
    let mux_s = mux.display().to_string();
    let mut master = ssh(&c, "bob")
        .args(["-M", "-S", &mux_s, "-N", "foo.acme"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ssh -M");
    poll_until(Duration::from_secs(15), || mux.exists().then_some(()))
        .expect("the control master did not come up");
    let tag = std::process::id();
    let marker = format!("6{tag}");
    let mut held = vec![];
    for _ in 0..MAX - 1 {
        let child = ssh(&c, "bob")
            .args(["-S", &mux_s, "foo.acme", &format!("sleep {marker}")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        held.push(child);
    }
    let count = || {
        let out = Command::new("pgrep")
            .args(["-c", "-f", &format!("^sleep {marker}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse::<usize>()
            .unwrap_or(0)
    };
    poll_until(Duration::from_secs(15), || {
        (count() == MAX - 1).then_some(())
    })
    .unwrap_or_else(|| panic!("{} of {} sleeps run", count(), MAX - 1));
    // One more channel is over bob's cap: refused, nothing runs.
    let out = run_ssh(
        &c,
        "bob",
        &["-S", &mux_s, "foo.acme", &format!("sleep {marker}")],
    );
    assert_ne!(out.status.code(), Some(0), "{}", fmt_output(&out));
    assert!(
        stderr_of(&out).contains("too many concurrent requests"),
        "{}",
        fmt_output(&out)
    );
    assert_eq!(count(), MAX - 1);
    // Deny twin's allowed side: another peer is served meanwhile.
    let out = run_ssh(&c, "carol", &["foo.acme", "ls /"]);
    assert_success(&out, "carol while bob is at his cap");
    // Freed slots are reusable.
    for mut h in held.drain(..) {
        let _ = h.kill();
        let _ = h.wait();
    }
    poll_until(Duration::from_secs(10), || (count() == 0).then_some(()))
        .expect("bob's sleeps did not end with their channels");
    let out = run_ssh(&c, "bob", &["-S", &mux_s, "foo.acme", "sleep 0"]);
    assert_success(&out, "bob after his channels closed");
    let _ = master.kill();
    let _ = master.wait();
}

#[test]
fn peer_supplied_control_characters_reach_no_log_line_and_no_terminal() {
    let c = acme();
    // Text a member would like to see as a line of its own in foo's logs, with an escape
    // sequence that clears the admin's screen.
    let forged = "FORGED-19\u{1b}[2J";
    // Through the embedded server: a refused command (its program is logged). (OpenSSH's
    // client refuses such SSH user names; the same one writer escapes those too.)
    let out = run_ssh(&c, "bob", &["foo.acme", &format!("id\n{forged}")]);
    assert_exit_code(&out, 255, "bob's refused command");
    // Natively: a denied exec whose command line goes to the audit log.
    let out = c.machine("eve").run([
        "ssh",
        "foo.acme",
        &format!("id\r\n{forged}\u{1b}]0;pwned\u{7}"),
    ]);
    assert_exit_code(&out, 255, "eve is denied");
    // Allowed twin: bob's ordinary command runs and is logged as it is.
    assert_success(&run_ssh(&c, "bob", &["foo.acme", "ls /"]), "bob: ls /");

    let logs = c.machine("foo").logs();
    assert!(
        logs.contains("FORGED-19"),
        "the forged text is not logged at all"
    );
    let bad: Vec<&str> = logs
        .lines()
        .filter(|l| l.starts_with("FORGED-19") || l.contains('\u{1b}') || l.contains('\r'))
        .collect();
    assert!(bad.is_empty(), "forged log lines: {bad:?}");
    let table = c.machine("foo").run_ok(["ssh", "audit"]);
    assert!(table.contains("FORGED-19"), "{table}");
    assert!(
        !table.chars().any(|ch| ch.is_control() && ch != '\n'),
        "control characters in `malai ssh audit`: {table:?}"
    );
    assert!(
        !table.lines().any(|l| l.starts_with("FORGED-19")),
        "{table}"
    );
    assert_eq!(
        table.lines().filter(|l| l.contains("FORGED-19")).count(),
        2,
        "eve's native denial and bob's embedded refusal, one row each: {table}"
    );
    // Every embedded channel's decision is audited, the allowed one too.
    assert!(table.contains("ls /"), "{table}");
}
