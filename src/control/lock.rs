//! Who holds a cluster's key on this machine: the `flock` on `clusters/<alias>/endpoint.lock`.
//!
//! iroh lets one endpoint hold an EndpointId at a time (its relay delivers to the newest),
//! so DESIGN §8 makes it a rule: **one endpoint per id52 per machine** for everything that
//! starts. The process that serves a cluster (the server, else the agent) holds the lock
//! exclusively and writes how to reach it (its control socket) into the file; every command
//! that starts after it goes through it. Which process a command goes through is the
//! session layer's routing policy (`session::route`).
//!
//! A command that finds no holder binds the key itself for its own length. It holds
//! `endpoint.lock` shared only while it binds (the *gate*: no holder can appear between its
//! look and its bind), then only a shared lock on [`COMMANDS_FILE`]. So a server or agent
//! that starts while such a command runs (a `ssh -N -L` open for days) takes the key at
//! once and serves every new command; the older command keeps its own endpoint to the end
//! (its direct paths stay; a relay-only path may stall, because a relay delivers to the
//! newest endpoint of an id — README "Known limits").

use crate::config::store::ClusterDir;

/// The lock file in a cluster folder whose `flock` says who binds the cluster's key:
/// held *exclusively* by the process that serves it (the server, else the agent), which
/// writes a [`Holder`] record into it; held *shared* by CLI commands that bind the key for
/// their own length, while they bind it. The kernel drops a lock when its process dies,
/// so a crashed holder never blocks anyone.
pub const LOCK_FILE: &str = "endpoint.lock";

/// Held *shared* by every command that bound the key itself, for its whole length: how a
/// holder (and `status`) can tell that older commands still use their own endpoints.
pub const COMMANDS_FILE: &str = "commands.lock";

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
    /// A command's shared lock on `endpoint.lock` while it binds ([`Claim::bound`] drops it).
    gate: Option<nix::fcntl::Flock<std::fs::File>>,
    pub role: Role,
}

impl Claim {
    /// The command's endpoint is bound: a server or agent may now take the key for every
    /// command that starts after this point.
    pub fn bound(&mut self) {
        self.gate = None;
    }
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

fn open_lock(dir: &ClusterDir, name: &str) -> Result<std::fs::File, LockError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.dir.join(name);
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
/// exclusively and leave their record (`socket` = their control socket); commands share
/// (module docs: the gate, then [`COMMANDS_FILE`]).
pub fn claim(
    dir: &ClusterDir,
    role: Role,
    socket: Option<&std::path::Path>,
) -> Result<Claimed, LockError> {
    use nix::fcntl::{Flock, FlockArg};
    let file = open_lock(dir, LOCK_FILE)?;
    let arg = match role {
        Role::Command => FlockArg::LockSharedNonblock,
        Role::Server | Role::Agent => FlockArg::LockExclusiveNonblock,
    };
    let lock = match Flock::lock(file, arg) {
        Ok(lock) => lock,
        Err((_, _)) => return Ok(Claimed::Held(holder(dir)?)),
    };
    if role == Role::Command {
        let commands = open_lock(dir, COMMANDS_FILE)?;
        // Shared with every other command; only `commands_running` takes it exclusively,
        // for an instant, so this waits at most that long.
        let held =
            Flock::lock(commands, FlockArg::LockShared).map_err(|(_, e)| LockError::LockFile {
                path: dir.dir.join(COMMANDS_FILE),
                source: e.into(),
            })?;
        return Ok(Claimed::Mine(Claim {
            _lock: held,
            gate: Some(lock),
            role,
        }));
    }
    let mut lock = lock;
    write_record(dir, &mut lock, role, socket)?;
    Ok(Claimed::Mine(Claim {
        _lock: lock,
        gate: None,
        role,
    }))
}

fn write_record(
    dir: &ClusterDir,
    lock: &mut std::fs::File,
    role: Role,
    socket: Option<&std::path::Path>,
) -> Result<(), LockError> {
    use std::io::{Seek, Write};
    let rec = Holder {
        pid: std::process::id(),
        role,
        socket: socket.map(std::path::Path::to_path_buf),
    };
    let text = serde_json::to_string(&rec).unwrap_or_default();
    lock.set_len(0)
        .and_then(|_| lock.rewind())
        .and_then(|_| lock.write_all(format!("{text}\n").as_bytes()))
        .map_err(|source| LockError::LockFile {
            path: lock_path(dir),
            source,
        })
}

/// Whether commands that bound `dir`'s key themselves are still running.
pub fn commands_running(dir: &ClusterDir) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let path = dir.dir.join(COMMANDS_FILE);
    if !path.exists() {
        return false;
    }
    match open_lock(dir, COMMANDS_FILE) {
        Ok(f) => Flock::lock(f, FlockArg::LockExclusiveNonblock).is_err(),
        Err(_) => false,
    }
}

/// The exclusive holder of `dir`'s key, if a server or agent holds it now.
pub fn holder(dir: &ClusterDir) -> Result<Option<Holder>, LockError> {
    use nix::fcntl::{Flock, FlockArg};
    if !lock_path(dir).exists() {
        return Ok(None);
    }
    let file = open_lock(dir, LOCK_FILE)?;
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
        // Once they have bound their endpoints, an agent takes the key for new commands
        // while they still run; new commands then see it as the holder.
        let (mut a, mut b) = (a, b);
        a.bound();
        b.bound();
        assert!(commands_running(&cd));
        let Claimed::Mine(agent) = claim(&cd, Role::Agent, None).unwrap() else {
            panic!("the agent could not take the key from bound commands");
        };
        assert_eq!(holder(&cd).unwrap().map(|h| h.role), Some(Role::Agent));
        assert!(matches!(
            claim(&cd, Role::Command, None).unwrap(),
            Claimed::Held(Some(_))
        ));
        drop((a, b, agent));
        assert!(!commands_running(&cd));
        assert!(matches!(
            claim(&cd, Role::Agent, None).unwrap(),
            Claimed::Mine(_)
        ));
    }
}
