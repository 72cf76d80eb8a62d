//! Descriptors a CLI process passed to the agent (its stdin, stdout, stderr) as async
//! streams.
//!
//! Like `transport::stdio`, pipes, sockets and terminals are switched to non-blocking mode
//! and polled with epoll (`AsyncFd`), and their original flags are restored before the
//! descriptor is closed — the file description is shared with the caller (a terminal, the
//! pipe ssh handed the ProxyCommand). Descriptors epoll refuses (regular files, /dev/null)
//! fall back to tokio's blocking-pool `File`.
//!
//! A writer's `shutdown` closes the agent's copy at once: the reader on the other end (ssh
//! reading the ProxyCommand's stdout) sees EOF only when every copy is closed, and the
//! CLI has already given up its own.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A passed descriptor in non-blocking mode; its flags are put back on drop, then it closes.
struct Nonblocking {
    fd: Option<OwnedFd>,
    saved_flags: libc::c_int,
}

impl Nonblocking {
    fn raw(&self) -> RawFd {
        self.fd.as_ref().map(AsRawFd::as_raw_fd).unwrap_or(-1)
    }

    /// Restore the flags and hand the descriptor back.
    fn into_fd(mut self) -> Option<OwnedFd> {
        self.restore();
        self.fd.take()
    }

    fn restore(&self) {
        if let Some(fd) = &self.fd {
            // SAFETY: fcntl on a descriptor we own; restoring the flags we found.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, self.saved_flags) };
        }
    }
}

impl AsRawFd for Nonblocking {
    fn as_raw_fd(&self) -> RawFd {
        self.raw()
    }
}

impl Drop for Nonblocking {
    fn drop(&mut self) {
        self.restore();
    }
}

enum Inner {
    Polled(AsyncFd<Nonblocking>),
    File(tokio::fs::File),
}

fn file(fd: OwnedFd) -> Inner {
    Inner::File(tokio::fs::File::from_std(std::fs::File::from(fd)))
}

fn wrap(fd: OwnedFd, interest: Interest) -> Option<Inner> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor we own.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    // SAFETY: F_SETFL on a descriptor we own.
    if flags < 0 || unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Some(file(fd));
    }
    let nb = Nonblocking {
        fd: Some(fd),
        saved_flags: flags,
    };
    // SAFETY: `Nonblocking` owns the descriptor and only gives it up through `into_fd`,
    // which is reachable only when registration failed, so it stays open and the same for
    // the `AsyncFd`'s whole life.
    match unsafe { AsyncFd::register_with_interest(nb, interest) } {
        Ok(afd) => Some(Inner::Polled(afd)),
        // Epoll refused it (a regular file, /dev/null): blocking pool instead.
        Err(e) => e.into_parts().0.into_fd().map(file),
    }
}

/// A passed descriptor to read from (the caller's stdin).
pub struct PassedReader(Option<Inner>);

/// A passed descriptor to write to (the caller's stdout or stderr).
pub struct PassedWriter(Option<Inner>);

pub fn reader(fd: OwnedFd) -> PassedReader {
    PassedReader(wrap(fd, Interest::READABLE))
}

pub fn writer(fd: OwnedFd) -> PassedWriter {
    PassedWriter(wrap(fd, Interest::WRITABLE))
}

impl AsyncRead for PassedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let afd = match &mut self.0 {
            None => return Poll::Ready(Ok(())),
            Some(Inner::File(f)) => return Pin::new(f).poll_read(cx, buf),
            Some(Inner::Polled(afd)) => afd,
        };
        crate::transport::rawfd::poll_read(afd, cx, buf)
    }
}

impl AsyncWrite for PassedWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let afd = match &mut self.0 {
            None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            Some(Inner::File(f)) => return Pin::new(f).poll_write(cx, data),
            Some(Inner::Polled(afd)) => afd,
        };
        crate::transport::rawfd::poll_write(afd, cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Some(Inner::File(f)) => Pin::new(f).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    /// Flush, then end the stream: `shutdown(SHUT_WR)` when it is a socket (the caller's
    /// stdin may be the same socket, still open for reading), and close our copy either
    /// way — EOF for the reader once the caller's copy is gone too.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.0 {
            Some(Inner::File(f)) => ready!(Pin::new(f).poll_flush(cx))?,
            Some(Inner::Polled(afd)) => {
                // SAFETY: shutdown on a descriptor we own; ENOTSOCK for pipes is ignored.
                unsafe { libc::shutdown(afd.get_ref().raw(), libc::SHUT_WR) };
            }
            None => {}
        }
        self.0 = None;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn nonblocking(fd: &impl AsRawFd) -> bool {
        // SAFETY: F_GETFL on a live descriptor.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) & libc::O_NONBLOCK != 0 }
    }

    #[tokio::test]
    async fn pipes_flow_and_flags_come_back() {
        let (r, w) = std::io::pipe().unwrap();
        let keep_r = r.try_clone().unwrap();
        let keep_w = w.try_clone().unwrap();
        let mut pr = reader(OwnedFd::from(r));
        let mut pw = writer(OwnedFd::from(w));
        assert!(nonblocking(&keep_w));
        pw.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        pr.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        pw.shutdown().await.unwrap();
        assert!(pw.write_all(b"x").await.is_err());
        drop(pr);
        assert!(!nonblocking(&keep_r));
        assert!(!nonblocking(&keep_w));
    }

    #[tokio::test]
    async fn regular_files_and_dev_null_fall_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"data").unwrap();
        let mut r = reader(OwnedFd::from(std::fs::File::open(&p).unwrap()));
        let mut s = String::new();
        r.read_to_string(&mut s).await.unwrap();
        assert_eq!(s, "data");
        let mut null = reader(OwnedFd::from(std::fs::File::open("/dev/null").unwrap()));
        let mut v = vec![];
        assert_eq!(null.read_to_end(&mut v).await.unwrap(), 0);
        let out = dir.path().join("out");
        let mut w = writer(OwnedFd::from(std::fs::File::create(&out).unwrap()));
        w.write_all(b"written").await.unwrap();
        w.shutdown().await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"written");
    }
}
