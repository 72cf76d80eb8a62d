//! `malai ssh agent`: one background process per user that holds the cluster keys, keeps
//! iroh connections open for reuse, and runs the HTTP proxy to cluster services.
//!
//! - [`protocol`]: the control protocol on the unix socket (versioned, size-capped).
//! - [`daemon`]: the agent itself: socket, accept loop, rescans, shutdown.
//! - [`pool`]: one iroh endpoint per cluster, one connection per server, reused.
//! - [`serve`]: one control connection: `status`, `stop`, or a request on passed fds.
//! - [`fds`]: the descriptors a CLI passed, as async streams.
//! - [`http`]: the HTTP forward proxy (`HTTP_PROXY`) — cluster services over the cluster,
//!   everything else directly.
//! - [`launch`]: "make sure an agent runs" for `agent -e` and `malai ssh curl`: startup
//!   lock → probe → version check → stale socket removal → detached spawn → readiness.
//! - [`client`]: the CLI's side: talk to the agent, hand it stdio, relay the exit status.
//!
//! Environment: `MALAI_SSH_AGENT=<socket>` makes `proxy` and native exec go through the
//! agent (falling back to a direct connection when it is dead, unless lockdown);
//! `MALAI_LOCKDOWN_MODE=true` forbids the CLI to read any secret key, so only the agent
//! ever does.

pub mod client;
pub mod daemon;
pub mod fds;
pub mod http;
pub mod launch;
pub mod pool;
pub mod protocol;
pub mod serve;

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::config::paths::Dirs;

/// Where the CLI finds the agent's socket.
pub const ENV_SOCKET: &str = "MALAI_SSH_AGENT";
/// `true` (or `1`, `yes`): the CLI never reads a secret key and needs the agent.
pub const ENV_LOCKDOWN: &str = "MALAI_LOCKDOWN_MODE";
/// Seconds an unused pooled connection is kept (default [`pool::DEFAULT_IDLE`]).
pub const ENV_IDLE: &str = "MALAI_AGENT_IDLE_SECS";

/// File names inside the runtime dir.
const SOCKET_FILE: &str = "agent.sock";
const LOCK_FILE: &str = "agent.lock";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("runtime dir {path}: {msg}")]
    RunDir { path: PathBuf, msg: String },
    #[error("agent socket not trusted: {0}")]
    Untrusted(#[from] crate::localsock::SocketTrustError),
    #[error("no agent at {path}: {source}")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} did not answer within {secs} s")]
    Timeout { path: PathBuf, secs: u64 },
    #[error(
        "the agent at {path} (pid {pid}) speaks control protocol {theirs}; this malai speaks {ours}"
    )]
    Version {
        path: PathBuf,
        pid: u32,
        theirs: u32,
        ours: u32,
    },
    #[error("agent at {path}: {source}")]
    Control {
        path: PathBuf,
        #[source]
        source: protocol::ControlError,
    },
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
pub fn socket_path(dirs: &Dirs) -> PathBuf {
    dirs.run.join(SOCKET_FILE)
}

fn lock_path(dirs: &Dirs) -> PathBuf {
    dirs.run.join(LOCK_FILE)
}

/// Create the runtime dir if needed (0700) and make sure it is private: a real directory
/// owned by us with no group/other permissions. Whoever can enter it can talk to the
/// agent, which holds every cluster key. One that is not private is refused, not chmod'ed:
/// it may already hold a socket or lock someone else planted (the server refuses it the
/// same way, `server::stdinserver::check_runtime_dir`).
pub fn prepare_run_dir(dir: &Path) -> Result<(), AgentError> {
    let err = |msg: String| AgentError::RunDir {
        path: dir.to_path_buf(),
        msg,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| err(e.to_string()))?;
    let meta = std::fs::symlink_metadata(dir).map_err(|e| err(e.to_string()))?;
    if !meta.is_dir() {
        return Err(err("not a directory (a symlink?)".into()));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(err(format!(
            "owned by uid {}, not by this user (uid {me})",
            meta.uid()
        )));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(err(format!(
            "not private (mode {:o}); it must be mode 0700, because its sockets are trusted: fix with `chmod 700 {}`",
            meta.mode() & 0o777,
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn run_dir_is_made_private() {
        let t = tempfile::tempdir().unwrap();
        let run = t.path().join("a/run");
        prepare_run_dir(&run).unwrap();
        let mode = std::fs::metadata(&run).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        prepare_run_dir(&run).unwrap();
        // Deny twin: a non-private dir is refused and left as it is (not chmod'ed).
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = prepare_run_dir(&run).unwrap_err();
        assert!(e.to_string().contains("not private"), "{e}");
        assert_eq!(std::fs::metadata(&run).unwrap().mode() & 0o777, 0o755);
        let link = t.path().join("link");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::symlink(&run, &link).unwrap();
        assert!(prepare_run_dir(&link).is_err());
        let file = t.path().join("file");
        std::fs::write(&file, b"").unwrap();
        assert!(prepare_run_dir(&file).is_err());
    }
}
