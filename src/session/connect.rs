//! Dialing a server from this process's own endpoint, bounded by [`CONNECT_TIMEOUT`], in
//! a way that says *why* a dial cannot work: when it is slow, the cluster's own relays are
//! probed meanwhile (`transport::probe`), and a relay that cannot be used (an untrusted
//! certificate, refused, unreachable, denied) is named with its fix instead of a bare
//! "timed out connecting" after 15 s.

use std::net::SocketAddr;
use std::time::Duration;

use super::{CONNECT_TIMEOUT, SessionError};
use crate::config::Server;
use crate::id52::Id52;
use crate::transport::iroh::{NetConfig, Node, PeerConnection};
use crate::transport::probe::{self, RelayProblem};

/// A dial still pending after this long has the cluster's relays checked; a normal dial
/// (direct, or relayed through a working relay) is done well before, so nothing is probed.
const RELAY_CHECK_AFTER: Duration = Duration::from_secs(2);

/// Which server to dial: its id52, its name (for the error) and its `addrs` hints.
pub struct DialTarget<'a> {
    pub peer: Id52,
    pub name: &'a str,
    pub hints: &'a [SocketAddr],
}

impl<'a> From<&'a Server> for DialTarget<'a> {
    fn from(s: &'a Server) -> Self {
        DialTarget {
            peer: s.id52,
            name: &s.name,
            hints: &s.addrs,
        }
    }
}

/// Dial `server`. If every relay of the cluster ruled itself out (an untrusted or
/// wrong-name certificate, refused, denied: waiting cannot help) and the server has no
/// `addrs` hint (so nothing else could reach it), fail as soon as the probe knows, one
/// clause per relay. An unreachable relay may be a passing outage: the dial keeps its full
/// time, and if it then times out, the relays' problems are named too.
pub async fn dial_server(
    node: &Node,
    server: DialTarget<'_>,
    net: &NetConfig,
) -> Result<PeerConnection, SessionError> {
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, node.connect(&server.peer, server.hints));
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
                let hopeless = p.len() == relays && p.iter().all(|(_, e)| e.is_definitive());
                if hopeless && server.hints.is_empty() {
                    return Err(relay_error(server.name, &p));
                }
                problems = p;
            }
        }
    };
    match dialed {
        Ok(r) => Ok(r?),
        Err(_) if problems.is_empty() => Err(SessionError::Timeout("connecting")),
        Err(_) => Err(relay_error(server.name, &problems)),
    }
}

/// [`dial_server`] for a cluster known by its folder alias (the key holder's pools): the
/// relays to name come from its file; without a usable file the dial is only bounded.
pub async fn dial_in_cluster(
    node: &Node,
    dirs: &crate::config::paths::Dirs,
    alias: &str,
    server: DialTarget<'_>,
) -> Result<PeerConnection, SessionError> {
    let net = crate::config::store::ClusterDir::open(dirs, alias)
        .ok()
        .and_then(|d| super::own::net_config_of(&d).ok())
        .unwrap_or_else(|| NetConfig::disabled(None));
    dial_server(node, server, &net).await
}

fn relay_error(server: &str, problems: &[(String, RelayProblem)]) -> SessionError {
    let lines: Vec<String> = problems
        .iter()
        .map(|(url, p)| probe::describe(url, p))
        .collect();
    SessionError::Refused(format!(
        "cannot reach server {server}: {}",
        lines.join("; ")
    ))
}
