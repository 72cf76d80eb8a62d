//! One request on one stream: read the header, ask the ACL, answer, dispatch.
//!
//! This is the single choke point: no request kind reaches its handler without
//! `acl::decide` having returned `Allow` for the verified peer. Generic over the stream so
//! iroh bi-streams and stdinserver's fds share it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::process::Program;
use super::{ClusterState, PeerPermit};
use crate::acl::{self, Decision, Grant};
use crate::audit;
use crate::config::ClusterConfig;
use crate::id52::Id52;
use crate::protocol::{self, FrameError, HEADER_TIMEOUT, Header, Request, Response};
use crate::transport::iroh::PeerConnection;

/// Who is asking, over what.
pub struct Context {
    pub state: Arc<ClusterState>,
    /// The verified peer id (iroh: TLS-verified; stdinserver: fixed by the admin).
    pub peer: Id52,
    /// For logs: "iroh" or "stdinserver".
    pub transport: &'static str,
    /// The iroh connection the request came on (`None` on stdinserver): a resumable
    /// session asks it why its stream broke (`server::resume::serve_stream`).
    pub conn: Option<PeerConnection>,
}

/// Serve one request. Returns `true` when it ended cleanly (the caller then lets the
/// stream finish normally), `false` when it broke (the caller resets the stream).
///
/// The phases, in order: admit the peer (a per-peer cap), read the header, check it is for
/// this cluster, then [`authorize`] — the choke point — and only with its grant
/// [`serve_allowed`]. Each early phase ends the stream itself when it refuses.
pub async fn handle<R, W>(ctx: &Context, r: &mut R, w: &mut W) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Some(_permit) = admit(ctx, w).await else {
        return true;
    };
    let header = match read_request(ctx, r, w).await {
        Ok(h) => h,
        Err(ending) => return ending.is_clean(),
    };
    let cfg = ctx.state.current();
    if !same_cluster(ctx, &cfg, &header, w).await {
        return true;
    }
    let server = ctx.state.server_name(&cfg).unwrap_or_default();
    let (request, resumed) = match header.request {
        Request::Resume(resume) => match claim(ctx, &cfg, &resume, w).await {
            // Its client process is gone: end it (no right is needed to end one's own).
            Some(res) if resume.close => return close_session(ctx, &cfg, res, w).await,
            Some(res) => (res.slot.request.clone(), Some(res)),
            None => return true,
        },
        request => (request, None),
    };
    let mut entry = audit_entry(ctx, &cfg, &request);
    let started = std::time::Instant::now();
    let deny_label = if resumed.is_some() {
        "resume-denied"
    } else {
        "deny"
    };
    let Some(grant) = authorize(ctx, &cfg, &server, &request, &mut entry, w, deny_label).await
    else {
        // Revoked while detached: the session ends with the refusal.
        if let Some(res) = resumed {
            tracing::warn!(peer = %ctx.peer, session = %res.slot.id.get(..8).unwrap_or_default(), "access revoked while detached: the session is ended");
            ctx.state.detached.end_revoked(&res.slot);
        }
        return true;
    };
    let decision = if let Some(res) = &resumed {
        entry.decision = "resumed".into();
        entry.detail = format!("session {}", res.slot.id.get(..8).unwrap_or_default());
        audit::write(&entry);
        "resumed"
    } else {
        "allow"
    };
    let allowed = Allowed {
        grant,
        request,
        resumed,
    };
    let served = serve_allowed(ctx, &cfg, &server, allowed, r, w).await;
    entry.decision = decision.into();
    entry.bytes_in = served.bytes_in;
    entry.bytes_out = served.bytes_out;
    entry.duration_ms = started.elapsed().as_millis() as u64;
    entry.outcome = if served.ok { "ok" } else { "broken" }.into();
    // Allowed pings are liveness probes (one per client connection), not access: only
    // their denials are worth an audit line.
    if entry.kind != "ping" {
        audit::write(&entry);
    }
    served.ok
}

/// How a stream that ended early should be finished by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Answered (or closed by the peer): finish the stream normally.
    Clean,
    /// Broken off: reset the stream.
    Broken,
}

impl Ending {
    fn is_clean(self) -> bool {
        self == Ending::Clean
    }
}

