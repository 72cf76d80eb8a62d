//! The resumable byte stream (issue 18; wire format in `protocol::resume`): a tunnel that
//! outlives its QUIC connection.
//!
//! Both ends run the same engine, [`Stream`]: it counts the positions it sent and received,
//! keeps what it sent until the peer acknowledges it (at most `REPLAY_CAP`; then the local
//! reader waits: backpressure, nothing is dropped), and acknowledges what it received.
//! [`Stream::attach`] runs it over one network stream until that stream breaks; the local
//! side (the ProxyCommand's stdio, the server's sshd socket) stays open across attachments,
//! so a new connection picks up the same byte stream where the old one stopped and OpenSSH
//! above it never notices.
//!
//! The client's side is [`Resumable`]: when an attachment breaks it redials (overlapping
//! attempts, [`REDIAL_EVERY`]) until the server takes the session back or says it cannot
//! (a restarted server, an expired session, a revoked peer), or the server's keep time is
//! over. The server's side (its detached-session table) is `server::resume`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::open::{Accepted, Closer, Session, SessionRead, SessionWrite, exchange_for};
use super::own::OwnEndpoint;
use super::{ABORT_CLOSE, ENDPOINT_CLOSE, Resolved, SessionError, liveness};
use crate::config::Server;
use crate::id52::Id52;
use crate::protocol::resume::{
    self as wire, ACK_DELAY, ACK_EVERY, Frame, Grant, MAX_DATA, REPLAY_CAP,
};
use crate::protocol::{Header, Request};
use crate::transport::iroh::{Node, PeerConnection, RecvHalf, RelayRenewals, SendHalf};

/// The reason a client closes a connection it leaves to resume the session on another: the
/// server keeps the session detached. Any other close by the client ends it there.
pub const RESUMING_ELSEWHERE: &str = "resuming elsewhere";

/// How long a stream may stand still after its connection came back from an outage before
/// the session moves ([`Stream::stalled_after_outage`]).
pub const STALL_AFTER_OUTAGE: Duration = Duration::from_secs(5);
/// How long after an outage a stream is watched for standing still.
const WATCH_AFTER_OUTAGE: Duration = Duration::from_secs(30);

/// Why a session left a connection that came back from an outage (`liveness::OUTAGE`).
pub const AFTER_OUTAGE: &str =
    "the connection stood still after an outage; moving to a fresh connection";

/// Why a session left a relayed connection when this machine's relay connection was
/// renewed after an outage of its own network: the old connection's packets still go
/// through the old relay connection, which waits out the kernel's TCP backoff (measured:
/// bytes again 1.9 s after the network was back, against 0.8 s on a fresh connection).
pub const RELAY_RENEWED: &str =
    "this machine's relay connection was renewed after an outage; moving to a fresh connection";

/// Resolves at a relay renewal under a relayed connection; never without `renewals`.
async fn relayed_renewal(renewals: Option<&mut RelayRenewals>) {
    match renewals {
        Some(r) => r.relayed().await,
        None => std::future::pending().await,
    }
}

/// What the client says when the server no longer knows its session because it restarted.
pub const RESTARTED: &str = "the server restarted; the session could not be resumed";

/// Whether commands ask for resumable streams: yes unless `MALAI_RESUME` is `off`/`0`/
/// `false` (to compare against the same build without the layer).
pub fn enabled() -> bool {
    !matches!(
        std::env::var("MALAI_RESUME").as_deref(),
        Ok("off") | Ok("0") | Ok("false") | Ok("no")
    )
}

/// A new redial attempt starts this often while the session is detached (attempts
/// overlap: one that hangs on a dead path never delays the next). Bytes flow again within
/// about this plus one handshake of the network being back.
pub const REDIAL_EVERY: Duration = Duration::from_millis(500);
/// One redial attempt's connect + resume exchange (a handshake through a relay takes well
/// under a second; a dead path never answers).
const REDIAL_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many attempts in flight: with [`REDIAL_TIMEOUT`], a fresh one still starts
/// about every 0.6 s through a long outage.
const REDIAL_PARALLEL: usize = 8;

/// How often a waiting attachment checks that its network stream is still there (an empty
/// write: it fails once the connection is closed or timed out; elsewhere a no-op).
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How one attachment ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both directions ended and were acknowledged: the session is over.
    Finished,
    /// We sent `close` (our user went away).
    ClosedByUs,
    /// The peer sent `close`.
    ClosedByPeer,
}

/// Why an attachment ended without [`End`].
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The network stream broke: detach and resume on another.
    #[error("connection lost: {0}")]
    Net(String),
    /// The local side failed (stdout closed, sshd's socket reset): the session is over (the
    /// peer was sent `close`).
    #[error("local i/o: {0}")]
    Local(std::io::Error),
    /// The peer broke the protocol (counts it cannot have): the session cannot go on.
    #[error("protocol error on the resumable stream: {0}")]
    Protocol(String),
}

/// One side of a resumable stream: its replay buffer and counts. Lives as long as the
/// session; each network stream it runs over is one [`Stream::attach`].
pub struct Stream {
    inner: Mutex<Inner>,
    wake: Notify,
    started: Instant,
}

/// A local read goes into a block of this size, which the next reads fill on; the reads
/// become the replay buffer's chunks as they are (sharing the block), and frames are
/// slices of them: no byte is copied between the local read and the network write.
const READ_BLOCK: usize = 2 * MAX_DATA;
/// ... and a fresh block is taken once less than this is left in the current one.
const READ_MIN: usize = 16 * 1024;
/// A chunk this small is merged into the previous one when that stays this small (typing:
/// a chunk per keystroke would make the buffer's bookkeeping, not its bytes, the memory
/// a detached session holds). Adjacent chunks then sum to more than this, so the buffer
/// has at most `2 * REPLAY_CAP / MERGE_BELOW + 1` chunks.
const MERGE_BELOW: usize = 4096;

#[derive(Default)]
struct Inner {
    /// Sent and not yet acknowledged, as the chunks read; the first byte is position `base`.
    buf: VecDeque<Bytes>,
    /// Bytes in `buf`.
    buffered: usize,
    base: u64,
    /// Our local reader reached EOF: position `base + buffered` is our `eof`.
    local_eof: bool,
    eof_acked: bool,
    /// Positions of the peer's direction delivered to our local writer.
    received: u64,
    peer_eof: bool,
    /// The last count we acknowledged on the current attachment.
    ack_sent: u64,
    /// The local side failed: the attachment sends `close` and ends.
    local_failed: Option<std::io::ErrorKind>,
}

