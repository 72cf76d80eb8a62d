//! Property tests of the ACL's invariants over randomly generated clusters:
//! - deny by default: a peer named nowhere is denied every request on every server;
//! - monotonic: adding a peer to an `allow-from` never takes any access away from anyone.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::{Decision, Request, decide};
use crate::config::{ClusterConfig, CommandAccess, Device, Server, Service, SshTarget};
use crate::id52::Id52;

fn id(n: u8) -> Id52 {
    Id52::from_bytes([n; 32])
}

/// Ids 1..=12 are members' and listable peers; 200 is never named anywhere.
const STRANGER: u8 = 200;
const MANAGER: u8 = 100;

/// One server: full-access peers, (command, peers), (service, port, peers).
type ServerShape = (Vec<u8>, Vec<(String, Vec<u8>)>, Vec<(String, u16, Vec<u8>)>);

#[derive(Debug, Clone)]
struct Shape {
    /// Per server: full-access peers, (command, peers), (service, port, peers).
    servers: Vec<ServerShape>,
    devices: u8,
}

fn peers() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(1u8..=12, 0..5)
}

fn shape() -> impl Strategy<Value = Shape> {
    let server = (
        peers(),
        prop::collection::vec(
            (prop::sample::select(vec!["ls", "uptime", "cat"]), peers()),
            0..3,
        ),
        prop::collection::vec(
            (
                prop::sample::select(vec!["web", "api"]),
                1u16..9000,
                peers(),
            ),
            0..3,
        ),
    )
        .prop_map(|(full, cmds, svcs)| {
            (
                full,
                cmds.into_iter().map(|(c, p)| (c.to_string(), p)).collect(),
                svcs.into_iter()
                    .map(|(s, port, p)| (s.to_string(), port, p))
                    .collect(),
            )
        });
    (prop::collection::vec(server, 1..4), 0u8..4)
        .prop_map(|(servers, devices)| Shape { servers, devices })
}

fn build(s: &Shape) -> ClusterConfig {
    let mut servers = BTreeMap::new();
    for (i, (full, cmds, svcs)) in s.servers.iter().enumerate() {
        let name = format!("s{i}");
        servers.insert(
            name.clone(),
            Server {
                name,
                id52: id(1 + i as u8),
                allow_from: full.iter().map(|n| id(*n)).collect(),
                ssh: SshTarget::Tcp("127.0.0.1:22".into()),
                addrs: vec![],
                commands: cmds
                    .iter()
                    .map(|(c, p)| {
                        (
                            c.clone(),
                            CommandAccess {
                                args: None,
                                command: c.clone(),
                                allow_from: p.iter().map(|n| id(*n)).collect(),
                            },
                        )
                    })
                    .collect(),
                services: svcs
                    .iter()
                    .map(|(n, port, p)| {
                        (
                            n.clone(),
                            Service {
                                name: n.clone(),
                                http_port: *port,
                                allow_from: p.iter().map(|n| id(*n)).collect(),
                            },
                        )
                    })
                    .collect(),
                ssh_via: None,
                ssh_identity_file: None,
                forwarding: true,
                session_keep: None,
            },
        );
    }
    let devices = (0..s.devices)
        .map(|i| {
            let name = format!("d{i}");
            (
                name.clone(),
                Device {
                    name,
                    id52: id(8 + i),
                },
            )
        })
        .collect();
    ClusterConfig {
        manager: id(MANAGER),
        alias: Some("acme".into()),
        use_keyring: true,
        private_key_file: None,
        private_key: None,
        servers,
        devices,
        groups: BTreeMap::new(),
        ..empty_config()
    }
}

/// Fields this test doesn't vary.
fn empty_config() -> ClusterConfig {
    ClusterConfig {
        manager: id(MANAGER),
        alias: None,
        use_keyring: true,
        private_key_file: None,
        private_key: None,
        servers: BTreeMap::new(),
        devices: BTreeMap::new(),
        groups: BTreeMap::new(),
        manager_addrs: vec![],
        relays: vec![],
        relay_ca: None,
    }
}

fn requests() -> Vec<Request<'static>> {
    vec![
        Request::Tunnel,
        Request::Exec { command: None },
        Request::Exec {
            command: Some("ls -la"),
        },
        Request::Exec {
            command: Some("uptime"),
        },
        Request::Exec {
            command: Some("cat /etc/passwd"),
        },
        Request::Exec {
            command: Some("sh -c id"),
        },
        Request::Http { service: "web" },
        Request::Http { service: "api" },
        Request::Http { service: "nope" },
        Request::ConfigPush,
        Request::ConfigHash,
        Request::Ping,
    ]
}

fn allowed(d: &Decision) -> bool {
    matches!(d, Decision::Allow(_))
}

proptest! {
    #[test]
    fn stranger_is_denied_everything(s in shape()) {
        let cfg = build(&s);
        for server in cfg.servers.keys().chain(std::iter::once(&"nosuch".to_string())) {
            for r in requests() {
                prop_assert!(!allowed(&decide(&cfg, server, &id(STRANGER), &r)),
                    "stranger allowed {r:?} on {server}");
            }
        }
    }

    #[test]
    fn adding_to_allow_from_never_removes_access(s in shape(), who in 1u8..=12, srv in 0usize..4, which in 0usize..3) {
        let before = build(&s);
        let mut grown = s.clone();
        let i = srv % grown.servers.len();
        match which {
            0 => grown.servers[i].0.push(who),
            1 => if let Some(c) = grown.servers[i].1.first_mut() { c.1.push(who) },
            _ => if let Some(v) = grown.servers[i].2.first_mut() { v.2.push(who) },
        }
        let after = build(&grown);
        for server in before.servers.keys() {
            for peer in (1u8..=12).chain([MANAGER, STRANGER]) {
                for r in requests() {
                    if allowed(&decide(&before, server, &id(peer), &r)) {
                        prop_assert!(allowed(&decide(&after, server, &id(peer), &r)),
                            "adding {who} removed {r:?} on {server} from {peer}");
                    }
                }
            }
        }
    }
}
