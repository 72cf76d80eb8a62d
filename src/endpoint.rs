//! Who binds a cluster's key on this machine, and with which network settings.
//!
//! iroh lets one endpoint hold an EndpointId at a time (its relay delivers to the newest),
//! so DESIGN §8 makes it a rule: **one endpoint per id52 per machine**. This module is the
//! one place that binds a cluster key; everything that needs to reach the cluster (server,
//! agent, CLI commands) asks it.

use crate::config::ClusterConfig;
use crate::config::store::ClusterDir;
use crate::transport::iroh::{NetConfig, TransportError};

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
