//! `malai ssh proxy <host> [port]`: OpenSSH's ProxyCommand.
//!
//! Stdout is the SSH byte stream and nothing else: every error goes to stderr (from
//! `main`) and the exit code is 255, like ssh's own failures. Bytes move with no framing
//! and large buffers; EOF from ssh is passed on as a QUIC FIN and the server's FIN ends our
//! stdout, so scp/rsync/git see proper half-closes.

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
    let mut session = open(&resolved, &server, Request::Tunnel { port }).await?;
    let mut stdin = stdio::stdin();
    let mut stdout = stdio::stdout();
    let result = pump::both_ways(
        &mut stdin,
        &mut session.send,
        &mut session.recv,
        &mut stdout,
    )
    .await;
    match result {
        Ok(m) => {
            tracing::info!(%host, up = m.up, down = m.down, "proxy done");
            session.finish().await;
            Ok(())
        }
        Err(e) => {
            session.abort().await;
            Err(ClientError::Refused(format!("connection lost: {e}")))
        }
    }
}
