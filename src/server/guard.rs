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
//!   so that cap only ever counts members); known peers take one of [`MAX_CONNECTIONS`]
//!   connection slots for the connection's life.
//!
//! The limits are process-wide statics: one server process serves every cluster.

use tokio::sync::{Semaphore, SemaphorePermit};

use super::ClusterState;
use crate::config::ClusterConfig;
use crate::id52::Id52;

/// Handshakes in flight, all clusters together. A member's dial waits at most one
/// handshake timeout behind a flood; 128 keeps a 2-core machine responsive.
pub const MAX_HANDSHAKES: usize = 128;
/// Open connections from known peers, all clusters together.
pub const MAX_CONNECTIONS: usize = 4096;

/// Incoming connections that may wait for a handshake slot.
pub const MAX_WAITING: usize = 1024;
/// How long one waits before it is dropped.
pub const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

static HANDSHAKES: Semaphore = Semaphore::const_new(MAX_HANDSHAKES);
static CONNECTIONS: Semaphore = Semaphore::const_new(MAX_CONNECTIONS);
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
}

/// Keep a connection from `peer` only if the cluster file knows it and a connection slot
/// is free. The permit is held for the connection's life.
pub fn admit(state: &ClusterState, peer: &Id52) -> Result<SemaphorePermit<'static>, Refusal> {
    if !known(&state.current(), peer) {
        return Err(Refusal::Stranger);
    }
    CONNECTIONS.try_acquire().map_err(|_| Refusal::Full)
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
