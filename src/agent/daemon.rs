//! The agent process (`malai ssh agent`, foreground): its socket, its tasks, its shutdown.
//!
//! Start: private runtime dir → startup lock (unless the spawning `agent -e` holds it) →
//! refuse if a live agent answers, else remove the stale socket → bind the socket (0600)
//! → bind the HTTP proxy on 127.0.0.1 → bind endpoints for the clusters found → ready.
//! Every task is owned by one `TaskTracker` and stops on one `CancellationToken`
//! (SIGTERM/SIGINT/SIGHUP or a `stop` request); shutdown drains with a deadline, closes the
//! connections and endpoints, and removes the socket file — only if it is still ours.
//! An agent whose socket file was removed or replaced can no longer be reached, so it
//! exits too.

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::launch::{Probe, StartupLock, probe};
use super::{AgentError, lock_path};
use crate::config::paths::Dirs;
use crate::control::agent_socket as socket_path;
use crate::keyholder::pool::{HeldCluster, Pool, idle_from_env};
use crate::keyholder::serve::{self, HolderContext};
use crate::session::dial::Dialer;
use crate::sync::follow::{Follower, Trigger, is_member, poll_from_env};

/// How long shutdown waits for running requests.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// How often clusters are rescanned (new clusters, changed keys) and the socket checked.
const RESCAN_EVERY: Duration = Duration::from_secs(2);

/// Options of `malai ssh agent`.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Run the HTTP proxy.
    pub http: bool,
    /// Spawned by `agent -e`, which holds the startup lock and has probed already.
    pub under_lock: bool,
}

/// What the agent reports once it is reachable.
#[derive(Debug, Clone)]
pub struct Ready {
    pub socket: PathBuf,
    pub http: Option<SocketAddr>,
    pub clusters: Vec<String>,
}

/// The socket file, removed on drop if it is still the one we bound (a newer agent may
/// have replaced it).
struct SocketFile {
    path: PathBuf,
    id: (u64, u64),
}

impl SocketFile {
    fn identity(path: &Path) -> Option<(u64, u64)> {
        std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }

    fn still_ours(&self) -> bool {
        SocketFile::identity(&self.path) == Some(self.id)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.still_ours() {
            let _ = std::fs::remove_file(&self.path);
            crate::control::token::remove(&self.path);
        }
    }
}

/// Run the agent until `shutdown` is cancelled.
pub async fn run(
    dirs: Dirs,
    opts: AgentOptions,
    shutdown: CancellationToken,
    ready: impl FnOnce(&Ready),
) -> Result<(), AgentError> {
    crate::localsock::prepare_private_dir(&dirs.run)?;
    let path = socket_path(&dirs);
    let lock = if opts.under_lock {
        None
    } else {
        Some(StartupLock::acquire(&lock_path(&dirs)).await?)
    };
    match probe(&path).await {
        Probe::Alive(h) | Probe::OtherVersion(h) => {
            return Err(AgentError::AlreadyRunning { path, pid: h.pid });
        }
        Probe::Stale => {
            tracing::info!(socket = %path.display(), "removing stale agent socket");
            let _ = std::fs::remove_file(&path);
        }
        Probe::Missing => {}
    }
    // The token first: no caller may read a stale one once the socket answers.
    let token = crate::control::token::create(&path).map_err(|source| AgentError::Bind {
        path: path.clone(),
        source,
    })?;
    let listener = UnixListener::bind(&path).map_err(|source| AgentError::Bind {
        path: path.clone(),
        source,
    })?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        AgentError::Bind {
            path: path.clone(),
            source,
        }
    })?;
    let socket = SocketFile {
        id: SocketFile::identity(&path).unwrap_or_default(),
        path: path.clone(),
    };
    let http = if opts.http {
        Some(bind_http(&dirs).await?)
    } else {
        None
    };
    let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
    let ctx = Arc::new(HolderContext {
        pool: Arc::new(Pool::new(dirs.clone(), path.clone(), idle_from_env())),
        dirs,
        socket: path.clone(),
        http: http_addr,
        shutdown: shutdown.clone(),
        stoppable: true,
        inbound: None,
        token,
    });
    ctx.pool.rescan().await;
    drop(lock);
    tracing::info!(socket = %path.display(), http = ?http_addr, clusters = ?ctx.pool.clusters(), "agent ready");
    ready(&Ready {
        socket: path.clone(),
        http: http_addr,
        clusters: ctx.pool.clusters(),
    });

    let tracker = TaskTracker::new();
    tracker.spawn(serve::accept_loop(listener, ctx.clone(), tracker.clone()));
    if let Some(l) = http {
        tracker.spawn(super::http::serve(l, ctx.clone(), tracker.clone()));
    }
    tracker.spawn(maintenance(ctx.clone(), socket, tracker.clone()));

    shutdown.cancelled().await;
    tracing::info!("agent shutting down");
    tracker.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing with requests still running");
    }
    ctx.pool.close().await;
    Ok(())
}

