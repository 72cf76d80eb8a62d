//! Cluster file text → validated [`ClusterConfig`] (DESIGN §4).
//!
//! The file is the cluster's ACL, so validation is strict wherever a typo would silently change
//! who may do what: unknown keys and tables, unknown names in `allow-from` and `members`,
//! duplicate ids or names and group cycles are all errors. Parsing goes through `toml`'s
//! span-keeping `DeTable` so that every error can name the table, the key and the line.
//! Nothing here panics, whatever the input: the file may come from a hand edit or a push.
//!
//! Two phases: [`super::tables`] reads each table key by key into raw form, then
//! [`super::resolve`] checks the tables against each other and resolves every name.

use toml::de::DeTable;

use super::ClusterConfig;
use super::error::{ConfigError, syntax_error};
use super::resolve::resolve;
use super::tables::Parser;

impl ClusterConfig {
    /// Parses and validates a cluster file; see the module docs for what is refused.
    pub fn parse(text: &str) -> Result<ClusterConfig, ConfigError> {
        let doc = DeTable::parse(text).map_err(|e| syntax_error(text, &e))?;
        let raw = Parser::new(text).document(doc.get_ref())?;
        resolve(raw)
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::config::{DEFAULT_SSH_TARGET, SshTarget};
    use crate::id52::Id52;

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
        // `session-keep`: a duration; a bad one names the key.
        assert_eq!(on.servers["foo"].session_keep, None);
        let keep = ClusterConfig::parse(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\nsession-keep = \"8h 30m\"\n",
            id(2)
        )))
        .unwrap();
        assert_eq!(
            keep.servers["foo"].session_keep,
            Some(std::time::Duration::from_secs(8 * 3600 + 1800))
        );
        let e = err(&minimal(&format!(
            "[server.foo]\nid52 = \"{}\"\nsession-keep = \"all night\"\n",
            id(2)
        )));
        assert!(e.starts_with("server.foo.session-keep"), "{e}");
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
