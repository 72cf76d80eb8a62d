//! A request's stream on the pool's connection (or through another key holder), and the
//! lease that keeps that connection counted busy while the stream lives (`pool`'s idle
//! timer counts from the lease's drop).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::pool::{Slot, lock};
use crate::session::{SessionRead, SessionWrite};

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
    pub send: SessionWrite,
    pub recv: SessionRead,
    server: String,
    /// The pooled connection it rides on (none through another holder).
    conn: Option<crate::transport::iroh::PeerConnection>,
    _lease: Option<Lease>,
}

impl PooledStream {
    pub(super) fn pooled(
        send: crate::transport::iroh::SendHalf,
        recv: crate::transport::iroh::RecvHalf,
        slot: Arc<Slot>,
        generation: u64,
        conn: crate::transport::iroh::PeerConnection,
    ) -> PooledStream {
        PooledStream {
            send: SessionWrite::Iroh(send),
            recv: SessionRead::Iroh(recv),
            server: slot.server.clone(),
            conn: Some(conn),
            _lease: Some(Lease { slot, generation }),
        }
    }

    pub(super) fn via(s: tokio::net::UnixStream, server: &str) -> PooledStream {
        let (r, w) = s.into_split();
        PooledStream {
            send: SessionWrite::Via(w),
            recv: SessionRead::Via(r),
            server: server.to_string(),
            conn: None,
            _lease: None,
        }
    }

    /// Abandon the stream (the peer sees a reset, never a clean end).
    pub fn abort(&mut self) {
        if let SessionWrite::Iroh(s) = &mut self.send {
            s.reset();
        }
        if let SessionRead::Iroh(r) = &mut self.recv {
            r.stop();
        }
        // Via another process: dropping the socket makes that one reset its stream.
    }

    /// Why the stream broke, when its connection knows ([`crate::session::open::lost_reason`]).
    pub fn lost_reason(&self) -> Option<String> {
        self.on_live(|l| {
            crate::session::open::lost_reason(l._watchdog.saw_restart(), l.conn.peer_close_reason())
        })
        .flatten()
    }

    /// Outages the stream's connection came back from (`session::liveness::Watchdog::outages`);
    /// `None` when its connection is no longer the pool's live one, or not the pool's.
    pub fn outages(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.on_live(|l| l._watchdog.outages())
    }

    /// Renewals of the holder's relay connection while the stream's connection goes
    /// through the relay (`PeerConnection::relay_renewals`).
    pub fn relay_renewals(&self) -> Option<crate::transport::iroh::RelayRenewals> {
        self.conn.as_ref()?.relay_renewals()
    }

    /// `f` of the pool's live connection, when it is still the one this stream rides on.
    fn on_live<R>(&self, f: impl FnOnce(&super::pool::Live) -> R) -> Option<R> {
        let lease = self._lease.as_ref()?;
        let live = lock(&lease.slot.live);
        live.as_ref()
            .filter(|l| l.generation == lease.generation)
            .map(f)
    }

    /// The server closed the stream's connection on purpose (it is shutting down, or
    /// refuses us) and why: it has ended its sessions, nothing to resume. Waits a moment
    /// for the close, which may trail the stream's error.
    pub async fn closed_by_server(&self) -> Option<String> {
        let conn = self.conn.as_ref()?;
        let _ = tokio::time::timeout(std::time::Duration::from_millis(300), conn.closed()).await;
        let restarted = self
            .lost_reason()
            .is_some_and(|r| r.contains(crate::session::liveness::RESTARTED));
        (conn.closed_by_peer() && !restarted).then(|| {
            conn.peer_close_reason()
                .unwrap_or_else(|| "it is shutting down".into())
        })
    }

    /// The stream's halves, for a caller that runs it as a plain session (a command's own
    /// pool, `client::forward_resume`, which keeps no idle count).
    pub fn into_halves(self) -> (SessionWrite, SessionRead) {
        (self.send, self.recv)
    }

    /// The server this stream goes to (for logs).
    pub fn server(&self) -> &str {
        &self.server
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
