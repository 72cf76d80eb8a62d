//! Edits of the cluster file that keep its comments and layout (`toml_edit`).
//!
//! The file is written by people as well as by `malai ssh cluster …`, so commands change only
//! what they must and leave everything else byte for byte. Every edit validates the file
//! before (an edit must not hide an existing mistake) and after (an edit must never leave a
//! file the cluster would refuse), and returns the new text; writing it is the caller's job.

use toml_edit::{Array, DocumentMut, Item, Table, Value};

use super::ConfigError;
use super::checks::check_name;
use super::{ClusterConfig, MemberKind};
use crate::id52::Id52;

/// Why an edit was refused; the file is unchanged in every case.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EditError {
    #[error("the cluster file is invalid, fix it first: {0}")]
    Before(ConfigError),
    #[error("the edit would leave an invalid cluster file: {0}")]
    After(ConfigError),
    /// `toml_edit` follows TOML 1.0 while the parser accepts TOML 1.1, so a valid file can
    /// still be one this module cannot edit.
    #[error("cannot edit the cluster file: TOML error at line {line}: {message}")]
    Toml { line: usize, message: String },
    #[error("invalid name {name:?}: {reason}")]
    BadName { name: String, reason: &'static str },
    #[error("name {name:?} is already used by {by}")]
    NameTaken { name: String, by: String },
    #[error("id52 {id52} is already used by {by}")]
    Id52Taken { id52: String, by: String },
    #[error("no server {0:?} in the cluster file")]
    NoServer(String),
    #[error("no service {service:?} on server {server}")]
    NoService { server: String, service: String },
    #[error("no server or device {0:?} in the cluster file")]
    NoMember(String),
    #[error(
        "cannot allow on {0:?}: expected <server>, <server>.<command> or <server>.service.<service>"
    )]
    BadPath(String),
    #[error("nothing to allow: give at least one name, group or id52")]
    NothingToAllow,
    #[error(
        "cannot remove {0:?}: expected a name, <server>.<command> or <server>.service.<service>"
    )]
    BadRemove(String),
    #[error("no members: give at least one name, group or id52")]
    NoMembers,
    #[error("expected <server>.<command>, got {0:?}")]
    BadScope(String),
    #[error(
        "no command scope {command:?} on server {server}: make it with `cluster allow {server}.{command} <who>` first"
    )]
    NoCommand { server: String, command: String },
    #[error("give at least one pattern (\"\" allows no arguments), or --any")]
    NoPattern,
    #[error("port must be between 1 and 65535")]
    BadPort,
    #[error("no group, server or device {0:?} in the cluster file")]
    NothingToRemove(String),
    #[error("{key} is written in a form this tool does not edit ({found}); edit it by hand")]
    Unsupported { key: String, found: &'static str },
}

/// A commented starter file for a new cluster: the manager entry and, commented out, one
/// example of every kind of entry, so a first-time admin can edit by hand without the docs.
pub fn new_cluster_file(alias: &str, manager: &Id52) -> String {
    format!(
        r#"# malai ssh cluster file: the alias book and access list of cluster {alias_q}.
# The cluster manager pushes it to every member; the key settings of [cluster-manager]
# (use-keyring, private-key-file, private-key) are removed before it is sent.

[cluster-manager]
id52 = "{manager}"
alias = {alias_q}
# Keep the manager's secret key in the OS keyring; with `use-keyring = false` it stays
# in this cluster folder's `secret-key` file (mode 0600). Never put a key in this file.
use-keyring = true

# Add machines with `malai ssh cluster add server|device <name> <id52>` or by hand.
# A machine prints its id52 when it runs `malai ssh cluster join`.
#
# [server.foo]
# id52 = "<foo's id52>"
# allow-from = "alice, admins"   # full access: member names, group names or id52s
# ssh = "127.0.0.1:22"           # where tunnels go, or "embedded" for the built-in server
# addrs = ["203.0.113.7:7744"]   # direct addresses to try before discovery and relays
#
# [server.foo.ls]                # these may run `ls` (with any arguments) and nothing else
# allow-from = "bob"
#
# [server.foo.service.django]    # HTTP service django.foo.{alias_plain} -> 127.0.0.1:8000
# http = 8000
# allow-from = "alice"
#
# [device.alice]                 # a machine that connects but serves nothing
# id52 = "<alice's id52>"
#
# [group.admins]                 # usable wherever a name is; groups may contain groups
# members = "alice, foo"
"#,
        alias_q = Value::from(alias),
        alias_plain = alias.replace(['\n', '\r'], " "),
    )
}

/// Adds `[server.<name>]` or `[device.<name>]` after the existing entries of that kind.
pub fn add_member(
    text: &str,
    kind: MemberKind,
    name: &str,
    id52: &Id52,
) -> Result<String, EditError> {
    check_new_name(name)?;
    let cfg = before(text)?;
    if let Some(by) = name_user(&cfg, name) {
        return Err(EditError::NameTaken {
            name: name.to_string(),
            by,
        });
    }
    if let Some((other, k)) = cfg.name_of(id52) {
        return Err(EditError::Id52Taken {
            id52: id52.to_string(),
            by: format!("{}.{other}", section(k)),
        });
    }
    let mut doc = load(text)?;
    let parent = section_table(&mut doc, section(kind))?;
    let mut t = Table::new();
    t.insert("id52", toml_edit::value(id52.to_string()));
    parent.insert(name, Item::Table(t));
    after(doc)
}

