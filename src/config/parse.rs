//! Cluster file text → validated [`ClusterConfig`] (DESIGN §4).
//!
//! The file is the cluster's ACL, so validation is strict wherever a typo would silently change
//! who may do what: unknown keys and tables, unknown names in `allow-from` and `members`,
//! duplicate ids or names and group cycles are all errors. Parsing goes through `toml`'s
//! span-keeping `DeTable` so that every error can name the table, the key and the line.
//! Nothing here panics, whatever the input: the file may come from a hand edit or a push.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{
    ClusterConfig, CommandAccess, DEFAULT_SSH_TARGET, Device, Group, Server, Service, SshTarget,
};
use crate::id52::Id52;

/// Deeper group nesting than this is refused: no real cluster needs it, and the bound keeps
/// expansion from exhausting the stack on a hostile file.
const MAX_GROUP_DEPTH: usize = 32;

/// Why a cluster file was refused. Every message is one line that names the table and key
/// (`server.foo.allow-from: unknown name "alce"`), with the line number when it is known.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("TOML syntax error at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("missing table [cluster-manager]: the file must name the cluster's manager")]
    MissingManager,
    #[error(
        "unknown table [{table}]: expected cluster-manager, server, device or group{}",
        at(.line)
    )]
    UnknownTable { table: String, line: Option<usize> },
    #[error("{table}: missing key {key}{}", at(.line))]
    MissingKey {
        table: String,
        key: String,
        line: Option<usize>,
    },
    #[error("{table}: unknown key {key:?}{}", at(.line))]
    UnknownKey {
        table: String,
        key: String,
        line: Option<usize>,
    },
    #[error("{key}: expected {expected}, found {found}{}", at(.line))]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
        line: Option<usize>,
    },
    #[error("{key}: {message}{}", at(.line))]
    BadValue {
        key: String,
        message: String,
        line: Option<usize>,
    },
    #[error("{table}: invalid name {name:?}: {reason}{}", at(.line))]
    BadName {
        table: String,
        name: String,
        reason: &'static str,
        line: Option<usize>,
    },
    #[error("{key}: unknown name {name:?}{}", at(.line))]
    UnknownName {
        key: String,
        name: String,
        line: Option<usize>,
    },
    #[error("{key}: group cycle {cycle}{}", at(.line))]
    GroupCycle {
        key: String,
        cycle: String,
        line: Option<usize>,
    },
    #[error("duplicate id52 {id52} in {first} and {second}{}", at(.line))]
    DuplicateId52 {
        id52: String,
        first: String,
        second: String,
        line: Option<usize>,
    },
    #[error("name {name:?} is used twice: {first} and {second}{}", at(.line))]
    DuplicateName {
        name: String,
        first: String,
        second: String,
        line: Option<usize>,
    },
}

fn at(line: &Option<usize>) -> String {
    match line {
        Some(n) => format!(" (line {n})"),
        None => String::new(),
    }
}

/// Checks a server, device, group or service name. Names become DNS-like labels
/// (`foo.amitu.com`), appear in comma-separated lists and are compared without regard to case,
/// so they are kept to a small alphabet and must not be mistaken for an id52.
pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("names cannot be empty");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("names use only letters, digits, '-' and '_'");
    }
    if name.starts_with('-') {
        return Err("names cannot start with '-'");
    }
    if Id52::looks_like(&name.to_ascii_lowercase()) {
        return Err("a name cannot look like an id52");
    }
    Ok(())
}

impl ClusterConfig {
    /// Parses and validates a cluster file; see the module docs for what is refused.
    pub fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        let doc = DeTable::parse(text).map_err(|e| syntax_error(text, &e))?;
        let newlines = text
            .bytes()
            .enumerate()
            .filter(|(_, b)| *b == b'\n')
            .map(|(i, _)| i)
            .collect();
        Parser { newlines }.document(doc.get_ref())
    }
}

fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    ConfigError::Syntax {
        line,
        column,
        message,
    }
}

/// 1-based line and column (in characters) of a byte offset; offsets past the end clamp.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.as_bytes().iter().take(offset);
    let mut line = 1;
    let mut column = 1;
    for &b in before {
        if b == b'\n' {
            line += 1;
            column = 1;
        } else if b & 0xC0 != 0x80 {
            column += 1;
        }
    }
    (line, column)
}

type Key<'i> = Spanned<toml::de::DeString<'i>>;
type Val<'i> = Spanned<DeValue<'i>>;

/// A name list (`allow-from`, `members`) as written, resolved once every name is known.
struct RawList {
    key: String,
    entries: Vec<String>,
    line: Option<usize>,
}

/// `args` of a command scope: alternative patterns, each a list of words.
type ArgPatterns = Vec<Vec<String>>;

struct RawServer {
    server: Server,
    line: Option<usize>,
    allow_from: RawList,
    commands: Vec<(String, RawList, Option<ArgPatterns>)>,
    services: Vec<(String, u16, RawList)>,
}

struct RawGroup {
    name: String,
    members: RawList,
}

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

struct Parser {
    /// Byte offsets of every '\n': line numbers are asked for every entry, and counting
    /// from the start each time made a file with thousands of members quadratic to parse.
    newlines: Vec<usize>,
}

impl Parser {
    fn line(&self, span: Range<usize>) -> Option<usize> {
        Some(self.newlines.partition_point(|&nl| nl < span.start) + 1)
    }

    fn table<'a, 'i>(&self, key: &str, v: &'a Val<'i>) -> Result<&'a DeTable<'i>, ConfigError> {
        v.get_ref()
            .as_table()
            .ok_or_else(|| ConfigError::WrongType {
                key: key.to_string(),
                expected: "a table",
                found: v.get_ref().type_str(),
                line: self.line(v.span()),
            })
    }

    fn string<'a>(&self, key: &str, v: &'a Val<'_>) -> Result<&'a str, ConfigError> {
        v.get_ref().as_str().ok_or_else(|| ConfigError::WrongType {
            key: key.to_string(),
            expected: "a string",
            found: v.get_ref().type_str(),
            line: self.line(v.span()),
        })
    }

    fn bad(&self, key: &str, v: &Val<'_>, message: impl Into<String>) -> ConfigError {
        ConfigError::BadValue {
            key: key.to_string(),
            message: message.into(),
            line: self.line(v.span()),
        }
    }

    fn id52(&self, key: &str, v: &Val<'_>) -> Result<Id52, ConfigError> {
        self.string(key, v)?
            .parse::<Id52>()
            .map_err(|e| self.bad(key, v, e.to_string()))
    }

