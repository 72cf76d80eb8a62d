//! Noticing that a server restarted, without a short idle timeout.
//!
//! Sessions must ride out network outages (Wi-Fi roaming, a router reboot, a laptop lid),
//! so a connection's idle limit is long (`transport::iroh::DEFAULT_IDLE_TIMEOUT`). But a
//! server that was killed and started again has forgotten our connection: without help the
//! client would wait out the whole idle limit on a connection nobody will ever answer.
//!
//! The watchdog of one client connection:
//! 1. right after connecting, a `ping` on the connection learns the server's *boot id*
//!    (random per server process, `protocol::PingInfo`);
//! 2. it watches the connection's received-datagram counter: a live peer acknowledges our
//!    keep-alives every [`KEEP_ALIVE`], so a counter that stands still for [`SILENCE`]
//!    means the peer or the network is gone;
//! 3. then it probes with *fresh* handshakes (a new connection on the same endpoint, then a
//!    `ping`), a new one every [`PROBE_EVERY`] while the silence lasts:
//!    - no answer: the network (or the machine) is down; keep waiting — the old connection
//!      may still come back, and the idle limit decides if it does not;
//!    - an answer with the same boot id: the server lives and the network works again, so
//!      the old connection will resume; keep it;
//!    - an answer with another boot id: the server restarted and the old connection is
//!      dead. Close it with [`RESTARTED`], so every stream on it fails at once.
//! 4. when the counter moves again after a silence of [`OUTAGE`] or more, the network came
//!    back after a real outage: [`Watchdog::outages`] counts it, and a resumable session
//!    whose stream then stands still moves to a fresh connection (`session::resume`).
//!    The old connection lives, but may not carry bytes for a long time: measured on the
//!    NAT namespaces, a 20 s cut of the server during a 64 MiB scp left it standing still
//!    for 40–80 s after the network was back in 7 runs of 12 — iroh abandons a direct
//!    path silent for 15 s, and the bytes that were in flight on it are given up for lost
//!    only when the peer's PATH_ABANDON gets through a relay path whose loss timers backed
//!    off through the outage (noq issue #516, open: a broken path's packets are declared
//!    lost only when it closes). A fresh connection has none of that state.
//!
//! A server too old to send a boot id (EOF after `accept`) gets no watchdog: the idle
//! limit alone applies, as before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;

use crate::id52::Id52;
use crate::protocol::{self, PingInfo, Request};
use crate::transport::iroh::{KEEP_ALIVE, Node, PeerConnection};

/// How long the received-datagram counter may stand still before the watchdog probes:
/// a bit more than one keep-alive round, so a healthy idle connection never probes.
pub const SILENCE: Duration = Duration::from_millis(1500);
/// A new probe starts this often while the silence lasts (restart noticed within about
/// this plus one handshake of the server being back).
pub const PROBE_EVERY: Duration = Duration::from_millis(500);
/// One probe's handshake + ping; probes overlap, so this bounds only how many are in
/// flight (`PROBE_TIMEOUT / PROBE_EVERY`).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// A silence this long, once it ends, counts as an outage (step 4). Longer than a Wi-Fi
/// blip, which the old connection rides out by itself; shorter than iroh's 15 s direct-path
/// idle limit, past which the old connection can be stuck. A peer that was only slow (its
/// machine loaded) looks the same here: a session moves only if its stream then stands
/// still too (`session::resume::Stream::stalled_after_outage`).
pub const OUTAGE: Duration = Duration::from_secs(10);
/// How often the counter is read.
const TICK: Duration = Duration::from_millis(250);
/// The close reason the client's streams report.
pub const RESTARTED: &str = "the server restarted and no longer knows this connection";

/// The watchdog of one connection; dropping it stops the watch (the connection itself
/// lives on).
pub struct Watchdog {
    task: JoinHandle<()>,
    restarted: Arc<AtomicBool>,
    outages: tokio::sync::watch::Receiver<u64>,
}

impl Watchdog {
    /// Whether the watchdog closed the connection because the server restarted (so an
    /// error can say so instead of a bare "connection lost").
    pub fn saw_restart(&self) -> bool {
        self.restarted.load(Ordering::Relaxed)
    }

