//! `malai ssh server`: one process serving every cluster in DATADIR where this machine is
//! listed as a server, manages the cluster, or has joined and waits for its first file.
//!
//! Shape: one iroh endpoint per served cluster (the endpoint's key *is* the cluster
//! identity) → an accept loop → a task per connection → a task per bi-stream → [`request`],
//! the one choke point where the ACL is asked before anything is dispatched. Every task is
//! owned by one `TaskTracker` and stops on one root `CancellationToken`; SIGTERM cancels,
//! then the tracker is drained (with a deadline) and the endpoints closed.
//!
//! The cluster file is re-read when its content changes (hashed per request), so ACL edits
//! take effect on the next request without a restart; a file that stops validating is
//! logged and the last good one kept. Clusters that appear later (a `cluster import`, a
//! push making this machine a server) are picked up by a rescan every few seconds.
//!
//! Config sync (DESIGN §5): on a cluster this machine manages, the endpoint also runs the
//! manager's sync loop (`sync::Syncer`) and answers members' pulls; on a cluster it
//! is a member of, the server checks the manager's file at start and on a schedule
//! (`sync::follow`), and takes pushes through `config_sync` at any time. A member that
//! joined but has no file yet is served with an empty file naming only the joined manager,
//! so the first push (the only request such a file allows) can reach it.

pub mod config_sync;
pub mod embedded;
pub mod embedded_forward;
pub mod embedded_holdings;
pub mod embedded_relay;
pub mod exec;
pub mod forward;
pub mod guard;
pub mod http;
pub mod process;
pub mod request;
pub mod restrict;
pub mod resume;
pub mod revoke;
pub mod stdinserver;
pub mod tunnel;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ClusterConfig;
use crate::config::paths::Dirs;
use crate::config::store::{ClusterDir, list_clusters};
use crate::id52::Id52;
use crate::keys;
use crate::sync::follow::{Follower, Trigger, poll_from_env};
use crate::transport::iroh::{NetConfig, Node, PeerConnection};

/// The server's control socket (in the private runtime dir): the agent's control
/// protocol, so CLI commands and the agent use the cluster keys this process holds
/// (`endpoint`: one endpoint per id52 per machine). `cluster serve` has its own.
pub const CONTROL_SOCKET: &str = "server-control.sock";
pub const CONTROL_SOCKET_MANAGED: &str = "cluster-serve-control.sock";
/// How long a starting server waits for the agent to hand over a cluster key.
const HANDOVER_WAIT: Duration = Duration::from_secs(3);

/// How often clusters are rescanned for ones this machine newly serves.
const RESCAN_EVERY: Duration = Duration::from_secs(2);
/// How long shutdown waits for running requests before closing endpoints anyway.
const DRAIN_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("reading clusters: {0}")]
    Store(#[from] crate::config::store::StoreError),
    #[error("cluster {cluster}: {source}")]
    Key {
        cluster: String,
        #[source]
        source: keys::KeyError,
    },
    #[error("cluster {cluster}: {source}")]
    Transport {
        cluster: String,
        #[source]
        source: crate::transport::iroh::TransportError,
    },
    #[error("{0}")]
    StdinServer(#[from] stdinserver::StdinServerError),
    #[error("control socket {path}: {msg}")]
    Control { path: String, msg: String },
}

/// Options of `malai ssh server`.
/// A cluster the server started serving: what `ready` reports.
#[derive(Debug, Clone)]
pub struct Serving {
    pub alias: String,
    /// This machine's id52 in that cluster.
    pub id: Id52,
    /// Where its endpoint listens.
    pub addrs: Vec<SocketAddr>,
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Fixed UDP address for the first served cluster; the n-th gets port + n.
    pub bind: Option<SocketAddr>,
    /// Serve only the clusters this machine manages (`malai ssh cluster serve`).
    pub managed_only: bool,
}

/// A served cluster: its folder, this machine's id in it, and the current file.
pub struct ClusterState {
    pub dir: ClusterDir,
    pub me: Id52,
    loaded: Mutex<Loaded>,
    /// The manager's sync loop, when this machine manages the cluster: the `config-hash`
    /// handler serves pulls from it and tells it which members are alive.
    pub sync: std::sync::OnceLock<Arc<crate::sync::manager::Syncer>>,
    /// Requests in flight per peer, for the per-peer cap ([`ClusterState::admit`]).
    active: Mutex<std::collections::HashMap<Id52, usize>>,
    /// Bumped on every reload: live requests re-ask the ACL then ([`revoke`]).
    revision: tokio::sync::watch::Sender<u64>,
    /// Whether a [`revoke`] poller is watching the file for live requests.
    polling: std::sync::atomic::AtomicBool,
    /// Open connections of this cluster, per peer ([`guard::admit`]).
    connections: guard::Counts,
    /// Resumable tunnels, attached or detached (`resume`).
    pub detached: Arc<resume::Table>,
}

/// Default cap on one peer's concurrent requests (across all its connections and
/// transports). QUIC already caps streams per connection; this stops a peer from opening
/// many connections to pin server tasks. `malai ssh server --max-requests-per-peer`.
pub const DEFAULT_MAX_REQUESTS_PER_PEER: usize = 256;
static MAX_REQUESTS_PER_PEER: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_REQUESTS_PER_PEER);

