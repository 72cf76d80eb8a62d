//! The manager's side of config sync (DESIGN §5): keep every server member's copy of the
//! cluster file equal to the manager's, without the manager's key settings.
//!
//! [`Syncer`] runs inside `malai ssh server` (and `malai ssh cluster serve`) on the manager's
//! machine, on the manager's endpoint:
//!
//! - every [`TICK`] it checks the manager's file (a hash of its bytes: an edit can keep the
//!   length and the mtime, issue 19 finding 7); a change, by hand or by
//!   `cluster add/allow/remove`, is picked up there. The file members get is
//!   `edit::strip_secrets` of it; an invalid file is logged and the last good one kept;
//! - per member it keeps the hash that member last acknowledged, persisted in
//!   [`STATE_FILE`] so a restarted manager does not re-push to everyone;
//! - a member whose acknowledged hash differs (or is unknown) gets a `config-push`, at most
//!   [`MAX_IN_FLIGHT`] at a time, retried with exponential backoff while it is offline;
//! - a member that asks the manager anything (`config-hash`, e.g. a pull on start) is
//!   retried at once;
//! - a server removed from the file gets a few attempts at the new file, so its own server
//!   stops granting access under the old one; then it is forgotten.
//!
//! Only servers are pushed to: devices run no server to receive a push. A device catches up
//! with `malai ssh cluster pull` (a `config-hash` with `fetch` to the manager).
//!
//! The request functions it uses ([`super::request`]) are also what `cluster push`,
//! `cluster status` and a member's pull use.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{SyncError, push, query};
use crate::config::store::{ClusterDir, write_atomic};
use crate::config::{ClusterConfig, MemberKind, edit};
use crate::id52::Id52;
use crate::protocol::config::{HashQuery, PushAck, hash_text, short_hash};
use crate::session::dial::Dialer;
use crate::transport::iroh::Node;

/// How often the manager's file is checked for changes and due members are picked.
pub const TICK: Duration = Duration::from_millis(250);
/// Bound on one whole sync request (dial, handshake, exchange).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Pushes in flight at once: enough to converge a thousand members in seconds, few enough
/// not to flood the manager's link or CPU.
pub const MAX_IN_FLIGHT: usize = 64;
/// First and longest wait before retrying a member that failed.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A member in sync is asked for its hash this often, to notice a copy changed behind the
/// manager's back (a reinstalled member, a hand edit).
const VERIFY_EVERY: Duration = Duration::from_secs(300);
/// The sync state is written at most this often (it can be large with many members, and
/// acknowledgements arrive in bursts), but soon enough for `cluster status` to see them.
const PERSIST_EVERY: Duration = Duration::from_millis(250);
/// Attempts at pushing the new file to a server that was removed from it.
const DEPARTED_ATTEMPTS: u32 = 5;

/// The manager's per-member sync state, next to its cluster file.
pub const STATE_FILE: &str = "sync-state.json";

/// The persisted sync state: what each member last acknowledged, and when it was last seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncState {
    #[serde(default)]
    pub members: BTreeMap<Id52, MemberRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemberRecord {
    pub name: String,
    /// `server` or `device`.
    pub kind: String,
    /// Hash of the file the member last reported having; `None`: unknown, push it.
    #[serde(default)]
    pub acked: Option<String>,
    /// Unix seconds of the last successful exchange with the member.
    #[serde(default)]
    pub last_seen: Option<u64>,
    #[serde(default)]
    pub latency_ms: Option<u64>,
    /// Why the last attempt failed or was refused (cleared by a success).
    #[serde(default)]
    pub last_error: Option<String>,
    /// Address hints, kept so a removed server can still be told it was removed.
    #[serde(default)]
    pub addrs: Vec<SocketAddr>,
    /// No longer in the file; gets a few pushes of the new file, then is forgotten.
    #[serde(default)]
    pub departed: bool,
}

/// Read the sync state of a managed cluster; missing or unreadable → empty (which only
/// costs one push per member, never a wrong "in sync").
pub fn load_state(cd: &ClusterDir) -> SyncState {
    let path = cd.dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(path = %path.display(), error = %e, "unreadable sync state; starting afresh");
            SyncState::default()
        }),
        Err(_) => SyncState::default(),
    }
}

fn save_state(cd: &ClusterDir, state: &SyncState) {
    let path = cd.dir.join(STATE_FILE);
    let result = serde_json::to_vec_pretty(state)
        .map_err(std::io::Error::other)
        .and_then(|b| write_atomic(&path, &b, 0o600));
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), error = %e, "cannot save the sync state");
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn kind_name(kind: MemberKind) -> &'static str {
    match kind {
        MemberKind::Server => "server",
        MemberKind::Device => "device",
    }
}

