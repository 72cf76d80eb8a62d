//! The iroh transport: endpoints, dialing, accepting, bi-streams.
//!
//! This is the only file that names iroh types; everything else sees [`Node`],
//! [`PeerConnection`], [`SendHalf`] and [`RecvHalf`]. ids cross this boundary as `Id52`
//! (BASE32_DNSSEC); iroh's own `PublicKey` (whose `Display` is hex and `to_z32` is
//! z-base-32) never leaks out.
//!
//! Relays (DESIGN §8): a cluster names its own relays in its file (`relays`, and
//! `relay-ca` for a private CA); every endpoint of that cluster uses them and every dial
//! gives them to iroh with the peer's id, so members find each other by id52 + relay alone
//! and a private cluster needs nothing from n0 (no public relay, no DNS address lookup).
//! A cluster that names none uses iroh's n0 preset (default relays + DNS address lookup).
//! `MALAI_RELAY=<url>` overrides the file; `MALAI_RELAY=disabled` means no relay, no
//! lookup, no port mapper: peers are reached through `addrs` hints only (an offline LAN).
//!
//! Binding: all interfaces on an ephemeral port unless told otherwise — `malai ssh server
//! --bind`, or `MALAI_BIND=<ip:port>` for every endpoint of the process (tests that must
//! stay on loopback say so there, never through a production default).

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use iroh::endpoint::{Connection, PortmapperConfig, RecvStream, SendStream, presets};
use iroh::{Endpoint, EndpointAddr, PublicKey, RelayMode, RelayUrl};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::id52::Id52;
use crate::id52::SecretKey;
use crate::protocol::ALPN;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("bad relay setting {0:?}: {1}")]
    Relay(String, String),
    #[error("bad relay CA ({0}): {1}")]
    RelayCa(String, String),
    #[error("bad MALAI_BIND {0:?}: expected ip:port")]
    BindSetting(String),
    #[error("cannot bind the iroh endpoint: {0}")]
    Bind(String),
    #[error("cannot connect to {peer}: {msg}")]
    Connect { peer: Id52, msg: String },
    #[error("connection to {peer} lost: {msg}")]
    Stream { peer: Id52, msg: String },
    #[error(
        "{peer} has no address: relays are disabled (MALAI_RELAY=disabled) and its entry has no `addrs` hint"
    )]
    NoAddress { peer: Id52 },
}

/// Which relays an endpoint uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayChoice {
    /// iroh's default relays and DNS address lookup (n0's public services).
    Default,
    /// No relay, no lookup, no port mapping: only `addrs` hints.
    Disabled,
    /// The cluster's own relays (or `MALAI_RELAY=<url>`): nothing of n0's is used.
    Custom(Vec<String>),
}

impl RelayChoice {
    /// `MALAI_RELAY`, when set: `default`, `disabled` (`off`, `none`), or a relay URL.
    pub fn from_env() -> Option<RelayChoice> {
        match std::env::var("MALAI_RELAY").as_deref() {
            Err(_) | Ok("") => None,
            Ok("default") => Some(RelayChoice::Default),
            Ok("disabled") | Ok("off") | Ok("none") => Some(RelayChoice::Disabled),
            Ok(url) => Some(RelayChoice::Custom(vec![url.to_string()])),
        }
    }
}

/// How one cluster's endpoints reach the network: its relays, the CA roots trusted for
/// them, and where to bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub relay: RelayChoice,
    /// Extra CA roots (PEM) for the relays' TLS, added to the built-in web PKI roots.
    pub relay_ca: Option<String>,
    /// `MALAI_BIND`: the UDP address of every endpoint this process binds.
    pub bind: Option<SocketAddr>,
}

