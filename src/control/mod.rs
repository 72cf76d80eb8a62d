//! The local control socket: how malai processes on one machine find and talk to the one
//! process that holds a cluster's key (the server, else the agent).
//!
//! - [`lock`]: the lock file that says who holds a key, and how to reach it.
//! - [`protocol`]: the control protocol (versioned, size-capped frames, fd passing).
//! - [`client`]: connect, check the version, make one request.
//!
//! The agent and the server serve the same protocol (`keyholder::serve`); only the agent
//! is found through the environment (`MALAI_SSH_AGENT`), every holder through its lock file.

pub mod client;
pub mod lock;
pub mod protocol;
pub mod token;

use std::path::{Path, PathBuf};

use crate::config::paths::Dirs;

/// Where the CLI finds the agent's socket.
pub const ENV_SOCKET: &str = "MALAI_SSH_AGENT";
/// `true` (or `1`, `yes`): the CLI never reads a secret key and needs the agent.
pub const ENV_LOCKDOWN: &str = "MALAI_LOCKDOWN_MODE";

/// The agent's socket, in the runtime dir.
pub const AGENT_SOCKET: &str = "agent.sock";
/// `malai ssh server`'s control socket (the keys it holds), in the runtime dir.
pub const SERVER_SOCKET: &str = "server-control.sock";
/// The control socket of a server that serves only the clusters it manages
/// (`cluster serve`).
pub const SERVER_SOCKET_MANAGED: &str = "cluster-serve-control.sock";

/// Whether `MALAI_LOCKDOWN_MODE` asks for lockdown.
pub fn lockdown_mode() -> bool {
    matches!(
        std::env::var(ENV_LOCKDOWN)
            .unwrap_or_default()
            .to_ascii_lowercase()
            .as_str(),
        "true" | "1" | "yes" | "on"
    )
}

/// The lockdown error, with why the agent could not be used and how to start one.
pub fn lockdown_help(why: Option<&str>) -> String {
    let why = match why {
        Some(w) => format!(": {w}"),
        None => match std::env::var_os(ENV_SOCKET) {
            Some(p) if !p.is_empty() => {
                format!(": the agent at {} is not usable", Path::new(&p).display())
            }
            _ => format!(": {ENV_SOCKET} is not set"),
        },
    };
    format!(
        "lockdown mode ({ENV_LOCKDOWN}=true) needs a running agent{why}; start one with: eval \"$(malai ssh agent -e)\""
    )
}

/// The agent socket this user's CLI should use: `MALAI_SSH_AGENT` if set and non-empty.
pub fn socket_from_env() -> Option<PathBuf> {
    std::env::var_os(ENV_SOCKET)
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// The agent's socket in this machine's runtime dir.
pub fn agent_socket(dirs: &Dirs) -> PathBuf {
    dirs.run.join(AGENT_SOCKET)
}

/// One running key holder and what it reports (`malai ssh status`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveHolder {
    /// `server`, `cluster-serve` or `agent`.
    pub role: String,
    pub status: protocol::HolderStatus,
}

/// Ask every key holder that runs for these dirs (the server's control sockets, the
/// agent's socket) for its connections. Holders that do not answer are left out.
pub async fn live_holders(dirs: &Dirs) -> Vec<LiveHolder> {
    let agent = socket_from_env().unwrap_or_else(|| agent_socket(dirs));
    let candidates = [
        ("server", dirs.run.join(SERVER_SOCKET)),
        ("cluster-serve", dirs.run.join(SERVER_SOCKET_MANAGED)),
        ("agent", agent),
    ];
    let mut out = vec![];
    for (role, path) in candidates {
        if !path.exists() {
            continue;
        }
        let Ok(client) = client::ControlClient::connect(&path).await else {
            continue;
        };
        if let Ok(status) = client.status().await {
            out.push(LiveHolder {
                role: role.to_string(),
                status,
            });
        }
    }
    out
}