/// Appends names to an `allow-from` list, creating it if needed. `target` is `foo` (full
/// access), `foo.<command>` (command-scoped; the entry is created if missing) or
/// `foo.service.<service>` (an existing service). A string list stays a string, an array
/// stays an array, and names already present are not repeated.
pub fn allow(text: &str, target: &str, who: &[String]) -> Result<String, EditError> {
    let cfg = before(text)?;
    let names = name_list(who)?;
    let parts: Vec<&str> = target.split('.').collect();
    let (server, sub) = match parts.as_slice() {
        [s] => (*s, Sub::Full),
        [s, "service", svc] => (*s, Sub::Service(svc)),
        [s, cmd] if !cmd.is_empty() && !SERVER_KEYS.contains(cmd) => (*s, Sub::Command(cmd)),
        _ => return Err(EditError::BadPath(target.to_string())),
    };
    let server = cfg
        .servers
        .keys()
        .find(|k| k.eq_ignore_ascii_case(server))
        .ok_or_else(|| EditError::NoServer(server.to_string()))?;
    if let Sub::Service(svc) = sub
        && !cfg
            .servers
            .get(server)
            .is_some_and(|s| s.services.contains_key(svc))
    {
        return Err(EditError::NoService {
            server: server.clone(),
            service: svc.to_string(),
        });
    }

    let mut doc = load(text)?;
    let key = format!("server.{server}");
    let server_t = child_table(doc.as_table_mut(), "server", "server")?;
    let server_t = child_table(server_t, server, &key)?;
    let (list_parent, list_key) = match sub {
        Sub::Full => (server_t, format!("{key}.allow-from")),
        Sub::Service(svc) => {
            let services = child_table(server_t, "service", &format!("{key}.service"))?;
            let k = format!("{key}.service.{svc}");
            (child_table(services, svc, &k)?, format!("{k}.allow-from"))
        }
        Sub::Command(cmd) => {
            let k = format!("{key}.{cmd}");
            if server_t.get(cmd).is_none() {
                server_t.insert(cmd, Item::Table(Table::new()));
            }
            (child_table(server_t, cmd, &k)?, format!("{k}.allow-from"))
        }
    };
    match list_parent.get_mut("allow-from") {
        None => {
            list_parent.insert("allow-from", toml_edit::value(names.join(", ")));
        }
        Some(item) => append_names(item, &list_key, &names)?,
    }
    after(doc)
}

/// Makes `[group.<group>]` or adds names to its `members`, so a set of people or machines
/// can be granted access once and named everywhere a name is (`allow foo admins`).
pub fn group(text: &str, group: &str, members: &[String]) -> Result<String, EditError> {
    let cfg = before(text)?;
    let names = name_list(members).map_err(|_| EditError::NoMembers)?;
    let existing = cfg.groups.keys().find(|k| k.eq_ignore_ascii_case(group));
    let mut doc = load(text)?;
    match existing {
        Some(g) => {
            let key = format!("group.{g}");
            let groups = child_table(doc.as_table_mut(), "group", "group")?;
            let t = child_table(groups, g, &key)?;
            match t.get_mut("members") {
                None => {
                    t.insert("members", toml_edit::value(names.join(", ")));
                }
                Some(item) => append_names(item, &format!("{key}.members"), &names)?,
            }
        }
        None => {
            check_new_name(group)?;
            if let Some(by) = name_user(&cfg, group) {
                return Err(EditError::NameTaken {
                    name: group.to_string(),
                    by,
                });
            }
            let parent = section_table(&mut doc, "group")?;
            let mut t = Table::new();
            t.insert("members", toml_edit::value(names.join(", ")));
            parent.insert(group, Item::Table(t));
        }
    }
    after(doc)
}

/// Makes `[server.<server>.service.<service>]` with `http = <port>`, or changes the port of
/// an existing one (its `allow-from` and comments stay). Access is granted separately
/// (`allow <server>.service.<service> …`): a new service is reachable by the server's
/// full-access peers only, as the cluster file says of any service.
pub fn service(text: &str, server: &str, service: &str, port: u16) -> Result<String, EditError> {
    let cfg = before(text)?;
    if port == 0 {
        return Err(EditError::BadPort);
    }
    let server = server_name(&cfg, server)?;
    let existing = cfg.servers[&server]
        .services
        .keys()
        .find(|k| k.eq_ignore_ascii_case(service))
        .cloned();
    if existing.is_none() {
        check_new_name(service)?;
    }
    let mut doc = load(text)?;
    let key = format!("server.{server}");
    let server_t = child_table(doc.as_table_mut(), "server", "server")?;
    let server_t = child_table(server_t, &server, &key)?;
    let services = server_t.entry("service").or_insert_with(|| {
        let mut t = Table::new();
        t.set_implicit(true);
        Item::Table(t)
    });
    let found = services.type_name();
    let services = services.as_table_mut().ok_or(EditError::Unsupported {
        key: format!("{key}.service"),
        found,
    })?;
    match existing {
        Some(svc) => {
            let t = child_table(services, &svc, &format!("{key}.service.{svc}"))?;
            match t.get_mut("http").and_then(Item::as_value_mut) {
                Some(v) => {
                    let decor = v.decor().clone();
                    *v = Value::from(i64::from(port));
                    *v.decor_mut() = decor;
                }
                None => {
                    t.insert("http", toml_edit::value(i64::from(port)));
                }
            }
        }
        None => {
            let mut t = Table::new();
            t.insert("http", toml_edit::value(i64::from(port)));
            services.insert(service, Item::Table(t));
        }
    }
    after(doc)
}

/// Sets (`Some`) or removes (`None`: any arguments) the `args` of the existing command scope
/// `<server>.<command>`. One pattern stays a string, alternatives become an array; `""`
/// allows no arguments at all.
pub fn set_args(text: &str, scope: &str, patterns: Option<&[String]>) -> Result<String, EditError> {
    let cfg = before(text)?;
    let (server, command) = match scope.split('.').collect::<Vec<_>>().as_slice() {
        [s, c] if !c.is_empty() && !SERVER_KEYS.contains(c) => (s.to_string(), c.to_string()),
        _ => return Err(EditError::BadScope(scope.to_string())),
    };
    let server = server_name(&cfg, &server)?;
    let command = cfg.servers[&server]
        .commands
        .keys()
        .find(|k| **k == command)
        .cloned()
        .ok_or_else(|| EditError::NoCommand {
            server: server.clone(),
            command: command.clone(),
        })?;
    let mut doc = load(text)?;
    let key = format!("server.{server}");
    let server_t = child_table(doc.as_table_mut(), "server", "server")?;
    let server_t = child_table(server_t, &server, &key)?;
    let t = child_table(server_t, &command, &format!("{key}.{command}"))?;
    match patterns {
        None => {
            t.remove("args");
        }
        Some([]) => return Err(EditError::NoPattern),
        Some([one]) => {
            t.insert("args", toml_edit::value(one.as_str()));
        }
        Some(many) => {
            let arr: Array = many.iter().map(String::as_str).collect();
            t.insert("args", toml_edit::value(arr));
        }
    }
    after(doc)
}

