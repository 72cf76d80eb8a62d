//! The connections a server accepted, for `malai ssh status` (path, address, RTT): the
//! key holder's `status` lists them beside the pool's outgoing ones, and the server's
//! resumable sessions (attached or detached) after them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::control::protocol::{ConnectionInfo, SessionInfo};
use crate::id52::Id52;
use crate::transport::iroh::PeerConnection;

/// One accepted connection, as listed.
struct Accepted {
    cluster: String,
    /// The peer's name in the cluster file (or its short id52).
    name: String,
    peer: Id52,
    conn: PeerConnection,
}

/// Lists one cluster's resumable sessions (the server registers one per cluster it serves).
pub type SessionLister = Box<dyn Fn() -> Vec<SessionInfo> + Send + Sync>;

#[derive(Default)]
pub struct Inbound {
    next: AtomicU64,
    live: Mutex<BTreeMap<u64, Accepted>>,
    sessions: Mutex<Vec<SessionLister>>,
}

/// Removes its connection from [`Inbound`] when the connection's task ends.
pub struct Listed<'a> {
    inbound: &'a Inbound,
    id: u64,
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        let mut l = self.inbound.live.lock().unwrap_or_else(|p| p.into_inner());
        l.remove(&self.id);
    }
}

impl Inbound {
    /// List `conn` (from `name` of `cluster`) until the returned guard is dropped.
    pub fn add(&self, cluster: &str, name: String, conn: &PeerConnection) -> Listed<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let mut l = self.live.lock().unwrap_or_else(|p| p.into_inner());
        l.insert(
            id,
            Accepted {
                cluster: cluster.to_string(),
                name,
                peer: conn.remote(),
                conn: conn.clone(),
            },
        );
        Listed { inbound: self, id }
    }

    /// List the sessions `lister` reports in `status` from now on.
    pub fn add_sessions(&self, lister: SessionLister) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(lister);
    }

    /// Every resumable session of every cluster served.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let l = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        l.iter().flat_map(|f| f()).collect()
    }

    /// Every live accepted connection.
    pub fn list(&self) -> Vec<ConnectionInfo> {
        let l = self.live.lock().unwrap_or_else(|p| p.into_inner());
        l.values()
            .filter(|a| !a.conn.is_closed())
            .map(|a| {
                ConnectionInfo {
                    cluster: a.cluster.clone(),
                    server: a.name.clone(),
                    peer: a.peer.to_string(),
                    direction: "in".into(),
                    ..Default::default()
                }
                .with_path(&a.conn)
            })
            .collect()
    }
}