impl NetConfig {
    /// The settings for a cluster whose file names `relays` and `relay_ca`, with the
    /// environment's overrides (`MALAI_RELAY`, `MALAI_RELAY_CA` (a PEM file), `MALAI_BIND`).
    pub fn for_cluster(
        relays: &[String],
        relay_ca: Option<&str>,
    ) -> Result<NetConfig, TransportError> {
        let relay = match RelayChoice::from_env() {
            Some(r) => r,
            None if relays.is_empty() => RelayChoice::Default,
            None => RelayChoice::Custom(relays.to_vec()),
        };
        let mut ca = relay_ca.map(str::to_string);
        if let Some(path) = std::env::var_os("MALAI_RELAY_CA").filter(|p| !p.is_empty()) {
            let pem = std::fs::read_to_string(&path).map_err(|e| {
                TransportError::RelayCa(
                    format!("MALAI_RELAY_CA={}", path.to_string_lossy()),
                    e.to_string(),
                )
            })?;
            ca = Some(match ca {
                Some(c) => format!("{c}\n{pem}"),
                None => pem,
            });
        }
        let bind = match std::env::var("MALAI_BIND").as_deref() {
            Err(_) | Ok("") => None,
            Ok(b) => Some(
                b.parse::<SocketAddr>()
                    .map_err(|_| TransportError::BindSetting(b.to_string()))?,
            ),
        };
        Ok(NetConfig {
            relay,
            relay_ca: ca,
            bind,
        })
    }

    /// No relays, bound to `bind` (benchmarks and tests on loopback).
    pub fn disabled(bind: Option<SocketAddr>) -> NetConfig {
        NetConfig {
            relay: RelayChoice::Disabled,
            relay_ca: None,
            bind,
        }
    }

    fn relay_urls(&self) -> Result<Vec<RelayUrl>, TransportError> {
        match &self.relay {
            RelayChoice::Custom(urls) => urls
                .iter()
                .map(|u| {
                    u.parse::<RelayUrl>()
                        .map_err(|e| TransportError::Relay(u.clone(), e.to_string()))
                })
                .collect(),
            _ => Ok(vec![]),
        }
    }

    pub(super) fn ca_roots(&self) -> Result<Vec<CertificateDer<'static>>, TransportError> {
        let Some(pem) = &self.relay_ca else {
            return Ok(vec![]);
        };
        let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TransportError::RelayCa("relay-ca".into(), e.to_string()))?;
        if certs.is_empty() {
            return Err(TransportError::RelayCa(
                "relay-ca".into(),
                "no certificate in the PEM text".into(),
            ));
        }
        Ok(certs)
    }
}

/// How long a connection may be silent before it is declared dead: the outage a session
/// rides out (Wi-Fi roaming, a router reboot, a laptop lid), as OpenSSH over TCP would.
/// `MALAI_IDLE_TIMEOUT` (seconds) changes it.
///
/// It is not how a *killed* server is noticed: a restarted server is found out by a fresh
/// probe handshake within about two seconds of being back (`client::liveness`); only a
/// server whose machine vanished (or a network that stays down) takes this long. (Until
/// issue 11 this was 3 s, and any outage over ~3 s killed every session.)
pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Keep-alive PINGs: a live peer acknowledges each, which the liveness watchdog counts.
pub const KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(1);
/// Streams one connection may have open at once (each is one request): a peer can't pin
/// unbounded server tasks through one connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

fn idle_timeout() -> std::time::Duration {
    std::env::var("MALAI_IDLE_TIMEOUT")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|s| (1..=3600).contains(s))
        .map(std::time::Duration::from_secs)
        .unwrap_or(DEFAULT_IDLE_TIMEOUT)
}

