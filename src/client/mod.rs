//! The client side: find the server a host name means, dial it with this machine's key for
//! that cluster, and open one request.
//!
//! - [`proxy`]: `malai ssh proxy <host> [port]`, the OpenSSH ProxyCommand.
//! - [`ssh_via`]: servers reached through OpenSSH + `malai ssh stdinserver` (`ssh-via`).

pub mod exec;
pub mod forward;
pub mod group;
pub mod known_hosts;
pub mod liveness;
pub mod proxy;
pub mod socks;
pub mod ssh_args;
pub mod ssh_via;
pub mod tty;

use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::config::paths::Dirs;
use crate::config::store::{ClusterDir, StoreError, list_clusters};
use crate::config::{ClusterConfig, ResolveError, Server, names};
use crate::id52::Id52;
use crate::keys::{self, KeyError};
use crate::protocol::{self, FrameError, Header, Request, Response};
use crate::transport::iroh::{NetConfig, Node, PeerConnection, RecvHalf, SendHalf, TransportError};

/// Dialing plus handshake (through a relay when there is no direct path yet). The QUIC
/// idle limit is long (sessions ride out outages), so this is what bounds a dial to a
/// server that is down or unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long closing a command's own endpoint may wait for the peers' acknowledgements.
const ENDPOINT_CLOSE: Duration = Duration::from_secs(3);
/// After an error, how long the endpoint's close may wait for acknowledgements.
const ABORT_CLOSE: Duration = Duration::from_millis(300);
/// How long to wait for the peer to acknowledge our last bytes before closing.
const LINGER: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Resolve(#[from] ResolveError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{0}")]
    Transport(#[from] TransportError),
    /// The server's ACL said no; the reason is the server's one line.
    #[error("{0}")]
    Denied(String),
    /// The server could not serve the request (target down, unsupported kind, …).
    #[error("{0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(#[from] FrameError),
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// A local signal ended the session (ssh's wording).
    #[error("Killed by signal {0}.")]
    Killed(i32),
    #[error("{0}")]
    Args(#[from] ssh_args::ArgsError),
    #[error("{0} is a {1}; use a server name")]
    NotAServer(String, &'static str),
    #[error("{0}")]
    SshVia(#[from] ssh_via::SshViaError),
    #[error("server closed the stream without answering")]
    NoAnswer,
    /// `MALAI_LOCKDOWN_MODE=true` and no usable agent: the CLI may not read a secret key.
    #[error("{0}")]
    Lockdown(String),
    /// The agent (`MALAI_SSH_AGENT`) failed while serving the request.
    #[error("{0}")]
    Agent(String),
}

/// Every cluster on this machine that has a usable file, as `(folder alias, config)`.
/// Invalid files are skipped with a log line so one broken cluster doesn't break the others.
pub fn local_clusters(dirs: &Dirs) -> Result<Vec<(ClusterDir, ClusterConfig)>, ClientError> {
    let mut out = vec![];
    for dir in list_clusters(dirs)? {
        if !dir.has_file() {
            continue;
        }
        match dir.load() {
            Ok(cfg) => out.push((dir, cfg)),
            Err(e) => tracing::warn!(cluster = %dir.alias, error = %e, "skipping cluster"),
        }
    }
    Ok(out)
}

/// What a host name resolved to on this machine.
pub struct Resolved {
    pub dir: ClusterDir,
    pub config: ClusterConfig,
    pub target: names::Target,
}

impl Resolved {
    pub fn server(&self) -> Option<&Server> {
        let name = match &self.target.kind {
            names::TargetKind::Server { server } => server,
            names::TargetKind::Service { server, .. } => server,
            names::TargetKind::Group { .. } => return None,
        };
        self.config.servers.get(name)
    }
}

pub fn resolve(dirs: &Dirs, host: &str) -> Result<Resolved, ClientError> {
    let clusters = local_clusters(dirs)?;
    let pairs: Vec<(String, ClusterConfig)> = clusters
        .iter()
        .map(|(d, c)| (d.alias.clone(), c.clone()))
        .collect();
    let target = names::resolve(&pairs, host)?;
    let (dir, config) = clusters
        .into_iter()
        .find(|(d, _)| d.alias == target.cluster)
        .ok_or_else(|| ResolveError::Unknown(host.to_string()))?;
    Ok(Resolved {
        dir,
        config,
        target,
    })
}

/// An accepted request: the stream is ready for payload.
///
/// The byte stream is either an iroh bi-stream or the stdio of a child `ssh` whose remote
/// end is `malai ssh stdinserver` (`ssh-via`); callers only see `AsyncRead`/`AsyncWrite`.
pub struct Session {
    closer: Closer,
    pub send: SessionWrite,
    pub recv: SessionRead,
}

/// What has to be torn down when a session ends, per transport.
enum Closer {
    Iroh {
        own: std::sync::Arc<crate::endpoint::OwnEndpoint>,
        conn: PeerConnection,
        _watchdog: liveness::Watchdog,
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
    pub fn broken(&self, e: ClientError) -> ClientError {
        match &self.closer {
            Closer::Iroh { _watchdog: w, .. } if w.saw_restart() => {
                ClientError::Refused(format!("connection lost: {}", liveness::RESTARTED))
            }
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
) -> Result<Session, ClientError> {
    open_with(resolved, server, request, &[]).await
}

/// [`open`], with `-o` options for the `ssh` child when the server is reached `ssh-via`.
pub async fn open_with(
    resolved: &Resolved,
    server: &Server,
    request: Request,
    ssh_options: &[String],
) -> Result<Session, ClientError> {
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
            // ssh died (host key, auth, no forced command, …): its own stderr said why;
            // say that it was ssh and how it ended.
            Err(ClientError::NoAnswer) | Err(ClientError::Protocol(FrameError::Io(_))) => {
                Err(child.exited_error().await.into())
            }
            Err(e) => {
                child.kill().await;
                Err(e)
            }
        };
    }
    // Through the process that holds the cluster key (server or agent) if one does; else
    // this command binds it for its own length. Lockdown: the CLI never reads a key.
    let access = crate::endpoint::for_command(
        &resolved.dir,
        Some(&resolved.config),
        crate::agent::lockdown_mode(),
    )
    .await?;
    let own = match access {
        crate::endpoint::CommandAccess::Own(own) => own,
        crate::endpoint::CommandAccess::Via(socket) => {
            let sock = crate::endpoint::open_via(
                &socket,
                &resolved.dir.alias,
                server.id52,
                &server.addrs,
                header.request,
            )
            .await?;
            let (r, w) = sock.into_split();
            return Ok(Session {
                closer: Closer::Via,
                send: SessionWrite::Via(w),
                recv: SessionRead::Via(r),
            });
        }
    };
    let net = crate::endpoint::net_config(Some(&resolved.config))?;
    match handshake(&own.node, server, header, &net).await {
        Ok((conn, send, recv)) => Ok(Session {
            closer: Closer::Iroh {
                _watchdog: liveness::watch(
                    own.node.clone(),
                    conn.clone(),
                    server.id52,
                    server.addrs.clone(),
                    resolved.config.manager,
                ),
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

/// A dial still pending after this long has the cluster's relays checked
/// (`transport::probe`), so a relay that cannot work is named instead of a bare timeout.
const RELAY_CHECK_AFTER: Duration = Duration::from_secs(2);

async fn handshake(
    node: &Node,
    server: &Server,
    header: Header,
    net: &NetConfig,
) -> Result<(PeerConnection, SendHalf, RecvHalf), ClientError> {
    let conn = dial(node, server, net).await?;
    let (mut send, mut recv) = conn.open().await?;
    match exchange(&mut send, &mut recv, header).await {
        Ok(()) => Ok((conn, send, recv)),
        // The server closed the whole connection instead of answering: it said why.
        Err(e) => Err(match conn.peer_close_reason() {
            Some(reason) => ClientError::Denied(reason),
            None => e,
        }),
    }
}

/// Dial `server`, bounded by [`CONNECT_TIMEOUT`]. When the dial is slow, the cluster's own
/// relays are probed meanwhile: if none of them can work and the server has no `addrs`
/// hint (so nothing else could reach it), fail at once naming each relay and why (an
/// untrusted certificate, refused, unreachable); a dial that times out anyway names them
/// too.
pub(crate) async fn dial(
    node: &Node,
    server: &Server,
    net: &NetConfig,
) -> Result<PeerConnection, ClientError> {
    use crate::transport::probe;
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, node.connect(&server.id52, &server.addrs));
    tokio::pin!(connect);
    let check = async {
        tokio::time::sleep(RELAY_CHECK_AFTER).await;
        probe::relay_problems(net).await
    };
    tokio::pin!(check);
    let relays = probe::relay_urls(net).len();
    let mut checking = relays > 0;
    let mut problems = vec![];
    let dialed = loop {
        tokio::select! {
            r = &mut connect => break r,
            p = &mut check, if checking => {
                checking = false;
                if p.len() == relays && server.addrs.is_empty() {
                    return Err(relay_error(server, &p));
                }
                problems = p;
            }
        }
    };
    match dialed {
        Ok(r) => Ok(r?),
        Err(_) if problems.is_empty() => Err(ClientError::Timeout("connecting")),
        Err(_) => Err(relay_error(server, &problems)),
    }
}

fn relay_error(
    server: &Server,
    problems: &[(String, crate::transport::probe::RelayProblem)],
) -> ClientError {
    let lines: Vec<String> = problems
        .iter()
        .map(|(url, p)| crate::transport::probe::describe(url, p))
        .collect();
    ClientError::Refused(format!(
        "cannot reach server {}: {}",
        server.name,
        lines.join("; ")
    ))
}

/// Open a new stream on an existing connection (the agent's pooled one) and send
/// `request`; `Ok` only after `accept`.
pub async fn request_on(
    conn: &PeerConnection,
    cluster: Id52,
    request: Request,
) -> Result<(SendHalf, RecvHalf), ClientError> {
    let (mut send, mut recv) = conn.open().await?;
    let header = Header {
        cluster: Some(cluster),
        request,
    };
    exchange(&mut send, &mut recv, header).await?;
    Ok((send, recv))
}

/// Send the header and wait for the server's answer; `Ok` only on `accept`.
async fn exchange<W, R>(send: &mut W, recv: &mut R, header: Header) -> Result<(), ClientError>
where
    W: AsyncWrite + Unpin,
    R: AsyncRead + Unpin,
{
    protocol::write_frame(send, &header).await?;
    send.flush().await.map_err(FrameError::from)?;
    let resp = tokio::time::timeout(CONNECT_TIMEOUT, protocol::read_response(recv))
        .await
        .map_err(|_| ClientError::Timeout("waiting for the server's answer"))?;
    match resp {
        Ok(Response::Accept) => Ok(()),
        Ok(Response::Deny { reason }) => Err(ClientError::Denied(reason)),
        Ok(Response::Error { reason }) => Err(ClientError::Refused(reason)),
        Err(FrameError::Truncated) => Err(ClientError::NoAnswer),
        Err(e) => Err(e.into()),
    }
}

/// This machine's id52 in a cluster (for error messages and `malai ssh id52`).
pub fn my_id52(dir: &ClusterDir) -> Result<Id52, ClientError> {
    Ok(keys::id52(&dir.dir)?)
}
