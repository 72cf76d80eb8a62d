//! The resumable byte stream (issue 18): a `tunnel` that outlives its connection.
//!
//! # Negotiation (compatible both ways)
//!
//! 1. The client asks for it in the `tunnel` header: `{"kind":"tunnel","resume":true}`. A
//!    server that does not know the field ignores it and answers a plain `accept`: the
//!    stream is then raw bytes as before, and the client runs it as before (no resume).
//! 2. A server that offers it answers [`Grant`] (`{"status":"accept-resumable", …}`)
//!    instead of `accept`: a session id, a per-session secret, how long it keeps a detached
//!    session, and its boot id. It may also answer a plain `accept` (its caps on resumable
//!    sessions are reached: the tunnel then works as today, without resume).
//! 3. From then on both directions carry [`Frame`]s, never raw bytes.
//!
//! # Frames (both directions)
//!
//! `TYPE (1 byte) | LEN (u32 big-endian) | LEN bytes`:
//!
//! | type | name  | payload | meaning |
//! |------|-------|---------|---------|
//! | 0x21 | data  | ≤ [`MAX_DATA`] bytes | the next bytes of the stream |
//! | 0x22 | ack   | u64 BE  | the sender has received this many positions of the other direction |
//! | 0x23 | eof   | none    | the end of this direction (half-close); counts as one position |
//! | 0x24 | close | none    | the sender abandons the session (its user went away): end it now |
//!
//! A direction's *positions* are its data bytes, then one for its `eof`. Each side keeps
//! what it sent and the peer has not acknowledged (its replay buffer, at most
//! [`REPLAY_CAP`]; a writer whose buffer is full waits: backpressure, never a drop). A
//! receiver acknowledges at least every [`ACK_EVERY`] positions and within [`ACK_DELAY`] of
//! receiving anything, and at once after an `eof`. A side whose own `eof` is acknowledged
//! and which has received and acknowledged the peer's `eof` ends its write half (QUIC FIN);
//! the stream is over when both have.
//!
//! # Resuming
//!
//! On a new connection (any path, any address), the **client writes first**: a header
//! `{"kind":"resume","session":…,"secret":…,"received":N}` (N = positions of the server's
//! direction it has received). The server checks, in order: the session exists, it belongs
//! to the peer's verified id52, the secret matches, the ACL still allows the original
//! request; then answers [`Grant`] with its own `received`. Otherwise `deny` (an unknown
//! session, another machine's, a wrong secret, a revoked peer) — after a revocation the
//! detached session is ended too. Both then send again everything after the other's count
//! and go on with frames. Counts outside what a side still holds are a protocol error that
//! ends the session.

use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest data payload in one frame.
pub const MAX_DATA: usize = 64 * 1024;
/// Largest frame a receiver accepts (a larger one is a protocol error).
pub const MAX_FRAME: u32 = MAX_DATA as u32;
/// Bytes a side keeps unacknowledged per direction (Teleport's RFD 0150 uses 2 MiB). As
/// much as a QUIC stream window (`transport::iroh::STREAM_RECEIVE_WINDOW`), so on a long
/// path the two bound a session alike (~2 MiB per round trip, issue 21); small enough that
/// [`crate::protocol`]'s caps on sessions bound the memory. Part of the protocol: a
/// receiver refuses data past it, so a larger cap would have to be negotiated.
pub const REPLAY_CAP: usize = 2 * 1024 * 1024;
/// A receiver acknowledges at least this often (in positions): an eighth of the buffer,
/// so a sender never waits for an ack on a live path.
pub const ACK_EVERY: u64 = (REPLAY_CAP / 8) as u64;
/// ... and no later than this after receiving anything (interactive sessions).
pub const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// Length of the session id and the secret, in bytes (hex on the wire).
pub const ID_LEN: usize = 16;
pub const SECRET_LEN: usize = 32;

const T_DATA: u8 = 0x21;
const T_ACK: u8 = 0x22;
const T_EOF: u8 = 0x23;
const T_CLOSE: u8 = 0x24;

/// The server's answer to a resumable `tunnel` or a `resume`: `{"status":"accept-resumable"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Hex, [`ID_LEN`] bytes.
    pub session: String,
    /// Hex, [`SECRET_LEN`] bytes; only the peer the session belongs to ever sees it.
    pub secret: String,
    /// Positions of the client's direction the server has received (0 on a new session).
    pub received: u64,
    /// How long the server keeps the session detached, in seconds.
    pub keep_secs: u64,
    /// The server's boot id (`PingInfo`): a client that later finds another knows the
    /// server restarted.
    pub boot: String,
}

/// The `resume` header's fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resume {
    pub session: String,
    pub secret: String,
    /// Positions of the server's direction the client has received.
    pub received: u64,
    /// End the session instead of resuming it: sent for a session whose client process is
    /// gone (`session::registry`), so the server does not keep it for `session-keep`.
    /// Older servers ignore it (and end the session on the count they cannot use).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub close: bool,
}

/// One frame of a resumable stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `Bytes`: a sender frames slices of its replay buffer and a receiver hands on what it
    /// read, neither copying (the layer's cost on a bulk transfer is its copies).
    Data(Bytes),
    Ack(u64),
    Eof,
    Close,
}