/// How much one stream may have in flight unacknowledged by the reader (QUIC flow-control
/// credit, MAX_STREAM_DATA): a stream moves at most this much per round trip. 2 MiB, up from
/// noq's 1.25 MB (issue 21, docs/benchmarks.md "Long links"): at 200 ms / 100 Mbit native
/// exec went from 4.4 to 6.1 MiB/s and scp through the ProxyCommand from 0.69× to 0.91× of
/// direct OpenSSH, whose own channel window is also 2 MiB. The resumable layer's replay
/// buffer (`protocol::resume::REPLAY_CAP`, 2 MiB) bounds a resumable session the same way.
///
/// Not more, because of noq-proto 1.4: a receiver that holds more than 1,024 separate spans
/// of one stream (data after a gap, waiting for a retransmission) closes the *connection*
/// ("too many gaps in stream buffer", `assembler.rs` `MAX_CHUNKS`). A queue that overflows
/// in slow start drops about every other packet, so a window of W leaves up to
/// W / (2 × ~1,150 bytes) spans: 2 MiB stays under 1,024 (≈ 910), 8 MiB does not — measured,
/// a 64 MiB exec at 200 ms with an 8 MiB window lost its connection 3 s in, every time. The
/// fix belongs upstream (docs/upstream/noq-proto-gap-limit.patch: the limit scaled with the
/// window). Credit, not allocation: a receiver buffers only what arrived and was not yet
/// read, so this costs an idle peer nothing.
pub const STREAM_RECEIVE_WINDOW: u64 = 2 * 1024 * 1024;
/// What all streams of one connection together may have unread at the receiver: noq's
/// default, unlimited, so at most 64 streams × the stream window (128 MiB) per connection.
/// A connection-wide limit below that would let a few streams whose readers stall (a
/// forwarded socket nobody reads) stop every other stream on the connection.
pub const CONNECTION_RECEIVE_WINDOW: u64 = (1 << 62) - 1;
/// What one connection may have sent and not yet acknowledged, plus queued: noq's default
/// (8 × its default stream window).
pub const SEND_WINDOW: u64 = 10_000_000;

/// The congestion controller new connections use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Congestion {
    Cubic,
    Bbr,
}

/// Flow control and congestion control of every connection (issue 21). The defaults are the
/// constants above (noq's own) and CUBIC with noq's initial window; `MALAI_QUIC_STREAM_WINDOW`,
/// `MALAI_QUIC_CONN_WINDOW`, `MALAI_QUIC_SEND_WINDOW`, `MALAI_QUIC_INITIAL_WINDOW` (bytes)
/// and `MALAI_QUIC_CC` (`cubic`, `bbr`) change them, for benchmarks (bench/wan.sh) that
/// compare choices with one build; a value that does not parse is ignored with a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Windows {
    stream_receive: u64,
    connection_receive: u64,
    send: u64,
    /// `None`: the controller's own default (14,720 bytes).
    initial: Option<u64>,
    congestion: Congestion,
}

impl Windows {
    fn from_env() -> Windows {
        fn bytes(name: &str, default: u64) -> u64 {
            match std::env::var(name) {
                Err(_) => default,
                Ok(v) => match v.parse::<u64>() {
                    Ok(n) if (1024..(1 << 62)).contains(&n) => n,
                    _ => {
                        tracing::warn!("ignoring {name}={v:?}: expected bytes (1024..2^62)");
                        default
                    }
                },
            }
        }
        let initial = std::env::var("MALAI_QUIC_INITIAL_WINDOW")
            .is_ok()
            .then(|| bytes("MALAI_QUIC_INITIAL_WINDOW", 14_720));
        let congestion = match std::env::var("MALAI_QUIC_CC").as_deref() {
            Err(_) | Ok("cubic") => Congestion::Cubic,
            Ok("bbr") => Congestion::Bbr,
            Ok(other) => {
                tracing::warn!("ignoring MALAI_QUIC_CC={other:?}: expected cubic or bbr");
                Congestion::Cubic
            }
        };
        Windows {
            stream_receive: bytes("MALAI_QUIC_STREAM_WINDOW", STREAM_RECEIVE_WINDOW),
            connection_receive: bytes("MALAI_QUIC_CONN_WINDOW", CONNECTION_RECEIVE_WINDOW),
            send: bytes("MALAI_QUIC_SEND_WINDOW", SEND_WINDOW),
            initial,
            congestion,
        }
    }
}

