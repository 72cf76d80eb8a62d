//! `http`: raw bytes between the peer and a local HTTP service (`[server.X.service.Y]
//! http = <port>`), always on 127.0.0.1 — a service is reachable only through the cluster
//! and its ACL, never exposed on the network by malai.
//!
//! The TCP connection is made *before* `accept` is sent (like `tunnel`), so a service that
//! is down becomes a clear `error` (the agent's proxy turns it into a 502) instead of a
//! stream that closes silently. After `accept` the stream is raw bytes both ways with
//! half-close: the peer speaks HTTP (or anything after a CONNECT) straight to the service.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::request::reply;
use crate::protocol::Response;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve an allowed `http` request for the service `name` on `127.0.0.1:port`.
pub async fn serve<R, W>(name: &str, port: u16, r: &mut R, w: &mut W) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(service = name, %addr, error = %e, "service unreachable");
            let reason = format!("service {name} is not answering on {addr}: {e}");
            let _ = reply(w, &Response::Error { reason }).await;
            return true;
        }
        Err(_) => {
            let reason = format!("service {name} is not answering on {addr}: timed out");
            let _ = reply(w, &Response::Error { reason }).await;
            return true;
        }
    };
    super::tunnel::relay_tcp(tcp, &format!("service {name} at {addr}"), r, w).await
}
