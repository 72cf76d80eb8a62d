//! The agent's iroh endpoints and connections, reused across requests.
//!
//! One endpoint per cluster (its key *is* this machine's identity in that cluster), bound
//! when the cluster is first seen — at start, by a rescan, or by the first request naming
//! it — so a cluster joined after the agent started just works. Keys are read then and
//! kept in memory by the endpoint: once loaded, the key file may even become unreadable.
//!
//! One connection per (cluster, server), dialed on first use and shared by every request
//! after it; each request is its own bi-stream. A connection found closed is replaced on
//! the next request; a request whose reused connection turns out dead before the server
//! answered is retried once on a fresh one ("replaced transparently"). Connections nobody
//! used for [`DEFAULT_IDLE`] (or `MALAI_AGENT_IDLE_SECS`) are closed by [`Pool::reap`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

pub use super::stream::PooledStream;
use crate::config::Server;
use crate::config::paths::Dirs;
use crate::config::store::{ClusterDir, list_clusters};
use crate::control::client::ControlClient;
use crate::control::lock::{Claim, Claimed, Role};
use crate::control::protocol::ConnectionInfo;
use crate::id52::Id52;
use crate::keys;
use crate::protocol::Request;
use crate::protocol::resume::{Grant, Resume};
use crate::session::dial::Dialer;
use crate::session::open::{Accepted, request_on_for};
use crate::session::resume::{Attempt, Turn, resume_on};
use crate::session::{Resolved, SessionError};
use crate::transport::iroh::{Node, PeerConnection};

/// How long a cluster handed to the server is not claimed again (the server claims it
/// within this, or it was not the server that asked).
const RELEASE_GRACE: Duration = Duration::from_secs(10);
/// How long (in 100 ms steps) a starting agent waits for the previous agent on the same
/// socket path to let go of a key.
const PREVIOUS_AGENT_TRIES: u32 = 50;

fn endpoint_err(e: crate::control::lock::LockError) -> SessionError {
    SessionError::Local(e.to_string())
}

/// How long an unused connection is kept.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);

/// Seconds an unused pooled connection is kept (default [`DEFAULT_IDLE`]).
pub const ENV_IDLE: &str = "MALAI_AGENT_IDLE_SECS";

/// The idle time from `MALAI_AGENT_IDLE_SECS`, else [`DEFAULT_IDLE`].
pub fn idle_from_env() -> Duration {
    std::env::var(ENV_IDLE)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_IDLE)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cluster's endpoint and the identity it was bound with (a re-joined cluster gets a
/// new key, noticed by comparing the id file), with the claim that makes this process the
/// machine's only holder of that key (`endpoint`).
struct ClusterNode {
    me: Id52,
    node: Node,
    _claim: Option<Claim>,
}

/// The live connection of one slot.
pub(super) struct Live {
    pub(super) conn: PeerConnection,
    /// Closes `conn` when the server restarted (`client::liveness`).
    pub(super) _watchdog: crate::session::liveness::Watchdog,
    /// Tells a lease which connection it counted on (the slot may have been re-dialed).
    pub(super) generation: u64,
    pub(super) active: u64,
    requests: u64,
    pub(super) last_used: Instant,
}

impl Live {
    /// Good for new requests and resumes: open, and not back from an outage (it may stand
    /// still for a long time then: `session::liveness` step 4; a fresh one is dialed).
    fn usable(&self) -> bool {
        !self.conn.is_closed() && !self._watchdog.saw_outage()
    }
}

/// One (cluster, server): dialing is serialized so two first requests share one dial.
pub(super) struct Slot {
    cluster: String,
    pub(super) server: String,
    peer: Id52,
    dial: tokio::sync::Mutex<()>,
    pub(super) live: Mutex<Option<Live>>,
}

#[derive(Default)]
struct Counters {
    dials: AtomicU64,
    requests: AtomicU64,
    generations: AtomicU64,
}