#[derive(Debug, thiserror::Error)]
pub enum ResumeFrameError {
    #[error("frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    #[error("unknown frame type {0:#04x}")]
    UnknownType(u8),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Payloads up to this size go out in one write with their header (keystrokes: one
/// piece for QUIC to packetize); larger ones as header, then the payload as it is (no copy).
const COALESCE_BELOW: usize = 4096;

/// Write one frame. Cancelling it may leave a frame half-written: only when the stream is
/// being abandoned anyway (an attachment ends as a whole).
pub async fn write<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    let mut buf;
    match f {
        Frame::Data(d) => {
            let head = head(T_DATA, d.len());
            if d.len() >= COALESCE_BELOW {
                w.write_all(&head).await?;
                return w.write_all(d).await;
            }
            buf = Vec::with_capacity(5 + d.len());
            buf.extend_from_slice(&head);
            buf.extend_from_slice(d);
        }
        Frame::Ack(n) => {
            buf = head(T_ACK, 8).to_vec();
            buf.extend_from_slice(&n.to_be_bytes());
        }
        Frame::Eof => buf = head(T_EOF, 0).to_vec(),
        Frame::Close => buf = head(T_CLOSE, 0).to_vec(),
    }
    w.write_all(&buf).await
}

fn head(t: u8, len: usize) -> [u8; 5] {
    let l = (len as u32).to_be_bytes();
    [t, l[0], l[1], l[2], l[3]]
}

/// Read one frame; `Ok(None)` on a clean end of the stream between frames.
pub async fn read<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<Option<Frame>, ResumeFrameError> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ResumeFrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_FRAME {
        return Err(ResumeFrameError::TooLarge(len));
    }
    // `len` is at most MAX_FRAME (checked above), so the buffer is sized once, not grown.
    let mut body = BytesMut::with_capacity(len as usize);
    while body.len() < len as usize {
        let want = len as usize - body.len();
        if r.read_buf(&mut (&mut body).limit(want)).await? == 0 {
            return Err(ResumeFrameError::Truncated);
        }
    }
    let frame = match head[0] {
        T_DATA if !body.is_empty() => Frame::Data(body.freeze()),
        T_DATA => return Err(ResumeFrameError::Malformed("empty data")),
        T_ACK => {
            let b: [u8; 8] = body[..]
                .try_into()
                .map_err(|_| ResumeFrameError::Malformed("ack"))?;
            Frame::Ack(u64::from_be_bytes(b))
        }
        T_EOF if body.is_empty() => Frame::Eof,
        T_CLOSE if body.is_empty() => Frame::Close,
        T_EOF => return Err(ResumeFrameError::Malformed("eof")),
        T_CLOSE => return Err(ResumeFrameError::Malformed("close")),
        t => return Err(ResumeFrameError::UnknownType(t)),
    };
    Ok(Some(frame))
}

/// A fresh random value of `N` bytes, hex (session ids and secrets).
pub fn random_hex<const N: usize>() -> std::io::Result<String> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(b))
}

/// Compares two secrets in time independent of where they differ (a remote peer must not
/// learn a secret byte by byte from response times).
pub fn same_secret(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let frames = [
            Frame::Data(Bytes::from_static(b"hello")),
            Frame::Data(vec![7; MAX_DATA].into()),
            Frame::Ack(u64::MAX - 3),
            Frame::Eof,
            Frame::Close,
        ];
        let mut buf = vec![];
        for f in &frames {
            write(&mut buf, f).await.unwrap();
        }
        let mut r = &buf[..];
        for f in &frames {
            assert_eq!(read(&mut r).await.unwrap().as_ref(), Some(f));
        }
        assert!(read(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn bad_frames_are_errors_not_panics() {
        let mut good = vec![];
        write(&mut good, &Frame::Data(Bytes::from_static(b"abc")))
            .await
            .unwrap();
        for n in 1..good.len() {
            assert!(matches!(
                read(&mut &good[..n]).await,
                Err(ResumeFrameError::Truncated)
            ));
        }
        let big = [T_DATA, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read(&mut &big[..]).await,
            Err(ResumeFrameError::TooLarge(_))
        ));
        for bad in [
            &[T_ACK, 0, 0, 0, 1, 9][..],
            &[T_EOF, 0, 0, 0, 1, 9],
            &[T_DATA, 0, 0, 0, 0],
            &[0x99, 0, 0, 0, 0],
        ] {
            assert!(read(&mut &bad[..]).await.is_err(), "{bad:?}");
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut v = good.clone();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x as usize) % v.len();
            v[at] = (x >> 24) as u8;
            let _ = read(&mut &v[..]).await;
        }
    }

    #[test]
    fn secrets() {
        let a = random_hex::<SECRET_LEN>().unwrap();
        let b = random_hex::<SECRET_LEN>().unwrap();
        assert_eq!(a.len(), 2 * SECRET_LEN);
        assert_ne!(a, b);
        assert!(same_secret(&a, &a.clone()));
        assert!(!same_secret(&a, &b));
        assert!(!same_secret(&a, &a[1..]));
    }
}