/// Direct paths keep iroh's own idle limit (15 s; relay paths 30 s). Tried and measured on
/// the namespace network: 2 s made a restarted server's stale direct path go away sooner,
/// but one 20 s outage in two left a connection with no path at all and a stalled scp; a
/// restarted server now comes back on its previous port instead (`server`), which keeps
/// peers' paths valid. Windows and congestion control: [`Windows`].
fn transport_config() -> iroh::endpoint::QuicTransportConfig {
    use iroh::endpoint::VarInt;
    let idle = idle_timeout();
    let w = Windows::from_env();
    let varint = |n: u64| VarInt::from_u64(n).unwrap_or(VarInt::MAX);
    let mut b = iroh::endpoint::QuicTransportConfig::builder()
        .keep_alive_interval(KEEP_ALIVE)
        .default_path_keep_alive_interval(KEEP_ALIVE)
        .max_concurrent_bidi_streams(MAX_STREAMS_PER_CONNECTION.into())
        .stream_receive_window(varint(w.stream_receive))
        .receive_window(varint(w.connection_receive))
        .send_window(w.send);
    b = match w.congestion {
        Congestion::Cubic if w.initial.is_none() => b,
        Congestion::Cubic => {
            let mut c = noq_proto::congestion::CubicConfig::default();
            c.initial_window(w.initial.unwrap_or(14_720));
            b.congestion_controller_factory(std::sync::Arc::new(c))
        }
        Congestion::Bbr => {
            let mut c = noq_proto::congestion::Bbr3Config::default();
            if let Some(i) = w.initial {
                c.initial_window(i);
            }
            b.congestion_controller_factory(std::sync::Arc::new(c))
        }
    };
    if let Ok(t) = iroh::endpoint::IdleTimeout::try_from(idle) {
        b = b.max_idle_timeout(Some(t));
    }
    b.build()
}

/// iroh's rustls provider (ring) with AES-128-GCM first. rustls lists AES-256-GCM first, so
/// two malai ends negotiate it and encrypt every QUIC packet with 14 AES rounds; with
/// AES-NI/VAES (most x86 since 2010, ARMv8 crypto extensions) AES-128-GCM does 10 for the
/// 128-bit level the X25519 key exchange gives anyway. ChaCha20 stays in the list (a CPU
/// without AES instructions, or an older peer, still finds a common suite), only the order
/// changes; the server follows the client's order. Measured in docs/benchmarks.md (issue 23).
fn crypto_provider() -> std::sync::Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    use tokio_rustls::rustls::CipherSuite;
    let mut p = (*iroh::tls::default_provider()).clone();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    std::sync::Arc::new(p)
}

/// Generate a new ed25519 secret.
pub fn generate_secret() -> SecretKey {
    SecretKey::from_bytes(iroh::SecretKey::generate().to_bytes())
}

/// The id52 of a secret key's public half.
pub fn public_id52(key: &SecretKey) -> Id52 {
    let sk = iroh::SecretKey::from_bytes(key.as_bytes());
    Id52::from_bytes(*sk.public().as_bytes())
}

fn to_public(id: &Id52) -> Result<PublicKey, TransportError> {
    PublicKey::from_bytes(id.as_bytes()).map_err(|e| TransportError::Connect {
        peer: *id,
        msg: format!("not a valid ed25519 key: {e}"),
    })
}

fn to_id52(pk: &PublicKey) -> Id52 {
    Id52::from_bytes(*pk.as_bytes())
}

/// A bound iroh endpoint with one identity (one cluster key).
#[derive(Debug, Clone)]
pub struct Node {
    endpoint: Endpoint,
    relay: RelayChoice,
    /// The cluster's relays, given to iroh with every dial (the peer's home relay is one
    /// of them: every member of the cluster uses the same list).
    relay_urls: Vec<RelayUrl>,
    /// The home-relay watcher ([`super::failover`]) of an endpoint with two or more relays:
    /// its shared state, and its task (stopped when the last clone of this node goes).
    failover: Option<(
        std::sync::Arc<super::failover::Shared>,
        std::sync::Arc<AbortOnDrop>,
    )>,
    /// The relay rejoiner ([`super::relay_rejoin`]) of an endpoint with the cluster's own
    /// relays: told of every timed-out connection and dial, and its task.
    rejoin: Option<(
        std::sync::Arc<super::relay_rejoin::Rejoin>,
        std::sync::Arc<AbortOnDrop>,
    )>,
}

