//! The agent's HTTP forward proxy (`HTTP_PROXY=http://127.0.0.1:<port>`).
//!
//! hyper parses every request; nothing here reads HTTP by hand. Per request:
//!
//! - Host `<service>.<server>.<cluster>` (any of the name forms): a cluster service. The
//!   agent opens an `http` request over its pooled connection to that server, whose ACL
//!   decides; after `accept` the stream is raw bytes to `127.0.0.1:<port>` on the server.
//!   Plain requests are re-sent over it in origin form by hyper's client; `CONNECT` gets
//!   `200` and then the stream is pumped as is (the port in `CONNECT host:port` is
//!   ignored: the server's `[server.X.service.Y] http` decides). Denied → `403`, unknown
//!   service → `404`, server unreachable or service down → `502`, each with a one-line
//!   reason as the body.
//! - Any other host: proxied directly like an ordinary forward proxy, so a global
//!   `HTTP_PROXY` breaks nothing. A name inside a local cluster's namespace that does not
//!   resolve (`nosuch.foo.acme`, `foo.acme`) is a `404`, never sent to the internet.
//!
//! The proxy listens on 127.0.0.1, which every local user can reach, so each client
//! connection's owner is looked up (`/proc/net/tcp`, like identd) and anyone but the
//! agent's own user gets `403`: the socket's 0700 directory protects the agent's keys, and
//! this protects the same keys behind the proxy.
//!
//! Hop-by-hop headers are dropped both ways (RFC 9110 §7.6.1). Each request gets its own
//! upstream connection (stream); keep-alive is between the HTTP client and the agent.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;

use crate::config::names::{self, TargetKind};
use crate::config::{ClusterConfig, ResolveError};
use crate::keyholder::serve::HolderContext;
use crate::session::{LocalClusters, Resolved, SessionError};
use crate::transport::pump;

type Body = BoxBody<Bytes, hyper::Error>;

/// Connecting to a non-cluster host.
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long open client connections get to finish when the agent stops.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// HTTP client connections served at once; more wait in the kernel's backlog.
const MAX_CLIENTS: usize = 512;

/// Accept HTTP clients until shutdown.
pub async fn serve(listener: TcpListener, ctx: Arc<HolderContext>, tracker: TaskTracker) {
    let shutdown = ctx.shutdown.clone();
    let t = tracker.clone();
    crate::keyholder::accept::serve(
        listener,
        "HTTP proxy",
        MAX_CLIENTS,
        shutdown,
        tracker,
        move |(tcp, peer): (TcpStream, std::net::SocketAddr)| {
            let _ = tcp.set_nodelay(true);
            client_connection(tcp, peer, ctx.clone(), t.clone())
        },
    )
    .await
}

async fn client_connection(
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    ctx: Arc<HolderContext>,
    tracker: TaskTracker,
) {
    // 127.0.0.1 is every local user's: only the agent's own user may spend its keys.
    let me = nix::unistd::geteuid().as_raw();
    let owner = tcp
        .local_addr()
        .ok()
        .and_then(|l| loopback_peer_uid(l, peer));
    let foreign = match owner {
        Some(uid) if uid == me => None,
        Some(uid) => Some(format!("this proxy belongs to uid {me}; you are uid {uid}")),
        None => Some("cannot tell which user is connecting; refused".to_string()),
    };
    if let Some(reason) = &foreign {
        tracing::warn!(%peer, %reason, "HTTP proxy client refused");
    }
    let svc_ctx = ctx.clone();
    let svc_tracker = tracker.clone();
    let service = hyper::service::service_fn(move |req| {
        let ctx = svc_ctx.clone();
        let tracker = svc_tracker.clone();
        let foreign = foreign.clone();
        async move {
            Ok::<_, Infallible>(match foreign {
                Some(reason) => text(StatusCode::FORBIDDEN, &reason),
                None => handle(ctx, tracker, req).await,
            })
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "HTTP client connection ended");
            }
        }
        _ = ctx.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

/// The uid owning the client end of a loopback TCP connection, from `/proc/net/tcp{,6}`
/// (the client's socket has `local = peer`, `remote = local`), the way identd answers.
fn loopback_peer_uid(local: std::net::SocketAddr, peer: std::net::SocketAddr) -> Option<u32> {
    let want = (proc_addr(peer)?, proc_addr(local)?);
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(l), Some(r), Some(uid)) = (f.get(1), f.get(2), f.get(7))
                && l.eq_ignore_ascii_case(&want.0)
                && r.eq_ignore_ascii_case(&want.1)
            {
                return uid.parse().ok();
            }
        }
    }
    None
}

