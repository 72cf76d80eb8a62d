//! Second phase of parsing: the raw tables of [`super::tables`] checked against each other
//! and resolved. Names share one case-insensitive namespace, member ids are unique, groups
//! expand (cycle- and depth-checked) to machine names, and every `allow-from` becomes id52s.

use std::collections::{BTreeMap, BTreeSet};

use super::error::ConfigError;
use super::tables::{RawDocument, RawGroup, RawList, RawServer};
use super::{ClusterConfig, CommandAccess, Group, Server, Service};
use crate::id52::Id52;

/// Deeper group nesting than this is refused: no real cluster needs it, and the bound keeps
/// expansion from exhausting the stack on a hostile file.
const MAX_GROUP_DEPTH: usize = 32;

#[derive(Clone, Copy, PartialEq, Eq)]
enum NameKind {
    Server,
    Device,
    Group,
}

/// What a (lowercased) name refers to: its kind and its spelling in the file.
struct NameEntry {
    kind: NameKind,
    name: String,
}

/// Every server, device and group name, lowercased, in one namespace.
type Names = BTreeMap<String, NameEntry>;

/// Each group (lowercased name) with its members expanded to machine names.
type Expanded = BTreeMap<String, BTreeSet<String>>;

/// Resolves the whole document: names, then ids, then groups, then lists; the first error
/// found is the one reported.
pub(super) fn resolve(raw: RawDocument) -> Result<ClusterConfig, ConfigError> {
    let names = claim_names(&raw)?;
    check_unique_ids(&raw)?;
    let expanded = expand_groups(&raw.groups, &names)?;
    let ids = member_ids(&raw);
    let resolver = Resolver {
        names: &names,
        groups: &expanded,
        ids: &ids,
    };
    let mut servers = BTreeMap::new();
    for s in raw.servers {
        let server = resolve_server(s, &resolver)?;
        servers.insert(server.name.clone(), server);
    }
    let groups = raw
        .groups
        .iter()
        .map(|g| {
            let members = expanded
                .get(&g.name.to_ascii_lowercase())
                .map(|m| m.iter().cloned().collect())
                .unwrap_or_default();
            let group = Group {
                name: g.name.clone(),
                members,
            };
            (g.name.clone(), group)
        })
        .collect();
    let m = raw.manager;
    Ok(ClusterConfig {
        manager: m.id,
        alias: m.alias,
        use_keyring: m.use_keyring,
        private_key_file: m.private_key_file,
        private_key: m.private_key,
        manager_addrs: m.addrs,
        relays: m.relays,
        relay_ca: m.relay_ca,
        servers,
        devices: raw
            .devices
            .into_iter()
            .map(|d| (d.device.name.clone(), d.device))
            .collect(),
        groups,
    })
}

/// One namespace for servers, devices and groups, compared without regard to case because
/// host names are: a name used twice is refused, naming both tables.
fn claim_names(raw: &RawDocument) -> Result<Names, ConfigError> {
    let mut names = Names::new();
    let mut claim = |name: &str, kind: NameKind, line: Option<usize>| {
        let table = |kind: NameKind, name: &str| match kind {
            NameKind::Server => format!("server.{name}"),
            NameKind::Device => format!("device.{name}"),
            NameKind::Group => format!("group.{name}"),
        };
        let lower = name.to_ascii_lowercase();
        if let Some(prev) = names.get(&lower) {
            return Err(ConfigError::DuplicateName {
                name: name.to_string(),
                first: table(prev.kind, &prev.name),
                second: table(kind, name),
                line,
            });
        }
        names.insert(
            lower,
            NameEntry {
                kind,
                name: name.to_string(),
            },
        );
        Ok(())
    };
    for s in &raw.servers {
        claim(&s.server.name, NameKind::Server, s.line)?;
    }
    for d in &raw.devices {
        claim(&d.device.name, NameKind::Device, d.line)?;
    }
    for g in &raw.groups {
        claim(&g.name, NameKind::Group, g.line)?;
    }
    Ok(names)
}

/// A member id52 as the duplicate check sees it: which table holds it, and where.
struct MemberId {
    id: Id52,
    table: String,
    line: Option<usize>,
}

/// No two members share an id52. The manager's id52 may also be a member (the manager
/// machine can be a server of its own cluster), so only members are checked against each
/// other.
fn check_unique_ids(raw: &RawDocument) -> Result<(), ConfigError> {
    let servers = raw.servers.iter().map(|s| MemberId {
        id: s.server.id52,
        table: format!("server.{}", s.server.name),
        line: s.line,
    });
    let devices = raw.devices.iter().map(|d| MemberId {
        id: d.device.id52,
        table: format!("device.{}", d.device.name),
        line: d.line,
    });
    let mut seen: BTreeMap<Id52, String> = BTreeMap::new();
    for m in servers.chain(devices) {
        if let Some(first) = seen.get(&m.id) {
            return Err(ConfigError::DuplicateId52 {
                id52: m.id.to_string(),
                first: first.clone(),
                second: m.table,
                line: m.line,
            });
        }
        seen.insert(m.id, m.table);
    }
    Ok(())
}

