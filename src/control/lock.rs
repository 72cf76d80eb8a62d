//! Who holds a cluster's key on this machine: the `flock` on `clusters/<alias>/endpoint.lock`.
//!
//! iroh lets one endpoint hold an EndpointId at a time (its relay delivers to the newest),
//! so DESIGN §8 makes it a rule: **one endpoint per id52 per machine**. The process that
//! serves a cluster (the server, else the agent) holds the lock exclusively and writes how
//! to reach it (its control socket) into the file; CLI commands hold it shared, and only
//! when neither runs. Which of them a command goes through is the session layer's routing
//! policy (`session::route`).

use crate::config::store::ClusterDir;

/// The lock file in a cluster folder whose `flock` says who binds the cluster's key:
/// held *exclusively* by the process that serves it (the server, else the agent), which
/// writes a [`Holder`] record into it; held *shared* by CLI commands that bind the key for
/// their own length because neither runs. The kernel drops a lock when its process dies,
/// so a crashed holder never blocks anyone.
pub const LOCK_FILE: &str = "endpoint.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("{path}: {source}")]
    LockFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Which kind of process holds a cluster's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// `malai ssh server` (the cluster's accepting endpoint).
    Server,
    /// `malai ssh agent`.
    Agent,
    /// A CLI command with neither running (shared: several may run at once).
    Command,
}

/// The exclusive holder's record: how other processes reach it (its control socket speaks
/// the control protocol, [`super::protocol`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Holder {
    pub pid: u32,
    pub role: Role,
    pub socket: Option<std::path::PathBuf>,
}

/// A held claim on a cluster's key; dropping it releases it.
#[derive(Debug)]
pub struct Claim {
    _lock: nix::fcntl::Flock<std::fs::File>,
    pub role: Role,
}

/// What trying to claim found.
#[derive(Debug)]
pub enum Claimed {
    Mine(Claim),
    /// Another process holds it: its record when it is an exclusive holder (server or
    /// agent), `None` when CLI commands hold it shared.
    Held(Option<Holder>),
}

fn lock_path(dir: &ClusterDir) -> std::path::PathBuf {
    dir.dir.join(LOCK_FILE)
}

fn open_lock(dir: &ClusterDir) -> Result<std::fs::File, LockError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = lock_path(dir);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| LockError::LockFile { path, source })
}

fn read_record(dir: &ClusterDir) -> Option<Holder> {
    let text = std::fs::read_to_string(lock_path(dir)).ok()?;
    serde_json::from_str(text.trim()).ok()
}

/// Try to claim `dir`'s key for `role` without waiting. Server and agent claim it
/// exclusively and leave their record (`socket` = their control socket); commands share.
pub fn claim(
    dir: &ClusterDir,
    role: Role,
    socket: Option<&std::path::Path>,
) -> Result<Claimed, LockError> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::{Seek, Write};
    let file = open_lock(dir)?;
    let arg = match role {
        Role::Command => FlockArg::LockSharedNonblock,
        Role::Server | Role::Agent => FlockArg::LockExclusiveNonblock,
    };
    match Flock::lock(file, arg) {
        Ok(mut lock) => {
            if role != Role::Command {
                let rec = Holder {
                    pid: std::process::id(),
                    role,
                    socket: socket.map(std::path::Path::to_path_buf),
                };
                let text = serde_json::to_string(&rec).unwrap_or_default();
                let written = lock
                    .set_len(0)
                    .and_then(|_| lock.rewind())
                    .and_then(|_| lock.write_all(format!("{text}\n").as_bytes()));
                if let Err(source) = written {
                    return Err(LockError::LockFile {
                        path: lock_path(dir),
                        source,
                    });
                }
            }
            Ok(Claimed::Mine(Claim { _lock: lock, role }))
        }
        Err((_, _)) => Ok(Claimed::Held(holder(dir)?)),
    }
}

/// The exclusive holder of `dir`'s key, if a server or agent holds it now.
pub fn holder(dir: &ClusterDir) -> Result<Option<Holder>, LockError> {
    use nix::fcntl::{Flock, FlockArg};
    if !lock_path(dir).exists() {
        return Ok(None);
    }
    let file = open_lock(dir)?;
    // A shared lock is refused only while someone holds it exclusively.
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(_free_or_shared) => Ok(None),
        Err(_) => {
            // The holder writes its record right after locking: give it a moment.
            for _ in 0..20 {
                if let Some(r) = read_record(dir) {
                    return Ok(Some(r));
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Ok(None)
        }
    }
}

/// One line saying who holds a key (for errors).
pub fn describe(h: Option<&Holder>) -> String {
    match h {
        Some(h) => {
            let who = match h.role {
                Role::Server => "malai ssh server",
                Role::Agent => "malai ssh agent",
                Role::Command => "a malai command",
            };
            format!("its key is held by {who} (pid {})", h.pid)
        }
        None => {
            "its key is in use by other malai commands (run the agent or the server to share it)"
                .into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::paths::Dirs;

    fn dir() -> (tempfile::TempDir, ClusterDir) {
        let t = tempfile::tempdir().unwrap();
        let dirs = Dirs::under(t.path());
        let cd = ClusterDir::new(&dirs, "acme").unwrap();
        cd.create().unwrap();
        (t, cd)
    }

    /// One exclusive holder at a time; its record names it; commands share only when no
    /// exclusive holder exists; a dropped claim frees the key.
    #[test]
    fn exclusive_and_shared_claims() {
        let (_t, cd) = dir();
        assert!(holder(&cd).unwrap().is_none());
        let sock = std::path::Path::new("/run/x.sock");
        let Claimed::Mine(server) = claim(&cd, Role::Server, Some(sock)).unwrap() else {
            panic!("first claim refused");
        };
        let h = holder(&cd).unwrap().expect("a holder");
        assert_eq!(h.role, Role::Server);
        assert_eq!(h.pid, std::process::id());
        assert_eq!(h.socket.as_deref(), Some(sock));
        match claim(&cd, Role::Agent, None).unwrap() {
            Claimed::Held(Some(h)) => assert_eq!(h.role, Role::Server),
            other => panic!("agent got {other:?}"),
        }
        assert!(matches!(
            claim(&cd, Role::Command, None).unwrap(),
            Claimed::Held(Some(_))
        ));
        drop(server);
        assert!(holder(&cd).unwrap().is_none());

        // Commands share; meanwhile no server or agent can take it.
        let Claimed::Mine(a) = claim(&cd, Role::Command, None).unwrap() else {
            panic!("command claim refused");
        };
        let Claimed::Mine(b) = claim(&cd, Role::Command, None).unwrap() else {
            panic!("second command claim refused");
        };
        assert!(matches!(
            claim(&cd, Role::Agent, None).unwrap(),
            Claimed::Held(_)
        ));
        drop((a, b));
        assert!(matches!(
            claim(&cd, Role::Agent, None).unwrap(),
            Claimed::Mine(_)
        ));
    }
}
