//! The OpenSSH bridge end to end: real `ssh`, `scp`, `rsync` and `git` reach a real sshd
//! through `malai ssh proxy` (ProxyCommand) and `malai ssh server`, the ACL denies before
//! sshd is ever contacted, the server exits 0 on SIGTERM and picks up allow-list changes
//! without a restart.
//!
//! Cluster `acme`: manager `mgr`; server `foo` with an sshd behind it; devices `alice`
//! (`allow foo alice`), `bob` (only `[server.foo.ls] allow-from = "bob"`), `eve` (a member
//! with no access).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use crate::harness::*;

/// How long a denied attempt has to show up in sshd's log if it (wrongly) reached sshd.
const SSHD_LOG_SETTLE: Duration = Duration::from_millis(300);

fn acme() -> TestCluster {
    TestCluster::builder("acme")
        .manager("mgr")
        .server("foo")
        .device("alice")
        .device("bob")
        .device("eve")
        .allow("foo", &["alice"])
        .allow("foo.ls", &["bob"])
        .build()
}

fn lower_stderr(out: &std::process::Output) -> String {
    stderr_of(out).to_lowercase()
}

/// Asserts sshd saw no connection beyond `before`, after giving a stray one time to be logged.
fn assert_sshd_not_contacted(c: &TestCluster, before: usize, what: &str) {
    std::thread::sleep(SSHD_LOG_SETTLE);
    let sshd = c.sshd("foo");
    assert_eq!(
        sshd.connection_count(),
        before,
        "{what}: sshd was contacted although the request must be denied first:\n{}",
        sshd.log()
    );
}

#[test]
fn ssh_runs_commands_and_passes_exit_status() {
    let c = acme();
    let before = c.sshd("foo").connection_count();

    let out = c.ssh("alice", "foo.acme", "echo ok");
    assert_success(&out, "alice: ssh foo.acme 'echo ok'");
    assert_eq!(stdout_of(&out), "ok\n", "{}", fmt_output(&out));

    let out = c.ssh("alice", "foo.acme", "exit 7");
    assert_exit_code(&out, 7, "alice: ssh foo.acme 'exit 7'");

    // Both sessions really went to the sshd behind foo.
    assert!(
        c.sshd("foo").connection_count() >= before + 2,
        "sshd did not log the two sessions:\n{}",
        c.sshd("foo").log()
    );
}

#[test]
fn scp_64mib_both_directions_sftp_and_legacy() {
    let c = acme();
    let local = c.scratch("local");
    let remote = c.scratch("remote");
    let src = local.join("big.bin");
    write_random_file(&src, 64 << 20, 0x6d61_6c61_6973_7368);
    let want = sha256_file(&src);

    for (mode, flags) in [("sftp", &[][..]), ("legacy", &["-O"][..])] {
        let up = remote.join(format!("up-{mode}.bin"));
        let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        args.push(src.display().to_string());
        args.push(format!("foo.acme:{}", up.display()));
        let out = c.scp("alice", &args);
        assert_success(&out, &format!("scp ({mode}) upload"));
        assert_eq!(
            sha256_file(&up),
            want,
            "scp ({mode}) upload corrupted the file"
        );

        let down = local.join(format!("down-{mode}.bin"));
        let mut args: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
        args.push(format!("foo.acme:{}", up.display()));
        args.push(down.display().to_string());
        let out = c.scp("alice", &args);
        assert_success(&out, &format!("scp ({mode}) download"));
        assert_eq!(
            sha256_file(&down),
            want,
            "scp ({mode}) download corrupted the file"
        );
    }
}

/// Nested dirs, a few files (one binary), an empty dir and a relative symlink.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("top.txt"), "top\n").unwrap();
    fs::write(root.join("a/one.txt"), "one\n").unwrap();
    fs::write(root.join("a/b/two.txt"), "two\n".repeat(1000)).unwrap();
    write_random_file(&root.join("a/b/c/blob.bin"), 3 << 20, 42);
    symlink("b/two.txt", root.join("a/link-to-two")).unwrap();
}

#[test]
fn rsync_tree_up_and_down_then_nothing_to_do() {
    let c = acme();
    let src = c.scratch("tree-src");
    make_tree(&src);
    let remote = c.dir().join("tree-remote");
    let back = c.dir().join("tree-back");
    let remote_spec = format!("foo.acme:{}/", remote.display());
    let src_spec = format!("{}/", src.display());
    let back_spec = format!("{}/", back.display());

    let out = c.rsync("alice", &["-a", &src_spec, &remote_spec]);
    assert_success(&out, "rsync -a up");
    assert_eq!(
        tree_listing(&remote),
        tree_listing(&src),
        "tree after upload"
    );

    let out = c.rsync("alice", &["-a", &remote_spec, &back_spec]);
    assert_success(&out, "rsync -a down");
    assert_eq!(
        tree_listing(&back),
        tree_listing(&src),
        "tree after download"
    );

    let out = c.rsync(
        "alice",
        &["-a", "--itemize-changes", &src_spec, &remote_spec],
    );
    assert_success(&out, "second rsync up");
    assert_eq!(
        stdout_of(&out).trim(),
        "",
        "second rsync up transferred something"
    );

    let out = c.rsync("alice", &["-a", "--stats", &remote_spec, &back_spec]);
    assert_success(&out, "second rsync down");
    assert!(
        stdout_of(&out).contains("Number of regular files transferred: 0"),
        "second rsync down transferred something:\n{}",
        fmt_output(&out)
    );
}

