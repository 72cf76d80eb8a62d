//! Passing file descriptors over a unix socket (SCM_RIGHTS), for `stdinserver` (its
//! stdin/stdout go to the server) and the agent (proxy/exec hand it their stdio).
//!
//! Wire: each message is one `sendmsg` carrying up to `MAX_FDS` descriptors plus a small
//! payload (at least one byte: Linux drops ancillary data sent with an empty payload on a
//! stream socket). The receiver gets the fds as `OwnedFd`s, so they are closed on drop.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::io::Interest;
use tokio::net::UnixStream;

/// Most descriptors one message carries (stdin, stdout, stderr).
pub const MAX_FDS: usize = 3;
/// Largest payload accepted alongside the fds.
pub const MAX_PAYLOAD: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FdPassError {
    #[error("fd passing: {0}")]
    Io(#[from] std::io::Error),
    #[error("fd passing: {0}")]
    Sys(#[from] nix::Error),
    #[error("fd passing: peer closed the socket")]
    Closed,
    #[error("fd passing: message truncated")]
    Truncated,
}

/// Send `payload` (non-empty) with `fds` in one message.
pub async fn send_fds(sock: &UnixStream, payload: &[u8], fds: &[RawFd]) -> Result<(), FdPassError> {
    let payload = if payload.is_empty() {
        &[0u8][..]
    } else {
        payload
    };
    loop {
        sock.writable().await?;
        let res = sock.try_io(Interest::WRITABLE, || {
            let iov = [IoSlice::new(payload)];
            let cmsg = [ControlMessage::ScmRights(fds)];
            sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)
                .map_err(std::io::Error::from)
        });
        match res {
            Ok(n) if n == payload.len() => return Ok(()),
            Ok(_) => return Err(FdPassError::Truncated),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receive one message: its payload and the fds that came with it.
pub async fn recv_fds(sock: &UnixStream) -> Result<(Vec<u8>, Vec<OwnedFd>), FdPassError> {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    loop {
        sock.readable().await?;
        let res = sock.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
            let msg = recvmsg::<()>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            let mut fds = vec![];
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(list) = c {
                        for fd in list {
                            // SAFETY: the kernel just gave us these descriptors.
                            fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                        }
                    }
                }
            }
            if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                return Err(std::io::Error::other("too many descriptors"));
            }
            Ok((msg.bytes, fds))
        });
        match res {
            Ok((0, _)) => return Err(FdPassError::Closed),
            Ok((n, fds)) => {
                buf.truncate(n);
                return Ok((buf, fds));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[tokio::test]
    async fn passes_a_pipe() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut r, w) = std::io::pipe().unwrap();
        send_fds(&a, b"hello", &[w.as_raw_fd()]).await.unwrap();
        drop(w);
        let (payload, mut fds) = recv_fds(&b).await.unwrap();
        assert_eq!(payload, b"hello");
        assert_eq!(fds.len(), 1);
        let mut f = std::fs::File::from(fds.remove(0));
        f.write_all(b"through").unwrap();
        drop(f);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        assert_eq!(s, "through");
        drop(a);
        assert!(matches!(recv_fds(&b).await, Err(FdPassError::Closed)));
    }
}
