//! The malai protocol, over one ordered byte stream (an iroh bi-stream, or the stdin/stdout
//! of a forced command).
//!
//! # Contract
//!
//! 1. **The client writes first**: one header frame naming the request.
//! 2. **The server answers** with one response frame: `accept`, `deny(reason)` or
//!    `error(reason)`, before any payload. After `deny`/`error` it closes the stream.
//! 3. After `accept`:
//!    - `tunnel`, `http` and `forward`: raw bytes both ways, no framing. Each side signals the end of
//!      its direction by closing its write half (QUIC FIN / EOF); the other direction goes on
//!      until its own EOF (half-close, which scp/rsync/git need).
//!    - `exec`: multiplexed frames (`protocol::exec`).
//!    - a `tunnel` with `"resume": true` answered `accept-resumable`, and `resume`:
//!      resumable-stream frames (`protocol::resume`: who writes first, sizes, fallback).
//!    - `ping`: one frame from the server, [`PingInfo`]: its boot id, random per server
//!      process. A client that finds it changed knows the server restarted and that its old
//!      connection is dead (`client::liveness`). Older servers send nothing (EOF).
//!    - `config-push`, `config-hash`: exactly one more frame each way, client first
//!      (`protocol::config`: the file to apply and its ack; a hash query and its answer).
//!      Those frames have their own, larger cap (a cluster file can exceed 64 KiB).
//!
//! # Frame
//!
//! `MAGIC (4 bytes "mssh") | VERSION (1 byte) | LEN (u32 big-endian) | LEN bytes of JSON`.
//! The magic makes a stray client (an SSH banner, an HTTP request) fail with a clear error
//! instead of a confusing one. `LEN <= MAX_HEADER_LEN`; larger → `FrameError::TooLarge`
//! without reading the body. An unknown version is answered with an `error` frame in *our*
//! version, then the stream is closed. Unknown request kinds likewise.

pub mod config;
pub mod exec;
pub mod exec_pump;
pub mod forward;
pub mod resume;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::id52::Id52;

/// ALPN of the iroh transport. Bumped only for an incompatible change of this contract.
pub const ALPN: &[u8] = b"malai-ssh/0";

/// First four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"mssh";

/// Version of the header/response frames this build speaks.
pub const VERSION: u8 = 1;

/// Hard cap on a header or response frame body. Headers carry argv, env and names, never
/// payload; 64 KiB is far above any honest request and small enough to never matter.
pub const MAX_HEADER_LEN: u32 = 64 * 1024;

/// How long a server waits for a complete header before dropping the stream (slowloris).
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Every request kind, as it appears in the `kind` field.
pub const KINDS: &[&str] = &[
    "tunnel",
    "exec",
    "http",
    "config-push",
    "config-hash",
    "ping",
    "forward",
    "remote-forward",
    "remote-connection",
    "resume",
];

/// The first frame of every stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// The cluster (manager id52) the client means. Required on transports that carry
    /// several clusters (stdinserver); on iroh the endpoint already names the cluster, but a
    /// mismatch is still refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Id52>,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Request {
    /// Raw bytes to the server's SSH endpoint. `port` is what the user typed (informational;
    /// the server's config decides the target).
    Tunnel {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        /// Ask for a resumable stream (`protocol::resume`); older servers ignore it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resume: bool,
    },
    Exec(exec::ExecRequest),
    /// Raw bytes to a named HTTP service of the server.
    Http {
        service: String,
    },
    /// The manager sends its file (secrets removed) in the next frame.
    ConfigPush {
        hash: String,
    },
    /// Ask for the hash of the cluster file the peer has.
    ConfigHash,
    Ping,
    /// One forwarded connection (`protocol::forward`): raw bytes to `to` on the server.
    Forward {
        to: forward::ForwardTarget,
        /// Ask for a resumable stream (`protocol::resume`), as `tunnel` does; older
        /// servers ignore it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resume: bool,
    },
    /// The server listens (`-R`, `-A`) and announces each connection (`protocol::forward`).
    RemoteForward {
        listen: forward::RemoteListen,
        /// Ask for a resumable stream (its frames then ride it); older servers ignore it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resume: bool,
    },
    /// Claim one connection a `remote-forward` announced; then raw bytes both ways.
    RemoteConnection {
        id: u64,
        /// Ask for a resumable stream, as `forward` does; older servers ignore it.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resume: bool,
    },
    /// Pick up a detached resumable session on a new connection (`protocol::resume`).
    Resume(resume::Resume),
}

