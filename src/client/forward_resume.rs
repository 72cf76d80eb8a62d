//! Native forwards that outlive their connection (issue 18): each `-L`, `-D` and `-W`
//! channel, and the remote command beside them, is a resumable session when the server
//! offers it, so a download through `-L` or a `-N` tunnel rides out an outage longer than
//! the QUIC idle limit the way `malai ssh proxy` does.
//!
//! Over this process's own endpoint the channels run on a key-holder pool of our own
//! (`keyholder::pool`, adopting the link's endpoint and seeded with its connection): every
//! channel is one stream on one connection, and after a cut the first channel to redial
//! installs the new connection that the others and every new channel then share. That is
//! the agent's machinery (`keyholder::resume`), not a copy of it. Through a key holder (the
//! agent, this machine's server) the holder runs each channel resumable itself and relays
//! plain bytes to us (`keyholder::serve`'s `stream`).
//!
//! `-R` and `-A` are too: the `remote-forward` stream (the server's listener and its
//! announcements) is a resumable session whose listener the server keeps while it is
//! detached, and each `remote-connection` claim is one as a `-L` channel is.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use crate::config::Server;
use crate::config::paths::Dirs;
use crate::id52::Id52;
use crate::keyholder::pool::Pool;
use crate::keyholder::resume::HolderResumable;
use crate::protocol::Request;
use crate::protocol::exec::ExecRequest;
use crate::protocol::forward::{ForwardTarget, RemoteListen};
use crate::session::link::Link;
use crate::session::open::{Accepted, Closer};
use crate::session::{Resolved, Session, SessionError, SessionRead, SessionWrite, resume};
use crate::transport::pump;

/// Opens the channels of one `malai ssh` run with forwards. Cheap to clone.
#[derive(Clone)]
pub struct Opener {
    link: Link,
    /// Our own pool (own endpoint, resume on); `None`: plain streams on the link.
    own: Option<Arc<OwnPool>>,
}

struct OwnPool {
    pool: Arc<Pool>,
    alias: String,
    peer: Id52,
    hints: Vec<SocketAddr>,
}

/// One opened forward channel.
pub enum Channel {
    Plain(SessionWrite, SessionRead),
    Resumable(Box<HolderResumable>),
}

/// The remote command beside the forwards, opened.
pub enum Command {
    Plain(Box<Session>),
    Resumable(Box<HolderResumable>),
}

impl Opener {
    /// Channels on `link` to `server`; over our own endpoint with resume on, through a pool
    /// of our own seeded with the link's connection.
    pub async fn new(dirs: &Dirs, link: &Link, resolved: &Resolved, server: &Server) -> Opener {
        let own = match link {
            Link::Own { own, conn, .. } if resume::enabled() => {
                match crate::keys::id52(&resolved.dir.dir) {
                    Ok(me) => {
                        let alias = resolved.dir.alias.clone();
                        // Adopt-only: it never claims or binds a key, it uses ours.
                        let pool = Arc::new(Pool::for_server(
                            dirs.clone(),
                            Default::default(),
                            crate::keyholder::pool::DEFAULT_IDLE,
                        ));
                        pool.adopt(&alias, me, own.node.clone()).await;
                        pool.seed(
                            &alias,
                            server.id52,
                            &server.name,
                            &server.addrs,
                            resolved.config.manager,
                            conn.clone(),
                        )
                        .await;
                        Some(Arc::new(OwnPool {
                            pool,
                            alias,
                            peer: server.id52,
                            hints: server.addrs.clone(),
                        }))
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "cannot read our id; forwards are not resumable");
                        None
                    }
                }
            }
            _ => None,
        };
        Opener {
            link: link.clone(),
            own,
        }
    }

    /// Whether a lost connection leaves the channels (and new ones) working: through our
    /// own pool, or a key holder (which redials itself).
    pub fn outlives_the_connection(&self) -> bool {
        self.own.is_some() || matches!(self.link, Link::Via { .. })
    }

    /// Open one `forward` to `to`; `Ok` only after the server's `accept`.
    pub async fn forward(&self, to: ForwardTarget) -> Result<Channel, SessionError> {
        self.channel(|resume| Request::Forward { to, resume }, "forward")
            .await
    }

    /// Open one `remote-forward` (`-R`, `-A`): the server listens; its events ride the channel.
    pub async fn remote_forward(&self, listen: RemoteListen) -> Result<Channel, SessionError> {
        self.channel(
            |resume| Request::RemoteForward { listen, resume },
            "remote-forward",
        )
        .await
    }

    /// Claim connection `id` a `remote-forward` announced.
    pub async fn remote_connection(&self, id: u64) -> Result<Channel, SessionError> {
        self.channel(
            |resume| Request::RemoteConnection { id, resume },
            "remote-connection",
        )
        .await
    }

    /// Open the stream `request(resume)` asks for: on our pool with resume (`kind` in logs),
    /// or plain on the link, where a holder makes it resumable when asked.
    async fn channel(
        &self,
        request: impl FnOnce(bool) -> Request,
        kind: &'static str,
    ) -> Result<Channel, SessionError> {
        let Some(own) = &self.own else {
            let resume = matches!(self.link, Link::Via { .. }) && resume::enabled();
            let (send, recv) = self.link.open(request(resume)).await?;
            return Ok(Channel::Plain(send, recv));
        };
        own.open(request(true), kind).await
    }

    /// Open the remote command (`exec`) beside the forwards.
    pub async fn command(&self, mut req: ExecRequest) -> Result<Command, SessionError> {
        let Some(own) = &self.own else {
            return Ok(Command::Plain(Box::new(
                self.link.open_session(Request::Exec(req)).await?,
            )));
        };
        req.resume = true;
        Ok(match own.open(Request::Exec(req), "exec").await? {
            Channel::Resumable(r) => Command::Resumable(r),
            Channel::Plain(send, recv) => Command::Plain(Box::new(Session {
                closer: Closer::Via,
                send,
                recv,
            })),
        })
    }
}