/// A task aborted when dropped.
#[derive(Debug)]
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Node {
    /// Stop using the cluster's relays (this endpoint is being retired while a newer one
    /// with the same id serves: a relay delivers to the newest connection of an id, and an
    /// old endpoint that reconnected would take that place back). Its direct paths stay;
    /// relay-only connections of it end. With iroh's default relays there is no list to
    /// leave (README "Known limits").
    pub async fn leave_relays(&self) {
        if let Some((shared, _)) = &self.failover {
            shared.leave();
        }
        let aliases = match &self.rejoin {
            Some((rejoin, _)) => rejoin.leave(),
            None => Vec::new(),
        };
        for r in self.relay_urls.iter().chain(&aliases) {
            let _ = self.endpoint.remove_relay(r).await;
        }
    }

    /// Bind an endpoint. `accept` = this node answers incoming connections (a server);
    /// `bind` = fixed UDP address (`--bind`), else `net.bind` (`MALAI_BIND`), else an
    /// ephemeral port on all interfaces.
    pub async fn bind(
        key: &SecretKey,
        net: &NetConfig,
        bind: Option<SocketAddr>,
        accept: bool,
    ) -> Result<Node, TransportError> {
        let addrs: Vec<SocketAddr> = bind.or(net.bind).into_iter().collect();
        Node::bind_on(key, net, &addrs, accept).await
    }

    async fn bind_on(
        key: &SecretKey,
        net: &NetConfig,
        addrs: &[SocketAddr],
        accept: bool,
    ) -> Result<Node, TransportError> {
        let sk = iroh::SecretKey::from_bytes(key.as_bytes());
        let relay_urls = net.relay_urls()?;
        for u in relay_urls.iter().filter(|u| u.scheme() == "http") {
            tracing::warn!(relay = %u, "relay over plain http: the network path sees who talks to whom through it");
        }
        let mut b = match &net.relay {
            RelayChoice::Default => Endpoint::builder(presets::N0),
            RelayChoice::Disabled => Endpoint::builder(presets::Minimal)
                .relay_mode(RelayMode::Disabled)
                .portmapper_config(PortmapperConfig::Disabled),
            // Minimal, not N0: no n0 DNS/pkarr lookup or publishing. Peers are found
            // through the cluster's relays, which every dial names.
            RelayChoice::Custom(_) => Endpoint::builder(presets::Minimal)
                .relay_mode(RelayMode::custom(relay_urls.clone())),
        };
        let roots = net.ca_roots()?;
        if !roots.is_empty() {
            b = b.ca_tls_config(iroh::tls::CaTlsConfig::embedded().with_extra_roots(roots));
        }
        b = b
            .secret_key(sk)
            .transport_config(transport_config())
            .crypto_provider(crypto_provider());
        if accept {
            b = b.alpns(vec![ALPN.to_vec()]);
        }
        if !addrs.is_empty() {
            b = b.clear_ip_transports();
            for a in addrs {
                b = b
                    .bind_addr(*a)
                    .map_err(|e| TransportError::Bind(format!("{a}: {e}")))?;
            }
        }
        let endpoint = b
            .bind()
            .await
            .map_err(|e| TransportError::Bind(e.to_string()))?;
        // `MALAI_RELAY_FAILOVER=off` leaves a dead home relay to iroh alone (for comparison:
        // docs/benchmarks.md "Relay failover").
        let watch = std::env::var("MALAI_RELAY_FAILOVER").as_deref() != Ok("off");
        let failover = (watch && relay_urls.len() > 1).then(|| {
            let shared = std::sync::Arc::<super::failover::Shared>::default();
            let task = tokio::spawn(super::failover::watch(
                endpoint.clone(),
                relay_urls.clone(),
                shared.clone(),
            ));
            (shared, std::sync::Arc::new(AbortOnDrop(task)))
        });
        // `MALAI_RELAY_REJOIN=off` leaves a relay connection cut by an outage to the
        // kernel's retransmission backoff (for comparison: docs/benchmarks.md).
        let rejoin_on = std::env::var("MALAI_RELAY_REJOIN").as_deref() != Ok("off");
        let rejoin = (rejoin_on && !relay_urls.is_empty()).then(|| {
            let shared = std::sync::Arc::<super::relay_rejoin::Rejoin>::default();
            let task = tokio::spawn(super::relay_rejoin::watch(endpoint.clone(), shared.clone()));
            (shared, std::sync::Arc::new(AbortOnDrop(task)))
        });
        Ok(Node {
            endpoint,
            relay: net.relay.clone(),
            relay_urls,
            failover,
            rejoin,
        })
    }

    /// [`Node::bind`] on `port` of every interface (IPv4 and IPv6), for a server that
    /// comes back where it was: peers' paths to it (through their NATs too) stay valid.
    pub async fn bind_port(
        key: &SecretKey,
        net: &NetConfig,
        port: u16,
        accept: bool,
    ) -> Result<Node, TransportError> {
        let v4 = SocketAddr::from(([0, 0, 0, 0], port));
        let v6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
        Node::bind_on(key, net, &[v4, v6], accept).await
    }

    pub fn id52(&self) -> Id52 {
        to_id52(&self.endpoint.id())
    }

    /// The cluster's relays as this endpoint sees them now: which is home, connected, set
    /// aside after it went down (`malai ssh status`). Empty without the cluster's own relays.
    pub fn relay_states(&self) -> Vec<super::failover::RelayState> {
        match &self.failover {
            Some((shared, _)) => shared.states(&self.endpoint, &self.relay_urls),
            None => super::failover::Shared::default().states(&self.endpoint, &self.relay_urls),
        }
    }

    /// The iroh endpoint, for the relay probe (`transport::probe`) only.
    pub(super) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The local UDP sockets (for `addrs` hints and log lines).
    pub fn bound_sockets(&self) -> Vec<SocketAddr> {
        self.endpoint.bound_sockets()
    }

    /// Dial `peer`, trying the `hints` first (and relays/lookup unless disabled).
    pub async fn connect(
        &self,
        peer: &Id52,
        hints: &[SocketAddr],
    ) -> Result<PeerConnection, TransportError> {
        if hints.is_empty() && self.relay == RelayChoice::Disabled {
            return Err(TransportError::NoAddress { peer: *peer });
        }
        let mut addr = EndpointAddr::new(to_public(peer)?);
        for h in hints {
            addr = addr.with_ip_addr(*h);
        }
        for r in &self.relay_urls {
            let r = match &self.rejoin {
                Some((rejoin, _)) => rejoin.current(r),
                None => r.clone(),
            };
            addr = addr.with_relay_url(r);
        }
        let conn = match self.endpoint.connect(addr, ALPN).await {
            Ok(c) => c,
            Err(e) => {
                // A dial that timed out may be this machine's network being down.
                if let Some((rejoin, _)) = &self.rejoin {
                    rejoin.suspect();
                }
                return Err(TransportError::Connect {
                    peer: *peer,
                    msg: e.to_string(),
                });
            }
        };
        Ok(PeerConnection {
            conn,
            rejoin: self.rejoiner(),
        })
    }

    /// The next incoming connection, or `None` once the endpoint is closed. A handshake
    /// that fails is logged and skipped: one bad peer never stops the accept loop.
    ///
    /// Handshakes here run one after another: a server must use [`Node::accept_incoming`]
    /// and finish each handshake in its own task instead.
    pub async fn accept(&self) -> Option<PeerConnection> {
        loop {
            if let Some(c) = self.accept_incoming().await?.handshake().await {
                return Some(c);
            }
        }
    }

    /// The next connection attempt, before its handshake (`None` once the endpoint is
    /// closed). Finish it with [`Incoming::handshake`] in a task of its own: awaiting
    /// handshakes in the accept loop serializes them, so a burst of clients (or one that
    /// stalls mid-handshake) keeps every other client waiting until its QUIC idle timeout
    /// fails the handshake — measured: 45 of 100 concurrent scp clients timed out that way.
    pub async fn accept_incoming(&self) -> Option<Incoming> {
        let rejoin = self.rejoiner();
        self.endpoint.accept().await.map(|i| Incoming(i, rejoin))
    }

    fn rejoiner(&self) -> Option<std::sync::Arc<super::relay_rejoin::Rejoin>> {
        self.rejoin.as_ref().map(|(r, _)| r.clone())
    }

    /// Close gracefully (iroh logs an error when an endpoint is dropped unclosed).
    pub async fn close(&self) {
        self.endpoint.close().await;
    }

    /// Close, but wait at most `limit` for peers to acknowledge. After a connection was
    /// lost (its peer died or restarted) nobody will acknowledge, and a full close would
    /// keep the user waiting ~3 s for nothing.
    pub async fn close_within(&self, limit: std::time::Duration) {
        if tokio::time::timeout(limit, self.endpoint.close())
            .await
            .is_err()
        {
            tracing::debug!("endpoint close cut short");
        }
    }
}