/// The HTTP proxy port a spawned agent should take again (what the spawning shell's
/// `HTTP_PROXY` advertised, `launch::advertised_http_port`).
pub const ENV_HTTP_PORT: &str = "MALAI_AGENT_HTTP_PORT";
/// Where the last HTTP proxy port is kept (in the private runtime dir).
const HTTP_PORT_FILE: &str = "agent-http-port";

/// The HTTP proxy's listener: on the port the environment advertised, else the last
/// agent's, when free (shells that exported it keep working across a restart); else any.
async fn bind_http(dirs: &Dirs) -> Result<TcpListener, AgentError> {
    let file = dirs.run.join(HTTP_PORT_FILE);
    let wanted = std::env::var(ENV_HTTP_PORT)
        .ok()
        .or_else(|| std::fs::read_to_string(&file).ok())
        .and_then(|p| p.trim().parse::<u16>().ok())
        .filter(|p| *p != 0);
    let listener = match wanted {
        Some(port) => match TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::info!(port, error = %e, "advertised HTTP proxy port not free; taking another");
                TcpListener::bind(("127.0.0.1", 0))
                    .await
                    .map_err(AgentError::Http)?
            }
        },
        None => TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(AgentError::Http)?,
    };
    if let Ok(addr) = listener.local_addr()
        && let Err(e) = crate::config::store::write_atomic(
            &file,
            format!("{}\n", addr.port()).as_bytes(),
            0o600,
        )
    {
        tracing::info!(error = %e, "cannot remember the HTTP proxy port");
    }
    Ok(listener)
}

/// Rescan clusters, close idle connections, keep member clusters' files current
/// (`sync::follow`), and exit if our socket is gone. Owns the socket file so it is removed
/// when this task ends (at shutdown).
async fn maintenance(ctx: Arc<HolderContext>, socket: SocketFile, tracker: TaskTracker) {
    let mut rescan = tokio::time::interval(RESCAN_EVERY);
    let mut reap = tokio::time::interval(ctx.pool.reap_every());
    let follower = Follower::new(poll_from_env());
    let mut poll = tokio::time::interval(follower.tick());
    let mut dialed = ctx.pool.take_dial_events();
    rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = rescan.tick() => {
                if !socket.still_ours() {
                    tracing::warn!(socket = %socket.path.display(), "agent socket removed or replaced; exiting");
                    ctx.shutdown.cancel();
                    break;
                }
                ctx.pool.rescan().await;
            }
            _ = reap.tick() => ctx.pool.reap().await,
            _ = poll.tick() => {
                let held = ctx.pool.held().await;
                follower.retain(&held.iter().map(|h| h.dir.alias.clone()).collect::<Vec<_>>());
                for h in held {
                    follow(&follower, &tracker, &ctx.shutdown, h, Trigger::Scheduled);
                }
            }
            Some(alias) = recv(&mut dialed) => {
                if let Some(h) = ctx.pool.held().await.into_iter().find(|h| h.dir.alias == alias) {
                    follow(&follower, &tracker, &ctx.shutdown, h, Trigger::Dialed);
                }
            }
        }
    }
    drop(socket);
}

/// The next dial event, or never (no receiver).
async fn recv(rx: &mut Option<tokio::sync::mpsc::Receiver<String>>) -> Option<String> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Start one config-sync check of a held member cluster, if one is due.
fn follow(
    follower: &Arc<Follower>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    held: HeldCluster,
    why: Trigger,
) {
    if !is_member(&held.dir) || !follower.start(&held.dir.alias, why, Instant::now()) {
        return;
    }
    let check = follower
        .clone()
        .check(held.dir, Dialer::Node(held.node), why);
    let shutdown = shutdown.clone();
    tracker.spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = check => {}
        }
    });
}
