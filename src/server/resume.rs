//! The server's resumable sessions (issue 18; wire format in `protocol::resume`, the shared
//! engine in `session::resume`): the local leg of a session whose connection was lost — a
//! tunnel's sshd socket, or a native exec's pipe to its running command (`server::exec`) —
//! is kept, detached, until its client comes back on a new connection or its keep time is
//! over.
//!
//! - A resumable tunnel is a [`Slot`] in this cluster's [`Table`], bound to the peer's
//!   verified id52 and a random per-session secret (both checked on resume, the secret in
//!   constant time). Whoever serves its current stream holds its [`Parked`] state (the
//!   engine and the sshd socket); a stream that breaks puts it back and starts the keep
//!   timer ([`keep_time`]).
//! - While detached nobody reads the local leg: sshd's own writes (or the command's output)
//!   then block (backpressure), nothing is dropped, and the replay buffer never grows past
//!   its cap.
//! - A resume of a session whose old stream the server still thinks alive takes it over
//!   (the old stream lets go at once).
//! - Caps ([`caps`]): per peer and in total, on resumable sessions (attached or detached),
//!   each holding at most `REPLAY_CAP` bytes unacknowledged: at most
//!   `max_total × REPLAY_CAP` bytes buffered for a cluster, `max_per_peer × REPLAY_CAP` for
//!   one peer. A tunnel asked over a cap is served as before, without resume (the client
//!   falls back; logged), never refused.
//! - An expired session is ended as a lost one is without resume: its local leg is closed
//!   (sshd then ends the session, SIGHUP to the command; an exec's command is hung up).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::id52::Id52;
use crate::protocol::Request;
use crate::protocol::resume::{self as wire, Grant, ID_LEN, SECRET_LEN};
use crate::session::resume::{AttachError, End, RESUMING_ELSEWHERE, Stream, attach_end};
use crate::transport::iroh::PeerConnection;

/// How long a detached session is kept by default: 12 hours, a night's sleep with margin
/// (a laptop closed in the evening and opened the next morning picks up its sessions).
/// Longer costs only an idle sshd connection and at most `REPLAY_CAP` of memory per
/// session, within the caps. `MALAI_SESSION_KEEP` (seconds) changes it.
pub const DEFAULT_KEEP: Duration = Duration::from_secs(12 * 3600);
/// Default cap on one peer's resumable sessions; `MALAI_RESUME_MAX_PER_PEER`.
pub const DEFAULT_MAX_PER_PEER: usize = 32;
/// Default cap on a cluster's resumable sessions; `MALAI_RESUME_MAX_TOTAL`.
pub const DEFAULT_MAX_TOTAL: usize = 256;
/// How long a resume waits for the old stream of a still-attached session to let go.
const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// The keep time of detached sessions: `MALAI_SESSION_KEEP` (seconds), else the server's
/// `session-keep` (`configured`), else [`DEFAULT_KEEP`]. Zero: no resumable sessions.
pub fn keep_time(configured: Option<Duration>) -> Duration {
    env_num("MALAI_SESSION_KEEP")
        .map(Duration::from_secs)
        .or(configured)
        .unwrap_or(DEFAULT_KEEP)
}

/// `(per peer, total)` caps on resumable sessions.
pub fn caps() -> (usize, usize) {
    (
        env_num("MALAI_RESUME_MAX_PER_PEER")
            .map(|n| n as usize)
            .unwrap_or(DEFAULT_MAX_PER_PEER),
        env_num("MALAI_RESUME_MAX_TOTAL")
            .map(|n| n as usize)
            .unwrap_or(DEFAULT_MAX_TOTAL),
    )
}