/// A connection attempt whose handshake has not completed.
pub struct Incoming(
    iroh::endpoint::Incoming,
    Option<std::sync::Arc<super::relay_rejoin::Rejoin>>,
);

impl Incoming {
    /// Complete the handshake; `None` (logged) when it fails or times out.
    pub async fn handshake(self) -> Option<PeerConnection> {
        match self.0.await {
            Ok(conn) => Some(PeerConnection {
                conn,
                rejoin: self.1,
            }),
            Err(e) => {
                tracing::info!(error = %e, "incoming handshake failed");
                None
            }
        }
    }
}

/// One QUIC connection to a verified peer.
#[derive(Debug, Clone)]
pub struct PeerConnection {
    conn: Connection,
    /// Told when this connection times out (`super::relay_rejoin`).
    rejoin: Option<std::sync::Arc<super::relay_rejoin::Rejoin>>,
}

impl PeerConnection {
    /// The remote's id52, verified by the TLS handshake.
    pub fn remote(&self) -> Id52 {
        to_id52(&self.conn.remote_id())
    }

    /// Open a bi-stream. Note: the peer sees it only once we write (the header does that).
    pub async fn open(&self) -> Result<(SendHalf, RecvHalf), TransportError> {
        let (s, r) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| TransportError::Stream {
                peer: self.remote(),
                msg: e.to_string(),
            })?;
        Ok((SendHalf(s), RecvHalf(r)))
    }

    /// The next stream the peer opened; `None` when the connection is gone.
    pub async fn accept(&self) -> Option<(SendHalf, RecvHalf)> {
        match self.conn.accept_bi().await {
            Ok((s, r)) => Some((SendHalf(s), RecvHalf(r))),
            Err(e) => {
                tracing::debug!(error = %e, "connection ended");
                self.note_end(&e);
                None
            }
        }
    }

    pub fn close(&self, reason: &str) {
        self.conn.close(0u32.into(), reason.as_bytes());
    }

    /// Resolves when the connection is closed (by either side or by a timeout).
    pub async fn closed(&self) {
        let e = self.conn.closed().await;
        self.note_end(&e);
    }

    /// A connection that timed out may mean this machine's network is down: the relay
    /// rejoiner looks.
    fn note_end(&self, e: &iroh::endpoint::ConnectionError) {
        if matches!(e, iroh::endpoint::ConnectionError::TimedOut)
            && let Some(r) = &self.rejoin
        {
            r.suspect();
        }
    }

    /// The reason the *peer* gave when it closed the connection (a server closing a
    /// stranger, or revoking access, says why), for the user's one error line.
    pub fn peer_close_reason(&self) -> Option<String> {
        match self.conn.close_reason()? {
            iroh::endpoint::ConnectionError::ApplicationClosed(c) if !c.reason.is_empty() => {
                Some(String::from_utf8_lossy(&c.reason).into_owned())
            }
            _ => None,
        }
    }

    /// Whether the *peer* closed the connection on purpose (a server shutting down, or
    /// refusing us), as opposed to a timeout or a lost path.
    pub fn closed_by_peer(&self) -> bool {
        matches!(
            self.conn.close_reason(),
            Some(iroh::endpoint::ConnectionError::ApplicationClosed(_))
        )
    }

    /// Whether the connection is gone (closed by either side, or timed out): a pool must
    /// dial a new one instead of opening streams on it.
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Datagrams received on this connection so far (every path, relay included). A live
    /// peer acknowledges our keep-alives, so this grows at least once per [`KEEP_ALIVE`];
    /// when it stops, the peer or the network is gone (`client::liveness` tells which).
    pub fn received_datagrams(&self) -> u64 {
        self.conn.stats().udp_rx.datagrams
    }

    /// The path application data takes now: direct (UDP to an address, after hole
    /// punching or through `addrs`) or through a relay, with its address and RTT.
    pub fn path(&self) -> Option<PathSummary> {
        let paths = self.conn.paths();
        let p = paths
            .iter()
            .find(|p| p.is_selected())
            .or_else(|| paths.iter().next())?;
        let (direct, addr) = match p.remote_addr() {
            iroh::TransportAddr::Ip(a) => (true, a.to_string()),
            iroh::TransportAddr::Relay(u) => (false, super::relay_rejoin::canonical(u).to_string()),
            other => (false, format!("{other:?}")),
        };
        Some(PathSummary {
            direct,
            addr,
            rtt: p.rtt(),
            paths: paths.len(),
        })
    }

    /// Watches for this machine's relay connection being renewed after its network came
    /// back (`relay_rejoin`) while this connection goes through a relay; `None` without
    /// a rejoiner (no relays, or `MALAI_RELAY_REJOIN=off`).
    pub fn relay_renewals(&self) -> Option<RelayRenewals> {
        let rx = self.rejoin.as_ref()?.renewals();
        Some(RelayRenewals {
            conn: self.clone(),
            rx,
        })
    }

    /// Round-trip time estimate (for `cluster status`).
    pub fn rtt(&self) -> std::time::Duration {
        self.conn
            .rtt(iroh::endpoint::PathId::ZERO)
            .unwrap_or_default()
    }
}