/// Set the per-peer cap for this process (the server's CLI flag).
pub fn set_max_requests_per_peer(n: usize) {
    MAX_REQUESTS_PER_PEER.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// One admitted request; frees its slot when dropped.
pub struct PeerPermit {
    state: Arc<ClusterState>,
    peer: Id52,
}

impl Drop for PeerPermit {
    fn drop(&mut self) {
        let mut a = match self.state.active.lock() {
            Ok(a) => a,
            Err(p) => p.into_inner(),
        };
        if let Some(n) = a.get_mut(&self.peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                a.remove(&self.peer);
            }
        }
    }
}

struct Loaded {
    stamp: Option<[u8; 32]>,
    config: Arc<ClusterConfig>,
}

impl ClusterState {
    pub fn new(dir: ClusterDir, me: Id52, config: ClusterConfig) -> ClusterState {
        let stamp = file_stamp(&dir);
        ClusterState {
            dir,
            me,
            loaded: Mutex::new(Loaded {
                stamp,
                config: Arc::new(config),
            }),
            sync: std::sync::OnceLock::new(),
            active: Mutex::new(std::collections::HashMap::new()),
            revision: tokio::sync::watch::Sender::new(0),
            polling: std::sync::atomic::AtomicBool::new(false),
            connections: guard::Counts::default(),
            detached: Arc::default(),
        }
    }

    /// Take a slot for one request of `peer`, or `None` when it already has the maximum in
    /// flight (then the request is refused with a clear error, not queued).
    pub fn admit(self: &Arc<Self>, peer: Id52) -> Option<PeerPermit> {
        let max = MAX_REQUESTS_PER_PEER.load(std::sync::atomic::Ordering::Relaxed);
        let mut a = match self.active.lock() {
            Ok(a) => a,
            Err(p) => p.into_inner(),
        };
        let n = a.entry(peer).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(PeerPermit {
            state: self.clone(),
            peer,
        })
    }

    /// The current cluster file, re-read if it changed on disk. An invalid new file is
    /// logged and ignored: the last good ACL stays in force (never "allow all" by accident).
    pub fn current(&self) -> Arc<ClusterConfig> {
        let stamp = file_stamp(&self.dir);
        let mut l = match self.loaded.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        if stamp != l.stamp {
            l.stamp = stamp;
            match self.dir.load() {
                Ok(cfg) => {
                    tracing::info!(cluster = %self.dir.alias, "cluster file changed; reloaded");
                    l.config = Arc::new(cfg);
                    self.revision.send_modify(|r| *r = r.wrapping_add(1));
                }
                Err(e) => {
                    tracing::error!(cluster = %self.dir.alias, error = %e, "cluster file invalid; keeping the previous one")
                }
            }
        }
        l.config.clone()
    }

    /// This machine's server name in the current file, if it is (still) a server.
    pub fn server_name(&self, cfg: &ClusterConfig) -> Option<String> {
        cfg.servers
            .values()
            .find(|s| s.id52 == self.me)
            .map(|s| s.name.clone())
    }
}