fn env_num(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

/// The state that moves between streams: the engine and the session's local leg (the sshd
/// socket's halves, or an exec's pipe). Dropping it closes the leg: that ends the session.
pub struct Parked {
    pub stream: Stream,
    pub local_r: Box<dyn AsyncRead + Send + Unpin>,
    pub local_w: Box<dyn AsyncWrite + Send + Unpin>,
}

impl Parked {
    /// A fresh session's state on `local_r`/`local_w`.
    pub fn new(
        local_r: impl AsyncRead + Send + Unpin + 'static,
        local_w: impl AsyncWrite + Send + Unpin + 'static,
    ) -> Parked {
        Parked {
            stream: Stream::new(),
            local_r: Box::new(local_r),
            local_w: Box::new(local_w),
        }
    }
}

/// One resumable session.
pub struct Slot {
    pub id: String,
    pub peer: Id52,
    secret: String,
    /// The request that opened it: asked of the ACL again on every resume.
    pub request: Request,
    /// The server's name for itself when it was opened (for the ACL).
    pub server: String,
    created: Instant,
    keep: Duration,
    state: Mutex<SlotState>,
    /// Rung when the state is parked (a takeover waits for it).
    parked: Notify,
}

struct SlotState {
    parked: Option<Parked>,
    /// Since when it is detached (`None` while a stream serves it).
    detached: Option<Instant>,
    /// Cancels the stream that serves it now (a takeover).
    kick: CancellationToken,
    /// Bumped on every attach: a keep timer of an older detachment does nothing.
    generation: u64,
    buffered: usize,
}

/// What `malai ssh status` shows of a session.
#[derive(Debug, Clone)]
pub struct SlotInfo {
    pub peer: Id52,
    pub age: Duration,
    pub detached: Option<Duration>,
    pub buffered: usize,
}

/// Why a resume was refused. The peer is told only "unknown session" for all but the ACL's
/// reason, so a stranger learns nothing of other machines' sessions; the log and the audit
/// line say which.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeDenied {
    #[error("no such session (it expired, or the server restarted)")]
    Unknown,
    #[error("the session belongs to another machine")]
    OtherPeer,
    #[error("wrong session secret")]
    WrongSecret,
    #[error("the session's old stream did not let go")]
    Busy,
    /// Its peer's access was revoked and the session ended (told only to that peer).
    #[error("access revoked; the session was ended")]
    Revoked,
}

impl ResumeDenied {
    /// What the peer is told.
    pub fn public(&self) -> &'static str {
        match self {
            ResumeDenied::Busy => "the session is busy; try again",
            ResumeDenied::Revoked => "access revoked",
            _ => "unknown session (it expired, or the server restarted)",
        }
    }
}

/// How many sessions ended by a revocation are remembered, so their peer's resume is
/// told why rather than "unknown session".
const REVOKED_KEPT: usize = 256;

/// One cluster's resumable sessions.
#[derive(Default)]
pub struct Table {
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// Sessions ended because their peer's access was revoked, newest last (id, peer).
    revoked: Mutex<std::collections::VecDeque<(String, Id52)>>,
}

impl Table {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session for `peer`'s `request`, or `None` over a cap (the tunnel is then
    /// served without resume).
    pub fn create(
        &self,
        peer: Id52,
        request: Request,
        server: &str,
        caps: (usize, usize),
        keep: Duration,
    ) -> Option<(Arc<Slot>, Grant)> {
        if keep.is_zero() {
            return None;
        }
        let mut slots = self.slots();
        let mine = slots.values().filter(|s| s.peer == peer).count();
        if mine >= caps.0 || slots.len() >= caps.1 {
            tracing::warn!(%peer, mine, total = slots.len(), per_peer = caps.0, max_total = caps.1, "resumable session caps reached; serving this tunnel without resume");
            return None;
        }
        let (id, secret) = match (
            wire::random_hex::<ID_LEN>(),
            wire::random_hex::<SECRET_LEN>(),
        ) {
            (Ok(i), Ok(s)) => (i, s),
            _ => return None,
        };
        let slot = Arc::new(Slot {
            id: id.clone(),
            peer,
            secret: secret.clone(),
            request,
            server: server.to_string(),
            created: Instant::now(),
            keep,
            state: Mutex::new(SlotState {
                parked: None,
                detached: None,
                kick: CancellationToken::new(),
                generation: 0,
                buffered: 0,
            }),
            parked: Notify::new(),
        });
        slots.insert(id.clone(), slot.clone());
        let grant = Grant {
            session: id,
            secret,
            received: 0,
            keep_secs: keep.as_secs(),
            boot: crate::protocol::boot_id().to_string(),
        };
        Some((slot, grant))
    }

