//! First phase of parsing: each table of the cluster file read into its raw form, checked
//! key by key (types, unknown keys, single values) but with names not yet resolved, so that
//! `allow-from` and `members` may name machines and groups defined further down the file.
//! [`super::resolve`] does the rest.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::Range;

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::checks::{
    check_alias, check_command, check_host_port, check_name, check_relay_url, check_ssh_via,
};
use super::error::ConfigError;
use super::{DEFAULT_SSH_TARGET, Device, Server, SshTarget};
use crate::id52::Id52;

type Key<'i> = Spanned<toml::de::DeString<'i>>;
type Val<'i> = Spanned<DeValue<'i>>;

/// The whole file as read, before any name is resolved.
pub(super) struct RawDocument {
    pub(super) manager: ManagerTable,
    pub(super) servers: Vec<RawServer>,
    pub(super) devices: Vec<RawDevice>,
    pub(super) groups: Vec<RawGroup>,
}

/// A name list (`allow-from`, `members`) as written, resolved once every name is known.
pub(super) struct RawList {
    pub(super) key: String,
    pub(super) entries: Vec<String>,
    pub(super) line: Option<usize>,
}

/// `args` of a command scope: alternative patterns, each a list of words.
pub(super) type ArgPatterns = Vec<Vec<String>>;

/// A `[server.<name>]` table: the server with its lists still as names.
pub(super) struct RawServer {
    /// Everything but the resolved `allow_from`, `commands` and `services`, which are empty.
    pub(super) server: Server,
    /// The table header's line, for errors about the server as a whole (a duplicate name).
    pub(super) line: Option<usize>,
    pub(super) allow_from: RawList,
    pub(super) commands: Vec<RawCommand>,
    pub(super) services: Vec<RawService>,
}

/// A `[server.<name>.<cmd>]` table.
pub(super) struct RawCommand {
    pub(super) command: String,
    pub(super) allow_from: RawList,
    pub(super) args: Option<ArgPatterns>,
}

/// A `[server.<name>.service.<service>]` table.
pub(super) struct RawService {
    pub(super) name: String,
    pub(super) http_port: u16,
    pub(super) allow_from: RawList,
}

/// A `[device.<name>]` table; a device has nothing to resolve.
pub(super) struct RawDevice {
    pub(super) device: Device,
    /// The table header's line, for duplicate names and ids.
    pub(super) line: Option<usize>,
}

/// A `[group.<name>]` table.
pub(super) struct RawGroup {
    pub(super) name: String,
    pub(super) members: RawList,
    /// The table header's line, for a duplicate name.
    pub(super) line: Option<usize>,
}

/// The `[cluster-manager]` table as parsed.
pub(super) struct ManagerTable {
    pub(super) id: Id52,
    pub(super) alias: Option<String>,
    pub(super) use_keyring: bool,
    pub(super) private_key_file: Option<String>,
    pub(super) private_key: Option<String>,
    pub(super) addrs: Vec<SocketAddr>,
    pub(super) relays: Vec<String>,
    pub(super) relay_ca: Option<String>,
}

/// Reads tables; holds what every error needs to name its line.
pub(super) struct Parser {
    /// Byte offsets of every '\n': line numbers are asked for every entry, and counting
    /// from the start each time made a file with thousands of members quadratic to parse.
    newlines: Vec<usize>,
}

impl Parser {
    pub(super) fn new(text: &str) -> Parser {
        let newlines = text
            .bytes()
            .enumerate()
            .filter(|(_, b)| *b == b'\n')
            .map(|(i, _)| i)
            .collect();
        Parser { newlines }
    }

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

