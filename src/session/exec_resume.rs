//! Native exec over a resumable session (issue 18): the exec frames (`protocol::exec_pump`)
//! run over an in-process pipe whose other end is the resumable stream, so a lost
//! connection is redialled and the command's stdio goes on where it stopped. One driver
//! for both clients of a resumable exec: a command on its own endpoint
//! ([`super::resume::Resumable`]) and a key holder running it for a command
//! (`keyholder::resume`).

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::SessionError;
use super::resume::End;
use crate::protocol::exec::ExitStatus;
use crate::protocol::exec_pump::{self, PumpEnd, PumpError};

/// Bytes the pipe between the exec frames and a resumable session's engine holds.
const SESSION_PIPE: usize = 256 * 1024;
/// After `Exit`, how long the session gets to finish (both ends' last bytes acknowledged)
/// before we close it: the server then drops its side at once instead of keeping it.
const FINISH_WITHIN: Duration = Duration::from_secs(10);
/// After [`FINISH_WITHIN`], how long the session gets to tell the server it is over.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// After `stop`, how long the session gets to tell the server it is over (ssh exits at
/// once on a signal: this is a user waiting).
const STOP_GRACE: Duration = Duration::from_millis(300);

/// A resumable session that runs on a local byte stream until it ends; `close` ends it
/// now and tells the server to end its side too.
pub(crate) trait RunResumable {
    async fn run<LR, LW>(
        self,
        local_r: &mut LR,
        local_w: &mut LW,
        close: &CancellationToken,
    ) -> Result<End, SessionError>
    where
        LR: AsyncRead + Unpin + ?Sized,
        LW: AsyncWrite + Unpin + ?Sized;
}

impl<C: super::resume::Carrier> RunResumable for super::resume::Resumable<C> {
    async fn run<LR, LW>(
        self,
        local_r: &mut LR,
        local_w: &mut LW,
        close: &CancellationToken,
    ) -> Result<End, SessionError>
    where
        LR: AsyncRead + Unpin + ?Sized,
        LW: AsyncWrite + Unpin + ?Sized,
    {
        super::resume::Resumable::run(self, local_r, local_w, close).await
    }
}

/// How [`drive`] ended without an exit status.
#[derive(Debug)]
pub enum ExecEnd<T> {
    /// `stop` fired (a signal, an abandoned request): the session was closed.
    Stopped(T),
    /// The exec frames broke before the exit status.
    Broken(PumpError),
    /// The session could not go on (the server restarted, refused the resume, …).
    Session(SessionError),
}

/// Run the exec frames of `session` with `stdin`, window sizes from `windows`, and the
/// command's output to `out`/`err`, until the exit status arrives or `stop` fires (which
/// closes the session: the server hangs the command up).
pub(crate) async fn drive<S, I, O, E, T>(
    session: S,
    stdin: Option<I>,
    windows: tokio::sync::mpsc::Receiver<(u16, u16)>,
    out: &mut O,
    err: &mut E,
    stop: impl std::future::Future<Output = T>,
) -> Result<ExitStatus, ExecEnd<T>>
where
    S: RunResumable,
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let (frames, leg) = tokio::io::duplex(SESSION_PIPE);
    let (mut leg_r, mut leg_w) = tokio::io::split(leg);
    let (mut frames_r, mut frames_w) = tokio::io::split(frames);
    let close = CancellationToken::new();
    let run = session.run(&mut leg_r, &mut leg_w, &close);
    tokio::pin!(run);
    let mut ran = None;
    let pumped = {
        let pump = exec_pump::run(&mut frames_r, &mut frames_w, stdin, windows, out, err, stop);
        tokio::pin!(pump);
        loop {
            tokio::select! {
                p = &mut pump => break p,
                r = &mut run, if ran.is_none() => match r {
                    // Everything the server sent is in the pipe: the pump reads it on.
                    Ok(end) => ran = Some(end),
                    Err(e) => return Err(ExecEnd::Session(e)),
                },
            }
        }
    };
    match pumped {
        Ok(status) => {
            // Our side ends: the stream sends its eof and finishes (what may follow `Exit`
            // is read and dropped, as a plain stream's rest is).
            let _ = frames_w.shutdown().await;
            if ran.is_none() {
                let finish = async {
                    let mut sink = tokio::io::sink();
                    let drain = tokio::io::copy(&mut frames_r, &mut sink);
                    let (_, r) = tokio::join!(drain, &mut run);
                    r
                };
                if tokio::time::timeout(FINISH_WITHIN, finish).await.is_err() {
                    close.cancel();
                    let _ = tokio::time::timeout(CLOSE_GRACE, &mut run).await;
                }
            }
            Ok(status)
        }
        Err(PumpEnd::Stopped(n)) => {
            // Tell the server the session is over; a stream blocked behind a full window
            // cannot, and then our connection's close tells it.
            close.cancel();
            if ran.is_none() {
                let _ = tokio::time::timeout(STOP_GRACE, &mut run).await;
            }
            Err(ExecEnd::Stopped(n))
        }
        Err(PumpEnd::Broken(e)) => Err(ExecEnd::Broken(e)),
    }
}
