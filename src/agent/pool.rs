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
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::protocol::ConnectionInfo;
use crate::client::{ClientError, Resolved, request_on};
use crate::config::Server;
use crate::config::paths::Dirs;
use crate::config::store::{ClusterDir, list_clusters};
use crate::id52::Id52;
use crate::keys;
use crate::protocol::Request;
use crate::transport::iroh::{Node, PeerConnection, RecvHalf, SendHalf};

/// How long an unused connection is kept.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(300);
/// Dialing plus TLS handshake: the CLI's bound.
const DIAL_TIMEOUT: Duration = crate::client::CONNECT_TIMEOUT;

/// The idle time from `MALAI_AGENT_IDLE_SECS`, else [`DEFAULT_IDLE`].
pub fn idle_from_env() -> Duration {
    std::env::var(super::ENV_IDLE)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_IDLE)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A cluster's endpoint and the identity it was bound with (a re-joined cluster gets a
/// new key, noticed by comparing the id file).
struct ClusterNode {
    me: Id52,
    node: Node,
}

/// The live connection of one slot.
struct Live {
    conn: PeerConnection,
    /// Closes `conn` when the server restarted (`client::liveness`).
    _watchdog: crate::client::liveness::Watchdog,
    /// Tells a lease which connection it counted on (the slot may have been re-dialed).
    generation: u64,
    active: u64,
    requests: u64,
    last_used: Instant,
}

/// One (cluster, server): dialing is serialized so two first requests share one dial.
struct Slot {
    cluster: String,
    server: String,
    peer: Id52,
    dial: tokio::sync::Mutex<()>,
    live: Mutex<Option<Live>>,
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
    nodes: tokio::sync::Mutex<BTreeMap<String, ClusterNode>>,
    /// Aliases with a bound endpoint, readable without awaiting (for `status`).
    loaded: Mutex<Vec<String>>,
    slots: Mutex<BTreeMap<(String, Id52), Arc<Slot>>>,
    counters: Counters,
}

impl Pool {
    pub fn new(dirs: Dirs, idle: Duration) -> Pool {
        Pool {
            dirs,
            idle,
            nodes: tokio::sync::Mutex::new(BTreeMap::new()),
            loaded: Mutex::new(vec![]),
            slots: Mutex::new(BTreeMap::new()),
            counters: Counters::default(),
        }
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
        for dir in dirs {
            if let Err(e) = self.node_for(&dir).await {
                tracing::debug!(cluster = %dir.alias, error = %e, "cluster not usable yet");
            }
        }
    }

    /// The endpoint for `dir`'s cluster, binding it (reading the key) on first use.
    async fn node_for(&self, dir: &ClusterDir) -> Result<Node, ClientError> {
        let me = keys::id52(&dir.dir)?;
        let mut nodes = self.nodes.lock().await;
        if let Some(n) = nodes.get(&dir.alias)
            && n.me == me
        {
            return Ok(n.node.clone());
        }
        let key = keys::load(&dir.dir)?;
        let net = crate::endpoint::net_config_of(dir)?;
        let node = Node::bind(&key, &net, None, false).await?;
        drop(key);
        tracing::info!(cluster = %dir.alias, %me, "agent holds the key of cluster");
        if let Some(old) = nodes.insert(
            dir.alias.clone(),
            ClusterNode {
                me,
                node: node.clone(),
            },
        ) {
            old.node.close().await;
        }
        *lock(&self.loaded) = nodes.keys().cloned().collect();
        Ok(node)
    }

