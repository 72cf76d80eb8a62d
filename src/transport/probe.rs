//! Probing a cluster's relays, so a relay that does not work is named with its reason
//! (untrusted certificate, wrong name, refused, unreachable, denied) instead of a dial
//! that times out after 15 s with "timed out connecting".
//!
//! Used by `malai ssh doctor` (every relay, with latency and QUIC address discovery) and by
//! a dial that timed out (the same wording, issue "Long-haul and failing paths"). Each
//! relay is tried the way iroh itself reaches it: TCP to its URL's host and port, TLS
//! with the very trust roots the endpoint was built with (`relay-ca`, `MALAI_RELAY_CA`),
//! then one HTTP round trip (`GET /ping`, the probe path every iroh relay answers). QUIC
//! address discovery and the relay accepting *us* come from iroh's own net report and
//! home-relay status, on a throwaway endpoint with a random key (never the cluster key:
//! one endpoint per id52 per machine).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iroh::Watcher as _;
use iroh::endpoint::Endpoint;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

use super::iroh::{NetConfig, Node, RelayChoice, TransportError, generate_secret};

/// How long one step (TCP connect, TLS handshake, HTTP answer) may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for iroh's net report (QUIC address discovery) and the home relay.
const REPORT_TIMEOUT: Duration = Duration::from_secs(6);

/// Why a relay cannot be used, each a short phrase for the user's one line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "problem", content = "detail", rename_all = "kebab-case")]
pub enum RelayProblem {
    /// Not a URL iroh accepts (or no host in it).
    BadUrl(String),
    /// The relay's host name does not resolve.
    Resolve(String),
    /// Nothing listens on the relay's port (TCP RST).
    Refused,
    /// No answer to the TCP handshake (a firewall, a dead host, no route).
    Unreachable(String),
    /// The certificate is signed by a CA this machine does not trust.
    UntrustedCertificate(String),
    /// The certificate is for another name than the URL's host.
    WrongName(String),
    /// Any other TLS failure (expired, handshake refused, not TLS at all, …).
    Tls(String),
    /// It answered HTTP, but not like an iroh relay.
    Http(String),
    /// The relay refused our connection to it (its access control).
    Denied(String),
    /// TCP and TLS work but iroh's relay connection fails anyway.
    Relay(String),
}

impl std::fmt::Display for RelayProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RelayProblem::BadUrl(e) => write!(f, "not a relay URL ({e})"),
            RelayProblem::Resolve(e) => write!(f, "its name does not resolve ({e})"),
            RelayProblem::Refused => write!(f, "connection refused (nothing listens there)"),
            RelayProblem::Unreachable(e) => write!(f, "unreachable ({e})"),
            RelayProblem::UntrustedCertificate(e) => {
                write!(f, "untrusted certificate ({e})")
            }
            RelayProblem::WrongName(e) => write!(f, "certificate is for another name ({e})"),
            RelayProblem::Tls(e) => write!(f, "TLS failed ({e})"),
            RelayProblem::Http(e) => write!(f, "not an iroh relay ({e})"),
            RelayProblem::Denied(e) => write!(f, "the relay refuses us ({e})"),
            RelayProblem::Relay(e) => write!(f, "relay connection failed ({e})"),
        }
    }
}

impl RelayProblem {
    /// Whether waiting cannot help: the relay answered, and what it said rules it out
    /// (certificate, name, refused, denied, not a relay). An unreachable relay or a name
    /// that does not resolve may be a passing outage, so a dial keeps trying those.
    pub fn is_definitive(&self) -> bool {
        !matches!(
            self,
            RelayProblem::Unreachable(_) | RelayProblem::Resolve(_)
        )
    }

    /// What to do about it (one clause).
    pub fn fix(&self) -> &'static str {
        match self {
            RelayProblem::BadUrl(_) => {
                "fix `relays` in the cluster file (or MALAI_RELAY): e.g. https://relay.example"
            }
            RelayProblem::Resolve(_) => "check the relay's DNS name and this machine's resolver",
            RelayProblem::Refused => "start the relay, or fix the port in its URL",
            RelayProblem::Unreachable(_) => {
                "check the network path and firewall to the relay (TCP 443 or the URL's port)"
            }
            RelayProblem::UntrustedCertificate(_) => {
                "put the relay's CA in `relay-ca` under [cluster-manager] (or MALAI_RELAY_CA=<pem file>)"
            }
            RelayProblem::WrongName(_) => {
                "use the name the relay's certificate is for in its URL, or reissue the certificate"
            }
            RelayProblem::Tls(_) => "check the relay's TLS setup (certificate, https port)",
            RelayProblem::Http(_) => "point the URL at an iroh-relay of the same iroh release",
            RelayProblem::Denied(_) => "ask the relay's admin to admit this machine",
            RelayProblem::Relay(_) => "see the relay's log",
        }
    }
}

