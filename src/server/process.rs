//! Child processes for `exec` (and, later, the embedded SSH server): spawn with or without
//! a pty, resize, signal, wait, and kill the whole session when the client goes away.
//!
//! Every child gets its own session (`setsid`), so its process group is its pid and the
//! whole tree can be signalled at once. With a pty, the slave becomes the controlling
//! terminal (TIOCSCTTY) and stdout/stderr are merged, as with sshd. Children are always
//! waited for (tokio reaps them), so nothing is left as a zombie.
//!
//! Signals never outlive the child (issue 19, finding 3): once a child is reaped its pid —
//! and so its process-group id — may belong to anyone. So a child is first waited for
//! *without* reaping (its pidfd turns readable at exit; the zombie keeps the pid and group
//! id reserved), every group signal is sent under a lock while it is known unreaped, and
//! the reap itself happens under that lock and marks the child gone. A late `signal`
//! request or a hang-up's last SIGKILL then reaches no one.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::pin::Pin;
use std::process::Stdio;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command};

use crate::protocol::exec::{ExitStatus, PtyRequest};

pub use crate::protocol::exec_pump::env_allowed;

/// What to run.
#[derive(Debug, Clone)]
pub enum Program {
    /// Full access: `$SHELL -c command`, or an interactive login shell for `None`.
    Shell(Option<String>),
    /// Command-scoped access: exactly this argv through `execvp`, never a shell.
    Argv(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub program: Program,
    /// Already filtered by the caller? No: filtered here with [`env_allowed`].
    pub env: Vec<(String, String)>,
    pub pty: Option<PtyRequest>,
    /// Set as `MALAI_PEER_ID52` so scripts can tell who called.
    pub peer: String,
    /// `SSH_AUTH_SOCK`: the server's own socket for a forwarded agent (not client input,
    /// so not filtered by [`env_allowed`]).
    pub agent_socket: Option<String>,
}

/// The login facts of the user the server runs as.
struct Login {
    user: String,
    home: String,
    shell: String,
}

/// The name of the user this server runs as: the only user its commands can run as.
pub fn own_user() -> String {
    login().user
}

fn login() -> Login {
    let uid = nix::unistd::getuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => Login {
            user: u.name,
            home: u.dir.to_string_lossy().into_owned(),
            shell: {
                let s = u.shell.to_string_lossy().into_owned();
                if s.is_empty() { "/bin/sh".into() } else { s }
            },
        },
        _ => Login {
            user: std::env::var("USER").unwrap_or_else(|_| uid.to_string()),
            home: std::env::var("HOME").unwrap_or_else(|_| "/".into()),
            shell: "/bin/sh".into(),
        },
    }
}

/// The child's input side.
pub enum ChildInput {
    Pipe(ChildStdin),
    Pty(PtyMaster),
    None,
}

/// A running child.
pub struct Running {
    child: Child,
    pid: i32,
    /// Whether the child is still unreaped; group signals are sent only under this lock.
    unreaped: std::sync::Arc<std::sync::Mutex<bool>>,
    /// Readable once the child exits (before it is reaped); `None` where pidfds are missing.
    pidfd: Option<AsyncFd<OwnedFd>>,
    pub stdin: ChildInput,
    pub stdout: Option<ChildOutput>,
    pub stderr: Option<ChildOutput>,
    pty: Option<std::sync::Arc<AsyncFd<OwnedFd>>>,
}

/// One output stream of the child.
pub enum ChildOutput {
    Pipe(ChildStdout),
    Err(ChildStderr),
    Pty(PtyMaster),
}

impl AsyncRead for ChildOutput {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ChildOutput::Pipe(p) => Pin::new(p).poll_read(cx, buf),
            ChildOutput::Err(p) => Pin::new(p).poll_read(cx, buf),
            ChildOutput::Pty(p) => Pin::new(p).poll_read(cx, buf),
        }
    }
}

/// Spawn `spec`. Errors are the spawn's (program not found, pty unavailable).
pub fn spawn(spec: &SpawnSpec) -> std::io::Result<Running> {
    let who = login();
    let mut cmd = command_for(&spec.program, &who)?;
    set_environment(&mut cmd, spec, &who);
    let started = match &spec.pty {
        None => spawn_piped(cmd)?,
        Some(p) => spawn_with_pty(cmd, p)?,
    };
    Ok(Running::new(started))
}

