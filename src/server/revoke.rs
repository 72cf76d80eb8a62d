//! Revocation of live requests: when the cluster file changes, every running tunnel, exec,
//! HTTP and forwarding stream asks the ACL again, and one that would now be denied is cut.
//!
//! Without this, `cluster remove alice` or dropping her from `allow-from` denied only her
//! *next* request; a shell she already had kept running (issue 12, finding 8). Now:
//! - a poller per served cluster re-reads the file (by content hash, [`ClusterState::current`])
//!   every [`POLL_EVERY`] while any live request watches it, so a push or a hand edit is seen
//!   within about a second; it stops when the last watcher goes;
//! - each allowed request runs with a [`Revocable`] stream and a watcher ([`revoked`]) that
//!   re-runs `acl::decide` on every reload; on a deny it cancels, the stream then fails
//!   reads and writes, and the handler cleans up as if the client had gone (exec hangs the
//!   command's session up, a tunnel closes both ends).
//!
//! A connection whose peer the file stops naming altogether ([`removed`]: `cluster remove`)
//! is closed. One whose peer is still named but has lost some rights stays open (the
//! agent's idle timer closes it); every new request on it is decided against the new file.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::ClusterState;
use crate::acl::{self, Decision};
use crate::id52::Id52;
use crate::protocol::Request;

/// How often the file is re-read while live requests watch it.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// Resolves when `peer`'s `request` on `server` would now be denied. Never resolves while
/// it is still allowed.
pub async fn revoked(state: Arc<ClusterState>, server: String, peer: Id52, request: Request) {
    let mut rx = state.revision.subscribe();
    ensure_poller(&state);
    loop {
        if rx.changed().await.is_err() {
            // The state is gone: nothing to revoke against.
            std::future::pending::<()>().await;
        }
        let cfg = state.current();
        // The server may have been renamed or removed: re-find our own entry.
        let me = state.server_name(&cfg).unwrap_or(server.clone());
        // Short exchanges (config, ping) are not watched.
        if !matches!(
            request,
            Request::Tunnel { .. }
                | Request::Exec(_)
                | Request::Http { .. }
                | Request::Forward { .. }
                | Request::RemoteForward { .. }
                | Request::RemoteConnection { .. }
        ) {
            continue;
        }
        let req = super::request::acl_request(&request);
        if let Decision::Deny(reason) = acl::decide(&cfg, &me, &peer, &req) {
            tracing::warn!(%peer, cluster = %state.dir.alias, kind = request.kind(), %reason, "access revoked; cutting the live request");
            audit_revoked(Revoked {
                state: &state,
                cfg: &cfg,
                peer: &peer,
                transport: "",
                kind: request.kind(),
                detail: String::new(),
                reason: &reason.to_string(),
            });
            return;
        }
    }
}

/// Resolves when the cluster file stops naming `peer` anywhere (see `guard::known`): its
/// connections are then closed, pooled ones included.
pub async fn removed(state: Arc<ClusterState>, peer: Id52) {
    let mut rx = state.revision.subscribe();
    ensure_poller(&state);
    loop {
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        if !super::guard::known(&state.current(), &peer) {
            tracing::warn!(%peer, cluster = %state.dir.alias, "peer removed from the cluster file; closing its connection");
            return;
        }
    }
}

/// One cut, for the audit log.
pub(super) struct Revoked<'a> {
    pub state: &'a ClusterState,
    pub cfg: &'a crate::config::ClusterConfig,
    pub peer: &'a Id52,
    pub transport: &'static str,
    pub kind: &'static str,
    pub detail: String,
    pub reason: &'a str,
}

/// The audit line of a cut: `"decision":"revoked"`.
pub(super) fn audit_revoked(r: Revoked<'_>) {
    crate::audit::write(&crate::audit::Entry {
        time: crate::audit::now_rfc3339(),
        peer: r.peer.to_string(),
        alias: r
            .cfg
            .name_of(r.peer)
            .map(|(n, _)| n.to_string())
            .unwrap_or_else(|| "-".into()),
        cluster: r.state.dir.alias.clone(),
        transport: r.transport.into(),
        kind: r.kind.into(),
        detail: r.detail,
        decision: "revoked".into(),
        reason: r.reason.to_string(),
        ..Default::default()
    });
}

/// Start the cluster's file poller unless one runs. It re-reads the file every
/// [`POLL_EVERY`] while anyone watches, and ends when nobody does.
pub(super) fn ensure_poller(state: &Arc<ClusterState>) {
    if state.polling.swap(true, Ordering::AcqRel) {
        return;
    }
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL_EVERY).await;
            let _ = state.current();
            if state.revision.receiver_count() == 0 {
                state.polling.store(false, Ordering::Release);
                // A watcher that subscribed between the check and the store would have
                // seen `polling` still true: take the job back if so.
                if state.revision.receiver_count() == 0
                    || state.polling.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        }
    });
}

/// A stream half that fails every read and write once `cut` is cancelled, waking whoever
/// waits on it, so a handler blocked on the peer notices at once.
pub struct Revocable<'a, T: ?Sized> {
    inner: &'a mut T,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    token: CancellationToken,
}

impl<'a, T: ?Sized> Revocable<'a, T> {
    pub fn new(inner: &'a mut T, token: &CancellationToken) -> Self {
        Revocable {
            inner,
            cut: Box::pin(token.clone().cancelled_owned()),
            token: token.clone(),
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        if self.token.is_cancelled() || self.cut.as_mut().poll(cx).is_ready() {
            return Some(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "access revoked",
            ));
        }
        None
    }
}

use std::future::Future;

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Revocable<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut *this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Revocable<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut *this.inner).poll_write(cx, data)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut *this.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}
