//! The ACL: one pure function that says who may do what (DESIGN §2, §7).
//!
//! Every request passes through [`decide`] before it is dispatched, whichever transport it
//! came over, so access rules live in exactly one place and can be tested exhaustively.
//! Denial is the default: a request is allowed only by a rule below that names the peer.
//! No IO happens here; the caller supplies the verified peer id52 and the config in force.
//!
//! - `tunnel`: full-access peers (`server.<me>.allow-from`); command-scoped peers too when
//!   the target is the embedded SSH server, which re-asks `exec` for each command.
//! - `exec`: full-access peers get a shell; command-scoped peers (`server.<me>.<cmd>`) get
//!   exactly `argv` with `argv[0] == cmd`, never a shell, so `ls; id` cannot run `id`. A
//!   scope with `args` also pins the arguments (`args = "--server *"`); one without allows
//!   any, which for programs that run others (`rsync -e`, `git -c`, `find -exec`) means
//!   anything (`ClusterConfig::scope_warnings`).
//! - `http`: the service's `allow-from` or full access; unknown services are refused.
//! - `forward` (ssh -L/-D/-W/-R, unix sockets, agent): full-access peers only, and only
//!   while the server's `forwarding` is not `false`. A command-scoped peer never forwards:
//!   a forward reaches whatever the server can reach, which is more than its commands.
//! - `config-push`: the cluster manager only. `config-hash`, `ping`: any member or the manager.

use crate::config::{ClusterConfig, SshTarget};
use crate::id52::Id52;

/// What a peer asks for, as read from the request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Tunnel,
    /// `None` asks for an interactive login shell.
    Exec {
        command: Option<&'a str>,
    },
    Http {
        service: &'a str,
    },
    ConfigPush,
    ConfigHash,
    Ping,
    /// A port, unix-socket or agent forward (the kind is for the audit log and messages).
    Forward {
        kind: ForwardKind,
    },
}

/// The kinds of forwarding a peer can ask for; all need the same access (full access, and
/// `forwarding` on), the kind only makes the audit log and the refusal precise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardKind {
    /// ssh -L / -D / -W: a connection from the server to a TCP address.
    Local,
    /// ssh -L to a unix socket path on the server.
    LocalUnix,
    /// ssh -R: the server listens on a TCP port, connections go back to the client.
    Remote,
    /// ssh -R with a unix socket path on the server.
    RemoteUnix,
    /// ssh -A: the client's ssh-agent reachable from the remote session.
    Agent,
}

impl ForwardKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardKind::Local => "local",
            ForwardKind::LocalUnix => "local-unix",
            ForwardKind::Remote => "remote",
            ForwardKind::RemoteUnix => "remote-unix",
            ForwardKind::Agent => "agent",
        }
    }
}

impl std::fmt::Display for ForwardKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the server may do for an allowed request. The grant, not the request, drives the
/// handler, so a command-scoped peer can never end up in a shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    Tunnel,
    /// Full access: run the command with `$SHELL -c`, or a login shell when it is `None`.
    Shell,
    /// Command-scoped access: `execvp` exactly this argv, no shell.
    Argv(Vec<String>),
    Http {
        port: u16,
    },
    ConfigPush,
    ConfigHash,
    Ping,
    Forward,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow(Grant),
    Deny(DenyReason),
}

