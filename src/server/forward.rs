//! Forwarding on the server side: the pieces every forward needs, whichever protocol asked
//! for it (the embedded SSH server's `direct-tcpip`, `tcpip-forward`, streamlocal and agent
//! channels; native `malai ssh -L/-D/-W/-R` streams).
//!
//! - [`check`]: the one way a forward is decided — `acl::decide` with
//!   `Request::Forward`, plus an audit line for the decision (allow or deny), so a forward
//!   is never served without the choke point and the log seeing it.
//! - [`connect_tcp`] / [`connect_unix`]: the server end of a local forward, with a timeout.
//! - [`listen_tcp`] / [`listen_unix`]: the server end of a remote forward. TCP listeners
//!   bind loopback only, as sshd does with its default `GatewayPorts no`: a peer's remote
//!   forward must not open a port to the server's whole network.
//! - [`AgentSocket`]: a private directory with a listening socket for `ssh -A`; removed
//!   when dropped.
//! - [`serve`]: a native `forward` stream (`protocol::forward`), after `server::request`
//!   asked the ACL and wrote the audit line.
//! - [`splice`]: bytes both ways until both sides are done, half-closes passed on.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::ClusterState;
use super::request::reply;
use crate::acl::{self, Decision, ForwardKind};
use crate::audit;
use crate::id52::Id52;
use crate::protocol::Response;
use crate::protocol::forward::{
    ForwardTarget, MAX_PENDING, PENDING_TTL, RemoteEvent, RemoteListen,
};
use crate::transport::pump;

/// The ACL's kind for a native `forward` target.
pub fn kind_of(to: &ForwardTarget) -> ForwardKind {
    match to {
        ForwardTarget::Tcp { .. } => ForwardKind::Local,
        ForwardTarget::Unix { .. } => ForwardKind::LocalUnix,
    }
}

/// Serve an allowed `forward` stream for `ctx.peer` on this machine (known as `server` in
/// the cluster file): connect first, answer `accept` or `error`, then move bytes both ways.
/// A forward that asked for resume gets a resumable session (`server::resume`) when the
/// caps allow: its connection to the target then outlives the stream, as a tunnel's sshd
/// leg does. Returns `true` when the stream ended cleanly.
pub async fn serve<R, W>(
    ctx: &super::request::Context,
    server: &str,
    to: &ForwardTarget,
    resume: bool,
    r: &mut R,
    w: &mut W,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let Err(reason) = to.check() {
        return reply(w, &Response::Error { reason }).await.is_ok();
    }
    let conn = match to {
        ForwardTarget::Tcp { host, port } => connect_tcp(host, *port).await.map(Conn::Tcp),
        ForwardTarget::Unix { path } => connect_unix(path).await.map(Conn::Unix),
    };
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(target = %to.describe(), error = %e, "forward target unreachable");
            let reason = e.to_string();
            return reply(w, &Response::Error { reason }).await.is_ok();
        }
    };
    let request = || crate::protocol::Request::Forward {
        to: to.clone(),
        resume,
    };
    match offer_resume(ctx, server, resume, request, w).await {
        Offer::Resumable(slot) => {
            return super::resume::serve(ctx, &slot, conn.parked(), 0, r, w).await;
        }
        Offer::Broken => return false,
        Offer::Plain => {}
    }
    if reply(w, &Response::Accept).await.is_err() {
        return false;
    }
    let moved = match conn {
        Conn::Tcp(s) => {
            let (mut sr, mut sw) = s.into_split();
            pump::both_ways(r, &mut sw, &mut sr, w).await
        }
        Conn::Unix(s) => {
            let (mut sr, mut sw) = s.into_split();
            pump::both_ways(r, &mut sw, &mut sr, w).await
        }
    };
    match moved {
        Ok(m) => {
            tracing::debug!(target = %to.describe(), up = m.up, down = m.down, "forward closed");
            true
        }
        Err(e) => {
            tracing::info!(target = %to.describe(), error = %e, "forward broke");
            false
        }
    }
}

/// What a stream that may have asked for resume gets.
enum Offer {
    /// Answered `accept-resumable`: serve the slot.
    Resumable(std::sync::Arc<super::resume::Slot>),
    /// Not asked, not possible (stdinserver), or over the caps: answer `accept` as before.
    Plain,
    /// The answer could not be written.
    Broken,
}

