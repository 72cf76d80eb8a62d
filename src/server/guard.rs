//! Admission before the ACL: strangers are cut off right after the handshake, and the
//! whole server has a ceiling on handshakes in flight and on open connections.
//!
//! iroh must finish a QUIC handshake to learn (and verify) who is calling, so a handshake
//! is the least a stranger can cost; everything after it is refused here:
//! - [`queue`] / [`Ticket::wait`]: at most [`MAX_HANDSHAKES`] handshakes run at once over
//!   all served clusters; up to [`MAX_WAITING`] more wait (at most [`MAX_WAIT`]) for a slot,
//!   so a burst of members is served, not refused; beyond that an incoming connection is
//!   dropped (refused) without crypto work;
//! - [`admit`]: a connection from an id52 the cluster file does not mention at all (not the
//!   manager, not a member, not a raw id52 in any `allow-from`) is closed at once, before it
//!   can open a stream, allocate a request, or take a per-peer slot (`ClusterState::admit`,
//!   so that cap only ever counts members); known peers take a connection slot for the
//!   connection's life ([`ConnSlot`]).
//!
//! Connection slots (issue 19, finding 5): one member, even a device with no grants, must
//! not be able to take them all — and so block the manager's push that would remove it.
//! So a peer holds at most [`MAX_CONNECTIONS_PER_PEER`], a cluster at most
//! [`MAX_CONNECTIONS_PER_CLUSTER`] (a server of several clusters stays reachable in the
//! others), and [`MANAGER_RESERVE`] of the process-wide [`MAX_CONNECTIONS`] are kept for
//! cluster managers, which the per-cluster ceiling does not stop either.
//!
//! The handshake and process-wide limits are statics: one server process serves every
//! cluster; the per-cluster and per-peer counts live in each `ClusterState`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{Semaphore, SemaphorePermit};

use super::ClusterState;
use crate::config::ClusterConfig;
use crate::id52::Id52;

/// Handshakes in flight, all clusters together. A member's dial waits at most one
/// handshake timeout behind a flood; 128 keeps a 2-core machine responsive.
pub const MAX_HANDSHAKES: usize = 128;
/// Open connections from known peers, all clusters together.
pub const MAX_CONNECTIONS: usize = 4096;
/// Of [`MAX_CONNECTIONS`], the slots only a cluster manager may take.
pub const MANAGER_RESERVE: usize = 32;
/// Open connections of one cluster (managers not counted against it).
pub const MAX_CONNECTIONS_PER_CLUSTER: usize = 2048;
/// Open connections of one peer in one cluster: an agent keeps one per server; a client
/// without one opens one per command (100 concurrent `scp` are 100).
pub const MAX_CONNECTIONS_PER_PEER: usize = 256;

/// Incoming connections that may wait for a handshake slot.
pub const MAX_WAITING: usize = 1024;
/// How long one waits before it is dropped.
pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

static HANDSHAKES: Semaphore = Semaphore::const_new(MAX_HANDSHAKES);
static CONNECTIONS: Semaphore = Semaphore::const_new(MAX_CONNECTIONS - MANAGER_RESERVE);
static MANAGER_SLOTS: Semaphore = Semaphore::const_new(MANAGER_RESERVE);
static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A place in the handshake queue; see [`queue`].
pub struct Ticket(());

impl Drop for Ticket {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// A place in line for a handshake, or `None` when the line is full (then the incoming
/// connection is dropped, which refuses it). Synchronous: the accept loop never waits.
pub fn queue() -> Option<Ticket> {
    let n = WAITING.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    if n >= MAX_WAITING + MAX_HANDSHAKES {
        WAITING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        tracing::debug!("handshake queue full; refusing an incoming connection");
        return None;
    }
    Some(Ticket(()))
}

impl Ticket {
    /// Wait (at most [`MAX_WAIT`]) for a handshake slot; the ticket is given up either way.
    pub async fn wait(self) -> Option<SemaphorePermit<'static>> {
        let p = tokio::time::timeout(MAX_WAIT, HANDSHAKES.acquire())
            .await
            .ok()?
            .ok();
        drop(self);
        p
    }
}

/// A slot for one handshake now, or `None` at the ceiling.
pub fn try_handshake() -> Option<SemaphorePermit<'static>> {
    HANDSHAKES.try_acquire().ok()
}

/// Why a connection is not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Said to the peer (the connection's close reason), which prints it after the host
    /// name: it must read as being about the peer, not the host.
    #[error(
        "this machine is not a member of the cluster (the server's cluster file does not list its id52); ask the cluster's manager to add it"
    )]
    Stranger,
    #[error("too many connections")]
    Full,
    #[error("too many connections to this cluster")]
    ClusterFull,
    #[error("too many connections from this machine")]
    PeerFull,
}

/// The ceilings [`Counts`] applies (constants in the server; small ones in tests).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub per_cluster: usize,
    pub per_peer: usize,
}

const LIMITS: Limits = Limits {
    per_cluster: MAX_CONNECTIONS_PER_CLUSTER,
    per_peer: MAX_CONNECTIONS_PER_PEER,
};

/// One cluster's open connections: in all (managers excluded) and per peer.
#[derive(Default)]
pub struct Counts {
    inner: Mutex<CountsInner>,
}

#[derive(Default)]
struct CountsInner {
    cluster: usize,
    per_peer: HashMap<Id52, usize>,
}