/// An address as `/proc/net/tcp*` prints it: the address bytes as native-endian 32-bit
/// words in hex, then the port in hex. Only the family of the table it is looked up in
/// matches, so IPv4 and IPv6 never mix.
fn proc_addr(a: std::net::SocketAddr) -> Option<String> {
    let words: Vec<u32> = match a.ip() {
        std::net::IpAddr::V4(ip) => vec![u32::from_ne_bytes(ip.octets())],
        std::net::IpAddr::V6(ip) => ip
            .octets()
            .chunks_exact(4)
            .map(|c| u32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
    };
    let mut s: String = words.iter().map(|w| format!("{w:08X}")).collect();
    s.push_str(&format!(":{:04X}", a.port()));
    Some(s)
}

/// A short response with a one-line text body.
fn text(status: StatusCode, line: &str) -> Response<Body> {
    let mut body = line.replace(['\r', '\n'], " ");
    body.push('\n');
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

/// Where a host name sends a request.
enum Route {
    /// A service of a cluster server.
    Service {
        resolved: Box<Resolved>,
        service: String,
    },
    /// In a local cluster's namespace, but nothing to serve: 404 with this line.
    NotFound(String),
    /// Not a cluster name: the internet (or the LAN), directly.
    Direct,
}

/// Classify `host` against the local clusters (re-read each time, so clusters and
/// services added later are seen at once).
fn route(ctx: &HolderContext, host: &str) -> Route {
    let clusters = match LocalClusters::load(&ctx.dirs) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "reading clusters failed; proxying directly");
            return Route::Direct;
        }
    };
    classify(clusters.names(), host, |target| clusters.resolved(target))
}

/// The pure part of [`route`].
fn classify(
    clusters: &[(String, ClusterConfig)],
    host: &str,
    lookup: impl FnOnce(&names::Target) -> Option<Resolved>,
) -> Route {
    match names::resolve(clusters, host) {
        Ok(target) => match &target.kind {
            TargetKind::Service { service, .. } => {
                let service = service.clone();
                match lookup(&target) {
                    Some(resolved) => Route::Service {
                        resolved: Box::new(resolved),
                        service,
                    },
                    None => Route::NotFound(format!("unknown host {host:?}")),
                }
            }
            TargetKind::Server { server } => Route::NotFound(format!(
                "{host} is the server {server}, not an HTTP service: use <service>.{host}"
            )),
            TargetKind::Group { group } => {
                Route::NotFound(format!("{host} is the group {group}, not an HTTP service"))
            }
        },
        Err(
            ResolveError::Unknown(_)
            | ResolveError::NoClusters(_)
            | ResolveError::UnknownCluster { .. }
            | ResolveError::NotFound { .. },
        ) => Route::Direct,
        Err(e) => Route::NotFound(e.to_string()),
    }
}

/// The host a request is for: the URI's (absolute form, CONNECT) or the Host header's.
fn target_host(req: &Request<Incoming>) -> Option<(String, Option<u16>)> {
    if let Some(a) = req.uri().authority() {
        return Some((a.host().to_string(), a.port_u16()));
    }
    let h = req.headers().get(header::HOST)?.to_str().ok()?;
    let a: hyper::http::uri::Authority = h.parse().ok()?;
    Some((a.host().to_string(), a.port_u16()))
}