/// Offer a resumable session for `request` when it asked (`resume`) and the caps allow.
/// Only an iroh peer can come back on another connection to this same process.
async fn offer_resume<W: AsyncWrite + Unpin>(
    ctx: &super::request::Context,
    server: &str,
    resume: bool,
    request: impl FnOnce() -> crate::protocol::Request,
    w: &mut W,
) -> Offer {
    if !resume || ctx.transport != "iroh" {
        return Offer::Plain;
    }
    let Some((slot, grant)) = super::resume::new_slot(ctx, server, request()) else {
        return Offer::Plain;
    };
    if reply(w, &Response::AcceptResumable(grant)).await.is_err() {
        ctx.state.detached.end(&slot);
        return Offer::Broken;
    }
    Offer::Resumable(slot)
}

enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    /// A fresh resumable session's local leg on this connection.
    fn parked(self) -> super::resume::Parked {
        match self {
            Conn::Tcp(s) => {
                let (sr, sw) = s.into_split();
                super::resume::Parked::new(sr, sw)
            }
            Conn::Unix(s) => {
                let (sr, sw) = s.into_split();
                super::resume::Parked::new(sr, sw)
            }
        }
    }
}

/// How long the server tries to reach a forward's target before reporting failure.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Remote forwards (TCP and unix listeners) one SSH session may hold at once.
pub const MAX_LISTENERS: usize = 64;
/// Longest host name accepted as a forward target (DNS's limit).
pub const MAX_HOST_LEN: usize = 255;
/// Longest unix socket path (Linux's `sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Who asks, for the decision and the audit line.
pub struct Asker<'a> {
    pub state: &'a ClusterState,
    /// This machine's server name in the cluster file.
    pub server: &'a str,
    pub peer: &'a Id52,
    /// "iroh" or "stdinserver".
    pub transport: &'a str,
}

/// Ask the ACL whether `asker` may forward `kind` to/from `detail` (host:port or a path,
/// for the log) right now, and write the decision to the audit log. `Err` is the reason,
/// one line, for the peer.
pub fn check(asker: &Asker<'_>, kind: ForwardKind, detail: &str) -> Result<(), String> {
    let cfg = asker.state.current();
    let decision = acl::decide(
        &cfg,
        asker.server,
        asker.peer,
        &acl::Request::Forward { kind },
    );
    let alias = cfg
        .name_of(asker.peer)
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| "-".into());
    let mut entry = audit::Entry {
        time: audit::now_rfc3339(),
        peer: asker.peer.to_string(),
        alias,
        cluster: asker.state.dir.alias.clone(),
        transport: asker.transport.into(),
        kind: format!("forward-{kind}"),
        detail: detail.chars().take(300).collect(),
        ..Default::default()
    };
    let out = match decision {
        Decision::Allow(_) => {
            entry.decision = "allow".into();
            tracing::info!(peer = %asker.peer, %kind, detail = %entry.detail, "forward allowed");
            Ok(())
        }
        Decision::Deny(reason) => {
            entry.decision = "deny".into();
            entry.reason = reason.to_string();
            tracing::warn!(peer = %asker.peer, %kind, detail = %entry.detail, %reason, "forward denied");
            Err(reason.to_string())
        }
    };
    audit::write(&entry);
    out
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("bad forward target {0:?}")]
    BadTarget(String),
    #[error("cannot reach {0}: timed out")]
    Timeout(String),
    #[error("cannot reach {0}: {1}")]
    Connect(String, std::io::Error),
    #[error("cannot listen on {0}: {1}")]
    Listen(String, std::io::Error),
}

/// Connect to `host:port` from the server, as sshd does for `direct-tcpip`.
pub async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, ForwardError> {
    if host.is_empty() || host.len() > MAX_HOST_LEN || host.contains('\0') {
        return Err(ForwardError::BadTarget(host.chars().take(64).collect()));
    }
    let what = format!("{host}:{port}");
    // Bracketed IPv6 (`[::1]`) as ssh users write it.
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((bare, port))).await {
        Err(_) => Err(ForwardError::Timeout(what)),
        Ok(Err(e)) => Err(ForwardError::Connect(what, e)),
        Ok(Ok(s)) => {
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}

/// Connect to a unix socket on the server (`direct-streamlocal@openssh.com`).
pub async fn connect_unix(path: &str) -> Result<UnixStream, ForwardError> {
    check_path(path)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, UnixStream::connect(path)).await {
        Err(_) => Err(ForwardError::Timeout(path.into())),
        Ok(Err(e)) => Err(ForwardError::Connect(path.into(), e)),
        Ok(Ok(s)) => Ok(s),
    }
}