/// The file as members get it.
#[derive(Debug, Clone)]
pub struct Source {
    pub text: Arc<String>,
    pub hash: String,
    config: Arc<ClusterConfig>,
}

impl Source {
    /// The member view of the manager's file text: key settings stripped, validated.
    pub fn from_manager_text(text: &str) -> Result<Source, edit::EditError> {
        let stripped = edit::strip_secrets(text)?;
        let config = ClusterConfig::parse(&stripped).map_err(edit::EditError::After)?;
        Ok(Source {
            hash: hash_text(&stripped),
            text: Arc::new(stripped),
            config: Arc::new(config),
        })
    }
}

/// Runtime-only state of one member (not persisted).
#[derive(Debug, Default)]
struct Attempts {
    failures: u32,
    next_try: Option<Instant>,
    in_flight: bool,
    last_contact: Option<Instant>,
}

struct Inner {
    source: Option<Source>,
    /// SHA-256 of the file's bytes at the last check.
    stamp: Option<[u8; 32]>,
    state: SyncState,
    attempts: HashMap<Id52, Attempts>,
    dirty: bool,
    last_persist: Option<Instant>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Push,
    Verify,
}

struct Job {
    member: Id52,
    name: String,
    hints: Vec<SocketAddr>,
    kind: JobKind,
}

/// The manager's sync loop for one cluster. Shared with the request handlers (through
/// `ClusterState::sync`) so that a member's `config-hash` can be answered from the same
/// source and can wake the loop.
pub struct Syncer {
    cd: ClusterDir,
    node: Node,
    manager: Id52,
    inner: Mutex<Inner>,
    wake: Notify,
}