#[test]
fn git_clone_commit_push() {
    let c = acme();
    let bare = c.dir().join("srv/repo.git");
    fs::create_dir_all(&bare).unwrap();
    let out = run_cmd(
        git_command(c.dir())
            .args(["init", "--bare", "-q", "-b", "main"])
            .arg(&bare),
    );
    assert_success(&out, "git init --bare");
    let url = format!("foo.acme:{}", bare.display());

    let work = c.scratch("work");
    let out = c.git("alice", &work, &["clone", "-q", &url, "clone"]);
    assert_success(&out, "git clone (empty repo) through malai");
    let clone = work.join("clone");
    fs::write(clone.join("README"), "hello through malai\n").unwrap();
    assert_success(&c.git("alice", &clone, &["add", "README"]), "git add");
    assert_success(
        &c.git(
            "alice",
            &clone,
            &["commit", "-q", "-m", "first commit via malai"],
        ),
        "git commit",
    );
    let out = c.git("alice", &clone, &["push", "-q", "origin", "HEAD:main"]);
    assert_success(&out, "git push through malai");

    let out = run_cmd(
        git_command(c.dir())
            .arg(format!("--git-dir={}", bare.display()))
            .args(["log", "--format=%s", "main"]),
    );
    assert_success(&out, "git log on the bare repo");
    assert_eq!(stdout_of(&out).trim(), "first commit via malai");

    // A second clone now fetches real objects over the bridge.
    let out = c.git("alice", &work, &["clone", "-q", &url, "clone2"]);
    assert_success(&out, "git clone (non-empty repo) through malai");
    assert_eq!(
        fs::read_to_string(work.join("clone2/README")).unwrap(),
        "hello through malai\n"
    );
}

#[test]
fn member_without_access_is_denied_before_sshd() {
    let c = acme();
    let before = c.sshd("foo").connection_count();

    let out = c.ssh("eve", "foo.acme", "echo ok");
    assert_exit_code(&out, 255, "eve: ssh foo.acme");
    assert!(
        lower_stderr(&out).contains("permission denied"),
        "eve: expected `permission denied` on stderr\n{}",
        fmt_output(&out)
    );
    assert!(!stdout_of(&out).contains("ok"), "{}", fmt_output(&out));

    // The ProxyCommand on its own: exit 255, nothing on the data channel, one `malai: ` line.
    let out = c.proxy("eve", "foo.acme");
    assert_exit_code(&out, 255, "eve: malai ssh proxy foo.acme");
    assert!(
        out.stdout.is_empty(),
        "proxy wrote to stdout\n{}",
        fmt_output(&out)
    );
    let err = stderr_of(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("malai: ") && err.ends_with('\n'),
        "proxy stderr must be exactly one line starting with `malai: `, got {err:?}"
    );
    assert_sshd_not_contacted(&c, before, "eve");

    // Control: the same setup lets alice through, so the denial above was the ACL.
    let out = c.ssh("alice", "foo.acme", "echo ok");
    assert_success(&out, "alice: ssh foo.acme (control)");
}

#[test]
fn command_scoped_peer_gets_no_tunnel() {
    let c = acme();
    let before = c.sshd("foo").connection_count();
    let out = c.ssh("bob", "foo.acme", "ls");
    assert_exit_code(&out, 255, "bob: ssh foo.acme ls");
    assert!(
        lower_stderr(&out).contains("permission denied"),
        "bob: expected `permission denied` on stderr\n{}",
        fmt_output(&out)
    );
    assert_sshd_not_contacted(&c, before, "bob");
}

#[test]
fn unknown_host_is_a_clear_error() {
    let c = acme();
    let before = c.sshd("foo").connection_count();
    let out = c.ssh("alice", "nosuch.acme", "echo ok");
    assert_exit_code(&out, 255, "alice: ssh nosuch.acme");
    let err = lower_stderr(&out);
    assert!(
        err.contains("nosuch")
            && ["unknown", "not found", "no such"]
                .iter()
                .any(|w| err.contains(w)),
        "expected an `unknown host` error naming nosuch.acme\n{}",
        fmt_output(&out)
    );
    assert_sshd_not_contacted(&c, before, "nosuch.acme");
}

#[test]
fn server_exits_zero_on_sigterm() {
    let mut c = acme();
    // Serve something first so shutdown has state to drain.
    assert_success(
        &c.ssh("alice", "foo.acme", "true"),
        "alice: ssh foo.acme true",
    );
    let status = c.stop_server("foo");
    assert_eq!(
        status.code(),
        Some(0),
        "malai ssh server on SIGTERM: {}\n{}",
        ServerProcess::describe_status(&status),
        read_lossy(&c.machine("foo").home().join("server.stderr"))
    );
}

#[test]
fn allow_list_change_applies_without_restart() {
    let mut c = acme();
    let out = c.ssh("eve", "foo.acme", "echo ok");
    assert_exit_code(&out, 255, "eve before the change");
    let pid = c.server_process("foo").pid();

    c.manager()
        .run_ok(["ssh", "cluster", "allow", "foo", "eve"]);
    c.import_on("foo");

    let mut last = None;
    let ok = poll_until(Duration::from_secs(10), || {
        let out = c.ssh("eve", "foo.acme", "echo ok");
        let done = out.status.success() && stdout_of(&out) == "ok\n";
        last = Some(out);
        done.then_some(())
    });
    assert!(
        ok.is_some(),
        "eve still not allowed 10 s after the allow-list change; last attempt:\n{}",
        last.as_ref().map(fmt_output).unwrap_or_default()
    );
    let server = c.server_process("foo");
    assert!(server.is_running(), "the server died while reloading");
    assert_eq!(server.pid(), pid, "the server was restarted");
}