/// Why a request was refused; sent to the peer in the `deny` frame, so one line and nothing
/// the peer could not learn from the cluster file it already has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DenyReason {
    #[error("this machine has no server entry {0:?} in the cluster file")]
    NotAServer(String),
    #[error("permission denied for {0}")]
    PermissionDenied(Id52),
    #[error("unknown service {service:?} on {server}")]
    UnknownService { service: String, server: String },
    #[error("not a member of cluster")]
    NotAMember,
    #[error("only the cluster manager may push config")]
    NotManager,
    #[error("command not allowed: {0}")]
    CommandNotAllowed(String),
    #[error("arguments not allowed for {0} (its scope pins them)")]
    ArgsNotAllowed(String),
    #[error("command-scoped access needs a command")]
    NeedsCommand,
    #[error("cannot parse command: unbalanced quotes")]
    UnbalancedQuotes,
    #[error("cannot parse command: it is empty")]
    EmptyCommand,
    #[error("cannot parse command: it contains a NUL byte")]
    NulInCommand,
    #[error("{0} forwarding needs full access; command-scoped access allows only its commands")]
    ForwardNeedsFullAccess(ForwardKind),
    #[error("{kind} forwarding is turned off on {server} (forwarding = false)")]
    ForwardingOff { kind: ForwardKind, server: String },
}

/// Decides one request from `peer` to this machine, known in `config` as `server`.
///
/// `config-push`, `config-hash` and `ping` depend only on cluster membership, not on
/// `server`: a device, or a server the manager has just removed, must still take the
/// manager's pushes, or it could never be brought (back) into the cluster.
pub fn decide(config: &ClusterConfig, server: &str, peer: &Id52, req: &Request) -> Decision {
    use Decision::{Allow, Deny};
    match req {
        Request::ConfigPush => {
            return if *peer == config.manager {
                Allow(Grant::ConfigPush)
            } else {
                Deny(DenyReason::NotManager)
            };
        }
        Request::ConfigHash | Request::Ping => {
            let member = *peer == config.manager || config.name_of(peer).is_some();
            return match (member, req) {
                (false, _) => Deny(DenyReason::NotAMember),
                (true, Request::ConfigHash) => Allow(Grant::ConfigHash),
                (true, _) => Allow(Grant::Ping),
            };
        }
        Request::Tunnel | Request::Exec { .. } | Request::Http { .. } | Request::Forward { .. } => {
        }
    }

    let Some(me) = config.servers.get(server) else {
        return Deny(DenyReason::NotAServer(server.to_string()));
    };
    let full = me.allow_from.contains(peer);
    let scoped = me.commands.values().any(|c| c.allow_from.contains(peer));
    match req {
        Request::Tunnel if full => Allow(Grant::Tunnel),
        // The embedded SSH server asks `decide` again for every command it runs, so a
        // command-scoped peer may reach it and still get only its commands. Never sshd:
        // there malai could not scope what runs.
        Request::Tunnel if scoped && me.ssh == SshTarget::Embedded => Allow(Grant::Tunnel),
        Request::Exec { .. } if full => Allow(Grant::Shell),
        Request::Forward { kind } if full && !me.forwarding => Deny(DenyReason::ForwardingOff {
            kind: *kind,
            server: me.name.clone(),
        }),
        Request::Forward { .. } if full => Allow(Grant::Forward),
        Request::Forward { kind } if scoped => Deny(DenyReason::ForwardNeedsFullAccess(*kind)),
        Request::Exec { command } => {
            let scoped: Vec<&crate::config::CommandAccess> = me
                .commands
                .values()
                .filter(|c| c.allow_from.contains(peer))
                .collect();
            if scoped.is_empty() {
                return Deny(DenyReason::PermissionDenied(*peer));
            }
            let Some(command) = command else {
                return Deny(DenyReason::NeedsCommand);
            };
            match split_command(command) {
                Ok(argv) => match argv.split_first() {
                    Some((prog, args)) => {
                        let mine: Vec<_> = scoped.iter().filter(|c| c.command == *prog).collect();
                        if mine.is_empty() {
                            Deny(DenyReason::CommandNotAllowed(prog.clone()))
                        } else if mine.iter().any(|c| c.allows_args(args)) {
                            Allow(Grant::Argv(argv))
                        } else {
                            Deny(DenyReason::ArgsNotAllowed(prog.clone()))
                        }
                    }
                    None => Deny(DenyReason::EmptyCommand),
                },
                Err(reason) => Deny(reason),
            }
        }
        // Membership first: a stranger is denied the same way whether the service exists
        // or not, so probing names reveals nothing (members have the file anyway).
        Request::Http { .. }
            if !full && *peer != config.manager && config.name_of(peer).is_none() =>
        {
            Deny(DenyReason::PermissionDenied(*peer))
        }
        Request::Http { service } => match me.services.get(*service) {
            None => Deny(DenyReason::UnknownService {
                service: service.to_string(),
                server: me.name.clone(),
            }),
            Some(s) if full || s.allow_from.contains(peer) => {
                Allow(Grant::Http { port: s.http_port })
            }
            Some(_) => Deny(DenyReason::PermissionDenied(*peer)),
        },
        _ => Deny(DenyReason::PermissionDenied(*peer)),
    }
}

