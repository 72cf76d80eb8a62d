//! The audit log: one JSON line per request decision in `LOGDIR/ssh/audit.log`.
//!
//! Written at the ACL choke point (`server::request`), so nothing is served without a line
//! here. Each line has the time, peer id52 and alias, cluster, transport, request kind, the
//! command or service, allow/deny with the reason, bytes each way and duration. Never a
//! secret, never payload. The file is rotated at `MAX_BYTES` (`audit.log.1` … `.KEEP`).
//! `malai ssh audit` reads it back as a table.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub const FILE: &str = "audit.log";
/// Rotate when the file passes this size.
pub const MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Rotated files kept.
pub const KEEP: usize = 4;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub peer: String,
    /// The peer's member name in the cluster file, or "-".
    pub alias: String,
    pub cluster: String,
    /// "iroh" or "stdinserver".
    pub transport: String,
    pub kind: String,
    /// The command (exec) or service (http); empty otherwise.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// "allow" or "deny".
    pub decision: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
    #[serde(default)]
    pub duration_ms: u64,
    /// For allowed requests: "ok" or "broken" (the stream ended abnormally).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub outcome: String,
}

struct Log {
    path: PathBuf,
    file: Option<std::fs::File>,
}

static LOG: OnceLock<Mutex<Log>> = OnceLock::new();

/// Start writing to `dir/audit.log` (the server calls this once).
pub fn init(dir: &Path) {
    let _ = std::fs::create_dir_all(dir);
    crate::logging::private_dir(dir);
    let _ = LOG.set(Mutex::new(Log {
        path: dir.join(FILE),
        file: None,
    }));
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// Append one entry. Failures are logged, never fatal: an unwritable log must not stop
/// the server, but it is loud in the tracing log.
pub fn write(entry: &Entry) {
    let Some(log) = LOG.get() else { return };
    let mut log = match log.lock() {
        Ok(l) => l,
        Err(p) => p.into_inner(),
    };
    let Ok(mut line) = serde_json::to_vec(entry) else {
        return;
    };
    line.push(b'\n');
    if let Err(e) = log.append(&line) {
        tracing::error!(error = %e, "cannot write the audit log");
    }
}

impl Log {
    fn append(&mut self, line: &[u8]) -> std::io::Result<()> {
        let too_big = std::fs::metadata(&self.path)
            .map(|m| m.len() + line.len() as u64 > MAX_BYTES)
            .unwrap_or(false);
        if too_big {
            self.file = None;
            rotate(&self.path);
        }
        if self.file.is_none() {
            use std::os::unix::fs::OpenOptionsExt;
            self.file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&self.path)?,
            );
        }
        match self.file.as_mut() {
            Some(f) => f.write_all(line),
            None => Ok(()),
        }
    }
}

fn rotated(path: &Path, n: usize) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn rotate(path: &Path) {
    for n in (1..KEEP).rev() {
        let _ = std::fs::rename(rotated(path, n), rotated(path, n + 1));
    }
    let _ = std::fs::rename(path, rotated(path, 1));
}

