//! The agent's control protocol: how `malai` CLI processes talk to `malai ssh agent` over
//! its unix socket.
//!
//! # Contract
//!
//! Every message, both ways, is one frame: `LEN (u32 big-endian) | LEN bytes of JSON`, with
//! `LEN <= MAX_FRAME`. Larger → [`ControlError::TooLarge`] without reading the body, so a
//! confused or hostile peer can never make the agent buffer without bound.
//!
//! 1. **The client writes first**: `{"hello":{"version":V}}`. The agent answers
//!    `{"hello":{"version":A,"pid":…,"http":…}}`. This exchange is frozen across versions:
//!    it is how a newer CLI recognises an older agent (and asks it to step aside). When
//!    `V != A` the agent closes the connection after its hello.
//! 2. Then exactly one request: `status`, `stop`, `open`, `stream` or `release`.
//!    - `stream` asks the holder of a cluster key (`endpoint`) for one request stream to a
//!      peer; after `opened` the socket carries that stream's raw bytes.
//!    - `release` asks the agent to hand a cluster's key to a starting server.
//!    - `open` carries file descriptors in the same `sendmsg` (SCM_RIGHTS,
//!      `transport::fdpass`): stdin (unless `stdin` is false), stdout, and for `exec`
//!      stderr. The agent answers `opened` once the server accepted, or `failed`.
//!    - After `opened`, the client may send `window` frames (a pty's size changed) or
//!      `finish` (end a tunnel's upload cleanly); the agent ends with `exit` (exec), `done` (tunnel), or `broken`. The agent closes its
//!      copies of the descriptors *before* it sends that last frame, so when the CLI exits
//!      nothing else holds the caller's pipes open.
//!    - The client closing the socket early (it was killed) makes the agent abandon the
//!      request at once, like a direct connection that drops.
//! 3. The agent checks the peer's uid (`SO_PEERCRED`) before reading anything: only the
//!    user who owns the agent may use it (its keys are that user's keys). And the hello
//!    must carry the holder's token (`control::token`, read from `<socket>.token`): the
//!    same uid reached through sshd's socket forwarding has no file to read it from.

use std::os::fd::OwnedFd;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::id52::Id52;
use crate::protocol::exec::{ExecRequest, ExitStatus};
use crate::transport::fdpass::{self, FdPassError};

/// Version of the messages after `hello`. Bump on any incompatible change; a CLI that meets
/// an agent of another version restarts it (`agent -e`) or falls back to a direct
/// connection. 3: a holder serves nothing past the hello without its token
/// (`control::token`), so an older CLI must see another version, not a refusal.
pub const VERSION: u32 = 3;

/// Hard cap on one control frame. Frames carry a host name, argv and env, never payload
/// (payload moves over the passed descriptors); 64 KiB is far above any honest message.
pub const MAX_FRAME: u32 = 64 * 1024;

/// Most descriptors one `open` passes (stdin, stdout, stderr).
pub const MAX_FDS: usize = fdpass::MAX_FDS;

/// CLI → agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ToHolder {
    Hello {
        version: u32,
        /// The holder's token (`control::token`): without the right one the holder still
        /// answers this hello (so versions are recognised) but serves no request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Counters and connections, for `malai ssh agent status` and tests.
    Status,
    /// Shut down (drain running requests, remove the socket).
    Stop,
    /// Serve `request` to `host` on the passed descriptors.
    Open {
        host: String,
        request: OpenRequest,
        /// Whether a stdin descriptor comes first (`ssh -n` passes none).
        stdin: bool,
    },
    /// The client's terminal changed size (exec with a pty).
    Window { cols: u16, rows: u16 },
    /// End the tunnel's upload now, cleanly (OpenSSH sends its ProxyCommand SIGHUP as soon
    /// as the session is over, often before stdin reached EOF).
    Finish,
    /// Open `request` to `peer` of `cluster` on the key this process holds; after `opened`
    /// the control socket itself carries the stream's raw bytes both ways (half-close =
    /// shutdown of the socket's write side). How every process that does not hold a
    /// cluster's key (a CLI, the agent when the server holds it) still uses it.
    Stream {
        cluster: String,
        peer: Id52,
        #[serde(default)]
        hints: Vec<std::net::SocketAddr>,
        request: crate::protocol::Request,
    },
    /// Give up the key of `cluster` (the server is starting and will hold it).
    Release { cluster: String },
}

/// What an `open` asks the server for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpenRequest {
    /// `malai ssh proxy`: raw bytes to the server's ssh (fds: stdin, stdout).
    Tunnel {
        port: Option<u16>,
        /// Ask the server for a resumable tunnel, which the holder then runs
        /// (`keyholder::resume`); `MALAI_RESUME=off` in the command turns it off (default:
        /// on).
        #[serde(default = "yes")]
        resume: bool,
    },
    /// Native exec (fds: stdin, stdout, stderr).
    Exec(ExecRequest),
}

