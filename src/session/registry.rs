//! This machine's resumable client sessions, for `malai ssh status` (issue 18): each
//! ProxyCommand or native command whose session is resumable leaves a record in its
//! cluster's folder while it runs, saying whether it is attached or reconnecting (since
//! when) and how many bytes it holds unacknowledged.
//!
//! The records are files `sessions/<pid>.<n>.json` (written atomically: a temporary file,
//! then a rename) beside a lock file `sessions/<pid>.<n>.lock` the process holds
//! (`flock`) for its session's life. A record whose lock nobody holds belongs to a process
//! that is gone (SIGKILL leaves it behind): [`list`] does not show it, and [`orphans`]
//! hands it to the next resumable session of this cluster, which asks the server to end
//! that session (a `resume` with `close`) instead of keeping it, and its command, for
//! `session-keep`. A record holds its session's id and per-session secret (never a key):
//! the folder is the cluster's own private one, the file 0600, and the server takes the
//! secret only from this machine's id52.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::store::ClusterDir;

/// The folder of a cluster's records.
const FOLDER: &str = "sessions";

/// One record: what status shows of a client session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub cluster: String,
    pub server: String,
    /// `tunnel` or `exec`.
    pub kind: String,
    pub pid: u32,
    /// When the session started (seconds since the epoch).
    pub started: u64,
    /// Since when it is reconnecting (seconds since the epoch); `None` while attached.
    pub reconnecting_since: Option<u64>,
    /// Bytes sent and not yet acknowledged by the server (at the last change).
    pub buffered: u64,
    /// The session's id and secret, to end it when this process is gone ([`orphans`]).
    #[serde(default)]
    pub session: String,
    #[serde(default)]
    pub secret: String,
    /// How long the server keeps it detached: past that a left record is only removed.
    #[serde(default)]
    pub keep_secs: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A session's record while its process runs; dropping it removes the record.
pub struct Registered {
    json: PathBuf,
    lock: PathBuf,
    _held: Option<nix::fcntl::Flock<std::fs::File>>,
    record: Record,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// The session a record is for, as the server granted it.
pub struct Granted<'a> {
    pub session: &'a str,
    pub secret: &'a str,
    pub keep_secs: u64,
}

/// Leave a record for a new attached session of `kind` to `server`. Best effort: a record
/// that cannot be written is logged and the session goes on without one.
pub fn register(dir: &ClusterDir, server: &str, kind: &str, granted: Granted<'_>) -> Registered {
    let pid = std::process::id();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let folder = dir.dir.join(FOLDER);
    let name = format!("{pid}.{n}");
    let mut r = Registered {
        json: folder.join(format!("{name}.json")),
        lock: folder.join(format!("{name}.lock")),
        _held: None,
        record: Record {
            cluster: dir.alias.clone(),
            server: server.to_string(),
            kind: kind.to_string(),
            pid,
            started: now(),
            reconnecting_since: None,
            buffered: 0,
            session: granted.session.to_string(),
            secret: granted.secret.to_string(),
            keep_secs: granted.keep_secs,
        },
    };
    match hold(&folder, &r.lock) {
        Ok(l) => {
            r._held = Some(l);
            r.write();
        }
        Err(e) => {
            tracing::debug!(error = %e, folder = %folder.display(), "no session record (status will not list this session)");
        }
    }
    r
}

fn hold(folder: &Path, lock: &Path) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(folder)?;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock)?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| std::io::Error::from(e))
}

impl Registered {
    /// The connection was lost: reconnecting from now, `buffered` bytes held.
    pub fn reconnecting(&mut self, buffered: usize) {
        self.record.reconnecting_since = Some(now());
        self.record.buffered = buffered as u64;
        self.write();
    }

    /// The server took the session back.
    pub fn attached(&mut self, buffered: usize) {
        self.record.reconnecting_since = None;
        self.record.buffered = buffered as u64;
        self.write();
    }

    fn write(&self) {
        if self._held.is_none() {
            return;
        }
        let Ok(text) = serde_json::to_vec(&self.record) else {
            return;
        };
        let tmp = self.json.with_extension("json.tmp");
        let written = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, &self.json));
        if let Err(e) = written {
            tracing::debug!(error = %e, "session record not written");
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        if self._held.is_some() {
            let _ = std::fs::remove_file(&self.json);
            let _ = std::fs::remove_file(&self.lock);
        }
    }
}