impl OwnPool {
    /// Send `request` (which asks for resume) on our pool; a resumable session (`kind` in
    /// logs) when the server grants one, plain halves when it answers a plain `accept`.
    async fn open(&self, request: Request, kind: &'static str) -> Result<Channel, SessionError> {
        let (stream, accepted, target) = self
            .pool
            .open_raw_accepted(&self.alias, self.peer, &self.hints, request)
            .await?;
        Ok(match accepted {
            Accepted::Resumable(grant) => Channel::Resumable(Box::new(HolderResumable::new(
                self.pool.clone(),
                target,
                kind,
                stream,
                grant,
            ))),
            Accepted::Plain => {
                let (send, recv) = stream.into_halves();
                Channel::Plain(send, recv)
            }
        })
    }
}

impl Channel {
    /// Move bytes between the local connection and the channel until both directions
    /// ended; `stop` (the run is ending) cuts it now — a resumable one tells the server to
    /// end its side, bounded by `session::resume::CLOSE_GRACE`. `what` names the target.
    pub async fn run<LR, LW>(self, lr: &mut LR, lw: &mut LW, stop: &CancellationToken, what: &str)
    where
        LR: AsyncRead + Unpin + ?Sized,
        LW: AsyncWrite + Unpin + ?Sized,
    {
        match self {
            Channel::Plain(mut send, mut recv) => {
                let moved = tokio::select! {
                    m = pump::both_ways(lr, &mut send, &mut recv, lw) => m,
                    _ = stop.cancelled() => {
                        reset(&mut send);
                        return;
                    }
                };
                match moved {
                    Ok(m) => {
                        tracing::debug!(target = %what, up = m.up, down = m.down, "forward closed")
                    }
                    Err(e) => {
                        tracing::info!(target = %what, error = %e, "forward broke");
                        reset(&mut send);
                    }
                }
            }
            Channel::Resumable(session) => match session.run(lr, lw, stop).await {
                Ok(end) => tracing::debug!(target = %what, ?end, "resumable forward done"),
                Err(e) => {
                    tracing::info!(target = %what, error = %e, "resumable forward ended");
                    eprintln!("malai: channel to {what}: {e}");
                }
            },
        }
    }

    /// Like [`Channel::run`] for a channel whose end the caller reports itself: a
    /// resumable session's error comes back instead of going to stderr.
    pub async fn run_reporting<LR, LW>(
        self,
        lr: &mut LR,
        lw: &mut LW,
        stop: &CancellationToken,
    ) -> Result<(), SessionError>
    where
        LR: AsyncRead + Unpin + ?Sized,
        LW: AsyncWrite + Unpin + ?Sized,
    {
        match self {
            Channel::Resumable(session) => session.run(lr, lw, stop).await.map(|end| {
                tracing::debug!(?end, "resumable channel done");
            }),
            plain => {
                plain.run(lr, lw, stop, "the server").await;
                Ok(())
            }
        }
    }

    /// Abandon it before any byte moved (the SOCKS client went away).
    pub fn abort(self) {
        match self {
            Channel::Plain(mut send, _) => reset(&mut send),
            // Dropped unfinished, it tells the server in the background.
            Channel::Resumable(session) => drop(session),
        }
    }
}

/// Abort a stream's sending side (QUIC reset; through a holder, dropping does it).
pub fn reset(w: &mut SessionWrite) {
    if let SessionWrite::Iroh(s) = w {
        s.reset();
    }
}
