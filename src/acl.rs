//! The ACL. (Stub with the final signatures: being written.)

use crate::config::ClusterConfig;
use crate::id52::Id52;

pub enum Request<'a> {
    Tunnel,
    Exec { command: Option<&'a str> },
    Http { service: &'a str },
    ConfigPush,
    ConfigHash,
    Ping,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Grant {
    Tunnel,
    Shell,
    Argv(Vec<String>),
    Http { port: u16 },
    ConfigPush,
    ConfigHash,
    Ping,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DenyReason {
    #[error("permission denied for {0}")]
    NotAllowed(Id52),
}

pub enum Decision {
    Allow(Grant),
    Deny(DenyReason),
}

pub fn decide(config: &ClusterConfig, server: &str, peer: &Id52, req: &Request) -> Decision {
    let Some(s) = config.servers.get(server) else {
        return Decision::Deny(DenyReason::NotAllowed(*peer));
    };
    match req {
        Request::Tunnel if s.allow_from.contains(peer) => Decision::Allow(Grant::Tunnel),
        _ => Decision::Deny(DenyReason::NotAllowed(*peer)),
    }
}