/// The names of a `who`/`members` argument list: split on commas, trimmed, deduplicated
/// (case-insensitively), at least one.
fn name_list(who: &[String]) -> Result<Vec<String>, EditError> {
    let mut names: Vec<String> = Vec::new();
    for w in who.iter().flat_map(|w| w.split(',')).map(str::trim) {
        if !w.is_empty() && !names.iter().any(|n| n.eq_ignore_ascii_case(w)) {
            names.push(w.to_string());
        }
    }
    if names.is_empty() {
        return Err(EditError::NothingToAllow);
    }
    Ok(names)
}

/// The server's name as the file spells it.
fn server_name(cfg: &ClusterConfig, server: &str) -> Result<String, EditError> {
    cfg.servers
        .keys()
        .find(|k| k.eq_ignore_ascii_case(server))
        .cloned()
        .ok_or_else(|| EditError::NoServer(server.to_string()))
}

/// Keys of a server table that are not command entries, so `foo.<key>` cannot name one.
const SERVER_KEYS: [&str; 7] = [
    "id52",
    "allow-from",
    "ssh",
    "addrs",
    "ssh-via",
    "ssh-identity-file",
    "service",
];

enum Sub<'a> {
    Full,
    Service(&'a str),
    Command(&'a str),
}

/// Removes what `cluster remove` names: a server or device and every mention of it (by name
/// or id52), a group and every mention of it, so no stale grant outlives it; or one command
/// scope (`foo.ls`) or service (`foo.service.web`) of a server.
pub fn remove(text: &str, name: &str) -> Result<String, EditError> {
    let cfg = before(text)?;
    if name.contains('.') {
        return remove_entry(&cfg, text, name);
    }
    if cfg
        .members()
        .iter()
        .any(|(n, _, _)| n.eq_ignore_ascii_case(name))
    {
        return remove_member(text, name);
    }
    let group = cfg
        .groups
        .keys()
        .find(|k| k.eq_ignore_ascii_case(name))
        .cloned()
        .ok_or_else(|| EditError::NothingToRemove(name.to_string()))?;
    let mut doc = load(text)?;
    if let Some(t) = doc.get_mut("group").and_then(Item::as_table_like_mut) {
        t.remove(&group);
    }
    remove_mentions(&mut doc, &|entry: &str| entry.eq_ignore_ascii_case(&group));
    after(doc)
}

/// `foo.ls` or `foo.service.web`: that table goes, the rest of the server stays.
fn remove_entry(cfg: &ClusterConfig, text: &str, path: &str) -> Result<String, EditError> {
    let parts: Vec<&str> = path.split('.').collect();
    let (server, sub) = match parts.as_slice() {
        [s, "service", svc] => (*s, Sub::Service(svc)),
        [s, cmd] if !cmd.is_empty() && !SERVER_KEYS.contains(cmd) => (*s, Sub::Command(cmd)),
        _ => return Err(EditError::BadRemove(path.to_string())),
    };
    let server = server_name(cfg, server)?;
    let s = &cfg.servers[&server];
    let mut doc = load(text)?;
    let key = format!("server.{server}");
    let server_t = child_table(doc.as_table_mut(), "server", "server")?;
    let server_t = child_table(server_t, &server, &key)?;
    match sub {
        Sub::Service(svc) => {
            let svc = s
                .services
                .keys()
                .find(|k| k.eq_ignore_ascii_case(svc))
                .ok_or_else(|| EditError::NoService {
                    server: server.clone(),
                    service: svc.to_string(),
                })?;
            let services = child_table(server_t, "service", &format!("{key}.service"))?;
            services.remove(svc);
            if services.is_empty() {
                server_t.remove("service");
            }
        }
        Sub::Command(cmd) => {
            if !s.commands.contains_key(cmd) {
                return Err(EditError::NoCommand {
                    server: server.clone(),
                    command: cmd.to_string(),
                });
            }
            server_t.remove(cmd);
        }
        Sub::Full => unreachable!("a path with a dot names a command or a service"),
    }
    after(doc)
}

/// Removes a server or device and every mention of it (by name or id52) from `allow-from`
/// lists and group `members`, so no stale grant outlives the machine.
pub fn remove_member(text: &str, name: &str) -> Result<String, EditError> {
    let cfg = before(text)?;
    let (name, kind, id) = cfg
        .members()
        .into_iter()
        .find(|(n, _, _)| n.eq_ignore_ascii_case(name))
        .ok_or_else(|| EditError::NoMember(name.to_string()))?;
    let mut doc = load(text)?;
    let sec = section(kind);
    if let Some(t) = doc.get_mut(sec).and_then(Item::as_table_like_mut) {
        t.remove(&name);
    }
    let id = id.to_string();
    remove_mentions(&mut doc, &|entry: &str| {
        entry.eq_ignore_ascii_case(&name) || entry == id
    });
    after(doc)
}

/// Drops the entries `gone` matches from every `allow-from` list (server, command scope,
/// service) and every group's `members`.
fn remove_mentions(doc: &mut DocumentMut, gone: &dyn Fn(&str) -> bool) {
    if let Some(servers) = doc.get_mut("server").and_then(Item::as_table_like_mut) {
        for (_, server) in servers.iter_mut() {
            let Some(server) = server.as_table_like_mut() else {
                continue;
            };
            for (k, item) in server.iter_mut() {
                if k.get() == "allow-from" {
                    remove_names(item, gone);
                } else if k.get() == "service" {
                    if let Some(services) = item.as_table_like_mut() {
                        for (_, svc) in services.iter_mut() {
                            if let Some(list) = svc
                                .as_table_like_mut()
                                .and_then(|t| t.get_mut("allow-from"))
                            {
                                remove_names(list, gone);
                            }
                        }
                    }
                } else if let Some(list) = item
                    .as_table_like_mut()
                    .and_then(|t| t.get_mut("allow-from"))
                {
                    remove_names(list, gone);
                }
            }
        }
    }
    if let Some(groups) = doc.get_mut("group").and_then(Item::as_table_like_mut) {
        for (_, group) in groups.iter_mut() {
            if let Some(list) = group.as_table_like_mut().and_then(|t| t.get_mut("members")) {
                remove_names(list, gone);
            }
        }
    }
}

/// The file as pushed to members: without the manager's key settings, which say where the
/// manager's secret lives (or hold it) and are nobody else's business, and without any
/// comment: a commented-out `# private-key = "…"` (or any note the admin keeps for
/// themself) must not reach every member. Blank lines and layout stay.
pub fn strip_secrets(text: &str) -> Result<String, EditError> {
    before(text)?;
    after(stripped_doc(text)?)
}

/// [`strip_secrets`] for a file that is TOML but not a valid cluster file (`cluster push
/// --file` of a deliberately bad file, which the member must refuse): the same removal,
/// without validation. Text that is not TOML cannot be stripped and is an error: it is
/// never sent as it is, since it may hold the manager's secrets.
pub fn strip_secrets_unchecked(text: &str) -> Result<String, EditError> {
    Ok(stripped_doc(text)?.to_string())
}

fn stripped_doc(text: &str) -> Result<DocumentMut, EditError> {
    let mut doc = load(text)?;
    if let Some(m) = doc
        .get_mut("cluster-manager")
        .and_then(Item::as_table_like_mut)
    {
        for key in ["use-keyring", "private-key-file", "private-key"] {
            m.remove(key);
        }
    }
    uncomment_table(doc.as_table_mut());
    let trailing = doc.trailing().as_str().map(uncomment);
    if let Some(t) = trailing {
        doc.set_trailing(t);
    }
    Ok(doc)
}

/// `s` (TOML whitespace and comments, as found around items) without its comments: lines
/// that were only a comment go, a trailing comment is cut with the spaces before it.
fn uncomment(s: &str) -> String {
    if !s.contains('#') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    for piece in s.split_inclusive('\n') {
        let (body, nl) = match piece.strip_suffix('\n') {
            Some(b) => (b, "\n"),
            None => (piece, ""),
        };
        match body.find('#') {
            None => out.push_str(piece),
            Some(i) if body[..i].trim().is_empty() && !nl.is_empty() => {}
            Some(i) => {
                out.push_str(body[..i].trim_end());
                out.push_str(nl);
            }
        }
    }
    out
}

fn uncomment_decor(d: &mut toml_edit::Decor) {
    let prefix = d.prefix().and_then(|r| r.as_str()).map(uncomment);
    let suffix = d.suffix().and_then(|r| r.as_str()).map(uncomment);
    if let Some(p) = prefix {
        d.set_prefix(p);
    }
    if let Some(s) = suffix {
        d.set_suffix(s);
    }
}

fn uncomment_value(v: &mut toml_edit::Value) {
    uncomment_decor(v.decor_mut());
    if let toml_edit::Value::Array(a) = v {
        for x in a.iter_mut() {
            uncomment_value(x);
        }
        let t = a.trailing().as_str().map(uncomment);
        if let Some(t) = t {
            a.set_trailing(t);
        }
    }
}

fn uncomment_item(item: &mut Item) {
    match item {
        Item::Value(v) => uncomment_value(v),
        Item::Table(t) => uncomment_table(t),
        Item::ArrayOfTables(a) => {
            for t in a.iter_mut() {
                uncomment_table(t);
            }
        }
        Item::None => {}
    }
}

fn uncomment_table(t: &mut toml_edit::Table) {
    uncomment_decor(t.decor_mut());
    for (mut k, item) in t.iter_mut() {
        uncomment_decor(k.leaf_decor_mut());
        uncomment_decor(k.dotted_decor_mut());
        uncomment_item(item);
    }
}

fn section(kind: MemberKind) -> &'static str {
    match kind {
        MemberKind::Server => "server",
        MemberKind::Device => "device",
    }
}