/// The per-peer cap on concurrent requests; over it, the peer is told why. The permit is
/// held for the whole request.
async fn admit<W: AsyncWrite + Unpin>(ctx: &Context, w: &mut W) -> Option<PeerPermit> {
    let peer = ctx.peer;
    let cluster = &ctx.state.dir.alias;
    let permit = ctx.state.admit(peer);
    if permit.is_none() {
        tracing::warn!(%peer, %cluster, "too many concurrent requests from this peer; refused");
        let reason = "too many concurrent requests from this machine; try again when some finish";
        let _ = reply(
            w,
            &Response::Error {
                reason: reason.into(),
            },
        )
        .await;
    }
    permit
}

/// The request header, within [`HEADER_TIMEOUT`]: a peer that sends nothing loses its
/// stream, a malformed header is answered with the reason.
async fn read_request<R, W>(ctx: &Context, r: &mut R, w: &mut W) -> Result<Header, Ending>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let peer = ctx.peer;
    let cluster = &ctx.state.dir.alias;
    match tokio::time::timeout(HEADER_TIMEOUT, protocol::read_header(r)).await {
        Err(_) => {
            tracing::info!(%peer, %cluster, "no complete header in time; dropping stream");
            Err(Ending::Broken)
        }
        Ok(Err(FrameError::Truncated)) => Err(Ending::Clean),
        Ok(Err(e)) => {
            tracing::info!(%peer, %cluster, error = %e, "bad header");
            let _ = reply(
                w,
                &Response::Error {
                    reason: e.to_string(),
                },
            )
            .await;
            Err(Ending::Clean)
        }
        Ok(Ok(h)) => Ok(h),
    }
}

/// Whether the header's cluster (when it names one) is this server's; if not, the peer is
/// told which cluster it reached.
async fn same_cluster<W: AsyncWrite + Unpin>(
    ctx: &Context,
    cfg: &ClusterConfig,
    header: &Header,
    w: &mut W,
) -> bool {
    let Some(c) = header.cluster else {
        return true;
    };
    if c == cfg.manager {
        return true;
    }
    let reason = format!(
        "this server is in cluster {} (manager {}), not the one asked for ({})",
        ctx.state.dir.alias,
        cfg.manager.short(),
        c.short()
    );
    let _ = reply(w, &Response::Error { reason }).await;
    false
}

/// The audit line of a request, filled in before the decision; the decision and outcome
/// are added as they become known.
fn audit_entry(ctx: &Context, cfg: &ClusterConfig, request: &Request) -> audit::Entry {
    let detail = match request {
        Request::Exec(e) => e.command.clone().unwrap_or_else(|| "(login shell)".into()),
        Request::Http { service } => service.clone(),
        Request::Forward { to, .. } => to.describe().chars().take(300).collect(),
        Request::RemoteForward { listen, .. } => super::forward::describe_listen(listen),
        Request::RemoteConnection { id, .. } => id.to_string(),
        _ => String::new(),
    };
    audit::Entry {
        time: audit::now_rfc3339(),
        peer: ctx.peer.to_string(),
        alias: peer_name(cfg, &ctx.peer),
        cluster: ctx.state.dir.alias.clone(),
        transport: ctx.transport.into(),
        kind: request.kind().into(),
        detail,
        ..Default::default()
    }
}

/// The peer's machine name for logs, `-` for a peer the file does not name.
fn peer_name(cfg: &ClusterConfig, peer: &Id52) -> String {
    cfg.name_of(peer)
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| "-".into())
}

/// What [`authorize`] allowed: the grant, the request, and for a resume the session taken.
struct Allowed {
    grant: Grant,
    request: Request,
    resumed: Option<Resumed>,
}

/// A `resume` whose session this peer may take (`server::resume`): the session, its state
/// and the peer's count. The ACL is asked next, as for the request that opened it.
pub struct Resumed {
    pub slot: Arc<super::resume::Slot>,
    pub parked: super::resume::Parked,
    pub peer_received: u64,
}

/// A `resume` with `close`: the session's client process is gone, and another process of
/// the same machine asks to end it. Audited as `closed`; answered `accept`.
async fn close_session<W: AsyncWrite + Unpin>(
    ctx: &Context,
    cfg: &ClusterConfig,
    res: Resumed,
    w: &mut W,
) -> bool {
    let short = res.slot.id.chars().take(8).collect::<String>();
    tracing::info!(peer = %ctx.peer, session = %short, "the client's machine asked to end its session (its process is gone)");
    ctx.state.detached.end(&res.slot);
    drop(res.parked);
    let mut entry = audit_entry(ctx, cfg, &res.slot.request);
    entry.detail = format!("session {short}");
    entry.decision = "closed".into();
    audit::write(&entry);
    reply(w, &Response::Accept).await.is_ok()
}

