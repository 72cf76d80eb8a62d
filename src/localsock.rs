//! Trust checks for the local unix sockets malai talks to: the agent's (`MALAI_SSH_AGENT`)
//! and the server's stdinserver socket.
//!
//! The CLI hands these sockets its stdio and tty descriptors and, for stdinserver, the ssh
//! channel of a forced command. A socket planted by another user (a world-writable
//! directory, a `MALAI_SSH_AGENT` pointing somewhere shared) would get them. So before
//! anything is sent, the socket's directory must be owned by this user and writable by
//! nobody else, and the process on the other end must run as this user (SO_PEERCRED).
//! The servers check their callers the same way (`agent::serve`, `server::stdinserver`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tokio::net::UnixStream;

/// Why a socket is not trusted; one line for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SocketTrustError {
    #[error(
        "{path}: the socket's directory {dir} is {why}; malai only talks to a socket in a directory owned by this user and writable by nobody else"
    )]
    Directory {
        path: String,
        dir: String,
        why: String,
    },
    #[error(
        "{path}: the process behind the socket runs as uid {theirs}, not as this user (uid {ours}); refusing to talk to it"
    )]
    Peer {
        path: String,
        theirs: u32,
        ours: u32,
    },
    #[error("{path}: cannot check who is behind the socket: {msg}")]
    Unknown { path: String, msg: String },
}

/// The socket's directory: a real directory (not a symlink), owned by this user, with no
/// write permission for group or other.
pub fn check_dir(path: &Path) -> Result<(), SocketTrustError> {
    let shown = path.display().to_string();
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let bad = |why: String| SocketTrustError::Directory {
        path: shown.clone(),
        dir: dir.display().to_string(),
        why,
    };
    let m = std::fs::symlink_metadata(dir).map_err(|e| bad(format!("unreadable ({e})")))?;
    let me = nix::unistd::geteuid().as_raw();
    if !m.is_dir() {
        return Err(bad("not a directory (a symlink?)".into()));
    }
    if m.uid() != me {
        return Err(bad(format!("owned by uid {}", m.uid())));
    }
    if m.mode() & 0o022 != 0 {
        return Err(bad(format!(
            "writable by others (mode {:o})",
            m.mode() & 0o777
        )));
    }
    Ok(())
}

/// The connected peer runs as this user.
pub fn check_peer(sock: &UnixStream, path: &Path) -> Result<(), SocketTrustError> {
    let ours = nix::unistd::geteuid().as_raw();
    match sock.peer_cred() {
        Ok(c) if c.uid() == ours => Ok(()),
        Ok(c) => Err(SocketTrustError::Peer {
            path: path.display().to_string(),
            theirs: c.uid(),
            ours,
        }),
        Err(e) => Err(SocketTrustError::Unknown {
            path: path.display().to_string(),
            msg: e.to_string(),
        }),
    }
}

/// Connect to `path` only if its directory is trusted, and keep the connection only if the
/// peer is this user.
pub async fn connect(path: &Path) -> Result<UnixStream, ConnectError> {
    check_dir(path)?;
    let sock = UnixStream::connect(path).await.map_err(ConnectError::Io)?;
    check_peer(&sock, path)?;
    Ok(sock)
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Trust(#[from] SocketTrustError),
    #[error("{0}")]
    Io(std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn private_dir_and_same_user_are_trusted_others_not() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("run");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.join("s.sock");
        let _l = tokio::net::UnixListener::bind(&path).unwrap();
        // Allowed: our own 0700 (or 0755) directory, a peer of our uid.
        connect(&path).await.unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        connect(&path).await.unwrap();
        // Deny twins: a directory others may write to (where anyone could plant it).
        for mode in [0o777, 0o1777, 0o775, 0o757] {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).unwrap();
            let e = connect(&path).await.unwrap_err();
            assert!(
                e.to_string().contains("writable by others"),
                "{mode:o}: {e}"
            );
        }
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A symlinked directory.
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(connect(&link.join("s.sock")).await.is_err());
    }

    /// A socket in a trusted directory whose listener runs as another user is refused.
    /// SO_PEERCRED reports the credentials in force at `listen()`, so the socket is bound
    /// here and listened on by a child that first became `nobody`. Needs root (skipped
    /// otherwise).
    #[tokio::test]
    async fn a_listener_of_another_user_is_refused() {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to run a listener as another user");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("s.sock");
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
        let owned = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        let addr = nix::sys::socket::UnixAddr::new(&path).unwrap();
        nix::sys::socket::bind(owned.as_raw_fd(), &addr).unwrap();
        let raw = owned.as_raw_fd();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgid(65534) != 0 || libc::setuid(65534) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::listen(raw, 8) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        let r = connect(&path).await;
        let _ = child.kill();
        let _ = child.wait();
        match r {
            Err(ConnectError::Trust(SocketTrustError::Peer { theirs: 65534, .. })) => {}
            other => panic!("expected a refusal of uid 65534, got {other:?}"),
        }
    }
}