/// Names made by this tool follow the strictest form the parser accepts, so they work
/// unchanged as DNS labels and in every list.
fn check_new_name(name: &str) -> Result<(), EditError> {
    let bad = |reason| {
        Err(EditError::BadName {
            name: name.to_string(),
            reason,
        })
    };
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if c.is_ascii_lowercase() || c.is_ascii_digit() => {}
        _ => return bad("names start with a lowercase letter or a digit"),
    }
    if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_') {
        return bad("names use only lowercase letters, digits, '-' and '_'");
    }
    if name == "service" {
        return bad("\"service\" is reserved");
    }
    check_name(name).or_else(bad)
}

/// Which table already uses `name` (servers, devices and groups share one namespace).
fn name_user(cfg: &ClusterConfig, name: &str) -> Option<String> {
    let hit = |k: &String| k.eq_ignore_ascii_case(name);
    if let Some(k) = cfg.servers.keys().find(|k| hit(k)) {
        return Some(format!("server.{k}"));
    }
    if let Some(k) = cfg.devices.keys().find(|k| hit(k)) {
        return Some(format!("device.{k}"));
    }
    cfg.groups
        .keys()
        .find(|k| hit(k))
        .map(|k| format!("group.{k}"))
}

fn before(text: &str) -> Result<ClusterConfig, EditError> {
    ClusterConfig::parse(text).map_err(EditError::Before)
}

fn after(doc: DocumentMut) -> Result<String, EditError> {
    let text = doc.to_string();
    ClusterConfig::parse(&text).map_err(EditError::After)?;
    Ok(text)
}

fn load(text: &str) -> Result<DocumentMut, EditError> {
    text.parse::<DocumentMut>().map_err(|e| EditError::Toml {
        line: e
            .span()
            .map(|s| {
                text.as_bytes()
                    .iter()
                    .take(s.start)
                    .filter(|b| **b == b'\n')
                    .count()
                    + 1
            })
            .unwrap_or(1),
        message: e
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
    })
}

/// The top-level `[server]`/`[device]` table, created (without a header of its own) if the
/// file has none yet.
fn section_table<'d>(doc: &'d mut DocumentMut, name: &str) -> Result<&'d mut Table, EditError> {
    let item = doc.as_table_mut().entry(name).or_insert_with(|| {
        let mut t = Table::new();
        t.set_implicit(true);
        Item::Table(t)
    });
    let found = item.type_name();
    item.as_table_mut().ok_or(EditError::Unsupported {
        key: name.to_string(),
        found,
    })
}

