//! The malai protocol over plain OpenSSH: `malai ssh stdinserver <identity>` as a real
//! sshd's forced command, and clients reaching the server through `ssh-via`.
//!
//! Cluster `acme`: manager `mgr`; server `foo` (a real sshd in front of it, which is both
//! the tunnel target and the OpenSSH transport for `ssh-via`); devices `alice` (full access
//! on foo) and `eve` (a member with no access). The server entry carries
//! `ssh-via = "root@127.0.0.1:<sshd port>"` and `ssh-identity-file = <key>`, and that key is
//! bound in sshd's `authorized_keys` to `command="… malai ssh stdinserver alice@acme",restrict`.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::harness::*;

pub(crate) struct Shim {
    pub(crate) c: TestCluster,
    /// The key bound to the forced command.
    key: PathBuf,
    /// `MALAI_SSH_COMMAND`: ssh with test options (no user config, own known_hosts).
    pub(crate) ssh_command: String,
}

/// The `authorized_keys` line binding `key` to `stdinserver <identity>` on foo.
fn forced_line(c: &TestCluster, key: &std::path::Path, identity: &str) -> String {
    let pubkey = fs::read_to_string(key.with_extension("pub")).expect("pubkey");
    format!(
        "command=\"{} ssh stdinserver {identity}\",restrict {}",
        c.machine("foo").env_command_prefix(),
        pubkey.trim()
    )
}

pub(crate) fn shim() -> Shim {
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server("foo")
        .device("alice")
        .device("eve")
        .allow("foo", &["alice"])
        .build();
    let sshd = c.sshd("foo");
    let key = sshd.new_client_key("via_key");
    sshd.add_authorized_key_line(&forced_line(&c, &key, "alice@acme"));
    let via = format!("root@127.0.0.1:{}", sshd.port());
    c.edit_manager_file(|t| {
        set_table_keys(
            &t,
            "server.foo",
            &[
                ("ssh-via", toml_str(&via)),
                ("ssh-identity-file", toml_str(&key.display().to_string())),
            ],
        )
    });
    c.distribute();
    let ssh_command = format!(
        "ssh -F /dev/null -o BatchMode=yes -o UserKnownHostsFile={} -o StrictHostKeyChecking=accept-new -o LogLevel=ERROR",
        c.dir().join("via_known_hosts").display()
    );
    Shim {
        c,
        key,
        ssh_command,
    }
}

impl Shim {
    /// `malai <args>` as `device`, reaching servers through ssh-via.
    fn malai(&self, device: &str, args: &[&str]) -> Output {
        let mut cmd = self.c.machine(device).cmd(args);
        cmd.env("MALAI_SSH_COMMAND", &self.ssh_command);
        run_cmd(&mut cmd)
    }

    fn malai_with_stdin(&self, device: &str, args: &[&str], stdin: &[u8]) -> Output {
        let mut cmd = self.c.machine(device).cmd(args);
        cmd.env("MALAI_SSH_COMMAND", &self.ssh_command);
        run_cmd_with(&mut cmd, Some(stdin), CHILD_TIMEOUT)
    }

    /// How many forced-command sessions sshd has accepted with the bound key.
    fn forced_sessions(&self) -> usize {
        self.c
            .sshd("foo")
            .log()
            .matches("Accepted publickey")
            .count()
    }
}

#[test]
fn native_exec_over_ssh_via() {
    let s = shim();
    let before = s.forced_sessions();
    let out = s.malai("alice", &["ssh", "foo.acme", "echo ok"]);
    assert_success(&out, "alice: malai ssh foo.acme 'echo ok' (ssh-via)");
    assert_eq!(stdout_of(&out), "ok\n", "{}", fmt_output(&out));
    assert!(
        s.forced_sessions() > before,
        "the request did not go through sshd:\n{}",
        s.c.sshd("foo").log()
    );

    // Exit status, separate stderr and stdin (with EOF) pass through the forced command.
    let out = s.malai("alice", &["ssh", "foo.acme", "echo err >&2; exit 7"]);
    assert_exit_code(&out, 7, "exit 7 over ssh-via");
    assert_eq!(stderr_of(&out), "err\n", "{}", fmt_output(&out));
    let out = s.malai_with_stdin("alice", &["ssh", "foo.acme", "wc -c"], &[b'x'; 100_000]);
    assert_success(&out, "stdin over ssh-via");
    assert_eq!(stdout_of(&out).trim(), "100000", "{}", fmt_output(&out));

    let server_log = s.c.machine("foo").logs();
    assert!(
        server_log.contains("stdinserver"),
        "the server log does not mention the stdinserver transport:\n{}",
        tail(&server_log, 50)
    );
}

