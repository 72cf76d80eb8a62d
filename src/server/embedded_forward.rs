//! Forwarding in the embedded SSH server: what OpenSSH's `-L`, `-D`, `-W`, `-R`, unix
//! socket forwards and `-A` ask sshd for, served from russh channel events.
//!
//! The handler (`embedded.rs`) decides each request with `server::forward::check` (the ACL
//! and the audit log) inside the russh callback, then hands the slow part to a task here:
//!
//! - `direct-tcpip` / `direct-streamlocal@openssh.com` ([`open_local`]): connect on the
//!   server, *then* accept the channel (or refuse it with "connect failed"), so the client
//!   learns about an unreachable target the way sshd reports it.
//! - `tcpip-forward` / `streamlocal-forward@openssh.com` ([`serve_remote`]): the listener
//!   is bound inside the callback (the reply carries the allocated port); every accepted
//!   connection becomes a `forwarded-tcpip` / `forwarded-streamlocal@openssh.com` channel
//!   back to the client.
//! - `auth-agent-req@openssh.com` ([`serve_agent`]): a private socket on the server whose
//!   connections become `auth-agent@openssh.com` channels back to the client; its path is
//!   the session's `SSH_AUTH_SOCK`.
//!
//! Every task ends when its cancellation token fires: the listener's own (cancel request,
//! channel close) and, above it, the connection's (the SSH session is gone).

use std::path::PathBuf;

use russh::server::{ChannelOpenHandle, Handle, Msg};
use russh::{Channel, ChannelOpenFailure};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use super::forward::{self, AgentSocket};

/// A refusal with malai's reason as the description OpenSSH prints
/// ("open failed: administratively prohibited: <reason>").
pub fn prohibited(reason: &str) -> ChannelOpenFailure {
    ChannelOpenFailure::Other {
        code: 1,
        reason: format!("malai: {reason}"),
    }
}

/// Where a local forward goes on the server.
pub enum Target {
    Tcp(String, u16),
    Unix(String),
}

/// Connect to `target`, then accept the channel and splice; refuse it if the connect
/// fails. Runs as its own task.
pub async fn open_local(
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    target: Target,
    stop: CancellationToken,
) {
    let connected = match &target {
        Target::Tcp(host, port) => forward::connect_tcp(host, *port).await.map(Either::Tcp),
        Target::Unix(path) => forward::connect_unix(path).await.map(Either::Unix),
    };
    let mut conn = match connected {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(error = %e, "embedded ssh: forward target unreachable");
            reply
                .reject(ChannelOpenFailure::Other {
                    code: 2,
                    reason: e.to_string(),
                })
                .await;
            return;
        }
    };
    reply.accept().await;
    let mut ch = channel.into_stream();
    let res = tokio::select! {
        r = async {
            match &mut conn {
                Either::Tcp(s) => forward::splice(&mut ch, s).await,
                Either::Unix(s) => forward::splice(&mut ch, s).await,
            }
        } => r,
        _ = stop.cancelled() => return,
    };
    match res {
        Ok((up, down)) => tracing::debug!(up, down, "embedded ssh: forward closed"),
        Err(e) => tracing::debug!(error = %e, "embedded ssh: forward broke"),
    }
}

enum Either {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// A remote forward's listener.
pub enum Listener {
    /// With the address and port the client asked for (port: the allocated one for 0),
    /// which `forwarded-tcpip` must name so the client finds its forward.
    Tcp(TcpListener, String, u32),
    /// With the socket path, removed when the forward ends.
    Unix(UnixListener, String),
}

/// Accept connections on a remote forward's listener until `stop`; each one is opened as
/// a channel back to the client and spliced.
pub async fn serve_remote(handle: Handle, listener: Listener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            a = accept(&listener) => a,
        };
        let (conn, origin) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(error = %e, "embedded ssh: remote forward accept failed");
                // EMFILE and friends: do not spin.
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let stop = stop.clone();
        let open = match &listener {
            Listener::Tcp(_, addr, port) => Open::Tcp(addr.clone(), *port, origin),
            Listener::Unix(_, path) => Open::Unix(path.clone()),
        };
        tokio::spawn(async move {
            let channel = match &open {
                Open::Tcp(addr, port, (oa, op)) => {
                    handle
                        .channel_open_forwarded_tcpip(addr.clone(), *port, oa.clone(), *op)
                        .await
                }
                Open::Unix(path) => {
                    handle
                        .channel_open_forwarded_streamlocal(path.clone())
                        .await
                }
            };
            let channel = match channel {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(error = %e, "embedded ssh: client refused a remote-forward channel");
                    return;
                }
            };
            splice_channel(channel, conn, stop).await;
        });
    }
    if let Listener::Unix(_, path) = &listener {
        forward::remove_socket(std::path::Path::new(path));
    }
}

enum Open {
    Tcp(String, u32, (String, u32)),
    Unix(String),
}

async fn accept(l: &Listener) -> std::io::Result<(Either, (String, u32))> {
    match l {
        Listener::Tcp(l, _, _) => {
            let (s, a) = l.accept().await?;
            let _ = s.set_nodelay(true);
            Ok((Either::Tcp(s), (a.ip().to_string(), u32::from(a.port()))))
        }
        Listener::Unix(l, _) => {
            let (s, _) = l.accept().await?;
            Ok((Either::Unix(s), (String::new(), 0)))
        }
    }
}

async fn splice_channel(channel: Channel<Msg>, mut conn: Either, stop: CancellationToken) {
    let mut ch = channel.into_stream();
    tokio::select! {
        _ = async {
            match &mut conn {
                Either::Tcp(s) => forward::splice(&mut ch, s).await,
                Either::Unix(s) => forward::splice(&mut ch, s).await,
            }
        } => {}
        _ = stop.cancelled() => {}
    }
}

/// Serve a forwarded agent: each connection to `sock` becomes an `auth-agent@openssh.com`
/// channel to the client. The socket's directory is removed when this ends.
pub async fn serve_agent(handle: Handle, sock: AgentSocket, stop: CancellationToken) {
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            a = sock.listener.accept() => a,
        };
        let conn = match conn {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::info!(error = %e, "embedded ssh: agent socket accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            match handle.channel_open_agent().await {
                Ok(channel) => splice_channel(channel, Either::Unix(conn), stop).await,
                Err(e) => {
                    tracing::info!(error = %e, "embedded ssh: client refused an agent channel")
                }
            }
        });
    }
    drop(sock);
}

/// The agent socket's path for `SSH_AUTH_SOCK`.
pub fn agent_path(sock: &AgentSocket) -> PathBuf {
    sock.path()
}