/// A connection's current path (for `malai ssh status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathSummary {
    /// A direct UDP path (else: through a relay).
    pub direct: bool,
    /// The remote's IP address, or the relay's URL.
    pub addr: String,
    pub rtt: std::time::Duration,
    /// Open paths (a relay path usually stays open beside a direct one).
    pub paths: usize,
}

/// See [`PeerConnection::relay_renewals`].
pub struct RelayRenewals {
    conn: PeerConnection,
    rx: tokio::sync::watch::Receiver<u64>,
}

impl RelayRenewals {
    /// Resolves at the first renewal after which the connection's path is still a relay
    /// one (a hole-punched path is not held up by the relay connection's backoff).
    pub async fn relayed(&mut self) {
        loop {
            if self.rx.changed().await.is_err() {
                return std::future::pending().await;
            }
            if self.conn.path().is_some_and(|p| !p.direct) {
                return;
            }
        }
    }
}

/// The sending half of a bi-stream. `shutdown` sends FIN (the peer reads EOF).
pub struct SendHalf(SendStream);
/// The receiving half of a bi-stream.
pub struct RecvHalf(RecvStream);

impl SendHalf {
    /// Wait until the peer has acknowledged everything we sent (after shutdown), or stopped
    /// the stream. Closing a connection before this can drop the tail of the data.
    pub async fn acknowledged(&mut self) {
        let _ = self.0.stopped().await;
    }

    /// Abandon the stream: the peer's reads fail instead of seeing a clean EOF, so a peer
    /// that dies mid-transfer is never mistaken for a complete one.
    pub fn reset(&mut self) {
        let _ = self.0.reset(0u32.into());
    }
}

impl RecvHalf {
    /// Tell the peer we will read no more (its writes fail promptly).
    pub fn stop(&mut self) {
        let _ = self.0.stop(0u32.into());
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.0), cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.0), cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.0), cx)
    }
}

impl AsyncRead for RecvHalf {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        AsyncRead::poll_read(Pin::new(&mut self.0), cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id52 of a key is BASE32_DNSSEC of iroh's public key bytes, never z-base-32.
    #[test]
    fn id52_is_not_z32() {
        let k = generate_secret();
        let id = public_id52(&k);
        let pk = iroh::SecretKey::from_bytes(k.as_bytes()).public();
        assert_eq!(id.as_bytes(), pk.as_bytes());
        assert_ne!(id.to_string(), pk.to_z32());
        assert_eq!(to_public(&id).unwrap(), pk);
    }
}