    /// Take `resume`'s session for `peer`: checks the session, the peer, the secret (in
    /// that order), then takes the state from whoever holds it. The ACL is the caller's.
    pub async fn claim(
        &self,
        resume: &wire::Resume,
        peer: Id52,
    ) -> Result<(Arc<Slot>, Parked), ResumeDenied> {
        let Some(slot) = self.slots().get(&resume.session).cloned() else {
            let revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
            return Err(
                match revoked
                    .iter()
                    .any(|(id, p)| *id == resume.session && *p == peer)
                {
                    true => ResumeDenied::Revoked,
                    false => ResumeDenied::Unknown,
                },
            );
        };
        if slot.peer != peer {
            return Err(ResumeDenied::OtherPeer);
        }
        if !wire::same_secret(&slot.secret, &resume.secret) {
            return Err(ResumeDenied::WrongSecret);
        }
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        loop {
            let notified = slot.parked.notified();
            {
                let mut st = slot.lock();
                if let Some(p) = st.parked.take() {
                    st.generation += 1;
                    st.detached = None;
                    st.kick = CancellationToken::new();
                    return Ok((slot.clone(), p));
                }
                // Still served by an older stream the server thinks alive: let it go.
                st.kick.cancel();
            }
            if !self.slots().contains_key(&slot.id) {
                return Err(ResumeDenied::Unknown);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(ResumeDenied::Busy);
            }
        }
    }

    /// End a session for good (finished, closed, revoked): its sshd socket closes with it.
    pub fn end(&self, slot: &Slot) {
        self.slots().remove(&slot.id);
        let p = slot.lock().parked.take();
        drop(p);
    }

    /// End a session because its peer's access was revoked; a resume by that peer is then
    /// told so.
    pub fn end_revoked(&self, slot: &Slot) {
        {
            let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
            if revoked.len() >= REVOKED_KEPT {
                revoked.pop_front();
            }
            revoked.push_back((slot.id.clone(), slot.peer));
        }
        self.end(slot);
    }

    /// Put a session whose stream broke back, detached, and start its keep timer.
    pub fn park(self: &Arc<Self>, slot: &Arc<Slot>, parked: Parked) {
        let generation = {
            let mut st = slot.lock();
            st.buffered = parked.stream.buffered();
            st.parked = Some(parked);
            st.detached = Some(Instant::now());
            st.generation
        };
        slot.parked.notify_waiters();
        slot.parked.notify_one();
        let (table, slot) = (self.clone(), slot.clone());
        tokio::spawn(async move {
            tokio::time::sleep(slot.keep).await;
            let expired = {
                let st = slot.lock();
                st.generation == generation && st.parked.is_some()
            };
            if expired {
                tracing::info!(peer = %slot.peer, session = %short(&slot.id), keep = ?slot.keep, "detached session expired; closing its ssh connection");
                table.end(&slot);
            }
        });
    }

    /// Every session, for status.
    pub fn list(&self) -> Vec<SlotInfo> {
        self.slots()
            .values()
            .map(|s| {
                let st = s.lock();
                SlotInfo {
                    peer: s.peer,
                    age: s.created.elapsed(),
                    detached: st.detached.map(|d| d.elapsed()),
                    buffered: st.buffered,
                }
            })
            .collect()
    }

