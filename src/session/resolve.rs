//! Host names → what they name on this machine: a server, a service or a group of one of
//! the local clusters (the naming rules themselves are `config::names`, pure).

use super::SessionError;
use crate::config::paths::Dirs;
use crate::config::store::{ClusterDir, list_clusters};
use crate::config::{ClusterConfig, ResolveError, Server, names};
use crate::id52::Id52;

/// Every cluster on this machine that has a usable file: what host names are resolved
/// against (commands, the agent's HTTP proxy, `known-hosts`). Invalid files are skipped with
/// a log line so one broken cluster doesn't break the others.
pub struct LocalClusters {
    clusters: Vec<(ClusterDir, ClusterConfig)>,
    /// `(folder alias, config)`, the form `config::names` resolves against.
    names: Vec<(String, ClusterConfig)>,
}

impl LocalClusters {
    pub fn load(dirs: &Dirs) -> Result<LocalClusters, SessionError> {
        let mut clusters = vec![];
        for dir in list_clusters(dirs)? {
            if !dir.has_file() {
                continue;
            }
            match dir.load() {
                Ok(cfg) => clusters.push((dir, cfg)),
                Err(e) => tracing::warn!(cluster = %dir.alias, error = %e, "skipping cluster"),
            }
        }
        let names = clusters
            .iter()
            .map(|(d, c)| (d.alias.clone(), c.clone()))
            .collect();
        Ok(LocalClusters { clusters, names })
    }

    /// The clusters as `(folder alias, config)`, for `config::names`.
    pub fn names(&self) -> &[(String, ClusterConfig)] {
        &self.names
    }

    /// Every cluster's folder and file.
    pub fn iter(&self) -> impl Iterator<Item = (&ClusterDir, &ClusterConfig)> {
        self.clusters.iter().map(|(d, c)| (d, c))
    }

    /// What `target` (a name resolved against [`LocalClusters::names`]) is here.
    pub fn resolved(&self, target: &names::Target) -> Option<Resolved> {
        self.clusters
            .iter()
            .find(|(d, _)| d.alias == target.cluster)
            .map(|(dir, config)| Resolved {
                dir: dir.clone(),
                config: config.clone(),
                target: target.clone(),
            })
    }

    pub fn resolve(&self, host: &str) -> Result<Resolved, SessionError> {
        let target = names::resolve(&self.names, host)?;
        Ok(self
            .resolved(&target)
            .ok_or_else(|| ResolveError::Unknown(host.to_string()))?)
    }
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

/// Resolve `host` against this machine's clusters.
pub fn resolve(dirs: &Dirs, host: &str) -> Result<Resolved, SessionError> {
    LocalClusters::load(dirs)?.resolve(host)
}

/// This machine's id52 in a cluster (for error messages and `malai ssh id52`).
pub fn my_id52(dir: &ClusterDir) -> Result<Id52, SessionError> {
    Ok(crate::keys::id52(&dir.dir)?)
}