/// The records of `dir`'s live sessions, oldest first (not those of processes that are
/// gone: they are [`orphans`]).
pub fn list(dir: &ClusterDir) -> Vec<Record> {
    let folder = dir.dir.join(FOLDER);
    let Ok(entries) = std::fs::read_dir(&folder) else {
        return vec![];
    };
    let mut out = vec![];
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let lock = path.with_extension("lock");
        if !held_by_someone(&lock) {
            continue;
        }
        let record = std::fs::read(&path)
            .ok()
            .and_then(|t| serde_json::from_slice::<Record>(&t).ok());
        if let Some(r) = record {
            out.push(r);
        }
    }
    out.sort_by_key(|r| (r.started, r.pid));
    out
}

/// A record left by a process that is gone: its session may still be detached on the
/// server. [`Orphan::forget`] removes the record.
pub struct Orphan {
    pub record: Record,
    json: PathBuf,
}

impl Orphan {
    pub fn forget(self) {
        let _ = std::fs::remove_file(&self.json);
        let _ = std::fs::remove_file(self.json.with_extension("lock"));
    }
}

/// `dir`'s records whose process is gone and whose session the server may still keep;
/// records past their keep time (or unreadable) are removed here.
pub fn orphans(dir: &ClusterDir) -> Vec<Orphan> {
    let Ok(entries) = std::fs::read_dir(dir.dir.join(FOLDER)) else {
        return vec![];
    };
    let mut out = vec![];
    for e in entries.flatten() {
        let json = e.path();
        if json.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        let lock = json.with_extension("lock");
        if held_by_someone(&lock) {
            continue;
        }
        let record = std::fs::read(&json)
            .ok()
            .and_then(|t| serde_json::from_slice::<Record>(&t).ok());
        let gone = Orphan {
            record: match record {
                Some(r) => r,
                None => {
                    let _ = std::fs::remove_file(&json);
                    let _ = std::fs::remove_file(&lock);
                    continue;
                }
            },
            json,
        };
        let last = gone
            .record
            .reconnecting_since
            .unwrap_or(gone.record.started);
        if gone.record.session.is_empty() || now() > last.saturating_add(gone.record.keep_secs) {
            gone.forget();
            continue;
        }
        out.push(gone);
    }
    out
}

fn held_by_someone(lock: &Path) -> bool {
    let Ok(f) = std::fs::OpenOptions::new().write(true).open(lock) else {
        return false;
    };
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).is_err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_lives_with_its_session_and_a_dead_ones_is_an_orphan() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ClusterDir {
            alias: "acme".into(),
            dir: tmp.path().to_path_buf(),
        };
        let granted = Granted {
            session: "ab",
            secret: "cd",
            keep_secs: 3600,
        };
        let mut r = register(&dir, "foo", "exec", granted);
        let listed = list(&dir);
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].server, "foo");
        assert_eq!(listed[0].reconnecting_since, None);
        r.reconnecting(42);
        let listed = list(&dir);
        assert!(listed[0].reconnecting_since.is_some());
        assert_eq!(listed[0].buffered, 42);
        r.attached(0);
        assert_eq!(list(&dir)[0].reconnecting_since, None);
        drop(r);
        assert!(list(&dir).is_empty());

        // A record left by a process that is gone (nobody holds its lock) is not listed; it
        // is an orphan until forgotten, or until its keep time is over.
        let folder = tmp.path().join(FOLDER);
        let mut left = Record {
            cluster: "acme".into(),
            server: "foo".into(),
            kind: "tunnel".into(),
            pid: 1,
            started: now(),
            reconnecting_since: None,
            buffered: 0,
            session: "ab".into(),
            secret: "cd".into(),
            keep_secs: 3600,
        };
        let leave = |r: &Record| {
            std::fs::write(folder.join("1.0.json"), serde_json::to_vec(r).unwrap()).unwrap();
            std::fs::write(folder.join("1.0.lock"), b"").unwrap();
        };
        leave(&left);
        assert!(list(&dir).is_empty());
        let found = orphans(&dir);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].record.session, "ab");
        found.into_iter().for_each(Orphan::forget);
        assert!(orphans(&dir).is_empty());
        assert!(!folder.join("1.0.json").exists());
        // Past its keep time the server has ended it anyway: removed, not handed out.
        left.started = 1;
        leave(&left);
        assert!(orphans(&dir).is_empty());
        assert!(!folder.join("1.0.json").exists());
    }
}
