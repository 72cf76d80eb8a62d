//! A resumable session the key holder runs for a command (issue 18). A command that finds
//! the key held (by the agent, or by this machine's server) hands its stdio to the holder
//! (`open`), and the holder runs the request on its pooled connection. When that
//! connection is lost the holder redials through its pool and resumes the session where
//! it stopped (`session::resume`: the same engine and redial loop as a command's own
//! endpoint); the command, still waiting on the control socket, never notices.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::pool::{Pool, PooledStream};
use crate::config::store::ClusterDir;
use crate::id52::Id52;
use crate::protocol::resume::{Grant, Resume};
use crate::session::SessionError;
use crate::session::registry::{self, Registered};
use crate::session::resume::{
    AFTER_OUTAGE, AttachError, End, RESTARTED, Stream, abandoned, attach_end, redial_until,
};

/// How long telling the server that a session abandoned while detached is over may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Where a resumable session goes: what a redial through the pool needs.
pub struct Target {
    pub dir: ClusterDir,
    pub peer: Id52,
    pub server: String,
    pub hints: Vec<std::net::SocketAddr>,
}

/// One resumable session on the holder's pool.
pub struct HolderResumable {
    pool: Arc<Pool>,
    target: Target,
    grant: Grant,
    stream: Stream,
    net: PooledStream,
    /// What `malai ssh status` shows of it (`session::registry`).
    record: Registered,
    /// [`HolderResumable::run`] returned: the server was told how the session ended.
    ended: bool,
}

impl Drop for HolderResumable {
    /// Dropped before it ended (the caller stopped waiting for its close): tell the server
    /// in the background, so it does not keep the session detached for its keep time.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (pool, alias) = (self.pool.clone(), self.target.dir.alias.clone());
        let (peer, hints, resume) = (
            self.target.peer,
            self.target.hints.clone(),
            self.resume(true),
        );
        // Bounded by CLOSE_TIMEOUT; the holder's runtime outlives it or ends it.
        rt.spawn(async move {
            let turn = Arc::new(tokio::sync::Mutex::new(false));
            let asked = pool.resume(&alias, peer, &hints, resume, turn);
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, asked).await;
        });
    }
}

impl HolderResumable {
    /// `net` was accepted with `grant` for a request of `kind` (`tunnel`, `exec`).
    pub fn new(
        pool: Arc<Pool>,
        target: Target,
        kind: &str,
        net: PooledStream,
        grant: Grant,
    ) -> HolderResumable {
        tracing::info!(server = %target.server, kind, keep_secs = grant.keep_secs, "resumable {kind} through the pool");
        let record = registry::register(
            &target.dir,
            &target.server,
            kind,
            registry::Granted {
                session: &grant.session,
                secret: &grant.secret,
                keep_secs: grant.keep_secs,
            },
        );
        HolderResumable {
            pool,
            target,
            grant,
            stream: Stream::new(),
            net,
            record,
            ended: false,
        }
    }

    /// Run the session on `local_r`/`local_w` (the command's descriptors, or a pipe to the
    /// exec pump) until it ends. `close` (the command went away, or asked to finish; the
    /// holder is stopping) ends it now and tells the server to end its side too.
    pub async fn run<LR, LW>(
        mut self,
        local_r: &mut LR,
        local_w: &mut LW,
        close: &CancellationToken,
    ) -> Result<End, SessionError>
    where
        LR: AsyncRead + Unpin + ?Sized,
        LW: AsyncWrite + Unpin + ?Sized,
    {
        let r = self.run_attached(local_r, local_w, close).await;
        self.ended = true;
        r
    }