/// What decides "the file changed": a hash of its bytes, not length and mtime, which an
/// edit can keep (same-length change within the mtime's granularity, or `touch -d`), and
/// then an ACL edit would silently not apply. Cluster files are a few KiB (capped at
/// `MAX_CONFIG_LEN`): hashing one per request costs microseconds.
fn file_stamp(dir: &ClusterDir) -> Option<[u8; 32]> {
    use sha2::Digest;
    let bytes = std::fs::read(dir.file_path()).ok()?;
    Some(sha2::Sha256::digest(&bytes).into())
}

/// A cluster folder this machine should serve: it has a key and either a valid file that
/// lists this machine as a server or names it as the manager, or no file yet but a joined
/// manager (then an empty file naming that manager stands in until the first push).
fn servable(dir: &ClusterDir, managed_only: bool) -> Option<(Id52, ClusterConfig)> {
    let me = keys::id52(&dir.dir).ok()?;
    if !dir.has_file() {
        let joined = dir.manager_id().ok()??;
        if managed_only || joined == me {
            return None;
        }
        let empty =
            ClusterConfig::parse(&format!("[cluster-manager]\nid52 = \"{joined}\"\n")).ok()?;
        return Some((me, empty));
    }
    let cfg = dir.load().ok()?;
    let manages = cfg.manager == me;
    let listed = cfg.servers.values().any(|s| s.id52 == me);
    (manages || (listed && !managed_only)).then_some((me, cfg))
}

/// Run the server until `shutdown` is cancelled. `ready` is called once the clusters found
/// at start are bound (the CLI prints its "ready" line there).
pub async fn run(
    dirs: Dirs,
    opts: ServeOptions,
    shutdown: CancellationToken,
    ready: impl FnOnce(&[Serving]),
) -> Result<(), ServerError> {
    crate::audit::init(&dirs.ssh_logs());
    let tracker = TaskTracker::new();
    let mut served: BTreeMap<String, Served> = BTreeMap::new();
    let mut started = vec![];
    // The socket `malai ssh stdinserver` (sshd's forced command) hands its stdio to. It is
    // checked before anything is served: a non-private runtime dir refuses the start.
    // `cluster serve` (managed_only) runs beside a full server and leaves it to that one.
    let registry = Arc::new(stdinserver::Registry::default());
    if !opts.managed_only {
        let listener = stdinserver::listen(&dirs)?;
        tracker.spawn(stdinserver::serve(
            listener,
            registry.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
    }
    let control = control_listener(&dirs, opts.managed_only)?;
    let inbound = Arc::new(crate::keyholder::inbound::Inbound::default());
    let holder = Arc::new(crate::keyholder::serve::HolderContext {
        pool: Arc::new(crate::keyholder::pool::Pool::for_server(
            dirs.clone(),
            control.path.clone(),
            crate::keyholder::pool::idle_from_env(),
        )),
        dirs: dirs.clone(),
        socket: control.path.clone(),
        http: None,
        shutdown: shutdown.clone(),
        stoppable: false,
        inbound: Some(inbound.clone()),
        token: control.token.clone(),
    });
    let ctl = Ctl {
        inbound,
        holder: holder.clone(),
        socket: control.path.clone(),
        registry: registry.clone(),
    };
    start_new_clusters(
        &dirs,
        &opts,
        &shutdown,
        &tracker,
        &ctl,
        &mut served,
        &mut started,
    )
    .await?;
    tracker.spawn(crate::keyholder::serve::accept_loop(
        control.listener,
        holder.clone(),
        tracker.clone(),
    ));
    let reaper = holder.clone();
    let reap_token = shutdown.clone();
    tracker.spawn(async move {
        let mut t = tokio::time::interval(reaper.pool.reap_every());
        loop {
            tokio::select! {
                _ = reap_token.cancelled() => return,
                _ = t.tick() => reaper.pool.reap().await,
            }
        }
    });
    ready(&started);

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(RESCAN_EVERY) => {
                let mut newly = vec![];
                if let Err(e) = start_new_clusters(&dirs, &opts, &shutdown, &tracker, &ctl, &mut served, &mut newly).await {
                    tracing::error!(error = %e, "starting a newly found cluster failed");
                }
            }
        }
    }

    tracing::info!("shutting down: draining requests");
    tracker.close();
    if tokio::time::timeout(DRAIN_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain deadline passed; closing with requests still running");
    }
    holder.pool.close().await;
    for s in served.values() {
        s.node.close().await;
    }
    drop(control.guard);
    Ok(())
}

