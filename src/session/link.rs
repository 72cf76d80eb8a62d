//! One route to one server, kept for many requests: native forwards (`-L`, `-R`, `-D`,
//! `-W`) open a stream per forwarded connection on it. Over this process's own endpoint it
//! is one connection (with its liveness watchdog); through a key holder, one control-socket
//! stream per request (the holder keeps its own connection alive).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use super::open::{Closer, Session, SessionRead, SessionWrite, request_on};
use super::own::OwnEndpoint;
use super::{LINGER, Resolved, Route, SessionError, liveness};
use crate::config::Server;
use crate::control::client::ControlClient;
use crate::id52::Id52;
use crate::protocol::Request;
use crate::transport::iroh::PeerConnection;

/// How this run reaches the server. Cheap to clone.
#[derive(Clone)]
pub enum Link {
    Own {
        own: Arc<OwnEndpoint>,
        conn: PeerConnection,
        cluster: Id52,
        /// Notices a restarted server (the connection's idle limit is long).
        watchdog: Arc<liveness::Watchdog>,
    },
    Via {
        socket: Arc<PathBuf>,
        alias: Arc<str>,
        server: Id52,
        hints: Arc<[SocketAddr]>,
    },
}

impl Link {
    /// Reach `server` by the routing policy every command uses ([`super::route`]).
    pub async fn connect(resolved: &Resolved, server: &Server) -> Result<Link, SessionError> {
        match super::route(&resolved.dir, Some(&resolved.config)).await? {
            Route::Holder(client) => Ok(Link::Via {
                socket: Arc::new(client.path().to_path_buf()),
                alias: resolved.dir.alias.as_str().into(),
                server: server.id52,
                hints: server.addrs.clone().into(),
            }),
            Route::Own(own) => {
                let net = super::own::net_config(Some(&resolved.config))?;
                match super::connect::dial_server(&own.node, server.into(), &net).await {
                    Ok(conn) => Ok(Link::Own {
                        watchdog: liveness::watch_server(&own.node, &conn, server, resolved),
                        own,
                        conn,
                        cluster: resolved.config.manager,
                    }),
                    Err(e) => {
                        own.done(LINGER).await;
                        Err(e)
                    }
                }
            }
        }
    }

    /// Open one request stream; `Ok` only after the server's `accept`.
    pub async fn open(
        &self,
        request: Request,
    ) -> Result<(SessionWrite, SessionRead), SessionError> {
        match self {
            Link::Own { conn, cluster, .. } => {
                let (s, r) = request_on(conn, *cluster, request).await?;
                Ok((SessionWrite::Iroh(s), SessionRead::Iroh(r)))
            }
            Link::Via {
                socket,
                alias,
                server,
                hints,
            } => {
                let sock = ControlClient::connect(socket)
                    .await?
                    .stream(alias, *server, hints, request)
                    .await
                    .map_err(SessionError::from_holder)?;
                let (r, w) = sock.into_split();
                Ok((SessionWrite::Via(w), SessionRead::Via(r)))
            }
        }
    }

    /// [`Link::open`] as a [`Session`] whose errors say when the server restarted.
    pub async fn open_session(&self, request: Request) -> Result<Session, SessionError> {
        let (send, recv) = self.open(request).await?;
        let closer = match self {
            Link::Own {
                own,
                conn,
                watchdog,
                ..
            } => Closer::Iroh {
                own: own.clone(),
                conn: conn.clone(),
                _watchdog: watchdog.clone(),
            },
            Link::Via { .. } => Closer::Via,
        };
        Ok(Session { closer, send, recv })
    }

    /// Resolves when the connection to the server is gone (never, through a holder: it
    /// redials on its own).
    pub async fn lost(&self) {
        match self {
            Link::Own { conn, .. } => conn.closed().await,
            Link::Via { .. } => std::future::pending().await,
        }
    }

    pub async fn close(self) {
        if let Link::Own { own, conn, .. } = self {
            conn.close("done");
            own.done(LINGER).await;
        }
    }
}