impl Request {
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Tunnel { .. } => "tunnel",
            Request::Exec(_) => "exec",
            Request::Http { .. } => "http",
            Request::ConfigPush { .. } => "config-push",
            Request::ConfigHash => "config-hash",
            Request::Ping => "ping",
            Request::Forward { .. } => "forward",
            Request::RemoteForward { .. } => "remote-forward",
            Request::RemoteConnection { .. } => "remote-connection",
            Request::Resume(_) => "resume",
        }
    }
}

/// What a server sends after accepting a `ping`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PingInfo {
    /// Fixed for the life of the server process, different after every start.
    pub boot: String,
}

/// This process's boot id (see [`PingInfo`]): pid and start time, never repeated across
/// restarts on one machine.
pub fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        format!("{:x}-{nanos:x}", std::process::id())
    })
}

/// The server's answer to a header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Response {
    Accept,
    /// The ACL said no. `reason` is one line meant for the user.
    Deny {
        reason: String,
    },
    /// The request could not be served (bad frame, unknown kind, target down).
    Error {
        reason: String,
    },
    /// `accept` of a resumable stream, or of a `resume` (`protocol::resume::Grant`); only
    /// sent to a client that asked for resume.
    AcceptResumable(resume::Grant),
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection closed before a complete frame")]
    Truncated,
    #[error("not a malai protocol stream (bad magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0} (this malai speaks {VERSION})")]
    Version(u8),
    #[error("frame of {0} bytes is over the {MAX_HEADER_LEN}-byte limit")]
    TooLarge(u32),
    #[error("unknown request kind {0:?}")]
    UnknownKind(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Write one frame.
pub async fn write_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge(u32::MAX))?;
    if len > MAX_HEADER_LEN {
        return Err(FrameError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(9 + body.len());
    buf.extend_from_slice(&MAGIC);
    buf.push(VERSION);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Read one frame body (checks magic, version and size before reading the body).
pub async fn read_frame_body<R: AsyncRead + Unpin>(r: &mut R) -> Result<Vec<u8>, FrameError> {
    let mut head = [0u8; 9];
    read_exact(r, &mut head).await?;
    let magic = [head[0], head[1], head[2], head[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if head[4] != VERSION {
        return Err(FrameError::Version(head[4]));
    }
    let len = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
    if len > MAX_HEADER_LEN {
        return Err(FrameError::TooLarge(len));
    }
    read_body(r, len as usize).await
}

/// First allocation for a frame body; it grows only as bytes arrive.
const BODY_CHUNK: usize = 1024;

/// Read exactly `len` body bytes into a buffer that grows with the data received: a peer
/// that announces a large frame and sends nothing costs [`BODY_CHUNK`], not `len`.
pub async fn read_body<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    len: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut body = Vec::with_capacity(len.min(BODY_CHUNK));
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(FrameError::Truncated);
    }
    Ok(body)
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

/// Decode a header body; unknown kinds are reported as such (not as "malformed").
pub fn decode_header(body: &[u8]) -> Result<Header, FrameError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .ok_or_else(|| FrameError::Malformed("header has no \"kind\"".into()))?;
    if !KINDS.contains(&kind) {
        return Err(FrameError::UnknownKind(kind.chars().take(64).collect()));
    }
    serde_json::from_value(value).map_err(|e| FrameError::Malformed(e.to_string()))
}

pub async fn read_header<R: AsyncRead + Unpin>(r: &mut R) -> Result<Header, FrameError> {
    let body = read_frame_body(r).await?;
    decode_header(&body)
}

pub async fn read_response<R: AsyncRead + Unpin>(r: &mut R) -> Result<Response, FrameError> {
    let body = read_frame_body(r).await?;
    serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Read a JSON frame of any type (the bodies that follow `ping`, `config-*`).
pub async fn read_json<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut R,
) -> Result<T, FrameError> {
    let body = read_frame_body(r).await?;
    serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// A reader for tests: serves `data`, then EOF, and records the largest buffer it was
/// asked to fill (what the caller had allocated for the read).
#[cfg(test)]
pub(crate) struct Probe {
    pub data: std::io::Cursor<Vec<u8>>,
    pub largest: usize,
}

#[cfg(test)]
impl AsyncRead for Probe {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.largest = this.largest.max(buf.remaining());
        let pos = this.data.position() as usize;
        let rest = &this.data.get_ref()[pos..];
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        this.data.set_position((pos + n) as u64);
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that announces a 64 KiB header and sends 10 bytes does not get 64 KiB
    /// allocated for it; a whole frame still reads.
    #[tokio::test]
    async fn frame_buffers_grow_with_the_data() {
        let mut bytes = MAGIC.to_vec();
        bytes.push(VERSION);
        bytes.extend_from_slice(&MAX_HEADER_LEN.to_be_bytes());
        bytes.extend_from_slice(&[b'x'; 10]);
        let mut p = Probe {
            data: std::io::Cursor::new(bytes),
            largest: 0,
        };
        assert!(matches!(
            read_frame_body(&mut p).await,
            Err(FrameError::Truncated)
        ));
        assert!(
            p.largest <= 4 * BODY_CHUNK,
            "asked to fill {} bytes",
            p.largest
        );
        // Allowed twin: a full frame (bigger than the first chunk) arrives whole.
        let body = vec![b'{'; 10_000];
        let mut bytes = MAGIC.to_vec();
        bytes.push(VERSION);
        bytes.extend_from_slice(&(body.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&body);
        let mut p = Probe {
            data: std::io::Cursor::new(bytes),
            largest: 0,
        };
        assert_eq!(read_frame_body(&mut p).await.unwrap(), body);
    }

    fn frame(version: u8, body: &[u8]) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.push(version);
        v.extend_from_slice(&(body.len() as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    async fn parse(bytes: &[u8]) -> Result<Header, FrameError> {
        let mut r = bytes;
        read_header(&mut r).await
    }

    #[tokio::test]
    async fn round_trip_every_kind() {
        let reqs = vec![
            Request::Tunnel {
                port: Some(22),
                resume: false,
            },
            Request::Tunnel {
                port: None,
                resume: true,
            },
            Request::Resume(resume::Resume {
                session: "ab".into(),
                secret: "cd".into(),
                received: 7,
                close: true,
            }),
            Request::Http {
                service: "web".into(),
            },
            Request::ConfigPush { hash: "ab".into() },
            Request::ConfigHash,
            Request::Ping,
            Request::Forward {
                to: forward::ForwardTarget::Tcp {
                    host: "localhost".into(),
                    port: 80,
                },
                resume: false,
            },
            Request::Forward {
                to: forward::ForwardTarget::Unix {
                    path: "/run/x.sock".into(),
                },
                resume: true,
            },
            Request::Exec(exec::ExecRequest {
                command: Some("ls -la".into()),
                env: vec![("LANG".into(), "C".into())],
                pty: Some(exec::PtyRequest {
                    term: "xterm".into(),
                    cols: 80,
                    rows: 24,
                }),
                user: None,
                resume: false,
            }),
            Request::Exec(exec::ExecRequest {
                command: None,
                env: vec![],
                pty: None,
                user: Some("nobody".into()),
                resume: true,
            }),
        ];
        for request in reqs {
            let h = Header {
                cluster: Some(Id52::from_bytes([3; 32])),
                request,
            };
            let mut buf = vec![];
            write_frame(&mut buf, &h).await.unwrap();
            assert_eq!(parse(&buf).await.unwrap(), h);
        }
    }

    #[tokio::test]
    async fn bad_inputs_are_errors_not_panics() {
        // Truncated at every length.
        let mut good = vec![];
        write_frame(
            &mut good,
            &Header {
                cluster: None,
                request: Request::Ping,
            },
        )
        .await
        .unwrap();
        for n in 0..good.len() {
            assert!(matches!(
                parse(&good[..n]).await,
                Err(FrameError::Truncated)
            ));
        }
        assert!(matches!(
            parse(b"SSH-2.0-OpenSSH_9.2\r\n").await,
            Err(FrameError::BadMagic(_))
        ));
        assert!(matches!(
            parse(&frame(2, b"{}")).await,
            Err(FrameError::Version(2))
        ));
        let mut big = MAGIC.to_vec();
        big.push(VERSION);
        big.extend_from_slice(&(MAX_HEADER_LEN + 1).to_be_bytes());
        assert!(matches!(parse(&big).await, Err(FrameError::TooLarge(_))));
        assert!(matches!(
            parse(&frame(VERSION, b"{\"kind\":\"teleport\"}")).await,
            Err(FrameError::UnknownKind(k)) if k == "teleport"
        ));
        for body in [
            &b"not json"[..],
            b"{}",
            b"[]",
            b"{\"kind\":5}",
            b"{\"kind\":\"http\"}",
            b"{\"kind\":\"tunnel\",\"cluster\":\"short\"}",
            b"{\"kind\":\"exec\",\"pty\":{\"cols\":-1}}",
        ] {
            assert!(
                matches!(
                    parse(&frame(VERSION, body)).await,
                    Err(FrameError::Malformed(_))
                ),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[tokio::test]
    async fn random_bytes_never_panic() {
        // A tiny deterministic xorshift: no extra dependency for a smoke fuzz.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..2000 {
            let len = (x % 64) as usize;
            let mut v = Vec::with_capacity(len + 9);
            if x & 1 == 0 {
                v.extend_from_slice(&MAGIC);
                v.push(VERSION);
            }
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            let _ = parse(&v).await;
        }
    }
}
