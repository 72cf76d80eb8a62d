//! A member keeps up with its manager on its own: pushes reach only servers (a device
//! cannot be dialled), so every process that holds a member's key — the agent, and the
//! server for the clusters it serves — asks the manager for the current file
//!
//! - once when it starts holding the key,
//! - every [`poll_from_env`] (default [`DEFAULT_POLL`], `MALAI_SYNC_POLL_SECS`),
//! - and whenever it dials anyone in the cluster (a sign the user is using it), at most
//!   once per [`NUDGE_GAP`].
//!
//! With neither running, a command that dials with its own endpoint asks instead
//! ([`catch_up`], alongside its session), at most once per poll interval per machine.
//!
//! One check is one `config-hash` request with `fetch` and the member's own hash: the
//! manager answers with its hash only when they match, and with the file when they differ
//! ([`member::pull`] applies it). So a device with an agent has a file the manager changed
//! within about `poll + poll/4` (the schedule's resolution), or at once on its next
//! connection into the cluster after [`NUDGE_GAP`]. A failed check (manager offline) is
//! logged and tried again on the schedule.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::member::{self, Applied, PullError};
use crate::config::store::ClusterDir;
use crate::session::dial::Dialer;

/// How often a member asks the manager by default.
pub const DEFAULT_POLL: Duration = Duration::from_secs(60);
/// Seconds between scheduled checks (default [`DEFAULT_POLL`]).
pub const ENV_POLL: &str = "MALAI_SYNC_POLL_SECS";
/// A dial into the cluster triggers a check only if the last one is older than this.
pub const NUDGE_GAP: Duration = Duration::from_secs(10);

/// The poll interval from `MALAI_SYNC_POLL_SECS` (at least one second), else
/// [`DEFAULT_POLL`].
pub fn poll_from_env() -> Duration {
    std::env::var(ENV_POLL)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.max(1)))
        .unwrap_or(DEFAULT_POLL)
}

/// Why a check was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The key was just bound (start, rescan).
    Start,
    /// The schedule.
    Scheduled,
    /// This process dialed someone in the cluster.
    Dialed,
}

#[derive(Debug, Default, Clone, Copy)]
struct ClusterState {
    last: Option<Instant>,
    running: bool,
}

/// The schedule of every cluster one process follows. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct Follower {
    every: Duration,
    clusters: Mutex<BTreeMap<String, ClusterState>>,
}

impl Follower {
    pub fn new(every: Duration) -> Arc<Follower> {
        Arc::new(Follower {
            every,
            clusters: Mutex::new(BTreeMap::new()),
        })
    }

    /// How often the caller should offer [`Trigger::Scheduled`] checks: a quarter of the
    /// interval, so a check is never more than that late.
    pub fn tick(&self) -> Duration {
        (self.every / 4).max(Duration::from_millis(250))
    }

    /// Whether a check of `alias` for `why` should start now; if so it is marked running
    /// (end it with [`Follower::check`], which clears the mark).
    pub fn start(&self, alias: &str, why: Trigger, now: Instant) -> bool {
        let mut all = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let st = all.entry(alias.to_string()).or_default();
        let due = !st.running
            && match (why, st.last) {
                (_, None) => true,
                (Trigger::Start, Some(_)) => true,
                (Trigger::Scheduled, Some(t)) => now.saturating_duration_since(t) >= self.every,
                (Trigger::Dialed, Some(t)) => now.saturating_duration_since(t) >= NUDGE_GAP,
            };
        if due {
            st.running = true;
        }
        due
    }

    /// One check of `dir`'s cluster (after [`Follower::start`] said yes): ask the manager,
    /// apply a newer file. The outcome is logged here.
    pub async fn check(
        self: Arc<Self>,
        dir: ClusterDir,
        dialer: Dialer,
        why: Trigger,
    ) -> Result<Applied, PullError> {
        let r = member::pull(&dir, &dialer, &[]).await;
        match &r {
            Ok(Applied::Replaced(h)) => tracing::info!(
                cluster = %dir.alias, ?why, hash = crate::protocol::config::short_hash(h),
                "pulled the cluster file from the manager"
            ),
            Ok(Applied::Unchanged(_)) if why == Trigger::Start => {
                tracing::info!(cluster = %dir.alias, ?why, "pulled the cluster file from the manager: already current")
            }
            Ok(Applied::Unchanged(_)) => {
                tracing::debug!(cluster = %dir.alias, ?why, "cluster file is current")
            }
            Err(e) => {
                tracing::info!(cluster = %dir.alias, ?why, error = %e, "cannot check the manager's file; trying again later")
            }
        }
        let mut all = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        let st = all.entry(dir.alias.clone()).or_default();
        st.running = false;
        st.last = Some(Instant::now());
        r
    }

