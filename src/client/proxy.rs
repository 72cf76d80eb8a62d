//! `malai ssh proxy <host> [port]`: OpenSSH's ProxyCommand.
//!
//! Stdout is the SSH byte stream and nothing else: every error goes to stderr (from
//! `main`) and the exit code is 255, like ssh's own failures. Bytes move with no framing
//! and large buffers; EOF from ssh is passed on as a QUIC FIN and the server's FIN ends our
//! stdout, so scp/rsync/git see proper half-closes.

use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};

use super::{ClientError, open, resolve};
use crate::config::names::TargetKind;
use crate::config::paths::Dirs;
use crate::protocol::Request;
use crate::transport::{pump, stdio};

pub async fn run(dirs: &Dirs, host: &str, port: Option<u16>) -> Result<(), ClientError> {
    let resolved = resolve(dirs, host)?;
    let server = match &resolved.target.kind {
        TargetKind::Server { .. } => resolved.server().cloned(),
        TargetKind::Service { .. } => {
            return Err(ClientError::NotAServer(host.to_string(), "service"));
        }
        TargetKind::Group { .. } => {
            return Err(ClientError::NotAServer(host.to_string(), "group"));
        }
    };
    let server = server.ok_or_else(|| ClientError::Refused("server vanished".into()))?;
    // Through the agent when one is set (ssh-via servers need no malai key: always direct).
    if server.ssh_via.is_none()
        && let crate::agent::client::Route::Agent(agent) =
            crate::agent::client::route(&resolved.dir).await?
    {
        return crate::agent::client::proxy(agent, host, port).await;
    }
    let mut session = open(&resolved, &server, Request::Tunnel { port }).await?;
    let mut stdin = stdio::stdin();
    let mut stdout = stdio::stdout();
    // OpenSSH sends its ProxyCommand SIGHUP as soon as the session is over, often before
    // we have seen EOF on stdin: treat that as the end of the upload, not as a failure, so
    // the server gets a clean FIN instead of waiting for an idle timeout.
    let mut hup = signal(SignalKind::hangup()).map_err(local)?;
    let mut term = signal(SignalKind::terminate()).map_err(local)?;
    let result = tokio::select! {
        r = pump::both_ways(&mut stdin, &mut session.send, &mut session.recv, &mut stdout) => r,
        _ = hup.recv() => {
            tracing::info!(%host, "SIGHUP from ssh: ending the tunnel");
            let _ = session.send.shutdown().await;
            session.linger(std::time::Duration::from_millis(500)).await;
            return Ok(());
        }
        _ = term.recv() => {
            session.abort().await;
            return Err(ClientError::Killed(15));
        }
    };
    match result {
        Ok(m) => {
            tracing::info!(%host, up = m.up, down = m.down, "proxy done");
            session.finish().await;
            Ok(())
        }
        Err(e) => {
            let e = session.broken(ClientError::Refused(format!("connection lost: {e}")));
            session.abort().await;
            Err(e)
        }
    }
}

fn local(e: std::io::Error) -> ClientError {
    ClientError::Refused(format!("local i/o: {e}"))
}