    /// Optional string where `""` means "not set" (the seed format writes empty strings).
    fn opt_string(&self, key: &str, v: &Val<'_>) -> Result<Option<String>, ConfigError> {
        let s = self.string(key, v)?;
        Ok((!s.is_empty()).then(|| s.to_string()))
    }

    /// A name list: a comma-separated string or an array of strings (each of which may itself
    /// hold commas). Empty entries, e.g. from a trailing comma, are dropped.
    fn list(&self, key: &str, v: &Val<'_>) -> Result<RawList, ConfigError> {
        let mut entries = Vec::new();
        let mut add = |s: &str| {
            entries.extend(
                s.split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(str::to_string),
            )
        };
        match v.get_ref() {
            DeValue::String(s) => add(s),
            DeValue::Array(items) => {
                for item in items {
                    match item.get_ref() {
                        DeValue::String(s) => add(s),
                        other => {
                            return Err(ConfigError::WrongType {
                                key: key.to_string(),
                                expected: "a list of strings",
                                found: other.type_str(),
                                line: self.line(item.span()),
                            });
                        }
                    }
                }
            }
            other => {
                return Err(ConfigError::WrongType {
                    key: key.to_string(),
                    expected: "a comma-separated string or an array of strings",
                    found: other.type_str(),
                    line: self.line(v.span()),
                });
            }
        }
        Ok(RawList {
            key: key.to_string(),
            entries,
            line: self.line(v.span()),
        })
    }

    fn empty_list(&self, key: String, line: Option<usize>) -> RawList {
        RawList {
            key,
            entries: Vec::new(),
            line,
        }
    }

    fn unknown_key(&self, table: &str, k: &Key<'_>) -> ConfigError {
        ConfigError::UnknownKey {
            table: table.to_string(),
            key: k.get_ref().to_string(),
            line: self.line(k.span()),
        }
    }

    fn name(&self, table: &str, k: &Key<'_>) -> Result<String, ConfigError> {
        let name = k.get_ref().to_string();
        check_name(&name).map_err(|reason| ConfigError::BadName {
            table: table.to_string(),
            name: name.clone(),
            reason,
            line: self.line(k.span()),
        })?;
        Ok(name)
    }

    fn document(&self, doc: &DeTable<'_>) -> Result<ClusterConfig, ConfigError> {
        let mut manager = None;
        let mut servers = Vec::new();
        let mut devices = Vec::new();
        let mut groups = Vec::new();
        for (k, v) in doc.iter() {
            match k.get_ref().as_ref() {
                "cluster-manager" => {
                    manager = Some(self.manager(self.table("cluster-manager", v)?)?);
                }
                "server" => {
                    for (name, s) in self.table("server", v)?.iter() {
                        servers.push(self.server(name, s)?);
                    }
                }
                "device" => {
                    for (name, d) in self.table("device", v)?.iter() {
                        devices.push((self.device(name, d)?, self.line(name.span())));
                    }
                }
                "group" => {
                    for (name, g) in self.table("group", v)?.iter() {
                        groups.push((self.group(name, g)?, self.line(name.span())));
                    }
                }
                other if v.get_ref().is_table() => {
                    return Err(ConfigError::UnknownTable {
                        table: other.to_string(),
                        line: self.line(k.span()),
                    });
                }
                _ => return Err(self.unknown_key("top level", k)),
            }
        }
        let Some(manager) = manager else {
            return Err(ConfigError::MissingManager);
        };
        let ManagerTable {
            id: manager,
            alias,
            use_keyring,
            private_key_file,
            private_key,
            addrs: manager_addrs,
            relays,
            relay_ca,
        } = manager;

        // One namespace for servers, devices and groups, compared without regard to case
        // because host names are.
        let mut names: BTreeMap<String, NameEntry> = BTreeMap::new();
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
        for s in &servers {
            claim(&s.server.name, NameKind::Server, s.line)?;
        }
        for (d, line) in &devices {
            claim(&d.name, NameKind::Device, *line)?;
        }
        for (g, line) in &groups {
            claim(&g.name, NameKind::Group, *line)?;
        }

        // The manager's id52 may also be a member (the manager machine can be a server of its
        // own cluster), so only members are checked against each other.
        let mut seen: BTreeMap<Id52, String> = BTreeMap::new();
        let members = servers
            .iter()
            .map(|s| (s.server.id52, format!("server.{}", s.server.name), s.line))
            .chain(
                devices
                    .iter()
                    .map(|(d, line)| (d.id52, format!("device.{}", d.name), *line)),
            );
        for (id, table, line) in members {
            if let Some(first) = seen.get(&id) {
                return Err(ConfigError::DuplicateId52 {
                    id52: id.to_string(),
                    first: first.clone(),
                    second: table,
                    line,
                });
            }
            seen.insert(id, table);
        }

        let raw_groups: BTreeMap<String, &RawGroup> = groups
            .iter()
            .map(|(g, _)| (g.name.to_ascii_lowercase(), g))
            .collect();
        let mut expanded: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (g, _) in &groups {
            let mut stack = Vec::new();
            expand_group(g, &raw_groups, &names, &mut stack, &mut expanded)?;
        }

        let mut ids: BTreeMap<String, Id52> = BTreeMap::new();
        for s in &servers {
            ids.insert(s.server.name.clone(), s.server.id52);
        }
        for (d, _) in &devices {
            ids.insert(d.name.clone(), d.id52);
        }
        let resolver = Resolver {
            names: &names,
            groups: &expanded,
            ids: &ids,
        };

        let mut out_servers = BTreeMap::new();
        for raw in servers {
            let mut server = raw.server;
            server.allow_from = resolver.list(&raw.allow_from)?;
            for (cmd, list, args) in raw.commands {
                let allow_from = resolver.list(&list)?;
                server.commands.insert(
                    cmd.clone(),
                    CommandAccess {
                        command: cmd,
                        allow_from,
                        args,
                    },
                );
            }
            for (name, port, list) in raw.services {
                let allow_from = resolver.list(&list)?;
                server.services.insert(
                    name.clone(),
                    Service {
                        name,
                        http_port: port,
                        allow_from,
                    },
                );
            }
            out_servers.insert(server.name.clone(), server);
        }
        let out_groups = groups
            .iter()
            .map(|(g, _)| {
                let members = expanded
                    .get(&g.name.to_ascii_lowercase())
                    .map(|m| m.iter().cloned().collect())
                    .unwrap_or_default();
                (
                    g.name.clone(),
                    Group {
                        name: g.name.clone(),
                        members,
                    },
                )
            })
            .collect();

        Ok(ClusterConfig {
            manager,
            alias,
            use_keyring,
            private_key_file,
            private_key,
            manager_addrs,
            relays,
            relay_ca,
            servers: out_servers,
            devices: devices
                .into_iter()
                .map(|(d, _)| (d.name.clone(), d))
                .collect(),
            groups: out_groups,
        })
    }