/// Splits a command line the way a POSIX shell would split words, without any expansion:
/// the words become argv for `execvp`, so quoting is honoured but `;`, `|`, `$(…)` are just
/// characters.
fn split_command(command: &str) -> Result<Vec<String>, DenyReason> {
    if command.contains('\0') {
        return Err(DenyReason::NulInCommand);
    }
    let argv = shlex::split(command).ok_or(DenyReason::UnbalancedQuotes)?;
    if argv.is_empty() {
        return Err(DenyReason::EmptyCommand);
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::{Allow, Deny};

    fn id(n: u8) -> Id52 {
        Id52::from_bytes([n; 32])
    }

    const MANAGER: u8 = 1;
    const FOO: u8 = 2;
    const BAR: u8 = 3;
    const ALICE: u8 = 4; // full access on foo (directly)
    const BOB: u8 = 5; // may run only `ls` and `git-upload-pack` on foo
    const CAROL: u8 = 6; // admins (nested: admins -> ops -> carol)
    const DAVE: u8 = 7; // listed only for bar
    const ERIN: u8 = 8; // only the django service; also `ls`-scoped and full on bar
    const RAW: u8 = 9; // not a member: raw id52 in foo's allow-from
    const STRANGER: u8 = 42;

    fn config() -> ClusterConfig {
        let text = format!(
            r#"
[cluster-manager]
id52 = "{m}"

[server.foo]
id52 = "{foo}"
allow-from = "alice, admins, {raw}"

[server.foo.ls]
allow-from = "bob, erin, alice"

[server.foo.git-upload-pack]
allow-from = ["bob"]

[server.foo.service.django]
http = 8000
allow-from = "erin"

[server.foo.service.admin]
http = 9000

[server.bar]
id52 = "{bar}"
allow-from = "dave, erin"

[device.alice]
id52 = "{alice}"
[device.bob]
id52 = "{bob}"
[device.carol]
id52 = "{carol}"
[device.dave]
id52 = "{dave}"
[device.erin]
id52 = "{erin}"

[group.admins]
members = "ops"
[group.ops]
members = "carol"
"#,
            m = id(MANAGER),
            foo = id(FOO),
            bar = id(BAR),
            alice = id(ALICE),
            bob = id(BOB),
            carol = id(CAROL),
            dave = id(DAVE),
            erin = id(ERIN),
            raw = id(RAW),
        );
        ClusterConfig::parse(&text).unwrap()
    }

    /// foo with scopes that pin arguments: bob may run rsync only as an rsync server, and
    /// `uptime` only with no arguments; `find` is scoped with no `args` (any arguments).
    fn pinned() -> ClusterConfig {
        let text = format!(
            r#"
[cluster-manager]
id52 = "{m}"

[server.foo]
id52 = "{foo}"

[server.foo.rsync]
allow-from = "bob"
args = ["--server *", "--version"]

[server.foo.uptime]
allow-from = "bob"
args = ""

[server.foo.find]
allow-from = "bob"

[device.bob]
id52 = "{bob}"
"#,
            m = id(MANAGER),
            foo = id(FOO),
            bob = id(BOB),
        );
        ClusterConfig::parse(&text).unwrap()
    }

    #[test]
    fn scopes_can_pin_arguments() {
        let cfg = pinned();
        let run = |cmd: &str| decide(&cfg, "foo", &id(BOB), &Request::Exec { command: Some(cmd) });
        // Allowed: what rsync's client asks the remote side to run, and the exact forms.
        for ok in [
            "rsync --server -vlogDtpre.iLsfxCIvu . /dst/",
            "rsync --server --sender -vlogDtpre.iLsfxCIvu . /src/",
            "rsync --version",
            "uptime",
            "find / -exec sh -c id ;", // no `args`: anything (and warned about)
        ] {
            assert!(
                matches!(run(ok), Allow(Grant::Argv(_))),
                "{ok}: {:?}",
                run(ok)
            );
        }
        // Deny twins: the same program with arguments its pattern does not allow.
        for bad in [
            "rsync -e 'sh -c id' x y:z",
            "rsync --version --daemon",
            "rsync",
            "uptime -p",
            "uptime --server",
        ] {
            assert_eq!(
                run(bad),
                Deny(DenyReason::ArgsNotAllowed(
                    bad.split(' ').next().unwrap().into()
                )),
                "{bad}"
            );
        }
        assert_eq!(
            run("sh -c id"),
            Deny(DenyReason::CommandNotAllowed("sh".into()))
        );
        // The warning names the unpinned scope on a program that runs others, only it.
        let w = cfg.scope_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("server.foo.find:"), "{w:?}");
        assert!(
            config()
                .scope_warnings()
                .iter()
                .all(|w| !w.contains(".ls:"))
        );
    }

    fn on_foo(peer: u8, req: Request) -> Decision {
        decide(&config(), "foo", &id(peer), &req)
    }

    fn exec(cmd: &str) -> Request<'_> {
        Request::Exec { command: Some(cmd) }
    }

    fn denied(peer: u8) -> Decision {
        Deny(DenyReason::PermissionDenied(id(peer)))
    }

    #[test]
    fn forwarding_is_full_access_only_and_can_be_turned_off() {
        let kinds = [
            ForwardKind::Local,
            ForwardKind::LocalUnix,
            ForwardKind::Remote,
            ForwardKind::RemoteUnix,
            ForwardKind::Agent,
        ];
        for kind in kinds {
            let fwd = Request::Forward { kind };
            assert_eq!(on_foo(ALICE, fwd), Allow(Grant::Forward), "{kind}");
            assert_eq!(on_foo(CAROL, fwd), Allow(Grant::Forward), "{kind}");
            // Deny twins: command-scoped (bob; erin is scoped on foo, full on bar), strangers,
            // members without access, the manager.
            assert_eq!(
                on_foo(BOB, fwd),
                Deny(DenyReason::ForwardNeedsFullAccess(kind)),
                "{kind}"
            );
            assert_eq!(
                on_foo(ERIN, fwd),
                Deny(DenyReason::ForwardNeedsFullAccess(kind)),
                "{kind}"
            );
            assert_eq!(on_foo(STRANGER, fwd), denied(STRANGER), "{kind}");
            assert_eq!(on_foo(DAVE, fwd), denied(DAVE), "{kind}");
            assert_eq!(on_foo(MANAGER, fwd), denied(MANAGER), "{kind}");
            let c = config();
            assert_eq!(
                decide(&c, "bar", &id(ERIN), &fwd),
                Allow(Grant::Forward),
                "{kind}"
            );
            // `forwarding = false` on foo: full access no longer forwards; bar unaffected.
            let mut off = config();
            off.servers.get_mut("foo").unwrap().forwarding = false;
            let want = Deny(DenyReason::ForwardingOff {
                kind,
                server: "foo".into(),
            });
            assert_eq!(decide(&off, "foo", &id(ALICE), &fwd), want, "{kind}");
            assert_eq!(
                decide(&off, "foo", &id(BOB), &fwd),
                Deny(DenyReason::ForwardNeedsFullAccess(kind)),
                "{kind}"
            );
            assert_eq!(
                decide(&off, "bar", &id(ERIN), &fwd),
                Allow(Grant::Forward),
                "{kind}"
            );
            // A shell is still a shell.
            assert_eq!(
                decide(&off, "foo", &id(ALICE), &Request::Exec { command: None }),
                Allow(Grant::Shell)
            );
        }
        let r = DenyReason::ForwardNeedsFullAccess(ForwardKind::Remote).to_string();
        assert_eq!(
            r,
            "remote forwarding needs full access; command-scoped access allows only its commands"
        );
    }

    #[test]
    fn tunnel() {
        assert_eq!(on_foo(ALICE, Request::Tunnel), Allow(Grant::Tunnel));
        assert_eq!(on_foo(RAW, Request::Tunnel), Allow(Grant::Tunnel));
        // Group membership, through a nested group.
        assert_eq!(on_foo(CAROL, Request::Tunnel), Allow(Grant::Tunnel));
        // Deny twins.
        assert_eq!(on_foo(STRANGER, Request::Tunnel), denied(STRANGER));
        assert_eq!(on_foo(DAVE, Request::Tunnel), denied(DAVE));
        assert_eq!(on_foo(BOB, Request::Tunnel), denied(BOB));
        assert_eq!(on_foo(ERIN, Request::Tunnel), denied(ERIN));
        // The manager is not implicitly allowed, nor is the server itself.
        assert_eq!(on_foo(MANAGER, Request::Tunnel), denied(MANAGER));
        assert_eq!(on_foo(FOO, Request::Tunnel), denied(FOO));
        // Dave is allowed on bar only.
        let c = config();
        assert_eq!(
            decide(&c, "bar", &id(DAVE), &Request::Tunnel),
            Allow(Grant::Tunnel)
        );
        assert_eq!(
            decide(&c, "bar", &id(ALICE), &Request::Tunnel),
            denied(ALICE)
        );
    }

    /// Command-scoped peers may open a tunnel to the embedded SSH server (which scopes each
    /// command), never to sshd; the embedded server still refuses them a shell.
    #[test]
    fn tunnel_for_scoped_peers_only_when_embedded() {
        let mut c = config();
        assert_eq!(decide(&c, "foo", &id(BOB), &Request::Tunnel), denied(BOB));
        if let Some(foo) = c.servers.get_mut("foo") {
            foo.ssh = SshTarget::Embedded;
        }
        assert_eq!(
            decide(&c, "foo", &id(BOB), &Request::Tunnel),
            Allow(Grant::Tunnel)
        );
        assert_eq!(
            decide(&c, "foo", &id(BOB), &Request::Exec { command: None }),
            Deny(DenyReason::NeedsCommand)
        );
        assert_eq!(
            decide(&c, "foo", &id(BOB), &exec("id")),
            Deny(DenyReason::CommandNotAllowed("id".into()))
        );
        // Deny twins: unlisted peers, and peers scoped only on another server.
        assert_eq!(
            decide(&c, "foo", &id(STRANGER), &Request::Tunnel),
            denied(STRANGER)
        );
        assert_eq!(decide(&c, "foo", &id(DAVE), &Request::Tunnel), denied(DAVE));
    }

    #[test]
    fn exec_full_access_gets_a_shell() {
        assert_eq!(on_foo(ALICE, exec("cat /etc/passwd")), Allow(Grant::Shell));
        assert_eq!(
            on_foo(ALICE, Request::Exec { command: None }),
            Allow(Grant::Shell)
        );
        assert_eq!(on_foo(CAROL, exec("ls; id")), Allow(Grant::Shell));
        // Full access wins over a command scope the same peer also has.
        assert_eq!(on_foo(ALICE, exec("ls -la")), Allow(Grant::Shell));
        // Even unparsable commands: the shell will report them.
        assert_eq!(on_foo(ALICE, exec("echo 'x")), Allow(Grant::Shell));
        assert_eq!(on_foo(STRANGER, exec("ls")), denied(STRANGER));
        assert_eq!(on_foo(DAVE, exec("ls")), denied(DAVE));
        assert_eq!(on_foo(MANAGER, exec("ls")), denied(MANAGER));
        assert_eq!(
            on_foo(STRANGER, Request::Exec { command: None }),
            denied(STRANGER)
        );
    }

    #[test]
    fn exec_command_scoped() {
        let argv = |v: &[&str]| Allow(Grant::Argv(v.iter().map(|s| s.to_string()).collect()));
        assert_eq!(on_foo(BOB, exec("ls")), argv(&["ls"]));
        assert_eq!(
            on_foo(BOB, exec("ls -la /tmp")),
            argv(&["ls", "-la", "/tmp"])
        );
        assert_eq!(
            on_foo(BOB, exec("ls '; rm -rf /'")),
            argv(&["ls", "; rm -rf /"])
        );
        assert_eq!(on_foo(BOB, exec("  ls   \"a b\"  ")), argv(&["ls", "a b"]));
        assert_eq!(
            on_foo(BOB, exec("ls $(id) `id` | id")),
            argv(&["ls", "$(id)", "`id`", "|", "id"])
        );
        assert_eq!(
            on_foo(BOB, exec("git-upload-pack 'repo.git'")),
            argv(&["git-upload-pack", "repo.git"])
        );
        assert_eq!(on_foo(ERIN, exec("ls")), argv(&["ls"]));
        // Deny twins.
        let not_allowed = |c: &str| Deny(DenyReason::CommandNotAllowed(c.into()));
        assert_eq!(on_foo(BOB, exec("ls; id")), not_allowed("ls;"));
        assert_eq!(on_foo(BOB, exec("cat /etc/passwd")), not_allowed("cat"));
        assert_eq!(on_foo(BOB, exec("/bin/ls")), not_allowed("/bin/ls"));
        assert_eq!(on_foo(BOB, exec("LS")), not_allowed("LS"));
        assert_eq!(on_foo(BOB, exec("'ls '")), not_allowed("ls "));
        assert_eq!(
            on_foo(ERIN, exec("git-upload-pack x")),
            not_allowed("git-upload-pack")
        );
        assert_eq!(
            on_foo(BOB, Request::Exec { command: None }),
            Deny(DenyReason::NeedsCommand)
        );
        assert_eq!(on_foo(BOB, exec("")), Deny(DenyReason::EmptyCommand));
        assert_eq!(on_foo(BOB, exec("   ")), Deny(DenyReason::EmptyCommand));
        assert_eq!(
            on_foo(BOB, exec("ls 'unbalanced")),
            Deny(DenyReason::UnbalancedQuotes)
        );
        assert_eq!(on_foo(BOB, exec("ls \0x")), Deny(DenyReason::NulInCommand));
        // Command scope on foo gives nothing on bar.
        assert_eq!(decide(&config(), "bar", &id(BOB), &exec("ls")), denied(BOB));
    }

    #[test]
    fn http() {
        let django = Request::Http { service: "django" };
        let admin = Request::Http { service: "admin" };
        assert_eq!(on_foo(ERIN, django), Allow(Grant::Http { port: 8000 }));
        // Full access includes every service, even one with no allow-from.
        assert_eq!(on_foo(ALICE, django), Allow(Grant::Http { port: 8000 }));
        assert_eq!(on_foo(CAROL, admin), Allow(Grant::Http { port: 9000 }));
        // Deny twins.
        assert_eq!(on_foo(ERIN, admin), denied(ERIN));
        assert_eq!(on_foo(BOB, django), denied(BOB));
        assert_eq!(on_foo(STRANGER, django), denied(STRANGER));
        assert_eq!(on_foo(MANAGER, django), denied(MANAGER));
        let unknown = Deny(DenyReason::UnknownService {
            service: "flask".into(),
            server: "foo".into(),
        });
        assert_eq!(on_foo(ALICE, Request::Http { service: "flask" }), unknown);
        // A stranger learns nothing about which services exist: the same denial for an
        // unknown service as for a known one.
        assert_eq!(
            on_foo(STRANGER, Request::Http { service: "flask" }),
            denied(STRANGER)
        );
        assert_eq!(
            decide(&config(), "bar", &id(ERIN), &django),
            Deny(DenyReason::UnknownService {
                service: "django".into(),
                server: "bar".into()
            })
        );
    }

    #[test]
    fn config_requests() {
        assert_eq!(
            on_foo(MANAGER, Request::ConfigPush),
            Allow(Grant::ConfigPush)
        );
        for peer in [ALICE, FOO, BAR, RAW, STRANGER] {
            assert_eq!(
                on_foo(peer, Request::ConfigPush),
                Deny(DenyReason::NotManager)
            );
        }
        for peer in [MANAGER, FOO, BAR, ALICE, BOB, DAVE] {
            assert_eq!(on_foo(peer, Request::ConfigHash), Allow(Grant::ConfigHash));
            assert_eq!(on_foo(peer, Request::Ping), Allow(Grant::Ping));
        }
        // A raw id52 in an allow-from is not a member.
        for peer in [RAW, STRANGER] {
            assert_eq!(
                on_foo(peer, Request::ConfigHash),
                Deny(DenyReason::NotAMember)
            );
            assert_eq!(on_foo(peer, Request::Ping), Deny(DenyReason::NotAMember));
        }
    }

    #[test]
    fn not_a_server_denies_access_but_takes_pushes() {
        let c = config();
        let not = Deny(DenyReason::NotAServer("alice".into()));
        for req in [
            Request::Tunnel,
            exec("ls"),
            Request::Exec { command: None },
            Request::Http { service: "django" },
        ] {
            // Alice has full access on foo, which must not carry over.
            assert_eq!(decide(&c, "alice", &id(ALICE), &req), not);
            assert_eq!(
                decide(&c, "nosuch", &id(ALICE), &req),
                Deny(DenyReason::NotAServer("nosuch".into()))
            );
        }
        assert_eq!(
            decide(&c, "alice", &id(MANAGER), &Request::ConfigPush),
            Allow(Grant::ConfigPush)
        );
        assert_eq!(
            decide(&c, "alice", &id(STRANGER), &Request::ConfigPush),
            Deny(DenyReason::NotManager)
        );
        assert_eq!(
            decide(&c, "nosuch", &id(BOB), &Request::Ping),
            Allow(Grant::Ping)
        );
    }

    #[test]
    fn messages_are_one_line() {
        assert_eq!(
            DenyReason::PermissionDenied(id(4)).to_string(),
            format!("permission denied for {}", id(4))
        );
        assert_eq!(
            DenyReason::UnknownService {
                service: "x".into(),
                server: "foo".into()
            }
            .to_string(),
            "unknown service \"x\" on foo"
        );
        assert_eq!(
            DenyReason::NotAMember.to_string(),
            "not a member of cluster"
        );
        assert_eq!(
            DenyReason::NotManager.to_string(),
            "only the cluster manager may push config"
        );
        assert_eq!(
            DenyReason::CommandNotAllowed("cat".into()).to_string(),
            "command not allowed: cat"
        );
        assert_eq!(
            DenyReason::NeedsCommand.to_string(),
            "command-scoped access needs a command"
        );
        assert_eq!(
            DenyReason::UnbalancedQuotes.to_string(),
            "cannot parse command: unbalanced quotes"
        );
    }
}

#[cfg(test)]
mod proptests;
