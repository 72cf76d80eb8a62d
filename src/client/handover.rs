//! Proxy and exec through a key holder (the agent, or the server's control socket) that
//! takes this command's stdio descriptors: it runs the request on its pooled connection; we
//! keep the terminal (raw mode, window size), pass signals on, and relay the exit status.
//! Whether to hand over is the routing policy's answer (`session::route`); servers reached
//! `ssh-via` are always direct: no malai key is involved.

use std::os::fd::RawFd;
use std::path::Path;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use super::tty::window_size;
use crate::control::client::ControlClient;
use crate::control::protocol::{FromHolder, OpenRequest, ToHolder};
use crate::protocol::exec_pump::exit_code;
use crate::session::SessionError;

/// Send an `open` with this process's stdio (stdin only when `stdin`; stderr for exec).
async fn open_stdio(
    holder: &mut ControlClient,
    host: &str,
    request: OpenRequest,
    stdin: bool,
) -> Result<(), SessionError> {
    let mut fds: Vec<RawFd> = vec![];
    if stdin {
        fds.push(0);
    }
    fds.push(1);
    if request.output_fds() > 1 {
        fds.push(2);
    }
    holder
        .open(host, request, stdin, &fds)
        .await
        .map_err(SessionError::from_holder)
}

async fn next(holder: &mut ControlClient) -> Result<FromHolder, SessionError> {
    holder
        .next()
        .await
        .map_err(|e| SessionError::Holder(e.to_string()))
}

/// Point fds 0 and 1 at /dev/null: the agent now holds the only live copies, so the
/// caller (ssh) sees EOF on our stdout exactly when the agent closes it.
fn give_up_stdio() {
    // SAFETY: open/dup2/close on this process's own descriptors.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
}

/// `malai ssh proxy` through the agent.
pub async fn proxy(
    mut holder: ControlClient,
    host: &str,
    port: Option<u16>,
) -> Result<(), SessionError> {
    // Signals first, so none arriving after the handover kills us before we pass it on.
    let mut hup = signal(SignalKind::hangup()).map_err(local)?;
    let mut term = signal(SignalKind::terminate()).map_err(local)?;
    let tunnel = OpenRequest::Tunnel {
        port,
        resume: crate::session::resume::enabled(),
    };
    open_stdio(&mut holder, host, tunnel, true).await?;
    give_up_stdio();
    let end = tokio::select! {
        r = next(&mut holder) => r?,
        _ = hup.recv() => {
            // OpenSSH's "session over": end the upload cleanly, like the direct proxy.
            let _ = holder.send(&ToHolder::Finish).await;
            return match tokio::time::timeout(Duration::from_secs(1), next(&mut holder)).await {
                Ok(Ok(FromHolder::Done)) | Err(_) => Ok(()),
                Ok(Ok(FromHolder::Broken { message })) => Err(SessionError::Lost(message)),
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e),
            };
        }
        _ = term.recv() => return Err(SessionError::Killed(15)),
    };
    match end {
        FromHolder::Done => Ok(()),
        FromHolder::Broken { message } => Err(SessionError::Lost(message)),
        other => Err(SessionError::Holder(format!("agent sent {other:?}"))),
    }
}

/// Native exec through the agent; returns the exit code to use. `on_opened` runs once the
/// server accepted (the caller enters raw mode there); its guard lives until the end.
pub async fn exec<G>(
    mut holder: ControlClient,
    host: &str,
    request: crate::protocol::exec::ExecRequest,
    stdin: bool,
    on_opened: impl FnOnce() -> G,
) -> Result<i32, SessionError> {
    let pty = request.pty.is_some();
    let sent = request.pty.as_ref().map(|p| (p.cols, p.rows));
    let mut term = signal(SignalKind::terminate()).map_err(local)?;
    let mut int = signal(SignalKind::interrupt()).map_err(local)?;
    let mut hup = signal(SignalKind::hangup()).map_err(local)?;
    let mut winch = signal(SignalKind::window_change()).map_err(local)?;
    open_stdio(&mut holder, host, OpenRequest::Exec(request), stdin).await?;
    let _guard = on_opened();
    // A resize between reading the size for the request and listening for SIGWINCH.
    if let (Some(sent), Some(now)) = (sent, window_size())
        && now != sent
    {
        holder
            .send(&ToHolder::Window {
                cols: now.0,
                rows: now.1,
            })
            .await
            .map_err(|e| SessionError::Holder(e.to_string()))?;
    }
    loop {
        let end = tokio::select! {
            r = next(&mut holder) => r?,
            _ = winch.recv(), if pty => {
                if let Some((cols, rows)) = window_size() {
                    holder
                        .send(&ToHolder::Window { cols, rows })
                        .await
                        .map_err(|e| SessionError::Holder(e.to_string()))?;
                }
                continue;
            }
            // Dropping the socket makes the agent abandon the request at once.
            _ = term.recv() => return Err(SessionError::Killed(15)),
            _ = int.recv() => return Err(SessionError::Killed(2)),
            _ = hup.recv() => return Err(SessionError::Killed(1)),
        };
        return match end {
            FromHolder::Exit { status } => Ok(exit_code(&status)),
            FromHolder::Broken { message } => Err(SessionError::Lost(message)),
            other => Err(SessionError::Holder(format!("agent sent {other:?}"))),
        };
    }
}

/// Exec through the agent at `path` with no stdin and the command's output copied into
/// `out`/`err` (a group's prefixed writers): the agent writes into pipes we read.
pub async fn exec_into<O, E>(
    path: &Path,
    host: &str,
    request: crate::protocol::exec::ExecRequest,
    out: &mut O,
    err: &mut E,
) -> Result<i32, SessionError>
where
    O: tokio::io::AsyncWrite + Unpin,
    E: tokio::io::AsyncWrite + Unpin,
{
    use std::os::fd::AsRawFd;
    let mut holder = ControlClient::connect(path).await?;
    let (out_tx, mut out_rx) = tokio::net::unix::pipe::pipe().map_err(local)?;
    let (err_tx, mut err_rx) = tokio::net::unix::pipe::pipe().map_err(local)?;
    let fds = [out_tx.as_raw_fd(), err_tx.as_raw_fd()];
    let opened = holder
        .open(host, OpenRequest::Exec(request), false, &fds)
        .await
        .map_err(SessionError::from_holder);
    // Only the agent's copies may keep the pipes open now: EOF comes when it closes them.
    drop(out_tx);
    drop(err_tx);
    opened?;
    let (o, e, end) = tokio::join!(
        tokio::io::copy(&mut out_rx, out),
        tokio::io::copy(&mut err_rx, err),
        next(&mut holder)
    );
    if let Err(e) = o.and(e) {
        tracing::debug!(error = %e, "copying a group member's output");
    }
    match end? {
        FromHolder::Exit { status } => Ok(exit_code(&status)),
        FromHolder::Broken { message } => Err(SessionError::Lost(message)),
        other => Err(SessionError::Holder(format!("agent sent {other:?}"))),
    }
}

fn local(e: std::io::Error) -> SessionError {
    SessionError::Local(format!("local i/o: {e}"))
}
