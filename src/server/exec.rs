//! `exec`: run a command for the peer and relay its stdio as frames (`protocol::exec`).
//!
//! The program was decided by the ACL: full access → `$SHELL -c`, command-scoped →
//! `execvp` of the exact argv. The spawn happens *before* `accept`, so "no such program"
//! reaches the user as a clear error. If the client goes away (stream error or EOF without
//! us having sent `Exit`, or the connection found closed by a liveness probe while the
//! command is quiet), the child's whole session is hung up and killed, whether its output
//! is still open or it is only being waited for.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::process::{ChildControl, ChildInput, ChildOutput, Program, Running, SpawnSpec, spawn};
use super::request::{Context, reply};
use super::resume;
use crate::protocol::exec::{self as frames, DataKind, ExecRequest, Frame, MAX_DATA};
use crate::protocol::{Request, Response};

/// Why a request naming `asked` as its user cannot run here, if it cannot: this server
/// cannot switch users, so any name but its own is refused (never silently run as `own`).
pub fn user_refusal(asked: Option<&str>, own: &str) -> Option<String> {
    let asked = asked?;
    (asked != own).then(|| {
        format!(
            "this server runs commands only as its own user {own:?}, not as {asked:?} (drop -l, user@ or -o User=)"
        )
    })
}

/// Serve an allowed `exec` for `ctx.peer` on this machine, known as `server` in the cluster
/// file: spawn, answer, relay. A request that asked for resume over iroh gets a resumable
/// session when the caps allow ([`serve_resumable`]); otherwise the command lives as long as
/// this stream.
pub async fn serve<R, W>(
    ctx: &Context,
    server: &str,
    program: Program,
    req: ExecRequest,
    r: &mut R,
    w: &mut W,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let resume = req.resume;
    let asked = Request::Exec(req.clone());
    let Some(mut child) = start(program, req, ctx.peer.to_string(), w).await else {
        return true;
    };
    if resume && let Some((slot, grant)) = resume::new_slot(ctx, server, asked) {
        if reply(w, &Response::AcceptResumable(grant)).await.is_err() {
            ctx.state.detached.end(&slot);
            child.hang_up().await;
            return false;
        }
        return serve_resumable(ctx, &slot, child, r, w).await;
    }
    if reply(w, &Response::Accept).await.is_err() {
        child.hang_up().await;
        return false;
    }
    relay(child, r, w).await
}

/// Bytes the pipe between a resumable exec's command and its session's engine holds.
const SESSION_PIPE: usize = 256 * 1024;

/// A resumable exec: the command's frames run over an in-process pipe whose other end is the
/// session's local leg (`server::resume`), so the command outlives this stream. The relay
/// runs in a task of its own; it ends as the command does, or hangs the command up when the
/// session ends without it (expired, revoked, closed by the client): the leg then closes.
async fn serve_resumable<R, W>(
    ctx: &Context,
    slot: &std::sync::Arc<resume::Slot>,
    child: Running,
    r: &mut R,
    w: &mut W,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (leg, command) = tokio::io::duplex(SESSION_PIPE);
    tokio::spawn(async move {
        let (mut cr, mut cw) = tokio::io::split(command);
        relay(child, &mut cr, &mut cw).await;
        // The client's last frames (its stdin's end, a window change) may still be on
        // their way after `Exit`: read them to the session's end, as a stream's unread
        // rest is dropped, so the engine never finds its leg broken.
        let _ = tokio::io::copy(&mut cr, &mut tokio::io::sink()).await;
    });
    let (lr, lw) = tokio::io::split(leg);
    resume::serve(ctx, slot, resume::Parked::new(lr, lw), 0, r, w).await
}

/// Check the user and spawn the command; on failure the client has been answered.
async fn start<W: AsyncWrite + Unpin>(
    program: Program,
    req: ExecRequest,
    peer: String,
    w: &mut W,
) -> Option<Running> {
    if let Some(reason) = user_refusal(req.user.as_deref(), &super::process::own_user()) {
        tracing::info!(%reason, "exec refused: another user asked for");
        let _ = reply(w, &Response::Error { reason }).await;
        return None;
    }
    // Full access only: a forwarded agent is part of forwarding.
    let agent_socket = match &program {
        Program::Shell(_) => super::forward::agent_socket_for(&peer, &req.env),
        Program::Argv(_) => None,
    };
    let spec = SpawnSpec {
        program,
        env: req.env,
        pty: req.pty,
        peer,
        agent_socket,
    };
    match spawn(&spec) {
        Ok(c) => {
            tracing::info!(pid = c.pid(), "exec started");
            Some(c)
        }
        Err(e) => {
            let what = match &spec.program {
                Program::Argv(a) => a.first().cloned().unwrap_or_default(),
                Program::Shell(_) => "the login shell".into(),
            };
            let reason = format!("cannot run {what}: {e}");
            tracing::info!(%reason, "exec spawn failed");
            let _ = reply(w, &Response::Error { reason }).await;
            None
        }
    }
}