impl Inner {
    fn data_end(&self) -> u64 {
        self.base + self.buffered as u64
    }
    /// Keep `chunk` (just read locally) until the peer acknowledges it.
    fn push(&mut self, chunk: Bytes) {
        self.buffered += chunk.len();
        if let Some(last) = self.buf.back_mut()
            && last.len() + chunk.len() <= MERGE_BELOW
        {
            let mut merged = BytesMut::with_capacity(last.len() + chunk.len());
            merged.extend_from_slice(last);
            merged.extend_from_slice(&chunk);
            *last = merged.freeze();
            return;
        }
        self.buf.push_back(chunk);
    }
    /// Up to [`MAX_DATA`] bytes from position `at` (`base <= at < data_end`) on, from one
    /// chunk: a slice of it, not a copy. Searched from the newest chunk, where the sender
    /// usually is.
    fn slice_at(&self, at: u64) -> Bytes {
        let mut end = self.data_end();
        for c in self.buf.iter().rev() {
            let start = end - c.len() as u64;
            if at >= start {
                let off = (at - start) as usize;
                return c.slice(off..(off + MAX_DATA).min(c.len()));
            }
            end = start;
        }
        Bytes::new()
    }
    fn end(&self) -> u64 {
        self.data_end() + u64::from(self.local_eof)
    }
    /// The peer has received `n` positions of our direction.
    fn ack(&mut self, n: u64) -> Result<(), AttachError> {
        if n > self.end() {
            return Err(AttachError::Protocol(format!(
                "the peer acknowledged {n} positions, only {} were sent",
                self.end()
            )));
        }
        if n < self.base {
            // An older count (the handshake's, after later acks): nothing to drop.
            return Ok(());
        }
        let drop = (n.min(self.data_end()) - self.base) as usize;
        let mut left = drop;
        while left > 0 {
            let Some(front) = self.buf.front_mut() else {
                break;
            };
            if front.len() <= left {
                left -= front.len();
                self.buf.pop_front();
            } else {
                front.advance(left);
                left = 0;
            }
        }
        self.buffered -= drop;
        self.base += drop as u64;
        if self.local_eof && n == self.end() {
            self.eof_acked = true;
        }
        Ok(())
    }
    fn finished(&self) -> bool {
        self.eof_acked && self.peer_eof && self.ack_sent == self.received
    }
}

/// What the sending half does next.
enum Next {
    Data(Bytes),
    Eof,
    Ack(u64),
    Close,
    Fin,
    Wait { read: usize, ack_due: bool },
}

impl Default for Stream {
    fn default() -> Self {
        Stream::new()
    }
}

