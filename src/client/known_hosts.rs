//! `malai ssh known-hosts`: `known_hosts` lines for the servers that use the embedded SSH
//! server, so users can keep `StrictHostKeyChecking yes` through the ProxyCommand.
//!
//! The embedded server's host key is the server's cluster key, whose public half is its
//! id52: the lines come from the cluster file alone, no secret and no network needed.
//! Every name a user may type for the server is listed (ssh matches the name as typed):
//! `foo.<cluster alias>`, `foo.<config alias>`, `foo.<manager id52>`,
//! `<foo id52>.<cluster…>`, and a bare `foo` when it is unambiguous on this machine. A name
//! is listed only if it really resolves to that server here. Servers tunnelled to sshd are
//! left out: sshd has its own host key.

use crate::config::SshTarget;
use crate::config::names::{self, TargetKind};
use crate::config::paths::Dirs;
use crate::server::embedded::known_hosts_line;
use crate::session::{LocalClusters, SessionError};

/// All lines, one per embedded-SSH server per cluster, sorted for stable output.
pub fn lines(dirs: &Dirs) -> Result<Vec<String>, SessionError> {
    let clusters = LocalClusters::load(dirs)?;
    let mut out = vec![];
    for (dir, cfg) in clusters.iter() {
        let mut cluster_names = vec![dir.alias.clone()];
        if let Some(a) = &cfg.alias {
            cluster_names.push(a.clone());
        }
        cluster_names.push(cfg.manager.to_string());
        cluster_names.dedup();
        for server in cfg.servers.values() {
            if server.ssh != SshTarget::Embedded {
                continue;
            }
            let mut candidates = vec![server.name.clone()];
            for c in &cluster_names {
                candidates.push(format!("{}.{c}", server.name));
                candidates.push(format!("{}.{c}", server.id52));
            }
            let mut names_ok: Vec<String> = vec![];
            for n in candidates {
                let n = n.to_lowercase();
                let means_it = matches!(
                    names::resolve(clusters.names(), &n),
                    Ok(t) if t.cluster == dir.alias
                        && t.kind == TargetKind::Server { server: server.name.clone() }
                );
                if means_it && !names_ok.contains(&n) {
                    names_ok.push(n);
                }
            }
            if !names_ok.is_empty() {
                out.push(known_hosts_line(&names_ok, &server.id52));
            }
        }
    }
    out.sort();
    Ok(out)
}
