//! The client side: find the server a host name means, dial it with this machine's key for
//! that cluster, and open one request.
//!
//! - [`proxy`]: `malai ssh proxy <host> [port]`, the OpenSSH ProxyCommand.

pub mod exec;
pub mod group;
pub mod proxy;
pub mod ssh_args;
pub mod tty;

use std::time::Duration;

use crate::config::paths::Dirs;
use crate::config::store::{ClusterDir, StoreError, list_clusters};
use crate::config::{ClusterConfig, ResolveError, Server, names};
use crate::id52::Id52;
use crate::keys::{self, KeyError};
use crate::protocol::{self, FrameError, Header, Request, Response};
use crate::transport::iroh::{
    Node, PeerConnection, RecvHalf, RelayChoice, SendHalf, TransportError,
};

/// Dialing plus handshake; generous because relay/hole-punching can take a while.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
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
pub struct Session {
    node: Node,
    conn: PeerConnection,
    pub send: SendHalf,
    pub recv: RecvHalf,
}

impl Session {
    /// Close politely: wait (briefly) until the server has our last bytes, then close.
    pub async fn finish(mut self) {
        let _ = tokio::time::timeout(LINGER, self.send.acknowledged()).await;
        self.conn.close("done");
        self.node.close().await;
    }

    /// Close at once (after an error).
    pub async fn abort(mut self) {
        self.send.reset();
        self.conn.close("aborted");
        self.node.close().await;
    }
}

/// Dial `server` of `resolved`'s cluster and send `request`; `Ok` only after `accept`.
pub async fn open(
    resolved: &Resolved,
    server: &Server,
    request: Request,
) -> Result<Session, ClientError> {
    let key = keys::load(&resolved.dir.dir)?;
    let relay = RelayChoice::from_env();
    let node = Node::bind(&key, &relay, None, false).await?;
    drop(key);
    match handshake(&node, resolved, server, request).await {
        Ok((conn, send, recv)) => Ok(Session {
            node,
            conn,
            send,
            recv,
        }),
        Err(e) => {
            node.close().await;
            Err(e)
        }
    }
}

async fn handshake(
    node: &Node,
    resolved: &Resolved,
    server: &Server,
    request: Request,
) -> Result<(PeerConnection, SendHalf, RecvHalf), ClientError> {
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, node.connect(&server.id52, &server.addrs))
        .await
        .map_err(|_| ClientError::Timeout("connecting"))??;
    let (mut send, mut recv) = conn.open().await?;
    let header = Header {
        cluster: Some(resolved.config.manager),
        request,
    };
    protocol::write_frame(&mut send, &header).await?;
    let resp = tokio::time::timeout(CONNECT_TIMEOUT, protocol::read_response(&mut recv))
        .await
        .map_err(|_| ClientError::Timeout("waiting for the server's answer"))?;
    match resp {
        Ok(Response::Accept) => Ok((conn, send, recv)),
        Ok(Response::Deny { reason }) => Err(ClientError::Denied(reason)),
        Ok(Response::Error { reason }) => Err(ClientError::Refused(reason)),
        Err(FrameError::Truncated) => Err(ClientError::Refused(
            "server closed the stream without answering".into(),
        )),
        Err(e) => Err(e.into()),
    }
}

/// This machine's id52 in a cluster (for error messages and `malai ssh id52`).
pub fn my_id52(dir: &ClusterDir) -> Result<Id52, ClientError> {
    Ok(keys::id52(&dir.dir)?)
}