/// Every entry in the log folder, oldest first. Lines that don't parse are skipped.
pub fn read_all(dir: &Path) -> Vec<Entry> {
    let path = dir.join(FILE);
    let mut files: Vec<PathBuf> = (1..=KEEP).rev().map(|n| rotated(&path, n)).collect();
    files.push(path);
    let mut out = vec![];
    for f in files {
        if let Ok(text) = std::fs::read_to_string(&f) {
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    out
}

/// `malai ssh audit`: a table of entries in time order, newest last (entries of several
/// processes interleave in the file as they finish, not as they started), each column as
/// wide as its widest cell.
pub fn table(entries: &[Entry], since: Option<Duration>, deny_only: bool) -> String {
    let cutoff = since.map(|d| SystemTime::now() - d);
    let mut rows: Vec<&Entry> = entries
        .iter()
        .filter(|e| !deny_only || e.decision == "deny")
        .filter(|e| match cutoff {
            Some(c) => !humantime::parse_rfc3339(&e.time)
                .map(|t| t < c)
                .unwrap_or(false),
            None => true,
        })
        .collect();
    // RFC 3339 UTC with fixed precision sorts as text; stable, so equal times keep file order.
    rows.sort_by(|a, b| a.time.cmp(&b.time));
    let mut t = crate::table::Table::new([
        "TIME",
        "RESULT",
        "PEER",
        "ALIAS",
        "CLUSTER",
        "KIND",
        "IN",
        "OUT",
        "MS",
        "DETAIL / REASON",
    ]);
    // Every field may come from a peer (or a hand-edited file): no control character
    // reaches the admin's terminal, and one entry stays one row.
    let p = |s: &str| crate::logging::printable(s).into_owned();
    for e in rows {
        let detail = match (e.detail.is_empty(), e.reason.is_empty()) {
            (false, false) => format!("{} — {}", e.detail, e.reason),
            (false, true) => e.detail.clone(),
            (true, _) => e.reason.clone(),
        };
        let result = if e.outcome == "broken" {
            "broken"
        } else {
            &e.decision
        };
        t.row([
            p(&e.time),
            p(result),
            p(&e.peer.chars().take(12).collect::<String>()),
            p(&e.alias),
            p(&e.cluster),
            p(&e.kind),
            e.bytes_in.to_string(),
            e.bytes_out.to_string(),
            e.duration_ms.to_string(),
            p(&detail),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_and_reading() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = Log {
            path: dir.path().join(FILE),
            file: None,
        };
        let e = Entry {
            time: now_rfc3339(),
            decision: "deny".into(),
            reason: "permission denied".into(),
            ..Default::default()
        };
        let mut line = serde_json::to_vec(&e).unwrap();
        line.push(b'\n');
        log.append(&line).unwrap();
        rotate(&log.path);
        log.file = None;
        log.append(&line).unwrap();
        let all = read_all(dir.path());
        assert_eq!(all.len(), 2);
        let t = table(&all, Some(Duration::from_secs(60)), true);
        assert_eq!(t.lines().count(), 3);
        assert!(table(&all, None, false).contains("permission denied"));
    }

    #[test]
    fn the_table_is_in_time_order_and_aligned_for_long_kinds() {
        let e = |time: &str, kind: &str| Entry {
            time: time.into(),
            peer: "p".repeat(52),
            kind: kind.into(),
            decision: "allow".into(),
            ..Default::default()
        };
        let t = table(
            &[
                e("2026-12-02T10:00:02.000Z", "remote-connection"),
                e("2026-12-02T10:00:01.000Z", "exec"),
            ],
            None,
            false,
        );
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("2026-12-02T10:00:01"), "{t}");
        assert!(lines[2].starts_with("2026-12-02T10:00:02"), "{t}");
        // The IN column starts at the same place on every row.
        let col = |l: &str| l.find("  0  ").unwrap_or(usize::MAX);
        assert_eq!(col(lines[1]), col(lines[2]), "{t}");
        assert_eq!(lines[0].find("  IN  "), Some(col(lines[1])), "{t}");
    }

    #[test]
    fn the_table_shows_no_peer_supplied_control_character() {
        let forged = Entry {
            time: now_rfc3339(),
            alias: "bob\u{1b}]0;pwned\u{7}".into(),
            kind: "exec".into(),
            detail: "id\r\n2026-12-02T00:00:00.000Z allow  FORGED\u{1b}[2J".into(),
            decision: "deny".into(),
            reason: "command not allowed".into(),
            ..Default::default()
        };
        let t = table(&[forged], None, false);
        assert_eq!(t.lines().count(), 2, "one entry, one row:\n{t}");
        assert!(!t.chars().any(|c| c.is_control() && c != '\n'), "{t:?}");
        assert!(t.contains("id\\r\\n2026"), "{t}");
        // The allowed twin: ordinary text is shown as it is.
        assert!(t.contains("command not allowed"));
    }
}
