//! `malai ssh cluster status`: every member of a managed cluster, whether it is online and
//! whether its copy of the file is the current one.
//!
//! Servers are asked now (`config-hash`, a few seconds at most, many at once), so "online"
//! and "in sync" are facts, not the sync loop's last belief. Devices run no server and
//! cannot be asked; for them (and for servers that do not answer) "last seen" comes from the
//! sync loop's state file (`sync::manager::STATE_FILE`), updated whenever a member talks to
//! the manager (a push, a pull).

use std::time::Duration;

use serde::Serialize;

use super::{ClusterError, managed_cluster};
use crate::config::MemberKind;
use crate::config::paths::Dirs;
use crate::id52::Id52;
use crate::protocol::config::{HashQuery, short_hash};
use crate::sync;
use crate::sync::manager::{Source, load_state, unix_now};
use crate::table::Table;

/// How long one member may take to answer before it counts as offline.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Members asked at once.
const PROBE_PARALLEL: usize = 64;

/// The whole report (`--json` prints exactly this).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub cluster: String,
    pub manager: Id52,
    /// Hash of the file as members get it.
    pub hash: String,
    pub members: Vec<MemberStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub name: String,
    /// `server` or `device`.
    pub kind: &'static str,
    pub id52: Id52,
    /// `None` for devices: they cannot be asked.
    pub online: Option<bool>,
    /// The member's file hash: from its answer, else the last one it acknowledged.
    pub hash: Option<String>,
    pub in_sync: Option<bool>,
    /// Unix seconds.
    pub last_seen: Option<u64>,
    pub latency_ms: Option<u64>,
    /// Why it did not answer, or why it refused the last push.
    pub error: Option<String>,
}

/// Build the report for a managed cluster.
pub async fn status(dirs: &Dirs, cluster: Option<&str>) -> Result<Status, ClusterError> {
    let cd = managed_cluster(dirs, cluster)?;
    let text = cd.read_text()?;
    let source = Source::from_manager_text(&text)?;
    let cfg = crate::config::ClusterConfig::parse(&source.text)
        .map_err(|e| ClusterError::Usage(format!("{}: {e}", cd.file_path().display())))?;
    let state = load_state(&cd);
    let crate::session::dial::Routed { dialer: node, own } =
        super::dialer_for(&cd, Some(&cfg)).await?;

    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(PROBE_PARALLEL));
    let mut probes = tokio::task::JoinSet::new();
    for (i, (name, kind, id)) in cfg.members().into_iter().enumerate() {
        if kind != MemberKind::Server || id == cfg.manager {
            continue;
        }
        let hints = cfg
            .servers
            .get(&name)
            .map(|s| s.addrs.clone())
            .unwrap_or_default();
        let node = node.clone();
        let permits = permits.clone();
        let manager = cfg.manager;
        probes.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let r = sync::query(
                &node,
                &manager,
                &id,
                &hints,
                &HashQuery::default(),
                PROBE_TIMEOUT,
            )
            .await;
            (i, r)
        });
    }
    let mut answers = std::collections::HashMap::new();
    while let Some(joined) = probes.join_next().await {
        if let Ok((i, r)) = joined {
            answers.insert(i, r);
        }
    }
    if let Some(own) = own {
        own.done(Duration::from_secs(3)).await;
    }

    let now = unix_now();
    let members = cfg
        .members()
        .into_iter()
        .enumerate()
        .map(|(i, (name, kind, id))| {
            let rec = state.members.get(&id);
            let mut m = MemberStatus {
                name,
                kind: match kind {
                    MemberKind::Server => "server",
                    MemberKind::Device => "device",
                },
                id52: id,
                online: None,
                hash: rec.and_then(|r| r.acked.clone()),
                in_sync: None,
                last_seen: rec.and_then(|r| r.last_seen),
                latency_ms: rec.and_then(|r| r.latency_ms),
                error: rec.and_then(|r| r.last_error.clone()),
            };
            match answers.remove(&i) {
                Some(Ok((reply, rtt))) => {
                    m.online = Some(true);
                    m.hash = reply.hash;
                    m.last_seen = Some(now);
                    m.latency_ms = Some(rtt.as_millis() as u64);
                    if m.hash.as_deref() == Some(source.hash.as_str()) {
                        m.error = None;
                    }
                }
                Some(Err(e)) => {
                    m.online = Some(false);
                    m.latency_ms = None;
                    m.error = Some(e.to_string());
                }
                None => {}
            }
            m.in_sync = m.hash.as_ref().map(|h| *h == source.hash);
            m
        })
        .collect();
    Ok(Status {
        cluster: cd.alias.clone(),
        manager: cfg.manager,
        hash: source.hash.clone(),
        members,
    })
}

/// The report as a table for people.
pub fn render(s: &Status, now: u64) -> String {
    let mut table = Table::new([
        "NAME",
        "KIND",
        "ID52",
        "STATE",
        "SYNC",
        "LAST SEEN",
        "LATENCY",
    ]);
    for m in &s.members {
        let state = match m.online {
            Some(true) => "online",
            Some(false) => "offline",
            None => "-",
        };
        let sync = match (&m.hash, m.in_sync) {
            (_, Some(true)) => "in sync".to_string(),
            (Some(h), _) => format!("behind ({})", short_hash(h)),
            (None, _) => "unknown".to_string(),
        };
        let seen = match m.last_seen {
            Some(t) => ago(now.saturating_sub(t)),
            None => "never".into(),
        };
        let latency = m
            .latency_ms
            .map(|l| format!("{l} ms"))
            .unwrap_or_else(|| "-".into());
        table.row([
            m.name.clone(),
            m.kind.to_string(),
            m.id52.short(),
            state.to_string(),
            sync,
            seen,
            latency,
        ]);
    }
    format!(
        "cluster {} (manager {}), file {}\n{}",
        s.cluster,
        s.manager.short(),
        short_hash(&s.hash),
        table.render()
    )
}

fn ago(secs: u64) -> String {
    match secs {
        0..=4 => "now".into(),
        5..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        7200..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_shape() {
        let s = Status {
            cluster: "acme".into(),
            manager: Id52::from_bytes([1; 32]),
            hash: "abcdef0123456789".into(),
            members: vec![
                MemberStatus {
                    name: "foo".into(),
                    kind: "server",
                    id52: Id52::from_bytes([2; 32]),
                    online: Some(true),
                    hash: Some("abcdef0123456789".into()),
                    in_sync: Some(true),
                    last_seen: Some(100),
                    latency_ms: Some(2),
                    error: None,
                },
                MemberStatus {
                    name: "alice".into(),
                    kind: "device",
                    id52: Id52::from_bytes([3; 32]),
                    online: None,
                    hash: None,
                    in_sync: None,
                    last_seen: None,
                    latency_ms: None,
                    error: None,
                },
            ],
        };
        let t = render(&s, 100);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[1].starts_with("NAME"));
        assert!(
            lines[2].contains("online") && lines[2].contains("in sync") && lines[2].contains("now")
        );
        assert!(lines[3].contains("unknown") && lines[3].contains("never"));
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["members"][0]["in_sync"], true);
        assert_eq!(ago(3600), "60 min ago");
    }
}