impl OpenRequest {
    /// Descriptors this request needs after stdin: stdout, and stderr for exec.
    pub fn output_fds(&self) -> usize {
        match self {
            OpenRequest::Tunnel { .. } => 1,
            OpenRequest::Exec(_) => 2,
        }
    }
}

fn yes() -> bool {
    true
}

/// The agent's hello: enough to decide whether to use, restart, or report it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HolderHello {
    pub version: u32,
    pub pid: u32,
    /// The HTTP proxy's address, when it runs.
    #[serde(default)]
    pub http: Option<std::net::SocketAddr>,
}

/// Why an `open` failed, by the phase that failed, so the CLI can word it like a direct
/// connection would.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailKind {
    /// The host name means nothing here (or names a group/service).
    Resolve,
    /// The server's ACL said no.
    Denied,
    /// The server could not serve it, or could not be reached.
    Refused,
    /// The request itself was malformed (wrong descriptors, …).
    BadRequest,
}

/// One iroh connection the agent keeps.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub cluster: String,
    pub server: String,
    pub peer: String,
    /// Requests currently using it.
    pub active: u64,
    /// Requests served over it since it was dialed.
    pub requests: u64,
    pub idle_secs: u64,
    /// `out` (we dialed) or `in` (the peer did: the server's accepted connections).
    #[serde(default)]
    pub direction: String,
    /// `direct` or `relay`; empty when unknown.
    #[serde(default)]
    pub path: String,
    /// The peer's IP address, or the relay's URL.
    #[serde(default)]
    pub addr: String,
    #[serde(default)]
    pub rtt_ms: Option<f64>,
}

impl ConnectionInfo {
    /// Fill in the path fields from a live connection.
    pub fn with_path(mut self, conn: &crate::transport::iroh::PeerConnection) -> Self {
        if let Some(p) = conn.path() {
            self.path = if p.direct { "direct" } else { "relay" }.into();
            self.addr = p.addr;
            self.rtt_ms = Some(p.rtt.as_secs_f64() * 1000.0);
        }
        self
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HolderStatus {
    pub version: u32,
    pub pid: u32,
    pub socket: String,
    pub http: Option<std::net::SocketAddr>,
    /// Clusters whose keys the agent holds.
    pub clusters: Vec<String>,
    /// Clusters found on disk that it does not hold, each with why (a server holds it, the
    /// key cannot be read, …); empty from a holder older than this field.
    #[serde(default)]
    pub not_served: std::collections::BTreeMap<String, String>,
    /// iroh connections dialed since start (a reused connection does not count again).
    pub dials: u64,
    /// Requests served (open and HTTP) since start.
    pub requests: u64,
    pub connections: Vec<ConnectionInfo>,
    /// The relays of every cluster this holder serves, as its endpoint sees them (issue 21:
    /// which is home, which was set aside after it went down); empty from an older holder.
    #[serde(default)]
    pub relays: Vec<RelayInfo>,
    /// The server's resumable tunnels (issue 18), attached or detached; empty from an agent
    /// or a holder older than this field.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<SessionInfo>,
}

/// One relay of one cluster, as a holder's endpoint sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RelayInfo {
    pub cluster: String,
    pub url: String,
    /// iroh's home relay for this endpoint now.
    pub home: bool,
    pub connected: bool,
    /// Seconds since it was set aside after going down (`None`: in use).
    pub set_aside_secs: Option<u64>,
    /// The home relay's last connection error.
    pub error: Option<String>,
}

/// One resumable tunnel a server keeps, for `malai ssh status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub cluster: String,
    /// The peer's name in the cluster file (or its short id52).
    pub peer: String,
    pub age_secs: u64,
    /// Seconds since its connection was lost; `None` while attached.
    #[serde(default)]
    pub detached_secs: Option<u64>,
    /// Bytes sent to the peer and not yet acknowledged.
    pub buffered: u64,
}

/// Agent → CLI.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FromHolder {
    Hello(HolderHello),
    Status(HolderStatus),
    Stopping,
    /// The server accepted; payload is flowing over the passed descriptors.
    Opened,
    Failed {
        kind: FailKind,
        message: String,
    },
    /// Exec ended with this status (descriptors already closed by the agent).
    Exit {
        status: ExitStatus,
    },
    /// The tunnel ended cleanly in both directions.
    Done,
    /// The request broke after `opened` (connection lost, …).
    Broken {
        message: String,
    },
    /// The key of the cluster named in `release` is no longer held here.
    Released,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("agent socket closed")]
    Closed,
    #[error("control frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(u32),
    #[error("malformed control frame: {0}")]
    Malformed(String),
    #[error("agent socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    FdPass(#[from] FdPassError),
}

