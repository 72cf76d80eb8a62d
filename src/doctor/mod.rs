//! `malai ssh doctor [host]`: one report that answers "why can't I connect?", a line per
//! check, each passed (✔) or failed (✘) with the reason and the fix — like
//! `tailscale netcheck` or `tsh status`.
//!
//! Checks, in the order a connection needs them: local files and permissions (DATADIR,
//! the runtime dir, key files); each cluster this machine is in and its role there; who
//! holds each cluster key and whether that process answers; each relay in use (reachable,
//! TLS named on failure, latency) and QUIC address discovery (this machine's public
//! address as the relays see it); and for a host: the name, the dial (direct or relayed,
//! how long), the server's ACL answer, and whether the server reaches its sshd.
//!
//! Doctor only looks: it changes no setting and no file of the cluster. The relay probe
//! binds a throwaway key (never a cluster's: one endpoint per id52 per machine); the host
//! check reaches the server exactly as `malai ssh proxy` would (through the key's holder,
//! else binding the key for its own length). Exit status 0 only when every check passed.
//!
//! - [`local`]: DATADIR, the runtime dir, key files, `MALAI_SSH_AGENT`.
//! - [`cluster`]: each cluster: role, key holder, relays and address discovery.
//! - [`host`]: one host: name, dial, the server's ACL answer, its sshd.

mod cluster;
mod host;
mod local;

use std::path::Path;
use std::time::Duration;

use crate::config::paths::Dirs;

/// How long a key holder may take to answer its status.
const HOLDER_TIMEOUT: Duration = Duration::from_secs(3);

/// One line of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What was checked (`cluster acme`, `relay https://…`, `dial foo.acme`).
    pub check: String,
    pub ok: bool,
    /// What was found, or why it failed.
    pub detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    pub(crate) fn pass(check: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    pub(crate) fn fail(
        check: impl Into<String>,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            check: check.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// The whole report (`--json` prints it as is).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Every check passed.
    pub ok: bool,
    pub checks: Vec<Check>,
}

/// Run every check (and the host's, when one is given).
pub async fn run(dirs: &Dirs, host: Option<&str>) -> Report {
    let mut checks = local::files(dirs);
    checks.extend(local::agent_env().await);
    let mut relays: Vec<host::ClusterRelays> = vec![];
    match crate::config::store::list_clusters(dirs) {
        Ok(list) if list.is_empty() => checks.push(Check::fail(
            "clusters",
            "this machine is in no cluster",
            "`malai ssh cluster init <alias>` (a new cluster) or `malai ssh cluster join <alias> <manager-id52>`",
        )),
        Ok(list) => {
            for dir in &list {
                let found = cluster::checks(dir).await;
                checks.extend(found.checks);
                if let Some(r) = found.relays {
                    relays.push(host::ClusterRelays {
                        alias: dir.alias.clone(),
                        report: r,
                    });
                }
            }
        }
        Err(e) => checks.push(Check::fail(
            "clusters",
            e.to_string(),
            "fix the permissions of DATADIR",
        )),
    }
    if let Some(host) = host {
        checks.extend(host::checks(dirs, host, &relays).await);
    }
    Report {
        ok: checks.iter().all(|c| c.ok),
        checks,
    }
}

/// The report as text: a line per check, the fix indented under a failure.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for c in &report.checks {
        let mark = if c.ok { '✔' } else { '✘' };
        out.push_str(&format!("{mark} {}: {}\n", c.check, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("    fix: {fix}\n"));
        }
    }
    let failed = report.checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        out.push_str(&format!("all {} checks passed\n", report.checks.len()));
    } else {
        out.push_str(&format!(
            "{failed} of {} checks failed\n",
            report.checks.len()
        ));
    }
    out
}

/// A key holder's status over its control socket, bounded by [`HOLDER_TIMEOUT`].
async fn holder_status(socket: &Path) -> Result<crate::control::protocol::HolderStatus, String> {
    let ask = async {
        let client = crate::control::client::ControlClient::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        client.status().await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(HOLDER_TIMEOUT, ask).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} s", HOLDER_TIMEOUT.as_secs())),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_marks_each_check_and_counts_failures() {
        let report = Report {
            ok: false,
            checks: vec![
                Check::pass("DATADIR", "/x (mode 700)"),
                Check::fail("relay https://r", "untrusted certificate", "add relay-ca"),
            ],
        };
        let text = render(&report);
        assert!(text.contains("✔ DATADIR: /x (mode 700)\n"), "{text}");
        assert!(
            text.contains("✘ relay https://r: untrusted certificate\n    fix: add relay-ca\n"),
            "{text}"
        );
        assert!(text.ends_with("1 of 2 checks failed\n"), "{text}");
    }
}