/// Take the session a `resume` names, if it is this peer's and the secret matches;
/// otherwise audit `resume-denied` and refuse (the peer learns only "unknown session").
async fn claim<W: AsyncWrite + Unpin>(
    ctx: &Context,
    cfg: &ClusterConfig,
    resume: &protocol::resume::Resume,
    w: &mut W,
) -> Option<Resumed> {
    let peer = ctx.peer;
    let short = resume.session.chars().take(8).collect::<String>();
    match ctx.state.detached.claim(resume, peer).await {
        Ok((slot, parked)) => Some(Resumed {
            slot,
            parked,
            peer_received: resume.received,
        }),
        Err(why) => {
            tracing::warn!(%peer, session = %short, reason = %why, "resume denied");
            let mut entry = audit_entry(
                ctx,
                cfg,
                &Request::Tunnel {
                    port: None,
                    resume: true,
                },
            );
            entry.detail = format!("session {short}");
            entry.decision = "resume-denied".into();
            entry.reason = why.to_string();
            audit::write(&entry);
            let _ = reply(
                w,
                &Response::Deny {
                    reason: why.public().into(),
                },
            )
            .await;
            None
        }
    }
}

/// THE choke point: `acl::decide` for the verified peer. A denial is logged, audited (as
/// `deny_label`: `deny`, or `resume-denied` for a resume) and answered here; only an
/// `Allow` yields the grant that [`dispatch`] needs.
async fn authorize<W: AsyncWrite + Unpin>(
    ctx: &Context,
    cfg: &ClusterConfig,
    server: &str,
    request: &Request,
    entry: &mut audit::Entry,
    w: &mut W,
    deny_label: &str,
) -> Option<Grant> {
    let peer = ctx.peer;
    let who = &entry.alias;
    let cluster = &entry.cluster;
    let kind = request.kind();
    let grant = match acl::decide(cfg, server, &peer, &acl_request(request)) {
        Decision::Deny(reason) => {
            tracing::warn!(%peer, %who, %cluster, kind, transport = ctx.transport, %reason, "deny");
            entry.decision = deny_label.into();
            entry.reason = reason.to_string();
            audit::write(entry);
            let _ = reply(
                w,
                &Response::Deny {
                    reason: reason.to_string(),
                },
            )
            .await;
            return None;
        }
        Decision::Allow(g) => g,
    };
    // The grant's kind only: a command's arguments (which may hold anything) belong in the
    // 0600 audit log, not in the tracing log.
    let granted = match &grant {
        Grant::Argv(argv) => format!(
            "argv[0]={:?}",
            argv.first().map(String::as_str).unwrap_or("")
        ),
        g => format!("{g:?}"),
    };
    tracing::info!(%peer, %who, %cluster, kind, transport = ctx.transport, %granted, "allow");
    Some(grant)
}

/// What an allowed request did, for its audit line.
struct Served {
    /// Whether it ended cleanly and was not cut by a revocation.
    ok: bool,
    bytes_in: u64,
    bytes_out: u64,
}

/// Runs an allowed request while watching for its revocation: live requests are re-decided
/// on every reload and cut when now denied (revoke.rs).
async fn serve_allowed<R, W>(
    ctx: &Context,
    cfg: &ClusterConfig,
    server: &str,
    allowed: Allowed,
    r: &mut R,
    w: &mut W,
) -> Served
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut r = Counting::new(r);
    let mut w = Counting::new(w);
    let cut = tokio_util::sync::CancellationToken::new();
    let done = tokio_util::sync::CancellationToken::new();
    let watch = super::revoke::revoked(
        ctx.state.clone(),
        server.to_string(),
        ctx.peer,
        allowed.request.clone(),
    );
    let watcher = async {
        tokio::select! {
            _ = done.cancelled() => {}
            _ = watch => cut.cancel(),
        }
    };
    let served = async {
        let mut r = super::revoke::Revocable::new(&mut r, &cut);
        let mut w = super::revoke::Revocable::new(&mut w, &cut);
        let ok = dispatch(ctx, cfg, server, allowed, &mut r, &mut w).await;
        done.cancel();
        ok
    };
    let (ok, ()) = tokio::join!(served, watcher);
    Served {
        ok: ok && !cut.is_cancelled(),
        bytes_in: r.count,
        bytes_out: w.count,
    }
}

