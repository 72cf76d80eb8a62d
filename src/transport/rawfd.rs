//! Reads and writes on non-blocking fds registered with tokio's reactor (`AsyncFd`): the one
//! implementation behind our stdio, passed fds (agent, stdinserver) and pty masters.
//!
//! Errors are returned as the kernel gave them; callers decide what counts as end of input
//! (EIO on a pty master whose child side closed, ECONNRESET on a socket whose peer vanished).

use std::os::fd::{AsRawFd, RawFd};
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
        match guard.try_io(|inner| read_into(inner.get_ref().as_raw_fd(), buf)) {
            Ok(r) => return Poll::Ready(r.map(drop)),
            Err(_would_block) => continue,
        }
    }
}

/// One `read(2)` into the unfilled part of `buf`, which is not zeroed first: the pump's
/// buffers are 64–256 KiB of fresh capacity, and `ReadBuf::initialize_unfilled` would
/// memset all of it on every read, a second pass over each byte before the kernel's copy.
fn read_into(fd: RawFd, buf: &mut ReadBuf<'_>) -> std::io::Result<usize> {
    // SAFETY: read(2) writes at most `unfilled.len()` bytes at `unfilled`'s start and never
    // reads them; exactly the `n` bytes it wrote are then marked initialized and filled.
    unsafe {
        let unfilled = buf.unfilled_mut();
        let n = libc::read(fd, unfilled.as_mut_ptr().cast(), unfilled.len());
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let n = n as usize;
        buf.assume_init(n);
        buf.advance(n);
        Ok(n)
    }
}

/// Whether `fd` is one epoll refuses because it is always ready: a regular file or a
/// character device such as /dev/null. Those are read and written directly (see
/// [`poll_read_now`]); other refused fds are left to tokio's blocking pool.
pub fn always_ready(fd: RawFd) -> bool {
    // SAFETY: fstat into a zeroed struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return false;
    }
    matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFCHR)
}

/// Read an always-ready fd (a file, /dev/null) on this thread. A read of a local file
/// returns in microseconds from the page cache, a disk's milliseconds at worst — what ssh
/// itself waits in its poll loop — while tokio's fallback moved every 64 KiB chunk to a
/// blocking-pool thread and back: a hop and a copy per chunk, measured on
/// `malai ssh foo 'cat > f' < file` (docs/benchmarks.md, issue 23). Only for one-command
/// processes; a long-running service (the agent) keeps the blocking pool, so one slow
/// file cannot stall everyone it serves.
pub fn poll_read_now(
    fd: RawFd,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<std::io::Result<()>> {
    // Such an fd never says "not now", so a loop over it (stdin from /dev/zero into a
    // stream that keeps taking) would never yield; tokio's budget makes it, as its own
    // sockets do.
    let coop = ready!(tokio::task::coop::poll_proceed(cx));
    loop {
        match read_into(fd, buf) {
            Ok(_) => {
                coop.made_progress();
                return Poll::Ready(Ok(()));
            }
            Err(e) => match e.kind() {
                std::io::ErrorKind::Interrupted => continue,
                // A device someone left non-blocking: try again on the next turn.
                std::io::ErrorKind::WouldBlock => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                _ => return Poll::Ready(Err(e)),
            },
        }
    }
}

/// Write to an always-ready fd on this thread; see [`poll_read_now`].
pub fn poll_write_now(
    fd: RawFd,
    cx: &mut Context<'_>,
    data: &[u8],
) -> Poll<std::io::Result<usize>> {
    let coop = ready!(tokio::task::coop::poll_proceed(cx));
    loop {
        // SAFETY: write from a slice we borrow, of its length.
        let n = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if n >= 0 {
            coop.made_progress();
            return Poll::Ready(Ok(n as usize));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            _ => return Poll::Ready(Err(e)),
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

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::fd::AsRawFd;

    use super::*;

    /// What `poll_read_now` reads of a file, in small reads into fresh (unzeroed) buffers.
    #[tokio::test]
    async fn a_file_reads_back_exactly_through_direct_reads() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let f = std::fs::File::open(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
        assert!(always_ready(f.as_raw_fd()));
        let mut got = Vec::new();
        loop {
            let mut space = Vec::with_capacity(4096 + 17);
            let n = std::future::poll_fn(|cx| {
                let mut buf = ReadBuf::uninit(space.spare_capacity_mut());
                ready!(poll_read_now(f.as_raw_fd(), cx, &mut buf))?;
                Poll::Ready(Ok::<_, std::io::Error>(buf.filled().len()))
            })
            .await
            .unwrap();
            if n == 0 {
                break;
            }
            // SAFETY: the read filled (and so initialized) exactly n bytes.
            unsafe { space.set_len(n) };
            got.extend_from_slice(&space);
        }
        assert_eq!(got, data);
    }

    /// /dev/zero never makes a reader wait; the coop budget still lets other tasks run on a
    /// one-thread runtime (the client's), as a socket that is always readable would.
    #[tokio::test(flavor = "current_thread")]
    async fn an_always_ready_fd_still_yields_to_other_tasks() {
        let zero = std::fs::File::open("/dev/zero").unwrap();
        assert!(always_ready(zero.as_raw_fd()));
        let ticked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let t = ticked.clone();
        tokio::spawn(async move { t.store(true, std::sync::atomic::Ordering::SeqCst) });
        let mut space = vec![0u8; 64];
        for _ in 0..10_000 {
            if ticked.load(std::sync::atomic::Ordering::SeqCst) {
                return;
            }
            std::future::poll_fn(|cx| {
                let mut buf = ReadBuf::new(&mut space);
                poll_read_now(zero.as_raw_fd(), cx, &mut buf)
            })
            .await
            .unwrap();
        }
        panic!("the other task never ran while /dev/zero was read");
    }

    #[test]
    fn pipes_are_not_always_ready() {
        let (r, _w) = std::io::pipe().unwrap();
        assert!(!always_ready(r.as_raw_fd()));
    }
}