fn check_path(path: &str) -> Result<(), ForwardError> {
    if path.is_empty() || path.len() > MAX_SOCKET_PATH || path.contains('\0') {
        return Err(ForwardError::BadTarget(path.chars().take(64).collect()));
    }
    Ok(())
}

/// Where a remote forward listens: loopback, whatever the client asked (sshd's default
/// `GatewayPorts no`), except that an explicit IPv6 loopback stays IPv6.
pub fn listen_addr(address: &str, port: u16) -> SocketAddr {
    let ip = match address.trim_matches(['[', ']']).parse::<IpAddr>() {
        Ok(ip) if ip.is_loopback() => ip,
        _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    SocketAddr::new(ip, port)
}

/// Bind a remote forward's TCP listener; returns it with the port it got (for port 0).
/// Synchronous bind so the SSH reply can carry the result.
pub fn listen_tcp(address: &str, port: u16) -> Result<(TcpListener, u16), ForwardError> {
    let addr = listen_addr(address, port);
    let bind = || -> std::io::Result<TcpListener> {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    };
    let l = bind().map_err(|e| ForwardError::Listen(addr.to_string(), e))?;
    let got = l
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| ForwardError::Listen(addr.to_string(), e))?;
    Ok((l, got))
}

/// Bind a remote forward's unix listener at `path`. An existing file is an error, as with
/// sshd's default `StreamLocalBindUnlink no`.
pub fn listen_unix(path: &str) -> Result<UnixListener, ForwardError> {
    check_path(path)?;
    let bind = || -> std::io::Result<UnixListener> {
        let l = std::os::unix::net::UnixListener::bind(path)?;
        l.set_nonblocking(true)?;
        UnixListener::from_std(l)
    };
    bind().map_err(|e| ForwardError::Listen(path.into(), e))
}

/// A listening socket for a forwarded agent: `<tmp>/malai-agent-XXXX/agent.sock`, the
/// directory 0700 so only the server's user can reach the client's keys (as sshd does).
/// The directory goes away when this is dropped.
pub struct AgentSocket {
    dir: PathBuf,
    pub listener: UnixListener,
}

