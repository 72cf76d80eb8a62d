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
use crate::session::resume::{Carrier, End, Pace, RESTARTED, Resumable, Stream, redial_until};

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
    session: Resumable<PoolNet>,
    /// [`HolderResumable::run`] returned: the server was told how the session ended.
    ended: bool,
}

/// A resumable session's carrier on the holder's pool: a pooled stream, redialled
/// through the pool.
pub struct PoolNet {
    pool: Arc<Pool>,
    target: Target,
    net: PooledStream,
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
        let resume = self.session.resume(true);
        let carrier = self.session.carrier();
        let (pool, alias) = (carrier.pool.clone(), carrier.target.dir.alias.clone());
        let (peer, hints) = (carrier.target.peer, carrier.target.hints.clone());
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
        let dir = target.dir.clone();
        let carrier = PoolNet { pool, target, net };
        HolderResumable {
            session: Resumable::new(carrier, &dir, kind, grant),
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
        let r = self.session.carry(local_r, local_w, close).await;
        self.ended = true;
        r
    }
}

impl PoolNet {
    /// The session was abandoned while detached: ask the server to end it now rather than
    /// keep it for its keep time (best effort: unreachable, it ends at that time).
    async fn tell_closed(&self, close: Resume) {
        let turn = Arc::new(tokio::sync::Mutex::new(false));
        let asked = self.pool.resume(
            &self.target.dir.alias,
            self.target.peer,
            &self.target.hints,
            close,
            turn,
        );
        let answered = tokio::time::timeout(CLOSE_TIMEOUT, asked).await.is_ok();
        tracing::info!(server = %self.target.server, answered, "abandoned while detached; asked the server to end the session");
    }
}

impl Carrier for PoolNet {
    type R = crate::session::SessionRead;
    type W = crate::session::SessionWrite;

    fn server(&self) -> &str {
        &self.target.server
    }

    fn net(&mut self) -> (&mut Self::R, &mut Self::W) {
        (&mut self.net.recv, &mut self.net.send)
    }

    fn outages(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        // Its connection came back from an outage: move to a fresh one (the pool dials it).
        self.net.outages()
    }

    fn relay_renewals(&self) -> Option<crate::transport::iroh::RelayRenewals> {
        self.net.relay_renewals()
    }

    async fn abandon(&mut self, close: Resume) {
        // Our `close` could not get out in time: say it on a stream of its own.
        self.net.abort();
        self.tell_closed(close).await;
    }

    async fn closed(&mut self) {}

    async fn ended(&mut self, end: End) {
        let wait = if end == End::Finished {
            crate::session::LINGER
        } else {
            Duration::from_millis(500)
        };
        let _ = tokio::time::timeout(wait, self.net.send.acknowledged()).await;
    }

    async fn broken(&mut self) -> Result<(), SessionError> {
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
        Ok(())
    }

    fn detach(&mut self) {
        // Our stream only: the connection is the pool's (other requests may ride on it; a
        // dead one is replaced on the next dial).
        self.net.abort();
    }

    async fn redial(
        &mut self,
        stream: &Stream,
        grant: &Grant,
        close: &CancellationToken,
    ) -> Result<Option<u64>, SessionError> {
        let (pool, alias) = (self.pool.clone(), self.target.dir.alias.clone());
        let (peer, hints) = (self.target.peer, self.target.hints.clone());
        let attempt = move |resume, turn| {
            let (pool, alias, hints) = (pool.clone(), alias.clone(), hints.clone());
            async move { pool.resume(&alias, peer, &hints, resume, turn).await }
        };
        let resumed = redial_until(
            stream,
            grant,
            &self.target.server,
            close,
            Pace::QUIC,
            attempt,
        )
        .await?;
        Ok(resumed.map(|(net, grant)| {
            self.net = net;
            grant.received
        }))
    }

    async fn gave_up(&mut self, closed: Option<Resume>) {
        if let Some(close) = closed {
            self.tell_closed(close).await;
        }
    }

    async fn failed(&mut self) {
        self.net.abort();
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
