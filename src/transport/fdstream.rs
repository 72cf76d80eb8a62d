//! Received file descriptors (stdinserver's stdin and stdout) as async byte streams.
//!
//! The fds are pipes or sockets that sshd gave the forced command; they are switched to
//! non-blocking mode and polled with epoll. That is safe here, unlike on our own stdio:
//! the forced command replaces its copies with /dev/null right after passing them, so no
//! other process reads or writes through the same file description. Anything epoll refuses
//! (a regular file, /dev/null — a forced command run by hand with redirections) falls back
//! to tokio's blocking-pool file I/O.
//!
//! Shutting the writer down is the other side's EOF: `shutdown(SHUT_WR)` on a socket (the
//! same socket may still be read through the other fd), closing the fd on a pipe.

use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

enum Inner {
    Poll(AsyncFd<OwnedFd>),
    File(tokio::fs::File),
}

fn wrap(fd: OwnedFd, interest: Interest) -> std::io::Result<Inner> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the OwnedFd moves into the AsyncFd and is closed only when that drops, which
    // is what registering requires (the fd stays open while registered).
    match unsafe { AsyncFd::register_with_interest(fd, interest) } {
        Ok(a) => Ok(Inner::Poll(a)),
        Err(e) => {
            // epoll refused it (EPERM for regular files): back to blocking mode, and the
            // blocking pool does the I/O.
            let (fd, err) = e.into_parts();
            tracing::debug!(error = %err, "fd not pollable; using blocking i/o");
            // SAFETY: restoring the flags we found on a descriptor we own.
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) };
            Ok(Inner::File(tokio::fs::File::from_std(std::fs::File::from(
                fd,
            ))))
        }
    }
}

/// The reading end (the forced command's stdin).
pub struct FdReader(Inner);
/// The writing end (the forced command's stdout); `None` once shut down.
pub struct FdWriter(Option<Inner>);

impl FdReader {
    pub fn new(fd: OwnedFd) -> std::io::Result<FdReader> {
        Ok(FdReader(wrap(fd, Interest::READABLE)?))
    }
}

impl FdWriter {
    pub fn new(fd: OwnedFd) -> std::io::Result<FdWriter> {
        Ok(FdWriter(Some(wrap(fd, Interest::WRITABLE)?)))
    }
}

impl AsyncRead for FdReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            Inner::File(f) => Pin::new(f).poll_read(cx, buf),
            Inner::Poll(a) => match ready!(super::rawfd::poll_read(a, cx, buf)) {
                // A socket reset by a vanished sshd is the end of input.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Poll::Ready(Ok(())),
                r => Poll::Ready(r),
            },
        }
    }
}

impl AsyncWrite for FdWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.get_mut().0 {
            None => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
            Some(Inner::File(f)) => Pin::new(f).poll_write(cx, data),
            Some(Inner::Poll(a)) => super::rawfd::poll_write(a, cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().0 {
            Some(Inner::File(f)) => Pin::new(f).poll_flush(cx),
            _ => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(Inner::File(f)) = &mut this.0 {
            ready!(Pin::new(f).poll_flush(cx))?;
        }
        if let Some(Inner::Poll(a)) = &this.0 {
            // SAFETY: shutdown on our descriptor; ENOTSOCK (a pipe) is expected.
            unsafe { libc::shutdown(a.get_ref().as_raw_fd(), libc::SHUT_WR) };
        }
        this.0 = None;
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn pipe_and_socket_round_trip_with_eof() {
        // A pipe: writer shutdown closes it, the reader sees EOF.
        let (r, w) = std::io::pipe().unwrap();
        let mut reader = FdReader::new(OwnedFd::from(r)).unwrap();
        let mut writer = FdWriter::new(OwnedFd::from(w)).unwrap();
        writer.write_all(b"hello").await.unwrap();
        writer.shutdown().await.unwrap();
        let mut got = vec![];
        reader.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");

        // One socket used for both directions: shutdown(SHUT_WR) is EOF for the peer even
        // though the socket stays open for reading.
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let a2 = a.try_clone().unwrap();
        let mut ar = FdReader::new(OwnedFd::from(a)).unwrap();
        let mut aw = FdWriter::new(OwnedFd::from(a2)).unwrap();
        let mut b = tokio::net::UnixStream::from_std({
            b.set_nonblocking(true).unwrap();
            b
        })
        .unwrap();
        aw.write_all(b"up").await.unwrap();
        aw.shutdown().await.unwrap();
        let mut got = vec![];
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"up");
        b.write_all(b"down").await.unwrap();
        b.shutdown().await.unwrap();
        let mut got = vec![];
        ar.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"down");
    }

    #[tokio::test]
    async fn regular_files_fall_back_to_blocking_io() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"file contents").unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let mut r = FdReader::new(OwnedFd::from(f)).unwrap();
        let mut got = String::new();
        r.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, "file contents");
    }
}