    /// Forget clusters not in `aliases` (left, or handed to another holder), so they are
    /// checked at once if they come back.
    pub fn retain(&self, aliases: &[String]) {
        let mut all = self.clusters.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|a, st| st.running || aliases.contains(a));
    }
}

/// File in a member's folder: when a command last asked the manager ([`catch_up`]).
const LAST_CHECK_FILE: &str = "last-manager-check";
/// How long a command's check may keep the command waiting once its own work is done.
pub const CATCH_UP_LIMIT: Duration = Duration::from_secs(2);

/// Whether a command that dials with its own endpoint (no agent or server holds the key,
/// so nothing else follows the manager for this machine) should check the manager's file:
/// a member folder whose last check by any command is older than the poll interval.
pub fn catch_up_due(dir: &ClusterDir) -> bool {
    if !is_member(dir) {
        return false;
    }
    let last = std::fs::metadata(dir.dir.join(LAST_CHECK_FILE))
        .and_then(|m| m.modified())
        .ok();
    last.and_then(|t| t.elapsed().ok())
        .is_none_or(|age| age >= poll_from_env())
}

/// One check of the manager's file by a command ([`catch_up_due`] said so), bounded by
/// [`CATCH_UP_LIMIT`]: the stamp is written first, so commands started meanwhile do not
/// all ask too; a failure only waits for the next command, agent or pull.
pub async fn catch_up(dir: &ClusterDir, dialer: &Dialer) {
    let stamp = dir.dir.join(LAST_CHECK_FILE);
    if let Err(e) = crate::config::store::write_atomic(&stamp, b"", 0o644) {
        tracing::debug!(cluster = %dir.alias, error = %e, "cannot stamp the manager check");
    }
    match tokio::time::timeout(CATCH_UP_LIMIT, member::pull(dir, dialer, &[])).await {
        Ok(Ok(Applied::Replaced(h))) => tracing::info!(
            cluster = %dir.alias, hash = crate::protocol::config::short_hash(&h),
            "pulled the cluster file from the manager"
        ),
        Ok(Ok(Applied::Unchanged(_))) => {}
        Ok(Err(e)) => {
            tracing::info!(cluster = %dir.alias, error = %e, "cannot check the manager's file")
        }
        Err(_) => tracing::info!(cluster = %dir.alias, "the manager did not answer in time"),
    }
}

/// Whether `dir` is a member's folder (it joined a manager), the only kind that follows.
pub fn is_member(dir: &ClusterDir) -> bool {
    matches!(dir.manager_id(), Ok(Some(m)) if crate::keys::id52(&dir.dir).ok() != Some(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_nudges_and_one_check_at_a_time() {
        let f = Follower::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(f.start("acme", Trigger::Scheduled, t0), "first is due");
        // Running: nothing else starts.
        assert!(!f.start("acme", Trigger::Start, t0));
        assert!(!f.start("acme", Trigger::Dialed, t0));
        {
            let mut all = f.clusters.lock().unwrap();
            let st = all.get_mut("acme").unwrap();
            st.running = false;
            st.last = Some(t0);
        }
        assert!(!f.start("acme", Trigger::Scheduled, t0 + Duration::from_secs(59)));
        assert!(!f.start("acme", Trigger::Dialed, t0 + Duration::from_secs(9)));
        assert!(f.start("acme", Trigger::Dialed, t0 + NUDGE_GAP));
        f.clusters.lock().unwrap().get_mut("acme").unwrap().running = false;
        assert!(f.start("acme", Trigger::Scheduled, t0 + Duration::from_secs(60)));
        // Other clusters are independent.
        assert!(f.start("other", Trigger::Dialed, t0));
        assert_eq!(f.tick(), Duration::from_secs(15));
    }

    #[test]
    fn retain_forgets_left_clusters_but_not_running_checks() {
        let f = Follower::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(f.start("a", Trigger::Start, t0));
        assert!(f.start("b", Trigger::Start, t0));
        f.clusters.lock().unwrap().get_mut("b").unwrap().running = false;
        f.retain(&[]);
        let all = f.clusters.lock().unwrap();
        assert!(all.contains_key("a") && !all.contains_key("b"));
    }
}