impl AgentSocket {
    pub fn new() -> std::io::Result<AgentSocket> {
        // mkdtemp makes the directory 0700 with an unguessable name.
        let dir = nix::unistd::mkdtemp(&std::env::temp_dir().join("malai-agent-XXXXXX"))
            .map_err(std::io::Error::from)?;
        let path = dir.join("agent.sock");
        let bind = || -> std::io::Result<UnixListener> {
            let l = std::os::unix::net::UnixListener::bind(&path)?;
            l.set_nonblocking(true)?;
            UnixListener::from_std(l)
        };
        match bind() {
            Ok(listener) => Ok(AgentSocket { dir, listener }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }
}

impl Drop for AgentSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Remove a unix socket file a remote forward created (on cancel or session end).
pub fn remove_socket(path: &Path) {
    let _ = std::fs::remove_file(path);
}

/// Copy both ways until both directions have ended; each side's EOF is passed on as a
/// half-close. Returns (a→b, b→a) bytes, or the first error.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional(a, b).await
}

// ---------------------------------------------------------------------------------------------
// Native remote forwards (`remote-forward`, `remote-connection`) and agent sockets
// ---------------------------------------------------------------------------------------------

/// The ACL's kind for a `remote-forward` listener.
pub fn remote_kind_of(listen: &RemoteListen) -> ForwardKind {
    match listen {
        RemoteListen::Tcp { .. } => ForwardKind::Remote,
        RemoteListen::Unix { .. } => ForwardKind::RemoteUnix,
        RemoteListen::Agent {} => ForwardKind::Agent,
    }
}

/// `detail` for the audit line of a `remote-forward`.
pub fn describe_listen(listen: &RemoteListen) -> String {
    match listen {
        RemoteListen::Tcp { address, port } => format!("{address}:{port}"),
        RemoteListen::Unix { path } => path.chars().take(300).collect(),
        RemoteListen::Agent {} => "agent".into(),
    }
}

/// Accepted connections waiting for their peer's `remote-connection` stream.
struct Pending {
    peer: Id52,
    conn: Conn,
    at: Instant,
}

static PENDING: Mutex<Option<HashMap<u64, Pending>>> = Mutex::new(None);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Agent sockets held open by `remote-forward {agent}` streams: path → peer.
static AGENTS: Mutex<Option<HashMap<String, Id52>>> = Mutex::new(None);

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Parked connections one peer may have waiting (issue 19, finding 10): the server-wide
/// [`MAX_PENDING`] must not be one peer's to fill, or its listeners would starve everyone
/// else's remote forwards.
pub const MAX_PENDING_PER_PEER: usize = MAX_PENDING / 8;

/// Park an accepted connection for `peer`; `None` when too many are waiting (for this peer
/// or in all).
fn park(peer: Id52, conn: Conn) -> Option<u64> {
    let mut g = lock(&PENDING);
    let map = g.get_or_insert_with(HashMap::new);
    map.retain(|_, p| p.at.elapsed() < PENDING_TTL);
    if map.len() >= MAX_PENDING
        || map.values().filter(|p| p.peer == peer).count() >= MAX_PENDING_PER_PEER
    {
        return None;
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    map.insert(
        id,
        Pending {
            peer,
            conn,
            at: Instant::now(),
        },
    );
    Some(id)
}

/// Take a parked connection: only the peer it was announced to may claim it.
fn claim(peer: &Id52, id: u64) -> Option<Conn> {
    let mut g = lock(&PENDING);
    let map = g.as_mut()?;
    match map.get(&id) {
        Some(p) if p.peer == *peer && p.at.elapsed() < PENDING_TTL => {
            map.remove(&id).map(|p| p.conn)
        }
        _ => None,
    }
}

/// The `SSH_AUTH_SOCK` an exec request may have set: only a path `peer` holds open
/// through its own `remote-forward {agent}` stream (anything else is dropped, like every
/// other environment variable outside LANG/LC_*).
pub fn agent_socket_for(peer: &str, env: &[(String, String)]) -> Option<String> {
    let (_, path) = env.iter().find(|(k, _)| k == "SSH_AUTH_SOCK")?;
    let g = lock(&AGENTS);
    match g.as_ref()?.get(path) {
        Some(owner) if owner.to_string() == peer => Some(path.clone()),
        _ => None,
    }
}

/// Removes an agent socket's registration when its stream ends.
struct AgentRegistration(String);

impl Drop for AgentRegistration {
    fn drop(&mut self) {
        if let Some(m) = lock(&AGENTS).as_mut() {
            m.remove(&self.0);
        }
    }
}

enum RemoteListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
    Agent {
        sock: AgentSocket,
        _reg: AgentRegistration,
    },
}

impl RemoteListener {
    async fn accept(&self) -> std::io::Result<Conn> {
        match self {
            RemoteListener::Tcp(l) => l.accept().await.map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
            RemoteListener::Unix(l, _) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
            RemoteListener::Agent { sock, .. } => {
                sock.listener.accept().await.map(|(s, _)| Conn::Unix(s))
            }
        }
    }
}

impl Drop for RemoteListener {
    fn drop(&mut self) {
        if let RemoteListener::Unix(_, path) = self {
            remove_socket(path);
        }
    }
}

/// Serve an allowed `remote-forward` stream: listen, announce, park each connection for
/// the peer's `remote-connection` stream; stop when the client ends the stream. One that
/// asked for resume gets a resumable session when the caps allow (issue 18): the listener
/// then lives in a task of its own on an in-process pipe whose other end is the session's
/// local leg, so it outlives this connection, as a resumable exec's command does, and ends
/// with the session (closed, expired, revoked).
pub async fn serve_remote<R, W>(
    ctx: &super::request::Context,
    server: &str,
    listen: &RemoteListen,
    resume: bool,
    r: &mut R,
    w: &mut W,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let peer = ctx.peer;
    let bound = match bind_remote(peer, listen) {
        Ok(b) => b,
        Err(e) => {
            let reason = e.to_string();
            return reply(w, &Response::Error { reason }).await.is_ok();
        }
    };
    let request = || crate::protocol::Request::RemoteForward {
        listen: listen.clone(),
        resume,
    };
    match offer_resume(ctx, server, resume, request, w).await {
        Offer::Resumable(slot) => {
            let (leg, announcer) = tokio::io::duplex(pump::PUMP_BUF);
            let listen = listen.clone();
            tokio::spawn(async move {
                let (mut ar, mut aw) = tokio::io::split(announcer);
                announce(peer, &listen, bound, &mut ar, &mut aw).await;
            });
            let (lr, lw) = tokio::io::split(leg);
            return super::resume::serve(ctx, &slot, super::resume::Parked::new(lr, lw), 0, r, w)
                .await;
        }
        Offer::Broken => return false,
        Offer::Plain => {}
    }
    if reply(w, &Response::Accept).await.is_err() {
        return false;
    }
    announce(peer, listen, bound, r, w).await
}

/// A remote forward's listener, bound, with what [`RemoteEvent::Listening`] tells.
struct Bound {
    listener: RemoteListener,
    port: Option<u16>,
    path: Option<String>,
}

fn bind_remote(peer: Id52, listen: &RemoteListen) -> Result<Bound, ForwardError> {
    let bound = match listen {
        RemoteListen::Tcp { address, port } => {
            listen_tcp(address, *port).map(|(l, p)| (RemoteListener::Tcp(l), Some(p), None))
        }
        RemoteListen::Unix { path } => listen_unix(path).map(|l| {
            (
                RemoteListener::Unix(l, PathBuf::from(path)),
                None,
                Some(path.clone()),
            )
        }),
        RemoteListen::Agent {} => AgentSocket::new()
            .map_err(|e| ForwardError::Listen("an agent socket".into(), e))
            .map(|a| {
                let path = a.path().display().to_string();
                lock(&AGENTS)
                    .get_or_insert_with(HashMap::new)
                    .insert(path.clone(), peer);
                let reg = AgentRegistration(path.clone());
                (
                    RemoteListener::Agent { sock: a, _reg: reg },
                    None,
                    Some(path),
                )
            }),
    }?;
    let (listener, port, path) = bound;
    Ok(Bound {
        listener,
        port,
        path,
    })
}

/// Say where `bound` listens, then announce each connection it accepts (parked for the
/// peer's claim) until the client ends the stream (EOF or an error on `r`).
async fn announce<R, W>(
    peer: Id52,
    listen: &RemoteListen,
    bound: Bound,
    r: &mut R,
    w: &mut W,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let Bound {
        listener,
        port,
        path,
    } = bound;
    if crate::protocol::write_frame(w, &RemoteEvent::Listening { port, path })
        .await
        .is_err()
    {
        return false;
    }
    tracing::info!(%peer, listen = %describe_listen(listen), ?port, "remote forward listening");
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            // The client sends nothing: EOF or an error means it is done.
            _ = r.read(&mut probe) => break,
            c = listener.accept() => match c {
                Ok(conn) => {
                    let Some(id) = park(peer, conn) else {
                        tracing::warn!(%peer, "too many unclaimed remote-forward connections; closing one");
                        continue;
                    };
                    if crate::protocol::write_frame(w, &RemoteEvent::Connection { id }).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::info!(error = %e, "remote forward accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    tracing::info!(%peer, listen = %describe_listen(listen), "remote forward closed");
    true
}

/// Serve an allowed `remote-connection` stream: splice the parked connection `id`. One
/// that asked for resume gets a resumable session when the caps allow, as a `forward` does:
/// the accepted connection then outlives the stream.
pub async fn serve_claim<R, W>(
    ctx: &super::request::Context,
    server: &str,
    id: u64,
    resume: bool,
    r: &mut R,
    w: &mut W,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(conn) = claim(&ctx.peer, id) else {
        let reason = format!("no pending remote-forward connection {id}");
        return reply(w, &Response::Error { reason }).await.is_ok();
    };
    let request = || crate::protocol::Request::RemoteConnection { id, resume };
    match offer_resume(ctx, server, resume, request, w).await {
        Offer::Resumable(slot) => {
            return super::resume::serve(ctx, &slot, conn.parked(), 0, r, w).await;
        }
        Offer::Broken => return false,
        Offer::Plain => {}
    }
    if reply(w, &Response::Accept).await.is_err() {
        return false;
    }
    let moved = match conn {
        Conn::Tcp(s) => {
            let (mut sr, mut sw) = s.into_split();
            pump::both_ways(r, &mut sw, &mut sr, w).await
        }
        Conn::Unix(s) => {
            let (mut sr, mut sw) = s.into_split();
            pump::both_ways(r, &mut sw, &mut sr, w).await
        }
    };
    moved.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_forwards_listen_on_loopback_only() {
        for a in [
            "",
            "*",
            "0.0.0.0",
            "localhost",
            "192.0.2.1",
            "::",
            "example.com",
        ] {
            assert_eq!(listen_addr(a, 80), "127.0.0.1:80".parse().unwrap(), "{a:?}");
        }
        assert_eq!(listen_addr("::1", 80), "[::1]:80".parse().unwrap());
        assert_eq!(listen_addr("[::1]", 80), "[::1]:80".parse().unwrap());
        assert_eq!(
            listen_addr("127.0.0.2", 80),
            "127.0.0.2:80".parse().unwrap()
        );
    }

    #[test]
    fn bad_targets_are_refused_before_any_io() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            assert!(matches!(
                connect_tcp("", 80).await,
                Err(ForwardError::BadTarget(_))
            ));
            assert!(matches!(
                connect_tcp(&"a".repeat(300), 80).await,
                Err(ForwardError::BadTarget(_))
            ));
            assert!(matches!(
                connect_unix("a\0b").await,
                Err(ForwardError::BadTarget(_))
            ));
            assert!(matches!(
                connect_unix(&"/x".repeat(100)).await,
                Err(ForwardError::BadTarget(_))
            ));
        });
        assert!(matches!(listen_unix(""), Err(ForwardError::BadTarget(_))));
    }

    #[test]
    fn agent_socket_is_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path = rt.block_on(async {
            let a = AgentSocket::new().unwrap();
            let p = a.path();
            let mode = std::fs::metadata(p.parent().unwrap())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700);
            assert!(p.exists());
            p
        });
        assert!(!path.exists());
        assert!(!path.parent().unwrap().exists());
    }

    /// A parked remote-forward connection goes only to the peer it was announced to, once.
    #[test]
    fn parked_connections_are_claimed_by_their_peer_only() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (a, _b) = UnixStream::pair().unwrap();
            let alice = Id52::from_bytes([4; 32]);
            let eve = Id52::from_bytes([5; 32]);
            let id = park(alice, Conn::Unix(a)).unwrap();
            assert!(claim(&eve, id).is_none(), "another peer claimed it");
            assert!(claim(&alice, id + 1_000_000).is_none());
            assert!(claim(&alice, id).is_some());
            assert!(claim(&alice, id).is_none(), "claimed twice");
        });
    }

    /// One peer's listeners cannot fill the server-wide queue of parked connections.
    #[test]
    fn parked_connections_are_capped_per_peer() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mallory = Id52::from_bytes([8; 32]);
            let bob = Id52::from_bytes([9; 32]);
            let mut ids = vec![];
            let mut keep = vec![];
            for _ in 0..MAX_PENDING_PER_PEER {
                let (a, b) = UnixStream::pair().unwrap();
                keep.push(b);
                ids.push(park(mallory, Conn::Unix(a)).expect("under the cap"));
            }
            let (a, _b) = UnixStream::pair().unwrap();
            assert!(
                park(mallory, Conn::Unix(a)).is_none(),
                "over the per-peer cap"
            );
            // Allowed twin: another peer still parks.
            let (a, _c) = UnixStream::pair().unwrap();
            let id = park(bob, Conn::Unix(a)).expect("bob was starved");
            assert!(claim(&bob, id).is_some());
            for id in ids {
                assert!(claim(&mallory, id).is_some());
            }
        });
    }

    #[test]
    fn agent_socket_env_is_honoured_only_for_its_owner() {
        let alice = Id52::from_bytes([6; 32]);
        let path = "/tmp/malai-agent-test/agent.sock".to_string();
        lock(&AGENTS)
            .get_or_insert_with(HashMap::new)
            .insert(path.clone(), alice);
        let _reg = AgentRegistration(path.clone());
        let env = vec![("SSH_AUTH_SOCK".to_string(), path.clone())];
        assert_eq!(agent_socket_for(&alice.to_string(), &env), Some(path));
        let eve = Id52::from_bytes([7; 32]);
        assert_eq!(agent_socket_for(&eve.to_string(), &env), None);
        let other = vec![("SSH_AUTH_SOCK".to_string(), "/tmp/x".to_string())];
        assert_eq!(agent_socket_for(&alice.to_string(), &other), None);
    }
}