    /// A stream to `server` carrying `request`, accepted by the server.
    pub async fn open(
        &self,
        resolved: &Resolved,
        server: &Server,
        request: Request,
    ) -> Result<PooledStream, ClientError> {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let node = self.node_for(&resolved.dir).await?;
        let slot = self.slot(&resolved.dir.alias, server);
        let manager = resolved.config.manager;
        let mut retried = false;
        loop {
            let (conn, generation, reused) = self.connection(&slot, &node, server, manager).await?;
            match request_on(&conn, manager, request.clone()).await {
                Ok((send, recv)) => {
                    if let Some(l) = lock(&slot.live).as_mut()
                        && l.generation == generation
                    {
                        l.active += 1;
                        l.requests += 1;
                        l.last_used = Instant::now();
                    }
                    return Ok(PooledStream {
                        send,
                        recv,
                        lease: Lease {
                            slot: slot.clone(),
                            generation,
                        },
                    });
                }
                // The reused connection died under us (server restarted, network
                // changed) before the server answered: forget it and dial once more.
                Err(e) if reused && !retried && conn.is_closed() => {
                    tracing::info!(server = %slot.server, error = %e, "pooled connection was dead; redialing");
                    forget(&slot, generation);
                    retried = true;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn slot(&self, cluster: &str, server: &Server) -> Arc<Slot> {
        lock(&self.slots)
            .entry((cluster.to_string(), server.id52))
            .or_insert_with(|| {
                Arc::new(Slot {
                    cluster: cluster.to_string(),
                    server: server.name.clone(),
                    peer: server.id52,
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
        server: &Server,
        manager: Id52,
    ) -> Result<(PeerConnection, u64, bool), ClientError> {
        let _dialing = slot.dial.lock().await;
        if let Some(l) = lock(&slot.live).as_ref()
            && !l.conn.is_closed()
        {
            return Ok((l.conn.clone(), l.generation, true));
        }
        let conn = tokio::time::timeout(DIAL_TIMEOUT, node.connect(&server.id52, &server.addrs))
            .await
            .map_err(|_| ClientError::Timeout("connecting"))??;
        let generation = self.counters.generations.fetch_add(1, Ordering::Relaxed);
        self.counters.dials.fetch_add(1, Ordering::Relaxed);
        tracing::info!(cluster = %slot.cluster, server = %slot.server, "dialed");
        let watchdog = crate::client::liveness::watch(
            node.clone(),
            conn.clone(),
            server.id52,
            server.addrs.clone(),
            manager,
        );
        let old = lock(&slot.live).replace(Live {
            conn: conn.clone(),
            _watchdog: watchdog,
            generation,
            active: 0,
            requests: 0,
            last_used: Instant::now(),
        });
        if let Some(old) = old {
            old.conn.close("replaced");
        }
        Ok((conn, generation, false))
    }

    /// Close connections idle for longer than the idle time, and forget closed ones.
    pub fn reap(&self) {
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
        lock(&self.loaded).clone()
    }

    pub fn connections(&self) -> Vec<ConnectionInfo> {
        let slots: Vec<Arc<Slot>> = lock(&self.slots).values().cloned().collect();
        slots
            .iter()
            .filter_map(|s| {
                let live = lock(&s.live);
                let l = live.as_ref().filter(|l| !l.conn.is_closed())?;
                Some(ConnectionInfo {
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
                })
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

/// Marks its connection busy while alive; idle time counts from its drop.
struct Lease {
    slot: Arc<Slot>,
    generation: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(l) = lock(&self.slot.live).as_mut()
            && l.generation == self.generation
        {
            l.active = l.active.saturating_sub(1);
            l.last_used = Instant::now();
        }
    }
}

/// An accepted request on a pooled connection. Dropping it finishes the stream (QUIC
/// FIN/stop) but leaves the connection open for the next request.
pub struct PooledStream {
    pub send: SendHalf,
    pub recv: RecvHalf,
    lease: Lease,
}

impl PooledStream {
    /// Abandon the stream (the peer sees a reset, never a clean end).
    pub fn abort(&mut self) {
        self.send.reset();
        self.recv.stop();
    }

    /// The server this stream goes to (for logs).
    pub fn server(&self) -> &str {
        &self.lease.slot.server
    }
}

impl AsyncRead for PooledStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for PooledStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().send).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().send).poll_shutdown(cx)
    }
}