/// Every group expanded to machine names (see [`expand_group`]).
fn expand_groups(groups: &[RawGroup], names: &Names) -> Result<Expanded, ConfigError> {
    let raw_groups: BTreeMap<String, &RawGroup> = groups
        .iter()
        .map(|g| (g.name.to_ascii_lowercase(), g))
        .collect();
    let mut expanded = Expanded::new();
    for g in groups {
        let mut stack = Vec::new();
        expand_group(g, &raw_groups, names, &mut stack, &mut expanded)?;
    }
    Ok(expanded)
}

/// Machine name (as spelled in the file) → id52, for servers and devices.
fn member_ids(raw: &RawDocument) -> BTreeMap<String, Id52> {
    let servers = raw
        .servers
        .iter()
        .map(|s| (s.server.name.clone(), s.server.id52));
    let devices = raw
        .devices
        .iter()
        .map(|d| (d.device.name.clone(), d.device.id52));
    servers.chain(devices).collect()
}

/// A server with its own, its commands' and its services' `allow-from` resolved.
fn resolve_server(raw: RawServer, resolver: &Resolver<'_>) -> Result<Server, ConfigError> {
    let mut server = raw.server;
    server.allow_from = resolver.list(&raw.allow_from)?;
    for c in raw.commands {
        let allow_from = resolver.list(&c.allow_from)?;
        let access = CommandAccess {
            command: c.command.clone(),
            allow_from,
            args: c.args,
        };
        server.commands.insert(c.command, access);
    }
    for s in raw.services {
        let allow_from = resolver.list(&s.allow_from)?;
        let service = Service {
            name: s.name.clone(),
            http_port: s.http_port,
            allow_from,
        };
        server.services.insert(s.name, service);
    }
    Ok(server)
}

/// Expands one group to machine names, depth first, memoising finished groups; `stack` is the
/// chain of groups being expanded, which is what a cycle message shows.
fn expand_group(
    g: &RawGroup,
    raw: &BTreeMap<String, &RawGroup>,
    names: &Names,
    stack: &mut Vec<String>,
    done: &mut Expanded,
) -> Result<BTreeSet<String>, ConfigError> {
    let lower = g.name.to_ascii_lowercase();
    if let Some(m) = done.get(&lower) {
        return Ok(m.clone());
    }
    if stack.len() >= MAX_GROUP_DEPTH {
        return Err(ConfigError::BadValue {
            key: g.members.key.clone(),
            message: format!("groups nested more than {MAX_GROUP_DEPTH} deep"),
            line: g.members.line,
        });
    }
    stack.push(g.name.clone());
    let mut out = BTreeSet::new();
    for m in &g.members.entries {
        let entry = names
            .get(&m.to_ascii_lowercase())
            .ok_or_else(|| ConfigError::UnknownName {
                key: g.members.key.clone(),
                name: m.clone(),
                line: g.members.line,
            })?;
        match entry.kind {
            NameKind::Server | NameKind::Device => {
                out.insert(entry.name.clone());
            }
            NameKind::Group => {
                let sub_lower = entry.name.to_ascii_lowercase();
                if let Some(pos) = stack
                    .iter()
                    .position(|s| s.to_ascii_lowercase() == sub_lower)
                {
                    let mut path: Vec<&str> = stack.iter().skip(pos).map(String::as_str).collect();
                    path.push(&entry.name);
                    let start = raw.get(&sub_lower).copied().unwrap_or(g);
                    return Err(ConfigError::GroupCycle {
                        key: start.members.key.clone(),
                        cycle: path.join(" -> "),
                        line: start.members.line,
                    });
                }
                let Some(sub) = raw.get(&sub_lower).copied() else {
                    continue;
                };
                out.extend(expand_group(sub, raw, names, stack, done)?);
            }
        }
    }
    stack.pop();
    done.insert(lower, out.clone());
    Ok(out)
}

/// Turns `allow-from` lists into id52s once every name and group is known.
struct Resolver<'a> {
    names: &'a Names,
    groups: &'a Expanded,
    ids: &'a BTreeMap<String, Id52>,
}

impl Resolver<'_> {
    fn list(&self, list: &RawList) -> Result<Vec<Id52>, ConfigError> {
        let mut out = BTreeSet::new();
        for e in &list.entries {
            let lower = e.to_ascii_lowercase();
            match self.names.get(&lower) {
                Some(entry) if entry.kind == NameKind::Group => {
                    if let Some(members) = self.groups.get(&lower) {
                        out.extend(members.iter().filter_map(|m| self.ids.get(m)).copied());
                    }
                }
                Some(entry) => {
                    if let Some(id) = self.ids.get(&entry.name) {
                        out.insert(*id);
                    }
                }
                // A raw id52 need not be a member: it lets a manager grant access to a machine
                // before giving it a name.
                None => match e.parse::<Id52>() {
                    Ok(id) => {
                        out.insert(id);
                    }
                    Err(_) => {
                        return Err(ConfigError::UnknownName {
                            key: list.key.clone(),
                            name: e.clone(),
                            line: list.line,
                        });
                    }
                },
            }
        }
        Ok(out.into_iter().collect())
    }
}
