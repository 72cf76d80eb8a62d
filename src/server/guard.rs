//! Admission before the ACL: strangers are cut off right after the handshake, and the
//! whole server has a ceiling on handshakes in flight and on open connections.
//!
//! iroh must finish a QUIC handshake to learn (and verify) who is calling, so a handshake
//! is the least a stranger can cost; everything after it is refused here:
//! - [`try_handshake`]: at most [`MAX_HANDSHAKES`] handshakes run at once over all served
//!   clusters; an incoming connection beyond that is dropped (refused) without crypto work;
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

static HANDSHAKES: Semaphore = Semaphore::const_new(MAX_HANDSHAKES);
static CONNECTIONS: Semaphore = Semaphore::const_new(MAX_CONNECTIONS);

/// A slot for one handshake, or `None` when the server is at its ceiling (then the
/// incoming connection is dropped, which refuses it).
pub fn try_handshake() -> Option<SemaphorePermit<'static>> {
    let p = HANDSHAKES.try_acquire().ok();
    if p.is_none() {
        tracing::debug!("handshake ceiling reached; refusing an incoming connection");
    }
    p
}

/// Why a connection is not kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("not known to this cluster")]
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