    fn manager(&self, t: &DeTable<'_>) -> Result<ManagerTable, ConfigError> {
        const T: &str = "cluster-manager";
        let mut id = None;
        let mut alias = None;
        let mut use_keyring = true;
        let mut private_key_file = None;
        let mut private_key = None;
        let mut addrs = Vec::new();
        let mut relays = Vec::new();
        let mut relay_ca = None;
        for (k, v) in t.iter() {
            let key = format!("{T}.{}", k.get_ref());
            match k.get_ref().as_ref() {
                "id52" => id = Some(self.id52(&key, v)?),
                "alias" => {
                    alias = self.opt_string(&key, v)?;
                    if let Some(a) = &alias {
                        check_alias(a).map_err(|m| self.bad(&key, v, m))?;
                    }
                }
                "use-keyring" => {
                    use_keyring = v
                        .get_ref()
                        .as_bool()
                        .ok_or_else(|| ConfigError::WrongType {
                            key: key.clone(),
                            expected: "true or false",
                            found: v.get_ref().type_str(),
                            line: self.line(v.span()),
                        })?;
                }
                // Kept in the format (an empty value is fine) but refused when set: malai
                // keeps the manager's key in the OS keyring or the 0600 `secret-key` file
                // of the cluster folder. A key named here would sit in a file that tools
                // rewrite and that is the source of every push (issue 12, finding 4).
                "private-key-file" | "private-key" => {
                    let set = self.opt_string(&key, v)?;
                    if set.is_some() {
                        return Err(self.bad(
                            &key,
                            v,
                            "is not supported: malai keeps the manager's secret key in the OS keyring, or with `use-keyring = false` in the cluster folder's `secret-key` file (mode 0600); a key in the cluster file could be pushed or left readable. Remove this line (and keep the key out of comments too)",
                        ));
                    }
                    if k.get_ref().as_ref() == "private-key" {
                        private_key = set;
                    } else {
                        private_key_file = set;
                    }
                }
                "addrs" => addrs = self.addrs(&key, v)?,
                "relays" => {
                    for r in self.list(&key, v)?.entries {
                        check_relay_url(&r).map_err(|m| self.bad(&key, v, m))?;
                        relays.push(r);
                    }
                }
                "relay-ca" => {
                    relay_ca = self.opt_string(&key, v)?;
                    if let Some(pem) = &relay_ca
                        && !pem.contains("-----BEGIN CERTIFICATE-----")
                    {
                        return Err(self.bad(
                            &key,
                            v,
                            "expected PEM text (-----BEGIN CERTIFICATE----- ...)".to_string(),
                        ));
                    }
                }
                _ => return Err(self.unknown_key(T, k)),
            }
        }
        let id = id.ok_or_else(|| ConfigError::MissingKey {
            table: T.to_string(),
            key: "id52".to_string(),
            line: None,
        })?;
        Ok(ManagerTable {
            id,
            alias,
            use_keyring,
            private_key_file,
            private_key,
            addrs,
            relays,
            relay_ca,
        })
    }

    /// `addrs = ["ip:port", …]`: direct-address hints for dialing a machine.
    fn addrs(&self, key: &str, v: &Val<'_>) -> Result<Vec<SocketAddr>, ConfigError> {
        let mut addrs = Vec::new();
        for a in self.list(key, v)?.entries {
            let addr = a
                .parse::<SocketAddr>()
                .map_err(|_| self.bad(key, v, format!("{a:?} is not an ip:port address")))?;
            addrs.push(addr);
        }
        Ok(addrs)
    }

    fn server(&self, name_key: &Key<'_>, v: &Val<'_>) -> Result<RawServer, ConfigError> {
        let name = self.name("server", name_key)?;
        let table = format!("server.{name}");
        let t = self.table(&table, v)?;
        let header_line = self.line(name_key.span());
        let mut id = None;
        let mut allow_from = self.empty_list(format!("{table}.allow-from"), header_line);
        let mut ssh = SshTarget::Tcp(DEFAULT_SSH_TARGET.to_string());
        let mut addrs = Vec::new();
        let mut ssh_via = None;
        let mut ssh_identity_file = None;
        let mut forwarding = true;
        let mut commands = Vec::new();
        let mut services = Vec::new();
        for (k, v) in t.iter() {
            let key = format!("{table}.{}", k.get_ref());
            match k.get_ref().as_ref() {
                "id52" => id = Some(self.id52(&key, v)?),
                "allow-from" => allow_from = self.list(&key, v)?,
                "ssh" => ssh = self.ssh_target(&key, v)?,
                "addrs" => {
                    for a in self.list(&key, v)?.entries {
                        let addr = a.parse::<SocketAddr>().map_err(|_| {
                            self.bad(&key, v, format!("{a:?} is not an ip:port address"))
                        })?;
                        addrs.push(addr);
                    }
                }
                "ssh-via" => {
                    ssh_via = self.opt_string(&key, v)?;
                    if let Some(via) = &ssh_via {
                        check_ssh_via(via).map_err(|m| self.bad(&key, v, m))?;
                    }
                }
                "ssh-identity-file" => ssh_identity_file = self.opt_string(&key, v)?,
                "forwarding" => {
                    forwarding = v
                        .get_ref()
                        .as_bool()
                        .ok_or_else(|| ConfigError::WrongType {
                            key: key.clone(),
                            expected: "true or false",
                            found: v.get_ref().type_str(),
                            line: self.line(v.span()),
                        })?;
                }
                "service" => {
                    for (sk, sv) in self.table(&key, v)?.iter() {
                        services.push(self.service(&key, sk, sv)?);
                    }
                }
                cmd if v.get_ref().is_table() => {
                    check_command(cmd).map_err(|reason| ConfigError::BadName {
                        table: table.clone(),
                        name: cmd.to_string(),
                        reason,
                        line: self.line(k.span()),
                    })?;
                    let ct = self.table(&key, v)?;
                    let mut list =
                        self.empty_list(format!("{key}.allow-from"), self.line(k.span()));
                    let mut args = None;
                    for (ck, cv) in ct.iter() {
                        match ck.get_ref().as_ref() {
                            "allow-from" => list = self.list(&format!("{key}.allow-from"), cv)?,
                            "args" => args = Some(self.arg_patterns(&format!("{key}.args"), cv)?),
                            _ => return Err(self.unknown_key(&key, ck)),
                        }
                    }
                    commands.push((cmd.to_string(), list, args));
                }
                _ => return Err(self.unknown_key(&table, k)),
            }
        }
        let id52 = id.ok_or_else(|| ConfigError::MissingKey {
            table: table.clone(),
            key: "id52".to_string(),
            line: header_line,
        })?;
        Ok(RawServer {
            server: Server {
                name,
                id52,
                allow_from: Vec::new(),
                ssh,
                addrs,
                commands: BTreeMap::new(),
                services: BTreeMap::new(),
                ssh_via,
                ssh_identity_file,
                forwarding,
            },
            line: header_line,
            allow_from,
            commands,
            services,
        })
    }

