//! Both directions of one exec session over its frames, as every client of `exec` runs
//! them: native exec on our stdio, groups on prefixed writers, and the key holder on the
//! descriptors a command passed it. Stdin (and window changes) become frames; frames
//! become stdout/stderr until the exit status.
//!
//! The server stops reading stdin once the command has exited, which can race our last
//! stdin frame: the exit status (or, if the connection really died, an error) still comes
//! from the output direction, so an input direction that ends early is only logged.

use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::exec::{self as frames, DataKind, ExecFrameError, ExitStatus, Frame, MAX_DATA};

/// Environment names a client may send and a server accepts (OpenSSH's default
/// `SendEnv`/`AcceptEnv LANG LC_*`).
pub fn env_allowed(name: &str) -> bool {
    name == "LANG" || name.starts_with("LC_")
}

/// What the remote side ended with, mapped to our exit code.
pub fn exit_code(st: &ExitStatus) -> i32 {
    match st {
        ExitStatus::Code(c) => *c,
        // ssh: a remote killed by a signal makes ssh exit 255.
        ExitStatus::Signal(_) => 255,
    }
}

/// Why the output direction ended without an exit status.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("connection closed before the command's exit status arrived")]
    Closed,
    #[error("connection lost{}", lost_detail(.0))]
    Lost(ExecFrameError),
    #[error("server sent an unexpected frame: {0}")]
    Unexpected(String),
}

/// The cause after "connection lost", unless it only says that again (a QUIC stream of a
/// closed connection reads as "connection lost").
fn lost_detail(e: &ExecFrameError) -> String {
    let text = e.to_string();
    if text.trim_start_matches("i/o: ") == "connection lost" {
        String::new()
    } else {
        format!(": {text}")
    }
}

/// How [`run`] ended without an exit status.
#[derive(Debug)]
pub enum PumpEnd<S> {
    /// The caller's `stop` future fired first (a signal, an abandoned request).
    Stopped(S),
    Broken(PumpError),
}

/// Run both directions until the exit status arrives, the output breaks, or `stop`
/// resolves. `windows` carries window-size changes (its sender dropped: none will come).
pub async fn run<R, W, I, O, E, S>(
    recv: &mut R,
    send: &mut W,
    stdin: Option<I>,
    windows: mpsc::Receiver<(u16, u16)>,
    out: &mut O,
    err: &mut E,
    stop: impl Future<Output = S>,
) -> Result<ExitStatus, PumpEnd<S>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    I: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let input = pump_input(stdin, windows, send);
    let output = pump_output(recv, out, err);
    tokio::pin!(input, output, stop);
    let mut input_done = false;
    loop {
        tokio::select! {
            r = &mut output => break r.map_err(PumpEnd::Broken),
            r = &mut input, if !input_done => {
                input_done = true;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "stdin direction ended early");
                }
            }
            s = &mut stop => break Err(PumpEnd::Stopped(s)),
        }
    }
}

/// Stdin (and window changes) → exec frames. Ends after `StdinEof` once no more window
/// changes can come.
pub async fn pump_input<I, W>(
    stdin: Option<I>,
    mut windows: mpsc::Receiver<(u16, u16)>,
    w: &mut W,
) -> std::io::Result<()>
where
    I: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let io = |e: ExecFrameError| match e {
        ExecFrameError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    };
    let mut stdin = stdin;
    let mut buf = vec![0u8; MAX_DATA];
    if stdin.is_none() {
        frames::write(w, &Frame::StdinEof).await.map_err(io)?;
    }
    let mut windows_open = true;
    loop {
        tokio::select! {
            n = async {
                match stdin.as_mut() {
                    Some(s) => s.read(&mut buf).await,
                    None => std::future::pending().await,
                }
            } => {
                match n? {
                    0 => {
                        frames::write(w, &Frame::StdinEof).await.map_err(io)?;
                        stdin = None;
                        if !windows_open {
                            return Ok(());
                        }
                    }
                    n => frames::write_data(w, DataKind::Stdin, &buf[..n]).await.map_err(io)?,
                }
            }
            size = windows.recv(), if windows_open => match size {
                Some((cols, rows)) => frames::write(w, &Frame::Window { cols, rows }).await.map_err(io)?,
                None => {
                    windows_open = false;
                    if stdin.is_none() {
                        return Ok(());
                    }
                }
            },
        }
    }
}

/// Frames → stdout/stderr, until `Exit`. A closed stdout (`| head`) is not our failure:
/// the rest is dropped, like ssh.
pub async fn pump_output<R, O, E>(
    r: &mut R,
    out: &mut O,
    err: &mut E,
) -> Result<ExitStatus, PumpError>
where
    R: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    loop {
        let frame = match frames::read(r).await {
            Ok(Some(f)) => f,
            Ok(None) => return Err(PumpError::Closed),
            Err(e) => return Err(PumpError::Lost(e)),
        };
        match frame {
            Frame::Stdout(d) => {
                let _ = out.write_all(&d).await;
            }
            Frame::Stderr(d) => {
                let _ = err.write_all(&d).await;
            }
            Frame::Exit(st) => {
                let _ = out.flush().await;
                let _ = err.flush().await;
                return Ok(st);
            }
            other => return Err(PumpError::Unexpected(format!("{other:?}"))),
        }
    }
}