/// What QUIC address discovery (the relay's UDP port, 7842 by default) told us.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct AddressDiscovery {
    /// A QAD round trip completed (IPv4 or IPv6): hole punching can work.
    pub answered: bool,
    /// This machine's public address as the relays see it.
    pub public_v4: Option<SocketAddr>,
    pub public_v6: Option<SocketAddr>,
}

/// One relay, probed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayProbe {
    pub url: String,
    /// The problem, if it is not usable.
    pub problem: Option<RelayProblem>,
    /// One HTTP round trip over the TLS connection (when it got that far).
    pub latency_ms: Option<f64>,
    /// Whether iroh's endpoint holds a connection to it as its home relay now.
    pub home: bool,
}

/// Every relay of one cluster's network settings, probed, with what address discovery said.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayReport {
    pub relays: Vec<RelayProbe>,
    pub discovery: AddressDiscovery,
}

/// The relays `net` makes this machine use (none when relays are disabled).
pub fn relay_urls(net: &NetConfig) -> Vec<String> {
    match &net.relay {
        RelayChoice::Disabled => vec![],
        RelayChoice::Custom(urls) => urls.clone(),
        RelayChoice::Default => iroh::RelayMode::Default
            .relay_map()
            .urls::<Vec<_>>()
            .into_iter()
            .map(|u| u.to_string())
            .collect(),
    }
}

/// Probe every relay of `net` (doctor): TCP, TLS, HTTP, then the net report of a
/// throwaway endpoint for address discovery and whether the relay takes our connection.
pub async fn probe(net: &NetConfig) -> Result<RelayReport, TransportError> {
    let urls = relay_urls(net);
    if urls.is_empty() {
        return Ok(RelayReport {
            relays: vec![],
            discovery: AddressDiscovery::default(),
        });
    }
    let node = Node::bind(&generate_secret(), net, None, false).await?;
    let endpoint = node.endpoint().clone();
    let tls = Arc::new(endpoint.tls_config().clone());
    let mut relays = vec![];
    for url in &urls {
        relays.push(probe_one(url, tls.clone()).await);
    }
    let discovery = wait_for_report(&endpoint, &mut relays).await;
    node.close_within(Duration::from_secs(1)).await;
    Ok(RelayReport { relays, discovery })
}

/// The problems of the relays of `net`, TCP/TLS/HTTP only (a few seconds at most): for a
/// dial that timed out, to say why in the same words as doctor.
pub async fn relay_problems(net: &NetConfig) -> Vec<(String, RelayProblem)> {
    let urls = relay_urls(net);
    if urls.is_empty() || net.relay == RelayChoice::Default {
        return vec![];
    }
    let Ok(tls) = client_config(net) else {
        return vec![];
    };
    let mut out = vec![];
    for url in &urls {
        if let Some(p) = probe_one(url, tls.clone()).await.problem {
            out.push((url.clone(), p));
        }
    }
    out
}

/// One line for a relay problem: names the relay, the reason and the fix.
pub fn describe(url: &str, problem: &RelayProblem) -> String {
    format!("relay {url}: {problem}; {}", problem.fix())
}

/// The TLS client settings iroh builds for `net` (the same roots as the endpoint's).
fn client_config(net: &NetConfig) -> Result<Arc<rustls::ClientConfig>, TransportError> {
    let roots = net.ca_roots()?;
    let ca = iroh::tls::CaTlsConfig::embedded().with_extra_roots(roots);
    let cfg = ca
        .client_config(iroh::tls::default_provider())
        .map_err(|e| TransportError::RelayCa("relay-ca".into(), e.to_string()))?;
    Ok(Arc::new(cfg))
}

async fn probe_one(url: &str, tls: Arc<rustls::ClientConfig>) -> RelayProbe {
    let (problem, latency) = match reach(url, tls).await {
        Ok(latency) => (None, Some(latency)),
        Err(p) => (Some(p), None),
    };
    RelayProbe {
        url: url.to_string(),
        problem,
        latency_ms: latency.map(|d| d.as_secs_f64() * 1000.0),
        home: false,
    }
}

