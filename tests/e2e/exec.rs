//! Native exec end to end: `malai ssh <host> <command>` as a drop-in for `ssh` (issue 3).
//!
//! Exit codes and signal deaths as ssh reports them (checked against real `ssh` to the
//! harness sshd), stdout/stderr kept apart and binary-safe, 256 MiB each way, `rsync -e` and
//! `GIT_SSH_COMMAND` with `malai ssh`, a real pty under `script`, the remote child killed
//! when the client dies, command-scoped peers that never get a shell, and group fan-out.
//!
//! Cluster `acme`: manager `mgr`; server `foo` (no sshd unless a test needs one); devices
//! `alice` (full access on foo), `bob` (only `[server.foo.ls] allow-from = "bob"`), `eve`
//! (a member with no access).

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;

use crate::harness::*;

/// The bound for the remote child to disappear after the client is killed.
const REMOTE_GONE_WITHIN: Duration = Duration::from_secs(5);

fn acme_with(foo: SshTarget) -> TestCluster {
    TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", foo)
        .device("alice")
        .device("bob")
        .device("eve")
        .allow("foo", &["alice"])
        .allow("foo.ls", &["bob"])
        .build()
}

fn acme() -> TestCluster {
    acme_with(SshTarget::Unset)
}

/// `malai ssh <args…>` as `device`, stdin /dev/null.
fn malai_ssh(c: &TestCluster, device: &str, args: &[&str]) -> Output {
    let mut full = vec!["ssh"];
    full.extend_from_slice(args);
    c.machine(device).run(full)
}

/// `env … <malai> ssh`: what `rsync -e`, `GIT_SSH_COMMAND` and `script -c` get, since they
/// run it through a shell or `exec` and the machine's environment must come along.
fn malai_ssh_command_line(c: &TestCluster, device: &str) -> String {
    format!("{} ssh", c.machine(device).env_command_prefix())
}

/// Asserts the output is a malai failure: exit 255, nothing on stdout, and exactly one
/// stderr line that starts with `malai: ` and contains `needle` (case-insensitive).
fn assert_one_malai_line(out: &Output, needle: &str, what: &str) {
    assert_exit_code(out, 255, what);
    assert!(
        out.stdout.is_empty(),
        "{what}: stdout must be empty\n{}",
        fmt_output(out)
    );
    let err = stderr_of(out);
    let lines: Vec<&str> = err.lines().collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("malai: ") && err.ends_with('\n'),
        "{what}: stderr must be exactly one line starting with `malai: `, got {err:?}"
    );
    assert!(
        err.to_lowercase().contains(&needle.to_lowercase()),
        "{what}: expected {needle:?} in {err:?}"
    );
}

/// Runs `cmd` with stdin from a file (or /dev/null) and stdout into a file (or captured),
/// stderr captured, under the harness watchdog rules: own process group, killed after
/// `CHILD_TIMEOUT`. Big streams never pass through the test's memory.
fn run_with_files(cmd: &mut Command, stdin: Option<&Path>, stdout: Option<&Path>) -> Output {
    let what = format!("{cmd:?}");
    cmd.process_group(0)
        .stdin(match stdin {
            Some(p) => Stdio::from(fs::File::open(p).expect("open stdin file")),
            None => Stdio::null(),
        })
        .stdout(match stdout {
            Some(p) => Stdio::from(fs::File::create(p).expect("create stdout file")),
            None => Stdio::piped(),
        })
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let pgid = Pid::from_raw(child.id() as i32);
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .map(|r| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    })
    .collect();
    let status = poll_until(CHILD_TIMEOUT, || child.try_wait().expect("try_wait"));
    let Some(status) = status else {
        let _ = signal::killpg(pgid, Signal::SIGKILL);
        let _ = child.wait();
        panic!("timed out after {CHILD_TIMEOUT:?} (killed): {what}");
    };
    let mut it = readers
        .into_iter()
        .map(|t| t.join().expect("reader thread"));
    Output {
        status,
        stdout: it.next().unwrap_or_default(),
        stderr: it.next().unwrap_or_default(),
    }
}

// ---------------------------------------------------------------------------------------------
// Exit status, streams, arguments
// ---------------------------------------------------------------------------------------------

#[test]
fn exit_codes_pass_through_and_signal_death_is_255_like_ssh() {
    let c = acme_with(SshTarget::Sshd);
    for code in [0, 1, 7, 255] {
        let cmd = format!("exit {code}");
        let out = malai_ssh(&c, "alice", &["foo.acme", &cmd]);
        assert_exit_code(&out, code, &format!("malai ssh foo.acme '{cmd}'"));
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "'{cmd}' must print nothing\n{}",
            fmt_output(&out)
        );
    }

    // The remote shell killed by a signal: ssh exits 255; so must we.
    let ours = malai_ssh(&c, "alice", &["foo.acme", "echo before; kill -9 $$"]);
    let theirs = run_cmd(c.sshd("foo").direct_ssh().arg("echo before; kill -9 $$"));
    assert_exit_code(&theirs, 255, "real ssh, remote killed by SIGKILL (control)");
    assert_exit_code(&ours, 255, "malai ssh, remote killed by SIGKILL");
    assert_eq!(stdout_of(&ours), "before\n", "{}", fmt_output(&ours));
    assert_eq!(stdout_of(&ours), stdout_of(&theirs));
}

