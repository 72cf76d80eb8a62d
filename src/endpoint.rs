//! Who binds a cluster's key on this machine, and with which network settings.
//!
//! iroh lets one endpoint hold an EndpointId at a time (its relay delivers to the newest),
//! so DESIGN §8 makes it a rule: **one endpoint per id52 per machine**. This module is the
//! one place that binds a cluster key; everything that needs to reach the cluster (server,
//! agent, CLI commands) asks it.

use crate::config::ClusterConfig;
use crate::config::store::ClusterDir;
use crate::transport::iroh::{NetConfig, Node, TransportError};

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

/// Open `request` to `peer` of `cluster` through the holder at `socket` (the control
/// protocol's `stream`); the returned socket carries the stream's raw bytes after the
/// server accepted.
pub async fn open_via(
    socket: &std::path::Path,
    cluster: &str,
    peer: crate::id52::Id52,
    hints: &[std::net::SocketAddr],
    request: crate::protocol::Request,
) -> Result<tokio::net::UnixStream, crate::client::ClientError> {
    use crate::agent::protocol::{self as control, FailKind, FromAgent, ToAgent};
    use crate::client::ClientError;
    let client = crate::agent::client::AgentClient::connect(socket)
        .await
        .map_err(|e| ClientError::Agent(e.to_string()))?;
    let mut sock = client.into_socket();
    let lost = |e: control::ControlError| {
        ClientError::Agent(format!("key holder at {}: {e}", socket.display()))
    };
    let msg = ToAgent::Stream {
        cluster: cluster.to_string(),
        peer,
        hints: hints.to_vec(),
        request,
    };
    control::write(&mut sock, &msg).await.map_err(lost)?;
    match control::read::<_, FromAgent>(&mut sock)
        .await
        .map_err(lost)?
    {
        FromAgent::Opened => Ok(sock),
        FromAgent::Failed { kind, message } => Err(match kind {
            FailKind::Denied => ClientError::Denied(message),
            _ => ClientError::Refused(message),
        }),
        other => Err(ClientError::Agent(format!(
            "key holder sent {other:?} instead of opened"
        ))),
    }
}

/// Ask the agent at `socket` to give up `cluster`'s key (a server is starting).
pub async fn ask_release(socket: &std::path::Path, cluster: &str) -> Result<(), String> {
    use crate::agent::protocol::{self as control, FromAgent, ToAgent};
    let client = crate::agent::client::AgentClient::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let mut sock = client.into_socket();
    control::write(
        &mut sock,
        &ToAgent::Release {
            cluster: cluster.to_string(),
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    match control::read::<_, FromAgent>(&mut sock).await {
        Ok(FromAgent::Released) => Ok(()),
        Ok(other) => Err(format!("agent answered {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

/// A cluster endpoint a CLI command bound itself, shared by every request of this
/// process (a group's members run at once on one endpoint, never one each).
pub struct OwnEndpoint {
    pub node: Node,
    alias: String,
    _claim: Claim,
}

type OwnMap = std::collections::HashMap<String, std::sync::Arc<OwnEndpoint>>;

fn own_endpoints() -> std::sync::MutexGuard<'static, OwnMap> {
    static OWN: std::sync::OnceLock<std::sync::Mutex<OwnMap>> = std::sync::OnceLock::new();
    OWN.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

impl OwnEndpoint {
    /// Done with it: the last user closes the endpoint (waiting at most `limit` for the
    /// peers' acknowledgements) and releases the claim.
    pub async fn done(self: std::sync::Arc<Self>, limit: std::time::Duration) {
        let last = {
            let mut own = own_endpoints();
            // Ours and the map's: nobody else uses it.
            if std::sync::Arc::strong_count(&self) <= 2 {
                own.remove(&self.alias);
                true
            } else {
                false
            }
        };
        if last {
            self.node.close_within(limit).await;
        }
    }
}

/// How a CLI command reaches a cluster.
pub enum CommandAccess {
    /// Neither the server nor the agent holds the key: this command binds it for its own
    /// length (a shared claim: other commands may too; a server or agent may not start
    /// holding it meanwhile).
    Own(std::sync::Arc<OwnEndpoint>),
    /// The server or the agent holds it: go through its control socket.
    Via(std::path::PathBuf),
}

/// The rule for CLI commands: through the key's holder if a process holds it, else bind it
/// for the length of the command. `lockdown`: never read the key (then a holder is needed).
pub async fn for_command(
    dir: &ClusterDir,
    cfg: Option<&ClusterConfig>,
    lockdown: bool,
) -> Result<CommandAccess, crate::client::ClientError> {
    use crate::client::ClientError;
    let refused = |e: EndpointError| ClientError::Refused(e.to_string());
    if let Some(own) = own_endpoints().get(&dir.alias) {
        return Ok(CommandAccess::Own(own.clone()));
    }
    // A holder that is shutting down still holds the lock for a moment after its socket
    // is gone: wait for it rather than fail through a dead socket.
    for _ in 0..30 {
        if let Some(h) = holder(dir).map_err(refused)?
            && let Some(socket) = h.socket
        {
            if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                return Ok(CommandAccess::Via(socket));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            continue;
        }
        if lockdown {
            return Err(ClientError::Lockdown(crate::agent::lockdown_help(None)));
        }
        match claim(dir, Role::Command, None).map_err(refused)? {
            Claimed::Mine(c) => {
                let key = crate::keys::load(&dir.dir)?;
                let net = net_config(cfg)?;
                let node = Node::bind(&key, &net, None, false).await?;
                let own = std::sync::Arc::new(OwnEndpoint {
                    node,
                    alias: dir.alias.clone(),
                    _claim: c,
                });
                own_endpoints().insert(dir.alias.clone(), own.clone());
                return Ok(CommandAccess::Own(own));
            }
            // A server or agent took it between our look and our claim: look again.
            Claimed::Held(_) => continue,
        }
    }
    Err(ClientError::Refused(format!(
        "cluster {}: cannot claim its key",
        dir.alias
    )))
}

/// One running key holder and what it reports (`malai ssh status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct HolderStatus {
    /// `server`, `cluster-serve` or `agent`.
    pub role: String,
    pub status: crate::agent::protocol::AgentStatus,
}

/// Ask every key holder that runs for these dirs (the server's control sockets, the
/// agent's socket) for its connections. Holders that do not answer are left out.
pub async fn live_holders(dirs: &crate::config::paths::Dirs) -> Vec<HolderStatus> {
    let agent = crate::agent::socket_from_env().unwrap_or_else(|| crate::agent::socket_path(dirs));
    let candidates = [
        ("server", dirs.run.join(crate::server::CONTROL_SOCKET)),
        (
            "cluster-serve",
            dirs.run.join(crate::server::CONTROL_SOCKET_MANAGED),
        ),
        ("agent", agent),
    ];
    let mut out = vec![];
    for (role, path) in candidates {
        if !path.exists() {
            continue;
        }
        let Ok(client) = crate::agent::client::AgentClient::connect(&path).await else {
            continue;
        };
        if let Ok(status) = client.status().await {
            out.push(HolderStatus {
                role: role.to_string(),
                status,
            });
        }
    }
    out
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