#[test]
fn rsync_and_proxy_over_ssh_via() {
    let s = shim();
    let src = s.c.scratch("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("a.txt"), "a\n").unwrap();
    write_random_file(&src.join("d/blob.bin"), 2 << 20, 7);
    let dst = s.c.dir().join("dst");
    let malai = s.c.machine("alice");
    let mut rsync = Command::new("rsync");
    rsync
        .env_remove("RUST_LOG")
        .envs(malai.env())
        .env("MALAI_SSH_COMMAND", &s.ssh_command)
        .arg("-a")
        .arg("-e")
        .arg(format!("{MALAI} ssh"))
        .arg(format!("{}/", src.display()))
        .arg(format!("foo.acme:{}/", dst.display()));
    require_program("rsync", "rsync");
    let out = run_cmd(&mut rsync);
    assert_success(&out, "rsync -e 'malai ssh' over ssh-via");
    assert_eq!(tree_listing(&dst), tree_listing(&src));

    // `malai ssh proxy` over ssh-via: OpenSSH through a tunnel that itself rides OpenSSH.
    let mut ssh = s.c.ssh_cmd("alice");
    ssh.env("MALAI_SSH_COMMAND", &s.ssh_command)
        .arg("foo.acme")
        .arg("echo tunnelled");
    let out = run_cmd(&mut ssh);
    assert_success(&out, "ssh with ProxyCommand malai ssh proxy (ssh-via)");
    assert_eq!(stdout_of(&out), "tunnelled\n", "{}", fmt_output(&out));
}

#[test]
fn identity_unknown_to_the_cluster_is_denied() {
    let s = shim();
    // The same key, now bound to an identity the cluster file does not know.
    let sshd = s.c.sshd("foo");
    sshd.set_authorized_keys(&forced_line(&s.c, &s.key, "mallory@acme"));
    let out = s.malai("alice", &["ssh", "foo.acme", "echo ok"]);
    assert_exit_code(&out, 255, "identity mallory");
    assert!(
        !stdout_of(&out).contains("ok"),
        "a denied request ran:\n{}",
        fmt_output(&out)
    );
    assert!(
        stderr_of(&out).contains("not a member"),
        "expected `not a member` on stderr:\n{}",
        fmt_output(&out)
    );

    // A member with no access on foo: the ACL denies, as over iroh.
    sshd.set_authorized_keys(&forced_line(&s.c, &s.key, "eve@acme"));
    let out = s.malai("alice", &["ssh", "foo.acme", "echo ok"]);
    assert_exit_code(&out, 255, "identity eve");
    assert!(
        stderr_of(&out).to_lowercase().contains("permission denied"),
        "{}",
        fmt_output(&out)
    );

    // A bare alias names no cluster (on a server of several clusters it would be every
    // `alice`): refused before any ACL, with the fix in the message.
    sshd.set_authorized_keys(&forced_line(&s.c, &s.key, "alice"));
    let out = s.malai("alice", &["ssh", "foo.acme", "echo ok"]);
    assert_exit_code(&out, 255, "identity alice (no cluster)");
    assert!(!stdout_of(&out).contains("ok"), "{}", fmt_output(&out));
    assert!(
        stderr_of(&out).contains("alice@<cluster>"),
        "expected the alias@cluster hint on stderr:\n{}",
        fmt_output(&out)
    );
    // A cluster this server does not serve.
    sshd.set_authorized_keys(&forced_line(&s.c, &s.key, "alice@other"));
    let out = s.malai("alice", &["ssh", "foo.acme", "echo ok"]);
    assert_exit_code(&out, 255, "identity alice@other");
    assert!(!stdout_of(&out).contains("ok"), "{}", fmt_output(&out));

    // An id52 that is in the cluster file works like its alias (control).
    let alice = s.c.id52("alice").to_string();
    sshd.set_authorized_keys(&forced_line(&s.c, &s.key, &alice));
    let out = s.malai("alice", &["ssh", "foo.acme", "echo ok"]);
    assert_success(&out, "identity = alice's id52");
    assert_eq!(stdout_of(&out), "ok\n");
}

#[test]
fn plain_ssh_with_the_key_gets_only_the_protocol() {
    let s = shim();
    let sshd = s.c.sshd("foo");

    // A shell: nothing on stdout, an explanation on stderr, exit 255.
    let out = run_cmd(&mut sshd.direct_ssh_with_key(&s.key));
    assert_exit_code(&out, 255, "plain ssh (shell) with the forced-command key");
    assert!(out.stdout.is_empty(), "{}", fmt_output(&out));
    assert!(
        stderr_of(&out).contains("only carries the malai protocol"),
        "{}",
        fmt_output(&out)
    );

    // A command is ignored (SSH_ORIGINAL_COMMAND); typed input gets the protocol's error
    // frame and nothing else.
    let mut cmd = sshd.direct_ssh_with_key(&s.key);
    cmd.arg("echo hacked; id");
    let out = run_cmd_with(&mut cmd, Some(b"id\nls /\necho hacked\n"), CHILD_TIMEOUT);
    assert_exit_code(&out, 255, "plain ssh (command + input)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.stdout.starts_with(b"mssh") && stdout.contains("not a malai protocol stream"),
        "expected only a protocol error frame on stdout:\n{}",
        fmt_output(&out)
    );
    assert!(
        !stdout.contains("hacked") && !stdout.contains("uid="),
        "{}",
        fmt_output(&out)
    );
}

#[test]
fn server_refuses_a_non_private_runtime_dir() {
    let c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Embedded)
        .start_servers(false)
        .build();
    let foo = c.machine("foo");
    let run = foo.home().join("run");
    fs::create_dir_all(&run).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&run, fs::Permissions::from_mode(0o755)).unwrap();
    let bind = format!("127.0.0.1:{}", free_udp_port());
    let out = foo.run(["ssh", "server", "--bind", bind.as_str()]);
    assert_exit_code(&out, 255, "malai ssh server with a 0755 runtime dir");
    let err = stderr_of(&out);
    assert!(
        err.contains("not private") && err.contains(&run.display().to_string()),
        "expected a message naming the runtime dir:\n{}",
        fmt_output(&out)
    );
    assert!(!err.contains("server ready"), "{}", fmt_output(&out));

    // Deny twin: 0700 starts.
    fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
    let mut p = foo.spawn_server(bind.parse().unwrap());
    assert!(p.is_running());
}