async fn handle(
    ctx: Arc<HolderContext>,
    tracker: TaskTracker,
    req: Request<Incoming>,
) -> Response<Body> {
    let Some((host, port)) = target_host(&req) else {
        return text(
            StatusCode::BAD_REQUEST,
            "no host in the request (this is a proxy: use an absolute URL)",
        );
    };
    let connect = req.method() == Method::CONNECT;
    match route(&ctx, &host) {
        Route::NotFound(line) => text(StatusCode::NOT_FOUND, &line),
        Route::Service { resolved, service } => {
            let stream = match open_service(&ctx, &resolved, &service).await {
                Ok(s) => s,
                Err(resp) => return resp,
            };
            tracing::info!(%host, %service, connect, "HTTP over the cluster");
            if connect {
                tunnel(&ctx, tracker, req, stream)
            } else {
                forward(tracker, req, stream).await
            }
        }
        Route::Direct => {
            let port = port.unwrap_or(if connect { 443 } else { 80 });
            // `host` keeps an IPv6 literal's brackets, which `host:port` parsing needs.
            let addr = format!("{host}:{port}");
            let targets = match resolve_direct(&addr, ctx.http).await {
                Ok(t) => t,
                Err(DirectRefusal::Loop) => {
                    // Asked for ourselves (the proxy used as a web server, under any
                    // spelling: `127.1`, `localhost`, `[::ffff:127.0.0.1]`): forwarding would
                    // loop back into this proxy forever.
                    return text(
                        StatusCode::BAD_REQUEST,
                        "this is malai's HTTP proxy: set it as HTTP_PROXY, don't ask it for pages",
                    );
                }
                Err(DirectRefusal::Resolve(e)) => {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        &format!("cannot resolve {addr}: {e}"),
                    );
                }
            };
            // Connect to the addresses just checked, not to a fresh lookup of the name.
            let tcp = match tokio::time::timeout(
                DIRECT_CONNECT_TIMEOUT,
                TcpStream::connect(&targets[..]),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    return text(
                        StatusCode::BAD_GATEWAY,
                        &format!("cannot connect to {addr}: {e}"),
                    );
                }
                Err(_) => {
                    return text(
                        StatusCode::GATEWAY_TIMEOUT,
                        &format!("connecting to {addr} timed out"),
                    );
                }
            };
            let _ = tcp.set_nodelay(true);
            if connect {
                tunnel(&ctx, tracker, req, tcp)
            } else {
                forward(tracker, req, tcp).await
            }
        }
    }
}

/// Why a direct request is not connected.
#[derive(Debug)]
enum DirectRefusal {
    /// It resolves to this proxy's own address.
    Loop,
    Resolve(std::io::Error),
}

/// Resolve `host:port` and refuse it when any address is this proxy's own (`me`), decided
/// on the resolved socket address, so no spelling of the name gets past (issue 19,
/// finding 9).
async fn resolve_direct(
    addr: &str,
    me: Option<std::net::SocketAddr>,
) -> Result<Vec<std::net::SocketAddr>, DirectRefusal> {
    let found: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(DirectRefusal::Resolve)?
        .collect();
    if found.is_empty() {
        return Err(DirectRefusal::Resolve(std::io::Error::other("no address")));
    }
    match me {
        Some(me) if found.iter().any(|a| is_self(*a, me)) => Err(DirectRefusal::Loop),
        _ => Ok(found),
    }
}

/// Whether a connection to `to` would reach the proxy listening on `me`.
fn is_self(to: std::net::SocketAddr, me: std::net::SocketAddr) -> bool {
    if to.port() != me.port() {
        return false;
    }
    let ip = to.ip().to_canonical();
    ip == me.ip().to_canonical()
        || ip.is_loopback()
        || ip.is_unspecified()
        || me.ip().is_unspecified()
}

/// Open the `http` request to the service's server; an error is the response to send.
async fn open_service(
    ctx: &HolderContext,
    resolved: &Resolved,
    service: &str,
) -> Result<crate::keyholder::pool::PooledStream, Response<Body>> {
    let Some(server) = resolved.server().cloned() else {
        return Err(text(
            StatusCode::NOT_FOUND,
            "server vanished from the cluster file",
        ));
    };
    let request = crate::protocol::Request::Http {
        service: service.to_string(),
    };
    match ctx.pool.open(resolved, &server, request).await {
        Ok(s) => Ok(s),
        Err(SessionError::Denied(reason)) => {
            // The server's own file may lack a service our copy has.
            let status = if reason.starts_with("unknown service") {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::FORBIDDEN
            };
            Err(text(status, &reason))
        }
        Err(e) => Err(text(StatusCode::BAD_GATEWAY, &e.to_string())),
    }
}

/// `CONNECT`: answer 200, then pump the upgraded client connection and `upstream` (until
/// both ends close, or the agent stops).
fn tunnel<S>(
    ctx: &HolderContext,
    tracker: TaskTracker,
    req: Request<Incoming>,
    mut upstream: S,
) -> Response<Body>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let shutdown = ctx.shutdown.clone();
    tracker.spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        let client = TokioIo::new(upgraded);
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut ur, mut uw) = tokio::io::split(&mut upstream);
        tokio::select! {
            r = pump::both_ways(&mut cr, &mut uw, &mut ur, &mut cw) => match r {
                Ok(m) => tracing::debug!(up = m.up, down = m.down, "CONNECT tunnel done"),
                Err(e) => tracing::debug!(error = %e, "CONNECT tunnel broke"),
            },
            _ = shutdown.cancelled() => tracing::debug!("CONNECT tunnel cut: agent stopping"),
        }
    });
    empty(StatusCode::OK)
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1), plus those the
/// `Connection` header names.
fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "proxy-connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

