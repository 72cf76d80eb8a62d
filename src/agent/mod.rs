//! `malai ssh agent`: one background process per user that holds the cluster keys no
//! server on this machine holds, keeps iroh connections open for reuse (the key-holder
//! service, `keyholder`), and runs the HTTP proxy to cluster services.
//!
//! - [`daemon`]: the agent itself: socket, tasks, rescans, shutdown.
//! - [`http`]: the HTTP forward proxy (`HTTP_PROXY`) — cluster services over the cluster,
//!   everything else directly.
//! - [`launch`]: "make sure an agent runs" for `agent -e` and `malai ssh curl`: startup
//!   lock → probe → version check → stale socket removal → detached spawn → readiness.
//!
//! Environment (`control`): `MALAI_SSH_AGENT=<socket>` makes commands go through the agent
//! (the routing policy, `session::route`); `MALAI_LOCKDOWN_MODE=true` forbids the CLI to
//! read any secret key, so only the agent ever does.

pub mod daemon;
pub mod http;
pub mod launch;

use std::path::PathBuf;

use crate::config::paths::Dirs;

pub use crate::keyholder::pool::ENV_IDLE;

/// The agent's startup lock, inside the runtime dir.
const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    RunDir(#[from] crate::localsock::PrivateDirError),
    #[error(transparent)]
    Connect(#[from] crate::control::client::ConnectError),
    #[error("an agent is already running (pid {pid}) on {path}")]
    AlreadyRunning { path: PathBuf, pid: u32 },
    #[error("startup lock {path}: {msg}")]
    Lock { path: PathBuf, msg: String },
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the HTTP proxy: {0}")]
    Http(std::io::Error),
    #[error("cannot start the agent: {0}")]
    Spawn(String),
    #[error("the agent did not become ready within {secs} s{detail}")]
    NotReady { secs: u64, detail: String },
    #[error("the old agent (pid {pid}) did not stop")]
    OldAgent { pid: u32 },
    #[error("reading clusters: {0}")]
    Store(#[from] crate::config::store::StoreError),
}

fn lock_path(dirs: &Dirs) -> PathBuf {
    dirs.run.join(LOCK_FILE)
}