/// A sub-table written as a `[header]` table; inline tables are left to hand edits because
/// adding to them would need a different kind of item.
fn child_table<'t>(
    parent: &'t mut Table,
    key: &str,
    path: &str,
) -> Result<&'t mut Table, EditError> {
    let item = parent.get_mut(key).ok_or_else(|| EditError::Unsupported {
        key: path.to_string(),
        found: "missing",
    })?;
    let found = item.type_name();
    item.as_table_mut().ok_or(EditError::Unsupported {
        key: path.to_string(),
        found,
    })
}

/// Replaces a string value's text, keeping the comments and spacing around it.
fn set_str(v: &mut Value, s: String) {
    let decor = v.decor().clone();
    *v = Value::from(s);
    *v.decor_mut() = decor;
}

fn split_names(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string)
        .collect()
}

fn append_names(item: &mut Item, key: &str, names: &[String]) -> Result<(), EditError> {
    let found = item.type_name();
    let unsupported = || EditError::Unsupported {
        key: key.to_string(),
        found,
    };
    let value = item.as_value_mut().ok_or_else(unsupported)?;
    match value {
        Value::String(s) => {
            let mut entries = split_names(s.value());
            for n in names {
                if !entries.iter().any(|e| e.eq_ignore_ascii_case(n)) {
                    entries.push(n.clone());
                }
            }
            set_str(value, entries.join(", "));
        }
        Value::Array(arr) => {
            let present: Vec<String> = arr
                .iter()
                .filter_map(Value::as_str)
                .flat_map(split_names)
                .collect();
            for n in names {
                if !present.iter().any(|e| e.eq_ignore_ascii_case(n)) {
                    arr.push(n.as_str());
                }
            }
        }
        _ => return Err(unsupported()),
    }
    Ok(())
}

/// Drops matching entries from a list in either form; lists of other types are left for the
/// final validation to report.
fn remove_names(item: &mut Item, gone: &dyn Fn(&str) -> bool) {
    let Some(value) = item.as_value_mut() else {
        return;
    };
    match value {
        Value::String(s) => {
            let entries = split_names(s.value());
            if entries.iter().any(|e| gone(e)) {
                let kept: Vec<String> = entries.into_iter().filter(|e| !gone(e)).collect();
                set_str(value, kept.join(", "));
            }
        }
        Value::Array(arr) => remove_from_array(arr, gone),
        _ => {}
    }
}