pub struct Pool {
    dirs: Dirs,
    idle: Duration,
    /// The control socket recorded in our claims (where others reach us).
    socket: PathBuf,
    /// The server's pool only uses the endpoints the server bound ([`Pool::adopt`]).
    adopt_only: bool,
    /// Clusters handed to the server ([`Pool::release`]) and when: not claimed again
    /// right away, so the server can take them.
    released: Mutex<BTreeMap<String, Instant>>,
    nodes: tokio::sync::Mutex<BTreeMap<String, ClusterNode>>,
    /// Aliases with a bound endpoint, readable without awaiting (for `status`).
    loaded: Mutex<Vec<(String, Node)>>,
    slots: Mutex<BTreeMap<(String, Id52), Arc<Slot>>>,
    /// Endpoints of clusters handed to the server that still carry requests.
    draining: Mutex<Vec<(String, Node)>>,
    /// Why each cluster found at the last rescan is not served here (for `status`).
    not_served: Mutex<BTreeMap<String, String>>,
    counters: Counters,
    /// Aliases of clusters this pool just dialed someone in (a fresh connection): the
    /// holder's config-sync schedule checks the manager then (`sync::follow`). Bounded; a
    /// nudge lost to a full queue only waits for the schedule.
    dialed: tokio::sync::mpsc::Sender<String>,
    dialed_rx: Mutex<Option<tokio::sync::mpsc::Receiver<String>>>,
}

/// A cluster endpoint this pool holds (for the config-sync schedule).
#[derive(Clone)]
pub struct HeldCluster {
    pub dir: ClusterDir,
    pub node: Node,
}

/// How many dial nudges may wait for the schedule.
const DIAL_QUEUE: usize = 64;

impl Pool {
    /// The agent's pool: binds (claims) the clusters no server on this machine holds.
    pub fn new(dirs: Dirs, socket: PathBuf, idle: Duration) -> Pool {
        Pool::with(dirs, socket, idle, false)
    }

    /// The server's pool: only the endpoints the server bound and [`Pool::adopt`]ed.
    pub fn for_server(dirs: Dirs, socket: PathBuf, idle: Duration) -> Pool {
        Pool::with(dirs, socket, idle, true)
    }

    fn with(dirs: Dirs, socket: PathBuf, idle: Duration, adopt_only: bool) -> Pool {
        let (dialed, dialed_rx) = tokio::sync::mpsc::channel(DIAL_QUEUE);
        Pool {
            dirs,
            idle,
            socket,
            adopt_only,
            released: Mutex::new(BTreeMap::new()),
            nodes: tokio::sync::Mutex::new(BTreeMap::new()),
            loaded: Mutex::new(vec![]),
            slots: Mutex::new(BTreeMap::new()),
            draining: Mutex::new(vec![]),
            not_served: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
            dialed,
            dialed_rx: Mutex::new(Some(dialed_rx)),
        }
    }

    /// The aliases of clusters this pool dials into, as it dials (once: the caller that
    /// runs the config-sync schedule takes it).
    pub fn take_dial_events(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        lock(&self.dialed_rx).take()
    }

    /// The cluster endpoints this pool holds now.
    pub async fn held(&self) -> Vec<HeldCluster> {
        let nodes = self.nodes.lock().await;
        nodes
            .iter()
            .filter_map(|(alias, n)| {
                Some(HeldCluster {
                    dir: ClusterDir::new(&self.dirs, alias).ok()?,
                    node: n.node.clone(),
                })
            })
            .collect()
    }

