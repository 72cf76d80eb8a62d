//! The embedded SSH server's relay between one session channel and its child process:
//! client data → child stdin (through a bounded queue, where input back-pressure happens),
//! child stdout/stderr → channel data (back-pressure: the client's window), then EOF, exit
//! status (or signal) and close — sshd's order. Split from `embedded.rs`, which answers
//! the channel requests.

use russh::server::Handle;
use russh::{ChannelId, Sig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::process::{ChildInput, ChildOutput, Running};
use crate::protocol::exec::ExitStatus;

/// Child output read size; russh splits it into packets.
const OUTPUT_BUF: usize = 64 * 1024;
/// Exit status of a command cut by revocation (malai's own failure).
pub const EXIT_REVOKED: u32 = 255;

/// Client → child input for one channel.
pub enum Input {
    Data(Vec<u8>),
    Eof,
}

/// Report a refusal the way a failed command would: stderr line, exit status, EOF, close.
pub async fn refuse(handle: Handle, channel: ChannelId, msg: String, code: u32) {
    let _ = handle.extended_data(channel, 1, msg.into_bytes()).await;
    let _ = handle.exit_status_request(channel, code).await;
    let _ = handle.eof(channel).await;
    let _ = handle.close(channel).await;
}

/// The tokens that end a channel's child early.
pub struct Stops {
    /// Channel closed or connection gone (also cancelled by `revoked`).
    pub stop: CancellationToken,
    /// The ACL no longer allows what runs: the client is told, then the channel closed.
    pub revoked: CancellationToken,
}

/// Move bytes between a channel and its child until the child's output ends, then send
/// EOF, the exit status and close. `stop` (channel closed, connection gone, revoked) hangs
/// it up.
pub async fn relay(
    handle: Handle,
    channel: ChannelId,
    mut child: Running,
    mut input: mpsc::Receiver<Input>,
    stops: Stops,
) {
    let Stops { stop, revoked } = stops;
    let stdin = std::mem::replace(&mut child.stdin, ChildInput::None);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let finished = {
        let output = relay_output(&handle, channel, stdout, stderr);
        let feed = relay_input(&mut input, stdin);
        tokio::pin!(output, feed);
        let mut feed_done = false;
        loop {
            tokio::select! {
                ok = &mut output => break ok,
                _ = &mut feed, if !feed_done => feed_done = true,
                _ = stop.cancelled() => break false,
            }
        }
    };
    if !finished {
        tracing::info!(pid = child.pid(), "embedded ssh: channel gone; hanging up");
        child.hang_up().await;
        return report_revoked(&handle, channel, &revoked).await;
    }
    let status = tokio::select! {
        st = child.wait() => st,
        _ = stop.cancelled() => {
            child.hang_up().await;
            return report_revoked(&handle, channel, &revoked).await;
        }
    };
    tracing::info!(pid = child.pid(), ?status, "embedded ssh: finished");
    let _ = handle.eof(channel).await;
    match status {
        ExitStatus::Code(c) => {
            let _ = handle.exit_status_request(channel, c as u32).await;
        }
        ExitStatus::Signal(name) => {
            let _ = handle
                .exit_signal_request(
                    channel,
                    Sig::Custom(name),
                    false,
                    String::new(),
                    String::new(),
                )
                .await;
        }
    }
    let _ = handle.close(channel).await;
}

/// Child stdout → channel data, stderr → extended data 1. `false` if the channel is gone.
async fn relay_output(
    handle: &Handle,
    channel: ChannelId,
    mut stdout: Option<ChildOutput>,
    mut stderr: Option<ChildOutput>,
) -> bool {
    let mut b1 = vec![0u8; OUTPUT_BUF];
    let mut b2 = vec![0u8; OUTPUT_BUF];
    while stdout.is_some() || stderr.is_some() {
        tokio::select! {
            n = read_opt(&mut stdout, &mut b1), if stdout.is_some() => match n {
                Ok(0) | Err(_) => stdout = None,
                Ok(n) => if handle.data(channel, b1[..n].to_vec()).await.is_err() {
                    return false;
                },
            },
            n = read_opt(&mut stderr, &mut b2), if stderr.is_some() => match n {
                Ok(0) | Err(_) => stderr = None,
                Ok(n) => if handle.extended_data(channel, 1, b2[..n].to_vec()).await.is_err() {
                    return false;
                },
            },
        }
    }
    true
}

async fn read_opt(s: &mut Option<ChildOutput>, buf: &mut [u8]) -> std::io::Result<usize> {
    match s {
        Some(s) => s.read(buf).await,
        None => Ok(0),
    }
}

/// Channel data → child stdin until the client's EOF (or the channel goes away).
async fn relay_input(input: &mut mpsc::Receiver<Input>, mut stdin: ChildInput) {
    while let Some(msg) = input.recv().await {
        match msg {
            Input::Data(d) => {
                let res = match &mut stdin {
                    ChildInput::Pipe(p) => p.write_all(&d).await,
                    ChildInput::Pty(p) => p.write_all(&d).await,
                    ChildInput::None => Ok(()),
                };
                if res.is_err() {
                    // The child closed its stdin: drop further input, like sshd.
                    stdin = ChildInput::None;
                }
            }
            Input::Eof => {
                match &mut stdin {
                    // On a pty, EOF is the terminal's EOF character.
                    ChildInput::Pty(p) => {
                        let _ = p.write_all(&[4]).await;
                    }
                    // Closing the pipe is the child's EOF.
                    _ => drop(stdin),
                }
                return;
            }
        }
    }
}

/// After a revocation cut a child: say so on stderr, exit 255, close (the channel itself
/// is still open, unlike when the client closed it).
async fn report_revoked(handle: &Handle, channel: ChannelId, revoked: &CancellationToken) {
    if revoked.is_cancelled() {
        let msg = "\r\nmalai: access revoked by a change of the cluster file\r\n";
        refuse(handle.clone(), channel, msg.into(), EXIT_REVOKED).await;
    }
}

/// The signal name a child is sent for an SSH `signal` request.
pub fn sig_name(sig: &Sig) -> &str {
    match sig {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(s) => s,
    }
}

/// A window dimension from the client: 0 means "unknown" (the default), too big is capped.
pub fn clamp16(v: u32, default: u16) -> u16 {
    match u16::try_from(v) {
        Ok(0) => default,
        Ok(v) => v,
        Err(_) => u16::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_sizes_are_clamped() {
        assert_eq!(clamp16(0, 80), 80);
        assert_eq!(clamp16(100, 80), 100);
        assert_eq!(clamp16(1 << 20, 80), u16::MAX);
    }
}
