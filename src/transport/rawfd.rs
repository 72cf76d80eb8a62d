//! Reads and writes on non-blocking fds registered with tokio's reactor (`AsyncFd`): the one
//! implementation behind our stdio, passed fds (agent, stdinserver) and pty masters.
//!
//! Errors are returned as the kernel gave them; callers decide what counts as end of input
//! (EIO on a pty master whose child side closed, ECONNRESET on a socket whose peer vanished).

use std::os::fd::AsRawFd;
use std::task::{Context, Poll, ready};

use tokio::io::ReadBuf;
use tokio::io::unix::AsyncFd;

/// Read what is available into `buf` (waiting for readiness first).
pub fn poll_read<T: AsRawFd>(
    afd: &AsyncFd<T>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<std::io::Result<()>> {
    loop {
        let mut guard = ready!(afd.poll_read_ready(cx))?;
        let unfilled = buf.initialize_unfilled();
        let res = guard.try_io(|inner| {
            // SAFETY: read into the unfilled part of a buffer we borrow, of its length.
            let n = unsafe {
                libc::read(
                    inner.get_ref().as_raw_fd(),
                    unfilled.as_mut_ptr().cast(),
                    unfilled.len(),
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match res {
            Ok(Ok(n)) => {
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            Ok(Err(e)) => return Poll::Ready(Err(e)),
            Err(_would_block) => continue,
        }
    }
}

/// Write as much of `data` as the fd takes now (waiting for readiness first).
pub fn poll_write<T: AsRawFd>(
    afd: &AsyncFd<T>,
    cx: &mut Context<'_>,
    data: &[u8],
) -> Poll<std::io::Result<usize>> {
    loop {
        let mut guard = ready!(afd.poll_write_ready(cx))?;
        let res = guard.try_io(|inner| {
            // SAFETY: write from a slice we borrow, of its length. SIGPIPE is ignored by the
            // Rust runtime, so a closed reader is EPIPE, not a signal.
            let n = unsafe {
                libc::write(
                    inner.get_ref().as_raw_fd(),
                    data.as_ptr().cast(),
                    data.len(),
                )
            };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match res {
            Ok(r) => return Poll::Ready(r),
            Err(_would_block) => continue,
        }
    }
}
