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
    let up = copy_half(up_r, up_w);
    let down = copy_half(down_r, down_w);
    tokio::pin!(up, down);
    let mut moved = Moved::default();
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            r = &mut up, if !up_done => {
                moved.up = r.map_err(PumpError::Up)?;
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
