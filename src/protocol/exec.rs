//! The `exec` request and, after `accept`, its multiplexed frames.
//!
//! The command is one string, as with ssh: full-access peers get it run by `$SHELL -c`,
//! command-scoped peers get it split into words (no expansion) and `execvp`ed.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// `None` = an interactive login shell (only for full-access peers).
    #[serde(default)]
    pub command: Option<String>,
    /// Environment the client would like set; the server keeps only allow-listed names
    /// (like OpenSSH's `AcceptEnv LANG LC_*`).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub pty: Option<PtyRequest>,
    /// The user the client named (`-l`, `user@host`, `-o User=`), if any. The server runs
    /// commands only as itself, so it refuses any other name rather than ignore it. Left
    /// out of the frame when unset, so older servers see the header they know.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Ask for a resumable session (`protocol::resume`): the server answers
    /// `accept-resumable` and the frames below then ride the resumable stream. Older
    /// servers ignore it and answer `accept` (the client falls back); left out when false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resume: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PtyRequest {
    pub term: String,
    pub cols: u16,
    pub rows: u16,
}

// ---------------------------------------------------------------------------------------
// Frames after `accept`.
//
// `TYPE (1 byte) | LEN (u32 big-endian) | LEN bytes`, both directions, until the server has
// sent `Exit` (then it closes its side). Data frames carry at most `MAX_DATA` bytes; any
// frame over `MAX_FRAME` is a protocol error (the stream is dropped, never buffered).
// Flow control is QUIC's: nobody reads faster than the other end drains, so a slow reader
// makes the child block on its pipe instead of the server buffering without bound.
//
// client → server: Stdin, StdinEof, Window, Signal
// server → client: Stdout, Stderr, Exit (always last)
// ---------------------------------------------------------------------------------------

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest data payload a sender puts in one frame.
pub const MAX_DATA: usize = 64 * 1024;
/// Largest frame a receiver accepts.
pub const MAX_FRAME: u32 = 256 * 1024;

const T_STDIN: u8 = 1;
const T_STDIN_EOF: u8 = 2;
const T_WINDOW: u8 = 3;
const T_SIGNAL: u8 = 4;
const T_STDOUT: u8 = 0x11;
const T_STDERR: u8 = 0x12;
const T_EXIT: u8 = 0x13;

/// How the remote command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitStatus {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal (name without "SIG", as ssh reports it: "KILL", "TERM").
    Signal(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Stdin(Vec<u8>),
    StdinEof,
    Window { cols: u16, rows: u16 },
    Signal(String),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
}

#[derive(Debug, thiserror::Error)]
pub enum ExecFrameError {
    #[error("exec frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    #[error("unknown exec frame type {0:#x}")]
    UnknownType(u8),
    #[error("malformed exec frame: {0}")]
    Malformed(&'static str),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        let (t, body): (u8, std::borrow::Cow<[u8]>) = match self {
            Frame::Stdin(d) => (T_STDIN, d.as_slice().into()),
            Frame::StdinEof => (T_STDIN_EOF, (&[][..]).into()),
            Frame::Window { cols, rows } => {
                let mut b = cols.to_be_bytes().to_vec();
                b.extend_from_slice(&rows.to_be_bytes());
                (T_WINDOW, b.into())
            }
            Frame::Signal(s) => (T_SIGNAL, s.as_bytes().into()),
            Frame::Stdout(d) => (T_STDOUT, d.as_slice().into()),
            Frame::Stderr(d) => (T_STDERR, d.as_slice().into()),
            Frame::Exit(st) => (T_EXIT, serde_json::to_vec(st).unwrap_or_default().into()),
        };
        let mut out = Vec::with_capacity(5 + body.len());
        out.push(t);
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn decode(t: u8, body: Vec<u8>) -> Result<Frame, ExecFrameError> {
        Ok(match t {
            T_STDIN => Frame::Stdin(body),
            T_STDIN_EOF => Frame::StdinEof,
            T_WINDOW => {
                if body.len() != 4 {
                    return Err(ExecFrameError::Malformed("window frame must be 4 bytes"));
                }
                Frame::Window {
                    cols: u16::from_be_bytes([body[0], body[1]]),
                    rows: u16::from_be_bytes([body[2], body[3]]),
                }
            }
            T_SIGNAL => Frame::Signal(
                String::from_utf8(body).map_err(|_| ExecFrameError::Malformed("signal name"))?,
            ),
            T_STDOUT => Frame::Stdout(body),
            T_STDERR => Frame::Stderr(body),
            T_EXIT => Frame::Exit(
                serde_json::from_slice(&body)
                    .map_err(|_| ExecFrameError::Malformed("exit status"))?,
            ),
            other => return Err(ExecFrameError::UnknownType(other)),
        })
    }
}