/// TCP, TLS (for https), one HTTP round trip: the latency of that round trip.
async fn reach(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<Duration, RelayProblem> {
    let parsed: iroh::RelayUrl = url
        .parse()
        .map_err(|e: iroh::RelayUrlParseError| RelayProblem::BadUrl(e.to_string()))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| RelayProblem::BadUrl("no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| RelayProblem::BadUrl("no port".into()))?;
    let tcp = connect_tcp(&host, port).await?;
    let _ = tcp.set_nodelay(true);
    if parsed.scheme() == "http" {
        return round_trip(tcp, &host).await;
    }
    let name = rustls::pki_types::ServerName::try_from(host.clone())
        .map_err(|e| RelayProblem::BadUrl(e.to_string()))?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let stream = match tokio::time::timeout(STEP_TIMEOUT, connector.connect(name, tcp)).await {
        Err(_) => return Err(RelayProblem::Unreachable("no TLS answer within 5 s".into())),
        Ok(Err(e)) => return Err(tls_problem(&e)),
        Ok(Ok(s)) => s,
    };
    round_trip(stream, &host).await
}

async fn connect_tcp(host: &str, port: u16) -> Result<tokio::net::TcpStream, RelayProblem> {
    let addrs: Vec<SocketAddr> =
        match tokio::time::timeout(STEP_TIMEOUT, tokio::net::lookup_host((host, port))).await {
            Err(_) => return Err(RelayProblem::Resolve("no answer within 5 s".into())),
            Ok(Err(e)) => return Err(RelayProblem::Resolve(e.to_string())),
            Ok(Ok(a)) => a.collect(),
        };
    let mut last = RelayProblem::Resolve("no address".into());
    for a in addrs {
        match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                last = RelayProblem::Refused;
            }
            Ok(Err(e)) => last = RelayProblem::Unreachable(format!("{a}: {e}")),
            Err(_) => last = RelayProblem::Unreachable(format!("{a}: no answer within 5 s")),
        }
    }
    Err(last)
}

/// Name a TLS handshake failure by what rustls said.
fn tls_problem(e: &std::io::Error) -> RelayProblem {
    use rustls::CertificateError as C;
    let Some(err) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return RelayProblem::Tls(e.to_string());
    };
    match err {
        rustls::Error::InvalidCertificate(C::UnknownIssuer) => {
            RelayProblem::UntrustedCertificate("signed by an unknown CA".into())
        }
        rustls::Error::InvalidCertificate(C::NotValidForNameContext {
            expected,
            presented,
        }) => RelayProblem::WrongName(format!(
            "issued for {}, not {}",
            presented.join(", "),
            expected.to_str()
        )),
        rustls::Error::InvalidCertificate(C::NotValidForName) => {
            RelayProblem::WrongName("issued for another name".into())
        }
        rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. }) => {
            RelayProblem::Tls("certificate expired".into())
        }
        rustls::Error::InvalidCertificate(c) => RelayProblem::Tls(format!("certificate: {c:?}")),
        other => RelayProblem::Tls(other.to_string()),
    }
}

/// The path iroh's own latency probe asks (`iroh_relay::http::RELAY_PROBE_PATH`).
const PROBE_PATH: &str = "/ping";