/// Relay an accepted command's stdio as frames on `r`/`w` until it exits (then `Exit`) or
/// the client goes away (then it is hung up).
async fn relay<R, W>(mut child: Running, r: &mut R, w: &mut W) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let stdin = std::mem::replace(&mut child.stdin, ChildInput::None);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();

    // The client is watched for the command's whole life, so its going away always hangs
    // the command up: input runs until the client sends EOF and then keeps reading (window
    // changes, signals, the stream's end); output runs until the child's streams close;
    // after that the child's exit is awaited while input and the liveness probe go on.
    let input = relay_input(r, stdin, child.control());
    tokio::pin!(input);
    let mut input_done = false;
    let output_result = {
        let output = relay_output(stdout, stderr, &mut *w);
        tokio::pin!(output);
        loop {
            tokio::select! {
                res = &mut output => break res,
                gone = &mut input, if !input_done => {
                    input_done = true;
                    if gone {
                        break Err(std::io::Error::other("client went away"));
                    }
                }
            }
        }
    };
    let waited = match output_result {
        Err(e) => Err(e),
        Ok(()) => {
            // The child closed its output (or handed it on) but may still be running.
            let mut probe = liveness_probe();
            let wait = child.wait();
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    st = &mut wait => break Ok(st),
                    gone = &mut input, if !input_done => {
                        input_done = true;
                        if gone {
                            break Err(std::io::Error::other("client went away"));
                        }
                    }
                    _ = probe.tick() => {
                        if let Err(e) = w.write(&[]).await {
                            break Err(e);
                        }
                    }
                }
            }
        }
    };
    let status = match waited {
        Ok(status) => status,
        Err(e) => {
            tracing::info!(pid = child.pid(), error = %e, "exec relay ended; hanging up");
            child.hang_up().await;
            return false;
        }
    };
    tracing::info!(pid = child.pid(), ?status, "exec finished");
    if frames::write(w, &Frame::Exit(status)).await.is_err() {
        return false;
    }
    let _ = w.flush().await;
    let _ = w.shutdown().await;
    true
}

/// How often a quiet command checks that its client is still there.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Ticks for [`PROBE_EVERY`]: an empty write to the client's stream at each one. Input
/// notices a departed client only while it is reading; when the child neither reads its
/// stdin (input is blocked writing to it) nor writes output, nothing else would. On an
/// iroh stream an empty write fails once the connection is closed or lost (the client
/// aborted, or its keep-alives stopped); on a pipe or socket it is a no-op.
fn liveness_probe() -> tokio::time::Interval {
    let mut probe = tokio::time::interval(PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    probe.reset();
    probe
}

/// Child output → frames, until both streams end (or the client is found gone).
async fn relay_output<W: AsyncWrite + Unpin>(
    mut stdout: Option<ChildOutput>,
    mut stderr: Option<ChildOutput>,
    w: &mut W,
) -> std::io::Result<()> {
    let mut b1 = vec![0u8; MAX_DATA];
    let mut b2 = vec![0u8; MAX_DATA];
    let mut probe = liveness_probe();
    while stdout.is_some() || stderr.is_some() {
        tokio::select! {
            _ = probe.tick() => w.write(&[]).await.map(drop)?,
            n = read_opt(&mut stdout, &mut b1), if stdout.is_some() => {
                match n? {
                    0 => stdout = None,
                    n => frames::write_data(w, DataKind::Stdout, &b1[..n]).await.map_err(to_io)?,
                }
            }
            n = read_opt(&mut stderr, &mut b2), if stderr.is_some() => {
                match n? {
                    0 => stderr = None,
                    n => frames::write_data(w, DataKind::Stderr, &b2[..n]).await.map_err(to_io)?,
                }
            }
        }
    }
    Ok(())
}

async fn read_opt(s: &mut Option<ChildOutput>, buf: &mut [u8]) -> std::io::Result<usize> {
    match s {
        Some(s) => s.read(buf).await,
        None => Ok(0),
    }
}

fn to_io(e: frames::ExecFrameError) -> std::io::Error {
    match e {
        frames::ExecFrameError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

/// Frames from the client → child stdin / window / signals. Returns `true` if the client
/// went away (a stream error, or its stream ended without `StdinEof`), `false` when input
/// is simply over (the client keeps waiting for our output and `Exit`).
async fn relay_input<R: AsyncRead + Unpin>(
    r: &mut R,
    mut stdin: ChildInput,
    child: ChildControl,
) -> bool {
    let mut eof_sent = false;
    loop {
        let frame = match frames::read(r).await {
            Ok(Some(f)) => f,
            // The client closes its side only when it is done (after Exit) or gone.
            Ok(None) => return !eof_sent,
            Err(e) => {
                tracing::info!(error = %e, "exec input ended");
                return true;
            }
        };
        match frame {
            Frame::Stdin(data) => {
                let res = match &mut stdin {
                    ChildInput::Pipe(p) => p.write_all(&data).await,
                    ChildInput::Pty(p) => p.write_all(&data).await,
                    ChildInput::None => Ok(()),
                };
                if res.is_err() {
                    // The child closed its stdin; drop further input like sshd does.
                    stdin = ChildInput::None;
                }
            }
            Frame::StdinEof => {
                eof_sent = true;
                match &mut stdin {
                    // EOF on a pty is the terminal's EOF character.
                    ChildInput::Pty(p) => {
                        let _ = p.write_all(&[4]).await;
                    }
                    _ => stdin = ChildInput::None,
                }
            }
            Frame::Window { cols, rows } => child.resize(cols, rows),
            Frame::Signal(name) => {
                child.signal(&name);
            }
            Frame::Stdout(_) | Frame::Stderr(_) | Frame::Exit(_) => {
                tracing::info!("client sent a server-only exec frame");
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::user_refusal;

    #[test]
    fn only_the_servers_own_user_runs() {
        assert_eq!(user_refusal(None, "root"), None);
        assert_eq!(user_refusal(Some("root"), "root"), None);
        let reason = user_refusal(Some("nobody"), "root").expect("refused");
        assert_eq!(
            reason,
            "this server runs commands only as its own user \"root\", not as \"nobody\" (drop -l, user@ or -o User=)"
        );
        // Names are compared exactly, as login names are.
        assert!(user_refusal(Some("Root"), "root").is_some());
    }
}