/// A cluster this process serves: its endpoint and the claim that makes it the machine's
/// only holder of the key.
struct Served {
    node: Node,
    _claim: crate::control::lock::Claim,
}

/// What `start_new_clusters` needs to register a cluster with the control socket.
struct Ctl {
    inbound: Arc<crate::keyholder::inbound::Inbound>,
    holder: Arc<crate::keyholder::serve::HolderContext>,
    socket: std::path::PathBuf,
    registry: Arc<stdinserver::Registry>,
}

/// Removes the control socket file when the server ends.
struct SocketGuard(std::path::PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        crate::control::token::remove(&self.0);
    }
}

struct ControlListener {
    path: std::path::PathBuf,
    listener: tokio::net::UnixListener,
    guard: SocketGuard,
    /// What callers' hellos must carry (`control::token`).
    token: String,
}

fn control_listener(dirs: &Dirs, managed_only: bool) -> Result<ControlListener, ServerError> {
    use std::os::unix::fs::PermissionsExt;
    crate::localsock::prepare_private_dir(&dirs.run).map_err(|e| ServerError::Control {
        path: dirs.run.display().to_string(),
        msg: e.to_string(),
    })?;
    let name = if managed_only {
        CONTROL_SOCKET_MANAGED
    } else {
        CONTROL_SOCKET
    };
    let path = dirs.run.join(name);
    let err = |msg: String| ServerError::Control {
        path: path.display().to_string(),
        msg,
    };
    if std::fs::symlink_metadata(&path).is_ok() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(err("another malai ssh server answers on it".into()));
        }
        let _ = std::fs::remove_file(&path);
    }
    // The token first: no caller may read a stale one once the socket answers.
    let token = crate::control::token::create(&path).map_err(|e| err(e.to_string()))?;
    let listener = tokio::net::UnixListener::bind(&path).map_err(|e| err(e.to_string()))?;
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    Ok(ControlListener {
        guard: SocketGuard(path.clone()),
        path,
        listener,
        token,
    })
}

/// Ask the agent at `socket` to hand `alias`'s key over.
async fn ask_release(socket: &std::path::Path, alias: &str) -> Result<(), String> {
    let client = crate::control::client::ControlClient::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    client.release(alias).await.map_err(|e| e.to_string())
}

