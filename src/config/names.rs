//! Host names → a server, service or group in one of this machine's clusters (DESIGN §4).
//!
//! A name is `<what>.<cluster>`, where the cluster is named by its local folder alias, its
//! config `alias` or its manager id52, and `<what>` is `server`, `<server-id52>`,
//! `service.server`, a group, or `group:<group>`. Cluster aliases may contain dots
//! (`amitu.com`), so the longest suffix naming a local cluster wins. Without a cluster part a
//! name must be unique across the local clusters. Matching ignores case and a trailing dot,
//! as DNS does, because these names are typed where host names go (ssh, curl, git).

use super::ClusterConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    Server { server: String },
    Service { server: String, service: String },
    Group { group: String },
}

/// Names are the spellings from the cluster file, not the caller's, so they can index the
/// config's maps directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Folder alias of the local cluster the name resolved in.
    pub cluster: String,
    pub kind: TargetKind,
}

/// Why a host name does not name anything; each message is one line meant for the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// The name is not a host name at all (empty, or an empty label).
    #[error("unknown host {0:?}")]
    Unknown(String),
    #[error(
        "unknown host {0:?}: no clusters are set up on this machine (see `malai ssh cluster join`)"
    )]
    NoClusters(String),
    #[error("unknown cluster {cluster:?} in {host:?} (local clusters: {})", .known.join(", "))]
    UnknownCluster {
        host: String,
        cluster: String,
        known: Vec<String>,
    },
    #[error("cluster name {name:?} is ambiguous: it names the local clusters {}", .folders.join(", "))]
    AmbiguousCluster { name: String, folders: Vec<String> },
    #[error("unknown host {host:?}: no server {name:?} in cluster {cluster}")]
    NoServer {
        host: String,
        name: String,
        cluster: String,
    },
    #[error("unknown host {host:?}: no group {name:?} in cluster {cluster}")]
    NoGroup {
        host: String,
        name: String,
        cluster: String,
    },
    #[error("unknown host {host:?}: no server or group {name:?} in any local cluster ({})", .clusters.join(", "))]
    NotFound {
        host: String,
        name: String,
        clusters: Vec<String>,
    },
    #[error("unknown service {service:?} on {server}.{cluster}{}", known_services(.known))]
    UnknownService {
        service: String,
        server: String,
        cluster: String,
        known: Vec<String>,
    },
    #[error("{0} is a device, not a server")]
    Device(String),
    #[error("{host:?} is ambiguous: {}; add the cluster to the name", .candidates.join(", "))]
    Ambiguous {
        host: String,
        candidates: Vec<String>,
    },
    #[error("unknown host {host:?}: expected <server>.{cluster} or <service>.<server>.{cluster}")]
    TooManyLabels { host: String, cluster: String },
}

fn known_services(known: &[String]) -> String {
    if known.is_empty() {
        " (it has no services)".to_string()
    } else {
        format!(" (services: {})", known.join(", "))
    }
}

/// Resolves `host` against the local clusters, given as (folder alias, config) pairs.
pub fn resolve(clusters: &[(String, ClusterConfig)], host: &str) -> Result<Target, ResolveError> {
    let original = host;
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let (group_only, rest) = match host.strip_prefix("group:") {
        Some(rest) => (true, rest),
        None => (false, host.as_str()),
    };
    let labels: Vec<&str> = rest.split('.').collect();
    if rest.is_empty() || labels.iter().any(|l| l.is_empty()) {
        return Err(ResolveError::Unknown(original.to_string()));
    }
    if clusters.is_empty() {
        return Err(ResolveError::NoClusters(original.to_string()));
    }

    // Longest cluster suffix first: labels[k..] for k = 1, 2, …
    for k in 1..labels.len() {
        let suffix = labels.get(k..).unwrap_or_default().join(".");
        let matching: Vec<&(String, ClusterConfig)> = clusters
            .iter()
            .filter(|(folder, cfg)| names_cluster(folder, cfg, &suffix))
            .collect();
        match matching.as_slice() {
            [] => continue,
            [(folder, cfg)] => {
                let prefix = labels.get(..k).unwrap_or_default();
                return in_cluster(folder, cfg, prefix, group_only, original);
            }
            many => {
                return Err(ResolveError::AmbiguousCluster {
                    name: suffix,
                    folders: many.iter().map(|(f, _)| f.clone()).collect(),
                });
            }
        }
    }

    match labels.as_slice() {
        [name] => bare(clusters, name, group_only, original),
        [_, rest @ ..] => {
            // Report the part the user most likely meant as the cluster: after a known server
            // name (`django.foo.<typo>`) or else after the first label (`foo.<typo>`).
            let skip = match rest {
                [second, _, ..]
                    if clusters
                        .iter()
                        .any(|(_, c)| find_server(c, second).is_some()) =>
                {
                    2
                }
                _ => 1,
            };
            Err(ResolveError::UnknownCluster {
                host: original.to_string(),
                cluster: labels.get(skip..).unwrap_or_default().join("."),
                known: clusters.iter().map(|(f, _)| f.clone()).collect(),
            })
        }
        [] => Err(ResolveError::Unknown(original.to_string())),
    }
}

