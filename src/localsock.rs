//! Trust checks for the local unix sockets malai talks to: the agent's (`MALAI_SSH_AGENT`)
//! and the server's stdinserver socket.
//!
//! The CLI hands these sockets its stdio and tty descriptors and, for stdinserver, the ssh
//! channel of a forced command. A socket planted by another user (a world-writable
//! directory, a `MALAI_SSH_AGENT` pointing somewhere shared) would get them. So before
//! anything is sent, the socket's directory must be owned by this user and writable by
//! nobody else, and the process on the other end must run as this user (SO_PEERCRED).
//! The servers check their callers the same way ([`check_caller`]: the key holder's control
//! socket, `server::stdinserver`), and both keep their sockets in a private runtime dir
//! ([`prepare_private_dir`]).

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

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

/// Who is on the other end of a unix socket, when it is not this user.
#[derive(Debug, thiserror::Error)]
pub enum CallerError {
    #[error("the peer runs as uid {theirs}, not as this user (uid {ours})")]
    OtherUser { theirs: u32, ours: u32 },
    #[error("no peer credentials: {0}")]
    Unknown(std::io::Error),
}

/// The process on the other end of `sock` runs as this user (SO_PEERCRED). Servers call
/// this before reading anything; [`check_peer`] is the client's side of the same check.
pub fn check_caller(sock: &UnixStream) -> Result<(), CallerError> {
    let ours = nix::unistd::geteuid().as_raw();
    match sock.peer_cred() {
        Ok(c) if c.uid() == ours => Ok(()),
        Ok(c) => Err(CallerError::OtherUser {
            theirs: c.uid(),
            ours,
        }),
        Err(e) => Err(CallerError::Unknown(e)),
    }
}

/// The connected peer runs as this user.
pub fn check_peer(sock: &UnixStream, path: &Path) -> Result<(), SocketTrustError> {
    check_caller(sock).map_err(|e| match e {
        CallerError::OtherUser { theirs, ours } => SocketTrustError::Peer {
            path: path.display().to_string(),
            theirs,
            ours,
        },
        CallerError::Unknown(e) => SocketTrustError::Unknown {
            path: path.display().to_string(),
            msg: e.to_string(),
        },
    })
}

/// A runtime dir that cannot hold trusted sockets.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    #[error("runtime dir {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("runtime dir {path}: not a directory (a symlink?)")]
    NotADirectory { path: PathBuf },
    #[error(
        "runtime dir {path} is not private (mode {mode:o}, owner uid {uid}): it must be a directory owned by this user with mode 0700, because its sockets are trusted; fix with `chmod 700 {path}`"
    )]
    NotPrivate { path: PathBuf, mode: u32, uid: u32 },
}

/// Create the runtime dir if needed (0700) and make sure it is private: a real directory
/// owned by us with no group/other permissions. Whoever can enter it can talk to the
/// sockets in it, which hold cluster keys (the agent, the server) or take a forced
/// command's channel (stdinserver). One that is not private is refused, not chmod'ed: it
/// may already hold a socket or lock someone else planted.
pub fn prepare_private_dir(dir: &Path) -> Result<(), PrivateDirError> {
    let io = |source| PrivateDirError::Io {
        path: dir.to_path_buf(),
        source,
    };
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(e)),
    }
    let meta = std::fs::symlink_metadata(dir).map_err(io)?;
    if !meta.is_dir() {
        return Err(PrivateDirError::NotADirectory {
            path: dir.to_path_buf(),
        });
    }
    let me = nix::unistd::geteuid().as_raw();
    let mode = meta.mode() & 0o7777;
    if meta.uid() != me || mode & 0o077 != 0 {
        return Err(PrivateDirError::NotPrivate {
            path: dir.to_path_buf(),
            mode,
            uid: meta.uid(),
        });
    }
    Ok(())
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

    #[test]
    fn run_dir_is_made_private() {
        let t = tempfile::tempdir().unwrap();
        let run = t.path().join("a/run");
        prepare_private_dir(&run).unwrap();
        let mode = std::fs::metadata(&run).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        prepare_private_dir(&run).unwrap();
        // Deny twin: a non-private dir is refused and left as it is (not chmod'ed).
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = prepare_private_dir(&run).unwrap_err();
        assert!(e.to_string().contains("not private"), "{e}");
        assert_eq!(std::fs::metadata(&run).unwrap().mode() & 0o777, 0o755);
        let link = t.path().join("link");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&run, &link).unwrap();
        assert!(prepare_private_dir(&link).is_err());
        let file = t.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(prepare_private_dir(&file).is_err());
    }

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