/// Write one frame.
pub async fn write<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), ExecFrameError> {
    w.write_all(&f.encode()).await?;
    Ok(())
}

/// Which output stream a data frame carries (the hot path: no copy of the payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataKind {
    Stdin,
    Stdout,
    Stderr,
}

/// Write a data frame straight from `data` (at most `MAX_DATA` bytes), without building a
/// `Frame`: header and payload go out as two writes into the stream's buffer.
pub async fn write_data<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: DataKind,
    data: &[u8],
) -> Result<(), ExecFrameError> {
    let t = match kind {
        DataKind::Stdin => T_STDIN,
        DataKind::Stdout => T_STDOUT,
        DataKind::Stderr => T_STDERR,
    };
    let mut head = [0u8; 5];
    head[0] = t;
    head[1..].copy_from_slice(&(data.len() as u32).to_be_bytes());
    w.write_all(&head).await?;
    w.write_all(data).await?;
    Ok(())
}

/// Read one frame; `Ok(None)` at a clean EOF between frames.
pub async fn read<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ExecFrameError> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        let n = r.read(&mut head[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(ExecFrameError::Malformed("truncated frame header"))
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]);
    if len > MAX_FRAME {
        return Err(ExecFrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            ExecFrameError::Malformed("truncated frame body")
        } else {
            ExecFrameError::Io(e)
        }
    })?;
    Frame::decode(head[0], body).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let frames = vec![
            Frame::Stdin(vec![1, 2, 3]),
            Frame::StdinEof,
            Frame::Window { cols: 80, rows: 24 },
            Frame::Signal("INT".into()),
            Frame::Stdout(vec![0; MAX_DATA]),
            Frame::Stderr(b"err".to_vec()),
            Frame::Exit(ExitStatus::Code(7)),
            Frame::Exit(ExitStatus::Signal("KILL".into())),
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

    fn frame_strategy() -> impl proptest::strategy::Strategy<Value = Frame> {
        use proptest::prelude::*;
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..2048).prop_map(Frame::Stdin),
            Just(Frame::StdinEof),
            (any::<u16>(), any::<u16>()).prop_map(|(cols, rows)| Frame::Window { cols, rows }),
            "[A-Z0-9]{0,8}".prop_map(Frame::Signal),
            prop::collection::vec(any::<u8>(), 0..2048).prop_map(Frame::Stdout),
            prop::collection::vec(any::<u8>(), 0..2048).prop_map(Frame::Stderr),
            any::<i32>().prop_map(|c| Frame::Exit(ExitStatus::Code(c))),
            "[A-Z]{1,6}".prop_map(|s| Frame::Exit(ExitStatus::Signal(s))),
        ]
    }

    proptest::proptest! {
        /// encode → decode is the identity for every frame, also when frames are concatenated.
        #[test]
        fn encode_decode_round_trip(frames in proptest::collection::vec(frame_strategy(), 0..8)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut buf = vec![];
            for f in &frames {
                buf.extend_from_slice(&f.encode());
            }
            let mut r = &buf[..];
            for f in &frames {
                let got = rt.block_on(read(&mut r)).unwrap();
                proptest::prop_assert_eq!(got.as_ref(), Some(f));
            }
            proptest::prop_assert!(rt.block_on(read(&mut r)).unwrap().is_none());
        }

        /// Arbitrary bytes never panic the decoder.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let mut r = &bytes[..];
            while let Ok(Some(_)) = rt.block_on(read(&mut r)) {}
        }
    }

    #[tokio::test]
    async fn bad_frames_are_errors() {
        let cases: Vec<Vec<u8>> = vec![
            vec![T_STDIN],
            vec![T_STDIN, 0, 0, 0, 5, 1],
            vec![0x77, 0, 0, 0, 0],
            vec![T_WINDOW, 0, 0, 0, 1, 9],
            vec![T_EXIT, 0, 0, 0, 2, b'{', b'}'],
            vec![T_SIGNAL, 0, 0, 0, 1, 0xff],
            {
                let mut v = vec![T_STDOUT];
                v.extend_from_slice(&(MAX_FRAME + 1).to_be_bytes());
                v
            },
        ];
        for c in cases {
            let mut r = &c[..];
            assert!(read(&mut r).await.is_err(), "{c:?}");
        }
    }
}