impl Syncer {
    pub fn new(cd: ClusterDir, node: Node, manager: Id52) -> Arc<Syncer> {
        let state = load_state(&cd);
        // Persisted acknowledgements count as fresh: verifying every member right after a
        // restart would cost as much as the re-push the state exists to avoid.
        let now = Instant::now();
        let attempts = state
            .members
            .keys()
            .map(|id| {
                (
                    *id,
                    Attempts {
                        last_contact: Some(now),
                        ..Attempts::default()
                    },
                )
            })
            .collect();
        Arc::new(Syncer {
            cd,
            node,
            manager,
            inner: Mutex::new(Inner {
                source: None,
                stamp: None,
                state,
                attempts,
                dirty: false,
                last_persist: None,
            }),
            wake: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file members should have, as of the last check.
    pub fn current(&self) -> Option<Source> {
        self.refresh_source();
        self.lock().source.clone()
    }

    /// A member talked to us (e.g. pulled on start): it is online, so retry it now.
    /// `have` is the hash the member reported for its own copy.
    pub fn member_seen(&self, peer: &Id52, have: Option<&str>) {
        let mut inner = self.lock();
        let Inner {
            state,
            attempts,
            dirty,
            ..
        } = &mut *inner;
        let Some(rec) = state.members.get_mut(peer) else {
            return;
        };
        rec.last_seen = Some(unix_now());
        if let Some(h) = have {
            rec.acked = Some(h.to_string());
        }
        let a = attempts.entry(*peer).or_default();
        a.failures = 0;
        a.next_try = None;
        a.last_contact = Some(Instant::now());
        *dirty = true;
        drop(inner);
        self.wake.notify_one();
    }

    /// Re-read the manager's file if it changed on disk.
    fn refresh_source(&self) {
        let path = self.cd.file_path();
        let stamp = std::fs::read(&path)
            .ok()
            .map(|b| sha2::Sha256::digest(&b).into());
        if stamp == self.lock().stamp {
            return;
        }
        let loaded = self
            .cd
            .read_text()
            .map_err(|e| e.to_string())
            .and_then(|t| Source::from_manager_text(&t).map_err(|e| e.to_string()));
        let mut inner = self.lock();
        inner.stamp = stamp;
        match loaded {
            Ok(src) => {
                if inner.source.as_ref().map(|s| &s.hash) != Some(&src.hash) {
                    tracing::info!(cluster = %self.cd.alias, hash = short_hash(&src.hash), "cluster file to sync");
                }
                inner.source = Some(src);
            }
            Err(e) => {
                tracing::error!(cluster = %self.cd.alias, error = %e, "cluster file invalid; members keep the previous one");
            }
        }
    }

    /// Bring the member list in line with the file and pick the members due for a request.
    fn plan(&self) -> Vec<Job> {
        let now = Instant::now();
        let mut inner = self.lock();
        let Inner {
            source,
            state,
            attempts,
            dirty,
            ..
        } = &mut *inner;
        let Some(src) = source.as_ref() else {
            return vec![];
        };
        let cfg = &src.config;

        for (name, kind, id) in cfg.members() {
            let addrs = match kind {
                MemberKind::Server => cfg.servers.get(&name).map(|s| s.addrs.clone()),
                MemberKind::Device => None,
            }
            .unwrap_or_default();
            let rec = state.members.entry(id).or_default();
            let kind = kind_name(kind).to_string();
            if rec.name != name || rec.kind != kind || rec.addrs != addrs || rec.departed {
                if rec.departed {
                    attempts.remove(&id);
                }
                rec.name = name;
                rec.kind = kind;
                rec.addrs = addrs;
                rec.departed = false;
                *dirty = true;
            }
        }
        let in_file: std::collections::HashSet<Id52> =
            cfg.members().into_iter().map(|(_, _, id)| id).collect();
        state.members.retain(|id, rec| {
            if in_file.contains(id) {
                return true;
            }
            let a = attempts.entry(*id).or_default();
            if rec.kind != "server" || (a.failures >= DEPARTED_ATTEMPTS && !a.in_flight) {
                tracing::info!(member = %rec.name, %id, "forgetting a removed member");
                attempts.remove(id);
                *dirty = true;
                return false;
            }
            if !rec.departed {
                rec.departed = true;
                a.failures = 0;
                a.next_try = None;
                *dirty = true;
            }
            // Told once it was removed: done.
            if rec.acked.as_deref() == Some(src.hash.as_str()) && !a.in_flight {
                attempts.remove(id);
                *dirty = true;
                return false;
            }
            true
        });

        let mut jobs = vec![];
        for (id, rec) in state.members.iter() {
            if rec.kind != "server" || *id == self.manager {
                continue;
            }
            let a = attempts.entry(*id).or_default();
            if a.in_flight || a.next_try.is_some_and(|t| t > now) {
                continue;
            }
            let kind = if rec.acked.as_deref() != Some(src.hash.as_str()) {
                JobKind::Push
            } else if a
                .last_contact
                .is_none_or(|t| now.duration_since(t) >= VERIFY_EVERY)
            {
                JobKind::Verify
            } else {
                continue;
            };
            a.in_flight = true;
            jobs.push(Job {
                member: *id,
                name: rec.name.clone(),
                hints: rec.addrs.clone(),
                kind,
            });
        }
        jobs
    }

    /// Record the outcome of one job.
    fn finish(
        &self,
        job: &Job,
        result: Result<(Option<String>, Option<String>, Duration), SyncError>,
    ) {
        let now = Instant::now();
        let mut inner = self.lock();
        let Inner {
            state,
            attempts,
            dirty,
            ..
        } = &mut *inner;
        let a = attempts.entry(job.member).or_default();
        a.in_flight = false;
        let Some(rec) = state.members.get_mut(&job.member) else {
            return;
        };
        *dirty = true;
        match result {
            Ok((hash, refusal, rtt)) => {
                a.last_contact = Some(now);
                rec.last_seen = Some(unix_now());
                rec.latency_ms = Some(rtt.as_millis() as u64);
                rec.acked = hash;
                match refusal {
                    None => {
                        a.failures = 0;
                        a.next_try = None;
                        rec.last_error = None;
                    }
                    Some(reason) => {
                        a.failures += 1;
                        a.next_try = Some(now + backoff(a.failures, &job.member));
                        rec.last_error = Some(reason);
                    }
                }
            }
            Err(e) => {
                a.failures += 1;
                a.next_try = Some(now + backoff(a.failures, &job.member));
                let msg = e.to_string();
                if a.failures == 1 || rec.last_error.as_deref() != Some(msg.as_str()) {
                    tracing::info!(cluster = %self.cd.alias, member = %job.name, error = %msg, retry_in = ?backoff(a.failures, &job.member), "member unreachable");
                }
                rec.last_error = Some(msg);
            }
        }
    }

    async fn run_job(
        &self,
        job: &Job,
    ) -> Result<(Option<String>, Option<String>, Duration), SyncError> {
        match job.kind {
            JobKind::Push => {
                let Some(src) = self.lock().source.clone() else {
                    return Err(SyncError::Refused("no file to push".into()));
                };
                let (ack, rtt) = push(
                    &Dialer::Node(self.node.clone()),
                    &self.manager,
                    &job.member,
                    &job.hints,
                    &src.text,
                    &src.hash,
                    REQUEST_TIMEOUT,
                )
                .await?;
                match &ack {
                    PushAck::Applied { hash } => {
                        tracing::info!(cluster = %self.cd.alias, member = %job.name, hash = short_hash(hash), "pushed cluster file")
                    }
                    PushAck::Unchanged { .. } => {
                        tracing::debug!(cluster = %self.cd.alias, member = %job.name, "member already in sync")
                    }
                    PushAck::Refused { reason, .. } => {
                        tracing::warn!(cluster = %self.cd.alias, member = %job.name, %reason, "member refused the cluster file")
                    }
                }
                let refusal = match &ack {
                    PushAck::Refused { reason, .. } => Some(reason.clone()),
                    _ => None,
                };
                Ok((ack.member_hash().map(str::to_string), refusal, rtt))
            }
            JobKind::Verify => {
                let q = HashQuery::default();
                let (reply, rtt) = query(
                    &Dialer::Node(self.node.clone()),
                    &self.manager,
                    &job.member,
                    &job.hints,
                    &q,
                    REQUEST_TIMEOUT,
                )
                .await?;
                Ok((reply.hash, None, rtt))
            }
        }
    }

    fn persist(&self, force: bool) {
        let mut inner = self.lock();
        let due = inner
            .last_persist
            .is_none_or(|t| t.elapsed() >= PERSIST_EVERY);
        if !inner.dirty || !(force || due) {
            return;
        }
        inner.dirty = false;
        inner.last_persist = Some(Instant::now());
        let state = inner.state.clone();
        drop(inner);
        save_state(&self.cd, &state);
    }

    /// Run until `shutdown`; the state is saved on the way out.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        tracing::info!(cluster = %self.cd.alias, "config sync started");
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            self.refresh_source();
            for job in self.plan() {
                let me = self.clone();
                let permits = permits.clone();
                tasks.spawn(async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return;
                    };
                    let result = me.run_job(&job).await;
                    me.finish(&job, result);
                    me.wake.notify_one();
                });
            }
            self.persist(false);
            while tasks.try_join_next().is_some() {}
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(TICK) => {}
                _ = self.wake.notified() => {}
            }
        }
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        self.persist(true);
        tracing::info!(cluster = %self.cd.alias, "config sync stopped");
    }
}

