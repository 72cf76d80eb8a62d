//! Who binds a cluster's key on this machine, and with which network settings.
//!
//! iroh lets one endpoint hold an EndpointId at a time (its relay delivers to the newest),
//! so DESIGN §8 makes it a rule: **one endpoint per id52 per machine**. This module is the
//! one place that binds a cluster key; everything that needs to reach the cluster (server,
//! agent, CLI commands) asks it.

use crate::config::ClusterConfig;
use crate::config::store::ClusterDir;
use crate::transport::iroh::{NetConfig, TransportError};

/// The network settings of a cluster: its file's `relays`/`relay-ca` with the environment's
/// overrides. A member that joined but has no file yet uses iroh's defaults (or the env).
pub fn net_config(cfg: Option<&ClusterConfig>) -> Result<NetConfig, TransportError> {
    match cfg {
        Some(c) => NetConfig::for_cluster(&c.relays, c.relay_ca.as_deref()),
        None => NetConfig::for_cluster(&[], None),
    }
}

/// [`net_config`] of the file in `dir`, if it has a valid one.
pub fn net_config_of(dir: &ClusterDir) -> Result<NetConfig, TransportError> {
    let cfg = if dir.has_file() {
        dir.load().ok()
    } else {
        None
    };
    net_config(cfg.as_ref())
}

/// The lock file in a cluster folder whose `flock` says who binds the cluster's key:
/// held *exclusively* by the process that serves it (the server, else the agent), which
/// writes a [`Holder`] record into it; held *shared* by CLI commands that bind the key for
/// their own length because neither runs. The kernel drops a lock when its process dies,
/// so a crashed holder never blocks anyone.
pub const LOCK_FILE: &str = "endpoint.lock";

#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
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
/// the agent's control protocol, `agent::protocol`).
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

fn open_lock(dir: &ClusterDir) -> Result<std::fs::File, EndpointError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = lock_path(dir);
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| EndpointError::LockFile { path, source })
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
) -> Result<Claimed, EndpointError> {
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
                    return Err(EndpointError::LockFile {
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
pub fn holder(dir: &ClusterDir) -> Result<Option<Holder>, EndpointError> {
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
