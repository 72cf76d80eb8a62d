//! This process's stdin and stdout as async byte streams, without tokio's blocking pool.
//!
//! `tokio::io::stdin()` does every read on a blocking-pool thread (a hop per read); for the
//! ProxyCommand hot path we instead put fds 0/1 in non-blocking mode and poll them with
//! epoll (`AsyncFd`). The original flags are restored on drop, because the file description
//! may be shared (a terminal, or the pipe ssh handed us). Regular files and character
//! devices, which epoll refuses because they are always ready (`< file`, `> /dev/null`),
//! are read and written directly on this thread (`rawfd::poll_read_now`); any other fd
//! epoll refuses falls back to tokio's stdio.

use std::os::fd::RawFd;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

struct Fd {
    fd: RawFd,
    saved_flags: libc::c_int,
}

impl std::os::fd::AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd
    }
}

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: fcntl on an fd we were given; restoring what we found.
        unsafe { libc::fcntl(self.fd, libc::F_SETFL, self.saved_flags) };
    }
}

/// Flags of fds 0–2 as we found them, read once before we change any: on a terminal all
/// three share one file description, so reading fd 1's flags after setting fd 0
/// non-blocking would "restore" the wrong value.
fn original_flags(fd: RawFd) -> libc::c_int {
    static ORIGINAL: std::sync::OnceLock<[libc::c_int; 3]> = std::sync::OnceLock::new();
    let all = ORIGINAL.get_or_init(|| {
        // SAFETY: F_GETFL on the standard fds.
        [0, 1, 2].map(|fd| unsafe { libc::fcntl(fd, libc::F_GETFL) })
    });
    all.get(fd as usize).copied().unwrap_or(-1)
}

/// Pipe capacity asked for on stdin and stdout when they are pipes (the ProxyCommand's, or
/// `cmd | malai ssh host …`): the pump's buffer size. A pipe holds 64 KiB by default, so ssh
/// and the proxy took turns every 64 KiB, each turn a wake-up and a syscall on both sides.
/// Measured with 1 MiB during one scp (docs/benchmarks.md, issue 23): the proxy's stdin
/// reads fell from 28 to 8 per MiB, its `epoll_wait`s from 17 to 7. Not more than 256 KiB:
/// an unprivileged user's pipes share a budget (`/proc/sys/fs/pipe-user-pages-soft`,
/// 64 MiB), and past it the kernel gives that user's new pipes only two pages — 128
/// ProxyCommands at 2 × 256 KiB fit in it, 32 at 2 × 1 MiB would already not.
const PIPE_CAPACITY: libc::c_int = 256 * 1024;

fn grow_pipe(fd: RawFd) {
    // SAFETY: F_GETPIPE_SZ/F_SETPIPE_SZ on an inherited fd only read or resize its buffer.
    unsafe {
        let size = libc::fcntl(fd, libc::F_GETPIPE_SZ);
        if (0..PIPE_CAPACITY).contains(&size) {
            libc::fcntl(fd, libc::F_SETPIPE_SZ, PIPE_CAPACITY);
        }
    }
}

fn nonblocking(fd: RawFd, interest: Interest) -> Option<AsyncFd<Fd>> {
    let flags = original_flags(fd);
    if flags < 0 {
        return None;
    }
    // SAFETY: F_SETFL on an inherited fd.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return None;
    }
    // On failure (epoll refuses regular files) the Fd's drop restores the flags.
    // SAFETY: fds 0 and 1 stay open for the life of the process (we never close them; the
    // stdout "shutdown" swaps in /dev/null with dup2), which is what `register` requires.
    unsafe {
        AsyncFd::register_with_interest(
            Fd {
                fd,
                saved_flags: flags,
            },
            interest,
        )
    }
    .ok()
}

enum Inner<T> {
    Polled(AsyncFd<Fd>),
    /// An always-ready fd (a file, /dev/null), used directly.
    Direct(RawFd),
    Fallback(T),
}

/// Stdin as an `AsyncRead`.
pub struct Stdin(Inner<tokio::io::Stdin>);
/// Stdout (or stderr) as an `AsyncWrite` (unbuffered: every write reaches the fd).
pub struct Stdout(Inner<Fallback>);

/// tokio's own writers, for fds epoll refuses.
enum Fallback {
    Out(tokio::io::Stdout),
    Err(tokio::io::Stderr),
}

impl Fallback {
    fn pin(&mut self) -> Pin<&mut (dyn AsyncWrite + Unpin)> {
        match self {
            Fallback::Out(o) => Pin::new(o),
            Fallback::Err(e) => Pin::new(e),
        }
    }
}

pub fn stdin() -> Stdin {
    grow_pipe(0);
    Stdin(match nonblocking(0, Interest::READABLE) {
        Some(fd) => Inner::Polled(fd),
        None if super::rawfd::always_ready(0) => Inner::Direct(0),
        None => Inner::Fallback(tokio::io::stdin()),
    })
}

pub fn stdout() -> Stdout {
    grow_pipe(1);
    Stdout(match nonblocking(1, Interest::WRITABLE) {
        Some(fd) => Inner::Polled(fd),
        None if super::rawfd::always_ready(1) => Inner::Direct(1),
        None => Inner::Fallback(Fallback::Out(tokio::io::stdout())),
    })
}

/// Stderr, for the remote command's stderr in native exec (not for malai's own messages).
pub fn stderr() -> Stdout {
    Stdout(match nonblocking(2, Interest::WRITABLE) {
        Some(fd) => Inner::Polled(fd),
        None if super::rawfd::always_ready(2) => Inner::Direct(2),
        None => Inner::Fallback(Fallback::Err(tokio::io::stderr())),
    })
}

impl AsyncRead for Stdin {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let afd = match &mut self.0 {
            Inner::Fallback(s) => return Pin::new(s).poll_read(cx, buf),
            Inner::Direct(fd) => return super::rawfd::poll_read_now(*fd, cx, buf),
            Inner::Polled(afd) => afd,
        };
        super::rawfd::poll_read(afd, cx, buf)
    }
}

impl AsyncWrite for Stdout {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let afd = match &mut self.0 {
            Inner::Fallback(s) => return s.pin().poll_write(cx, data),
            Inner::Direct(fd) => return super::rawfd::poll_write_now(*fd, cx, data),
            Inner::Polled(afd) => afd,
        };
        super::rawfd::poll_write(afd, cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Inner::Fallback(s) => s.pin().poll_flush(cx),
            Inner::Polled(_) | Inner::Direct(_) => Poll::Ready(Ok(())),
        }
    }

    /// EOF to whoever reads our stdout: close fd 1 (ssh waits for it to end the session).
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Inner::Fallback(s) => s.pin().poll_shutdown(cx),
            // Nobody waits for a file's EOF.
            Inner::Direct(_) => Poll::Ready(Ok(())),
            Inner::Polled(afd) => {
                // Replace fd 1 with /dev/null rather than closing it, so that a later
                // accidental write can't land in some other file that reuses fd 1.
                let fd = afd.get_ref().fd;
                // SAFETY: open/dup2/close on fds we own.
                unsafe {
                    let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
                    if null >= 0 {
                        libc::dup2(null, fd);
                        libc::close(null);
                    }
                }
                Poll::Ready(Ok(()))
            }
        }
    }
}
