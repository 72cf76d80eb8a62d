//! Host names → what they name on this machine: a server, a service or a group of one of
//! the local clusters (the naming rules themselves are `config::names`, pure).

use super::SessionError;
use crate::config::paths::Dirs;
use crate::config::store::{ClusterDir, list_clusters};
use crate::config::{ClusterConfig, ResolveError, Server, names};
use crate::id52::Id52;

/// Every cluster on this machine that has a usable file, as `(folder alias, config)`.
/// Invalid files are skipped with a log line so one broken cluster doesn't break the others.
pub fn local_clusters(dirs: &Dirs) -> Result<Vec<(ClusterDir, ClusterConfig)>, SessionError> {
    let mut out = vec![];
    for dir in list_clusters(dirs)? {
        if !dir.has_file() {
            continue;
        }
        match dir.load() {
            Ok(cfg) => out.push((dir, cfg)),
            Err(e) => tracing::warn!(cluster = %dir.alias, error = %e, "skipping cluster"),
        }
    }
    Ok(out)
}

/// What a host name resolved to on this machine.
pub struct Resolved {
    pub dir: ClusterDir,
    pub config: ClusterConfig,
    pub target: names::Target,
}

impl Resolved {
    pub fn server(&self) -> Option<&Server> {
        let name = match &self.target.kind {
            names::TargetKind::Server { server } => server,
            names::TargetKind::Service { server, .. } => server,
            names::TargetKind::Group { .. } => return None,
        };
        self.config.servers.get(name)
    }
}

pub fn resolve(dirs: &Dirs, host: &str) -> Result<Resolved, SessionError> {
    let clusters = local_clusters(dirs)?;
    let pairs: Vec<(String, ClusterConfig)> = clusters
        .iter()
        .map(|(d, c)| (d.alias.clone(), c.clone()))
        .collect();
    let target = names::resolve(&pairs, host)?;
    let (dir, config) = clusters
        .into_iter()
        .find(|(d, _)| d.alias == target.cluster)
        .ok_or_else(|| ResolveError::Unknown(host.to_string()))?;
    Ok(Resolved {
        dir,
        config,
        target,
    })
}

/// This machine's id52 in a cluster (for error messages and `malai ssh id52`).
pub fn my_id52(dir: &ClusterDir) -> Result<Id52, SessionError> {
    Ok(crate::keys::id52(&dir.dir)?)
}
