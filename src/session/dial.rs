//! A request from a process that already knows where it dials from: an endpoint it bound
//! (the server's, the agent's, a command's own) or the key holder's control socket. Config
//! sync and the key holder's pool use it; commands get theirs from the routing policy
//! ([`super::route`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::open::exchange;
use super::own::OwnEndpoint;
use super::{Route, SessionError};
use crate::config::ClusterConfig;
use crate::config::store::ClusterDir;
use crate::control::client::ControlClient;
use crate::id52::Id52;
use crate::protocol::{Header, Request};
use crate::transport::iroh::{Node, PeerConnection};

/// Where requests are sent from. Cheap to clone.
#[derive(Clone)]
pub enum Dialer {
    /// An endpoint of this process.
    Node(Node),
    /// The process that holds the cluster's key on this machine (its control socket), so
    /// that nothing binds the key a second time (one endpoint per id52 per machine).
    Holder { socket: PathBuf, alias: String },
}

type BoxWrite = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;
type BoxRead = Box<dyn tokio::io::AsyncRead + Unpin + Send>;

/// One accepted request on a fresh connection (or a holder's stream).
pub struct Dialed {
    /// The connection, when this process dialed it (closed by [`Dialed::close`]).
    pub conn: Option<PeerConnection>,
    pub send: BoxWrite,
    pub recv: BoxRead,
    started: Instant,
}

impl Dialed {
    /// The connection's round-trip time, or (through the holder) the whole exchange's.
    pub fn rtt(&self) -> Duration {
        match &self.conn {
            Some(c) => c.rtt(),
            None => self.started.elapsed(),
        }
    }

    pub fn close(&self) {
        if let Some(c) = &self.conn {
            c.close("done");
        }
    }
}

impl Dialer {
    /// Dial `peer` (of the cluster whose manager is `cluster`) and send `request`; `Ok`
    /// only after the server's `accept`.
    pub async fn request(
        &self,
        cluster: Id52,
        peer: Id52,
        hints: &[SocketAddr],
        request: Request,
    ) -> Result<Dialed, SessionError> {
        let started = Instant::now();
        match self {
            Dialer::Holder { socket, alias } => {
                let sock = ControlClient::connect(socket)
                    .await?
                    .stream(alias, peer, hints, request)
                    .await
                    .map_err(SessionError::from_holder)?;
                let (r, w) = sock.into_split();
                Ok(Dialed {
                    conn: None,
                    send: Box::new(w),
                    recv: Box::new(r),
                    started,
                })
            }
            Dialer::Node(node) => {
                let conn = node.connect(&peer, hints).await?;
                let (mut send, mut recv) = conn.open().await?;
                let header = Header {
                    cluster: Some(cluster),
                    request,
                };
                match exchange(&mut send, &mut recv, header).await {
                    Ok(()) => Ok(Dialed {
                        conn: Some(conn),
                        send: Box::new(send),
                        recv: Box::new(recv),
                        started,
                    }),
                    Err(e) => {
                        let e = super::open::refused_by_close(&conn, e);
                        conn.close("refused");
                        Err(e)
                    }
                }
            }
        }
    }
}

/// A [`Dialer`] chosen by the routing policy, with this process's own endpoint (when it
/// bound one) kept for as long as the dialer is used.
pub struct Routed {
    pub dialer: Dialer,
    /// Ours to close ([`OwnEndpoint::done`]) when finished; `None` through a holder.
    pub own: Option<std::sync::Arc<OwnEndpoint>>,
}

impl Routed {
    /// Decide how to reach `dir`'s cluster ([`super::route`]) as a dialer.
    pub async fn for_cluster(
        dir: &ClusterDir,
        cfg: Option<&ClusterConfig>,
    ) -> Result<Routed, SessionError> {
        Ok(match super::route(dir, cfg).await? {
            Route::Own(own) => Routed {
                dialer: Dialer::Node(own.node.clone()),
                own: Some(own),
            },
            Route::Holder(client) => Routed {
                dialer: Dialer::Holder {
                    socket: client.path().to_path_buf(),
                    alias: dir.alias.clone(),
                },
                own: None,
            },
        })
    }
}