    /// `args = "pattern"` or `args = ["pattern", …]`: each pattern split into words like a
    /// shell would (quotes honoured, nothing expanded); `""` allows no arguments at all.
    fn arg_patterns(&self, key: &str, v: &Val<'_>) -> Result<ArgPatterns, ConfigError> {
        let strings: Vec<String> = match v.get_ref() {
            DeValue::String(s) => vec![s.to_string()],
            DeValue::Array(a) => {
                let mut out = vec![];
                for x in a.iter() {
                    match x.get_ref() {
                        DeValue::String(s) => out.push(s.to_string()),
                        other => {
                            return Err(ConfigError::WrongType {
                                key: key.to_string(),
                                expected: "a string or an array of strings",
                                found: other.type_str(),
                                line: self.line(x.span()),
                            });
                        }
                    }
                }
                out
            }
            other => {
                return Err(ConfigError::WrongType {
                    key: key.to_string(),
                    expected: "a string or an array of strings",
                    found: other.type_str(),
                    line: self.line(v.span()),
                });
            }
        };
        strings
            .iter()
            .map(|s| {
                shlex::split(s).ok_or_else(|| self.bad(key, v, format!("{s:?}: unbalanced quotes")))
            })
            .collect()
    }

    fn service(
        &self,
        parent: &str,
        name_key: &Key<'_>,
        v: &Val<'_>,
    ) -> Result<(String, u16, RawList), ConfigError> {
        let name = self.name(parent, name_key)?;
        let table = format!("{parent}.{name}");
        let t = self.table(&table, v)?;
        let mut port = None;
        let mut list = self.empty_list(format!("{table}.allow-from"), self.line(name_key.span()));
        for (k, v) in t.iter() {
            let key = format!("{table}.{}", k.get_ref());
            match k.get_ref().as_ref() {
                "http" => {
                    let n = match v.get_ref() {
                        DeValue::Integer(i) => i64::from_str_radix(i.as_str(), i.radix()).ok(),
                        other => {
                            return Err(ConfigError::WrongType {
                                key,
                                expected: "a port number",
                                found: other.type_str(),
                                line: self.line(v.span()),
                            });
                        }
                    };
                    let p = n
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|p| *p != 0)
                        .ok_or_else(|| self.bad(&key, v, "port must be between 1 and 65535"))?;
                    port = Some(p);
                }
                "allow-from" => list = self.list(&key, v)?,
                _ => return Err(self.unknown_key(&table, k)),
            }
        }
        let port = port.ok_or_else(|| ConfigError::MissingKey {
            table: table.clone(),
            key: "http".to_string(),
            line: self.line(name_key.span()),
        })?;
        Ok((name, port, list))
    }

    fn device(&self, name_key: &Key<'_>, v: &Val<'_>) -> Result<Device, ConfigError> {
        let name = self.name("device", name_key)?;
        let table = format!("device.{name}");
        let t = self.table(&table, v)?;
        let mut id = None;
        for (k, v) in t.iter() {
            let key = format!("{table}.{}", k.get_ref());
            match k.get_ref().as_ref() {
                "id52" => id = Some(self.id52(&key, v)?),
                _ => return Err(self.unknown_key(&table, k)),
            }
        }
        let id52 = id.ok_or_else(|| ConfigError::MissingKey {
            table,
            key: "id52".to_string(),
            line: self.line(name_key.span()),
        })?;
        Ok(Device { name, id52 })
    }

    fn group(&self, name_key: &Key<'_>, v: &Val<'_>) -> Result<RawGroup, ConfigError> {
        let name = self.name("group", name_key)?;
        let table = format!("group.{name}");
        let t = self.table(&table, v)?;
        let mut members = self.empty_list(format!("{table}.members"), self.line(name_key.span()));
        for (k, v) in t.iter() {
            let key = format!("{table}.{}", k.get_ref());
            match k.get_ref().as_ref() {
                "members" => members = self.list(&key, v)?,
                _ => return Err(self.unknown_key(&table, k)),
            }
        }
        Ok(RawGroup { name, members })
    }

    fn ssh_target(&self, key: &str, v: &Val<'_>) -> Result<SshTarget, ConfigError> {
        let s = self.string(key, v)?;
        if s == "embedded" {
            return Ok(SshTarget::Embedded);
        }
        if s.is_empty() {
            return Ok(SshTarget::Tcp(DEFAULT_SSH_TARGET.to_string()));
        }
        check_host_port(s).map_err(|m| self.bad(key, v, m))?;
        Ok(SshTarget::Tcp(s.to_string()))
    }
}

/// Expands one group to machine names, depth first, memoising finished groups; `stack` is the
/// chain of groups being expanded, which is what a cycle message shows.
fn expand_group(
    g: &RawGroup,
    raw: &BTreeMap<String, &RawGroup>,
    names: &BTreeMap<String, NameEntry>,
    stack: &mut Vec<String>,
    done: &mut BTreeMap<String, BTreeSet<String>>,
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
    names: &'a BTreeMap<String, NameEntry>,
    groups: &'a BTreeMap<String, BTreeSet<String>>,
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

/// A cluster alias is a dotted name (often a domain): it is matched as a host-name suffix.
fn check_alias(alias: &str) -> Result<(), &'static str> {
    let ok = alias.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if ok {
        Ok(())
    } else {
        Err("alias must be dot-separated labels of letters, digits, '-' and '_'")
    }
}

/// A command entry's name is the program (argv[0]) peers may run; it must be one word.
fn check_command(cmd: &str) -> Result<(), &'static str> {
    if cmd.is_empty() || cmd.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a command entry is named by a program, without spaces");
    }
    Ok(())
}

