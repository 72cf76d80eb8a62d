//! `tunnel`: raw bytes between the peer and the server's SSH endpoint.
//!
//! The sshd connection is made *before* `accept` is sent, so a dead sshd is reported to the
//! user as a clear error instead of a stream that closes silently. When the target is
//! `"embedded"`, or the configured sshd actively refuses the connection (nothing listens
//! there: a machine without sshd), the stream is served by the in-process SSH server
//! (`server::embedded`) instead.
//!
//! A tunnel that asked for resume (`protocol::resume`) gets a resumable session
//! (`server::resume`) when the caps allow: its sshd leg, or the embedded server's SSH
//! session, then outlives the stream.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::embedded::{self, EmbeddedContext};
use super::request::{Context, reply};
use super::resume;
use crate::config::SshTarget;
use crate::protocol::Response;
use crate::transport::pump;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve an allowed `tunnel` for `ctx.peer` on this machine, known as `server` in the
/// cluster file.
pub async fn serve<R, W>(
    ctx: &Context,
    server: &str,
    target: &SshTarget,
    resume: bool,
    r: &mut R,
    w: &mut W,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let embedded_ctx = || EmbeddedContext {
        state: ctx.state.clone(),
        peer: ctx.peer,
        server: server.to_string(),
        transport: ctx.transport,
    };
    // An iroh peer comes back on another connection to this same process; a stdinserver
    // client (`ssh-via`) on another ssh, whose forced command hands its stdio to it too.
    let addr = match target {
        SshTarget::Tcp(a) => a.clone(),
        SshTarget::Embedded => {
            return serve_embedded(ctx, server, embedded_ctx(), resume, r, w).await;
        }
    };
    let tcp = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            tracing::warn!(%addr, "ssh target refused the connection; serving the embedded ssh server instead");
            return serve_embedded(ctx, server, embedded_ctx(), resume, r, w).await;
        }
        Ok(Err(e)) => {
            tracing::error!(%addr, error = %e, "cannot reach ssh target");
            let reason = format!("server cannot reach its ssh at {addr}: {e}");
            let _ = reply(w, &Response::Error { reason }).await;
            return true;
        }
        Err(_) => {
            let reason = format!("server cannot reach its ssh at {addr}: timed out");
            let _ = reply(w, &Response::Error { reason }).await;
            return true;
        }
    };
    if resume {
        let request = crate::protocol::Request::Tunnel { port: None, resume };
        if let Some((slot, grant)) = resume::new_slot(ctx, server, request) {
            let _ = tcp.set_nodelay(true);
            if reply(w, &Response::AcceptResumable(grant)).await.is_err() {
                ctx.state.detached.end(&slot);
                return false;
            }
            let (tcp_r, tcp_w) = tcp.into_split();
            let parked = resume::Parked::new(tcp_r, tcp_w);
            return resume::serve(ctx, &slot, parked, 0, r, w).await;
        }
    }
    relay_tcp(tcp, &format!("ssh at {addr}"), r, w).await
}

/// A tunnel served by the in-process SSH server: resumable (its SSH session then lives in
/// a task of its own, `embedded::start_detachable`) when asked and the caps allow.
async fn serve_embedded<R, W>(
    ctx: &Context,
    server: &str,
    embedded_ctx: EmbeddedContext,
    resume: bool,
    r: &mut R,
    w: &mut W,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if resume {
        let request = crate::protocol::Request::Tunnel { port: None, resume };
        if let Some((slot, grant)) = resume::new_slot(ctx, server, request) {
            let leg = match embedded::start_detachable(embedded_ctx) {
                Ok(l) => l,
                Err(reason) => {
                    ctx.state.detached.end(&slot);
                    let _ = reply(w, &Response::Error { reason }).await;
                    return true;
                }
            };
            if reply(w, &Response::AcceptResumable(grant)).await.is_err() {
                ctx.state.detached.end(&slot);
                return false;
            }
            let (lr, lw) = tokio::io::split(leg);
            return resume::serve(ctx, &slot, resume::Parked::new(lr, lw), 0, r, w).await;
        }
    }
    embedded::serve(embedded_ctx, r, w).await
}

/// Answer `accept` and move raw bytes between the peer and a local TCP connection already
/// made (tunnel and http both connect first, so a dead target is an `error`, not a
/// silently closed stream). `what` names the target in logs.
pub(super) async fn relay_tcp<R, W>(tcp: TcpStream, what: &str, r: &mut R, w: &mut W) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    // Interactive keystrokes must not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    if reply(w, &Response::Accept).await.is_err() {
        return false;
    }
    let (mut tr, mut tw) = tcp.into_split();
    match pump::both_ways(r, &mut tw, &mut tr, w).await {
        Ok(m) => {
            tracing::info!(to = what, up = m.up, down = m.down, "stream closed");
            true
        }
        Err(e) => {
            tracing::info!(to = what, error = %e, "stream broke");
            false
        }
    }
}