    /// How many sessions there are (tests, status).
    pub fn len(&self) -> usize {
        self.slots().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Slot {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer to a resume of this session: the server's count and its settings.
    pub fn grant(&self, received: u64) -> Grant {
        Grant {
            session: self.id.clone(),
            secret: self.secret.clone(),
            received,
            keep_secs: self.keep.as_secs(),
            boot: crate::protocol::boot_id().to_string(),
        }
    }

    /// The token that tells the stream serving this slot now to let go.
    fn kick(&self) -> CancellationToken {
        self.lock().kick.clone()
    }
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// How serving one stream of a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The session is over (both ends finished, or one closed it).
    Ended { clean: bool },
    /// The stream broke; the session is parked for a resume.
    Detached,
}

/// A new resumable session for `ctx.peer`'s `request` on this server (known as `server`
/// in the cluster file), with its keep time and the caps in force; `None` over a cap or
/// with resume turned off (`session-keep = "0s"`): the request is then served without.
pub fn new_slot(
    ctx: &super::request::Context,
    server: &str,
    request: Request,
) -> Option<(Arc<Slot>, Grant)> {
    let cfg = ctx.state.current();
    let keep = keep_time(cfg.servers.get(server).and_then(|s| s.session_keep));
    ctx.state
        .detached
        .create(ctx.peer, request, server, caps(), keep)
}

/// The network stream a session is served on now.
pub struct Attachment<'a, R, W> {
    pub r: &'a mut R,
    pub w: &'a mut W,
    /// The positions the peer said it has received.
    pub peer_received: u64,
    /// The connection the stream came on (`None` in tests): asked why the stream broke.
    pub conn: Option<&'a PeerConnection>,
}

/// Serve `slot` on one stream until the session ends or this stream breaks.
/// `still_allowed` is asked before parking (a stream cut because access was revoked must
/// end the session, not park it), and so is the connection ([`left_for_good`]).
pub async fn serve_stream<R, W>(
    table: &Arc<Table>,
    slot: &Arc<Slot>,
    mut parked: Parked,
    net: Attachment<'_, R, W>,
    still_allowed: impl FnOnce() -> bool,
) -> Served
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let kick = slot.kick();
    let never = CancellationToken::new();
    let Attachment {
        r,
        w,
        peer_received,
        conn,
    } = net;
    let result = tokio::select! {
        r = parked.stream.attach(peer_received, &mut parked.local_r, &mut parked.local_w, r, w, &never) => attach_end(r),
        _ = kick.cancelled() => Err(AttachError::Net("taken over by a newer stream".into())),
    };
    {
        let mut st = slot.lock();
        st.buffered = parked.stream.buffered();
    }
    match result {
        Ok(end) => {
            tracing::info!(peer = %slot.peer, session = %short(&slot.id), ?end, "resumable session ended");
            table.end(slot);
            drop(parked);
            Served::Ended {
                clean: end == End::Finished,
            }
        }
        Err(AttachError::Net(why)) => {
            if !still_allowed() {
                tracing::info!(peer = %slot.peer, session = %short(&slot.id), "stream cut and access revoked: ending the session");
                table.end_revoked(slot);
                return Served::Ended { clean: false };
            }
            if let Some(reason) = left_for_good(conn).await {
                tracing::info!(peer = %slot.peer, session = %short(&slot.id), %reason, "the client closed its connection: ending the session");
                table.end(slot);
                return Served::Ended { clean: false };
            }
            tracing::info!(peer = %slot.peer, session = %short(&slot.id), %why, buffered = parked.stream.buffered(), "stream lost; session detached");
            table.park(slot, parked);
            Served::Detached
        }
        Err(e) => {
            tracing::info!(peer = %slot.peer, session = %short(&slot.id), error = %e, "resumable session failed");
            table.end(slot);
            Served::Ended { clean: false }
        }
    }
}

/// Serve a resumable session (a tunnel's or an exec's) on this stream (its first, or a
/// resumed one): `true` when the session ended cleanly; `false` when it broke or was detached (the caller resets the
/// stream; a detached session waits in the table for its client).
pub(crate) async fn serve<R, W>(
    ctx: &super::request::Context,
    slot: &Arc<Slot>,
    parked: Parked,
    peer_received: u64,
    r: &mut R,
    w: &mut W,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let still_allowed = || {
        let cfg = ctx.state.current();
        let me = ctx.state.server_name(&cfg).unwrap_or(slot.server.clone());
        let req = super::request::acl_request(&slot.request);
        matches!(
            crate::acl::decide(&cfg, &me, &ctx.peer, &req),
            crate::acl::Decision::Allow(_)
        )
    };
    let net = Attachment {
        r,
        w,
        peer_received,
        conn: ctx.conn.as_ref(),
    };
    let served = serve_stream(&ctx.state.detached, slot, parked, net, still_allowed).await;
    if served == Served::Detached {
        watch_detached(ctx.state.clone(), slot.clone());
    }
    matches!(served, Served::Ended { clean: true })
}

/// How long a broken stream waits for its connection's close to say why it broke.
const CLOSE_WAIT: Duration = Duration::from_millis(300);