fn check_host_port(s: &str) -> Result<(), String> {
    let bad = || format!("expected host:port or \"embedded\", got {s:?}");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 => {}
        _ => return Err(bad()),
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        !inner.is_empty() && !inner.contains(['[', ']'])
    } else {
        !host.is_empty() && !host.contains([':', '[', ']'])
    };
    if !host_ok || host.starts_with('-') || host.chars().any(|c| c.is_whitespace()) {
        return Err(bad());
    }
    Ok(())
}

/// `ssh-via` is handed to OpenSSH as its destination, so it is checked here with the same
/// parser the client uses: only host-name and user-name characters (a leading '-' would be
/// an option; shell syntax would reach ProxyCommand `%h`/`%r`, CVE-2023-51385).
fn check_ssh_via(s: &str) -> Result<(), &'static str> {
    super::ssh_via::parse_target(s)
        .map(|_| ())
        .map_err(|_| "expected [user@]host[:port] with letters, digits, '.', '-' and '_' only")
}

/// The `[cluster-manager]` table as parsed.
struct ManagerTable {
    id: Id52,
    alias: Option<String>,
    use_keyring: bool,
    private_key_file: Option<String>,
    private_key: Option<String>,
    addrs: Vec<SocketAddr>,
    relays: Vec<String>,
    relay_ca: Option<String>,
}

