//! Child processes for `exec` (and, later, the embedded SSH server): spawn with or without
//! a pty, resize, signal, wait, and kill the whole session when the client goes away.
//!
//! Every child gets its own session (`setsid`), so its process group is its pid and the
//! whole tree can be signalled at once. With a pty, the slave becomes the controlling
//! terminal (TIOCSCTTY) and stdout/stderr are merged, as with sshd. Children are always
//! waited for (tokio reaps them), so nothing is left as a zombie.

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
    let mut cmd = match &spec.program {
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
    };
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

    match &spec.pty {
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            // SAFETY: setsid is async-signal-safe.
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
            Ok(Running {
                child,
                pid,
                stdin,
                stdout,
                stderr,
                pty: None,
            })
        }
        Some(p) => {
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
            // SAFETY: setsid and ioctl are async-signal-safe.
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
                    AsyncFd::register_with_interest(
                        pair.master,
                        Interest::READABLE | Interest::WRITABLE,
                    )
                }
                .map_err(|e| std::io::Error::other(e.to_string()))?,
            );
            Ok(Running {
                child,
                pid,
                stdin: ChildInput::Pty(PtyMaster { fd: master.clone() }),
                stdout: Some(ChildOutput::Pty(PtyMaster { fd: master.clone() })),
                stderr: None,
                pty: Some(master),
            })
        }
    }
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
    pty: Option<std::sync::Arc<AsyncFd<OwnedFd>>>,
}

impl Running {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn control(&self) -> ChildControl {
        ChildControl {
            pid: self.pid,
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
    pub fn signal(&self, name: &str) {
        if let Some(sig) = signal_from_name(name) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(self.pid), sig);
        }
    }
}

impl Running {
    /// The client is gone: SIGHUP the session, then SIGKILL whatever is left.
    pub async fn hang_up(&mut self) {
        let pg = nix::unistd::Pid::from_raw(self.pid);
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGHUP);
        if tokio::time::timeout(Duration::from_secs(2), self.child.wait())
            .await
            .is_err()
        {
            let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
            let _ = self.child.wait().await;
        }
        // Stragglers in the group that ignored SIGHUP.
        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
    }

    /// Wait for the child to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        match self.child.wait().await {
            Ok(st) => match (st.code(), st.signal()) {
                (Some(c), _) => ExitStatus::Code(c),
                (None, Some(s)) => ExitStatus::Signal(signal_name(s)),
                _ => ExitStatus::Code(255),
            },
            Err(_) => ExitStatus::Code(255),
        }
    }
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