/// Phase 1: the program and its arguments (a shell for full access, the exact argv for a
/// command scope).
fn command_for(program: &Program, who: &Login) -> std::io::Result<Command> {
    Ok(match program {
        Program::Shell(Some(c)) => {
            let mut cmd = Command::new(&who.shell);
            cmd.arg("-c").arg(c);
            cmd
        }
        Program::Shell(None) => {
            let mut cmd = Command::new(&who.shell);
            // A leading '-' in argv[0] makes it a login shell, as sshd does.
            let base = who.shell.rsplit('/').next().unwrap_or("sh");
            cmd.arg0(format!("-{base}"));
            cmd
        }
        Program::Argv(argv) => {
            let Some((first, rest)) = argv.split_first() else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "empty command",
                ));
            };
            let mut cmd = Command::new(first);
            cmd.args(rest);
            cmd
        }
    })
}

/// Phase 2: a clean environment (login facts, the allowed client variables, the agent
/// socket) and the home directory.
fn set_environment(cmd: &mut Command, spec: &SpawnSpec, who: &Login) {
    cmd.env_clear();
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin".into());
    cmd.env("PATH", path)
        .env("HOME", &who.home)
        .env("USER", &who.user)
        .env("LOGNAME", &who.user)
        .env("SHELL", &who.shell)
        .env("MALAI_PEER_ID52", &spec.peer);
    for (k, v) in &spec.env {
        if env_allowed(k) {
            cmd.env(k, v);
        }
    }
    if let Some(sock) = &spec.agent_socket {
        cmd.env("SSH_AUTH_SOCK", sock);
    }
    let home = std::path::Path::new(&who.home);
    cmd.current_dir(if home.is_dir() {
        home
    } else {
        std::path::Path::new("/")
    });
    cmd.kill_on_drop(false);
}

/// A child just started, before the reap bookkeeping is added.
struct Started {
    child: Child,
    pid: i32,
    stdin: ChildInput,
    stdout: Option<ChildOutput>,
    stderr: Option<ChildOutput>,
    pty: Option<std::sync::Arc<AsyncFd<OwnedFd>>>,
}

/// Phase 3a: no pty: three pipes, a session of its own.
fn spawn_piped(mut cmd: Command) -> std::io::Result<Started> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setsid and prctl are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // The server relays this child's stdio; if the server dies (even by
            // SIGKILL), the session is over: hang it up rather than orphan it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    let stdin = child
        .stdin
        .take()
        .map(ChildInput::Pipe)
        .unwrap_or(ChildInput::None);
    let stdout = child.stdout.take().map(ChildOutput::Pipe);
    let stderr = child.stderr.take().map(ChildOutput::Err);
    Ok(Started {
        child,
        pid,
        stdin,
        stdout,
        stderr,
        pty: None,
    })
}

/// Phase 3b: a pty whose slave is the child's controlling terminal and all of its stdio.
fn spawn_with_pty(mut cmd: Command, p: &PtyRequest) -> std::io::Result<Started> {
    cmd.env("TERM", if p.term.is_empty() { "xterm" } else { &p.term });
    let ws = nix::pty::Winsize {
        ws_row: p.rows,
        ws_col: p.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pair = nix::pty::openpty(Some(&ws), None).map_err(std::io::Error::from)?;
    let slave = pair.slave;
    cmd.stdin(Stdio::from(slave.try_clone()?))
        .stdout(Stdio::from(slave.try_clone()?))
        .stderr(Stdio::from(slave.try_clone()?));
    // SAFETY: setsid, prctl and ioctl are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            // The server relays this child's stdio; if the server dies (even by
            // SIGKILL), the session is over: hang it up rather than orphan it.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(slave);
    let pid = child.id().map(|p| p as i32).unwrap_or(0);
    set_nonblocking(pair.master.as_raw_fd())?;
    // One epoll registration shared by the reading and writing handles (epoll
    // refuses the same fd twice).
    // SAFETY: the OwnedFd is moved into the AsyncFd and closed only when it drops.
    let master = std::sync::Arc::new(
        unsafe {
            AsyncFd::register_with_interest(pair.master, Interest::READABLE | Interest::WRITABLE)
        }
        .map_err(|e| std::io::Error::other(e.to_string()))?,
    );
    Ok(Started {
        child,
        pid,
        stdin: ChildInput::Pty(PtyMaster { fd: master.clone() }),
        stdout: Some(ChildOutput::Pty(PtyMaster { fd: master.clone() })),
        stderr: None,
        pty: Some(master),
    })
}

/// A pidfd for `pid` (Linux ≥ 5.3), readable once the process exits.
fn pidfd_open(pid: i32) -> Option<AsyncFd<OwnedFd>> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open returns a new fd we then own, or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // SAFETY: the OwnedFd is moved into the AsyncFd and closed only when it drops.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.ok()
}