/// `name` is already lowercase.
fn names_cluster(folder: &str, cfg: &ClusterConfig, name: &str) -> bool {
    folder.eq_ignore_ascii_case(name)
        || cfg
            .alias
            .as_deref()
            .is_some_and(|a| a.eq_ignore_ascii_case(name))
        || cfg.manager.to_string() == name
}

/// The server named `label` (by name or id52), as spelled in the file.
fn find_server<'c>(cfg: &'c ClusterConfig, label: &str) -> Option<&'c str> {
    cfg.servers
        .values()
        .find(|s| s.name.eq_ignore_ascii_case(label) || s.id52.to_string() == label)
        .map(|s| s.name.as_str())
}

fn find_group<'c>(cfg: &'c ClusterConfig, label: &str) -> Option<&'c str> {
    cfg.groups
        .keys()
        .find(|g| g.eq_ignore_ascii_case(label))
        .map(String::as_str)
}

fn is_device(cfg: &ClusterConfig, label: &str) -> bool {
    cfg.devices
        .values()
        .any(|d| d.name.eq_ignore_ascii_case(label) || d.id52.to_string() == label)
}

/// What one label names inside one cluster, if anything a request can go to.
fn find_target(cfg: &ClusterConfig, label: &str, group_only: bool) -> Option<TargetKind> {
    if !group_only && let Some(server) = find_server(cfg, label) {
        return Some(TargetKind::Server {
            server: server.to_string(),
        });
    }
    find_group(cfg, label).map(|g| TargetKind::Group {
        group: g.to_string(),
    })
}

fn in_cluster(
    folder: &str,
    cfg: &ClusterConfig,
    prefix: &[&str],
    group_only: bool,
    host: &str,
) -> Result<Target, ResolveError> {
    let target = |kind| {
        Ok(Target {
            cluster: folder.to_string(),
            kind,
        })
    };
    match prefix {
        [label] => {
            if let Some(kind) = find_target(cfg, label, group_only) {
                return target(kind);
            }
            if group_only {
                return Err(ResolveError::NoGroup {
                    host: host.to_string(),
                    name: label.to_string(),
                    cluster: folder.to_string(),
                });
            }
            if is_device(cfg, label) {
                return Err(ResolveError::Device(label.to_string()));
            }
            Err(ResolveError::NoServer {
                host: host.to_string(),
                name: label.to_string(),
                cluster: folder.to_string(),
            })
        }
        [service, label] if !group_only => {
            let Some(server) = cfg
                .servers
                .values()
                .find(|s| s.name.eq_ignore_ascii_case(label) || s.id52.to_string() == *label)
            else {
                if is_device(cfg, label) {
                    return Err(ResolveError::Device(label.to_string()));
                }
                return Err(ResolveError::NoServer {
                    host: host.to_string(),
                    name: label.to_string(),
                    cluster: folder.to_string(),
                });
            };
            match server
                .services
                .keys()
                .find(|s| s.eq_ignore_ascii_case(service))
            {
                Some(svc) => target(TargetKind::Service {
                    server: server.name.clone(),
                    service: svc.clone(),
                }),
                None => Err(ResolveError::UnknownService {
                    service: service.to_string(),
                    server: server.name.clone(),
                    cluster: folder.to_string(),
                    known: server.services.keys().cloned().collect(),
                }),
            }
        }
        _ => Err(ResolveError::TooManyLabels {
            host: host.to_string(),
            cluster: folder.to_string(),
        }),
    }
}