/// Issue 19, finding 1, through a real sshd: a key forced to `stdinserver` but *without*
/// `restrict` can `ssh -N -L x.sock:<run dir>/server-control.sock` — the forced command never
/// runs and sshd connects as the server's uid. Through that forward the key holder answers
/// the hello and nothing more: the token is in a file the forwarding key cannot read.
#[test]
fn a_socket_forward_from_a_key_without_restrict_gets_nothing_from_the_holder() {
    use malai::control::protocol::{self, FromHolder, ToHolder, VERSION};
    use std::time::Duration;
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server("foo")
        .device("bob")
        .allow("foo", &["bob"])
        .build();
    let sshd = c.sshd("foo");
    let key = sshd.new_client_key("unrestricted_key");
    let pubkey = fs::read_to_string(key.with_extension("pub")).expect("pubkey");
    // The admin's mistake: no `restrict`.
    sshd.add_authorized_key_line(&format!(
        "command=\"{} ssh stdinserver bob@acme\" {}",
        c.machine("foo").env_command_prefix(),
        pubkey.trim()
    ));
    let remote = c.machine("foo").home().join("run/server-control.sock");
    let local = c.dir().join("stolen-control.sock");
    let mut fwd = Command::new("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            c.dir().join("fwd_known_hosts").display()
        ))
        .args([
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "IdentitiesOnly=yes",
        ])
        .arg("-i")
        .arg(&key)
        .args(["-N", "-p", &sshd.port().to_string(), "-L"])
        .arg(format!("{}:{}", local.display(), remote.display()))
        .arg("root@127.0.0.1")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("ssh -N -L");
    poll_until(Duration::from_secs(15), || local.exists().then_some(()))
        .expect("the socket forward did not come up");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let ask = |token: Option<String>| {
        rt.block_on(async {
            let mut s = tokio::net::UnixStream::connect(&local).await.unwrap();
            protocol::write(
                &mut s,
                &ToHolder::Hello {
                    version: VERSION,
                    token,
                },
            )
            .await
            .unwrap();
            let hello: FromHolder = protocol::read(&mut s).await.expect("no hello");
            assert!(matches!(hello, FromHolder::Hello(_)), "{hello:?}");
            let _ = protocol::write(&mut s, &ToHolder::Status).await;
            tokio::time::timeout(
                Duration::from_secs(10),
                protocol::read::<_, FromHolder>(&mut s),
            )
            .await
            .expect("no answer")
        })
    };
    // What the forwarding key can do: no token.
    let got = ask(None);
    assert!(
        matches!(&got, Ok(FromHolder::Failed { message, .. }) if message.contains("token")),
        "the holder served a forwarded connection without its token: {got:?}"
    );
    // Control: the forward itself works (with the token, which only foo's own user can
    // read from its file, the same path is served).
    let token = malai::control::token::read(&remote).expect("token file");
    let got = ask(Some(token));
    assert!(matches!(got, Ok(FromHolder::Status(_))), "{got:?}");
    let _ = fwd.kill();
    let _ = fwd.wait();
}