/// A plain request: re-send it in origin form over `upstream` with hyper's client and
/// stream the answer back.
async fn forward<S>(tracker: TaskTracker, req: Request<Incoming>, upstream: S) -> Response<Body>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) =
        match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
            Ok(p) => p,
            Err(e) => return text(StatusCode::BAD_GATEWAY, &format!("upstream: {e}")),
        };
    // The connection task ends when the response body is done and `sender` is gone.
    tracker.spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream HTTP connection ended");
        }
    });
    let (mut parts, body) = req.into_parts();
    let host_header = parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    let origin = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = match origin.parse::<Uri>() {
        Ok(u) => u,
        Err(_) => return text(StatusCode::BAD_REQUEST, "bad request path"),
    };
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST)
        && let Some(h) = host_header
    {
        parts.headers.insert(header::HOST, h);
    }
    match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => text(StatusCode::BAD_GATEWAY, &format!("upstream: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id52::Id52;

    fn id(n: u8) -> Id52 {
        Id52::from_bytes([n; 32])
    }

    fn clusters() -> Vec<(String, ClusterConfig)> {
        let text = format!(
            "[cluster-manager]\nid52 = \"{}\"\n\
             [server.foo]\nid52 = \"{}\"\n[server.foo.service.web]\nhttp = 8000\n\
             [device.alice]\nid52 = \"{}\"\n[group.admins]\nmembers = \"alice\"\n",
            id(1),
            id(2),
            id(3)
        );
        vec![("acme".into(), ClusterConfig::parse(&text).unwrap())]
    }

    fn kind(host: &str) -> String {
        match classify(&clusters(), host, |_| None) {
            Route::Service { .. } => "service".into(),
            Route::NotFound(l) => format!("404: {l}"),
            Route::Direct => "direct".into(),
        }
    }

    #[test]
    fn cluster_names_never_leak_to_the_internet() {
        // Found service; the lookup returning nothing is reported, not proxied out.
        assert!(kind("web.foo.acme").starts_with("404"));
        let mut found = false;
        let _ = classify(&clusters(), &format!("web.{}.{}", id(2), id(1)), |_| {
            found = true;
            None
        });
        assert!(found, "all three name forms resolve");
        for h in [
            "nosuch.foo.acme",
            "foo.acme",
            "a.b.foo.acme",
            "web.alice.acme",
            "admins.acme",
        ] {
            assert!(kind(h).starts_with("404"), "{h}: {}", kind(h));
        }
        for h in [
            "example.com",
            "127.0.0.1",
            "localhost",
            "web.foo.other",
            "[::1]",
        ] {
            assert_eq!(kind(h), "direct", "{h}");
        }
    }

    #[tokio::test]
    async fn loopback_peers_are_known_by_uid() {
        let l = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let local = l.local_addr().unwrap();
        let _client = TcpStream::connect(local).await.unwrap();
        let (_server, peer) = l.accept().await.unwrap();
        assert_eq!(
            loopback_peer_uid(local, peer),
            Some(nix::unistd::geteuid().as_raw())
        );
        // A connection that does not exist has no owner.
        let nobody: std::net::SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(loopback_peer_uid(local, nobody), None);
    }

    #[test]
    fn proc_addr_matches_the_kernel_format() {
        let a: std::net::SocketAddr = "127.0.0.1:18080".parse().unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(proc_addr(a).unwrap(), "0100007F:46A0");
        }
        let v6: std::net::SocketAddr = "[::1]:80".parse().unwrap();
        assert_eq!(proc_addr(v6).unwrap().len(), 32 + 5);
    }

    #[tokio::test]
    async fn requests_for_the_proxy_itself_are_caught_under_any_spelling() {
        let me: std::net::SocketAddr = "127.0.0.1:3128".parse().unwrap();
        for h in [
            "127.0.0.1",
            "localhost",
            "LOCALHOST",
            "[::1]",
            "0.0.0.0",
            "127.0.0.2",
            // Spellings only the resolver knows (issue 19: 358 self-connections).
            "127.1",
            "2130706433",
            "0x7f.1",
            "[::ffff:127.0.0.1]",
        ] {
            let r = resolve_direct(&format!("{h}:3128"), Some(me)).await;
            assert!(matches!(r, Err(DirectRefusal::Loop)), "{h}: {r:?}");
        }
        // Allowed twins: another port on loopback, or no proxy address to compare.
        assert!(resolve_direct("127.1:80", Some(me)).await.is_ok());
        assert!(resolve_direct("127.0.0.1:3128", None).await.is_ok());
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-private"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("accept", HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("accept"));
    }
}