/// Exponential backoff from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], spread by up to a quarter
/// per member so that many members that went away together are not retried in lockstep.
fn backoff(failures: u32, member: &Id52) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = BACKOFF_MIN.saturating_mul(1u32 << exp).min(BACKOFF_MAX);
    let spread = u64::from(member.as_bytes()[0]) * base.as_millis() as u64 / 1024;
    base + Duration::from_millis(spread)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let id = Id52::from_bytes([255; 32]);
        let zero = Id52::from_bytes([0; 32]);
        assert_eq!(backoff(1, &zero), BACKOFF_MIN);
        assert_eq!(backoff(2, &zero), BACKOFF_MIN * 2);
        assert_eq!(backoff(100, &zero), BACKOFF_MAX);
        assert!(backoff(100, &id) <= BACKOFF_MAX + BACKOFF_MAX / 4);
        assert!(backoff(3, &id) > backoff(3, &zero));
    }

    #[test]
    fn source_never_carries_key_settings() {
        let m = Id52::from_bytes([1; 32]);
        // A key named in the file is refused outright (nothing to push).
        let text = format!(
            "[cluster-manager]\nid52 = \"{m}\"\nalias = \"acme\"\nuse-keyring = false\n\
             private-key-file = \"/secret/path/key\"\nprivate-key = \"s3cr3t-key-material\"\n"
        );
        assert!(Source::from_manager_text(&text).is_err());
        let text = format!(
            "[cluster-manager]\nid52 = \"{m}\"\nalias = \"acme\"\nuse-keyring = false\n\
             private-key-file = \"\"\n# private-key-file = \"/secret/path/key\"\n\
             # private-key = \"s3cr3t-key-material\"\nprivate-key = \"\"\n"
        );
        let src = Source::from_manager_text(&text).unwrap();
        for needle in ["use-keyring", "private-key", "/secret/path/key", "s3cr3t"] {
            assert!(!src.text.contains(needle), "{needle} in {}", src.text);
        }
        assert_eq!(src.hash, hash_text(&src.text));
        assert_eq!(src.config.manager, m);
    }

    #[test]
    fn state_round_trips_and_garbage_is_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let cd = ClusterDir::new(&crate::config::paths::Dirs::under(tmp.path()), "acme").unwrap();
        cd.create().unwrap();
        assert_eq!(load_state(&cd), SyncState::default());
        let mut s = SyncState::default();
        s.members.insert(
            Id52::from_bytes([2; 32]),
            MemberRecord {
                name: "foo".into(),
                kind: "server".into(),
                acked: Some("ab".into()),
                last_seen: Some(5),
                ..MemberRecord::default()
            },
        );
        save_state(&cd, &s);
        assert_eq!(load_state(&cd), s);
        std::fs::write(cd.dir.join(STATE_FILE), b"{not json").unwrap();
        assert_eq!(load_state(&cd), SyncState::default());
    }
}
