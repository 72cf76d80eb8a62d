//! One cluster: this machine's role in its file, who holds its key and whether that
//! process answers (and, on a server, whether the server runs), its relays and QUIC
//! address discovery.

use super::{Check, holder_status};
use crate::config::store::ClusterDir;
use crate::config::{ClusterConfig, MemberKind};
use crate::transport::probe::{self, RelayReport};

/// What one cluster's checks found: the lines, and the relay probe (the host check names
/// its relays when a dial fails).
pub(super) struct ClusterChecks {
    pub checks: Vec<Check>,
    pub relays: Option<RelayReport>,
}

/// The relay lines and the probe they came from.
struct RelayChecks {
    checks: Vec<Check>,
    report: Option<RelayReport>,
}

impl RelayChecks {
    /// One line and no probe (relays disabled, or a setting that cannot be used).
    fn only(check: Check) -> RelayChecks {
        RelayChecks {
            checks: vec![check],
            report: None,
        }
    }
}

pub(super) async fn checks(dir: &ClusterDir) -> ClusterChecks {
    let name = format!("cluster {}", dir.alias);
    let mut out = vec![];
    let me = match crate::keys::id52(&dir.dir) {
        Ok(id) => id,
        Err(e) => {
            out.push(Check::fail(
                name,
                format!("no key: {e}"),
                format!(
                    "join again: `malai ssh cluster join {} <manager-id52>`",
                    dir.alias
                ),
            ));
            return ClusterChecks {
                checks: out,
                relays: None,
            };
        }
    };
    let cfg = if dir.has_file() {
        match dir.load() {
            Ok(c) => Some(c),
            Err(e) => {
                out.push(Check::fail(
                    name.clone(),
                    format!("its cluster file is broken: {e}"),
                    "fix the file on the manager and push it (`malai ssh cluster push`)",
                ));
                None
            }
        }
    } else {
        out.push(Check::fail(
            name.clone(),
            format!("joined as {me}, but there is no cluster file yet"),
            format!(
                "ask the manager to add {me}; then `malai ssh cluster pull --cluster {}` (or wait for its push)",
                dir.alias
            ),
        ));
        None
    };
    let role = cfg.as_ref().map(|c| role_of(c, &me));
    if let (Some(cfg), Some(role)) = (&cfg, &role) {
        out.push(match role {
            Role::Unknown => Check::fail(
                name.clone(),
                format!("the cluster file does not name this machine ({me})"),
                format!("on the manager: `malai ssh cluster add server|device <name> {me}`"),
            ),
            r => Check::pass(
                name.clone(),
                format!(
                    "{} (manager {})",
                    r.describe(),
                    short(&cfg.manager.to_string())
                ),
            ),
        });
    }
    out.push(super::local::key_file(dir));
    let server_name = match &role {
        Some(Role::Member(n, MemberKind::Server)) => Some(n.clone()),
        _ => None,
    };
    out.extend(holder(dir, server_name.as_deref()).await);
    let relays = relays(dir, cfg.as_ref()).await;
    out.extend(relays.checks);
    ClusterChecks {
        checks: out,
        relays: relays.report,
    }
}

enum Role {
    Manager(Option<(String, MemberKind)>),
    Member(String, MemberKind),
    Unknown,
}

impl Role {
    fn describe(&self) -> String {
        let member = |n: &str, k: &MemberKind| match k {
            MemberKind::Server => format!("server {n}"),
            MemberKind::Device => format!("device {n}"),
        };
        match self {
            Role::Manager(None) => "manager".into(),
            Role::Manager(Some((n, k))) => format!("manager, and {}", member(n, k)),
            Role::Member(n, k) => member(n, k),
            Role::Unknown => "not named in the file".into(),
        }
    }
}

fn role_of(cfg: &ClusterConfig, me: &crate::id52::Id52) -> Role {
    let member = cfg.name_of(me).map(|(n, k)| (n.to_string(), k));
    match (cfg.manager == *me, member) {
        (true, m) => Role::Manager(m),
        (false, Some((n, k))) => Role::Member(n, k),
        (false, None) => Role::Unknown,
    }
}

fn short(id: &str) -> String {
    format!("{}…", &id[..id.len().min(8)])
}