/// `GET /ping` on an open connection, timed.
async fn round_trip<S>(stream: S, host: &str) -> Result<Duration, RelayProblem>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| RelayProblem::Http(e.to_string()))?;
    // The connection task ends with the request (or the timeout): owned here, aborted on
    // drop of the handle at the end of this function.
    let driver = tokio::spawn(conn);
    let _abort = AbortOnDrop(driver);
    let req = hyper::Request::get(PROBE_PATH)
        .header(hyper::header::HOST, host)
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| RelayProblem::Http(e.to_string()))?;
    let started = Instant::now();
    let resp = match tokio::time::timeout(STEP_TIMEOUT, sender.send_request(req)).await {
        Err(_) => {
            return Err(RelayProblem::Unreachable(
                "no HTTP answer within 5 s".into(),
            ));
        }
        Ok(Err(e)) => return Err(RelayProblem::Http(e.to_string())),
        Ok(Ok(r)) => r,
    };
    let took = started.elapsed();
    if resp.status().is_success() {
        Ok(took)
    } else {
        Err(RelayProblem::Http(format!(
            "GET {PROBE_PATH} answered {}",
            resp.status()
        )))
    }
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Wait (bounded) for the net report and the home relay; fill in `home`, and the problem
/// of a relay that TCP/TLS reached but that refuses iroh's connection.
async fn wait_for_report(endpoint: &Endpoint, relays: &mut [RelayProbe]) -> AddressDiscovery {
    let deadline = tokio::time::Instant::now() + REPORT_TIMEOUT;
    let any_reachable = relays.iter().any(|r| r.problem.is_none());
    let mut report_w = endpoint.net_report();
    let mut status_w = endpoint.home_relay_status();
    // A report may come before address discovery answered (HTTPS probes first): wait for
    // one that has it, or the deadline.
    let mut report = None;
    if any_reachable {
        loop {
            if let Some(r) = report_w.get() {
                let qad = r.udp_v4 || r.udp_v6;
                report = Some(r);
                if qad {
                    break;
                }
            }
            match tokio::time::timeout_at(deadline, report_w.updated()).await {
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
    }
    // The home relay connects a moment after the report picks it.
    loop {
        let status = status_w.get();
        let settled = status
            .iter()
            .all(|s| s.is_connected() || s.last_error().is_some());
        if (!status.is_empty() && settled)
            || !any_reachable
            || tokio::time::Instant::now() >= deadline
        {
            for s in &status {
                let Some(r) = relays.iter_mut().find(|r| same_url(&r.url, s.url())) else {
                    continue;
                };
                r.home = s.is_connected();
                if r.problem.is_none() && !s.is_connected() {
                    r.problem = Some(match (s.auth_denied_reason(), s.last_error()) {
                        (Some(why), _) => RelayProblem::Denied(why.to_string()),
                        (None, Some(e)) => RelayProblem::Relay(e.to_string()),
                        (None, None) => RelayProblem::Relay("not connected yet".into()),
                    });
                }
            }
            break;
        }
        if let Ok(Err(_disconnected)) = tokio::time::timeout_at(deadline, status_w.updated()).await
        {
            break;
        }
    }
    let report = report.or_else(|| report_w.get());
    match report {
        Some(r) => AddressDiscovery {
            answered: r.udp_v4 || r.udp_v6,
            public_v4: r.global_v4.map(SocketAddr::V4),
            public_v6: r.global_v6.map(SocketAddr::V6),
        },
        None => AddressDiscovery::default(),
    }
}

fn same_url(a: &str, b: &iroh::RelayUrl) -> bool {
    a.parse::<iroh::RelayUrl>().is_ok_and(|a| &a == b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port nobody listens on is "refused"; a URL without a host is a bad URL.
    #[tokio::test]
    async fn refused_and_bad_urls_are_named() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let net = NetConfig::disabled(None);
        let tls = client_config(&net).unwrap();
        let p = probe_one(&format!("https://127.0.0.1:{port}"), tls.clone()).await;
        assert_eq!(p.problem, Some(RelayProblem::Refused));
        let p = probe_one("not a url", tls).await;
        assert!(matches!(p.problem, Some(RelayProblem::BadUrl(_))), "{p:?}");
    }

    /// Something that is not TLS on the relay's port is a TLS failure, not a timeout.
    #[tokio::test]
    async fn plain_tcp_is_a_tls_failure() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        });
        let tls = client_config(&NetConfig::disabled(None)).unwrap();
        let p = probe_one(&format!("https://127.0.0.1:{port}"), tls).await;
        assert!(matches!(p.problem, Some(RelayProblem::Tls(_))), "{p:?}");
        server.await.unwrap();
    }

    /// A TLS server on 127.0.0.1 whose certificate (for `name`, signed by a fresh test CA)
    /// is served to one client; returns its port and the CA's PEM.
    async fn tls_server(name: &str) -> (u16, String, tokio::task::JoinHandle<()>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec![name.to_string()]).unwrap();
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let _ = acceptor.accept(s).await;
        });
        (port, ca_cert.pem(), task)
    }

    /// The CA not trusted: "untrusted certificate"; trusted but issued for another name:
    /// "another name" — each naming the fix.
    #[tokio::test]
    async fn untrusted_and_wrong_name_certificates_are_named() {
        let (port, _ca, task) = tls_server("127.0.0.1").await;
        let tls = client_config(&NetConfig::disabled(None)).unwrap();
        let p = probe_one(&format!("https://127.0.0.1:{port}"), tls).await;
        assert!(
            matches!(p.problem, Some(RelayProblem::UntrustedCertificate(_))),
            "{p:?}"
        );
        task.await.unwrap();

        let (port, ca, task) = tls_server("relay.example").await;
        let mut net = NetConfig::disabled(None);
        net.relay_ca = Some(ca);
        let tls = client_config(&net).unwrap();
        let p = probe_one(&format!("https://127.0.0.1:{port}"), tls).await;
        assert!(
            matches!(&p.problem, Some(RelayProblem::WrongName(w)) if w.contains("relay.example")),
            "{p:?}"
        );
        assert!(p.problem.unwrap().fix().contains("name"));
        task.await.unwrap();
    }

    #[test]
    fn describe_names_relay_reason_and_fix() {
        let line = describe(
            "https://relay.acme",
            &RelayProblem::UntrustedCertificate("signed by an unknown CA".into()),
        );
        assert!(line.starts_with("relay https://relay.acme: untrusted certificate"));
        assert!(line.contains("relay-ca"), "{line}");
    }
}
