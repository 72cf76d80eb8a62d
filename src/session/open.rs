//! One request on a route: send the header, wait for the server's answer, and hand back
//! an accepted byte stream ([`Session`]) — over this process's own endpoint, through the
//! key holder's control socket, or through an `ssh` child (`ssh-via`). Callers only see
//! `AsyncRead`/`AsyncWrite`.

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::own::OwnEndpoint;
use super::resolve::Resolved;
use super::route::Route;
use super::{ABORT_CLOSE, ENDPOINT_CLOSE, LINGER, SessionError, liveness, ssh_via};
use crate::config::Server;
use crate::id52::Id52;
use crate::protocol::{self, FrameError, Header, Request, Response};
use crate::transport::iroh::{NetConfig, Node, PeerConnection, RecvHalf, SendHalf};

/// An accepted request: the stream is ready for payload.
///
/// The byte stream is either an iroh bi-stream or the stdio of a child `ssh` whose remote
/// end is `malai ssh stdinserver` (`ssh-via`); callers only see `AsyncRead`/`AsyncWrite`.
pub struct Session {
    pub(crate) closer: Closer,
    pub send: SessionWrite,
    pub recv: SessionRead,
}

/// What has to be torn down when a session ends, per transport.
pub(crate) enum Closer {
    Iroh {
        own: std::sync::Arc<OwnEndpoint>,
        conn: PeerConnection,
        _watchdog: std::sync::Arc<liveness::Watchdog>,
    },
    /// Through the process that holds the cluster key (its control socket).
    Via,
    Ssh(ssh_via::SshChild),
}

/// The writing half of a session's stream.
pub enum SessionWrite {
    Iroh(SendHalf),
    Via(tokio::net::unix::OwnedWriteHalf),
    /// The ssh child's stdin; `None` once shut down (closing the pipe is the only way to
    /// send EOF through it: tokio's `ChildStdin::shutdown` does not close the fd).
    Pipe(Option<tokio::process::ChildStdin>),
}

/// The reading half of a session's stream.
pub enum SessionRead {
    Iroh(RecvHalf),
    Via(tokio::net::unix::OwnedReadHalf),
    Pipe(tokio::process::ChildStdout),
}

impl SessionWrite {
    /// Wait until the peer has everything we sent (after shutdown). Through a key holder
    /// that one waits for it; through an ssh child there is nothing to wait for.
    pub async fn acknowledged(&mut self) {
        if let SessionWrite::Iroh(s) = self {
            s.acknowledged().await;
        }
    }
}