fn set_nonblocking(fd: i32) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Window size and signals for a running child, usable while its stdio is being relayed.
#[derive(Clone)]
pub struct ChildControl {
    pid: i32,
    unreaped: std::sync::Arc<std::sync::Mutex<bool>>,
    pty: Option<std::sync::Arc<AsyncFd<OwnedFd>>>,
}

impl Running {
    fn new(s: Started) -> Running {
        Running {
            pidfd: pidfd_open(s.pid),
            child: s.child,
            pid: s.pid,
            unreaped: std::sync::Arc::new(std::sync::Mutex::new(true)),
            stdin: s.stdin,
            stdout: s.stdout,
            stderr: s.stderr,
            pty: s.pty,
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn control(&self) -> ChildControl {
        ChildControl {
            pid: self.pid,
            unreaped: self.unreaped.clone(),
            pty: self.pty.clone(),
        }
    }
}

impl ChildControl {
    /// Follow the client's window size.
    pub fn resize(&self, cols: u16, rows: u16) {
        if let Some(m) = &self.pty {
            let ws = libc::winsize {
                ws_row: rows,
                ws_col: cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            // SAFETY: TIOCSWINSZ with a valid winsize on our pty master.
            unsafe { libc::ioctl(m.as_raw_fd(), libc::TIOCSWINSZ as _, &ws) };
        }
    }

    /// Send a signal by its ssh name ("INT", "TERM", …) to the child's process group.
    /// `false` when nothing was sent (unknown name, or the child is already reaped).
    pub fn signal(&self, name: &str) -> bool {
        signal_from_name(name).is_some_and(|sig| self.killpg(sig))
    }

    /// `killpg` only while the child is unreaped: its zombie keeps the group id ours.
    fn killpg(&self, sig: nix::sys::signal::Signal) -> bool {
        let unreaped = match self.unreaped.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *unreaped && nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid), sig).is_ok()
    }
}

impl Running {
    /// The client is gone: SIGHUP the session, then SIGKILL whatever is left — stragglers
    /// included, before the leader is reaped (after it, the group id is not ours).
    pub async fn hang_up(&mut self) {
        use nix::sys::signal::Signal::{SIGHUP, SIGKILL};
        let control = self.control();
        control.killpg(SIGHUP);
        if tokio::time::timeout(Duration::from_secs(2), self.exited())
            .await
            .is_err()
        {
            control.killpg(SIGKILL);
            self.exited().await;
        }
        // Stragglers in the group that ignored SIGHUP.
        control.killpg(SIGKILL);
        let _ = self.reap().await;
    }

    /// Wait for the child to exit (and reap it). Cancel-safe: dropped before the exit, the
    /// child is still unreaped.
    pub async fn wait(&mut self) -> ExitStatus {
        self.exited().await;
        match self.reap().await {
            Ok(st) => match (st.code(), st.signal()) {
                (Some(c), _) => ExitStatus::Code(c),
                (None, Some(s)) => ExitStatus::Signal(signal_name(s)),
                _ => ExitStatus::Code(255),
            },
            Err(_) => ExitStatus::Code(255),
        }
    }

    /// Resolves once the child has exited, without reaping it.
    async fn exited(&mut self) {
        match &self.pidfd {
            Some(fd) => {
                // Level-triggered: stays readable, so every later call returns at once.
                let _ = fd.readable().await;
            }
            // No pidfd (old kernel): ask without reaping, a few times a second.
            None => loop {
                if exited_unreaped(self.pid) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            },
        }
    }