#[test]
fn stdout_and_stderr_stay_apart_and_binary_safe() {
    let c = acme();
    let out = malai_ssh(&c, "alice", &["foo.acme", "echo out; echo err >&2"]);
    assert_success(&out, "malai ssh foo.acme 'echo out; echo err >&2'");
    assert_eq!(stdout_of(&out), "out\n", "{}", fmt_output(&out));
    assert_eq!(stderr_of(&out), "err\n", "{}", fmt_output(&out));

    // Every byte value, several times over, through stdin and back on each stream alone.
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 256) as u8).rev().collect();
    let mut cmd = c.machine("alice").cmd(["ssh", "foo.acme", "cat"]);
    let out = run_cmd_with(&mut cmd, Some(&data), CHILD_TIMEOUT);
    assert_success(&out, "malai ssh foo.acme cat (binary)");
    assert!(out.stdout == data, "stdout is not the bytes sent");
    assert!(out.stderr.is_empty(), "{}", fmt_output(&out));

    let mut cmd = c.machine("alice").cmd(["ssh", "foo.acme", "cat >&2"]);
    let out = run_cmd_with(&mut cmd, Some(&data), CHILD_TIMEOUT);
    assert_success(&out, "malai ssh foo.acme 'cat >&2' (binary)");
    assert!(out.stderr == data, "stderr is not the bytes sent");
    assert!(out.stdout.is_empty(), "stdout must be empty");

    // A command given as several words is joined like ssh does; `-n` gives no stdin.
    let out = malai_ssh(
        &c,
        "alice",
        &["foo.acme", "echo", "a", "'b   c'", "$((6*7))"],
    );
    assert_success(&out, "malai ssh foo.acme echo … (several words)");
    assert_eq!(stdout_of(&out), "a b   c 42\n");
    let mut cmd = c.machine("alice").cmd(["ssh", "-n", "foo.acme", "wc -c"]);
    let out = run_cmd_with(&mut cmd, Some(b"not to be read"), CHILD_TIMEOUT);
    assert_success(&out, "malai ssh -n foo.acme 'wc -c'");
    assert_eq!(stdout_of(&out).trim(), "0", "{}", fmt_output(&out));

    // Like OpenSSH's `AcceptEnv LANG LC_*`: only those names reach the command.
    let mut cmd = c.machine("alice").cmd([
        "ssh",
        "foo.acme",
        "echo \"[$LANG] [$LC_MESSAGES] [$MALAI_E2E_SECRET]\"",
    ]);
    cmd.env("LANG", "C.UTF-8")
        .env("LC_MESSAGES", "C")
        .env("MALAI_E2E_SECRET", "leaked");
    let out = run_cmd(&mut cmd);
    assert_success(&out, "malai ssh foo.acme echo $LANG …");
    assert_eq!(
        stdout_of(&out),
        "[C.UTF-8] [C] []\n",
        "{}",
        fmt_output(&out)
    );

    // The argument shapes rsync, git and muscle memory give to ssh. (Issue 24: a user
    // other than the server's and an `-o` keyword OpenSSH does not know are refused now,
    // see `a_user_other_than_the_servers_is_refused_by_name`; the shapes use accepted ones.)
    let me = own_user();
    let at_host = format!("{me}@foo.acme");
    let out = malai_ssh(
        &c,
        "alice",
        &[
            "-p",
            "22",
            "-l",
            &me,
            "-o",
            "BatchMode=yes",
            "-oServerAliveInterval=1",
            "-x",
            "-a",
            "-4",
            "-e",
            "none",
            "-T",
            "--",
            &at_host,
            "echo",
            "shapes ok",
        ],
    );
    assert_success(&out, "malai ssh with ssh's argument shapes");
    assert_eq!(stdout_of(&out), "shapes ok\n", "{}", fmt_output(&out));
}

#[test]
fn stdin_and_stdout_carry_256mib_intact() {
    let c = acme();
    let local = c.scratch("local");
    let remote = c.scratch("remote");
    let src = local.join("big.bin");
    write_random_file(&src, 256 << 20, 0x0065_7865_6332_3536);
    let want = sha256_file(&src);

    // Up: stdin → sha256sum on the server.
    let mut cmd = c.machine("alice").cmd(["ssh", "foo.acme", "sha256sum"]);
    let out = run_with_files(&mut cmd, Some(&src), None);
    assert_success(&out, "malai ssh foo.acme sha256sum < 256 MiB");
    assert_eq!(
        stdout_of(&out),
        format!("{want}  -\n"),
        "the server saw other bytes than were sent\n{}",
        stderr_of(&out)
    );

    // Down: `cat <file>` on the server → a local file.
    let served = remote.join("big.bin");
    fs::copy(&src, &served).expect("copy to the remote dir");
    let down = local.join("down.bin");
    let cat = format!("cat '{}'", served.display());
    let mut cmd = c.machine("alice").cmd(["ssh", "foo.acme", &cat]);
    let out = run_with_files(&mut cmd, None, Some(&down));
    assert_success(&out, "malai ssh foo.acme 'cat big' > file");
    assert_eq!(
        fs::metadata(&down).expect("down").len(),
        256 << 20,
        "{}",
        stderr_of(&out)
    );
    assert_eq!(sha256_file(&down), want, "the download corrupted the bytes");
}