impl Stream {
    pub fn new() -> Stream {
        Stream {
            inner: Mutex::new(Inner::default()),
            wake: Notify::new(),
            started: Instant::now(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Positions of the peer's direction received so far (what a resume handshake says).
    pub fn received(&self) -> u64 {
        self.lock().received
    }

    /// Where the stream stands: positions received, and positions of ours the peer
    /// acknowledged. Either moving is the stream making progress.
    fn positions(&self) -> (u64, u64) {
        let i = self.lock();
        (i.received, i.base)
    }

    /// Resolves when the connection under an attachment came back from an outage
    /// (`outages`, `liveness` step 4) and the stream then made no progress for
    /// [`STALL_AFTER_OUTAGE`]: the old connection is stuck, and the session should move to
    /// a fresh one. A peer that was only slow (a loaded machine: silences of 15–20 s were
    /// seen with 100 transfers under stress) catches up within that time, and its sessions
    /// stay where they are — a hundred of them moving at once only loads it more. Never
    /// resolves without `outages` (or once it closes).
    pub async fn stalled_after_outage(
        &self,
        outages: Option<&mut tokio::sync::watch::Receiver<u64>>,
    ) {
        let Some(outages) = outages else {
            return std::future::pending().await;
        };
        loop {
            if outages.changed().await.is_err() {
                return std::future::pending().await;
            }
            // The stuck connection may still carry a little first (what fits beside the
            // hole in the peer's window), so watch a while, not once.
            let back = Instant::now();
            while back.elapsed() < WATCH_AFTER_OUTAGE {
                let before = self.positions();
                tokio::time::sleep(STALL_AFTER_OUTAGE).await;
                if self.positions() == before {
                    return;
                }
            }
        }
    }

    /// Bytes sent and not yet acknowledged (for status).
    pub fn buffered(&self) -> usize {
        self.lock().buffered
    }

    /// When the session started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Run the stream over one network stream (`net_r`/`net_w`), the peer having said it
    /// received `peer_received` positions of ours: replay what it lacks, then go on, until
    /// the session ends ([`End`]) or this network stream breaks ([`AttachError::Net`]; call
    /// again on the next one). `close` makes us send `close` and end.
    ///
    /// Every future awaited here can be dropped at any point without losing or doubling a
    /// byte: counts move only with bytes that really reached the local writer.
    pub async fn attach<LR, LW, NR, NW>(
        &self,
        peer_received: u64,
        local_r: &mut LR,
        local_w: &mut LW,
        net_r: &mut NR,
        net_w: &mut NW,
        close: &CancellationToken,
    ) -> Result<End, AttachError>
    where
        LR: AsyncRead + Unpin + ?Sized,
        LW: AsyncWrite + Unpin + ?Sized,
        NR: AsyncRead + Unpin + ?Sized,
        NW: AsyncWrite + Unpin + ?Sized,
    {
        {
            let mut i = self.lock();
            if peer_received < i.base {
                return Err(AttachError::Protocol(format!(
                    "the peer has only {peer_received} positions, {} were already acknowledged",
                    i.base
                )));
            }
            i.ack(peer_received)?;
            i.ack_sent = i.received;
        }
        let up = self.send_half(peer_received, local_r, net_w, close);
        let down = self.receive_half(local_w, net_r);
        let (end, ()) = tokio::try_join!(up, down)?;
        Ok(end)
    }

    /// Local reads and everything we send: data (from `cursor` on), eof, acks, close, FIN.
    async fn send_half<LR, NW>(
        &self,
        mut cursor: u64,
        local_r: &mut LR,
        net_w: &mut NW,
        close: &CancellationToken,
    ) -> Result<End, AttachError>
    where
        LR: AsyncRead + Unpin + ?Sized,
        NW: AsyncWrite + Unpin + ?Sized,
    {
        let net = |e: std::io::Error| AttachError::Net(e.to_string());
        let mut rbuf = BytesMut::new();
        let mut ack_deadline: Option<tokio::time::Instant> = None;
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.reset();
        loop {
            let next = {
                let mut i = self.lock();
                let due = ack_deadline.is_some_and(|d| d <= tokio::time::Instant::now());
                if close.is_cancelled() || i.local_failed.is_some() {
                    Next::Close
                } else if cursor < i.data_end() {
                    Next::Data(i.slice_at(cursor))
                } else if i.local_eof && cursor == i.data_end() {
                    Next::Eof
                } else if i.received > i.ack_sent
                    && (due || i.peer_eof || i.received - i.ack_sent >= ACK_EVERY)
                {
                    i.ack_sent = i.received;
                    Next::Ack(i.received)
                } else if i.finished() {
                    Next::Fin
                } else {
                    let read = if i.local_eof {
                        0
                    } else {
                        MAX_DATA.min(REPLAY_CAP.saturating_sub(i.buffered))
                    };
                    Next::Wait {
                        read,
                        ack_due: i.received > i.ack_sent,
                    }
                }
            };
            match next {
                Next::Data(d) => {
                    let n = d.len() as u64;
                    wire::write(net_w, &Frame::Data(d)).await.map_err(net)?;
                    cursor += n;
                }
                Next::Eof => {
                    wire::write(net_w, &Frame::Eof).await.map_err(net)?;
                    cursor += 1;
                }
                Next::Ack(n) => {
                    ack_deadline = None;
                    wire::write(net_w, &Frame::Ack(n)).await.map_err(net)?;
                }
                Next::Close => {
                    wire::write(net_w, &Frame::Close).await.map_err(net)?;
                    let _ = net_w.flush().await;
                    let _ = net_w.shutdown().await;
                    if let Some(kind) = self.lock().local_failed {
                        return Err(AttachError::Local(kind.into()));
                    }
                    return Ok(End::ClosedByUs);
                }
                Next::Fin => {
                    // The receiving half ends at the peer's FIN.
                    let _ = net_w.flush().await;
                    net_w.shutdown().await.map_err(net)?;
                    return Ok(End::Finished);
                }
                Next::Wait { read, ack_due } => {
                    if rbuf.capacity() < READ_MIN {
                        // The chunks read so far keep the old block alive; this is a new one.
                        rbuf.reserve(READ_BLOCK);
                    }
                    let read = read.min(rbuf.capacity());
                    let mut room = (&mut rbuf).limit(read);
                    if ack_due && ack_deadline.is_none() {
                        ack_deadline = Some(tokio::time::Instant::now() + ACK_DELAY);
                    }
                    let timer = async {
                        match ack_deadline {
                            Some(d) => tokio::time::sleep_until(d).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        r = local_r.read_buf(&mut room), if read > 0 => {
                            let mut i = self.lock();
                            match r {
                                Ok(0) => i.local_eof = true,
                                Ok(_) => i.push(rbuf.split().freeze()),
                                Err(e) => i.local_failed = Some(e.kind()),
                            }
                        }
                        _ = self.wake.notified() => {}
                        _ = timer => {}
                        _ = close.cancelled() => {}
                        // Both halves may wait on the local side (a command that reads
                        // nothing, a reader that stalled) and so never touch the network:
                        // this notices a connection gone meanwhile.
                        _ = probe.tick() => net_w.write(&[]).await.map(drop).map_err(net)?,
                    }
                }
            }
        }
    }

    /// Frames from the peer: data to the local writer, acks into the replay buffer.
    ///
    /// The network is read eagerly, never waiting on the local writer: the peer's acks of
    /// our direction ride behind its data on the same stream, so a receiver that stopped
    /// reading while its local side is slow would stop them too — and a local side that
    /// stops reading while it cannot write (an SSH server does) would then wait on our
    /// full replay buffer for ever, both directions stuck. What is read and not yet
    /// delivered waits here; it is never more than the peer may send unacknowledged
    /// ([`REPLAY_CAP`]), since we acknowledge only what was delivered. It belongs to this
    /// attachment: dropped with it, it is sent again (it was never acknowledged).
    async fn receive_half<LW, NR>(
        &self,
        local_w: &mut LW,
        net_r: &mut NR,
    ) -> Result<(), AttachError>
    where
        LW: AsyncWrite + Unpin + ?Sized,
        NR: AsyncRead + Unpin + ?Sized,
    {
        let (queue, mut delivery) = tokio::sync::mpsc::unbounded_channel::<Inbound>();
        let pending = std::sync::atomic::AtomicUsize::new(0);
        let read = async {
            let mut eof_seen = self.lock().peer_eof;
            loop {
                let frame = wire::read(net_r)
                    .await
                    .map_err(|e| AttachError::Net(e.to_string()))?;
                let item = match frame {
                    None => Inbound::Fin,
                    Some(Frame::Data(d)) => {
                        if eof_seen {
                            return Err(AttachError::Protocol("data after eof".into()));
                        }
                        let held = pending.fetch_add(d.len(), Ordering::SeqCst) + d.len();
                        if held > REPLAY_CAP {
                            return Err(AttachError::Protocol(format!(
                                "the peer sent {held} bytes beyond what we acknowledged \
                                 (at most {REPLAY_CAP})"
                            )));
                        }
                        Inbound::Data(d)
                    }
                    Some(Frame::Ack(n)) => {
                        self.lock().ack(n)?;
                        self.wake.notify_one();
                        continue;
                    }
                    Some(Frame::Eof) => {
                        if eof_seen {
                            return Err(AttachError::Protocol("a second eof".into()));
                        }
                        eof_seen = true;
                        Inbound::Eof
                    }
                    Some(Frame::Close) => return Err(AttachError::Net(PEER_CLOSED.into())),
                };
                let fin = matches!(item, Inbound::Fin);
                // The receiver lives as long as this future (joined below).
                let _ = queue.send(item);
                if fin {
                    return Ok(());
                }
            }
        };
        let deliver = async {
            while let Some(item) = delivery.recv().await {
                match item {
                    Inbound::Fin => {
                        let i = self.lock();
                        // The peer ends its half only once the session is over (its eof
                        // acknowledged, ours received): anything else is a broken stream.
                        return if i.eof_acked && i.peer_eof {
                            drop(i);
                            self.wake.notify_one();
                            Ok(())
                        } else {
                            Err(AttachError::Net("the stream ended early".into()))
                        };
                    }
                    Inbound::Data(d) => {
                        let mut off = 0;
                        while off < d.len() {
                            match local_w.write(&d[off..]).await {
                                Ok(0) | Err(_) => {
                                    return self.local_failed(std::io::ErrorKind::BrokenPipe).await;
                                }
                                Ok(n) => {
                                    off += n;
                                    // Before the count moves: an ack of these bytes lets
                                    // the peer send as many again, and they must not be
                                    // found still held.
                                    pending.fetch_sub(n, Ordering::SeqCst);
                                    self.lock().received += n as u64;
                                }
                            }
                        }
                        if let Err(e) = local_w.flush().await {
                            return self.local_failed(e.kind()).await;
                        }
                        self.wake.notify_one();
                    }
                    Inbound::Eof => {
                        // Shutting down a writer whose reader already left is no error for us.
                        let _ = local_w.shutdown().await;
                        let mut i = self.lock();
                        i.peer_eof = true;
                        i.received += 1;
                        drop(i);
                        self.wake.notify_one();
                    }
                }
            }
            // The reading half ended without a FIN: it returned its error first.
            Ok(())
        };
        tokio::try_join!(read, deliver).map(drop)
    }

    /// Our local writer failed: let the sending half send `close`, and wait for it.
    async fn local_failed(&self, kind: std::io::ErrorKind) -> Result<(), AttachError> {
        self.lock().local_failed = Some(kind);
        self.wake.notify_one();
        std::future::pending().await
    }
}

/// What the receiving half read and its delivery has yet to hand to the local writer.
enum Inbound {
    Data(Bytes),
    Eof,
    /// The peer ended its half (QUIC FIN).
    Fin,
}

/// The marker the receiving half ends with on the peer's `close` (mapped to
/// [`End::ClosedByPeer`] by [`attach_end`]).
const PEER_CLOSED: &str = "\u{0}peer-closed";

/// [`Stream::attach`]'s result with the peer's `close` as [`End::ClosedByPeer`].
pub fn attach_end(r: Result<End, AttachError>) -> Result<End, AttachError> {
    match r {
        Err(AttachError::Net(m)) if m == PEER_CLOSED => Ok(End::ClosedByPeer),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------
// The client's side.
// ---------------------------------------------------------------------------------------

/// What carries a resumable session's network streams, one attachment at a time: this
/// process's own endpoint ([`OwnNet`]), a key holder's pool (`keyholder::resume`), or an
/// `ssh` child (`session::via_resume`). The run loop ([`Resumable::run`]) is one for all;
/// how a carrier attaches, notices that the server ended the session on purpose, redials
/// and closes is its own.
///
/// (`async fn` without `Send` bounds: every carrier's futures are `Send` and the compiler
/// sees it through the concrete types; none is used as `dyn`.)
#[allow(async_fn_in_trait)]
pub trait Carrier {
    type R: AsyncRead + Unpin;
    type W: AsyncWrite + Unpin;
    /// The server's name, for logs.
    fn server(&self) -> &str;
    /// The network stream the session is attached to now.
    fn net(&mut self) -> (&mut Self::R, &mut Self::W);
    /// Outages of the connection under it (`liveness` step 4), when it has a watchdog.
    fn outages(&self) -> Option<tokio::sync::watch::Receiver<u64>>;
    /// Renewals of this machine's relay connection while the connection under it goes
    /// through the relay (`transport::relay_rejoin`), when it is an iroh one.
    fn relay_renewals(&self) -> Option<RelayRenewals> {
        None
    }
    /// Our `close` did not get out within [`CLOSE_GRACE`]: end the session on the server
    /// some other way (instead of leaving it detached there for its keep time), such as
    /// `close`, a resume that ends it.
    async fn abandon(&mut self, close: wire::Resume);
    /// Our `close` raced the server's end of the stream: the session is over.
    async fn closed(&mut self);
    /// The session ended (`end`): let the last bytes reach the server, release the carrier.
    async fn ended(&mut self, end: End);
    /// The attachment broke: `Err` when the server ended the session on purpose (it shut
    /// down, restarted, or refuses us), so there is nothing to resume.
    async fn broken(&mut self) -> Result<(), SessionError>;
    /// Leave the broken attachment (the server keeps the session detached).
    fn detach(&mut self);
    /// Dial again until the server takes the session back, attaching to the new stream:
    /// `Ok(Some(the count it received))`; `Ok(None)` when `close` fired meanwhile; an error
    /// when the server cannot resume it (or its keep time is over).
    async fn redial(
        &mut self,
        stream: &Stream,
        grant: &Grant,
        close: &CancellationToken,
    ) -> Result<Option<u64>, SessionError>;
    /// The redial ended without a resume; `closed` (a resume that ends the session) when
    /// the user closed it meanwhile: tell the server, best effort.
    async fn gave_up(&mut self, closed: Option<wire::Resume>);
    /// The session failed (local i/o, a protocol error): tear the attachment down.
    async fn failed(&mut self);
}

/// A resumable session (a tunnel's bytes, or an exec's frames) on a [`Carrier`]: the
/// engine, the server's grant and the record `malai ssh status` shows.
pub struct Resumable<C = OwnNet> {
    carrier: C,
    grant: Grant,
    stream: Stream,
    record: super::registry::Registered,
}

impl<C: Carrier> Resumable<C> {
    /// A session `carrier` was granted as resumable (`grant`); `kind` is the request's.
    pub(crate) fn new(
        carrier: C,
        dir: &crate::config::store::ClusterDir,
        kind: &str,
        grant: Grant,
    ) -> Resumable<C> {
        let record = super::registry::register(
            dir,
            carrier.server(),
            kind,
            super::registry::Granted {
                session: &grant.session,
                secret: &grant.secret,
                keep_secs: grant.keep_secs,
            },
        );
        Resumable {
            carrier,
            grant,
            stream: Stream::new(),
            record,
        }
    }

    /// Its carrier.
    pub(crate) fn carrier(&self) -> &C {
        &self.carrier
    }

    /// What a resume (or a resume with `close`) of this session presents now.
    pub(crate) fn resume(&self, close: bool) -> wire::Resume {
        wire::Resume {
            session: self.grant.session.clone(),
            secret: self.grant.secret.clone(),
            received: self.stream.received(),
            close,
        }
    }

    /// Run the session on `local_r`/`local_w` until it ends. `close` (a signal: ssh went
    /// away) ends it now and tells the server to end its side too.
    pub async fn run<LR, LW>(
        mut self,
        local_r: &mut LR,
        local_w: &mut LW,
        close: &CancellationToken,
    ) -> Result<End, SessionError>
    where
        LR: AsyncRead + Unpin + ?Sized,
        LW: AsyncWrite + Unpin + ?Sized,
    {
        self.carry(local_r, local_w, close).await
    }

    /// [`Resumable::run`], keeping the session (a key holder's says, when it is dropped,
    /// whether the run had ended).
    pub(crate) async fn carry<LR, LW>(
        &mut self,
        local_r: &mut LR,
        local_w: &mut LW,
        close: &CancellationToken,
    ) -> Result<End, SessionError>
    where
        LR: AsyncRead + Unpin + ?Sized,
        LW: AsyncWrite + Unpin + ?Sized,
    {
        let mut peer_received = self.grant.received;
        loop {
            let r = {
                // This connection came back from an outage: move to a fresh one (see
                // `liveness` step 4) rather than wait for the old one to carry bytes again.
                let mut outages = self.carrier.outages();
                let mut renewals = self.carrier.relay_renewals();
                let (net_r, net_w) = self.carrier.net();
                let attach =
                    self.stream
                        .attach(peer_received, local_r, local_w, net_r, net_w, close);
                tokio::select! {
                    r = attach => Some(r),
                    _ = self.stream.stalled_after_outage(outages.as_mut()), if !close.is_cancelled() => {
                        Some(Err(AttachError::Net(AFTER_OUTAGE.into())))
                    }
                    _ = relayed_renewal(renewals.as_mut()), if !close.is_cancelled() => {
                        Some(Err(AttachError::Net(RELAY_RENEWED.into())))
                    }
                    _ = abandoned(close) => None,
                }
            };
            let server = self.carrier.server().to_string();
            let Some(r) = r else {
                tracing::info!(%server, "the session's close did not get out in time; ending it another way");
                let bye = self.resume(true);
                self.carrier.abandon(bye).await;
                return Ok(End::ClosedByUs);
            };
            if close.is_cancelled() && matches!(r, Err(AttachError::Net(_))) {
                self.carrier.closed().await;
                return Ok(End::ClosedByUs);
            }
            match attach_end(r) {
                Ok(end) => {
                    self.carrier.ended(end).await;
                    return match end {
                        End::ClosedByPeer => {
                            Err(SessionError::Lost("the server ended the session".into()))
                        }
                        e => Ok(e),
                    };
                }
                Err(AttachError::Net(why)) => {
                    self.carrier.broken().await?;
                    tracing::info!(%server, %why, received = self.stream.received(), buffered = self.stream.buffered(), "connection lost; resuming");
                    self.record.reconnecting(self.stream.buffered());
                    self.carrier.detach();
                    match self.carrier.redial(&self.stream, &self.grant, close).await {
                        Ok(Some(n)) => {
                            peer_received = n;
                            self.record.attached(self.stream.buffered());
                        }
                        Ok(None) => {
                            let bye = self.resume(true);
                            self.carrier.gave_up(Some(bye)).await;
                            return Ok(End::ClosedByUs);
                        }
                        Err(e) => {
                            self.carrier.gave_up(None).await;
                            return Err(e);
                        }
                    }
                }
                Err(e) => {
                    self.carrier.failed().await;
                    return Err(SessionError::Lost(e.to_string()));
                }
            }
        }
    }
}

/// A resumable session's carrier over this process's own endpoint.
pub struct OwnNet {
    /// Given back ([`OwnNet::release`]) when the session ends: the last user of the
    /// endpoint closes it (`OwnEndpoint::done` counts the references), so a copy kept
    /// here past that would leave it unclosed and the server holding the connection until
    /// its idle limit.
    own: Option<Arc<OwnEndpoint>>,
    node: Node,
    peer: Id52,
    hints: Vec<std::net::SocketAddr>,
    cluster: Id52,
    server: Server,
    conn: PeerConnection,
    watchdog: Arc<liveness::Watchdog>,
    send: SendHalf,
    recv: RecvHalf,
    /// Ends the sessions this machine's gone processes left (runs alongside; stops with us).
    reaper: Reaper,
    _close_on_drop: CloseOnDrop,
}

/// The task of [`reap_orphans`], aborted when the session that started it ends.
struct Reaper(tokio::task::JoinHandle<()>);

impl Drop for Reaper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How long asking a server to end one left session may take.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);

/// Sessions of this cluster left by processes of this machine that are gone (SIGKILL, a
/// crash: `session::registry::orphans`): their servers keep them detached, commands
/// running, for `session-keep`. Ask each server to end them (a `resume` with `close`),
/// then forget the record, whatever the answer (a server that does not know the session
/// any more has ended it already; one unreachable now ends it at its keep time).
async fn reap_orphans(
    node: Node,
    dir: crate::config::store::ClusterDir,
    cfg: crate::config::ClusterConfig,
) {
    for orphan in super::registry::orphans(&dir) {
        let r = &orphan.record;
        let Some(server) = cfg.servers.get(&r.server) else {
            orphan.forget();
            continue;
        };
        let close = wire::Resume {
            session: r.session.clone(),
            secret: r.secret.clone(),
            received: 0,
            close: true,
        };
        let asked = async {
            if server.ssh_via.is_some() {
                return Some(super::via_resume::tell_closed(server, cfg.manager, close).await);
            }
            let conn = node.connect(&server.id52, &server.addrs).await.ok()?;
            let (mut send, mut recv) = conn.open().await.ok()?;
            let header = Header {
                cluster: Some(cfg.manager),
                request: Request::Resume(close),
            };
            let answer = exchange_for(&mut send, &mut recv, header).await;
            conn.close("done");
            Some(answer.is_ok())
        };
        let ended = tokio::time::timeout(REAP_TIMEOUT, asked)
            .await
            .ok()
            .flatten();
        tracing::info!(server = %r.server, session = %short(&r.session), pid = r.pid, ?ended, "asked the server to end a session whose process is gone");
        orphan.forget();
    }
}

/// What asking for a resumable session gave.
pub enum Opened {
    Resumable(Box<Resumable>),
    /// Through an `ssh` child (`ssh-via`).
    Via(Box<Resumable<super::via_resume::ViaNet>>),
    /// The server does not offer resume (an older server, or its caps are reached): a
    /// plain session, as before.
    Plain(Box<Session>),
}

/// Ask `server` over `own` for `request` — a `tunnel` or an `exec` that asks for resume —
/// as a resumable session.
pub async fn open(
    own: Arc<OwnEndpoint>,
    resolved: &Resolved,
    server: &Server,
    request: Request,
) -> Result<Opened, SessionError> {
    let net = super::own::net_config(Some(&resolved.config))?;
    let kind = request.kind();
    let header = Header {
        cluster: Some(resolved.config.manager),
        request,
    };
    let conn = match super::connect::dial_server(&own.node, server.into(), &net).await {
        Ok(c) => c,
        Err(e) => {
            own.done(ABORT_CLOSE).await;
            return Err(e);
        }
    };
    let opened = async {
        let (mut send, mut recv) = conn.open().await?;
        let accepted = exchange_for(&mut send, &mut recv, header)
            .await
            .map_err(|e| super::open::refused_by_close(&conn, e))?;
        Ok::<_, SessionError>((send, recv, accepted))
    }
    .await;
    let (send, recv, accepted) = match opened {
        Ok(x) => x,
        Err(e) => {
            own.done(ABORT_CLOSE).await;
            return Err(e);
        }
    };
    let watchdog = liveness::watch_server(&own.node, &conn, server, resolved);
    match accepted {
        Accepted::Plain => Ok(Opened::Plain(Box::new(Session {
            closer: Closer::Iroh {
                own,
                conn,
                _watchdog: watchdog,
            },
            send: SessionWrite::Iroh(send),
            recv: SessionRead::Iroh(recv),
        }))),
        Accepted::Resumable(grant) => {
            tracing::info!(server = %server.name, kind, session = %short(&grant.session), keep_secs = grant.keep_secs, "resumable {kind}");
            let reaper = Reaper(tokio::spawn(reap_orphans(
                own.node.clone(),
                resolved.dir.clone(),
                resolved.config.clone(),
            )));
            let carrier = OwnNet {
                node: own.node.clone(),
                own: Some(own),
                peer: server.id52,
                hints: server.addrs.clone(),
                cluster: resolved.config.manager,
                server: server.clone(),
                _close_on_drop: CloseOnDrop(conn.clone()),
                conn,
                watchdog,
                send,
                recv,
                reaper,
            };
            Ok(Opened::Resumable(Box::new(Resumable::new(
                carrier,
                &resolved.dir,
                kind,
                grant,
            ))))
        }
    }
}

pub(crate) fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

impl OwnNet {
    /// Give the endpoint back (the last user closes it, waiting at most `limit`).
    async fn release(&mut self, limit: Duration) {
        if let Some(own) = self.own.take() {
            own.done(limit).await;
        }
    }
}

impl Carrier for OwnNet {
    type R = RecvHalf;
    type W = SendHalf;

    fn server(&self) -> &str {
        &self.server.name
    }

    fn net(&mut self) -> (&mut RecvHalf, &mut SendHalf) {
        (&mut self.recv, &mut self.send)
    }

    fn outages(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.watchdog.outages())
    }

    fn relay_renewals(&self) -> Option<RelayRenewals> {
        self.conn.relay_renewals()
    }

    async fn abandon(&mut self, _close: wire::Resume) {
        // Our `close` could not get out in time (a stream blocked behind a full window, a
        // loaded machine): closing the connection (any reason but RESUMING_ELSEWHERE)
        // ends the session on the server instead of leaving it detached there.
        self.send.reset();
        self.conn.close("closed");
        self.release(ABORT_CLOSE).await;
    }

    async fn closed(&mut self) {
        self.conn.close("closed");
        self.release(ABORT_CLOSE).await;
    }

    async fn ended(&mut self, end: End) {
        let wait = if end == End::Finished {
            super::LINGER
        } else {
            Duration::from_millis(500)
        };
        let _ = tokio::time::timeout(wait, self.send.acknowledged()).await;
        self.conn.close("done");
        // A short session would otherwise cut its reaper off mid-request.
        let _ = tokio::time::timeout(REAP_TIMEOUT, &mut self.reaper.0).await;
        self.release(ENDPOINT_CLOSE).await;
    }

    async fn broken(&mut self) -> Result<(), SessionError> {
        // A server that closed the connection on purpose (it is shutting down, or refuses
        // us) has ended its sessions: nothing to resume.
        let _ = tokio::time::timeout(Duration::from_millis(300), self.conn.closed()).await;
        if self.conn.closed_by_peer() && !self.watchdog.saw_restart() {
            let reason = self
                .conn
                .peer_close_reason()
                .unwrap_or_else(|| "it is shutting down".into());
            tracing::info!(server = %self.server.name, %reason, "the server closed the connection; not resuming");
            self.release(ABORT_CLOSE).await;
            return Err(SessionError::Lost(format!(
                "the server closed the connection ({reason}); the session could not be resumed"
            )));
        }
        Ok(())
    }

    fn detach(&mut self) {
        self.conn.close(RESUMING_ELSEWHERE);
    }

    async fn redial(
        &mut self,
        stream: &Stream,
        grant: &Grant,
        close: &CancellationToken,
    ) -> Result<Option<u64>, SessionError> {
        if self.watchdog.saw_restart() {
            return Err(SessionError::Lost(RESTARTED.into()));
        }
        let (node, peer, hints, cluster) = (
            self.node.clone(),
            self.peer,
            self.hints.clone(),
            self.cluster,
        );
        let attempt = move |resume, turn| {
            let (node, hints) = (node.clone(), hints.clone());
            async move {
                let conn = node
                    .connect(&peer, &hints)
                    .await
                    .map_err(|e| Attempt::Retry(e.to_string()))?;
                // Dropped (the attempt timed out, or lost to another) or failed, this
                // connection is closed as one we left to resume elsewhere: the server may
                // have taken the session onto it already, and any other close would end it
                // there (seen under load: an attempt timing out after the server's grant
                // left every later one "unknown session").
                let guard = LeftToResume { conn, kept: false };
                let (send, recv, grant) = resume_on(&guard.conn, cluster, resume, turn).await?;
                Ok((guard.keep(), send, recv, grant))
            }
        };
        let Some((conn, send, recv, grant)) =
            redial_until(stream, grant, &self.server.name, close, Pace::QUIC, attempt).await?
        else {
            return Ok(None);
        };
        self.watchdog = liveness::watch(
            self.node.clone(),
            conn.clone(),
            self.peer,
            self.hints.clone(),
            self.cluster,
        )
        .into();
        self._close_on_drop = CloseOnDrop(conn.clone());
        self.conn = conn;
        self.send = send;
        self.recv = recv;
        Ok(Some(grant.received))
    }

    async fn gave_up(&mut self, _closed: Option<wire::Resume>) {
        self.release(ABORT_CLOSE).await;
    }

    async fn failed(&mut self) {
        self.send.reset();
        self.conn.close("aborted");
        self.release(ABORT_CLOSE).await;
    }
}

/// How long a session closed by its user may take to tell the server (its `close` frame);
/// then the connection is closed, which tells it too.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Resolves [`CLOSE_GRACE`] after `close` fired.
pub async fn abandoned(close: &CancellationToken) {
    close.cancelled().await;
    tokio::time::sleep(CLOSE_GRACE).await;
}

/// Closes its connection when dropped: a session dropped before it ended (its caller gave
/// up waiting after a signal) closes its connection, so the server ends the session
/// instead of keeping it detached (a no-op when the connection was closed already).
struct CloseOnDrop(PeerConnection);

/// A redial attempt's connection until the attempt succeeds ([`LeftToResume::keep`]);
/// dropped before that, it is closed with [`RESUMING_ELSEWHERE`].
struct LeftToResume {
    conn: PeerConnection,
    kept: bool,
}

impl LeftToResume {
    fn keep(mut self) -> PeerConnection {
        self.kept = true;
        self.conn.clone()
    }
}

impl Drop for LeftToResume {
    fn drop(&mut self) {
        if !self.kept {
            self.conn.close(RESUMING_ELSEWHERE);
        }
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close("closed");
    }
}

/// Whose turn it is to resume: attempts connect in parallel but resume one at a time, and
/// none after one has succeeded (two resumes of one session would take it from each other).
pub type Turn = Arc<tokio::sync::Mutex<bool>>;

/// Start a redial attempt (every `pace.every`, at most `pace.parallel` at once, each
/// bounded by `pace.timeout`; [`Pace::QUIC`] over iroh) until one takes the session back (`Ok(Some(what it
/// returned))`), `close` fires (`Ok(None)`), the server refuses (an error, naming a restart
/// when its boot id changed), or the server's keep time is over. The one redial loop of
/// both clients: a command's own endpoint, and a key holder's pool.
pub async fn redial_until<T, F, Fut>(
    stream: &Stream,
    grant: &Grant,
    server: &str,
    close: &CancellationToken,
    pace: Pace,
    mut attempt: F,
) -> Result<Option<T>, SessionError>
where
    F: FnMut(wire::Resume, Turn) -> Fut,
    Fut: std::future::Future<Output = Result<T, Attempt>> + Send + 'static,
    T: Send + 'static,
{
    let detached = Instant::now();
    let give_up = Duration::from_secs(grant.keep_secs) + Duration::from_secs(60);
    let mut attempts = tokio::task::JoinSet::new();
    let tick = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(tick);
    let mut tries = 0u64;
    let turn: Turn = Arc::new(tokio::sync::Mutex::new(false));
    loop {
        tokio::select! {
            _ = close.cancelled() => return Ok(None),
            _ = &mut tick => {
                tick.as_mut().reset(tokio::time::Instant::now() + pace.next(detached.elapsed()));
                if detached.elapsed() > give_up {
                    return Err(SessionError::Lost(format!(
                        "the session could not be resumed: the server was unreachable for {}",
                        humantime::format_duration(Duration::from_secs(detached.elapsed().as_secs()))
                    )));
                }
                if attempts.len() < pace.parallel {
                    tries += 1;
                    let resume = wire::Resume {
                        session: grant.session.clone(),
                        secret: grant.secret.clone(),
                        received: stream.received(),
                        close: false,
                    };
                    let one = attempt(resume, turn.clone());
                    attempts.spawn(async move {
                        tokio::time::timeout(pace.timeout, one)
                            .await
                            .unwrap_or(Err(Attempt::Retry("timed out".into())))
                    });
                }
            }
            Some(done) = attempts.join_next(), if !attempts.is_empty() => {
                match done {
                    Ok(Ok(resumed)) => {
                        attempts.abort_all();
                        tracing::info!(%server, session = %short(&grant.session), after = ?detached.elapsed(), tries, replay = stream.buffered(), "resumed");
                        return Ok(Some(resumed));
                    }
                    Ok(Err(Attempt::Retry(why))) => {
                        tracing::debug!(%server, %why, "redial failed; trying again");
                    }
                    Ok(Err(Attempt::Refused { reason, boot })) => {
                        attempts.abort_all();
                        tracing::warn!(%server, %reason, "the server refused to resume the session");
                        if boot.is_some_and(|b| b != grant.boot) {
                            return Err(SessionError::Lost(RESTARTED.into()));
                        }
                        return Err(SessionError::Lost(format!(
                            "the session could not be resumed: {reason}"
                        )));
                    }
                    Err(_) => {}
                }
            }
        }
    }
}

/// How often redial attempts start, how many run at once, and how long each may take.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Between two attempts at first...
    pub every: Duration,
    /// ... and at most, once detached for long: the wait is a tenth of the time detached
    /// between the two (a failed attempt through ssh is a whole ssh run; over hours of
    /// outage one every 15 s costs little, and a network back after that long waits a
    /// tenth more at most).
    pub slowest: Duration,
    pub parallel: usize,
    pub timeout: Duration,
}

impl Pace {
    /// Over iroh: [`REDIAL_EVERY`] throughout, [`REDIAL_PARALLEL`], [`REDIAL_TIMEOUT`].
    pub const QUIC: Pace = Pace {
        every: REDIAL_EVERY,
        slowest: REDIAL_EVERY,
        parallel: REDIAL_PARALLEL,
        timeout: REDIAL_TIMEOUT,
    };

    /// The wait before the next attempt, detached for `detached`.
    pub fn next(&self, detached: Duration) -> Duration {
        (detached / 10).clamp(self.every, self.slowest.max(self.every))
    }
}

/// How one redial attempt failed.
pub enum Attempt {
    /// Not reached (yet): try again.
    Retry(String),
    /// The server answered and will not resume; `boot` is its boot id when it told us.
    Refused {
        reason: String,
        boot: Option<String>,
    },
}

/// One resume of `resume`'s session on `conn` (a fresh connection of ours, or a key
/// holder's pooled one), when it is our `turn`: the new stream and the server's grant.
pub async fn resume_on(
    conn: &PeerConnection,
    cluster: Id52,
    resume: wire::Resume,
    turn: Turn,
) -> Result<(SendHalf, RecvHalf, Grant), Attempt> {
    let retry = |e: &dyn std::fmt::Display| Attempt::Retry(e.to_string());
    // A server that will not talk to us at all (we were removed from the cluster) closes
    // the connection right after the handshake and says why: that is an answer, not a
    // reason to try again.
    let closed_by_server =
        |conn: &PeerConnection, e: &dyn std::fmt::Display| match conn.peer_close_reason() {
            Some(reason) => Attempt::Refused { reason, boot: None },
            None => retry(e),
        };
    let (mut send, mut recv) = match conn.open().await {
        Ok(s) => s,
        Err(e) => {
            // The close may trail the failed open by a moment.
            let _ = tokio::time::timeout(Duration::from_millis(300), conn.closed()).await;
            return Err(closed_by_server(conn, &e));
        }
    };
    let header = Header {
        cluster: Some(cluster),
        request: Request::Resume(resume),
    };
    let mut resumed = turn.lock().await;
    if *resumed {
        return Err(Attempt::Retry("another attempt resumed".into()));
    }
    match exchange_for(&mut send, &mut recv, header).await {
        Ok(Accepted::Resumable(g)) => {
            *resumed = true;
            Ok((send, recv, g))
        }
        Ok(Accepted::Plain) => Err(Attempt::Refused {
            reason: "the server answered a resume with a plain accept".into(),
            boot: None,
        }),
        Err(SessionError::Denied(reason)) | Err(SessionError::Refused(reason)) => {
            let boot =
                tokio::time::timeout(Duration::from_secs(3), liveness::boot_of(conn, cluster))
                    .await
                    .ok()
                    .flatten();
            Err(Attempt::Refused { reason, boot })
        }
        Err(e) => {
            let _ = tokio::time::timeout(Duration::from_millis(300), conn.closed()).await;
            Err(closed_by_server(conn, &e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An "application" on one end: writes `data` and ends its side, reading all it is
    /// sent meanwhile; the task returns what it read.
    fn write_and_read_all(
        app: tokio::io::DuplexStream,
        data: Vec<u8>,
    ) -> tokio::task::JoinHandle<Vec<u8>> {
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(app);
            let wr = async {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            };
            let mut got = vec![];
            let rd = async { r.read_to_end(&mut got).await.unwrap() };
            tokio::join!(wr, rd);
            got
        })
    }

    /// A network writer that takes `left` more bytes and then stalls for good, as a path
    /// that died mid-transfer: a round of the test below can move at most that much, on
    /// a fast machine or a loaded one alike.
    struct Stalls<W> {
        inner: W,
        left: usize,
    }

    impl<W: AsyncWrite + Unpin> AsyncWrite for Stalls<W> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            if self.left == 0 {
                return std::task::Poll::Pending;
            }
            let n = buf.len().min(self.left);
            let this = &mut *self;
            let r = std::pin::Pin::new(&mut this.inner).poll_write(cx, &buf[..n]);
            if let std::task::Poll::Ready(Ok(k)) = r {
                this.left -= k;
            }
            r
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if self.left == 0 {
                return std::task::Poll::Pending;
            }
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// Two engines joined by in-memory pipes; the "network" between them is replaced
    /// mid-transfer (dropped attachments), and every byte arrives once, in order.
    #[tokio::test]
    async fn bytes_survive_broken_attachments() {
        const ROUND: usize = 300_000;
        let a = Arc::new(Stream::new());
        let b = Arc::new(Stream::new());
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let back: Vec<u8> = (0..1_000_000u32).map(|i| (i * 13) as u8).collect();
        let (mut a_local, a_app) = tokio::io::duplex(64 * 1024);
        let (mut b_local, b_app) = tokio::io::duplex(64 * 1024);
        let (data2, back2) = (data.clone(), back.clone());
        // The "applications": a writes data and reads back; b echoes its own stream.
        let app_a = write_and_read_all(a_app, data2);
        let app_b = write_and_read_all(b_app, back2);
        let never = CancellationToken::new();
        let mut round = 0;
        let mut broke_mid_stream = 0;
        let (ea, eb) = loop {
            round += 1;
            let (na, nb) = tokio::io::duplex(4 * 1024);
            let (mut nar, naw) = tokio::io::split(na);
            let (mut nbr, mut nbw) = tokio::io::split(nb);
            // Rounds 1–7 carry at most 300 kB of a's bytes each (7 × 300 kB < 3 MB: every
            // break falls mid-stream, however far a loaded machine lets a round run).
            let mut naw = Stalls {
                inner: naw,
                left: if round < 8 { ROUND } else { usize::MAX },
            };
            let (ra, rb) = (b.received(), a.received());
            let (mut alr, mut alw) = tokio::io::split(&mut a_local);
            let (mut blr, mut blw) = tokio::io::split(&mut b_local);
            let run = async {
                tokio::join!(
                    async {
                        attach_end(
                            a.attach(ra, &mut alr, &mut alw, &mut nar, &mut naw, &never)
                                .await,
                        )
                    },
                    async {
                        attach_end(
                            b.attach(rb, &mut blr, &mut blw, &mut nbr, &mut nbw, &never)
                                .await,
                        )
                    },
                )
            };
            if round < 8 {
                // Break the network once another 200 kB got through (of the at most
                // 300 kB it can carry this round), mid-frame as it happens. By bytes, not
                // by time: a fast machine moved all 3 MB within two 20 ms rounds, a loaded
                // one may move nothing in 20 ms; and the cap, not this poll, bounds how far
                // a round gets (a loaded machine polled late here once let round 7 finish
                // the whole transfer).
                let target = b.received() + 200_000;
                let progressed = async {
                    while b.received() < target {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                };
                tokio::select! {
                    _ = run => panic!("the stream ended before round {round}'s break"),
                    r = tokio::time::timeout(Duration::from_secs(60), progressed) => {
                        r.expect("no progress for 60 s");
                    }
                }
                if b.received() < data.len() as u64 {
                    broke_mid_stream += 1;
                }
                continue;
            }
            break run.await;
        };
        assert_eq!(broke_mid_stream, 7, "every break falls mid-stream");
        assert_eq!(ea.unwrap(), End::Finished);
        assert_eq!(eb.unwrap(), End::Finished);
        assert_eq!(app_b.await.unwrap(), data);
        assert_eq!(app_a.await.unwrap(), back);
    }

    /// The far side's application echoes and reads only while it can write (as an SSH
    /// server does), and more than both replay buffers flows both ways at once: the
    /// engines must not deadlock (acks ride behind data, so a receiver must keep reading
    /// its network while its local writer waits). Load run 3's embedded `-L` stall.
    #[tokio::test]
    async fn an_echo_that_reads_only_while_it_can_write_does_not_stall() {
        let a = Arc::new(Stream::new());
        let b = Arc::new(Stream::new());
        let data: Vec<u8> = (0..(4 * REPLAY_CAP) as u32)
            .map(|i| (i * 31 + i / 97) as u8)
            .collect();
        let (mut a_local, a_app) = tokio::io::duplex(64 * 1024);
        let (mut b_local, b_app) = tokio::io::duplex(64 * 1024);
        let data2 = data.clone();
        let app_a = write_and_read_all(a_app, data2);
        let echo = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(b_app);
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    w.shutdown().await.unwrap();
                    return;
                }
                w.write_all(&buf[..n]).await.unwrap();
            }
        });
        let never = CancellationToken::new();
        // A small network window, as QUIC's flow control is to 2 MiB buffers.
        let (na, nb) = tokio::io::duplex(64 * 1024);
        let (mut nar, mut naw) = tokio::io::split(na);
        let (mut nbr, mut nbw) = tokio::io::split(nb);
        let (mut alr, mut alw) = tokio::io::split(&mut a_local);
        let (mut blr, mut blw) = tokio::io::split(&mut b_local);
        let run = async {
            tokio::join!(
                a.attach(0, &mut alr, &mut alw, &mut nar, &mut naw, &never),
                b.attach(0, &mut blr, &mut blw, &mut nbr, &mut nbw, &never),
            )
        };
        let (ea, eb) = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("the streams stalled");
        assert_eq!(ea.unwrap(), End::Finished);
        assert_eq!(eb.unwrap(), End::Finished);
        echo.await.unwrap();
        assert_eq!(app_a.await.unwrap(), data);
    }

    /// A local reader slower than the network, taking a chunk in small pieces (a child's
    /// 64 KiB pipe under `cat > f`): each piece is acknowledged as it is delivered, and the
    /// peer's next bytes must not be taken for more than it may send. The bench's 512 MiB
    /// upload broke on this ("2097172 bytes beyond what we acknowledged").
    #[tokio::test]
    async fn a_slow_reader_taking_chunks_in_pieces_is_no_protocol_error() {
        let a = Arc::new(Stream::new());
        let b = Arc::new(Stream::new());
        let data: Vec<u8> = (0..(3 * REPLAY_CAP) as u32)
            .map(|i| (i * 7) as u8)
            .collect();
        let (mut a_local, a_app) = tokio::io::duplex(256 * 1024);
        let (mut b_local, b_app) = tokio::io::duplex(4000);
        let data2 = data.clone();
        let writer = tokio::spawn(async move {
            let (_r, mut w) = tokio::io::split(a_app);
            w.write_all(&data2).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let (mut r, _w) = tokio::io::split(b_app);
            let mut got = vec![];
            let mut buf = vec![0u8; 4000];
            loop {
                let n = r.read(&mut buf).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&buf[..n]);
                tokio::time::sleep(Duration::from_micros(300)).await;
            }
        });
        let never = CancellationToken::new();
        let (na, nb) = tokio::io::duplex(256 * 1024);
        let (mut nar, mut naw) = tokio::io::split(na);
        let (mut nbr, mut nbw) = tokio::io::split(nb);
        let (mut alr, mut alw) = tokio::io::split(&mut a_local);
        let (mut blr, mut blw) = tokio::io::split(&mut b_local);
        let run = async {
            tokio::join!(
                a.attach(0, &mut alr, &mut alw, &mut nar, &mut naw, &never),
                async {
                    let end = b
                        .attach(0, &mut blr, &mut blw, &mut nbr, &mut nbw, &never)
                        .await;
                    drop(blw);
                    end
                },
            )
        };
        let (ea, eb) = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("the streams stalled");
        assert!(eb.is_ok(), "receiver: {eb:?}");
        assert!(ea.is_ok(), "sender: {ea:?}");
        writer.await.unwrap();
        assert_eq!(reader.await.unwrap(), data);
    }

    #[test]
    fn redials_slow_down_to_their_slowest_only_where_asked() {
        let s = Duration::from_secs;
        assert_eq!(Pace::QUIC.next(s(0)), REDIAL_EVERY);
        assert_eq!(Pace::QUIC.next(s(3600)), REDIAL_EVERY);
        let via = Pace {
            every: s(1),
            slowest: s(15),
            ..Pace::QUIC
        };
        assert_eq!(via.next(s(3)), s(1));
        assert_eq!(via.next(s(60)), s(6));
        assert_eq!(via.next(s(3600)), s(15));
    }

    #[test]
    fn acks_outside_what_was_sent_are_protocol_errors() {
        let mut i = Inner::default();
        i.push(Bytes::from_static(b"hello"));
        assert!(i.ack(6).is_err());
        i.ack(2).unwrap();
        assert_eq!(i.base, 2);
        assert_eq!(i.buffered, 3);
        assert_eq!(&i.slice_at(2)[..], b"llo");
        i.ack(1).unwrap(); // stale: ignored
        i.local_eof = true;
        i.ack(6).unwrap();
        assert!(i.eof_acked && i.buf.is_empty() && i.buffered == 0);
    }

    #[test]
    fn the_replay_buffer_keeps_positions_across_chunks_and_merges_small_ones() {
        let mut i = Inner::default();
        // Keystrokes: merged into one chunk while it stays small.
        for b in b"typing" {
            i.push(Bytes::copy_from_slice(&[*b]));
        }
        assert_eq!(i.buf.len(), 1);
        // Bulk reads stay chunks of their own, framed without copying.
        let big = Bytes::from(vec![7u8; MAX_DATA]);
        i.push(big.clone());
        i.push(Bytes::from(vec![8u8; 10_000]));
        assert_eq!((i.buf.len(), i.buffered), (3, 6 + MAX_DATA + 10_000));
        assert_eq!(&i.slice_at(2)[..], b"ping");
        let framed = i.slice_at(6);
        assert_eq!(framed.len(), MAX_DATA);
        assert_eq!(
            framed.as_ptr(),
            big.as_ptr(),
            "a slice of the chunk, not a copy"
        );
        assert_eq!(i.slice_at(6 + MAX_DATA as u64 + 9_999)[..], [8]);
        // An ack in the middle of a chunk keeps its rest at the same positions.
        i.ack(100).unwrap();
        assert_eq!((i.base, i.buf.len()), (100, 2));
        assert_eq!(i.slice_at(100).len(), MAX_DATA + 6 - 100);
        i.ack(6 + MAX_DATA as u64 + 5_000).unwrap();
        assert_eq!((i.buf.len(), i.buffered), (1, 5_000));
        assert_eq!(
            i.slice_at(6 + MAX_DATA as u64 + 5_000)[..],
            [8u8; 5_000][..]
        );
        // Many tiny reads: bounded bookkeeping.
        let mut j = Inner::default();
        for _ in 0..100_000 {
            j.push(Bytes::from_static(b"x"));
        }
        assert!(
            j.buf.len() <= 2 * 100_000 / MERGE_BELOW + 1,
            "{}",
            j.buf.len()
        );
    }
}