/// Encode one frame.
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, ControlError> {
    let body = serde_json::to_vec(msg).map_err(|e| ControlError::Malformed(e.to_string()))?;
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    if len > MAX_FRAME {
        return Err(ControlError::TooLarge(len));
    }
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// Write one frame (no descriptors).
pub async fn write<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), ControlError> {
    let bytes = encode(msg)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

/// Write one frame with descriptors attached (one `sendmsg`).
pub async fn write_with_fds<T: Serialize>(
    sock: &UnixStream,
    msg: &T,
    fds: &[std::os::fd::RawFd],
) -> Result<(), ControlError> {
    let bytes = encode(msg)?;
    fdpass::send_fds(sock, &bytes, fds).await?;
    Ok(())
}

/// Read one frame from a plain byte stream (the CLI side: the agent never sends fds).
pub async fn read<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut R,
) -> Result<T, ControlError> {
    let mut head = [0u8; 4];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ControlError::Closed);
        }
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(head);
    if len > MAX_FRAME {
        return Err(ControlError::TooLarge(len));
    }
    let mut body = vec![0u8; len as usize];
    match r.read_exact(&mut body).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(ControlError::Closed);
        }
        Err(e) => return Err(e.into()),
    }
    decode(&body)
}

pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ControlError> {
    serde_json::from_slice(body).map_err(|e| ControlError::Malformed(e.to_string()))
}

/// The agent's reader: every read is a `recvmsg`, so descriptors are never silently lost
/// to a plain `read`. On a stream socket the kernel may return the bytes of several
/// messages in one read, with the descriptors of the last one; so descriptors are handed
/// out with the frame that contains the last byte of the read they came with. Bytes past
/// a frame are kept for the next one.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    /// Bytes already handed out (absolute stream offset of `buf[0]`).
    consumed: usize,
    /// Descriptors waiting for their frame: (absolute offset where their read ended, fds).
    pending: Vec<(usize, Vec<OwnedFd>)>,
}

impl FrameReader {
    pub fn new() -> FrameReader {
        FrameReader::default()
    }

    /// The next frame and the descriptors sent with it (closed by the caller when it does
    /// not expect any).
    pub async fn next<T: serde::de::DeserializeOwned>(
        &mut self,
        sock: &UnixStream,
    ) -> Result<(T, Vec<OwnedFd>), ControlError> {
        loop {
            if let Some((body, end)) = self.take_frame()? {
                let mut fds = vec![];
                let pending = std::mem::take(&mut self.pending);
                for (at, group) in pending {
                    if at <= end {
                        fds.extend(group);
                    } else {
                        self.pending.push((at, group));
                    }
                }
                let msg = decode(&body)?;
                return Ok((msg, fds));
            }
            let (bytes, fds) = match fdpass::recv_fds(sock).await {
                Ok(r) => r,
                Err(FdPassError::Closed) => return Err(ControlError::Closed),
                Err(e) => return Err(e.into()),
            };
            self.buf.extend_from_slice(&bytes);
            if !fds.is_empty() {
                self.pending.push((self.consumed + self.buf.len(), fds));
            }
            if self.pending.iter().map(|(_, g)| g.len()).sum::<usize>() > MAX_FDS {
                // Dropping them closes them: never hold more than a request can use.
                self.pending.clear();
                return Err(ControlError::Malformed("too many descriptors".into()));
            }
        }
    }