/// `VmRSS` of a process in bytes (0 if it is gone).
fn vm_rss(pid: u32) -> u64 {
    read_lossy(Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// Bytes a process has written so far (`wchar` of /proc/<pid>/io).
fn bytes_written(pid: u32) -> u64 {
    read_lossy(Path::new(&format!("/proc/{pid}/io")))
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Children of `parent` that have exited but were not reaped.
fn zombies_of(parent: u32) -> Vec<String> {
    let mut out = vec![];
    for e in fs::read_dir("/proc").expect("/proc").flatten() {
        let stat = read_lossy(&e.path().join("stat"));
        // `pid (comm) state ppid …`; comm may hold spaces, so split after the last ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let (Some(state), Some(ppid)) = (f.next(), f.next()) else {
            continue;
        };
        if state == "Z" && ppid == parent.to_string() {
            out.push(format!("{head})"));
        }
    }
    out
}

/// Spawns `malai ssh foo.acme '<remote>'` as alice with `stdin`, and returns the child and
/// its stdout after reading the first line (the remote's `echo $$`) as a pid.
fn spawn_with_remote_pid(
    c: &TestCluster,
    remote: &str,
    stdin: Stdio,
) -> (
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    u32,
) {
    let mut cmd = c.machine("alice").cmd(["ssh", "foo.acme", remote]);
    cmd.process_group(0)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("spawn malai ssh");
    let pgid = Pid::from_raw(child.id() as i32);
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut stdout = stdout;
        let mut line = String::new();
        let _ = stdout.read_line(&mut line);
        let _ = tx.send((stdout, line));
    });
    let got = rx.recv_timeout(CHILD_TIMEOUT).ok();
    let Some((stdout, pid)) = got.and_then(|(o, l)| Some((o, l.trim().parse::<u32>().ok()?)))
    else {
        let _ = signal::killpg(pgid, Signal::SIGKILL);
        let _ = child.wait();
        panic!("`{remote}` did not print its pid");
    };
    (child, stdout, pid)
}

/// What a test gives a broken flow control to show itself: unbounded buffering at loopback
/// speed would be hundreds of MiB by then. Not a timing assertion: with flow control the
/// numbers below stay small however long we wait.
const FLOW_CONTROL_SETTLE: Duration = Duration::from_secs(3);

