//! A cluster endpoint of this process's own: the network settings a cluster's endpoint is
//! bound with, and the endpoint a CLI command binds for its own length when no server or
//! agent holds the key (a shared claim, `control::lock`), shared by every request of the
//! process (a group's members run at once on one endpoint, never one each).

use crate::config::ClusterConfig;
use crate::config::store::ClusterDir;
use crate::control::lock::Claim;
use crate::transport::iroh::{NetConfig, Node, TransportError};

/// The network settings of a cluster: its file's `relays`/`relay-ca` with the environment's
/// overrides. A member that joined but has no file yet uses iroh's defaults (or the env).
pub fn net_config(cfg: Option<&ClusterConfig>) -> Result<NetConfig, TransportError> {
    match cfg {
        Some(c) => NetConfig::for_cluster(&c.relays, c.relay_ca.as_deref()),
        None => NetConfig::for_cluster(&[], None),
    }
}

/// [`net_config`] of the file in `dir`, if it has a valid one.
pub fn net_config_of(dir: &ClusterDir) -> Result<NetConfig, TransportError> {
    let cfg = if dir.has_file() {
        dir.load().ok()
    } else {
        None
    };
    net_config(cfg.as_ref())
}

/// A cluster endpoint a CLI command bound itself, shared by every request of this
/// process (a group's members run at once on one endpoint, never one each).
pub struct OwnEndpoint {
    pub node: Node,
    alias: String,
    _claim: Claim,
}

impl OwnEndpoint {
    /// The endpoint this process already bound for `alias`, if any.
    pub fn existing(alias: &str) -> Option<std::sync::Arc<OwnEndpoint>> {
        own_endpoints().get(alias).cloned()
    }

    /// Bind `dir`'s key under `claim` (a shared one) and remember it for this process.
    pub async fn bind(
        dir: &ClusterDir,
        cfg: Option<&ClusterConfig>,
        mut claim: Claim,
    ) -> Result<std::sync::Arc<OwnEndpoint>, super::SessionError> {
        let node = bind_key(dir, cfg).await?;
        // Bound: a server or agent starting from now on takes the key for new commands.
        claim.bound();
        let own = std::sync::Arc::new(OwnEndpoint {
            node,
            alias: dir.alias.clone(),
            _claim: claim,
        });
        own_endpoints().insert(dir.alias.clone(), own.clone());
        Ok(own)
    }
}

type OwnMap = std::collections::HashMap<String, std::sync::Arc<OwnEndpoint>>;

fn own_endpoints() -> std::sync::MutexGuard<'static, OwnMap> {
    static OWN: std::sync::OnceLock<std::sync::Mutex<OwnMap>> = std::sync::OnceLock::new();
    OWN.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Bind `dir`'s key on an endpoint that dials out (a command's own, the agent's): the
/// cluster's relays and CA, an ephemeral port. The caller holds the claim (`control::lock`).
/// The server binds its own way (a fixed or remembered port, accepting).
pub async fn bind_key(
    dir: &ClusterDir,
    cfg: Option<&ClusterConfig>,
) -> Result<Node, super::SessionError> {
    let key = crate::keys::load(&dir.dir)?;
    let net = net_config(cfg)?;
    Ok(Node::bind(&key, &net, None, false).await?)
}

/// Close every endpoint this process bound, at once (a signal ended the command, maybe
/// while a request was still opening): the peers hear the connections close now, so a
/// remote command started for us is hung up at once instead of at the idle limit.
pub async fn close_all(limit: std::time::Duration) {
    let all: Vec<std::sync::Arc<OwnEndpoint>> = own_endpoints().drain().map(|(_, o)| o).collect();
    for own in all {
        own.node.close_within(limit).await;
    }
}

impl OwnEndpoint {
    /// Done with it: the last user closes the endpoint (waiting at most `limit` for the
    /// peers' acknowledgements) and releases the claim.
    pub async fn done(self: std::sync::Arc<Self>, limit: std::time::Duration) {
        let last = {
            let mut own = own_endpoints();
            // Ours and the map's: nobody else uses it.
            if std::sync::Arc::strong_count(&self) <= 2 {
                own.remove(&self.alias);
                true
            } else {
                false
            }
        };
        if last {
            self.node.close_within(limit).await;
        }
    }
}
