//! The cluster file (DESIGN §4): parsing, validation and name resolution, plus where
//! malai keeps its files on this machine (`paths`).
//!
//! `ClusterConfig::parse` turns the TOML text into a validated, resolved structure: every
//! name in an `allow-from` is known, groups are expanded (cycle-checked), and errors name the
//! table and key (`server.foo.allow-from: unknown name "alce"`). Nothing here does IO except
//! `paths` and `store`; the ACL (`crate::acl`) works on the resolved structure.

mod checks;
pub mod edit;
mod error;
pub mod names;
pub mod parse;
pub mod paths;
mod resolve;
pub mod ssh_via;
pub mod store;
mod tables;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::id52::Id52;

pub use error::ConfigError;
pub use names::{ResolveError, Target};

/// File name of a cluster's file inside `clusters/<alias>/`.
pub const CLUSTER_FILE: &str = "cluster-manager.toml";

/// Default tunnel target when a server entry has no `ssh` key.
pub const DEFAULT_SSH_TARGET: &str = "127.0.0.1:22";

/// A validated cluster file.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterConfig {
    /// The manager's id52: the only peer whose config pushes members accept.
    pub manager: Id52,
    /// `cluster-manager.alias` (ext); `None` when the file has none.
    pub alias: Option<String>,
    /// Key-storage settings of the manager's own key; never pushed to members.
    pub use_keyring: bool,
    pub private_key_file: Option<String>,
    pub private_key: Option<String>,
    /// `cluster-manager.addrs` (ext): direct-address hints for the manager, so members can
    /// pull the file from it when relays and discovery are off.
    pub manager_addrs: Vec<SocketAddr>,
    /// `cluster-manager.relays` (ext): the relays every member of this cluster uses and
    /// dials with, so a private cluster needs nothing from n0's public relays and DNS.
    /// Empty: iroh's defaults. `MALAI_RELAY` overrides.
    pub relays: Vec<String>,
    /// `cluster-manager.relay-ca` (ext): PEM of extra CA roots trusted for the relays' TLS
    /// (a private relay with its own CA). Public data, pushed to members like the rest.
    pub relay_ca: Option<String>,
    pub servers: BTreeMap<String, Server>,
    pub devices: BTreeMap<String, Device>,
    /// Groups with their members fully expanded to machine names (servers/devices; nested
    /// groups flattened).
    pub groups: BTreeMap<String, Group>,
}

/// Where a server's `tunnel` requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SshTarget {
    /// TCP to this address (normally a local sshd).
    Tcp(String),
    /// The in-process russh server.
    Embedded,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    pub name: String,
    pub id52: Id52,
    /// Peers with full access (tunnel, any exec), as resolved id52s.
    pub allow_from: Vec<Id52>,
    pub ssh: SshTarget,
    /// Direct-address hints for dialing this server.
    pub addrs: Vec<SocketAddr>,
    /// `[server.foo.<cmd>]`: peers that may run only `<cmd>` (argv[0] == cmd).
    pub commands: BTreeMap<String, CommandAccess>,
    /// `[server.foo.service.<name>]`: HTTP services on 127.0.0.1.
    pub services: BTreeMap<String, Service>,
    /// `ssh-via = "user@host[:port]"` (ext): reach this server through OpenSSH + stdinserver.
    pub ssh_via: Option<String>,
    pub ssh_identity_file: Option<String>,
    /// `forwarding = false`: no port/agent forwarding for anyone, even full-access peers
    /// (default `true`, as sshd's `AllowTcpForwarding yes`).
    pub forwarding: bool,
    /// `session-keep = "12h"`: how long this server keeps a resumable tunnel whose client
    /// lost its connection (`server::resume`; default 12 h, `"0s"`: tunnels are not
    /// resumable). `MALAI_SESSION_KEEP` (seconds) overrides it.
    pub session_keep: Option<std::time::Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CommandAccess {
    pub command: String,
    pub allow_from: Vec<Id52>,
    /// `args = "…"` or `args = ["…", …]`: the argument lists allowed after the program, each
    /// a pattern of words that must match one for one, a last word `*` matching any rest.
    /// `None` (no `args` key) allows any arguments: a bare program name trusts the
    /// program with whatever it is asked (`rsync -e`, `git -c core.sshCommand`, `find
    /// -exec` run other programs).
    pub args: Option<Vec<Vec<String>>>,
}

