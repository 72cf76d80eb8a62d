//! Raw bytes both ways between two streams, with half-close.
//!
//! Used by `tunnel` and `http` on both ends. Why not `tokio::io::copy_bidirectional`: its
//! 8 KiB buffer costs about 3× on bulk transfers here (see FACTS.md), and we need "an error
//! in one direction ends both" — a server killed mid-transfer must end the client, not leave
//! it blocked reading stdin.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Buffer per direction. Large reads/writes matter most on the QUIC side (fewer wakeups);
/// 256 KiB was the knee of the curve measured here.
pub const PUMP_BUF: usize = 256 * 1024;

/// Bytes moved each way.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    pub up: u64,
    pub down: u64,
}

/// Which direction failed.
#[derive(Debug, thiserror::Error)]
pub enum PumpError {
    #[error("sending: {0}")]
    Up(std::io::Error),
    #[error("receiving: {0}")]
    Down(std::io::Error),
}

/// Copy `r` to `w` until EOF, then shut `w` down (FIN/EOF to the other side).
pub async fn copy_half<R, W>(r: &mut R, w: &mut W) -> std::io::Result<u64>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buf = vec![0u8; PUMP_BUF];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.flush().await?;
            // Shutting down a socket whose peer already left is not an error for us.
            let _ = w.shutdown().await;
            return Ok(total);
        }
        w.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}

/// Run both directions until both reach EOF, or until either fails (then the other is
/// dropped at once).
pub async fn both_ways<R1, W1, R2, W2>(
    up_r: &mut R1,
    up_w: &mut W1,
    down_r: &mut R2,
    down_w: &mut W2,
) -> Result<Moved, PumpError>
where
    R1: AsyncRead + Unpin + ?Sized,
    W1: AsyncWrite + Unpin + ?Sized,
    R2: AsyncRead + Unpin + ?Sized,
    W2: AsyncWrite + Unpin + ?Sized,
{
    run(up_r, up_w, down_r, down_w, UpError::EndsBoth).await
}

/// [`both_ways`] for a relay whose far end may stop reading before it has finished
/// writing: an exec's server stops reading stdin once the command exited, then sends the
/// exit status. An error sending up (the far end stopped or reset its receiving side) ends
/// only the up direction; the down direction still runs to its end, so nothing the far end
/// sent is lost. A connection that really died fails the down direction too.
pub async fn relay<R1, W1, R2, W2>(
    up_r: &mut R1,
    up_w: &mut W1,
    down_r: &mut R2,
    down_w: &mut W2,
) -> Result<Moved, PumpError>
where
    R1: AsyncRead + Unpin + ?Sized,
    W1: AsyncWrite + Unpin + ?Sized,
    R2: AsyncRead + Unpin + ?Sized,
    W2: AsyncWrite + Unpin + ?Sized,
{
    run(up_r, up_w, down_r, down_w, UpError::EndsUpOnly).await
}

/// What an error in the up direction ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum UpError {
    EndsBoth,
    EndsUpOnly,
}

async fn run<R1, W1, R2, W2>(
    up_r: &mut R1,
    up_w: &mut W1,
    down_r: &mut R2,
    down_w: &mut W2,
    on_up_error: UpError,
) -> Result<Moved, PumpError>
where
    R1: AsyncRead + Unpin + ?Sized,
    W1: AsyncWrite + Unpin + ?Sized,
    R2: AsyncRead + Unpin + ?Sized,
    W2: AsyncWrite + Unpin + ?Sized,
{
    let up = copy_half(up_r, up_w);
    let down = copy_half(down_r, down_w);
    tokio::pin!(up, down);
    let mut moved = Moved::default();
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                match r {
                    Ok(n) => moved.up = n,
                    Err(e) if on_up_error == UpError::EndsUpOnly => {
                        tracing::debug!(error = %e, "relay: the far end stopped reading");
                    }
                    Err(e) => return Err(PumpError::Up(e)),
                }
                up_done = true;
            }
            r = &mut down, if !down_done => {
                moved.down = r.map_err(PumpError::Down)?;
                down_done = true;
            }
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The far end stops reading (like an exec server once the command exited) and then
    /// sends its last bytes: the relay still delivers them.
    #[tokio::test]
    async fn a_relay_delivers_what_the_far_end_sends_after_it_stopped_reading() {
        let (near, far) = tokio::io::duplex(64);
        let (mut far_r, mut far_w) = tokio::io::split(far);
        let (mut near_r, mut near_w) = tokio::io::split(near);
        let peer = tokio::spawn(async move {
            let mut first = [0u8; 4];
            far_r.read_exact(&mut first).await.unwrap();
            drop(far_r); // stops reading: further writes to it fail
            far_w.write_all(b"exit-status").await.unwrap();
            far_w.shutdown().await.unwrap();
        });
        // Much more to send up than the far end will read.
        let big = vec![7u8; 1 << 20];
        let mut src = &big[..];
        let mut sink = vec![];
        let r = relay(&mut src, &mut near_w, &mut near_r, &mut sink).await;
        peer.await.unwrap();
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(sink, b"exit-status");
    }

    #[tokio::test]
    async fn half_close_both_ways() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let payload: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let p2 = payload.clone();
        let peer = tokio::spawn(async move {
            // Echo everything back, then close.
            let mut got = vec![];
            b.read_to_end(&mut got).await.unwrap();
            b.write_all(&got).await.unwrap();
            b.shutdown().await.unwrap();
            got
        });
        let (mut ar, mut aw) = tokio::io::split(&mut a);
        let mut src = &p2[..];
        let mut sink = vec![];
        let moved = both_ways(&mut src, &mut aw, &mut ar, &mut sink)
            .await
            .unwrap();
        assert_eq!(peer.await.unwrap(), payload);
        assert_eq!(sink, payload);
        assert_eq!(moved.up, payload.len() as u64);
        assert_eq!(moved.down, payload.len() as u64);
    }
}