impl AsyncWrite for SessionWrite {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            SessionWrite::Iroh(s) => Pin::new(s).poll_write(cx, buf),
            SessionWrite::Via(s) => Pin::new(s).poll_write(cx, buf),
            SessionWrite::Pipe(Some(p)) => Pin::new(p).poll_write(cx, buf),
            SessionWrite::Pipe(None) => Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SessionWrite::Iroh(s) => Pin::new(s).poll_flush(cx),
            SessionWrite::Via(s) => Pin::new(s).poll_flush(cx),
            SessionWrite::Pipe(Some(p)) => Pin::new(p).poll_flush(cx),
            SessionWrite::Pipe(None) => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SessionWrite::Iroh(s) => Pin::new(s).poll_shutdown(cx),
            SessionWrite::Via(s) => Pin::new(s).poll_shutdown(cx),
            SessionWrite::Pipe(p) => {
                if let Some(pipe) = p.as_mut() {
                    std::task::ready!(Pin::new(pipe).poll_flush(cx))?;
                }
                *p = None;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl AsyncRead for SessionRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            SessionRead::Iroh(r) => Pin::new(r).poll_read(cx, buf),
            SessionRead::Via(r) => Pin::new(r).poll_read(cx, buf),
            SessionRead::Pipe(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl Session {
    /// Close politely: wait (briefly) until the server has our last bytes, then close.
    pub async fn finish(self) {
        self.linger(LINGER).await
    }

    /// [`Session::finish`] with a chosen wait for the last bytes to be acknowledged.
    pub async fn linger(mut self, wait: Duration) {
        match self.closer {
            Closer::Iroh { own, conn, .. } => {
                if let SessionWrite::Iroh(s) = &mut self.send {
                    let _ = tokio::time::timeout(wait, s.acknowledged()).await;
                }
                conn.close("done");
                own.done(ENDPOINT_CLOSE).await;
            }
            // The holder lingers for the peer's acknowledgement itself.
            Closer::Via => {}
            Closer::Ssh(child) => {
                drop(self.send);
                drop(self.recv);
                child.finish(wait).await;
            }
        }
    }

    /// The error to report for a session that broke with `e`: says so when the cause was
    /// a server restart (the watchdog closed the connection), not just "connection lost".
    pub fn broken(&self, e: SessionError) -> SessionError {
        match &self.closer {
            Closer::Iroh {
                _watchdog: w, conn, ..
            } => match lost_reason(w.saw_restart(), conn.peer_close_reason()) {
                Some(why) => SessionError::Lost(why),
                None => e,
            },
            _ => e,
        }
    }

    /// The path of this session's own connection (direct or relayed, address, RTT);
    /// `None` through a key holder (ask its status) or `ssh-via`.
    pub fn path(&self) -> Option<crate::transport::iroh::PathSummary> {
        match &self.closer {
            Closer::Iroh { conn, .. } => conn.path(),
            Closer::Via | Closer::Ssh(_) => None,
        }
    }

    /// Close at once (after an error).
    pub async fn abort(mut self) {
        match self.closer {
            Closer::Iroh { own, conn, .. } => {
                if let SessionWrite::Iroh(s) = &mut self.send {
                    s.reset();
                }
                conn.close("aborted");
                own.done(ABORT_CLOSE).await;
            }
            // Dropping the socket makes the holder reset its stream.
            Closer::Via => {}
            Closer::Ssh(child) => child.kill().await,
        }
    }
}

/// Dial `server` of `resolved`'s cluster and send `request`; `Ok` only after `accept`.
pub async fn open(
    resolved: &Resolved,
    server: &Server,
    request: Request,
) -> Result<Session, SessionError> {
    open_with(resolved, server, request, &[]).await
}

/// [`open`], with `-o` options for the `ssh` child when the server is reached `ssh-via`.
pub async fn open_with(
    resolved: &Resolved,
    server: &Server,
    request: Request,
    ssh_options: &[String],
) -> Result<Session, SessionError> {
    let header = Header {
        cluster: Some(resolved.config.manager),
        request,
    };
    if let Some(via) = &server.ssh_via {
        let (child, stdin, stdout) =
            ssh_via::spawn(via, server.ssh_identity_file.as_deref(), ssh_options)?;
        let mut send = SessionWrite::Pipe(Some(stdin));
        let mut recv = SessionRead::Pipe(stdout);
        return match exchange(&mut send, &mut recv, header).await {
            Ok(()) => Ok(Session {
                closer: Closer::Ssh(child),
                send,
                recv,
            }),
            Err(e) => Err(ssh_failed(child, e).await),
        };
    }
    let route = super::route(&resolved.dir, Some(&resolved.config)).await?;
    open_on(route, resolved, server, header.request).await
}

/// The error for an ssh-via request that failed with `e` before it was accepted; the
/// child is ended. ssh that died (host key, auth, no forced command, …) said why on its
/// own stderr: say that it was ssh and how it ended.
pub(super) async fn ssh_failed(child: ssh_via::SshChild, e: SessionError) -> SessionError {
    match e {
        SessionError::NoAnswer | SessionError::Protocol(FrameError::Io(_)) => {
            child.exited_error().await.into()
        }
        e => {
            child.kill().await;
            e
        }
    }
}

/// Send `request` to `server` on a route already decided ([`super::route`]); `Ok` only
/// after `accept`.
pub async fn open_on(
    route: Route,
    resolved: &Resolved,
    server: &Server,
    request: Request,
) -> Result<Session, SessionError> {
    let own = match route {
        Route::Own(own) => own,
        Route::Holder(client) => {
            let sock = client
                .stream(&resolved.dir.alias, server.id52, &server.addrs, request)
                .await
                .map_err(SessionError::from_holder)?;
            let (r, w) = sock.into_split();
            return Ok(Session {
                closer: Closer::Via,
                send: SessionWrite::Via(w),
                recv: SessionRead::Via(r),
            });
        }
    };
    let header = Header {
        cluster: Some(resolved.config.manager),
        request,
    };
    let net = super::own::net_config(Some(&resolved.config))?;
    match handshake(&own.node, server, header, &net).await {
        Ok((conn, send, recv)) => Ok(Session {
            closer: Closer::Iroh {
                _watchdog: liveness::watch_server(&own.node, &conn, server, resolved),
                own,
                conn,
            },
            send: SessionWrite::Iroh(send),
            recv: SessionRead::Iroh(recv),
        }),
        Err(e) => {
            own.done(ABORT_CLOSE).await;
            Err(e)
        }
    }
}

/// Why a session broke, when the connection knows better than the stream's error (which
/// reads only "connection lost"): its server restarted, or closed the connection and said
/// why (`access revoked` when this machine was removed from the cluster).
pub fn lost_reason(restarted: bool, peer_reason: Option<String>) -> Option<String> {
    if restarted {
        return Some(format!("connection lost: {}", liveness::RESTARTED));
    }
    peer_reason.map(|r| format!("the server closed the connection: {r}"))
}

async fn handshake(
    node: &Node,
    server: &Server,
    header: Header,
    net: &NetConfig,
) -> Result<(PeerConnection, SendHalf, RecvHalf), SessionError> {
    let conn = super::connect::dial_server(node, server.into(), net).await?;
    let (mut send, mut recv) = conn.open().await?;
    match exchange(&mut send, &mut recv, header).await {
        Ok(()) => Ok((conn, send, recv)),
        Err(e) => Err(refused_by_close(&conn, e)),
    }
}

/// The server closed the whole connection instead of answering the header: it said why
/// (a stranger, a removed member), which says more than the stream's "connection lost".
pub fn refused_by_close(conn: &PeerConnection, e: SessionError) -> SessionError {
    match conn.peer_close_reason() {
        Some(reason) => SessionError::Denied(reason),
        None => e,
    }
}

/// Open a new stream on an existing connection (the agent's pooled one) and send
/// `request`; `Ok` only after `accept`.
pub async fn request_on(
    conn: &PeerConnection,
    cluster: Id52,
    request: Request,
) -> Result<(SendHalf, RecvHalf), SessionError> {
    match request_on_for(conn, cluster, request).await? {
        (send, recv, Accepted::Plain) => Ok((send, recv)),
        (..) => Err(SessionError::Protocol(FrameError::Malformed(
            "accept-resumable to a request that did not ask for resume".into(),
        ))),
    }
}

/// [`request_on`] for a request that may be accepted as resumable (a key holder's
/// resumable tunnel, a resume on its pooled connection).
pub async fn request_on_for(
    conn: &PeerConnection,
    cluster: Id52,
    request: Request,
) -> Result<(SendHalf, RecvHalf, Accepted), SessionError> {
    let (mut send, mut recv) = conn.open().await?;
    let header = Header {
        cluster: Some(cluster),
        request,
    };
    let accepted = exchange_for(&mut send, &mut recv, header)
        .await
        .map_err(|e| refused_by_close(conn, e))?;
    Ok((send, recv, accepted))
}

/// Send the header and wait for the server's answer; `Ok` only on `accept`. The one
/// header/answer exchange of every client of the protocol (commands, pools, config sync).
pub async fn exchange<W, R>(send: &mut W, recv: &mut R, header: Header) -> Result<(), SessionError>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    match exchange_for(send, recv, header).await? {
        Accepted::Plain => Ok(()),
        Accepted::Resumable(_) => Err(SessionError::Protocol(FrameError::Malformed(
            "accept-resumable to a request that did not ask for resume".into(),
        ))),
    }
}

/// How a server accepted a request.
#[derive(Debug)]
pub enum Accepted {
    /// `accept`.
    Plain,
    /// `accept-resumable` (`protocol::resume`): only to a request that asked for it.
    Resumable(protocol::resume::Grant),
}

/// [`exchange`] for a request that may be accepted as resumable.
pub async fn exchange_for<W, R>(
    send: &mut W,
    recv: &mut R,
    header: Header,
) -> Result<Accepted, SessionError>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    protocol::write_frame(send, &header).await?;
    send.flush().await.map_err(FrameError::from)?;
    let resp = tokio::time::timeout(super::ANSWER_TIMEOUT, protocol::read_response(recv))
        .await
        .map_err(|_| SessionError::Timeout("waiting for the server's answer"))?;
    match resp {
        Ok(Response::Accept) => Ok(Accepted::Plain),
        Ok(Response::AcceptResumable(g)) => Ok(Accepted::Resumable(g)),
        Ok(Response::Deny { reason }) => Err(SessionError::Denied(reason)),
        Ok(Response::Error { reason }) => Err(SessionError::Refused(reason)),
        Err(FrameError::Truncated) => Err(SessionError::NoAnswer),
        Err(e) => Err(e.into()),
    }
}