/// What the ACL is asked for a request: the one mapping, shared by the choke point and
/// by revocation's re-check of live requests (`revoke`).
pub(super) fn acl_request(request: &Request) -> acl::Request<'_> {
    match request {
        Request::Tunnel { .. } => acl::Request::Tunnel,
        Request::Exec(e) => acl::Request::Exec {
            command: e.command.as_deref(),
        },
        Request::Http { service } => acl::Request::Http { service },
        Request::ConfigPush { .. } => acl::Request::ConfigPush,
        Request::ConfigHash => acl::Request::ConfigHash,
        Request::Ping => acl::Request::Ping,
        Request::Forward { to, .. } => acl::Request::Forward {
            kind: super::forward::kind_of(to),
        },
        Request::RemoteForward { listen, .. } => acl::Request::Forward {
            kind: super::forward::remote_kind_of(listen),
        },
        // Claiming a connection of one's own remote forward: asked again, so a peer whose
        // access was just revoked gets nothing more.
        Request::RemoteConnection { .. } => acl::Request::Forward {
            kind: acl::ForwardKind::Remote,
        },
        // `handle` decides a resume as the request that opened its session (a tunnel or an
        // exec) before it reaches the choke point; this arm is never asked.
        Request::Resume(_) => acl::Request::Tunnel,
    }
}

/// Run an allowed request. Only [`serve_allowed`] calls this, with the grant [`authorize`]
/// returned.
async fn dispatch<R, W>(
    ctx: &Context,
    cfg: &ClusterConfig,
    server: &str,
    allowed: Allowed,
    r: &mut R,
    w: &mut W,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Allowed {
        grant,
        request,
        resumed,
    } = allowed;
    if let Some(res) = resumed {
        let parked = res.parked;
        let grant = res.slot.grant(parked.stream.received());
        if reply(w, &Response::AcceptResumable(grant)).await.is_err() {
            // Lost again at once: park it for the next try.
            ctx.state.detached.park(&res.slot, parked);
            return false;
        }
        return super::resume::serve(ctx, &res.slot, parked, res.peer_received, r, w).await;
    }
    match (grant, request) {
        (Grant::Tunnel, Request::Tunnel { resume, .. }) => match cfg.servers.get(server) {
            Some(entry) => super::tunnel::serve(ctx, server, &entry.ssh, resume, r, w).await,
            None => true,
        },
        (Grant::Shell, Request::Exec(e)) => {
            let program = Program::Shell(e.command.clone());
            super::exec::serve(ctx, server, program, e, r, w).await
        }
        (Grant::Argv(argv), Request::Exec(e)) => {
            super::exec::serve(ctx, server, Program::Argv(argv), e, r, w).await
        }
        (Grant::Ping, Request::Ping) => {
            let info = protocol::PingInfo {
                boot: protocol::boot_id().to_string(),
            };
            reply(w, &Response::Accept).await.is_ok()
                && protocol::write_frame(w, &info).await.is_ok()
        }
        (Grant::Http { port }, Request::Http { service }) => {
            super::http::serve(&service, port, r, w).await
        }
        (Grant::ConfigPush, Request::ConfigPush { hash }) => {
            super::config_sync::serve_push(ctx, hash, r, w).await
        }
        (Grant::ConfigHash, Request::ConfigHash) => super::config_sync::serve_hash(ctx, r, w).await,
        (Grant::Forward, Request::Forward { to, resume }) => {
            super::forward::serve(ctx, server, &to, resume, r, w).await
        }
        (Grant::Forward, Request::RemoteForward { listen, resume }) => {
            super::forward::serve_remote(ctx, server, &listen, resume, r, w).await
        }
        (Grant::Forward, Request::RemoteConnection { id, resume }) => {
            super::forward::serve_claim(ctx, server, id, resume, r, w).await
        }
        (_, request) => {
            let reason = format!("{} is not supported by this server yet", request.kind());
            let _ = reply(w, &Response::Error { reason }).await;
            true
        }
    }
}

/// Counts bytes through a stream half, for the audit log.
pub struct Counting<'a, T: ?Sized> {
    inner: &'a mut T,
    pub count: u64,
}

impl<'a, T: ?Sized> Counting<'a, T> {
    pub fn new(inner: &'a mut T) -> Self {
        Counting { inner, count: 0 }
    }
}

impl<T: AsyncRead + Unpin + ?Sized> AsyncRead for Counting<'_, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut *this.inner).poll_read(cx, buf);
        this.count += (buf.filled().len() - before) as u64;
        r
    }
}

impl<T: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counting<'_, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut *this.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &r {
            this.count += *n as u64;
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Send a response frame.
pub async fn reply<W: AsyncWrite + Unpin>(w: &mut W, resp: &Response) -> Result<(), FrameError> {
    protocol::write_frame(w, resp).await?;
    w.flush().await?;
    Ok(())
}