    /// Bind endpoints for clusters not seen yet (or whose key changed). One broken cluster
    /// is logged and skipped; the others still work.
    pub async fn rescan(&self) {
        let dirs = match list_clusters(&self.dirs) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "listing clusters failed");
                return;
            }
        };
        let mut why_not = BTreeMap::new();
        for dir in dirs {
            match self.access(&dir).await {
                Ok(Dialer::Node(_)) => {
                    if crate::control::lock::commands_running(&dir) {
                        tracing::debug!(cluster = %dir.alias, "older commands still bind this key themselves");
                    }
                }
                Ok(Dialer::Holder { .. }) => {
                    let h = crate::control::lock::holder(&dir).ok().flatten();
                    why_not.insert(
                        dir.alias.clone(),
                        crate::control::lock::describe(h.as_ref()),
                    );
                }
                Err(e) => {
                    tracing::debug!(cluster = %dir.alias, error = %e, "cluster not usable yet");
                    why_not.insert(dir.alias.clone(), one_line(&e.to_string()));
                }
            }
        }
        *lock(&self.not_served) = why_not;
    }

    /// The clusters found on disk that this process does not serve, and why.
    pub fn not_served(&self) -> BTreeMap<String, String> {
        lock(&self.not_served).clone()
    }

    /// Use `node` (bound by the server for `alias`) for requests of that cluster.
    pub async fn adopt(&self, alias: &str, me: Id52, node: Node) {
        let mut nodes = self.nodes.lock().await;
        nodes.insert(
            alias.to_string(),
            ClusterNode {
                me,
                node,
                _claim: None,
            },
        );
        *lock(&self.loaded) = nodes
            .iter()
            .map(|(k, n)| (k.clone(), n.node.clone()))
            .collect();
    }

    /// Make `conn` (dialed by the caller on the node it [`Pool::adopt`]ed for `alias`) the
    /// live connection to `peer`, so requests through the pool share it instead of dialing
    /// another (a command's own pool: `client::forward_resume`).
    pub async fn seed(
        &self,
        alias: &str,
        peer: Id52,
        name: &str,
        hints: &[std::net::SocketAddr],
        manager: Id52,
        conn: PeerConnection,
    ) {
        let Some(node) = self.nodes.lock().await.get(alias).map(|n| n.node.clone()) else {
            return;
        };
        let slot = self.slot(alias, peer, name);
        self.install(&slot, &node, conn, peer, hints, manager);
    }

    /// Give up `alias`'s key (the server wants it): drop the claim at once, so the server
    /// can take it, and send every new request through the server. Idle connections close
    /// now; a connection still carrying a request keeps it to its end (the rule for every
    /// start-up order: what already runs keeps what it has, README "Who holds a key"), and
    /// the endpoint closes once its last such request ended ([`Pool::reap`]).
    pub async fn release(&self, alias: &str) {
        lock(&self.released).insert(alias.to_string(), Instant::now());
        let old = {
            let mut nodes = self.nodes.lock().await;
            let old = nodes.remove(alias);
            *lock(&self.loaded) = nodes
                .iter()
                .map(|(k, n)| (k.clone(), n.node.clone()))
                .collect();
            old
        };
        let busy = self.close_idle_of(alias, "key handed to the server");
        if let Some(ClusterNode { node, _claim, .. }) = old {
            drop(_claim);
            if busy {
                tracing::info!(cluster = %alias, "released the cluster key to the server; requests in flight finish first");
                node.leave_relays().await;
                lock(&self.draining).push((alias.to_string(), node));
            } else {
                node.close_within(Duration::from_secs(1)).await;
            }
        }
        tracing::info!(cluster = %alias, "released the cluster key to the server");
    }

    /// Close `alias`'s connections that carry no request; whether any still does.
    fn close_idle_of(&self, alias: &str, why: &'static str) -> bool {
        let slots: Vec<Arc<Slot>> = lock(&self.slots)
            .iter()
            .filter(|((c, _), _)| c == alias)
            .map(|(_, s)| s.clone())
            .collect();
        let mut busy = false;
        for s in slots {
            let mut live = lock(&s.live);
            match live.as_ref() {
                Some(l) if l.active > 0 && !l.conn.is_closed() => busy = true,
                Some(_) => {
                    if let Some(l) = live.take() {
                        l.conn.close(why);
                    }
                }
                None => {}
            }
        }
        busy
    }

    /// Endpoints of released clusters whose last request has ended: close them.
    async fn finish_draining(&self) {
        let aliases: Vec<String> = lock(&self.draining)
            .iter()
            .map(|(a, _)| a.clone())
            .collect();
        for alias in aliases {
            if self.close_idle_of(&alias, "key handed to the server") {
                continue;
            }
            let done: Vec<Node> = {
                let mut d = lock(&self.draining);
                let (gone, keep): (Vec<_>, Vec<_>) = d.drain(..).partition(|(a, _)| *a == alias);
                *d = keep;
                gone.into_iter().map(|(_, n)| n).collect()
            };
            for node in done {
                node.close_within(Duration::from_secs(1)).await;
            }
        }
    }

    /// How to reach `dir`'s cluster: our endpoint (bound and claimed on first use), or the
    /// server that holds the key.
    async fn access(&self, dir: &ClusterDir) -> Result<Dialer, SessionError> {
        let me = keys::id52(&dir.dir)?;
        let mut nodes = self.nodes.lock().await;
        if let Some(n) = nodes.get(&dir.alias)
            && n.me == me
        {
            return Ok(Dialer::Node(n.node.clone()));
        }
        let held_elsewhere = |h: Option<crate::control::lock::Holder>| match h {
            // Our own socket under another pid: the previous agent on this path is still
            // shutting down (its lock outlives its socket for a moment). Going "through" it
            // would be talking to ourselves; the claim below is retried instead.
            Some(h)
                if h.pid != std::process::id()
                    && h.socket.as_deref() == Some(self.socket.as_path()) =>
            {
                Err(SessionError::Local(format!(
                    "cluster {}: the previous agent (pid {}) is still shutting down",
                    dir.alias, h.pid
                )))
            }
            Some(h) if h.pid != std::process::id() && h.socket.is_some() => Ok(Dialer::Holder {
                socket: h.socket.unwrap_or_default(),
                alias: dir.alias.clone(),
            }),
            h => Err(SessionError::Refused(format!(
                "cluster {}: {}",
                dir.alias,
                crate::control::lock::describe(h.as_ref())
            ))),
        };
        let recently_released = lock(&self.released)
            .get(&dir.alias)
            .is_some_and(|t| t.elapsed() < RELEASE_GRACE);
        if self.adopt_only || recently_released {
            return held_elsewhere(crate::control::lock::holder(dir).map_err(endpoint_err)?);
        }
        // A key that changed (re-joined cluster): let go of the old one first.
        if let Some(old) = nodes.remove(&dir.alias) {
            old.node.close().await;
        }
        let mut tries = 0;
        let claim = loop {
            match crate::control::lock::claim(dir, Role::Agent, Some(&self.socket))
                .map_err(endpoint_err)?
            {
                Claimed::Mine(c) => break c,
                Claimed::Held(h) => match held_elsewhere(h) {
                    // The previous agent on our socket path is exiting: wait for its lock.
                    Err(SessionError::Local(_)) if tries < PREVIOUS_AGENT_TRIES => {
                        tries += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    other => return other,
                },
            }
        };
        let cfg = dir.has_file().then(|| dir.load().ok()).flatten();
        let node = crate::session::own::bind_key(dir, cfg.as_ref()).await?;
        tracing::info!(cluster = %dir.alias, %me, "agent holds the key of cluster");
        nodes.insert(
            dir.alias.clone(),
            ClusterNode {
                me,
                node: node.clone(),
                _claim: Some(claim),
            },
        );
        *lock(&self.loaded) = nodes
            .iter()
            .map(|(k, n)| (k.clone(), n.node.clone()))
            .collect();
        Ok(Dialer::Node(node))
    }

    /// The control socket of the process that holds `dir`'s key when that is not us (an
    /// agent's view while this machine's server holds it), else `None` (we bind it,
    /// claiming it first if nobody holds it).
    pub async fn held_by(&self, dir: &ClusterDir) -> Result<Option<PathBuf>, SessionError> {
        match self.access(dir).await? {
            Dialer::Node(_) => Ok(None),
            Dialer::Holder { socket, .. } => Ok(Some(socket)),
        }
    }

    /// A stream to `server` carrying `request`, accepted by the server.
    pub async fn open(
        &self,
        resolved: &Resolved,
        server: &Server,
        request: Request,
    ) -> Result<PooledStream, SessionError> {
        plain(self.open_accepted(resolved, server, request).await?)
    }

    /// [`Pool::open`] for a request that may be accepted as resumable (`session::resume`):
    /// the stream and how the server accepted it. Through another key holder (the server
    /// holds the key) it goes as a plain request: that holder hands back no grant.
    pub async fn open_accepted(
        &self,
        resolved: &Resolved,
        server: &Server,
        request: Request,
    ) -> Result<(PooledStream, Accepted), SessionError> {
        self.open_to(
            &resolved.dir,
            resolved.config.manager,
            server.id52,
            &server.name,
            &server.addrs,
            request,
        )
        .await
    }

    /// A stream to `peer` of `alias`'s cluster carrying `request` (the control socket's
    /// `stream`: another process's request on the key we hold).
    pub async fn open_raw(
        &self,
        alias: &str,
        peer: Id52,
        hints: &[std::net::SocketAddr],
        request: Request,
    ) -> Result<PooledStream, SessionError> {
        let (stream, accepted, _) = self.open_raw_accepted(alias, peer, hints, request).await?;
        plain((stream, accepted))
    }

    /// [`Pool::open_raw`] for a request that may ask for resume: the server's answer, and
    /// where a redial of that session goes.
    pub async fn open_raw_accepted(
        &self,
        alias: &str,
        peer: Id52,
        hints: &[std::net::SocketAddr],
        request: Request,
    ) -> Result<(PooledStream, Accepted, super::resume::Target), SessionError> {
        let dir = ClusterDir::new(&self.dirs, alias)?;
        let cfg = dir.load().ok();
        let manager = match &cfg {
            Some(cfg) => cfg.manager,
            None => dir
                .manager_id()?
                .ok_or_else(|| SessionError::Local(format!("cluster {alias} is not joined")))?,
        };
        let name = cfg
            .as_ref()
            .and_then(|c| c.name_of(&peer).map(|(n, _)| n.to_string()))
            .unwrap_or_else(|| peer.short());
        let (stream, accepted) = self
            .open_to(&dir, manager, peer, &name, hints, request)
            .await?;
        let target = super::resume::Target {
            dir,
            peer,
            server: name,
            hints: hints.to_vec(),
        };
        Ok((stream, accepted, target))
    }

    async fn open_to(
        &self,
        dir: &ClusterDir,
        manager: Id52,
        peer: Id52,
        name: &str,
        hints: &[std::net::SocketAddr],
        request: Request,
    ) -> Result<(PooledStream, Accepted), SessionError> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let node = match self.access(dir).await? {
            Dialer::Node(n) => n,
            Dialer::Holder { socket, alias } => {
                let request = without_resume(request)?;
                return via_holder(&socket, &alias, peer, hints, request, name)
                    .await
                    .map(|s| (s, Accepted::Plain));
            }
        };
        let slot = self.slot(&dir.alias, peer, name);
        let mut retried = false;
        loop {
            let (conn, generation, reused) =
                self.connection(&slot, &node, peer, hints, manager).await?;
            match request_on_for(&conn, manager, request.clone()).await {
                Ok((send, recv, accepted)) => {
                    let stream = self.leased(&slot, generation, &conn, send, recv);
                    return Ok((stream, accepted));
                }
                // The reused connection died under us (server restarted, network
                // changed) before the server answered: forget it and dial once more.
                Err(e) if reused && !retried && conn.is_closed() => {
                    tracing::info!(server = %slot.server, error = %e, "pooled connection was dead; redialing");
                    forget(&slot, generation);
                    retried = true;
                }
                // The key was handed to the server while this request was opening (its
                // connection closed before the server answered): the new holder serves it.
                Err(e) if self.released_since(&dir.alias, started) => {
                    tracing::info!(server = %slot.server, error = %e, "key handed over while opening; going through the new holder");
                    let Some(socket) = crate::control::lock::holder(dir)
                        .ok()
                        .flatten()
                        .and_then(|h| h.socket)
                    else {
                        return Err(e);
                    };
                    let request = without_resume(request)?;
                    return via_holder(&socket, &dir.alias, peer, hints, request, name)
                        .await
                        .map(|s| (s, Accepted::Plain));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Count a new request on the slot's connection `generation` and wrap its stream.
    fn leased(
        &self,
        slot: &Arc<Slot>,
        generation: u64,
        conn: &PeerConnection,
        send: crate::transport::iroh::SendHalf,
        recv: crate::transport::iroh::RecvHalf,
    ) -> PooledStream {
        if let Some(l) = lock(&slot.live).as_mut()
            && l.generation == generation
        {
            l.active += 1;
            l.requests += 1;
            l.last_used = Instant::now();
        }
        PooledStream::pooled(send, recv, slot.clone(), generation, conn.clone())
    }

    /// One attempt to resume a resumable session (`session::resume`) of `alias`'s cluster
    /// with `peer`: on the slot's live connection, else on a fresh one dialed at once. Not
    /// behind the slot's dial lock: redial attempts overlap, and one stuck on a dead path
    /// must not hold up the next (the pool's own requests dial behind it as before).
    pub async fn resume(
        &self,
        alias: &str,
        peer: Id52,
        hints: &[std::net::SocketAddr],
        resume: Resume,
        turn: Turn,
    ) -> Result<(PooledStream, Grant), Attempt> {
        let retry = |e: SessionError| Attempt::Retry(e.to_string());
        let dir = ClusterDir::new(&self.dirs, alias).map_err(|e| retry(e.into()))?;
        let cfg = dir.load().map_err(|e| retry(e.into()))?;
        let manager = cfg.manager;
        let name = cfg
            .name_of(&peer)
            .map(|(n, _)| n.to_string())
            .unwrap_or_else(|| peer.short());
        let node = match self.access(&dir).await.map_err(retry)? {
            Dialer::Node(n) => n,
            Dialer::Holder { .. } => {
                return Err(Attempt::Refused {
                    reason: "the cluster's key was handed to the server on this machine".into(),
                    boot: None,
                });
            }
        };
        let slot = self.slot(alias, peer, &name);
        let live = lock(&slot.live)
            .as_ref()
            .filter(|l| l.usable())
            .map(|l| (l.conn.clone(), l.generation));
        let (conn, generation) = match live {
            Some(l) => l,
            None => {
                let target = crate::session::connect::DialTarget {
                    peer,
                    name: &name,
                    hints,
                };
                let conn =
                    crate::session::connect::dial_in_cluster(&node, &self.dirs, alias, target)
                        .await
                        .map_err(retry)?;
                self.install(&slot, &node, conn, peer, hints, manager)
            }
        };
        let (send, recv, grant) = resume_on(&conn, manager, resume, turn).await?;
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        Ok((self.leased(&slot, generation, &conn, send, recv), grant))
    }

    /// Whether `alias`'s key was handed to the server after `since`.
    fn released_since(&self, alias: &str, since: Instant) -> bool {
        lock(&self.released).get(alias).is_some_and(|t| *t >= since)
    }

    fn slot(&self, cluster: &str, peer: Id52, name: &str) -> Arc<Slot> {
        lock(&self.slots)
            .entry((cluster.to_string(), peer))
            .or_insert_with(|| {
                Arc::new(Slot {
                    cluster: cluster.to_string(),
                    server: name.to_string(),
                    peer,
                    dial: tokio::sync::Mutex::new(()),
                    live: Mutex::new(None),
                })
            })
            .clone()
    }

    /// The slot's live connection, or a new one. Returns it, its generation, and whether
    /// it was reused.
    async fn connection(
        &self,
        slot: &Slot,
        node: &Node,
        peer: Id52,
        hints: &[std::net::SocketAddr],
        manager: Id52,
    ) -> Result<(PeerConnection, u64, bool), SessionError> {
        let _dialing = slot.dial.lock().await;
        if let Some(l) = lock(&slot.live).as_ref()
            && l.usable()
        {
            return Ok((l.conn.clone(), l.generation, true));
        }
        // The dial names the cluster's relays when they are why it fails (session::connect).
        let target = crate::session::connect::DialTarget {
            peer,
            name: &slot.server,
            hints,
        };
        let conn =
            crate::session::connect::dial_in_cluster(node, &self.dirs, &slot.cluster, target)
                .await?;
        let (conn, generation) = self.install(slot, node, conn, peer, hints, manager);
        Ok((conn, generation, false))
    }

    /// Make a freshly dialed `conn` the slot's live connection, unless a live one got
    /// there first (a resume dials outside the slot's lock): then that one is used and
    /// ours closed. Returns the connection to use and its generation.
    fn install(
        &self,
        slot: &Slot,
        node: &Node,
        conn: PeerConnection,
        peer: Id52,
        hints: &[std::net::SocketAddr],
        manager: Id52,
    ) -> (PeerConnection, u64) {
        let mut live = lock(&slot.live);
        if let Some(l) = live.as_ref()
            && l.usable()
        {
            conn.close("another connection is live");
            return (l.conn.clone(), l.generation);
        }
        let generation = self.counters.generations.fetch_add(1, Ordering::Relaxed);
        self.counters.dials.fetch_add(1, Ordering::Relaxed);
        tracing::info!(cluster = %slot.cluster, server = %slot.server, "dialed");
        let _ = self.dialed.try_send(slot.cluster.clone());
        let watchdog = crate::session::liveness::watch(
            node.clone(),
            conn.clone(),
            peer,
            hints.to_vec(),
            manager,
        );
        let old = live.replace(Live {
            conn: conn.clone(),
            _watchdog: watchdog,
            generation,
            active: 0,
            requests: 0,
            last_used: Instant::now(),
        });
        drop(live);
        if let Some(old) = old {
            if old.conn.is_closed() || !old._watchdog.saw_outage() {
                old.conn.close("replaced");
            } else {
                // Back from an outage: its resumable sessions move here, and what cannot
                // move (a plain stream) keeps it until it ends; closed with its last one.
                tracing::info!(cluster = %slot.cluster, server = %slot.server, "replaced a connection back from an outage");
            }
        }
        (conn, generation)
    }

    /// Close connections idle for longer than the idle time, forget closed ones, and close
    /// the endpoints of released clusters once their last request ended.
    pub async fn reap(&self) {
        self.finish_draining().await;
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        for slot in slots {
            let mut live = lock(&slot.live);
            let drop_it = match live.as_ref() {
                None => false,
                Some(l) if l.conn.is_closed() => true,
                Some(l) => l.active == 0 && l.last_used.elapsed() >= self.idle,
            };
            if drop_it && let Some(l) = live.take() {
                tracing::info!(cluster = %slot.cluster, server = %slot.server, "closing idle connection");
                l.conn.close("idle");
            }
        }
    }

    /// How often [`Pool::reap`] should run: often enough to honour the idle time.
    pub fn reap_every(&self) -> Duration {
        (self.idle / 4).clamp(Duration::from_millis(200), Duration::from_secs(30))
    }

    pub fn dials(&self) -> u64 {
        self.counters.dials.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> u64 {
        self.counters.requests.load(Ordering::Relaxed)
    }

    pub fn clusters(&self) -> Vec<String> {
        lock(&self.loaded).iter().map(|(k, _)| k.clone()).collect()
    }

    /// Every loaded cluster's relays as its endpoint sees them (`malai ssh status`).
    pub fn relays(&self) -> Vec<crate::control::protocol::RelayInfo> {
        let now = std::time::SystemTime::now();
        lock(&self.loaded)
            .iter()
            .flat_map(|(cluster, node)| {
                node.relay_states()
                    .into_iter()
                    .map(|r| crate::control::protocol::RelayInfo {
                        cluster: cluster.clone(),
                        url: r.url,
                        home: r.home,
                        connected: r.connected,
                        set_aside_secs: r
                            .set_aside
                            .map(|t| now.duration_since(t).unwrap_or_default().as_secs()),
                        error: r.error,
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        slots
            .iter()
            .filter_map(|s| {
                let live = lock(&s.live);
                let l = live.as_ref().filter(|l| !l.conn.is_closed())?;
                Some(
                    ConnectionInfo {
                        cluster: s.cluster.clone(),
                        server: s.server.clone(),
                        peer: s.peer.to_string(),
                        active: l.active,
                        requests: l.requests,
                        idle_secs: if l.active > 0 {
                            0
                        } else {
                            l.last_used.elapsed().as_secs()
                        },
                        direction: "out".into(),
                        ..Default::default()
                    }
                    .with_path(&l.conn),
                )
            })
            .collect()
    }

    /// Close every connection and endpoint (agent shutdown).
    pub async fn close(&self) {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        for s in slots {
            if let Some(l) = lock(&s.live).take() {
                l.conn.close("agent stopping");
            }
        }
        let nodes = std::mem::take(&mut *self.nodes.lock().await);
        for (_, n) in nodes {
            n.node.close().await;
        }
        let draining = std::mem::take(&mut *lock(&self.draining));
        for (_, node) in draining {
            node.close().await;
        }
    }
}

/// A stream to `peer` through the process that holds `alias`'s key (its control socket).
async fn via_holder(
    socket: &std::path::Path,
    alias: &str,
    peer: Id52,
    hints: &[std::net::SocketAddr],
    request: Request,
    name: &str,
) -> Result<PooledStream, SessionError> {
    let s = ControlClient::connect(socket)
        .await?
        .stream(alias, peer, hints, request)
        .await
        .map_err(SessionError::from_holder)?;
    Ok(PooledStream::via(s, name))
}

/// A stream of a request that cannot have been accepted as resumable (it did not ask).
fn plain((stream, accepted): (PooledStream, Accepted)) -> Result<PooledStream, SessionError> {
    match accepted {
        Accepted::Plain => Ok(stream),
        Accepted::Resumable(_) => Err(SessionError::Protocol(
            crate::protocol::FrameError::Malformed(
                "accept-resumable to a request that did not ask for resume".into(),
            ),
        )),
    }
}

/// `request` as it goes through another key holder, whose `stream` hands back no grant:
/// asking for resume there would get frames we could not resume.
fn without_resume(request: Request) -> Result<Request, SessionError> {
    match request {
        Request::Tunnel { port, .. } => Ok(Request::Tunnel {
            port,
            resume: false,
        }),
        Request::Exec(mut e) => {
            e.resume = false;
            Ok(Request::Exec(e))
        }
        Request::Forward { to, .. } => Ok(Request::Forward { to, resume: false }),
        Request::Resume(_) => Err(SessionError::Refused(
            "a session cannot be resumed through another key holder".into(),
        )),
        other => Ok(other),
    }
}

fn forget(slot: &Slot, generation: u64) {
    let mut live = lock(&slot.live);
    if live.as_ref().is_some_and(|l| l.generation == generation)
        && let Some(l) = live.take()
    {
        l.conn.close("broken");
    }
}
