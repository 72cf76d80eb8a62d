//! `malai ssh proxy <host> [port]`: OpenSSH's ProxyCommand.
//!
//! Stdout is the SSH byte stream and nothing else: every error goes to stderr (from
//! `main`) and the exit code is 255, like ssh's own failures. Bytes move with no framing
//! and large buffers; EOF from ssh is passed on as a QUIC FIN and the server's FIN ends our
//! stdout, so scp/rsync/git see proper half-closes.
//!
//! Over this process's own endpoint the tunnel is resumable (`session::resume`) when the
//! server offers it: a lost connection is redialled and the same byte stream goes on, so
//! ssh, scp, rsync and git above it ride out outages longer than the QUIC idle limit.
//! Through `ssh-via` a fresh ssh resumes it (`session::via_resume`); through a key holder
//! (the agent) the handover makes the holder run it resumable. `MALAI_RESUME=off` turns it
//! off (benchmarks).

use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::names::TargetKind;
use crate::config::paths::Dirs;
use crate::protocol::Request;
use crate::session::{
    Route, Session, SessionError, open, open_on, resolve, resume, route, via_resume,
};
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
    let request = Request::Tunnel {
        port,
        resume: false,
    };
    let session = if server.ssh_via.is_some() {
        if resume::enabled() {
            // Through ssh, resumable too: a fresh ssh resumes it (`session::via_resume`).
            let request = Request::Tunnel { port, resume: true };
            match via_resume::open(&resolved, &server, request, &[]).await? {
                resume::Opened::Plain(session) => *session,
                resume::Opened::Resumable(r) => return run_resumable(*r, host).await,
                resume::Opened::Via(r) => return run_resumable(*r, host).await,
            }
        } else {
            open(&resolved, &server, request).await?
        }
    } else {
        match route(&resolved.dir, Some(&resolved.config)).await? {
            Route::Holder(holder) => return super::handover::proxy(holder, host, port).await,
            Route::Own(own) if resume::enabled() => {
                let request = Request::Tunnel { port, resume: true };
                match resume::open(own, &resolved, &server, request).await? {
                    resume::Opened::Plain(session) => *session,
                    resume::Opened::Resumable(r) => return run_resumable(*r, host).await,
                    resume::Opened::Via(r) => return run_resumable(*r, host).await,
                }
            }
            own => open_on(own, &resolved, &server, request).await?,
        }
    };
    run_plain(session, host).await
}

/// How long a signalled resumable proxy may take to tell the server the session is over
/// (the session bounds its own close by `resume::CLOSE_GRACE`; this is the backstop).
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A resumable tunnel (`session::resume`) on our stdio: it outlives lost connections.
async fn run_resumable<C: resume::Carrier>(
    r: resume::Resumable<C>,
    host: &str,
) -> Result<(), SessionError> {
    let mut stdin = stdio::stdin();
    let mut stdout = stdio::stdout();
    let mut hup = signal(SignalKind::hangup()).map_err(local)?;
    let mut term = signal(SignalKind::terminate()).map_err(local)?;
    let close = tokio_util::sync::CancellationToken::new();
    let run = r.run(&mut stdin, &mut stdout, &close);
    tokio::pin!(run);
    let mut signalled = None;
    // After a signal the session gets this long to tell the server (its stream may be
    // blocked behind a full window); then we go, as the plain tunnel does.
    let grace = tokio::time::sleep(std::time::Duration::from_secs(86400 * 365));
    tokio::pin!(grace);
    loop {
        tokio::select! {
            _ = &mut grace => {
                tracing::info!(%host, "the session did not close in time after the signal; leaving");
                return match signalled {
                    Some(15) => Err(SessionError::Killed(15)),
                    _ => Ok(()),
                };
            }
            res = &mut run => {
                tracing::info!(%host, end = ?res, "resumable proxy done");
                return match (res, signalled) {
                    (_, Some(15)) => Err(SessionError::Killed(15)),
                    (Ok(_), _) => Ok(()),
                    (Err(e), _) => Err(e),
                };
            }
            // OpenSSH's SIGHUP at the end of its session (see `run_plain`): the session is
            // over, so tell the server to end its side rather than keep it detached.
            _ = hup.recv(), if signalled.is_none() => {
                tracing::info!(%host, "SIGHUP from ssh: closing the session");
                signalled = Some(1);
                close.cancel();
                grace.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
            _ = term.recv(), if signalled.is_none() => {
                signalled = Some(15);
                close.cancel();
                grace.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
            }
        }
    }
}

/// A plain tunnel (no resume): the session ends with its connection.
async fn run_plain(mut session: Session, host: &str) -> Result<(), SessionError> {
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