/// A name without a cluster part: it must name something in exactly one local cluster.
fn bare(
    clusters: &[(String, ClusterConfig)],
    label: &str,
    group_only: bool,
    host: &str,
) -> Result<Target, ResolveError> {
    let found: Vec<Target> = clusters
        .iter()
        .filter_map(|(folder, cfg)| {
            find_target(cfg, label, group_only).map(|kind| Target {
                cluster: folder.clone(),
                kind,
            })
        })
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => {
            if !group_only && clusters.iter().any(|(_, c)| is_device(c, label)) {
                return Err(ResolveError::Device(label.to_string()));
            }
            Err(ResolveError::NotFound {
                host: host.to_string(),
                name: label.to_string(),
                clusters: clusters.iter().map(|(f, _)| f.clone()).collect(),
            })
        }
        many => Err(ResolveError::Ambiguous {
            host: host.to_string(),
            candidates: many
                .iter()
                .map(|t| {
                    let prefix = if group_only { "group:" } else { "" };
                    format!("{prefix}{label}.{}", t.cluster)
                })
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id52::Id52;

    fn id(n: u8) -> Id52 {
        Id52::from_bytes([n; 32])
    }

    /// Cluster "acme" (alias amitu.com, manager id(1)): servers foo (id 2, service django) and
    /// bar (id 3), device alice (id 4), group admins. Cluster "other" (no alias, manager
    /// id(10)): server foo (id 11), server solo (id 12), group admins.
    fn clusters() -> Vec<(String, ClusterConfig)> {
        let acme = format!(
            "[cluster-manager]\nid52 = \"{}\"\nalias = \"amitu.com\"\n\
             [server.foo]\nid52 = \"{}\"\n[server.foo.service.django]\nhttp = 8000\n\
             [server.bar]\nid52 = \"{}\"\n[device.alice]\nid52 = \"{}\"\n\
             [group.admins]\nmembers = \"alice\"\n[group.only-acme]\nmembers = \"bar\"\n",
            id(1),
            id(2),
            id(3),
            id(4)
        );
        let other = format!(
            "[cluster-manager]\nid52 = \"{}\"\n[server.foo]\nid52 = \"{}\"\n\
             [server.Solo]\nid52 = \"{}\"\n[group.admins]\nmembers = \"foo\"\n",
            id(10),
            id(11),
            id(12)
        );
        vec![
            ("acme".to_string(), ClusterConfig::parse(&acme).unwrap()),
            ("other".to_string(), ClusterConfig::parse(&other).unwrap()),
        ]
    }

    fn server(cluster: &str, server: &str) -> Target {
        Target {
            cluster: cluster.into(),
            kind: TargetKind::Server {
                server: server.into(),
            },
        }
    }

    fn group(cluster: &str, group: &str) -> Target {
        Target {
            cluster: cluster.into(),
            kind: TargetKind::Group {
                group: group.into(),
            },
        }
    }

    fn django() -> Target {
        Target {
            cluster: "acme".into(),
            kind: TargetKind::Service {
                server: "foo".into(),
                service: "django".into(),
            },
        }
    }

    fn ok(host: &str) -> Target {
        resolve(&clusters(), host).unwrap_or_else(|e| panic!("{host}: {e}"))
    }

    fn err(host: &str) -> String {
        match resolve(&clusters(), host) {
            Ok(t) => panic!("{host}: expected an error, got {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn server_forms() {
        let m = id(1);
        for host in [
            "foo.acme".to_string(),
            "foo.amitu.com".to_string(),
            "FOO.Amitu.COM.".to_string(),
            format!("foo.{m}"),
            format!("{}.{m}", id(2)),
            format!("{}.amitu.com", id(2)),
        ] {
            assert_eq!(ok(&host), server("acme", "foo"), "{host}");
        }
        assert_eq!(ok("foo.other"), server("other", "foo"));
        assert_eq!(ok(&format!("foo.{}", id(10))), server("other", "foo"));
        // The file's spelling is returned, whatever the caller typed.
        assert_eq!(ok("solo.other"), server("other", "Solo"));
    }

    #[test]
    fn service_forms() {
        assert_eq!(ok("django.foo.amitu.com"), django());
        assert_eq!(ok("django.foo.acme"), django());
        assert_eq!(ok(&format!("django.foo.{}", id(1))), django());
        assert_eq!(ok(&format!("django.{}.{}", id(2), id(1))), django());
        assert_eq!(ok(&format!("Django.{}.amitu.com.", id(2))), django());
    }

    #[test]
    fn group_forms() {
        assert_eq!(ok("admins.acme"), group("acme", "admins"));
        assert_eq!(ok("group:admins.amitu.com"), group("acme", "admins"));
        assert_eq!(ok("group:only-acme"), group("acme", "only-acme"));
        assert_eq!(ok("only-acme"), group("acme", "only-acme"));
        let e = err("group:admins");
        assert_eq!(
            e,
            "\"group:admins\" is ambiguous: group:admins.acme, group:admins.other; add the cluster to the name"
        );
        // group: never picks a server of that name.
        let e = err("group:foo.acme");
        assert_eq!(
            e,
            "unknown host \"group:foo.acme\": no group \"foo\" in cluster acme"
        );
    }

    #[test]
    fn bare_names() {
        assert_eq!(ok("bar"), server("acme", "bar"));
        assert_eq!(ok("solo"), server("other", "Solo"));
        assert_eq!(ok(&id(2).to_string()), server("acme", "foo"));
        assert_eq!(ok(&id(11).to_string()), server("other", "foo"));
        assert_eq!(
            err("foo"),
            "\"foo\" is ambiguous: foo.acme, foo.other; add the cluster to the name"
        );
        assert_eq!(
            err("nope"),
            "unknown host \"nope\": no server or group \"nope\" in any local cluster (acme, other)"
        );
    }

    #[test]
    fn bare_name_in_single_cluster() {
        let one: Vec<_> = clusters().into_iter().take(1).collect();
        assert_eq!(resolve(&one, "foo").unwrap(), server("acme", "foo"));
    }

    #[test]
    fn devices_are_not_targets() {
        assert_eq!(err("alice.acme"), "alice is a device, not a server");
        assert_eq!(err("alice"), "alice is a device, not a server");
        assert_eq!(
            err(&format!("{}.acme", id(4))),
            format!("{} is a device, not a server", id(4))
        );
        assert_eq!(err("django.alice.acme"), "alice is a device, not a server");
    }

    #[test]
    fn unknown_cluster() {
        assert_eq!(
            err("foo.acne"),
            "unknown cluster \"acne\" in \"foo.acne\" (local clusters: acme, other)"
        );
        assert_eq!(
            err("foo.amitu.org"),
            "unknown cluster \"amitu.org\" in \"foo.amitu.org\" (local clusters: acme, other)"
        );
        assert_eq!(
            err("django.foo.acne"),
            "unknown cluster \"acne\" in \"django.foo.acne\" (local clusters: acme, other)"
        );
    }

    #[test]
    fn unknown_server_and_service() {
        assert_eq!(
            err("baz.acme"),
            "unknown host \"baz.acme\": no server \"baz\" in cluster acme"
        );
        assert_eq!(
            err("django.baz.acme"),
            "unknown host \"django.baz.acme\": no server \"baz\" in cluster acme"
        );
        assert_eq!(
            err("flask.foo.acme"),
            "unknown service \"flask\" on foo.acme (services: django)"
        );
        assert_eq!(
            err("flask.bar.amitu.com"),
            "unknown service \"flask\" on bar.acme (it has no services)"
        );
        assert_eq!(
            err("a.django.foo.acme"),
            "unknown host \"a.django.foo.acme\": expected <server>.acme or <service>.<server>.acme"
        );
    }

    #[test]
    fn malformed() {
        assert_eq!(err(""), "unknown host \"\"");
        assert_eq!(err("."), "unknown host \".\"");
        assert_eq!(err("foo..acme"), "unknown host \"foo..acme\"");
        assert_eq!(err("group:"), "unknown host \"group:\"");
        assert!(
            resolve(&[], "foo")
                .unwrap_err()
                .to_string()
                .contains("no clusters")
        );
    }

    #[test]
    fn longest_cluster_suffix_wins() {
        // A local cluster folder named "com" must not shadow "amitu.com".
        let mut cs = clusters();
        let com = format!(
            "[cluster-manager]\nid52 = \"{}\"\n[server.amitu]\nid52 = \"{}\"\n",
            id(20),
            id(21)
        );
        cs.push(("com".into(), ClusterConfig::parse(&com).unwrap()));
        assert_eq!(
            resolve(&cs, "foo.amitu.com").unwrap(),
            server("acme", "foo")
        );
        assert_eq!(resolve(&cs, "amitu.com").unwrap(), server("com", "amitu"));
    }

    #[test]
    fn never_panics() {
        let cs = clusters();
        let alphabet = b"ab.fo:gr-uACME.0123\xc3\xa9 ";
        let mut st = 0x9E37_79B9_7F4A_7C15u64;
        for _ in 0..2000 {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            let n = (st % 24) as usize;
            let bytes: Vec<u8> = (0..n)
                .map(|i| alphabet[((st >> (i % 60)) as usize) % alphabet.len()])
                .collect();
            let _ = resolve(&cs, &String::from_utf8_lossy(&bytes));
        }
        for h in ["group:.", "group:group:x", "...", "a.", "é.acme", ":"] {
            let _ = resolve(&cs, h);
        }
    }

    #[test]
    fn cluster_name_shared_by_two_clusters() {
        let mut cs = clusters();
        let dup = format!(
            "[cluster-manager]\nid52 = \"{}\"\nalias = \"acme\"\n[server.foo]\nid52 = \"{}\"\n",
            id(30),
            id(31)
        );
        cs.push(("x".into(), ClusterConfig::parse(&dup).unwrap()));
        assert_eq!(
            resolve(&cs, "foo.acme").unwrap_err().to_string(),
            "cluster name \"acme\" is ambiguous: it names the local clusters acme, x"
        );
    }
}