fn remove_from_array(arr: &mut Array, gone: &dyn Fn(&str) -> bool) {
    for i in (0..arr.len()).rev() {
        let Some(v) = arr.get_mut(i) else {
            continue;
        };
        let Some(s) = v.as_str() else {
            continue;
        };
        let entries = split_names(s);
        if !entries.iter().any(|e| gone(e)) {
            continue;
        }
        let kept: Vec<String> = entries.into_iter().filter(|e| !gone(e)).collect();
        if kept.is_empty() {
            arr.remove(i);
        } else {
            set_str(v, kept.join(", "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> Id52 {
        Id52::from_bytes([n; 32])
    }

    fn sample() -> String {
        format!(
            r#"# Top comment.
[cluster-manager]
id52 = "{m}"
alias = "amitu.com"
use-keyring = false # not on servers
# the key file
private-key-file = ""
private-key = ""

# Web box.
[server.foo]
id52 = "{foo}"
allow-from = "alice, admins" # full access

[server.foo.ls]
allow-from = ["bob", "alice, {raw}"]

[server.foo.service.django]
http = 8000
allow-from = "alice"

# Laptops below.
[device.alice]
id52 = "{alice}"

[device.bob]
id52 = "{bob}"

[group.admins]
members = "alice, bob" # people
"#,
            m = id(1),
            foo = id(2),
            alice = id(4),
            bob = id(5),
            raw = id(9),
        )
    }

    fn cfg(text: &str) -> ClusterConfig {
        ClusterConfig::parse(text).unwrap()
    }

    fn assert_comments_kept(text: &str) {
        assert_comments_kept_but(text, "")
    }

    fn assert_comments_kept_but(text: &str, except: &str) {
        for c in [
            "# Top comment.",
            "# Web box.",
            "# full access",
            "# Laptops below.",
            "# people",
        ] {
            assert!(c == except || text.contains(c), "lost {c:?} in:\n{text}");
        }
    }

    #[test]
    fn new_file_parses() {
        let text = new_cluster_file("amitu.com", &id(1));
        let c = cfg(&text);
        assert_eq!(c.manager, id(1));
        assert_eq!(c.alias.as_deref(), Some("amitu.com"));
        assert!(c.use_keyring);
        assert!(c.servers.is_empty() && c.devices.is_empty() && c.groups.is_empty());
        assert!(text.contains("# [server.foo]") && text.contains("# [group.admins]"));
        // Adding to it lands the entries above the commented examples.
        let text = add_member(&text, MemberKind::Server, "web", &id(2)).unwrap();
        let text = add_member(&text, MemberKind::Device, "me", &id(3)).unwrap();
        let c = cfg(&text);
        assert_eq!(c.servers["web"].id52, id(2));
        assert_eq!(c.devices["me"].id52, id(3));
        let web = text.find("[server.web]").unwrap();
        let example = text.find("# [server.foo]").unwrap();
        assert!(web < example, "{text}");
    }

    #[test]
    fn add_member_keeps_comments_and_order() {
        let text = add_member(&sample(), MemberKind::Server, "bar", &id(3)).unwrap();
        assert_comments_kept(&text);
        assert_eq!(cfg(&text).servers["bar"].id52, id(3));
        // Placed with the other servers, before the devices.
        let bar = text.find("[server.bar]").unwrap();
        assert!(text.find("[server.foo.service.django]").unwrap() < bar);
        assert!(bar < text.find("[device.alice]").unwrap(), "{text}");
        // The untouched part is byte for byte the same.
        let head = sample();
        let cut = head.find("# Laptops below.").unwrap();
        assert!(text.starts_with(head.get(..cut).unwrap().trim_end()));

        let text = add_member(&sample(), MemberKind::Device, "carol", &id(6)).unwrap();
        assert_comments_kept(&text);
        assert_eq!(cfg(&text).devices["carol"].id52, id(6));
    }

    #[test]
    fn add_member_to_file_without_section() {
        let text = format!("[cluster-manager]\nid52 = \"{}\"\n", id(1));
        let text = add_member(&text, MemberKind::Device, "d", &id(2)).unwrap();
        assert_eq!(
            text,
            format!(
                "[cluster-manager]\nid52 = \"{}\"\n\n[device.d]\nid52 = \"{}\"\n",
                id(1),
                id(2)
            )
        );
    }

    #[test]
    fn add_member_errors() {
        let s = sample();
        let e = add_member(&s, MemberKind::Server, "alice", &id(3)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "name \"alice\" is already used by device.alice"
        );
        let e = add_member(&s, MemberKind::Device, "admins", &id(3)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "name \"admins\" is already used by group.admins"
        );
        let e = add_member(&s, MemberKind::Device, "new", &id(2)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("id52 {} is already used by server.foo", id(2))
        );
        for bad in ["", "Foo", "a.b", "-x", "_x", "a b", "service", "é"] {
            let e = add_member(&s, MemberKind::Server, bad, &id(3)).unwrap_err();
            assert!(matches!(e, EditError::BadName { .. }), "{bad}: {e}");
        }
        let e = add_member(&s, MemberKind::Server, &id(3).to_string(), &id(3)).unwrap_err();
        assert!(e.to_string().contains("cannot look like an id52"), "{e}");
        let e = add_member("nope", MemberKind::Server, "x", &id(3)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the cluster file is invalid, fix it first: "),
            "{e}"
        );
        // The manager's id52 may be added: the manager machine can serve its own cluster.
        add_member(&s, MemberKind::Server, "m", &id(1)).unwrap();
    }

    #[test]
    fn allow_full_access_keeps_string_form() {
        let text = allow(
            &sample(),
            "foo",
            &["bob".into(), "alice".into(), "BOB".into()],
        )
        .unwrap();
        assert_comments_kept(&text);
        assert!(
            text.contains("allow-from = \"alice, admins, bob\" # full access"),
            "{text}"
        );
        let mut want = vec![id(4), id(5)];
        want.sort();
        assert_eq!(cfg(&text).servers["foo"].allow_from, want);
    }

    #[test]
    fn allow_array_form_and_command_entry() {
        let text = allow(&sample(), "foo.ls", &[id(7).to_string(), "bob".into()]).unwrap();
        assert!(
            text.contains(&format!(
                "allow-from = [\"bob\", \"alice, {}\", \"{}\"]",
                id(9),
                id(7)
            )),
            "{text}"
        );
        assert!(
            cfg(&text).servers["foo"].commands["ls"]
                .allow_from
                .contains(&id(7))
        );
        // A new command entry is created.
        let text = allow(&sample(), "foo.rsync", &["bob, alice".into()]).unwrap();
        assert_comments_kept(&text);
        let c = cfg(&text);
        let mut want = vec![id(4), id(5)];
        want.sort();
        assert_eq!(c.servers["foo"].commands["rsync"].allow_from, want);
        assert!(
            text.contains("[server.foo.rsync]\nallow-from = \"bob, alice\""),
            "{text}"
        );
    }

    #[test]
    fn allow_service() {
        let text = allow(&sample(), "foo.service.django", &["bob".into()]).unwrap();
        assert!(text.contains("allow-from = \"alice, bob\""), "{text}");
        let mut want = vec![id(4), id(5)];
        want.sort();
        assert_eq!(
            cfg(&text).servers["foo"].services["django"].allow_from,
            want
        );
    }

    #[test]
    fn allow_creates_missing_list() {
        let text = format!(
            "[cluster-manager]\nid52 = \"{}\"\n[server.s]\nid52 = \"{}\"\n",
            id(1),
            id(2)
        );
        let text = allow(&text, "s", &[id(8).to_string()]).unwrap();
        assert_eq!(cfg(&text).servers["s"].allow_from, vec![id(8)]);
        assert!(
            text.ends_with(&format!("allow-from = \"{}\"\n", id(8))),
            "{text}"
        );
    }

    #[test]
    fn allow_errors() {
        let s = sample();
        let e = |t: &str, who: &[&str]| {
            let who: Vec<String> = who.iter().map(|w| w.to_string()).collect();
            allow(&s, t, &who).unwrap_err().to_string()
        };
        assert_eq!(
            e("nope", &["bob"]),
            "no server \"nope\" in the cluster file"
        );
        assert_eq!(
            e("alice", &["bob"]),
            "no server \"alice\" in the cluster file"
        );
        assert_eq!(
            e("foo.service.flask", &["bob"]),
            "no service \"flask\" on server foo"
        );
        assert!(e("foo.service", &["bob"]).starts_with("cannot allow on \"foo.service\""));
        assert!(e("foo.a.b", &["bob"]).starts_with("cannot allow on"));
        assert!(e("foo.", &["bob"]).starts_with("cannot allow on"));
        assert!(e("foo.ssh", &["bob"]).starts_with("cannot allow on \"foo.ssh\""));
        assert!(e("foo.id52", &["bob"]).starts_with("cannot allow on"));
        assert_eq!(
            e("foo", &[" ", ","]),
            "nothing to allow: give at least one name, group or id52"
        );
        assert_eq!(
            e("foo", &["carol"]),
            "the edit would leave an invalid cluster file: server.foo.allow-from: unknown name \"carol\" (line 13)"
        );
        assert!(e("foo.l s", &["bob"]).contains("invalid name \"l s\""));
    }

    #[test]
    fn remove_member_cleans_every_list() {
        let text = remove_member(&sample(), "alice").unwrap();
        // The comment right above a table belongs to it and goes with it.
        assert_comments_kept_but(&text, "# Laptops below.");
        assert!(!text.contains("# Laptops below."));
        assert!(!text.contains("[device.alice]"), "{text}");
        assert!(
            text.contains("allow-from = \"admins\" # full access"),
            "{text}"
        );
        assert!(
            text.contains(&format!("allow-from = [\"bob\", \"{}\"]", id(9))),
            "{text}"
        );
        assert!(text.contains("members = \"bob\" # people"), "{text}");
        let c = cfg(&text);
        assert!(!c.devices.contains_key("alice"));
        assert!(c.servers["foo"].services["django"].allow_from.is_empty());
        assert_eq!(c.servers["foo"].allow_from, vec![id(5)]);
    }

    #[test]
    fn remove_member_by_id52_mentions_and_server() {
        let text = format!(
            "[cluster-manager]\nid52 = \"{m}\"\n[server.a]\nid52 = \"{a}\"\nallow-from = \"{b}, b\"\n\
             [server.b]\nid52 = \"{b}\"\nallow-from = [\"{a}\"]\n[group.g]\nmembers = [\"a\", \"b\"]\n",
            m = id(1),
            a = id(2),
            b = id(3)
        );
        let out = remove_member(&text, "b").unwrap();
        let c = cfg(&out);
        assert!(c.servers["a"].allow_from.is_empty());
        assert!(!c.servers.contains_key("b"));
        assert_eq!(c.groups["g"].members, vec!["a"]);
        let out = remove_member(&text, "A").unwrap();
        assert!(cfg(&out).groups["g"].members == vec!["b"]);
    }

    #[test]
    fn remove_member_errors() {
        let e = remove_member(&sample(), "admins").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no server or device \"admins\" in the cluster file"
        );
        let e = remove_member(&sample(), "zed").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no server or device \"zed\" in the cluster file"
        );
        assert!(matches!(
            remove_member("[x", "a").unwrap_err(),
            EditError::Before(_)
        ));
    }

    #[test]
    fn group_extends_an_existing_group_in_its_own_form() {
        let text = group(&sample(), "Admins", &["foo, alice".into(), "bob".into()]).unwrap();
        assert!(
            text.contains("members = \"alice, bob, foo\" # people"),
            "{text}"
        );
        assert_eq!(cfg(&text).groups["admins"].members, ["alice", "bob", "foo"]);
        assert_comments_kept(&text);
    }

    #[test]
    fn group_makes_a_new_group_that_can_name_groups() {
        let text = group(&sample(), "ops", &["admins".into(), "foo".into()]).unwrap();
        assert!(
            text.contains("[group.ops]\nmembers = \"admins, foo\"\n"),
            "{text}"
        );
        assert_eq!(cfg(&text).groups["ops"].members, ["alice", "bob", "foo"]);
        assert_comments_kept(&text);
        let text = allow(&text, "foo", &["ops".into()]).unwrap();
        assert!(
            text.contains("allow-from = \"alice, admins, ops\""),
            "{text}"
        );
    }

    #[test]
    fn group_errors() {
        let s = sample();
        let e = |g: &str, m: &[&str]| {
            let m: Vec<String> = m.iter().map(|w| w.to_string()).collect();
            group(&s, g, &m).unwrap_err().to_string()
        };
        assert_eq!(
            e("foo", &["bob"]),
            "name \"foo\" is already used by server.foo"
        );
        assert!(e("Ops", &["bob"]).starts_with("invalid name \"Ops\""));
        assert_eq!(
            e("ops", &[","]),
            "no members: give at least one name, group or id52"
        );
        assert!(
            e("ops", &["carol"]).contains("group.ops.members: unknown name \"carol\""),
            "{}",
            e("ops", &["carol"])
        );
    }

    #[test]
    fn service_adds_one_and_changes_a_port() {
        let text = service(&sample(), "foo", "web", 8080).unwrap();
        assert!(
            text.contains("[server.foo.service.web]\nhttp = 8080\n"),
            "{text}"
        );
        let c = cfg(&text);
        assert_eq!(c.servers["foo"].services["web"].http_port, 8080);
        assert_eq!(c.servers["foo"].services["django"].http_port, 8000);
        assert_comments_kept(&text);
        let text = service(&text, "foo", "django", 9000).unwrap();
        let c = cfg(&text);
        assert_eq!(c.servers["foo"].services["django"].http_port, 9000);
        assert_eq!(c.servers["foo"].services["django"].allow_from, vec![id(4)]);
        // A server with no service yet gets its first one.
        let bare = format!(
            "[cluster-manager]\nid52 = \"{}\"\n[server.s]\nid52 = \"{}\"\n",
            id(1),
            id(2)
        );
        let text = service(&bare, "s", "api", 3000).unwrap();
        assert_eq!(cfg(&text).servers["s"].services["api"].http_port, 3000);
        assert!(
            text.ends_with("[server.s.service.api]\nhttp = 3000\n"),
            "{text}"
        );
    }

    #[test]
    fn service_errors() {
        let s = sample();
        let e = |srv: &str, svc: &str, port| service(&s, srv, svc, port).unwrap_err().to_string();
        assert_eq!(
            e("nope", "web", 80),
            "no server \"nope\" in the cluster file"
        );
        assert_eq!(
            e("alice", "web", 80),
            "no server \"alice\" in the cluster file"
        );
        assert_eq!(e("foo", "web", 0), "port must be between 1 and 65535");
        assert!(e("foo", "We b", 80).starts_with("invalid name \"We b\""));
    }

    #[test]
    fn args_pins_clears_and_takes_alternatives() {
        let text = set_args(&sample(), "foo.ls", Some(&["-l *".into()])).unwrap();
        assert!(text.contains("args = \"-l *\""), "{text}");
        assert_eq!(
            cfg(&text).servers["foo"].commands["ls"].args,
            Some(vec![vec!["-l".to_string(), "*".to_string()]])
        );
        let text = set_args(&text, "foo.ls", Some(&["-a".into(), "".into()])).unwrap();
        assert!(text.contains("args = [\"-a\", \"\"]"), "{text}");
        assert_eq!(
            cfg(&text).servers["foo"].commands["ls"].args,
            Some(vec![vec!["-a".to_string()], vec![]])
        );
        let text = set_args(&text, "foo.ls", None).unwrap();
        assert!(!text.contains("args"), "{text}");
        assert_eq!(cfg(&text).servers["foo"].commands["ls"].args, None);
        assert_comments_kept(&text);
    }

    #[test]
    fn args_errors() {
        let s = sample();
        let e = |scope: &str, p: Option<&[String]>| set_args(&s, scope, p).unwrap_err().to_string();
        assert_eq!(
            e("foo.rsync", Some(&["--server *".into()])),
            "no command scope \"rsync\" on server foo: make it with `cluster allow foo.rsync <who>` first"
        );
        assert_eq!(e("foo", None), "expected <server>.<command>, got \"foo\"");
        assert_eq!(
            e("foo.service", None),
            "expected <server>.<command>, got \"foo.service\""
        );
        assert_eq!(e("bar.ls", None), "no server \"bar\" in the cluster file");
        assert_eq!(
            e("foo.ls", Some(&[])),
            "give at least one pattern (\"\" allows no arguments), or --any"
        );
    }

    #[test]
    fn remove_takes_groups_scopes_and_services() {
        let text = remove(&sample(), "admins").unwrap();
        assert!(!text.contains("[group.admins]"), "{text}");
        assert!(
            text.contains("allow-from = \"alice\" # full access"),
            "{text}"
        );
        assert!(cfg(&text).groups.is_empty());
        let text = remove(&sample(), "foo.ls").unwrap();
        assert!(!text.contains("[server.foo.ls]"), "{text}");
        assert!(cfg(&text).servers["foo"].commands.is_empty());
        let text = remove(&sample(), "foo.service.django").unwrap();
        assert!(!text.contains("django"), "{text}");
        assert!(cfg(&text).servers["foo"].services.is_empty());
        let text = remove(&sample(), "bob").unwrap();
        assert!(!text.contains("[device.bob]"));
        let e = |n: &str| remove(&sample(), n).unwrap_err().to_string();
        assert_eq!(
            e("zed"),
            "no group, server or device \"zed\" in the cluster file"
        );
        assert_eq!(e("foo.service.web"), "no service \"web\" on server foo");
        assert!(e("foo.rsync").starts_with("no command scope \"rsync\" on server foo"));
        assert!(e("foo.a.b").starts_with("cannot remove \"foo.a.b\""));
    }

    #[test]
    fn strip_secrets_removes_key_settings() {
        let text = strip_secrets(&sample()).unwrap();
        for k in ["use-keyring", "private-key-file", "private-key"] {
            assert!(!text.contains(k), "{k} left in:\n{text}");
        }
        // No comment survives (a commented-out key would reach every member).
        assert!(!text.contains('#'), "a comment was pushed:\n{text}");
        let c = cfg(&text);
        assert_eq!(c.alias.as_deref(), Some("amitu.com"));
        assert!(c.use_keyring && c.private_key_file.is_none() && c.private_key.is_none());
        // Everything else is unchanged.
        let mut want = cfg(&sample());
        want.use_keyring = true;
        want.private_key_file = None;
        assert_eq!(c, want);
        // Idempotent.
        assert_eq!(strip_secrets(&text).unwrap(), text);
        let starter = new_cluster_file("x", &id(1));
        let stripped = strip_secrets(&starter).unwrap();
        assert!(!stripped.contains("use-keyring = true"));
    }

    #[test]
    fn strip_secrets_drops_commented_out_keys_everywhere() {
        let secret = "ab".repeat(32);
        let text = format!(
            "# private-key = \"{secret}\"\n[cluster-manager]\nid52 = \"{}\" # {secret}\n# private-key = \"{secret}\"\n\n[server.foo]\nid52 = \"{}\"\naddrs = [\n  \"127.0.0.1:1\", # {secret}\n  # {secret}\n]\n# {secret}\n",
            id(1),
            id(2)
        );
        let out = strip_secrets(&text).unwrap();
        assert!(!out.contains(&secret) && !out.contains('#'), "{out}");
        let c = cfg(&out);
        assert_eq!(c.servers["foo"].addrs.len(), 1);
        // Allowed twin: a '#' inside a string value is data, not a comment, and stays.
        let text = format!(
            "[cluster-manager]\nid52 = \"{}\"\n\n[server.foo]\nid52 = \"{}\"\nssh-via = \"a@b#c\"\n",
            id(1),
            id(2)
        );
        let _ = strip_secrets(&text).map(|o| assert!(o.contains("a@b#c"), "{o}"));
        // A file that is TOML but not a valid cluster file is still stripped; not TOML is
        // an error (never passed on as it is).
        let bad = format!(
            "[cluster-manager]\nid52 = \"{}\"\nprivate-key = \"{secret}\"\nbogus = 1 # {secret}\n",
            id(1)
        );
        assert!(strip_secrets(&bad).is_err());
        let out = strip_secrets_unchecked(&bad).unwrap();
        assert!(!out.contains(&secret) && out.contains("bogus"), "{out}");
        assert!(strip_secrets_unchecked("[x\nprivate-key = \"k\"").is_err());
        assert_eq!(uncomment("  # x\n\n"), "\n");
        assert_eq!(uncomment(" # x"), "");
    }

    #[test]
    fn never_panics_on_mutated_files() {
        let text = sample();
        let mut st = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            st ^= st << 13;
            st ^= st >> 7;
            st ^= st << 17;
            st
        };
        for _ in 0..300 {
            let mut b = text.clone().into_bytes();
            for _ in 0..(1 + next() % 3) {
                let at = (next() % b.len().max(1) as u64) as usize;
                let end = (at + (next() % 10) as usize).min(b.len());
                if next() % 2 == 0 {
                    b.drain(at..end);
                } else {
                    let copy = b.get(at..end).unwrap_or_default().to_vec();
                    b.splice(at..at, copy);
                }
            }
            let t = String::from_utf8_lossy(&b);
            let _ = add_member(&t, MemberKind::Server, "zz", &id(77));
            let _ = allow(&t, "foo.ls", &["bob".into()]);
            let _ = allow(&t, "foo", &["alice".into()]);
            let _ = remove_member(&t, "alice");
            let _ = remove_member(&t, "foo");
            let _ = strip_secrets(&t);
        }
    }

    #[test]
    fn inline_tables_are_refused_not_mangled() {
        let text = format!(
            "[cluster-manager]\nid52 = \"{}\"\n[server]\nfoo = {{ id52 = \"{}\" }}\n",
            id(1),
            id(2)
        );
        let e = allow(&text, "foo.ls", &[id(3).to_string()]).unwrap_err();
        assert!(matches!(e, EditError::Unsupported { .. }), "{e}");
        // Removing and stripping work on inline tables too.
        let out = remove_member(&text, "foo").unwrap();
        assert!(cfg(&out).servers.is_empty());
    }
}