/// Claim `dir`'s key for this server (one endpoint per id52 per machine). An agent that
/// holds it is asked to hand it over; a key in use by commands (or another server) is
/// left alone and tried again at the next rescan.
async fn claim_for_server(
    dir: &ClusterDir,
    socket: &std::path::Path,
) -> Option<crate::control::lock::Claim> {
    use crate::control::lock::{Claimed, Role, claim};
    let deadline = std::time::Instant::now() + HANDOVER_WAIT;
    let mut asked = false;
    loop {
        match claim(dir, Role::Server, Some(socket)) {
            Ok(Claimed::Mine(c)) => return Some(c),
            Ok(Claimed::Held(Some(h))) if h.role == crate::control::lock::Role::Agent && !asked => {
                asked = true;
                if let Some(s) = &h.socket
                    && let Err(e) = ask_release(s, &dir.alias).await
                {
                    tracing::warn!(cluster = %dir.alias, error = %e, "the agent did not hand over the key");
                }
            }
            Ok(Claimed::Held(h)) if !asked || std::time::Instant::now() >= deadline => {
                tracing::warn!(cluster = %dir.alias, "not serving yet: {}", crate::control::lock::describe(h.as_ref()));
                return None;
            }
            Ok(Claimed::Held(_)) => {}
            Err(e) => {
                tracing::error!(cluster = %dir.alias, error = %e, "cannot claim the cluster key");
                return None;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn start_new_clusters(
    dirs: &Dirs,
    opts: &ServeOptions,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
    ctl: &Ctl,
    served: &mut BTreeMap<String, Served>,
    started: &mut Vec<Serving>,
) -> Result<(), ServerError> {
    for dir in list_clusters(dirs)? {
        if served.contains_key(&dir.alias) {
            continue;
        }
        let Some((me, cfg)) = servable(&dir, opts.managed_only) else {
            continue;
        };
        let Some(claim) = claim_for_server(&dir, &ctl.socket).await else {
            continue;
        };
        let key = keys::load(&dir.dir).map_err(|source| ServerError::Key {
            cluster: dir.alias.clone(),
            source,
        })?;
        let bind = opts.bind.map(|mut a| {
            a.set_port(a.port().saturating_add(served.len() as u16));
            a
        });
        let transport = |source| ServerError::Transport {
            cluster: dir.alias.clone(),
            source,
        };
        let net =
            NetConfig::for_cluster(&cfg.relays, cfg.relay_ca.as_deref()).map_err(transport)?;
        let node = match (bind, net.bind, last_port(&dir)) {
            // No address asked for: come back on the last run's port when it is free, so
            // peers' paths (through their NATs too) stay valid and a client's restart probe
            // reaches us at once instead of after its stale path idles out.
            (None, None, Some(port)) => match Node::bind_port(&key, &net, port, true).await {
                Ok(n) => n,
                Err(e) => {
                    tracing::info!(cluster = %dir.alias, port, error = %e, "last port not free; binding a new one");
                    Node::bind(&key, &net, None, true)
                        .await
                        .map_err(transport)?
                }
            },
            _ => Node::bind(&key, &net, bind, true)
                .await
                .map_err(transport)?,
        };
        remember_port(&dir, &node);
        drop(key);
        let addrs = node.bound_sockets();
        tracing::info!(cluster = %dir.alias, %me, ?addrs, "serving cluster");
        started.push(Serving {
            alias: dir.alias.clone(),
            id: me,
            addrs,
        });
        let manages = cfg.manager == me;
        let state = Arc::new(ClusterState::new(dir.clone(), me, cfg));
        ctl.registry.add(state.clone());
        ctl.inbound.add_sessions(resume::lister(&state));
        if manages {
            let syncer = crate::sync::manager::Syncer::new(dir.clone(), node.clone(), me);
            let _ = state.sync.set(syncer.clone());
            tracker.spawn(syncer.run(shutdown.clone()));
        } else {
            tracker.spawn(follow_manager(dir.clone(), node.clone(), shutdown.clone()));
        }
        tracker.spawn(accept_loop(
            node.clone(),
            state,
            ctl.inbound.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        ctl.holder.pool.adopt(&dir.alias, me, node.clone()).await;
        served.insert(
            dir.alias.clone(),
            Served {
                node,
                _claim: claim,
            },
        );
    }
    Ok(())
}

/// Where the server's last UDP port is kept (a hint, not state anyone relies on).
const PORT_FILE: &str = "server-port";

fn last_port(dir: &ClusterDir) -> Option<u16> {
    std::fs::read_to_string(dir.dir.join(PORT_FILE))
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|p| *p != 0)
}

fn remember_port(dir: &ClusterDir, node: &Node) {
    let Some(port) = node.bound_sockets().first().map(|a| a.port()) else {
        return;
    };
    if last_port(dir) != Some(port)
        && let Err(e) = crate::config::store::write_atomic(
            &dir.dir.join(PORT_FILE),
            format!("{port}\n").as_bytes(),
            0o600,
        )
    {
        tracing::info!(cluster = %dir.alias, error = %e, "cannot remember the server's port");
    }
}

/// A member follows the manager (`sync::follow`): a check at start (it may have missed
/// pushes while it was down), then on the schedule, so a push it missed is made up for
/// without a restart. Failing is normal (manager offline, no address hint): pushes still
/// come.
async fn follow_manager(dir: ClusterDir, node: Node, shutdown: CancellationToken) {
    let follower = Follower::new(poll_from_env());
    let dialer = crate::session::dial::Dialer::Node(node);
    let mut why = Trigger::Start;
    loop {
        if follower.start(&dir.alias, why, std::time::Instant::now()) {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = follower.clone().check(dir.clone(), dialer.clone(), why) => {}
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(follower.tick()) => why = Trigger::Scheduled,
        }
    }
}

async fn accept_loop(
    node: Node,
    state: Arc<ClusterState>,
    inbound: Arc<crate::keyholder::inbound::Inbound>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = node.accept_incoming() => match c {
                Some(c) => c,
                None => return,
            },
        };
        // Past the handshake queue: dropped (refused) before any crypto work (guard.rs).
        let Some(ticket) = guard::queue() else {
            continue;
        };
        // The handshake runs in the connection's own task: never one after another here.
        let (state, shutdown, tracker2) = (state.clone(), shutdown.clone(), tracker.clone());
        let inbound = inbound.clone();
        tracker.spawn(async move {
            let Some(handshaking) = ticket.wait().await else {
                return;
            };
            let conn = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = incoming.handshake() => match c {
                    Some(c) => c,
                    None => return,
                },
            };
            drop(handshaking);
            // Strangers are closed here, before they can open a stream (guard.rs).
            let _slot = match guard::admit(&state, &conn.remote()) {
                Ok(slot) => slot,
                Err(why) => return conn.close(&why.to_string()),
            };
            let peer = conn.remote();
            let name = state
                .current()
                .name_of(&peer)
                .map(|(n, _)| n.to_string())
                .unwrap_or_else(|| peer.short());
            let _listed = inbound.add(&state.dir.alias, name, &conn);
            serve_connection(conn, state, shutdown, tracker2).await
        });
    }
}

async fn serve_connection(
    conn: PeerConnection,
    state: Arc<ClusterState>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let peer = conn.remote();
    tracing::debug!(%peer, cluster = %state.dir.alias, "connection");
    // A peer the file stops naming (`cluster remove`) loses its pooled connection too.
    let removed = revoke::removed(state.clone(), peer);
    tokio::pin!(removed);
    loop {
        let (mut send, mut recv) = tokio::select! {
            // Stop taking new streams; running ones drain (the streams keep the connection).
            _ = shutdown.cancelled() => return,
            _ = &mut removed => return conn.close("access revoked: this machine was removed from the cluster"),
            s = conn.accept() => match s {
                Some(s) => s,
                None => return,
            },
        };
        let (state, conn) = (state.clone(), conn.clone());
        tracker.spawn(async move {
            let ctx = request::Context {
                state,
                peer,
                transport: "iroh",
                conn: Some(conn),
            };
            let ok = request::handle(&ctx, &mut recv, &mut send).await;
            if ok {
                send.acknowledged().await;
            } else {
                // Abandon rather than finish, so the peer never mistakes a broken transfer
                // for a complete one.
                send.reset();
                recv.stop();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An edit that keeps the file's length and mtime still takes effect.
    #[test]
    fn reload_notices_a_same_length_same_mtime_edit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ClusterDir {
            alias: "acme".into(),
            dir: tmp.path().to_path_buf(),
        };
        let id = |n: u8| Id52::from_bytes([n; 32]);
        let text = |who: &str| {
            format!(
                "[cluster-manager]\nid52 = \"{}\"\n\n[server.foo]\nid52 = \"{}\"\nallow-from = \"{who}\"\n\n[device.alice]\nid52 = \"{}\"\n\n[device.carol]\nid52 = \"{}\"\n",
                id(1),
                id(2),
                id(3),
                id(4)
            )
        };
        let path = dir.file_path();
        std::fs::write(&path, text("alice")).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let state = ClusterState::new(dir.clone(), id(2), dir.load().unwrap());
        assert_eq!(state.current().servers["foo"].allow_from, vec![id(3)]);
        std::fs::write(&path, text("carol")).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_times(std::fs::FileTimes::new().set_modified(mtime))
            .unwrap();
        drop(f);
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        assert_eq!(state.current().servers["foo"].allow_from, vec![id(4)]);
    }
}