impl Counts {
    fn lock(&self) -> std::sync::MutexGuard<'_, CountsInner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    /// Count one more connection of `peer`, or say which ceiling it hits.
    pub fn take(&self, peer: &Id52, manager: bool, limits: Limits) -> Result<(), Refusal> {
        let mut c = self.lock();
        if !manager && c.cluster >= limits.per_cluster {
            return Err(Refusal::ClusterFull);
        }
        let n = c.per_peer.entry(*peer).or_insert(0);
        if *n >= limits.per_peer {
            return Err(Refusal::PeerFull);
        }
        *n += 1;
        if !manager {
            c.cluster += 1;
        }
        Ok(())
    }

    /// Undo one [`Counts::take`].
    pub fn give_back(&self, peer: &Id52, manager: bool) {
        let mut c = self.lock();
        if !manager {
            c.cluster = c.cluster.saturating_sub(1);
        }
        if let Some(n) = c.per_peer.get_mut(peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                c.per_peer.remove(peer);
            }
        }
    }
}

/// A known peer's connection slot; given back (all counts) when dropped.
pub struct ConnSlot {
    _global: SemaphorePermit<'static>,
    state: Arc<ClusterState>,
    peer: Id52,
    manager: bool,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.state.connections.give_back(&self.peer, self.manager);
    }
}

/// A process-wide slot; a manager may dip into the reserve when the rest are taken.
fn global_slot(manager: bool) -> Option<SemaphorePermit<'static>> {
    CONNECTIONS
        .try_acquire()
        .ok()
        .or_else(|| manager.then(|| MANAGER_SLOTS.try_acquire().ok()).flatten())
}

/// Keep a connection from `peer` only if the cluster file knows it and every ceiling has
/// room. The slot is held for the connection's life.
pub fn admit(state: &Arc<ClusterState>, peer: &Id52) -> Result<ConnSlot, Refusal> {
    let cfg = state.current();
    if !known(&cfg, peer) {
        return Err(Refusal::Stranger);
    }
    let manager = *peer == cfg.manager;
    state.connections.take(peer, manager, LIMITS)?;
    let Some(global) = global_slot(manager) else {
        state.connections.give_back(peer, manager);
        return Err(Refusal::Full);
    };
    Ok(ConnSlot {
        _global: global,
        state: state.clone(),
        peer: *peer,
        manager,
    })
}

/// Whether the file mentions `peer` anywhere it could be granted something.
pub fn known(cfg: &ClusterConfig, peer: &Id52) -> bool {
    *peer == cfg.manager
        || cfg.name_of(peer).is_some()
        || cfg.servers.values().any(|s| {
            s.allow_from.contains(peer)
                || s.commands.values().any(|c| c.allow_from.contains(peer))
                || s.services.values().any(|v| v.allow_from.contains(peer))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Id52 {
        Id52::from_bytes([n; 32])
    }

    #[test]
    fn strangers_are_unknown_everyone_the_file_names_is_known() {
        let text = format!(
            "[cluster-manager]\nid52 = \"{}\"\n\n[server.foo]\nid52 = \"{}\"\nallow-from = \"{}\"\n\n[server.foo.ls]\nallow-from = \"{}\"\n\n[server.foo.service.web]\nhttp = 80\nallow-from = \"{}\"\n\n[device.alice]\nid52 = \"{}\"\n",
            id(1),
            id(2),
            id(3),
            id(4),
            id(5),
            id(6)
        );
        let cfg = ClusterConfig::parse(&text).unwrap();
        for n in [1, 2, 3, 4, 5, 6] {
            assert!(known(&cfg, &id(n)), "{n}");
        }
        assert!(!known(&cfg, &id(42)));
    }

    #[test]
    fn one_peer_cannot_take_every_connection_slot() {
        let limits = Limits {
            per_cluster: 6,
            per_peer: 4,
        };
        let counts = Counts::default();
        let (mallory, alice, bob, manager) = (id(7), id(8), id(9), id(1));
        for _ in 0..4 {
            counts.take(&mallory, false, limits).unwrap();
        }
        // Mallory is at her own cap; others are still served.
        assert_eq!(counts.take(&mallory, false, limits), Err(Refusal::PeerFull));
        counts.take(&alice, false, limits).unwrap();
        counts.take(&alice, false, limits).unwrap();
        // The cluster is full for members…
        assert_eq!(counts.take(&bob, false, limits), Err(Refusal::ClusterFull));
        // …not for its manager, whose push must get through.
        counts.take(&manager, true, limits).unwrap();
        // Given back, a slot is free again.
        counts.give_back(&mallory, false);
        counts.take(&bob, false, limits).unwrap();
    }

    #[test]
    fn the_manager_reserve_is_for_managers_only() {
        let held: Vec<_> = std::iter::from_fn(|| global_slot(false)).collect();
        assert_eq!(held.len(), MAX_CONNECTIONS - MANAGER_RESERVE);
        assert!(global_slot(false).is_none(), "a member got a reserved slot");
        let reserved: Vec<_> = std::iter::from_fn(|| global_slot(true)).collect();
        assert_eq!(reserved.len(), MANAGER_RESERVE);
        drop(reserved);
        drop(held);
        assert!(global_slot(false).is_some());
    }

    #[test]
    fn the_handshake_queue_is_bounded() {
        let held: Vec<_> = std::iter::from_fn(queue)
            .take(MAX_WAITING + MAX_HANDSHAKES + 10)
            .collect();
        assert_eq!(held.len(), MAX_WAITING + MAX_HANDSHAKES);
        assert!(queue().is_none());
        drop(held);
        assert!(queue().is_some());
    }

    #[test]
    fn handshakes_have_a_ceiling() {
        let held: Vec<_> = std::iter::from_fn(try_handshake)
            .take(MAX_HANDSHAKES + 10)
            .collect();
        assert_eq!(held.len(), MAX_HANDSHAKES);
        assert!(try_handshake().is_none());
        drop(held);
        assert!(try_handshake().is_some());
    }
}