    /// Reap the exited child under the signal lock, marking it gone.
    async fn reap(&mut self) -> std::io::Result<std::process::ExitStatus> {
        {
            let mut unreaped = match self.unreaped.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if let Some(st) = self.child.try_wait()? {
                *unreaped = false;
                return Ok(st);
            }
        }
        // Not exited after all (no pidfd and waitid failed): a plain wait, then mark.
        let st = self.child.wait().await;
        let mut unreaped = match self.unreaped.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *unreaped = false;
        st
    }
}

/// Whether child `pid` has exited (or cannot be asked), leaving it unreaped.
fn exited_unreaped(pid: i32) -> bool {
    // SAFETY: waitid with WNOWAIT only reads the child's state into `info`.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOWAIT | libc::WNOHANG,
        )
    };
    // SAFETY: si_pid is set by waitid when a child changed state (0 otherwise).
    r != 0 || unsafe { info.si_pid() } != 0
}

/// ssh's signal names (RFC 4254 §6.10): without the "SIG" prefix.
pub fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().trim_start_matches("SIG").to_string())
        .unwrap_or_else(|_| format!("{sig}"))
}

pub fn signal_from_name(name: &str) -> Option<nix::sys::signal::Signal> {
    use nix::sys::signal::Signal::*;
    Some(match name {
        "ABRT" => SIGABRT,
        "ALRM" => SIGALRM,
        "FPE" => SIGFPE,
        "HUP" => SIGHUP,
        "ILL" => SIGILL,
        "INT" => SIGINT,
        "KILL" => SIGKILL,
        "PIPE" => SIGPIPE,
        "QUIT" => SIGQUIT,
        "SEGV" => SIGSEGV,
        "TERM" => SIGTERM,
        "USR1" => SIGUSR1,
        "USR2" => SIGUSR2,
        "WINCH" => SIGWINCH,
        _ => return None,
    })
}

/// The master side of a pty as an async stream. EIO after the child side closes is EOF.
pub struct PtyMaster {
    fd: std::sync::Arc<AsyncFd<OwnedFd>>,
}

impl AsyncRead for PtyMaster {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match ready!(crate::transport::rawfd::poll_read(&this.fd, cx, buf)) {
            // Linux reports the slave side's close as EIO: that is the end of output.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Poll::Ready(Ok(())),
            r => Poll::Ready(r),
        }
    }
}

impl AsyncWrite for PtyMaster {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        crate::transport::rawfd::poll_write(&this.fd, cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> SpawnSpec {
        SpawnSpec {
            program: Program::Argv(words.iter().map(|w| w.to_string()).collect()),
            env: vec![],
            pty: None,
            peer: "test".into(),
            agent_socket: None,
        }
    }

    /// Start a new session leader (`sleep 30`) with exactly `pid`, as root through
    /// `ns_last_pid` — a busy machine reusing the pid, on demand. `None` if not possible.
    fn take_pid(pid: i32) -> Option<std::process::Child> {
        use std::os::unix::process::CommandExt;
        for _ in 0..100 {
            std::fs::write("/proc/sys/kernel/ns_last_pid", format!("{}", pid - 1)).ok()?;
            let mut cmd = std::process::Command::new("sleep");
            cmd.arg("30");
            // SAFETY: setsid is async-signal-safe.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
            let mut c = cmd.spawn().ok()?;
            if c.id() as i32 == pid {
                return Some(c);
            }
            // Another fork took it first: try again.
            let _ = c.kill();
            let _ = c.wait();
        }
        None
    }

    #[tokio::test]
    async fn a_signal_after_the_reap_reaches_no_one() {
        let mut child = spawn(&argv(&["true"])).unwrap();
        let control = child.control();
        let pid = child.pid();
        assert_eq!(child.wait().await, ExitStatus::Code(0));
        let Some(mut stranger) = take_pid(pid) else {
            eprintln!("skipped: cannot force pid reuse here (needs root and ns_last_pid)");
            return;
        };
        // A late `signal KILL` on the finished channel, and a hang-up's last SIGKILL.
        let _ = control.signal("KILL");
        child.hang_up().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let alive = stranger.try_wait().unwrap().is_none();
        let _ = stranger.kill();
        let _ = stranger.wait();
        assert!(
            alive,
            "a signal for a reaped child killed process group {pid}"
        );
    }

    #[tokio::test]
    async fn a_signal_before_the_exit_reaches_the_child() {
        let mut child = spawn(&argv(&["sleep", "30"])).unwrap();
        let control = child.control();
        let _ = control.signal("TERM");
        let st = tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .expect("the child outlived its SIGTERM");
        assert_eq!(st, ExitStatus::Signal("TERM".into()));
    }
}
