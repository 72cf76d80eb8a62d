//! `malai ssh proxy <host> [port]`: OpenSSH's ProxyCommand.
//!
//! Stdout is the SSH byte stream and nothing else: every error goes to stderr (from
//! `main`) and the exit code is 255, like ssh's own failures. Bytes move with no framing
//! and large buffers; EOF from ssh is passed on as a QUIC FIN and the server's FIN ends our
//! stdout, so scp/rsync/git see proper half-closes.

use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::names::TargetKind;
use crate::config::paths::Dirs;
use crate::protocol::Request;
use crate::session::{Route, SessionError, open, open_on, resolve, route};
use crate::transport::{pump, stdio};

pub async fn run(dirs: &Dirs, host: &str, port: Option<u16>) -> Result<(), SessionError> {
    let resolved = resolve(dirs, host)?;
    let server = match &resolved.target.kind {
        TargetKind::Server { .. } => resolved.server().cloned(),
        TargetKind::Service { .. } => {
            return Err(SessionError::NotAServer(host.to_string(), "service"));
        }
        TargetKind::Group { .. } => {
            return Err(SessionError::NotAServer(host.to_string(), "group"));
        }
    };
    let server = server.ok_or_else(|| SessionError::Local("server vanished".into()))?;
    // ssh-via servers need no malai key: always direct. Otherwise the routing policy: a
    // key holder gets our stdio (handover), or this process dials itself.
    let request = Request::Tunnel { port };
    let mut session = if server.ssh_via.is_some() {
        open(&resolved, &server, request).await?
    } else {
        match route(&resolved.dir, Some(&resolved.config)).await? {
            Route::Holder(holder) => return super::handover::proxy(holder, host, port).await,
            own => open_on(own, &resolved, &server, request).await?,
        }
    };
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
            return Err(SessionError::Killed(15));
        }
    };
    match result {
        Ok(m) => {
            tracing::info!(%host, up = m.up, down = m.down, "proxy done");
            session.finish().await;
            Ok(())
        }
        Err(e) => {
            let e = session.broken(SessionError::Lost(format!("connection lost: {e}")));
            session.abort().await;
            Err(e)
        }
    }
}

fn local(e: std::io::Error) -> SessionError {
    SessionError::Local(format!("local i/o: {e}"))
}