#[test]
fn slow_reader_and_stalled_remote_stdin_do_not_buffer_without_bound() {
    let mut c = acme();
    let server = c.server_process("foo").pid();
    let server_rss = vm_rss(server);

    // Remote writes 1 GiB to stdout; we read its first line, then nothing more.
    let (mut down, down_out, writer) = spawn_with_remote_pid(
        &c,
        "echo $$; exec head -c 1073741824 /dev/zero",
        Stdio::null(),
    );
    // Remote never reads stdin; ours is an endless /dev/zero.
    let zero = fs::File::open("/dev/zero").expect("/dev/zero");
    let (mut up, _up_out, sleeper) =
        spawn_with_remote_pid(&c, "echo $$; exec sleep 300", Stdio::from(zero));

    thread::sleep(FLOW_CONTROL_SETTLE);
    let written = bytes_written(writer);
    let server_grew = vm_rss(server).saturating_sub(server_rss);
    let up_rss = vm_rss(up.id());
    let writer_alive = alive(writer);
    for child in [&mut down, &mut up] {
        let _ = signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    }
    for child in [&mut down, &mut up] {
        if poll_until(CHILD_TIMEOUT, || child.try_wait().ok().flatten()).is_none() {
            let _ = signal::killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
    drop(down_out);

    assert!(
        writer_alive && written < 256 << 20,
        "the remote writer got {written} bytes out although nobody read them (alive: {writer_alive})"
    );
    assert!(
        server_grew < 128 << 20,
        "the server grew by {server_grew} bytes while a reader stalled"
    );
    assert!(
        up_rss < 256 << 20,
        "the client holds {up_rss} bytes while the remote does not read its stdin"
    );
    for (pid, what) in [(writer, "writer"), (sleeper, "sleep")] {
        assert!(
            poll_until(REMOTE_GONE_WITHIN, || (!alive(pid)).then_some(())).is_some(),
            "the remote {what} outlived its client"
        );
    }
    assert_eq!(
        zombies_of(server),
        Vec::<String>::new(),
        "zombies under the server"
    );
}

// ---------------------------------------------------------------------------------------------
// rsync and git with `malai ssh` as their ssh
// ---------------------------------------------------------------------------------------------

/// Nested dirs, a few files (one binary), an empty dir and a relative symlink.
fn make_tree(root: &Path) {
    fs::create_dir_all(root.join("a/b/c")).unwrap();
    fs::create_dir_all(root.join("empty")).unwrap();
    fs::write(root.join("top.txt"), "top\n").unwrap();
    fs::write(root.join("a/one.txt"), "one\n").unwrap();
    fs::write(root.join("a/b/two.txt"), "two\n".repeat(1000)).unwrap();
    write_random_file(&root.join("a/b/c/blob.bin"), 3 << 20, 7);
    std::os::unix::fs::symlink("b/two.txt", root.join("a/link-to-two")).unwrap();
}

fn rsync_e(c: &TestCluster, args: &[&str]) -> Output {
    run_cmd(
        Command::new("rsync")
            .env_remove("RUST_LOG")
            .arg("-e")
            .arg(malai_ssh_command_line(c, "alice"))
            .args(args),
    )
}

#[test]
fn rsync_e_malai_ssh_both_ways_then_nothing_to_do() {
    let c = acme();
    let src = c.scratch("tree-src");
    make_tree(&src);
    let remote = c.dir().join("tree-remote");
    let back = c.dir().join("tree-back");
    let remote_spec = format!("foo.acme:{}/", remote.display());
    let src_spec = format!("{}/", src.display());
    let back_spec = format!("{}/", back.display());

    let out = rsync_e(&c, &["-a", &src_spec, &remote_spec]);
    assert_success(&out, "rsync -a -e 'malai ssh' up");
    assert_eq!(
        tree_listing(&remote),
        tree_listing(&src),
        "tree after upload"
    );

    let out = rsync_e(&c, &["-a", &remote_spec, &back_spec]);
    assert_success(&out, "rsync -a -e 'malai ssh' down");
    assert_eq!(
        tree_listing(&back),
        tree_listing(&src),
        "tree after download"
    );

    let out = rsync_e(&c, &["-a", "--itemize-changes", &src_spec, &remote_spec]);
    assert_success(&out, "second rsync up");
    assert_eq!(
        stdout_of(&out).trim(),
        "",
        "second rsync up transferred something"
    );
    let out = rsync_e(&c, &["-a", "--stats", &remote_spec, &back_spec]);
    assert_success(&out, "second rsync down");
    assert!(
        stdout_of(&out).contains("Number of regular files transferred: 0"),
        "second rsync down transferred something:\n{}",
        fmt_output(&out)
    );
}

#[test]
fn git_ssh_command_malai_ssh_clone_commit_push() {
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
    let ssh = malai_ssh_command_line(&c, "alice");
    let git = |cwd: &Path, args: &[&str]| {
        run_cmd(
            git_command(cwd)
                .env("GIT_SSH_COMMAND", &ssh)
                .env_remove("GIT_SSH_VARIANT")
                .args(args),
        )
    };

    let work = c.scratch("work");
    let out = git(&work, &["clone", "-q", &url, "clone"]);
    assert_success(&out, "GIT_SSH_COMMAND='malai ssh' git clone (empty repo)");
    let clone = work.join("clone");
    fs::write(clone.join("README"), "hello through malai exec\n").unwrap();
    assert_success(&git(&clone, &["add", "README"]), "git add");
    assert_success(
        &git(
            &clone,
            &["commit", "-q", "-m", "first commit via malai exec"],
        ),
        "git commit",
    );
    let out = git(&clone, &["push", "-q", "origin", "HEAD:main"]);
    assert_success(&out, "GIT_SSH_COMMAND='malai ssh' git push");

    let out = run_cmd(
        git_command(c.dir())
            .arg(format!("--git-dir={}", bare.display()))
            .args(["log", "--format=%s", "main"]),
    );
    assert_success(&out, "git log on the bare repo");
    assert_eq!(stdout_of(&out).trim(), "first commit via malai exec");

    let out = git(&work, &["clone", "-q", &url, "clone2"]);
    assert_success(
        &out,
        "GIT_SSH_COMMAND='malai ssh' git clone (non-empty repo)",
    );
    assert_eq!(
        fs::read_to_string(work.join("clone2/README")).unwrap(),
        "hello through malai exec\n"
    );

    // git probes its ssh command with `-G … host` first; that must answer locally, never
    // open a login shell on the server. Every exec foo saw was a git-*-pack.
    let audit = read_lossy(&c.machine("foo").home().join("logs/ssh/audit.log"));
    let execs: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("\"kind\":\"exec\""))
        .collect();
    assert!(
        !execs.is_empty() && execs.iter().all(|l| l.contains("\"detail\":\"git-")),
        "foo ran something besides git-upload-pack/git-receive-pack:\n{audit}"
    );
    let out = malai_ssh(&c, "alice", &["-G", "-p", "2222", "nosuch.acme"]);
    assert_success(&out, "malai ssh -G (no connection, no resolving)");
    assert!(
        stdout_of(&out).lines().any(|l| l == "port 2222"),
        "{}",
        fmt_output(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// pty
// ---------------------------------------------------------------------------------------------

/// `script -qec "<inner>" /dev/null`: `inner` runs with a real terminal on stdin/stdout.
fn under_script(inner: &str) -> Output {
    run_cmd(
        Command::new("script")
            .env_remove("RUST_LOG")
            .args(["-qec", inner, "/dev/null"]),
    )
}

#[test]
fn pty_under_script_is_a_real_tty_with_the_clients_size() {
    let c = acme();
    let ssh = malai_ssh_command_line(&c, "alice");

    for flag in ["-t", "-tt"] {
        let inner = format!("stty cols 100 rows 30; {ssh} {flag} foo.acme 'tty; stty size'");
        let out = under_script(&inner);
        assert_success(&out, &format!("script -c 'malai ssh {flag} foo.acme …'"));
        // `script` writes the terminal's EOF character when its own stdin (/dev/null) ends;
        // the remote pty may echo it (`^@`) in front of a line, so look inside lines.
        let text = stdout_of(&out).replace('\r', "");
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        assert!(
            lines.iter().any(|l| l.contains("/dev/pts/")),
            "{flag}: no /dev/pts/ path from `tty`\n{}",
            fmt_output(&out)
        );
        assert!(
            lines.iter().any(|l| l.ends_with("30 100")),
            "{flag}: `stty size` must be the client's 30 rows, 100 cols\n{}",
            fmt_output(&out)
        );
    }

    // Without a command and with a terminal, ssh's default is a pty too.
    let inner = format!("stty cols 91 rows 17; printf 'stty size; exit 3\\n' | {ssh} -tt foo.acme");
    let out = under_script(&inner);
    assert!(
        stdout_of(&out).contains("17 91"),
        "interactive login shell under -tt: no `17 91` from stty size\n{}",
        fmt_output(&out)
    );

    // -T: no pty even with a terminal on our side.
    let inner = format!("{ssh} -T foo.acme tty");
    let out = under_script(&inner);
    let text = stdout_of(&out).replace('\r', "");
    assert!(
        text.lines().any(|l| l.trim() == "not a tty"),
        "-T must give the remote no tty\n{}",
        fmt_output(&out)
    );
    assert_exit_code(&out, 1, "script -c 'malai ssh -T foo.acme tty'");
}

#[test]
fn pty_raw_mode_is_restored_and_window_changes_follow() {
    let c = acme();
    let ssh = malai_ssh_command_line(&c, "alice");
    let d = c.scratch("marks");
    let d = d.display();

    // The terminal settings are the same before and after, however the session ended:
    // normally, the remote killed by a signal, the client itself killed by SIGTERM.
    let inner = format!(
        "a=$(stty -g); \
         {ssh} -t foo.acme true; s1=$?; [ \"$(stty -g)\" = \"$a\" ] && echo RESTORED-1 $s1; \
         {ssh} -t foo.acme 'kill -9 $$'; s2=$?; [ \"$(stty -g)\" = \"$a\" ] && echo RESTORED-2 $s2; \
         {ssh} -t foo.acme 'echo $$ >{d}/pid; touch {d}/started; exec sleep 300' </dev/tty & p=$!; \
         while [ ! -e {d}/started ]; do sleep 0.05; done; kill -TERM $p; wait $p; s3=$?; \
         [ \"$(stty -g)\" = \"$a\" ] && echo RESTORED-3 $s3"
    );
    let out = under_script(&inner);
    let text = stdout_of(&out).replace('\r', "");
    for want in ["RESTORED-1 0", "RESTORED-2 255", "RESTORED-3 255"] {
        assert!(
            text.lines().any(|l| l.trim().ends_with(want)),
            "expected {want:?}: the local terminal must be back in its old mode\n{}",
            fmt_output(&out)
        );
    }
    let remote: u32 = read_lossy(&c.dir().join("marks/pid"))
        .trim()
        .parse()
        .expect("remote pid");
    assert!(
        poll_until(REMOTE_GONE_WITHIN, || (!alive(remote)).then_some(())).is_some(),
        "the remote `sleep 300` of the SIGTERM'd pty session is still there"
    );

    // SIGWINCH: the remote waits until it runs, then the local size changes under it.
    let inner = format!(
        "stty cols 100 rows 30; \
         (while [ ! -e {d}/waiting ]; do sleep 0.05; done; stty cols 120 rows 40 </dev/tty) & \
         {ssh} -t foo.acme 'touch {d}/waiting; i=0; \
           while [ \"$(stty size)\" = \"30 100\" ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; \
           echo size: $(stty size)'"
    );
    let out = under_script(&inner);
    assert_success(
        &out,
        "script -c 'malai ssh -t foo.acme …' with a window change",
    );
    assert!(
        stdout_of(&out).contains("size: 40 120"),
        "the remote pty did not follow the window change to 40 rows, 120 cols\n{}",
        fmt_output(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// Client killed mid-command
// ---------------------------------------------------------------------------------------------

fn alive(pid: u32) -> bool {
    // A zombie still has /proc/<pid>; it is gone only once the server has reaped it.
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Starts `malai ssh foo.acme '<prefix> echo $$ >pidfile; exec sleep 300'` as alice, waits for
/// the remote pid, sends `sig` to the client and asserts the remote process is gone
/// (reaped) within `deadline`. Returns the client's exit status.
fn kill_client_and_watch_remote(
    c: &TestCluster,
    prefix: &str,
    sig: Signal,
    deadline: Duration,
) -> ExitStatus {
    let pid_file = c.scratch("pids").join(format!("{sig}-{}", prefix.len()));
    let remote_cmd = format!("{prefix} echo $$ >'{}'; exec sleep 300", pid_file.display());
    let mut cmd = c.machine("alice").cmd(["ssh", "foo.acme", &remote_cmd]);
    if sig == Signal::SIGKILL {
        // A SIGKILLed client says nothing: the server notices by the idle limit, which both
        // ends negotiate down to the smaller one. The 60 s default would only slow CI.
        cmd.env("MALAI_IDLE_TIMEOUT", "5");
        // A resumable session (the default) is kept detached on purpose when its client
        // vanishes without a word, as an outage looks the same (README, known limits):
        // this is the plain session's promise.
        cmd.env("MALAI_RESUME", "off");
    }
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut client = cmd.spawn().expect("spawn malai ssh");
    let client_pid = client.id();
    let kill_client = |client: &mut std::process::Child| {
        let _ = signal::killpg(Pid::from_raw(client_pid as i32), Signal::SIGKILL);
        let _ = client.wait();
    };
    // `exec sleep` keeps the pid; wait until it is the sleep (it may still be the shell).
    let remote = poll_until(CHILD_TIMEOUT, || {
        let pid: u32 = read_lossy(&pid_file).trim().parse().ok()?;
        read_lossy(Path::new(&format!("/proc/{pid}/cmdline")))
            .starts_with("sleep")
            .then_some(pid)
    });
    let Some(remote) = remote else {
        kill_client(&mut client);
        panic!("`{remote_cmd}` never became a `sleep 300` with its pid in the pid file");
    };

    signal::kill(Pid::from_raw(client_pid as i32), sig).expect("signal the client");
    let killed_at = Instant::now();
    let gone = poll_until(deadline, || (!alive(remote)).then_some(()));
    let waited = killed_at.elapsed();
    if gone.is_none() {
        let _ = signal::kill(Pid::from_raw(remote as i32), Signal::SIGKILL);
    }
    let status = poll_until(CHILD_TIMEOUT, || client.try_wait().ok().flatten());
    let Some(status) = status else {
        kill_client(&mut client);
        panic!("malai ssh did not exit after {sig}");
    };
    let mut err = String::new();
    if let Some(mut e) = client.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(
        gone.is_some(),
        "remote pid {remote} still there {waited:?} after {sig} to the client; client stderr: {err}"
    );
    assert_ne!(status.code(), Some(0), "killed client exited 0: {err}");
    status
}

#[test]
fn client_killed_mid_command_takes_the_remote_child_down() {
    let mut c = acme();
    // SIGTERM: the client closes the connection at once, like ssh's TCP connection closing.
    let status = kill_client_and_watch_remote(&c, "", Signal::SIGTERM, REMOTE_GONE_WITHIN);
    assert_eq!(
        status.code(),
        Some(255),
        "ssh exits 255 when killed by a signal"
    );
    // SIGKILL: nothing is said; the server notices the dead connection by its idle timeout
    // (the client asks for 5 s here) and must still hang up and reap the child (generous
    // bound: that timeout plus slack).
    // The remote closed its output and is only being waited for: still hung up.
    let quiet = "exec >/dev/null 2>&1 </dev/null;";
    kill_client_and_watch_remote(&c, quiet, Signal::SIGTERM, REMOTE_GONE_WITHIN);
    kill_client_and_watch_remote(&c, "", Signal::SIGKILL, Duration::from_secs(30));
    let server = c.server_process("foo").pid();
    assert_eq!(
        zombies_of(server),
        Vec::<String>::new(),
        "zombies under the server"
    );
}

// ---------------------------------------------------------------------------------------------
// Command-scoped peers and denials
// ---------------------------------------------------------------------------------------------

#[test]
fn command_scoped_peer_runs_only_that_program_never_a_shell() {
    let c = acme();

    let out = malai_ssh(&c, "bob", &["foo.acme", "ls", "/"]);
    assert_success(&out, "bob: malai ssh foo.acme ls /");
    let listing = stdout_of(&out);
    assert!(
        listing.lines().any(|l| l == "proc") && listing.lines().any(|l| l == "etc"),
        "bob: `ls /` output does not look like /\n{}",
        fmt_output(&out)
    );

    for cmd in ["cat /etc/hostname", "sh -c id", "ls; id", "id"] {
        let out = malai_ssh(&c, "bob", &["foo.acme", cmd]);
        assert_one_malai_line(
            &out,
            "not allowed",
            &format!("bob: malai ssh foo.acme '{cmd}'"),
        );
    }
    // No command at all: a login shell is not for command-scoped peers either.
    let out = malai_ssh(&c, "bob", &["foo.acme"]);
    assert_one_malai_line(&out, "command", "bob: malai ssh foo.acme (no command)");

    // Quoting is honoured but nothing is special: `ls` gets the odd argument.
    let out = malai_ssh(&c, "bob", &["foo.acme", "ls '; id'"]);
    assert_exit_code(&out, 2, "bob: malai ssh foo.acme \"ls '; id'\"");
    assert!(
        stderr_of(&out).contains("cannot access '; id'"),
        "ls must complain about the argument `; id`\n{}",
        fmt_output(&out)
    );
    assert!(!stdout_of(&out).contains("uid="), "{}", fmt_output(&out));
    let out = malai_ssh(&c, "bob", &["foo.acme", "ls", "$(id)", "`id`"]);
    assert_exit_code(&out, 2, "bob: malai ssh foo.acme ls '$(id)' '`id`'");
    assert!(
        stderr_of(&out).contains("cannot access '$(id)'"),
        "{}",
        fmt_output(&out)
    );

    // A member with no access at all, and the full-access control.
    let out = malai_ssh(&c, "eve", &["foo.acme", "ls"]);
    assert_one_malai_line(&out, "permission denied", "eve: malai ssh foo.acme ls");
    let out = malai_ssh(&c, "alice", &["foo.acme", "ls /; echo shell-ok"]);
    assert_success(&out, "alice: malai ssh foo.acme 'ls /; echo shell-ok'");
    assert!(stdout_of(&out).ends_with("shell-ok\n"));
}

#[test]
fn a_scope_can_pin_arguments_so_rsync_cannot_run_a_shell() {
    require_program("rsync", "rsync");
    let c = TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Unset)
        .device("bob")
        .allow("foo.rsync", &["bob"])
        .build();
    let marker = c.dir().join("pwned");
    let evil = format!(
        "rsync -e 'sh -c \"touch {}; exit 1\"' /etc/hostname x:/tmp/y",
        marker.display()
    );
    // A bare program name allows any arguments, and the manager is warned about it.
    let out = c.manager().run(["ssh", "cluster", "push", "--dry-run"]);
    assert!(
        stderr_of(&out).contains("server.foo.rsync:") && stderr_of(&out).contains("args"),
        "no warning for an unpinned rsync scope:\n{}",
        fmt_output(&out)
    );
    // Pin rsync to its server mode (what `rsync -e "malai ssh"` asks the far side to run).
    c.edit_manager_file(|t| {
        set_table_keys(&t, "server.foo.rsync", &[("args", toml_str("--server *"))])
    });
    c.distribute();
    let out = c.manager().run(["ssh", "cluster", "push", "--dry-run"]);
    assert!(!stderr_of(&out).contains("warning"), "{}", fmt_output(&out));

    // Deny: rsync asked to run a shell through -e.
    let out = malai_ssh(&c, "bob", &["foo.acme", &evil]);
    assert_one_malai_line(&out, "arguments not allowed", "bob: rsync -e 'sh -c …'");
    assert!(!marker.exists(), "rsync -e ran a shell on foo");

    // Allow twin: a real rsync through the pinned scope.
    let src = c.scratch("src");
    fs::write(src.join("a.txt"), "a\n").unwrap();
    let dst = c.dir().join("dst");
    let mut rsync = Command::new("rsync");
    rsync
        .arg("-a")
        .arg("-e")
        .arg(malai_ssh_command_line(&c, "bob"))
        .arg(format!("{}/", src.display()))
        .arg(format!("foo.acme:{}/", dst.display()));
    let out = run_cmd(&mut rsync);
    assert_success(&out, "bob: rsync -e 'malai ssh' through the pinned scope");
    assert_eq!(fs::read_to_string(dst.join("a.txt")).unwrap(), "a\n");
}

// ---------------------------------------------------------------------------------------------
// Groups
// ---------------------------------------------------------------------------------------------

fn web() -> TestCluster {
    TestCluster::builder("acme")
        .manager("mgr")
        .server_with("foo", SshTarget::Unset)
        .server_with("bar", SshTarget::Unset)
        .server_with("baz", SshTarget::Unset)
        .device("alice")
        .allow("foo", &["alice"])
        .allow("bar", &["alice"])
        .allow("baz", &["alice"])
        .group("web", &["foo", "bar", "baz"])
        .build()
}

/// A command that tells which server runs it: the shell's parent is that server's
/// `malai ssh server`, whose `MALAI_HOME` ends in the machine name. `bar` fails.
const WHO_AM_I: &str = "h=$(tr '\\0' '\\n' </proc/$PPID/environ | sed -n 's/^MALAI_HOME=//p'); \
     n=${h##*/}; echo \"i am $n\"; if [ \"$n\" = bar ]; then echo \"$n fails\" >&2; exit 3; fi";

fn sorted_lines(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s.lines().map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn group_run_prefixes_output_and_fails_if_one_host_fails() {
    let mut c = web();

    let out = malai_ssh(&c, "alice", &["web.acme", WHO_AM_I]);
    assert_exit_code(&out, 3, "malai ssh web.acme (bar exits 3)");
    assert_eq!(
        sorted_lines(&stdout_of(&out)),
        ["bar: i am bar", "baz: i am baz", "foo: i am foo"],
        "{}",
        fmt_output(&out)
    );
    let err = stderr_of(&out);
    assert!(
        err.lines().any(|l| l == "bar: bar fails"),
        "bar's stderr must come prefixed on stderr\n{}",
        fmt_output(&out)
    );
    let summary: Vec<&str> = err.lines().filter(|l| l.starts_with("malai: ")).collect();
    assert!(
        summary.len() == 1 && summary[0].contains("bar") && summary[0].contains('3'),
        "expected one summary line for bar on stderr\n{}",
        fmt_output(&out)
    );

    // `group:web` names the same group; `--parallel 1` runs one host at a time (the mkdir
    // lock would fail on overlap).
    let lock = c.dir().join("lock");
    let cmd = format!(
        "mkdir '{l}' || exit 9; echo ran; sleep 0.2; rmdir '{l}'",
        l = lock.display()
    );
    let out = malai_ssh(&c, "alice", &["--parallel", "1", "group:web", &cmd]);
    assert_success(&out, "malai ssh --parallel 1 group:web");
    assert_eq!(
        sorted_lines(&stdout_of(&out)),
        ["bar: ran", "baz: ran", "foo: ran"],
        "{}",
        fmt_output(&out)
    );

    for name in ["foo", "bar", "baz"] {
        let pid = c.server_process(name).pid();
        assert_eq!(
            zombies_of(pid),
            Vec::<String>::new(),
            "zombies under {name}"
        );
    }

    // SIGTERM while the first of `--parallel 1` runs: it is hung up and no other starts.
    let d = c.scratch("interrupt");
    let cmd = format!(
        "h=$(tr '\\0' '\\n' </proc/$PPID/environ | sed -n 's/^MALAI_HOME=//p'); \
         echo $$ >'{d}/pid-'\"${{h##*/}}\"; exec sleep 300",
        d = d.display()
    );
    let mut client = c
        .machine("alice")
        .cmd(["ssh", "--parallel", "1", "web.acme", &cmd]);
    client
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut client = client.spawn().expect("spawn malai ssh web.acme");
    let pids = |d: &Path| -> Vec<u32> {
        fs::read_dir(d)
            .expect("read interrupt dir")
            .flatten()
            .filter_map(|e| read_lossy(&e.path()).trim().parse().ok())
            .collect()
    };
    let first = poll_until(CHILD_TIMEOUT, || {
        let p = pids(&d);
        p.first()
            .filter(|pid| {
                read_lossy(Path::new(&format!("/proc/{pid}/cmdline"))).starts_with("sleep")
            })
            .copied()
    });
    let client_pgid = Pid::from_raw(client.id() as i32);
    let Some(first) = first else {
        let _ = signal::killpg(client_pgid, Signal::SIGKILL);
        panic!("no group member started its sleep");
    };
    signal::kill(client_pgid, Signal::SIGTERM).expect("SIGTERM the group client");
    let status = poll_until(CHILD_TIMEOUT, || client.try_wait().ok().flatten());
    let Some(status) = status else {
        let _ = signal::killpg(client_pgid, Signal::SIGKILL);
        panic!("malai ssh web.acme did not exit on SIGTERM");
    };
    let mut err = String::new();
    let _ = client
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert_eq!(status.code(), Some(255), "interrupted group run: {err}");
    assert!(
        poll_until(REMOTE_GONE_WITHIN, || (!alive(first)).then_some(())).is_some(),
        "the running member's command outlived the interrupted group run"
    );
    assert_eq!(
        pids(&d).len(),
        1,
        "members started after the SIGTERM; stderr:\n{err}"
    );
    assert_eq!(
        err.lines().filter(|l| l.starts_with("malai: ")).count(),
        3,
        "one summary line per member expected:\n{err}"
    );

    // A member whose server is down: the others still run, a summary names it, exit 255.
    c.stop_server("baz");
    let out = malai_ssh(&c, "alice", &["web.acme", "echo hi"]);
    assert_exit_code(&out, 255, "malai ssh web.acme with baz down");
    assert_eq!(
        sorted_lines(&stdout_of(&out)),
        ["bar: hi", "foo: hi"],
        "{}",
        fmt_output(&out)
    );
    let err = stderr_of(&out);
    let summary: Vec<&str> = err.lines().filter(|l| l.starts_with("malai: ")).collect();
    assert!(
        summary.len() == 1 && summary[0].starts_with("malai: baz"),
        "expected one summary line for baz on stderr\n{}",
        fmt_output(&out)
    );
}

/// The name of the user the test (and so every simulated server) runs as.
fn own_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .expect("the test's own user has a passwd entry")
}

/// Issue 24 item 3: a user name is no longer dropped. Native exec runs commands only as
/// the server's own user, so every spelling of another user is refused with one line
/// naming both; the server's own name (any spelling) runs as before.
#[test]
fn a_user_other_than_the_servers_is_refused_by_name() {
    let c = acme();
    let me = own_user();
    let spellings = |user: &str| -> Vec<Vec<String>> {
        vec![
            vec!["-l".into(), user.into(), "foo.acme".into()],
            vec![format!("{user}@foo.acme")],
            vec!["-o".into(), format!("User={user}"), "foo.acme".into()],
        ]
    };
    for mut args in spellings("nobody") {
        args.push("echo ran".into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = malai_ssh(&c, "alice", &argv);
        assert_one_malai_line(
            &out,
            &format!("only as its own user \"{me}\", not as \"nobody\""),
            &format!("alice: malai ssh {argv:?}"),
        );
    }
    for mut args in spellings(&me) {
        args.push("echo ran as $(id -un)".into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = malai_ssh(&c, "alice", &argv);
        assert_success(&out, &format!("alice: malai ssh {argv:?}"));
        assert_eq!(
            stdout_of(&out),
            format!("ran as {me}\n"),
            "{}",
            fmt_output(&out)
        );
    }
}

/// Issue 24 item 3: `-S`, an unknown `-o`, `-v` and `-E` are no longer accepted and
/// ignored. `-S` (a control socket) and a keyword OpenSSH does not know are errors, their
/// harmless twins (`-S none`, a real keyword) run; `-v` puts malai's log on stderr, `-E`
/// puts it in the named file and keeps stderr clean; an `-E` file that cannot be opened is
/// an error before anything runs.
#[test]
fn ssh_flags_once_ignored_are_honoured_or_refused() {
    let c = acme();
    let out = malai_ssh(&c, "alice", &["-o", "Bogus=1", "foo.acme", "echo ran"]);
    assert_one_malai_line(&out, "unknown ssh option \"Bogus\"", "-o Bogus=1");
    let out = malai_ssh(
        &c,
        "alice",
        &["-o", "ServerAliveInterval=5", "foo.acme", "echo ran"],
    );
    assert_success(&out, "-o ServerAliveInterval=5");
    assert_eq!(stdout_of(&out), "ran\n");

    let out = malai_ssh(
        &c,
        "alice",
        &["-S", "/tmp/ctl-sock", "foo.acme", "echo ran"],
    );
    assert_one_malai_line(&out, "-S is not supported", "-S /tmp/ctl-sock");
    let out = malai_ssh(&c, "alice", &["-S", "none", "foo.acme", "echo ran"]);
    assert_success(&out, "-S none");
    assert_eq!(stdout_of(&out), "ran\n");

    // Without -v, nothing but the command's own output.
    let out = malai_ssh(&c, "alice", &["foo.acme", "echo ran"]);
    assert_success(&out, "no -v");
    assert!(out.stderr.is_empty(), "{}", fmt_output(&out));
    let out = malai_ssh(&c, "alice", &["-v", "foo.acme", "echo ran"]);
    assert_success(&out, "-v");
    assert_eq!(stdout_of(&out), "ran\n", "stdout stays payload only");
    assert!(
        stderr_of(&out).contains("malai"),
        "-v must put malai's log on stderr\n{}",
        fmt_output(&out)
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("exec.log");
    let log_s = log.to_str().expect("utf-8 path");
    let out = malai_ssh(&c, "alice", &["-v", "-E", log_s, "foo.acme", "echo ran"]);
    assert_success(&out, "-v -E file");
    assert_eq!(stdout_of(&out), "ran\n");
    assert!(
        out.stderr.is_empty(),
        "-E keeps stderr clean\n{}",
        fmt_output(&out)
    );
    let text = fs::read_to_string(&log).expect("-E file written");
    assert!(text.contains("malai"), "-E file holds the log: {text:?}");

    let bad = dir.path().join("no-such-dir").join("x.log");
    let out = malai_ssh(
        &c,
        "alice",
        &["-E", bad.to_str().unwrap(), "foo.acme", "echo ran"],
    );
    assert_one_malai_line(&out, "cannot open the log file", "-E into a missing folder");
}

/// Issue 24 item 9: a mistyped subcommand is not only an "unknown host": the line says
/// "no such command or host" and lists the commands. A real bare host name and a real
/// subcommand still work, and a dotted name keeps the plain unknown-host message.
#[test]
fn a_mistyped_subcommand_says_no_such_command_or_host() {
    let c = acme();
    let out = malai_ssh(&c, "alice", &["stauts"]);
    assert_one_malai_line(
        &out,
        "no such command or host \"stauts\"",
        "malai ssh stauts",
    );
    assert!(stderr_of(&out).contains("status"), "{}", fmt_output(&out));
    let out = malai_ssh(&c, "alice", &["nosuch.acme", "true"]);
    assert_one_malai_line(&out, "unknown host", "malai ssh nosuch.acme");
    assert!(
        !stderr_of(&out).contains("no such command"),
        "{}",
        fmt_output(&out)
    );

    let out = malai_ssh(&c, "alice", &["foo", "echo bare-host"]);
    assert_success(&out, "malai ssh foo (bare host name)");
    assert_eq!(stdout_of(&out), "bare-host\n");
    let out = malai_ssh(&c, "alice", &["status"]);
    assert_success(&out, "malai ssh status");
}