/// Programs that can be made to run other programs through their arguments. A scope on
/// one of these without `args` lets the peer run anything; `malai ssh cluster` warns.
pub const RUNS_OTHERS: &[&str] = &[
    "sh",
    "bash",
    "dash",
    "zsh",
    "ksh",
    "fish",
    "csh",
    "tcsh",
    "busybox",
    "env",
    "nice",
    "nohup",
    "timeout",
    "xargs",
    "find",
    "rsync",
    "git",
    "ssh",
    "scp",
    "sftp",
    "tar",
    "make",
    "awk",
    "gawk",
    "sed",
    "vi",
    "vim",
    "less",
    "more",
    "man",
    "python",
    "python3",
    "perl",
    "ruby",
    "node",
    "lua",
    "php",
    "sudo",
    "su",
    "docker",
    "kubectl",
    "systemd-run",
    "watch",
    "strace",
    "gdb",
    "script",
    "flock",
    "setsid",
    "chroot",
    "unshare",
    "nsenter",
    "time",
];

impl CommandAccess {
    /// Whether `args` (argv after argv[0]) is allowed by this scope.
    pub fn allows_args(&self, args: &[String]) -> bool {
        let Some(patterns) = &self.args else {
            return true;
        };
        patterns.iter().any(|p| match p.split_last() {
            Some((last, head)) if last == "*" => {
                args.len() >= head.len() && head.iter().zip(args).all(|(w, a)| w == a)
            }
            _ => p.as_slice() == args,
        })
    }
}

impl ClusterConfig {
    /// One line per command scope that lets its peers run other programs: a program in
    /// [`RUNS_OTHERS`] with no `args` pinned, or with a pattern whose `*` lets any option
    /// through.
    pub fn scope_warnings(&self) -> Vec<String> {
        let mut out = vec![];
        for s in self.servers.values() {
            for c in s.commands.values() {
                let base = c.command.rsplit('/').next().unwrap_or(&c.command);
                let risky = RUNS_OTHERS.contains(&base)
                    || base.starts_with("python")
                    || base.starts_with("perl");
                if risky && c.args.is_none() {
                    out.push(format!(
                        "server.{}.{}: `{}` can run other programs through its arguments and no `args` pins them; anyone in its allow-from can run anything (pin them, e.g. args = \"--server *\" for rsync)",
                        s.name, c.command, c.command
                    ));
                }
            }
        }
        out
    }

    /// One line per plain `http://` relay (issue 19, finding 10): the payload stays
    /// end-to-end encrypted, but without the relay's TLS the network path sees which ids
    /// connect to it and whom they send to. Allowed (a relay on a private LAN), not silent.
    pub fn relay_warnings(&self) -> Vec<String> {
        self.relays
            .iter()
            .filter(|u| u.starts_with("http://"))
            .map(|u| {
                format!(
                    "cluster-manager.relays: {u} is plain http: anyone on the path sees who talks to whom through it (use https://)"
                )
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Service {
    pub name: String,
    pub http_port: u16,
    pub allow_from: Vec<Id52>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub name: String,
    pub id52: Id52,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub name: String,
    /// Machine names (servers and devices), nested groups flattened, sorted, deduplicated.
    pub members: Vec<String>,
}

/// What kind of member a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    Server,
    Device,
}

impl ClusterConfig {
    /// The machine name (server or device alias) that has this id52, if any.
    pub fn name_of(&self, id: &Id52) -> Option<(&str, MemberKind)> {
        if let Some(s) = self.servers.values().find(|s| &s.id52 == id) {
            return Some((&s.name, MemberKind::Server));
        }
        self.devices
            .values()
            .find(|d| &d.id52 == id)
            .map(|d| (d.name.as_str(), MemberKind::Device))
    }

    /// The id52 of a machine name, if it is a server or device.
    pub fn id52_of(&self, name: &str) -> Option<Id52> {
        self.servers
            .get(name)
            .map(|s| s.id52)
            .or_else(|| self.devices.get(name).map(|d| d.id52))
    }

    /// Every member (servers then devices) as (name, kind, id52).
    pub fn members(&self) -> Vec<(String, MemberKind, Id52)> {
        let mut v: Vec<_> = self
            .servers
            .values()
            .map(|s| (s.name.clone(), MemberKind::Server, s.id52))
            .collect();
        v.extend(
            self.devices
                .values()
                .map(|d| (d.name.clone(), MemberKind::Device, d.id52)),
        );
        v
    }
}