/// A relay URL as iroh takes it: `http(s)://host[:port][/]`. The transport parses it again
/// (into iroh's type); this check only makes a typo an error that names the key.
fn check_relay_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(format!("{url:?} has no valid host"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn id(n: u8) -> Id52 {
        Id52::from_bytes([n; 32])
    }

    fn full() -> String {
        format!(
            r#"
# The cluster's manager.
[cluster-manager]
id52 = "{m}"
alias = "amitu.com"
use-keyring = false
private-key-file = ""
private-key = ""

[server.foo]
id52 = "{foo}"
allow-from = "alice, admins,"
ssh = "embedded"
addrs = ["203.0.113.7:7744", "[::1]:7744"]
ssh-via = "me@host:2222"
ssh-identity-file = "/id"

[server.foo.ls]
allow-from = "bob"

[server.foo.service.django]
http = 8_000
allow-from = "alice"

[server.bar]
id52 = "{bar}"
allow-from = ["bob", "{raw}"]

[device.alice]
id52 = "{alice}"

[device.bob]
id52 = "{bob}"

[group.admins]
members = "alice, ops"

[group.ops]
members = ["bar"]
"#,
            m = id(1),
            foo = id(2),
            bar = id(3),
            alice = id(4),
            bob = id(5),
            raw = id(9),
        )
    }

    fn minimal(extra: &str) -> String {
        format!("[cluster-manager]\nid52 = \"{}\"\n{extra}", id(1))
    }

    fn err(text: &str) -> String {
        match ClusterConfig::parse(text) {
            Ok(c) => panic!("expected an error, parsed {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn relays_and_relay_ca() {
        let c = ClusterConfig::parse(&minimal(
            "relays = [\"https://relay.acme.example\", \"http://198.18.0.1:3340\"]\nrelay-ca = \"-----BEGIN CERTIFICATE-----\\nAAAA\\n-----END CERTIFICATE-----\"\n",
        ))
        .unwrap();
        assert_eq!(
            c.relays,
            vec!["https://relay.acme.example", "http://198.18.0.1:3340"]
        );
        // The plain-http relay is accepted but warned about; the https one is not.
        let w = c.relay_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("http://198.18.0.1:3340"), "{w:?}");
        assert!(c.relay_ca.unwrap().contains("BEGIN CERTIFICATE"));
        assert!(
            ClusterConfig::parse(&minimal(""))
                .unwrap()
                .relays
                .is_empty()
        );
        let e = err(&minimal("relays = [\"relay.acme.example\"]\n"));
        assert!(
            e.starts_with(
                "cluster-manager.relays: \"relay.acme.example\" is not an http:// or https:// URL"
            ),
            "{e}"
        );
        let e = err(&minimal("relays = [\"https:///x\"]\n"));
        assert!(e.contains("has no valid host"), "{e}");
        let e = err(&minimal("relay-ca = \"/etc/ca.pem\"\n"));
        assert!(
            e.starts_with("cluster-manager.relay-ca: expected PEM text"),
            "{e}"
        );
    }

    #[test]
    fn manager_addrs() {
        let c = ClusterConfig::parse(&minimal("addrs = [\"127.0.0.1:7744\"]\n")).unwrap();
        assert_eq!(c.manager_addrs, vec!["127.0.0.1:7744".parse().unwrap()]);
        assert!(
            ClusterConfig::parse(&minimal(""))
                .unwrap()
                .manager_addrs
                .is_empty()
        );
        let e = err(&minimal("addrs = [\"nope\"]\n"));
        assert!(
            e.starts_with("cluster-manager.addrs: \"nope\" is not an ip:port"),
            "{e}"
        );
    }

    #[test]
    fn full_example() {
        let c = ClusterConfig::parse(&full()).unwrap();
        assert_eq!(c.manager, id(1));
        assert_eq!(c.alias.as_deref(), Some("amitu.com"));
        assert!(!c.use_keyring);
        assert_eq!(c.private_key_file, None);
        assert_eq!(c.private_key, None);
        // Deny twins: a key named in the file is refused, with what to do instead.
        for (k, v) in [("private-key-file", "/keys/m"), ("private-key", "00ab")] {
            let text = full().replace(&format!("{k} = \"\""), &format!("{k} = \"{v}\""));
            let e = ClusterConfig::parse(&text).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("cluster-manager.{k}")) && e.contains("secret-key"),
                "{e}"
            );
        }

        let foo = &c.servers["foo"];
        assert_eq!(foo.name, "foo");
        assert_eq!(foo.id52, id(2));
        // alice directly, admins = alice + ops = alice + bar.
        let mut want = vec![id(4), id(3)];
        want.sort();
        assert_eq!(foo.allow_from, want);
        assert_eq!(foo.ssh, SshTarget::Embedded);
        assert_eq!(
            foo.addrs,
            vec![
                "203.0.113.7:7744".parse::<SocketAddr>().unwrap(),
                "[::1]:7744".parse().unwrap()
            ]
        );
        assert_eq!(foo.ssh_via.as_deref(), Some("me@host:2222"));
        assert_eq!(foo.ssh_identity_file.as_deref(), Some("/id"));
        assert_eq!(foo.commands.len(), 1);
        assert_eq!(foo.commands["ls"].command, "ls");
        assert_eq!(foo.commands["ls"].allow_from, vec![id(5)]);
        assert_eq!(foo.services.len(), 1);
        let dj = &foo.services["django"];
        assert_eq!((dj.name.as_str(), dj.http_port), ("django", 8000));
        assert_eq!(dj.allow_from, vec![id(4)]);

        let bar = &c.servers["bar"];
        assert_eq!(bar.ssh, SshTarget::Tcp(DEFAULT_SSH_TARGET.into()));
        let mut want = vec![id(5), id(9)];
        want.sort();
        assert_eq!(bar.allow_from, want);
        assert!(bar.commands.is_empty() && bar.services.is_empty());
        assert_eq!(bar.ssh_via, None);

        assert_eq!(c.devices["alice"].id52, id(4));
        assert_eq!(c.groups["admins"].members, vec!["alice", "bar"]);
        assert_eq!(c.groups["ops"].members, vec!["bar"]);
        assert_eq!(
            c.name_of(&id(3)),
            Some(("bar", super::super::MemberKind::Server))
        );
    }

    #[test]
    fn defaults() {
        let c = ClusterConfig::parse(&minimal(&format!(
            "[server.a]\nid52 = \"{}\"\n[group.empty]\n",
            id(2)
        )))
        .unwrap();
        assert!(c.use_keyring);
        assert_eq!(c.alias, None);
        assert_eq!(c.private_key_file, None);
        let a = &c.servers["a"];
        assert!(a.allow_from.is_empty());
        assert_eq!(a.ssh, SshTarget::Tcp("127.0.0.1:22".into()));
        assert!(a.addrs.is_empty());
        assert!(c.groups["empty"].members.is_empty());
        assert!(c.devices.is_empty());
    }

    #[test]
    fn manager_not_implicitly_allowed() {
        let c =
            ClusterConfig::parse(&minimal(&format!("[server.a]\nid52 = \"{}\"\n", id(2)))).unwrap();
        assert!(!c.servers["a"].allow_from.contains(&id(1)));
    }

    #[test]
    fn manager_may_also_be_a_server() {
        let c =
            ClusterConfig::parse(&minimal(&format!("[server.m]\nid52 = \"{}\"\n", id(1)))).unwrap();
        assert_eq!(c.servers["m"].id52, c.manager);
    }

    #[test]
    fn array_and_string_forms_agree() {
        let a = ClusterConfig::parse(&minimal(&format!(
            "[server.s]\nid52 = \"{}\"\nallow-from = \"d, g\"\n[device.d]\nid52 = \"{}\"\n[group.g]\nmembers = \"s\"\n",
            id(2),
            id(3)
        )))
        .unwrap();
        let b = ClusterConfig::parse(&minimal(&format!(
            "[server.s]\nid52 = \"{}\"\nallow-from = [\"d\", \"g\"]\n[device.d]\nid52 = \"{}\"\n[group.g]\nmembers = [\"s\"]\n",
            id(2),
            id(3)
        )))
        .unwrap();
        assert_eq!(a, b);
        let mut want = vec![id(2), id(3)];
        want.sort();
        assert_eq!(a.servers["s"].allow_from, want);
    }

    #[test]
    fn empty_entries_and_duplicates_ignored() {
        let c = ClusterConfig::parse(&minimal(&format!(
            "[server.s]\nid52 = \"{}\"\nallow-from = \" , d,, d , {},\"\n[device.d]\nid52 = \"{}\"\n",
            id(2),
            id(3),
            id(3)
        )))
        .unwrap();
        assert_eq!(c.servers["s"].allow_from, vec![id(3)]);
    }

    #[test]
    fn nested_groups_expand() {
        let c = ClusterConfig::parse(&minimal(&format!(
            "[server.s]\nid52 = \"{}\"\nallow-from = \"top\"\n[device.d1]\nid52 = \"{}\"\n[device.d2]\nid52 = \"{}\"\n\
             [group.top]\nmembers = \"mid, d1\"\n[group.mid]\nmembers = \"low\"\n[group.low]\nmembers = \"d2, s\"\n",
            id(2),
            id(3),
            id(4)
        )))
        .unwrap();
        assert_eq!(c.groups["top"].members, vec!["d1", "d2", "s"]);
        assert_eq!(c.groups["mid"].members, vec!["d2", "s"]);
        let mut want = vec![id(2), id(3), id(4)];
        want.sort();
        assert_eq!(c.servers["s"].allow_from, want);
    }

    #[test]
    fn diamond_groups_are_not_cycles() {
        let c = ClusterConfig::parse(&minimal(&format!(
            "[device.d]\nid52 = \"{}\"\n[group.a]\nmembers = \"b, c\"\n[group.b]\nmembers = \"z\"\n\
             [group.c]\nmembers = \"z\"\n[group.z]\nmembers = \"d\"\n",
            id(3)
        )))
        .unwrap();
        assert_eq!(c.groups["a"].members, vec!["d"]);
    }

    #[test]
    fn group_cycles() {
        let e = err(&minimal(
            "[group.a]\nmembers = \"b\"\n[group.b]\nmembers = \"a\"\n",
        ));
        assert!(
            e.starts_with("group.a.members: group cycle a -> b -> a"),
            "{e}"
        );
        let e = err(&minimal("[group.a]\nmembers = \"a\"\n"));
        assert!(e.starts_with("group.a.members: group cycle a -> a"), "{e}");
        let e = err(&minimal(
            "[group.a]\nmembers = \"b\"\n[group.b]\nmembers = \"c\"\n[group.c]\nmembers = \"b\"\n",
        ));
        assert!(
            e.starts_with("group.b.members: group cycle b -> c -> b"),
            "{e}"
        );
    }

    #[test]
    fn deep_groups_refused_not_overflowed() {
        let mut extra = String::new();
        for i in 0..200 {
            extra.push_str(&format!("[group.g{i}]\nmembers = \"g{}\"\n", i + 1));
        }
        extra.push_str("[group.g200]\nmembers = \"\"\n");
        let e = err(&minimal(&extra));
        assert!(e.contains("nested more than"), "{e}");
    }

    #[test]
    fn unknown_names() {
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\nallow-from = \"alce\"\n",
            id(2)
        )));
        assert_eq!(e, "server.foo.allow-from: unknown name \"alce\" (line 5)");
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[server.foo.ls]\nallow-from = [\"x\"]\n",
            id(2)
        )));
        assert!(
            e.starts_with("server.foo.ls.allow-from: unknown name \"x\""),
            "{e}"
        );
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[server.foo.service.web]\nhttp = 80\nallow-from = \"y\"\n",
            id(2)
        )));
        assert!(
            e.starts_with("server.foo.service.web.allow-from: unknown name \"y\""),
            "{e}"
        );
        let e = err(&minimal("[group.g]\nmembers = \"nobody\"\n"));
        assert!(
            e.starts_with("group.g.members: unknown name \"nobody\""),
            "{e}"
        );
        // A group's members are names, never raw ids.
        let e = err(&minimal(&format!("[group.g]\nmembers = \"{}\"\n", id(7))));
        assert!(e.starts_with("group.g.members: unknown name"), "{e}");
    }

    #[test]
    fn bad_id52s() {
        let e = err(&minimal("[server.foo]\nid52 = \"abc\"\n"));
        assert_eq!(
            e,
            "server.foo.id52: id52 must be 52 characters, got 3 (line 4)"
        );
        let e = err("[cluster-manager]\nid52 = \"x\"\n");
        assert!(
            e.starts_with("cluster-manager.id52: id52 must be 52 characters, got 1"),
            "{e}"
        );
        let e = err(&minimal("[device.bob]\nid52 = 5\n"));
        assert!(
            e.starts_with("device.bob.id52: expected a string, found integer"),
            "{e}"
        );
    }

    #[test]
    fn missing_keys_and_tables() {
        assert_eq!(
            err(""),
            "missing table [cluster-manager]: the file must name the cluster's manager"
        );
        assert!(
            err("[cluster-manager]\nalias = \"a\"\n")
                .starts_with("cluster-manager: missing key id52")
        );
        let e = err(&minimal("[device.bob]\n"));
        assert_eq!(e, "device.bob: missing key id52 (line 3)");
        assert!(
            err(&minimal("[server.foo]\nallow-from = \"\"\n"))
                .starts_with("server.foo: missing key id52")
        );
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[server.foo.service.web]\n",
            id(2)
        )));
        assert!(
            e.starts_with("server.foo.service.web: missing key http"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_and_tables() {
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\nshh = \"x\"\n",
            id(2)
        )));
        assert_eq!(e, "server.foo: unknown key \"shh\" (line 5)");
        assert!(
            err(&format!("colour = 1\n{}", minimal("")))
                .starts_with("top level: unknown key \"colour\"")
        );
        let e = err(&minimal("[servers.foo]\n"));
        assert!(e.starts_with("unknown table [servers]"), "{e}");
        assert!(err(&minimal("extra = 1\n")).starts_with("cluster-manager: unknown key \"extra\""));
        assert!(
            err("[cluster-manager]\nid = 1\n").starts_with("cluster-manager: unknown key \"id\"")
        );
        assert!(
            err(&minimal("[device.d]\nid52 = \"\"\nallow-from = \"\"\n")).starts_with("device.d")
        );
        let e = err(&minimal(&format!(
            "[device.d]\nid52 = \"{}\"\nallow-from = \"\"\n",
            id(3)
        )));
        assert!(e.starts_with("device.d: unknown key \"allow-from\""), "{e}");
        let e = err(&minimal("[group.g]\nmember = \"\"\n"));
        assert!(e.starts_with("group.g: unknown key \"member\""), "{e}");
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[server.foo.ls]\nallow = \"\"\n",
            id(2)
        )));
        assert!(e.starts_with("server.foo.ls: unknown key \"allow\""), "{e}");
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[server.foo.service.w]\nhttp = 1\nport = 2\n",
            id(2)
        )));
        assert!(
            e.starts_with("server.foo.service.w: unknown key \"port\""),
            "{e}"
        );
    }

    #[test]
    fn wrong_types() {
        assert!(
            err("cluster-manager = 3\n")
                .starts_with("cluster-manager: expected a table, found integer")
        );
        assert!(
            err(&format!("server = 1\n{}", minimal(""))).starts_with("server: expected a table")
        );
        assert!(err(&minimal("[server]\nfoo = 1\n")).starts_with("server.foo: expected a table"));
        let e = err(&minimal("use-keyring = \"yes\"\n"));
        assert!(
            e.starts_with("cluster-manager.use-keyring: expected true or false"),
            "{e}"
        );
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\nforwarding = \"no\"\n",
            id(2)
        )));
        assert!(
            e.starts_with("server.foo.forwarding: expected true or false"),
            "{e}"
        );
        let on = ClusterConfig::parse(&minimal(&format!("[server.foo]\nid52 = \"{}\"\n", id(2))))
            .unwrap();
        assert!(on.servers["foo"].forwarding, "forwarding defaults to on");
        let off = ClusterConfig::parse(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\nforwarding = false\n",
            id(2)
        )))
        .unwrap();
        assert!(!off.servers["foo"].forwarding);
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\nallow-from = 3\n",
            id(2)
        )));
        assert!(
            e.starts_with("server.foo.allow-from: expected a comma-separated string"),
            "{e}"
        );
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\nallow-from = [\"a\", 3]\n",
            id(2)
        )));
        assert!(
            e.starts_with("server.foo.allow-from: expected a list of strings"),
            "{e}"
        );
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\nservice = \"x\"\n",
            id(2)
        )));
        assert!(e.starts_with("server.foo.service: expected a table"), "{e}");
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[server.foo.service]\nweb = 1\n",
            id(2)
        )));
        assert!(
            e.starts_with("server.foo.service.web: expected a table"),
            "{e}"
        );
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[server.foo.service.w]\nhttp = \"80\"\n",
            id(2)
        )));
        assert!(
            e.starts_with("server.foo.service.w.http: expected a port number"),
            "{e}"
        );
    }

    #[test]
    fn bad_values() {
        let s = |body: &str| minimal(&format!("[server.foo]\nid52 = \"{}\"\n{body}\n", id(2)));
        for (body, want) in [
            ("ssh = \"localhost\"", "server.foo.ssh: expected host:port"),
            ("ssh = \"host:0\"", "server.foo.ssh: expected host:port"),
            ("ssh = \":22\"", "server.foo.ssh: expected host:port"),
            ("ssh = \"::1:22\"", "server.foo.ssh: expected host:port"),
            ("ssh = \"-oX:22\"", "server.foo.ssh: expected host:port"),
            (
                "addrs = [\"nope\"]",
                "server.foo.addrs: \"nope\" is not an ip:port address",
            ),
            (
                "ssh-via = \"-oProxyCommand=x\"",
                "server.foo.ssh-via: expected [user@]host[:port]",
            ),
            (
                "ssh-via = \"$(touch /tmp/x)@host\"",
                "server.foo.ssh-via: expected [user@]host[:port]",
            ),
            (
                "ssh-via = \"u@host`id`\"",
                "server.foo.ssh-via: expected [user@]host[:port]",
            ),
            (
                "[server.foo.service.w]\nhttp = 0",
                "server.foo.service.w.http: port must be between 1 and 65535",
            ),
            (
                "[server.foo.service.w]\nhttp = 65536",
                "server.foo.service.w.http: port must be",
            ),
            (
                "[server.foo.service.w]\nhttp = -1",
                "server.foo.service.w.http: port must be",
            ),
        ] {
            let e = err(&s(body));
            assert!(e.starts_with(want), "{body}: {e}");
        }
        for ok in [
            "ssh = \"[::1]:2222\"",
            "ssh = \"localhost:22\"",
            "ssh = \"\"",
            "addrs = \"127.0.0.1:1, 127.0.0.1:2\"",
        ] {
            ClusterConfig::parse(&s(ok)).unwrap();
        }
        let e = err(&minimal("alias = \"a..b\"\n"));
        assert!(e.starts_with("cluster-manager.alias: alias must be"), "{e}");
    }

    #[test]
    fn bad_names() {
        let e = err(&minimal("[server.\"a.b\"]\n"));
        assert!(e.starts_with("server: invalid name \"a.b\""), "{e}");
        let e = err(&minimal(&format!(
            "[device.{}]\nid52 = \"{}\"\n",
            id(5),
            id(5)
        )));
        assert!(e.contains("cannot look like an id52"), "{e}");
        let e = err(&minimal("[group.\"\"]\n"));
        assert!(e.starts_with("group: invalid name \"\""), "{e}");
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[server.foo.\"l s\"]\n",
            id(2)
        )));
        assert!(e.starts_with("server.foo: invalid name \"l s\""), "{e}");
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[server.foo.service.\"a b\"]\nhttp = 1\n",
            id(2)
        )));
        assert!(
            e.starts_with("server.foo.service: invalid name \"a b\""),
            "{e}"
        );
    }

    #[test]
    fn command_names_may_be_paths() {
        let c = ClusterConfig::parse(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[server.foo.\"/usr/bin/rsync\"]\n[server.foo.git-upload-pack]\nallow-from = []\n",
            id(2)
        )))
        .unwrap();
        let cmds: Vec<_> = c.servers["foo"].commands.keys().cloned().collect();
        assert_eq!(cmds, vec!["/usr/bin/rsync", "git-upload-pack"]);
    }

    #[test]
    fn duplicates() {
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[device.bar]\nid52 = \"{}\"\n",
            id(2),
            id(2)
        )));
        assert_eq!(
            e,
            format!(
                "duplicate id52 {} in server.foo and device.bar (line 5)",
                id(2)
            )
        );
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\n[device.foo]\nid52 = \"{}\"\n",
            id(2),
            id(3)
        )));
        assert!(
            e.starts_with("name \"foo\" is used twice: server.foo and device.foo"),
            "{e}"
        );
        let e = err(&minimal(&format!(
            "[device.foo]\nid52 = \"{}\"\n[group.foo]\n",
            id(3)
        )));
        assert!(
            e.starts_with("name \"foo\" is used twice: device.foo and group.foo"),
            "{e}"
        );
        // Host names ignore case, so names must too.
        let e = err(&minimal(&format!(
            "[device.Foo]\nid52 = \"{}\"\n[device.foo]\nid52 = \"{}\"\n",
            id(3),
            id(4)
        )));
        assert!(e.contains("is used twice"), "{e}");
        // TOML itself refuses a table defined twice.
        let e = err(&minimal(&format!(
            "[device.a]\nid52 = \"{}\"\n[device.a]\nid52 = \"{}\"\n",
            id(3),
            id(4)
        )));
        assert!(e.starts_with("TOML syntax error at line 5"), "{e}");
    }

    #[test]
    fn names_are_case_insensitive_in_lists() {
        let c = ClusterConfig::parse(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\nallow-from = \"ALICE\"\n[device.Alice]\nid52 = \"{}\"\n",
            id(2),
            id(4)
        )))
        .unwrap();
        assert_eq!(c.servers["foo"].allow_from, vec![id(4)]);
    }

    #[test]
    fn syntax_errors_are_one_line_with_position() {
        let e = err("[cluster-manager\nid52 = 1\n");
        assert!(e.starts_with("TOML syntax error at line 1, column"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        let e = err("[cluster-manager]\nid52 = \"unterminated\n");
        assert!(e.starts_with("TOML syntax error at line 2"), "{e}");
    }

    /// A small deterministic generator: the tests need no dependency for randomness.
    fn xorshift(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn never_panics() {
        let text = full();
        // Every prefix (on char boundaries) of a valid file.
        for (i, _) in text.char_indices() {
            let _ = ClusterConfig::parse(&text[..i]);
        }
        let mut st = 0x9E37_79B9_7F4A_7C15u64;
        let alphabet = b"[]{}=\",.# \n\t'abcdefgz0129-_\\ui\x00\xff";
        for _ in 0..400 {
            // Random bytes over a TOML-ish alphabet (lossily made UTF-8).
            let n = (xorshift(&mut st) % 200) as usize;
            let bytes: Vec<u8> = (0..n)
                .map(|_| alphabet[(xorshift(&mut st) % alphabet.len() as u64) as usize])
                .collect();
            let _ = ClusterConfig::parse(&String::from_utf8_lossy(&bytes));
            // Mutations of the valid file: delete, duplicate or replace a span of bytes.
            let mut b = text.clone().into_bytes();
            for _ in 0..(1 + xorshift(&mut st) % 4) {
                let len = b.len().max(1) as u64;
                let at = (xorshift(&mut st) % len) as usize;
                let span = (xorshift(&mut st) % 12) as usize;
                let end = (at + span).min(b.len());
                match xorshift(&mut st) % 3 {
                    0 => {
                        b.drain(at..end);
                    }
                    1 => {
                        let copy = b[at..end].to_vec();
                        b.splice(at..at, copy);
                    }
                    _ => {
                        let c = alphabet[(xorshift(&mut st) % alphabet.len() as u64) as usize];
                        if at < b.len() {
                            b[at] = c;
                        }
                    }
                }
            }
            let _ = ClusterConfig::parse(&String::from_utf8_lossy(&b));
        }
        // Pathological nesting.
        let _ = ClusterConfig::parse(&format!("x = {}", "[".repeat(5000)));
        let _ = ClusterConfig::parse(&format!("x = {}1{}", "[".repeat(2000), "]".repeat(2000)));
        let _ = ClusterConfig::parse(&"a.".repeat(3000));
    }
}