/// Who holds the key (server, agent, none) and whether it answers; a server machine
/// whose server is not running fails.
async fn holder(dir: &ClusterDir, server: Option<&str>) -> Vec<Check> {
    use crate::control::lock::Role as HolderRole;
    let what = format!("key holder {}", dir.alias);
    let h = match crate::control::lock::holder(dir) {
        Ok(h) => h,
        Err(e) => {
            return vec![Check::fail(
                what,
                e.to_string(),
                "fix the permissions of the cluster folder",
            )];
        }
    };
    let mut out = vec![];
    match &h {
        None => out.push(Check::pass(
            what,
            "no server or agent holds it: each command binds it for its own length (`malai ssh agent` pools connections)",
        )),
        Some(h) => {
            let who = match h.role {
                HolderRole::Server => "malai ssh server",
                HolderRole::Agent => "malai ssh agent",
                HolderRole::Command => "a malai command",
            };
            let Some(socket) = &h.socket else {
                out.push(Check::pass(what, format!("{who} (pid {})", h.pid)));
                return out;
            };
            out.push(match holder_status(socket).await {
                Ok(_) => Check::pass(
                    what,
                    format!("{who} (pid {}) answers on {}", h.pid, socket.display()),
                ),
                Err(e) => Check::fail(
                    what,
                    format!(
                        "{who} (pid {}) holds it but does not answer on {}: {e}",
                        h.pid,
                        socket.display()
                    ),
                    format!(
                        "a stopped process resumes with `kill -CONT {pid}`; a hung one: `kill {pid}` and start it again (every command of this cluster waits on it meanwhile)",
                        pid = h.pid
                    ),
                ),
            });
        }
    }
    if let Some(name) = server {
        let serving = matches!(&h, Some(h) if h.role == HolderRole::Server);
        if !serving {
            out.push(Check::fail(
                format!("server {name}.{}", dir.alias),
                "this machine is a server in the cluster, but no `malai ssh server` runs here",
                "`systemctl start malai-ssh-server` (the Debian package's unit) or run `malai ssh server`",
            ));
        }
    }
    out
}

async fn relays(dir: &ClusterDir, cfg: Option<&ClusterConfig>) -> RelayChecks {
    let what = format!("relays {}", dir.alias);
    let net = match crate::session::own::net_config(cfg) {
        Ok(n) => n,
        Err(e) => {
            return RelayChecks::only(Check::fail(
                what,
                e.to_string(),
                "fix `relays`/`relay-ca` in the cluster file, or MALAI_RELAY / MALAI_RELAY_CA",
            ));
        }
    };
    if probe::relay_urls(&net).is_empty() {
        return RelayChecks::only(Check::pass(
            what,
            "disabled (MALAI_RELAY=disabled): peers are reached through `addrs` hints only",
        ));
    }
    let report = match probe::probe(&net).await {
        Ok(r) => r,
        Err(e) => {
            return RelayChecks::only(Check::fail(
                what,
                e.to_string(),
                "check MALAI_BIND and the relay settings",
            ));
        }
    };
    let mut out = vec![];
    for r in &report.relays {
        let what = format!("relay {}", r.url);
        out.push(match &r.problem {
            None => Check::pass(
                what,
                format!(
                    "reachable, {:.1} ms{}",
                    r.latency_ms.unwrap_or_default(),
                    if r.home { " (home relay)" } else { "" }
                ),
            ),
            Some(p) => Check::fail(what, p.to_string(), p.fix()),
        });
    }
    let d = &report.discovery;
    let what = format!("address discovery {}", dir.alias);
    let none_reachable = report.relays.iter().all(|r| r.problem.is_some());
    out.push(if none_reachable {
        Check::fail(
            what,
            "not tried: no relay is reachable",
            "fix the relay problems above first",
        )
    } else if d.answered {
        let public: Vec<String> = [d.public_v4, d.public_v6]
            .iter()
            .flatten()
            .map(|a| a.to_string())
            .collect();
        Check::pass(
            what,
            format!(
                "QUIC address discovery answers; public address {}",
                if public.is_empty() {
                    "unknown".to_string()
                } else {
                    public.join(", ")
                }
            ),
        )
    } else {
        Check::fail(
            what,
            "no QUIC address discovery answer from any relay: no hole punching, connections stay relayed",
            "open UDP 7842 to the relay and run it with enable_quic_addr_discovery = true",
        )
    });
    RelayChecks {
        checks: out,
        report: Some(report),
    }
}