/// Whether the client closed the connection a session's stream broke with on purpose, and
/// why: a client process that closes its connection (it exited, was signalled, or gave
/// up) never comes back for the session, so keeping it detached would only keep its
/// command running for nothing. Only a connection that timed out or lost its path, or that
/// the client left to resume on another ([`RESUMING_ELSEWHERE`]), detaches the session.
async fn left_for_good(conn: Option<&PeerConnection>) -> Option<String> {
    let conn = conn?;
    // The stream's error may come a moment before the connection's close.
    let _ = tokio::time::timeout(CLOSE_WAIT, conn.closed()).await;
    if !conn.closed_by_peer() {
        return None;
    }
    match conn.peer_close_reason() {
        Some(r) if r == RESUMING_ELSEWHERE => None,
        Some(r) => Some(r),
        None => Some("closed".into()),
    }
}

/// While `slot` stays detached, end it as soon as the ACL would deny its request (a peer
/// removed or narrowed while away): its sshd leg is not kept for a peer that may no longer
/// have it. A resume meanwhile is asked of the ACL anyway; this only frees it sooner.
pub fn watch_detached(state: Arc<super::ClusterState>, slot: Arc<Slot>) {
    let generation = slot.lock().generation;
    let still_detached = move |slot: &Slot| {
        let st = slot.lock();
        st.generation == generation && st.parked.is_some()
    };
    tokio::spawn(async move {
        let revoked = super::revoke::revoked(
            state.clone(),
            slot.server.clone(),
            slot.peer,
            slot.request.clone(),
        );
        tokio::pin!(revoked);
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = &mut revoked => {
                    if still_detached(&slot) {
                        tracing::warn!(peer = %slot.peer, session = %short(&slot.id), "access revoked while detached: the session is ended");
                        state.detached.end_revoked(&slot);
                    }
                    return;
                }
                _ = tick.tick() => {
                    if !still_detached(&slot) {
                        return;
                    }
                }
            }
        }
    });
}