    /// How many outages of [`OUTAGE`] or more the connection came back from; `changed()`
    /// on it wakes at the next. It closes when the watch ends (the connection closed).
    pub fn outages(&self) -> tokio::sync::watch::Receiver<u64> {
        let mut rx = self.outages.clone();
        rx.mark_unchanged();
        rx
    }

    /// Whether the connection came back from an outage: a pool dials a fresh one for what
    /// comes next.
    pub fn saw_outage(&self) -> bool {
        *self.outages.borrow() > 0
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Start watching `conn` (to `peer`, dialed from `node`, reachable at `hints`).
pub fn watch(
    node: Node,
    conn: PeerConnection,
    peer: Id52,
    hints: Vec<SocketAddr>,
    cluster: Id52,
) -> Watchdog {
    let restarted = Arc::new(AtomicBool::new(false));
    let flag = restarted.clone();
    let (outages_tx, outages) = tokio::sync::watch::channel(0);
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = conn.closed() => {}
            _ = run(&node, &conn, &peer, &hints, cluster, &flag, &outages_tx) => {}
        }
    });
    Watchdog {
        task,
        restarted,
        outages,
    }
}

/// [`watch`] a command's connection to `server` of `resolved`'s cluster, shared by the
/// session and the link that use it.
pub fn watch_server(
    node: &Node,
    conn: &PeerConnection,
    server: &crate::config::Server,
    resolved: &super::Resolved,
) -> Arc<Watchdog> {
    Arc::new(watch(
        node.clone(),
        conn.clone(),
        server.id52,
        server.addrs.clone(),
        resolved.config.manager,
    ))
}

/// The server's boot id, asked on `conn`; `None` if it sent none (an older server) or the
/// ping failed.
pub async fn boot_of(conn: &PeerConnection, cluster: Id52) -> Option<String> {
    let (mut send, mut recv) = super::request_on(conn, cluster, Request::Ping).await.ok()?;
    let info: PingInfo = protocol::read_json(&mut recv).await.ok()?;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
    Some(info.boot)
}

async fn run(
    node: &Node,
    conn: &PeerConnection,
    peer: &Id52,
    hints: &[SocketAddr],
    cluster: Id52,
    restarted: &AtomicBool,
    outages: &tokio::sync::watch::Sender<u64>,
) {
    let Some(boot) = tokio::time::timeout(Duration::from_secs(30), boot_of(conn, cluster))
        .await
        .ok()
        .flatten()
    else {
        tracing::debug!(%peer, "server sent no boot id; no restart watchdog");
        return;
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(4);
    let mut seen = conn.received_datagrams();
    let mut heard = Instant::now();
    let mut last_probe: Option<Instant> = None;
    let mut probes = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(answer) = rx.recv() => {
                if answer != boot {
                    tracing::info!(%peer, "server restarted (new boot id); closing the old connection");
                    restarted.store(true, Ordering::Relaxed);
                    conn.close(RESTARTED);
                    return;
                }
            }
            Some(_) = probes.join_next(), if !probes.is_empty() => {}
        }
        let now = conn.received_datagrams();
        if now != seen {
            seen = now;
            if heard.elapsed() >= OUTAGE {
                tracing::info!(%peer, silent_ms = heard.elapsed().as_millis() as u64, "connection heard again after an outage");
                outages.send_modify(|n| *n += 1);
            }
            heard = Instant::now();
            probes.abort_all();
            continue;
        }
        let silent = heard.elapsed() >= SILENCE.max(KEEP_ALIVE);
        let due = last_probe.is_none_or(|t| t.elapsed() >= PROBE_EVERY);
        if silent && due && probes.len() < 4 {
            last_probe = Some(Instant::now());
            let (node, peer, hints, tx) = (node.clone(), *peer, hints.to_vec(), tx.clone());
            probes.spawn(async move {
                let probe = async {
                    let c = node.connect(&peer, &hints).await.ok()?;
                    let b = boot_of(&c, cluster).await;
                    c.close("probe");
                    b
                };
                if let Ok(Some(b)) = tokio::time::timeout(PROBE_TIMEOUT, probe).await {
                    let _ = tx.send(b).await;
                }
            });
        }
    }
}