    /// A complete frame's body and the absolute offset of its last byte + 1.
    fn take_frame(&mut self) -> Result<Option<(Vec<u8>, usize)>, ControlError> {
        let Some(head) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        if len > MAX_FRAME {
            return Err(ControlError::TooLarge(len));
        }
        let end = 4 + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let body = self.buf[4..end].to_vec();
        self.buf.drain(..end);
        self.consumed += end;
        Ok(Some((body, self.consumed)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[tokio::test]
    async fn frames_round_trip_with_and_without_fds() {
        let (mut a_r, b) = UnixStream::pair().unwrap();
        let hello = ToHolder::Hello {
            version: VERSION,
            token: Some("t".into()),
        };
        write(&mut a_r, &hello).await.unwrap();
        let (r, w) = std::io::pipe().unwrap();
        let open = ToHolder::Open {
            host: "foo.acme".into(),
            request: OpenRequest::Tunnel {
                port: Some(22),
                resume: true,
            },
            stdin: true,
        };
        write_with_fds(&a_r, &open, &[r.as_raw_fd(), w.as_raw_fd()])
            .await
            .unwrap();
        write(&mut a_r, &ToHolder::Window { cols: 1, rows: 2 })
            .await
            .unwrap();
        let mut reader = FrameReader::new();
        let (m, fds): (ToHolder, _) = reader.next(&b).await.unwrap();
        assert_eq!(m, hello);
        assert!(fds.is_empty());
        let (m, fds): (ToHolder, _) = reader.next(&b).await.unwrap();
        assert_eq!(m, open);
        assert_eq!(fds.len(), 2);
        let (m, fds): (ToHolder, _) = reader.next(&b).await.unwrap();
        assert_eq!(m, ToHolder::Window { cols: 1, rows: 2 });
        assert!(fds.is_empty());
        drop(a_r);
        assert!(matches!(
            reader.next::<ToHolder>(&b).await,
            Err(ControlError::Closed)
        ));
    }

    #[tokio::test]
    async fn hello_wire_form_is_frozen() {
        let bytes = encode(&ToHolder::Hello {
            version: 7,
            token: None,
        })
        .unwrap();
        assert_eq!(&bytes[4..], br#"{"hello":{"version":7}}"#);
        // An older CLI's hello (no token) still parses: it is answered, then refused.
        let old: ToHolder = decode(br#"{"hello":{"version":2}}"#).unwrap();
        assert_eq!(
            old,
            ToHolder::Hello {
                version: 2,
                token: None
            }
        );
        let reply: FromHolder = decode(br#"{"hello":{"version":9,"pid":12,"http":null}}"#).unwrap();
        assert_eq!(
            reply,
            FromHolder::Hello(HolderHello {
                version: 9,
                pid: 12,
                http: None
            })
        );
    }

    #[tokio::test]
    async fn oversized_and_garbage_frames_are_errors() {
        let mut big = (MAX_FRAME + 1).to_be_bytes().to_vec();
        big.extend_from_slice(b"{}");
        let mut r = &big[..];
        assert!(matches!(
            read::<_, ToHolder>(&mut r).await,
            Err(ControlError::TooLarge(_))
        ));
        let (a, b) = UnixStream::pair().unwrap();
        let mut a = a;
        a.write_all(&big).await.unwrap();
        let mut reader = FrameReader::new();
        assert!(matches!(
            reader.next::<ToHolder>(&b).await,
            Err(ControlError::TooLarge(_))
        ));
        for body in [
            &b"not json"[..],
            b"{}",
            b"{\"open\":{}}",
            b"[]",
            b"\"teleport\"",
        ] {
            let mut f = (body.len() as u32).to_be_bytes().to_vec();
            f.extend_from_slice(body);
            let mut r = &f[..];
            assert!(matches!(
                read::<_, ToHolder>(&mut r).await,
                Err(ControlError::Malformed(_))
            ));
        }
        // Truncated at every length: closed, never a panic.
        let good = encode(&ToHolder::Status).unwrap();
        for n in 0..good.len() {
            let mut r = &good[..n];
            assert!(matches!(
                read::<_, ToHolder>(&mut r).await,
                Err(ControlError::Closed)
            ));
        }
    }

    proptest::proptest! {
        /// Whatever bytes arrive, in whatever chunks, the agent's reader returns frames or
        /// errors, never panics, and never buffers past one frame's cap.
        #[test]
        fn reader_survives_garbage(chunks in proptest::collection::vec(
            proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300), 0..6)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let (mut a, b) = UnixStream::pair().unwrap();
                for c in &chunks {
                    a.write_all(c).await.unwrap();
                }
                drop(a);
                let mut reader = FrameReader::new();
                for _ in 0..16 {
                    if reader.next::<ToHolder>(&b).await.is_err() {
                        break;
                    }
                }
            });
        }

        /// Valid frames split at arbitrary points come back whole and in order.
        #[test]
        fn frames_survive_any_split(cols in 0u16.., rows in 0u16.., host in "[a-z.]{0,40}", split in 0usize..200) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let msgs = vec![
                    ToHolder::Window { cols, rows },
                    ToHolder::Open { host: host.clone(), request: OpenRequest::Tunnel { port: None, resume: true }, stdin: false },
                    ToHolder::Finish,
                ];
                let mut bytes = vec![];
                for m in &msgs {
                    bytes.extend(encode(m).unwrap());
                }
                let (mut a, b) = UnixStream::pair().unwrap();
                let cut = split.min(bytes.len());
                let writer = async move {
                    a.write_all(&bytes[..cut]).await.unwrap();
                    tokio::task::yield_now().await;
                    a.write_all(&bytes[cut..]).await.unwrap();
                };
                let reader = async {
                    let mut r = FrameReader::new();
                    let mut got = vec![];
                    for _ in 0..msgs.len() {
                        got.push(r.next::<ToHolder>(&b).await.unwrap().0);
                    }
                    got
                };
                let ((), got) = tokio::join!(writer, reader);
                assert_eq!(got, msgs);
            });
        }
    }
}