    async fn run_attached<LR, LW>(
        &mut self,
        local_r: &mut LR,
        local_w: &mut LW,
        close: &CancellationToken,
    ) -> Result<End, SessionError>
    where
        LR: AsyncRead + Unpin + ?Sized,
        LW: AsyncWrite + Unpin + ?Sized,
    {
        let mut peer_received = self.grant.received;
        loop {
            let r = {
                // Its connection came back from an outage: move to a fresh one
                // (`session::liveness` step 4; the pool dials it).
                let mut outages = self.net.outages();
                let attach = self.stream.attach(
                    peer_received,
                    local_r,
                    local_w,
                    &mut self.net.recv,
                    &mut self.net.send,
                    close,
                );
                tokio::select! {
                    r = attach => Some(r),
                    _ = self.stream.stalled_after_outage(outages.as_mut()), if !close.is_cancelled() => {
                        Some(Err(AttachError::Net(AFTER_OUTAGE.into())))
                    }
                    _ = abandoned(close) => None,
                }
            };
            let Some(r) = r else {
                // Our `close` could not get out in time (a stream blocked behind a full
                // window, a loaded machine): say it on a stream of its own.
                tracing::info!(server = %self.target.server, "the session's close did not get out in time; ending it by a resume with close");
                self.net.abort();
                self.tell_closed().await;
                return Ok(End::ClosedByUs);
            };
            if close.is_cancelled() && matches!(r, Err(AttachError::Net(_))) {
                // Our close raced the server's end of the stream: the session is over.
                return Ok(End::ClosedByUs);
            }
            match attach_end(r) {
                Ok(end) => {
                    let wait = if end == End::Finished {
                        crate::session::LINGER
                    } else {
                        Duration::from_millis(500)
                    };
                    let _ = tokio::time::timeout(wait, self.net.send.acknowledged()).await;
                    return match end {
                        End::ClosedByPeer => {
                            Err(SessionError::Lost("the server ended the session".into()))
                        }
                        e => Ok(e),
                    };
                }
                Err(AttachError::Net(why)) => {
                    if let Some(reason) = self.net.closed_by_server().await {
                        tracing::info!(server = %self.target.server, %reason, "the server closed the connection; not resuming");
                        return Err(SessionError::Lost(format!(
                            "the server closed the connection ({reason}); the session could not be resumed"
                        )));
                    }
                    if self
                        .net
                        .lost_reason()
                        .is_some_and(|r| r.contains(crate::session::liveness::RESTARTED))
                    {
                        return Err(SessionError::Lost(RESTARTED.into()));
                    }
                    tracing::info!(server = %self.target.server, %why, received = self.stream.received(), buffered = self.stream.buffered(), "connection lost; resuming through the pool");
                    self.record.reconnecting(self.stream.buffered());
                    // Our stream only: the connection is the pool's (other requests may
                    // ride on it; a dead one is replaced on the next dial).
                    self.net.abort();
                    match self.redial(close).await {
                        Ok(Some((net, grant))) => {
                            self.net = net;
                            peer_received = grant.received;
                            self.record.attached(self.stream.buffered());
                        }
                        Ok(None) => {
                            self.tell_closed().await;
                            return Ok(End::ClosedByUs);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => {
                    self.net.abort();
                    return Err(SessionError::Lost(e.to_string()));
                }
            }
        }
    }

    fn resume(&self, close: bool) -> Resume {
        Resume {
            session: self.grant.session.clone(),
            secret: self.grant.secret.clone(),
            received: self.stream.received(),
            close,
        }
    }

    async fn redial(
        &self,
        close: &CancellationToken,
    ) -> Result<Option<(PooledStream, Grant)>, SessionError> {
        let (pool, alias) = (self.pool.clone(), self.target.dir.alias.clone());
        let (peer, hints) = (self.target.peer, self.target.hints.clone());
        let attempt = move |resume, turn| {
            let (pool, alias, hints) = (pool.clone(), alias.clone(), hints.clone());
            async move { pool.resume(&alias, peer, &hints, resume, turn).await }
        };
        redial_until(
            &self.stream,
            &self.grant,
            &self.target.server,
            close,
            attempt,
        )
        .await
    }

    /// The session was abandoned while detached: ask the server to end it now rather than
    /// keep it for its keep time (best effort: unreachable, it ends at that time).
    async fn tell_closed(&self) {
        let turn = Arc::new(tokio::sync::Mutex::new(false));
        let asked = self.pool.resume(
            &self.target.dir.alias,
            self.target.peer,
            &self.target.hints,
            self.resume(true),
            turn,
        );
        let answered = tokio::time::timeout(CLOSE_TIMEOUT, asked).await.is_ok();
        tracing::info!(server = %self.target.server, answered, "abandoned while detached; asked the server to end the session");
    }
}

impl crate::session::exec_resume::RunResumable for HolderResumable {
    async fn run<LR, LW>(
        self,
        local_r: &mut LR,
        local_w: &mut LW,
        close: &CancellationToken,
    ) -> Result<End, SessionError>
    where
        LR: AsyncRead + Unpin + ?Sized,
        LW: AsyncWrite + Unpin + ?Sized,
    {
        HolderResumable::run(self, local_r, local_w, close).await
    }
}