/// The `status` lister of `state`'s sessions (held weakly: a cluster no longer served lists
/// nothing).
pub fn lister(state: &Arc<super::ClusterState>) -> crate::keyholder::inbound::SessionLister {
    let weak = Arc::downgrade(state);
    Box::new(move || {
        let Some(state) = weak.upgrade() else {
            return vec![];
        };
        let cfg = state.current();
        state
            .detached
            .list()
            .into_iter()
            .map(|s| crate::control::protocol::SessionInfo {
                cluster: state.dir.alias.clone(),
                peer: cfg
                    .name_of(&s.peer)
                    .map(|(n, _)| n.to_string())
                    .unwrap_or_else(|| s.peer.short()),
                age_secs: s.age.as_secs(),
                detached_secs: s.detached.map(|d| d.as_secs()),
                buffered: s.buffered as u64,
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Id52 {
        Id52::from_bytes([n; 32])
    }

    /// A session's state on a real TCP connection (the "sshd" end is leaked, so it stays
    /// open for the whole test).
    async fn parked() -> Parked {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = tokio::net::TcpStream::connect(l.local_addr().unwrap())
            .await
            .unwrap();
        let (sshd, _) = l.accept().await.unwrap();
        std::mem::forget(sshd);
        let (r, w) = c.into_split();
        Parked::new(r, w)
    }

    fn tunnel() -> Request {
        Request::Tunnel {
            port: None,
            resume: true,
        }
    }

    /// A session ended by a revocation tells its own peer so on resume; anyone else
    /// presenting its id learns only "unknown session".
    #[tokio::test]
    async fn a_revoked_sessions_peer_is_told_why() {
        let t = Arc::new(Table::default());
        let (slot, grant) = t
            .create(id(1), tunnel(), "foo", (4, 8), DEFAULT_KEEP)
            .unwrap();
        t.park(&slot, parked().await);
        t.end_revoked(&slot);
        let ask = wire::Resume {
            session: grant.session.clone(),
            secret: grant.secret.clone(),
            received: 0,
            close: false,
        };
        let denied = t.claim(&ask, id(1)).await.err();
        assert_eq!(denied, Some(ResumeDenied::Revoked));
        assert_eq!(denied.unwrap().public(), "access revoked");
        assert_eq!(
            t.claim(&ask, id(2)).await.err(),
            Some(ResumeDenied::Unknown)
        );
    }

    /// Only the session's own peer with its own secret takes it; a stranger with the
    /// stolen id is refused and the session stays for its owner.
    #[tokio::test]
    async fn only_the_owner_with_the_secret_resumes() {
        let t = Arc::new(Table::default());
        let (slot, grant) = t
            .create(id(1), tunnel(), "foo", (4, 8), DEFAULT_KEEP)
            .unwrap();
        t.park(&slot, parked().await);
        let mut ask = wire::Resume {
            session: grant.session.clone(),
            secret: grant.secret.clone(),
            received: 0,
            close: false,
        };
        assert_eq!(
            t.claim(&ask, id(2)).await.err(),
            Some(ResumeDenied::OtherPeer)
        );
        ask.secret = wire::random_hex::<SECRET_LEN>().unwrap();
        assert_eq!(
            t.claim(&ask, id(1)).await.err(),
            Some(ResumeDenied::WrongSecret)
        );
        ask.session = "00".repeat(ID_LEN);
        assert_eq!(
            t.claim(&ask, id(1)).await.err(),
            Some(ResumeDenied::Unknown)
        );
        // Allowed twin: the owner.
        ask.session = grant.session.clone();
        ask.secret = grant.secret.clone();
        let (s, _p) = t.claim(&ask, id(1)).await.unwrap();
        assert_eq!(s.id, grant.session);
        t.end(&s);
        assert!(t.claim(&ask, id(1)).await.is_err());
    }

    /// At the caps a tunnel gets no session (it is then served without resume); a session
    /// that ends frees its place.
    #[tokio::test]
    async fn caps_per_peer_and_in_total() {
        let t = Table::default();
        let caps = (2, 3);
        let a1 = t
            .create(id(1), tunnel(), "foo", caps, DEFAULT_KEEP)
            .unwrap();
        let _a2 = t
            .create(id(1), tunnel(), "foo", caps, DEFAULT_KEEP)
            .unwrap();
        assert!(
            t.create(id(1), tunnel(), "foo", caps, DEFAULT_KEEP)
                .is_none(),
            "per-peer cap"
        );
        let _b1 = t
            .create(id(2), tunnel(), "foo", caps, DEFAULT_KEEP)
            .unwrap();
        assert!(
            t.create(id(3), tunnel(), "foo", caps, DEFAULT_KEEP)
                .is_none(),
            "total cap"
        );
        t.end(&a1.0);
        assert!(
            t.create(id(3), tunnel(), "foo", caps, DEFAULT_KEEP)
                .is_some()
        );
        assert_eq!(t.len(), 3);
    }

    /// A detached session is ended after its keep time.
    #[tokio::test(start_paused = true)]
    async fn detached_sessions_expire() {
        let t = Arc::new(Table::default());
        let (slot, _g) = t
            .create(id(1), tunnel(), "foo", (4, 8), DEFAULT_KEEP)
            .unwrap();
        t.park(&slot, parked().await);
        assert_eq!(t.len(), 1);
        tokio::time::sleep(slot.keep + Duration::from_secs(1)).await;
        assert_eq!(t.len(), 0);
    }

    /// A resume of a session still served by an old stream makes that stream let go.
    #[tokio::test]
    async fn a_resume_takes_over_a_stream_the_server_thinks_alive() {
        let t = Arc::new(Table::default());
        let (slot, grant) = t
            .create(id(1), tunnel(), "foo", (4, 8), DEFAULT_KEEP)
            .unwrap();
        let p = parked().await;
        let (t2, s2) = (t.clone(), slot.clone());
        let old = tokio::spawn(async move {
            let (mut a, mut b) = tokio::io::duplex(1024);
            let (mut r, mut w) = tokio::io::split(&mut a);
            let _keep = &mut b;
            let net = Attachment {
                r: &mut r,
                w: &mut w,
                peer_received: 0,
                conn: None,
            };
            serve_stream(&t2, &s2, p, net, || true).await
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ask = wire::Resume {
            session: grant.session,
            secret: grant.secret,
            received: 0,
            close: false,
        };
        let (s, _p) = t.claim(&ask, id(1)).await.unwrap();
        assert_eq!(old.await.unwrap(), Served::Detached);
        assert_eq!(s.id, slot.id);
    }

    /// Through the choke point (`request::handle`), as a peer would: alice's resumable
    /// tunnel detaches when her stream goes; carol (allowed on foo too) presenting alice's
    /// session id and secret is refused, and so is alice with a wrong secret; alice with
    /// hers resumes; once the file drops alice, her resume is refused and the session ended.
    #[tokio::test]
    async fn resume_through_the_choke_point_is_bound_to_the_peer_and_the_acl() {
        use crate::protocol::{self, Header, Response};
        let tmp = tempfile::tempdir().unwrap();
        let dir = crate::config::store::ClusterDir {
            alias: "acme".into(),
            dir: tmp.path().to_path_buf(),
        };
        let sshd = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = sshd.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut held = vec![];
            while let Ok((c, _)) = sshd.accept().await {
                held.push(c);
            }
        });
        let text = |who: &str| {
            format!(
                "[cluster-manager]\nid52 = \"{}\"\n\n[server.foo]\nid52 = \"{}\"\nallow-from = \"{who}\"\nssh = \"127.0.0.1:{port}\"\n\n[device.alice]\nid52 = \"{}\"\n\n[device.carol]\nid52 = \"{}\"\n",
                id(1),
                id(2),
                id(3),
                id(4)
            )
        };
        std::fs::write(dir.file_path(), text("alice, carol")).unwrap();
        let state = Arc::new(super::super::ClusterState::new(
            dir.clone(),
            id(2),
            dir.load().unwrap(),
        ));
        // One request from `peer`: the answer, and the server's task (its end of the stream
        // is dropped with `client` when the caller lets go).
        let ask = |peer: Id52, request: Request| {
            let state = state.clone();
            async move {
                let (mut client, server) = tokio::io::duplex(64 * 1024);
                let task = tokio::spawn(async move {
                    let ctx = super::super::request::Context {
                        state,
                        peer,
                        transport: "iroh",
                        conn: None,
                    };
                    let (mut r, mut w) = tokio::io::split(server);
                    super::super::request::handle(&ctx, &mut r, &mut w).await
                });
                let header = Header {
                    cluster: None,
                    request,
                };
                protocol::write_frame(&mut client, &header).await.unwrap();
                let answer = protocol::read_response(&mut client).await.unwrap();
                (answer, client, task)
            }
        };
        let (answer, client, task) = ask(id(3), tunnel()).await;
        let Response::AcceptResumable(grant) = answer else {
            panic!("not resumable: {answer:?}");
        };
        drop(client);
        task.await.unwrap();
        assert!(state.detached.list()[0].detached.is_some());
        let resume = |secret: &str| {
            Request::Resume(wire::Resume {
                session: grant.session.clone(),
                secret: secret.to_string(),
                received: 0,
                close: false,
            })
        };
        // Deny twins: another machine with the stolen id and secret; the owner, wrong secret.
        let (answer, _c, _t) = ask(id(4), resume(&grant.secret)).await;
        assert!(matches!(answer, Response::Deny { .. }), "{answer:?}");
        let wrong = wire::random_hex::<SECRET_LEN>().unwrap();
        let (answer, _c, _t) = ask(id(3), resume(&wrong)).await;
        assert!(matches!(answer, Response::Deny { .. }), "{answer:?}");
        assert_eq!(
            state.detached.len(),
            1,
            "a refused resume ended the session"
        );
        // Allowed twin: the owner with her secret.
        let (answer, client, task) = ask(id(3), resume(&grant.secret)).await;
        assert!(
            matches!(&answer, Response::AcceptResumable(g) if g.session == grant.session),
            "{answer:?}"
        );
        drop(client);
        task.await.unwrap();
        // Revoked while detached: refused, and the session is gone.
        std::fs::write(dir.file_path(), text("carol")).unwrap();
        let (answer, _c, _t) = ask(id(3), resume(&grant.secret)).await;
        assert!(matches!(answer, Response::Deny { .. }), "{answer:?}");
        assert!(
            poll(|| state.detached.is_empty()).await,
            "the revoked session was kept"
        );
    }

    async fn poll(f: impl Fn() -> bool) -> bool {
        for _ in 0..100 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}