    fn boolean(&self, key: &str, v: &Val<'_>) -> Result<bool, ConfigError> {
        v.get_ref().as_bool().ok_or_else(|| ConfigError::WrongType {
            key: key.to_string(),
            expected: "true or false",
            found: v.get_ref().type_str(),
            line: self.line(v.span()),
        })
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

    /// Reads every top-level table. Which tables may appear and what each holds is checked
    /// here; whether the names they use exist is not (see [`super::resolve`]).
    pub(super) fn document(&self, doc: &DeTable<'_>) -> Result<RawDocument, ConfigError> {
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
                        devices.push(self.device(name, d)?);
                    }
                }
                "group" => {
                    for (name, g) in self.table("group", v)?.iter() {
                        groups.push(self.group(name, g)?);
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
        let manager = manager.ok_or(ConfigError::MissingManager)?;
        Ok(RawDocument {
            manager,
            servers,
            devices,
            groups,
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
                "use-keyring" => use_keyring = self.boolean(&key, v)?,
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
        let mut session_keep = None;
        let mut commands = Vec::new();
        let mut services = Vec::new();
        for (k, v) in t.iter() {
            let key = format!("{table}.{}", k.get_ref());
            match k.get_ref().as_ref() {
                "id52" => id = Some(self.id52(&key, v)?),
                "allow-from" => allow_from = self.list(&key, v)?,
                "ssh" => ssh = self.ssh_target(&key, v)?,
                "addrs" => addrs = self.addrs(&key, v)?,
                "ssh-via" => {
                    ssh_via = self.opt_string(&key, v)?;
                    if let Some(via) = &ssh_via {
                        check_ssh_via(via).map_err(|m| self.bad(&key, v, m))?;
                    }
                }
                "ssh-identity-file" => ssh_identity_file = self.opt_string(&key, v)?,
                "forwarding" => forwarding = self.boolean(&key, v)?,
                "session-keep" => {
                    let text = self.string(&key, v)?;
                    let d = humantime::parse_duration(text.trim()).map_err(|e| {
                        self.bad(&key, v, format!("expected a duration like \"12h\" or \"30m\" (\"0s\": no resume): {e}"))
                    })?;
                    session_keep = Some(d);
                }
                "service" => {
                    for (sk, sv) in self.table(&key, v)?.iter() {
                        services.push(self.service(&key, sk, sv)?);
                    }
                }
                _ if v.get_ref().is_table() => commands.push(self.command(&table, k, v)?),
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
                session_keep,
            },
            line: header_line,
            allow_from,
            commands,
            services,
        })
    }

    /// `[server.<name>.<cmd>]`: the peers that may run one program, and with which arguments.
    fn command(&self, server: &str, k: &Key<'_>, v: &Val<'_>) -> Result<RawCommand, ConfigError> {
        let cmd = k.get_ref().as_ref();
        let key = format!("{server}.{cmd}");
        check_command(cmd).map_err(|reason| ConfigError::BadName {
            table: server.to_string(),
            name: cmd.to_string(),
            reason,
            line: self.line(k.span()),
        })?;
        let ct = self.table(&key, v)?;
        let mut allow_from = self.empty_list(format!("{key}.allow-from"), self.line(k.span()));
        let mut args = None;
        for (ck, cv) in ct.iter() {
            match ck.get_ref().as_ref() {
                "allow-from" => allow_from = self.list(&format!("{key}.allow-from"), cv)?,
                "args" => args = Some(self.arg_patterns(&format!("{key}.args"), cv)?),
                _ => return Err(self.unknown_key(&key, ck)),
            }
        }
        Ok(RawCommand {
            command: cmd.to_string(),
            allow_from,
            args,
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
    ) -> Result<RawService, ConfigError> {
        let name = self.name(parent, name_key)?;
        let table = format!("{parent}.{name}");
        let t = self.table(&table, v)?;
        let mut port = None;
        let mut allow_from =
            self.empty_list(format!("{table}.allow-from"), self.line(name_key.span()));
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
                "allow-from" => allow_from = self.list(&key, v)?,
                _ => return Err(self.unknown_key(&table, k)),
            }
        }
        let http_port = port.ok_or_else(|| ConfigError::MissingKey {
            table: table.clone(),
            key: "http".to_string(),
            line: self.line(name_key.span()),
        })?;
        Ok(RawService {
            name,
            http_port,
            allow_from,
        })
    }

    fn device(&self, name_key: &Key<'_>, v: &Val<'_>) -> Result<RawDevice, ConfigError> {
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
        Ok(RawDevice {
            device: Device { name, id52 },
            line: self.line(name_key.span()),
        })
    }

    fn group(&self, name_key: &Key<'_>, v: &Val<'_>) -> Result<RawGroup, ConfigError> {
        let name = self.name("group", name_key)?;
        let table = format!("group.{name}");
        let t = self.table(&table, v)?;
        let line = self.line(name_key.span());
        let mut members = self.empty_list(format!("{table}.members"), line);
        for (k, v) in t.iter() {
            let key = format!("{table}.{}", k.get_ref());
            match k.get_ref().as_ref() {
                "members" => members = self.list(&key, v)?,
                _ => return Err(self.unknown_key(&table, k)),
            }
        }
        Ok(RawGroup {
            name,
            members,
            line,
        })
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
