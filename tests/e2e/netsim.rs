//! Simulated networks for end-to-end tests: Linux network namespaces joined by veth pairs,
//! made and torn down by the test itself (docs/design.md §9), like `harness.rs` is for sshd.
//!
//! Two shapes:
//! - [`NatNet`]: an "internet" namespace (a bridge, 198.18.0.1, where the tests' own iroh relay
//!   runs) and, per machine, a NAT router namespace (nftables masquerade; nothing new gets in
//!   from the wan side: no port forwards) with the machine's namespace behind it. Faults are
//!   nftables rules: [`NatNet::cut`] drops all of one machine's traffic (an outage),
//!   [`NatNet::block_udp_between_nats`] leaves the relay as the only way through.
//! - [`LanNet`]: two namespaces on one veth link (198.19.0.1 and .2), no router, no relay: an
//!   air-gapped LAN.
//!
//! Addresses come from 198.18.0.0/15 only (RFC 2544): the internet is 198.18.0.0/24 (relay .1,
//! router of machine i .(10+i)), machine i's home network 198.19.i.0/24 (router .1, machine
//! .2). Nothing can reach a real network: the namespaces have no link to the host's.
//!
//! Names are unique per test (`mt<pid>x<n>…`, tests run in parallel threads) and every
//! namespace is deleted on drop, even when the test panics; interfaces are created directly
//! inside their namespaces, so their names (<= 15 chars) only need to be unique there.
//! Namespaces left by a killed test binary (its pid is gone) are deleted by the next run.
//!
//! A command runs inside a namespace through `ip netns exec <ns> prog …`, which execs `prog`:
//! the child's pid is `prog`'s own (FACTS.md), so the harness's kill-on-drop keeps working.
//! `Machine::in_netns` and `Sshd::start_in_netns` (harness.rs) use this.
//!
//! Where namespaces cannot be made (not root, no `ip`/`nft`), [`available`] prints one line
//! saying why and the tests return early; CI runs as root and must run them (`.ci/run` sets
//! `MALAI_E2E_REQUIRE_NETNS=1`, which turns a skip into a failure).
//!
//! The relay ([`Relay`]) is `iroh_relay::server::Server` (the `iroh-relay` crate, same release
//! as iroh) with HTTPS and QUIC address discovery, run as its own process in the internet
//! namespace: the e2e binary re-executes itself into the ignored test [`relay_process`], so it
//! works with a plain `cargo test --test e2e` and needs no extra binary. Its TLS certificate is
//! for the IP 198.18.0.1, signed by a CA the test makes (rcgen); clients trust it through
//! `MALAI_RELAY_CA` / the cluster file's `relay-ca`.

#![allow(dead_code)] // Not every test uses every helper.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::harness::*;

/// The relay's address in the internet namespace.
pub const RELAY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// Where a second and a third relay may run ([`NatNet::start_relay_at`]), same ports.
pub const RELAY2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
pub const RELAY3_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// Every address a relay may have, as an nftables set (the router rules' relay traffic).
const RELAY_SET: &str = "{ 198.18.0.1, 198.18.0.2, 198.18.0.3 }";
/// Env var with the re-executed relay's IP.
const RELAY_IP_ENV: &str = "MALAI_NETSIM_RELAY_IP";
/// The relay's HTTPS port (the relay URL is `https://198.18.0.1:3340`).
pub const RELAY_HTTPS_PORT: u16 = 3340;
/// QUIC address discovery: iroh clients use this port unless told otherwise
/// (`iroh_relay::defaults::DEFAULT_RELAY_QUIC_PORT`).
pub const RELAY_QUIC_PORT: u16 = 7842;
/// Prefix of every namespace these tests make.
const PREFIX: &str = "mt";
/// Env var that turns a re-executed e2e binary into the relay (value: its directory).
const RELAY_ENV: &str = "MALAI_NETSIM_RELAY_DIR";
/// How long the relay may take to come up.
const RELAY_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Serializes the network tests: each runs several QUIC endpoints, sshd, a relay and 64 MiB
/// transfers through two NATs; on 2 cores two at once starve each other's timers. Taken
/// together with `heavy_lock()` (load/fault tests) by [`heavy_net_lock`].
fn net_lock() -> std::sync::MutexGuard<'static, ()> {
    static NET: Mutex<()> = Mutex::new(());
    NET.lock().unwrap_or_else(|e| e.into_inner())
}

/// Both locks, in one fixed order (no deadlock with tests that take only `heavy_lock`): the
/// network tests never run beside each other nor beside the load and fault tests.
pub fn heavy_net_lock() -> (
    std::sync::MutexGuard<'static, ()>,
    std::sync::MutexGuard<'static, ()>,
) {
    let net = net_lock();
    (net, heavy_lock())
}

// ---------------------------------------------------------------------------------------------
// Can we make namespaces here?
// ---------------------------------------------------------------------------------------------

/// `name` if it is on PATH, else `/usr/sbin/<name>` or `/sbin/<name>` if there (a non-login
/// root shell may lack the sbin directories), else `None`.
fn find_program(name: &str) -> Option<String> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if on_path {
        return Some(name.to_string());
    }
    ["/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .map(|p| p.display().to_string())
}

fn program(name: &str) -> String {
    find_program(name).unwrap_or_else(|| name.to_string())
}

fn program_on_path(name: &str) -> bool {
    find_program(name).is_some()
}

/// Why namespaces cannot be made here, or `None` if they can (checked once: root, `ip`,
/// `nft`, and a throwaway namespace actually created and deleted).
fn unavailable_reason() -> Option<String> {
    static REASON: OnceLock<Option<String>> = OnceLock::new();
    REASON
        .get_or_init(|| {
            if !nix::unistd::geteuid().is_root() {
                return Some("not root (network namespaces need CAP_SYS_ADMIN)".into());
            }
            for (prog, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
                if !program_on_path(prog) {
                    return Some(format!("`{prog}` not found (Debian package `{pkg}`)"));
                }
            }
            remove_stale_namespaces();
            let probe = format!("{PREFIX}{}probe", std::process::id());
            let out = run_cmd(Command::new(program("ip")).args(["netns", "add", &probe]));
            if !out.status.success() {
                return Some(format!("`ip netns add` failed: {}", stderr_of(&out).trim()));
            }
            let _ = run_cmd(Command::new(program("ip")).args(["netns", "del", &probe]));
            None
        })
        .clone()
}

/// Set by `.ci/run` (which installs `ip` and `nft` and runs as root): there the network
/// tests must run, so "cannot make namespaces" fails them instead of skipping.
const REQUIRE_ENV: &str = "MALAI_E2E_REQUIRE_NETNS";

/// True if network namespaces can be made here; otherwise prints one line naming the test
/// and the reason (the test then returns early). As root with `ip` and `nft` (CI), true.
/// With `MALAI_E2E_REQUIRE_NETNS=1` (CI) it panics instead of skipping.
pub fn available(test: &str) -> bool {
    match unavailable_reason() {
        None => true,
        Some(why) if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") => {
            panic!(
                "{test}: network namespace tests cannot run here ({why}), and {REQUIRE_ENV}=1 requires them"
            )
        }
        Some(why) => {
            // Straight to stderr, not `eprintln!`: libtest would capture that and show it
            // only for failed tests.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED {test}: network namespace tests cannot run here: {why}. \
                 Run as root after `bash .ci/run` (installs iproute2 and nftables)."
            );
            false
        }
    }
}

/// Deletes `mt<pid>x…` namespaces whose test binary (pid) is gone (a SIGKILLed run).
fn remove_stale_namespaces() {
    let out = run_cmd(Command::new(program("ip")).args(["netns", "list"]));
    for line in stdout_of(&out).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        let Ok(pid) = pid.parse::<i32>() else {
            continue;
        };
        let alive = pid == std::process::id() as i32
            || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let _ = run_cmd(Command::new(program("ip")).args(["netns", "del", name]));
        }
    }
}

/// `mt<pid>x<n>`: unique among concurrently running tests and test binaries.
fn unique_tag() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{PREFIX}{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------------
// One namespace
// ---------------------------------------------------------------------------------------------

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    fn add(name: String) -> Netns {
        let out = run_cmd(Command::new(program("ip")).args(["netns", "add", &name]));
        assert_success(&out, &format!("ip netns add {name}"));
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> <args>`, panicking on failure.
    pub fn ip(&self, args: &[&str]) {
        let out = run_cmd(
            Command::new(program("ip"))
                .arg("-n")
                .arg(&self.name)
                .args(args),
        );
        assert_success(&out, &format!("ip -n {} {}", self.name, args.join(" ")));
    }

    /// `sh -c <script>` inside the namespace, panicking on failure.
    pub fn sh(&self, script: &str) -> String {
        let out = run_cmd(self.command("sh").args(["-c", script]));
        assert_success(&out, &format!("[{}] sh -c {script:?}", self.name));
        stdout_of(&out)
    }

    /// `nft -f -` inside the namespace with `rules` on stdin, panicking on failure.
    pub fn nft(&self, rules: &str) {
        let out = run_cmd_with(
            self.command(&program("nft")).args(["-f", "-"]),
            Some(rules.as_bytes()),
            CHILD_TIMEOUT,
        );
        assert_success(&out, &format!("[{}] nft -f - <<{rules}", self.name));
    }

    /// `ip netns exec <ns> <program>`: add arguments, env, stdio as for any `Command`. The
    /// spawned child's pid is `program`'s own (`ip` execs it).
    pub fn command(&self, program_name: &str) -> Command {
        netns_command(&self.name, program_name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Never panic in drop (a panicking test is already unwinding through here).
        let r = Command::new(program("ip"))
            .args(["netns", "del", &self.name])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        match r {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "netsim: ip netns del {} failed: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("netsim: ip netns del {}: {e}", self.name),
        }
    }
}

/// `ip netns exec <ns> <program>` (see [`Netns::command`]).
pub fn netns_command(ns: &str, program_name: &str) -> Command {
    let mut c = Command::new(program("ip"));
    c.args(["netns", "exec", ns, program_name]);
    c
}

// ---------------------------------------------------------------------------------------------
// NAT'd machines and an internet with a relay
// ---------------------------------------------------------------------------------------------

struct Site {
    index: u8,
    // Field order is drop order: the machine before its router (either order works), the
    // delay line (its thread first, then its namespace) last.
    machine: Netns,
    router: Netns,
    line: Option<DelayLine>,
}

/// The internet, a NAT router per machine and the machines behind them (see module docs).
/// Declare it before the `TestCluster` that uses it, so the cluster's processes are gone
/// first when both drop.
pub struct NatNet {
    tag: String,
    wan: Option<Wan>,
    // Sites, relay and internet are dropped in this order.
    sites: Vec<(String, Site)>,
    relay: Option<Relay>,
    /// Relays at [`RELAY2_IP`], [`RELAY3_IP`].
    more_relays: Vec<Relay>,
    internet: Netns,
}

/// The router's nftables: masquerade out of `wan`; from `wan` only replies get in (to the
/// machine behind it or to the router itself). Two named
/// counters tell which way traffic went: `direct` (UDP to or from another NAT: iroh's
/// hole-punched path) and `relay` (TCP to or from the relay's HTTPS port).
fn router_rules() -> String {
    format!(
        "
table ip nat {{
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname \"wan\" masquerade
    }}
}}
table ip filter {{
    counter direct {{ }}
    counter relay {{ }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname \"wan\" ct state new,invalid drop
        meta l4proto udp ip saddr != {RELAY_SET} ip daddr != {RELAY_SET} counter name \"direct\"
        ip daddr {RELAY_SET} tcp dport {RELAY_HTTPS_PORT} counter name \"relay\"
        ip saddr {RELAY_SET} tcp sport {RELAY_HTTPS_PORT} counter name \"relay\"
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname \"wan\" ct state new,invalid drop
    }}
}}
"
    )
}

/// Bytes one router forwarded so far, by path (see `router_rules`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// UDP between this NAT and another one: a direct (hole-punched) path.
    pub direct: u64,
    /// TCP to/from the relay's HTTPS port: relayed traffic (and the relay connection itself).
    pub relay: u64,
}

impl std::ops::Sub for Traffic {
    type Output = Traffic;
    fn sub(self, o: Traffic) -> Traffic {
        Traffic {
            direct: self.direct.saturating_sub(o.direct),
            relay: self.relay.saturating_sub(o.relay),
        }
    }
}

impl std::fmt::Display for Traffic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "direct UDP {:.1} MiB, relay {:.1} MiB",
            self.direct as f64 / 1048576.0,
            self.relay as f64 / 1048576.0
        )
    }
}

fn counter_bytes(router: &Netns, name: &str) -> u64 {
    counter_bytes_in(router, "filter", name)
}

fn counter_bytes_in(router: &Netns, table: &str, name: &str) -> u64 {
    let out = run_cmd(
        router
            .command(&program("nft"))
            .args(["list", "counter", "ip", table, name]),
    );
    assert_success(&out, &format!("[{}] nft list counter {name}", router.name));
    let text = stdout_of(&out);
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "bytes" {
            return words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
        }
    }
    panic!("no byte count in:\n{text}");
}

impl NatNet {
    /// An internet namespace and, for each name, a router namespace and a machine
    /// namespace behind it. Machine `names[i]` gets 198.19.(i+1).2.
    pub fn new(names: &[&str]) -> NatNet {
        NatNet::build(names, None)
    }

    /// Like [`NatNet::new`], with every machine's uplink a long link ([`Wan`]): between
    /// each router and the internet a delay line (its own namespace) adds a quarter of
    /// `wan.rtt` each way and limits each direction to `wan.mbit`, so machine to machine
    /// (direct or through the relay) the round trip is `wan.rtt` and machine to relay half
    /// of it.
    pub fn with_wan(names: &[&str], wan: Wan) -> NatNet {
        NatNet::build(names, Some(wan))
    }

    fn build(names: &[&str], wan: Option<Wan>) -> NatNet {
        let tag = unique_tag();
        let internet = Netns::add(format!("{tag}i"));
        internet.ip(&["link", "add", "br0", "type", "bridge"]);
        internet.ip(&["addr", "add", &format!("{RELAY_IP}/24"), "dev", "br0"]);
        internet.ip(&["link", "set", "br0", "up"]);
        // Bytes sent to each relay address (`NatNet::relay_bytes`).
        internet.nft(
            "table ip relays {
                counter r1 { }
                counter r2 { }
                counter r3 { }
                chain input {
                    type filter hook input priority filter; policy accept;
                    ip daddr 198.18.0.1 counter name \"r1\"
                    ip daddr 198.18.0.2 counter name \"r2\"
                    ip daddr 198.18.0.3 counter name \"r3\"
                }
            }",
        );
        let mut net = NatNet {
            tag: tag.clone(),
            wan,
            sites: Vec::new(),
            relay: None,
            more_relays: Vec::new(),
            internet,
        };
        for (i, name) in names.iter().enumerate() {
            let index = u8::try_from(i + 1).expect("at most 200 machines");
            assert!(index <= 200, "at most 200 machines");
            let router = Netns::add(format!("{tag}r{index}"));
            let port = format!("w{index}");
            let line = match wan {
                None => {
                    net.internet.ip(&[
                        "link",
                        "add",
                        &port,
                        "type",
                        "veth",
                        "peer",
                        "name",
                        "wan",
                        "netns",
                        &router.name,
                    ]);
                    None
                }
                Some(wan) => Some(DelayLine::new(
                    format!("{tag}d{index}"),
                    &net.internet,
                    &port,
                    &router,
                    wan,
                )),
            };
            net.internet
                .ip(&["link", "set", &port, "master", "br0", "up"]);
            router.ip(&[
                "addr",
                "add",
                &format!("198.18.0.{}/24", 10 + index),
                "dev",
                "wan",
            ]);
            router.ip(&["link", "set", "wan", "up"]);
            let machine = Netns::add(format!("{tag}m{index}"));
            router.ip(&[
                "link",
                "add",
                "lan",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &machine.name,
            ]);
            router.ip(&["addr", "add", &format!("198.19.{index}.1/24"), "dev", "lan"]);
            router.ip(&["link", "set", "lan", "up"]);
            router.sh("echo 1 > /proc/sys/net/ipv4/ip_forward");
            router.nft(&router_rules());
            machine.ip(&[
                "addr",
                "add",
                &format!("198.19.{index}.2/24"),
                "dev",
                "eth0",
            ]);
            machine.ip(&["link", "set", "eth0", "up"]);
            machine.ip(&[
                "route",
                "add",
                "default",
                "via",
                &format!("198.19.{index}.1"),
            ]);
            net.sites.push((
                name.to_string(),
                Site {
                    index,
                    machine,
                    router,
                    line,
                },
            ));
        }
        net
    }

    fn site(&self, name: &str) -> &Site {
        self.sites
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s)
            .unwrap_or_else(|| panic!("no machine {name:?} in this network"))
    }

    /// The namespace of machine `name` (for `Machine::in_netns`, `Sshd::start_in_netns`).
    pub fn ns(&self, name: &str) -> &str {
        &self.site(name).machine.name
    }

    /// The machine's own namespace handle.
    pub fn machine(&self, name: &str) -> &Netns {
        &self.site(name).machine
    }

    /// The machine's address on its home network (behind its NAT).
    pub fn lan_ip(&self, name: &str) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.site(name).index, 2)
    }

    /// The machine's public address: its router's wan side.
    pub fn public_ip(&self, name: &str) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, 10 + self.site(name).index)
    }

    /// `ip netns exec <machine ns> <program>`.
    pub fn command(&self, name: &str, program_name: &str) -> Command {
        self.machine(name).command(program_name)
    }

    /// The internet namespace (where the relay runs).
    pub fn internet(&self) -> &Netns {
        &self.internet
    }

    /// An outage: machine `name`'s router forwards nothing, either way, until [`restore`].
    /// Established connections stay in conntrack (like a router that lost its uplink).
    ///
    /// [`restore`]: NatNet::restore
    pub fn cut(&self, name: &str) {
        self.site(name).router.nft(
            "table ip outage {
                chain forward {
                    type filter hook forward priority -10; policy drop;
                }
            }",
        );
    }

    /// Machine `name` roams to another network: its NAT router's public address moves from
    /// 198.18.0.(10+i) to 198.18.0.(110+i) and its own from 198.19.i.2 to 198.19.i.3 (and
    /// back on the next call), as a laptop's do from one Wi-Fi to another. Removing the old
    /// addresses drops the router's NAT mappings made with them and the machine's sockets
    /// bound to its old address, so every flow of the machine comes out from the new ones.
    pub fn roam(&self, name: &str) {
        let site = self.site(name);
        let (a, b) = (10 + u16::from(site.index), 110 + u16::from(site.index));
        let has_a = site
            .router
            .sh("ip -4 addr show dev wan")
            .contains(&format!("198.18.0.{a}/"));
        let (from, to) = if has_a { (a, b) } else { (b, a) };
        // Else deleting the primary address takes the new (secondary) one with it.
        site.router
            .sh("echo 1 > /proc/sys/net/ipv4/conf/wan/promote_secondaries");
        site.router
            .ip(&["addr", "add", &format!("198.18.0.{to}/24"), "dev", "wan"]);
        site.router
            .ip(&["addr", "del", &format!("198.18.0.{from}/24"), "dev", "wan"]);
        // The machine itself gets another address on the new network too.
        let i = site.index;
        let (from, to) = if has_a { (2, 3) } else { (3, 2) };
        site.machine
            .sh("echo 1 > /proc/sys/net/ipv4/conf/eth0/promote_secondaries");
        site.machine
            .ip(&["addr", "add", &format!("198.19.{i}.{to}/24"), "dev", "eth0"]);
        site.machine.ip(&[
            "addr",
            "del",
            &format!("198.19.{i}.{from}/24"),
            "dev",
            "eth0",
        ]);
    }

    /// Ends an outage started by [`NatNet::cut`].
    pub fn restore(&self, name: &str) {
        self.site(name).router.nft("delete table ip outage");
    }

    /// Drops every UDP datagram between two NAT routers (in each router, both directions),
    /// keeping UDP to and from the relay (QUIC address discovery). Traffic between machines
    /// can then only go through the relay's HTTPS (TCP). Also drops UDP from a machine to
    /// anything else outside, which there is nothing of.
    pub fn block_udp_between_nats(&self) {
        for (_, s) in &self.sites {
            s.router.nft(&format!(
                "table ip noudp {{
                    chain forward {{
                        type filter hook forward priority -5; policy accept;
                        meta l4proto udp ip saddr != {RELAY_SET} ip daddr != {RELAY_SET} drop
                    }}
                }}"
            ));
        }
    }

    /// Undoes [`NatNet::block_udp_between_nats`].
    pub fn allow_udp_between_nats(&self) {
        for (_, s) in &self.sites {
            s.router.nft("delete table ip noudp");
        }
    }

    /// Turns every NAT router into a plain router: no masquerade, nothing dropped, and the
    /// internet namespace routes each home network to its router, so machines reach each
    /// other's own addresses (`lan_ip`) directly. For baselines (plain OpenSSH between the
    /// same namespaces); the `direct`/`relay` counters keep counting.
    pub fn route_without_nat(&self) {
        self.internet.sh("echo 1 > /proc/sys/net/ipv4/ip_forward");
        for (_, site) in &self.sites {
            site.router.nft(
                "flush table ip nat
                 flush chain ip filter input",
            );
            // The forward chain minus its first rule (the drop of new connections from wan).
            site.router.nft(&format!(
                "flush chain ip filter forward
                 table ip filter {{
                     chain forward {{
                         meta l4proto udp ip saddr != {RELAY_SET} ip daddr != {RELAY_SET} counter name \"direct\"
                         ip daddr {RELAY_SET} tcp dport {RELAY_HTTPS_PORT} counter name \"relay\"
                         ip saddr {RELAY_SET} tcp sport {RELAY_HTTPS_PORT} counter name \"relay\"
                     }}
                 }}"
            ));
            site.router
                .ip(&["route", "add", "default", "via", &RELAY_IP.to_string()]);
            let home = format!("198.19.{}.0/24", site.index);
            let via = format!("198.18.0.{}", 10 + site.index);
            self.internet.ip(&["route", "add", &home, "via", &via]);
        }
    }

    /// Starts the tests' relay in the internet namespace (files under `dir`), once.
    pub fn start_relay(&mut self, dir: &Path) -> &Relay {
        assert!(self.relay.is_none(), "relay already started");
        let relay = Relay::start(&self.internet, dir);
        self.relay.insert(relay)
    }

    /// The running relay (panics if none).
    pub fn relay(&self) -> &Relay {
        self.relay.as_ref().expect("relay not started")
    }

    /// Starts another relay at `ip` ([`RELAY2_IP`] or [`RELAY3_IP`]; same ports, its own CA),
    /// files under `dir`.
    pub fn start_relay_at(&mut self, dir: &Path, ip: Ipv4Addr) -> &Relay {
        assert!(
            [RELAY2_IP, RELAY3_IP].contains(&ip),
            "relays run at 198.18.0.2 or .3"
        );
        assert!(
            self.more_relays.iter().all(|r| r.ip != ip),
            "a relay already runs at {ip}"
        );
        self.internet
            .ip(&["addr", "add", &format!("{ip}/24"), "dev", "br0"]);
        let relay = Relay::start_at(&self.internet, dir, ip);
        self.more_relays.push(relay);
        self.more_relays.last().expect("just pushed")
    }

    /// The relay at `ip` (panics if none was started there).
    pub fn relay_at(&self, ip: Ipv4Addr) -> &Relay {
        self.relay
            .iter()
            .chain(&self.more_relays)
            .find(|r| r.ip == ip)
            .unwrap_or_else(|| panic!("no relay at {ip}"))
    }

    /// Kills the relay at `ip` (SIGKILL: its TCP connections are reset, as when a relay's
    /// machine crashes and comes back without it).
    pub fn kill_relay(&mut self, ip: Ipv4Addr) {
        let r = self
            .relay
            .iter_mut()
            .chain(self.more_relays.iter_mut())
            .find(|r| r.ip == ip)
            .unwrap_or_else(|| panic!("no relay at {ip}"));
        r.kill();
    }

    /// Starts the relay at `ip` again after [`NatNet::kill_relay`]: same address, same
    /// certificate.
    pub fn restart_relay(&mut self, ip: Ipv4Addr) {
        let internet = &self.internet;
        let r = self
            .relay
            .iter_mut()
            .chain(self.more_relays.iter_mut())
            .find(|r| r.ip == ip)
            .unwrap_or_else(|| panic!("no relay at {ip}"));
        r.kill();
        let fresh = Relay::spawn(internet, &r.dir.clone(), ip, r.ca_path.clone());
        *r = fresh;
    }

    /// Bytes the internet namespace received for relay address `ip` so far (any protocol:
    /// relay HTTPS, QUIC address discovery, the captive-portal probe).
    pub fn relay_bytes(&self, ip: Ipv4Addr) -> u64 {
        let name = match ip {
            RELAY_IP => "r1",
            RELAY2_IP => "r2",
            RELAY3_IP => "r3",
            _ => panic!("no counter for {ip}"),
        };
        counter_bytes_in(&self.internet, "relays", name)
    }

    /// What machine `name`'s router has forwarded so far, direct vs relayed (subtract two
    /// readings to see which path a transfer took).
    pub fn traffic(&self, name: &str) -> Traffic {
        let router = &self.site(name).router;
        Traffic {
            direct: counter_bytes(router, "direct"),
            relay: counter_bytes(router, "relay"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Long links: delay, rate, loss
// ---------------------------------------------------------------------------------------------

/// A long link on every machine's uplink ([`NatNet::with_wan`]). This kernel has no netem
/// (FACTS.md), so the delay is the tests' own: a [`DelayLine`] per uplink.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wan {
    /// Round trip machine to machine; each uplink adds a quarter of it each way, so machine
    /// to relay it is half.
    pub rtt: Duration,
    /// Each uplink's rate, each direction (tbf), in Mbit/s.
    pub mbit: u32,
    /// Frames dropped per 10,000, each way on each uplink (nftables `numgen`); 0 for none.
    pub loss_per_10k: u32,
}

impl Wan {
    pub fn new(rtt_ms: u64, mbit: u32) -> Wan {
        Wan {
            rtt: Duration::from_millis(rtt_ms),
            mbit,
            loss_per_10k: 0,
        }
    }
}

impl std::fmt::Display for Wan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ms RTT, {} Mbit/s", self.rtt.as_millis(), self.mbit)?;
        if self.loss_per_10k > 0 {
            write!(f, ", {:.2} % loss", self.loss_per_10k as f64 / 100.0)?;
        }
        Ok(())
    }
}

/// One uplink's delay line: a namespace between a router's `wan` and the internet's bridge
/// port, bridging each side to a TAP device (`r`+`tr` toward the router, `i`+`ti` toward the
/// internet), with a thread of this process (moved into the namespace by `setns`) that reads
/// each frame from one TAP and writes it out the other `rtt/4` later. `tbf` on each TAP's
/// egress (what the thread reads) is the rate limit; its queue is half the path's
/// bandwidth-delay product. Frames, not packets: ARP and everything else crosses unchanged,
/// so the addressing is the same as without it. Stopped on drop.
pub struct DelayLine {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    // After the thread (which holds the TAPs open).
    ns: Netns,
}

/// Frames one delay line may hold at once (per direction): more than any bandwidth-delay
/// product these tests use (1 Gbit/s × 50 ms ≈ 4,200 frames), less than a runaway.
const DELAY_QUEUE_FRAMES: usize = 200_000;

impl DelayLine {
    fn new(name: String, internet: &Netns, port: &str, router: &Netns, wan: Wan) -> DelayLine {
        let ns = Netns::add(name);
        internet.ip(&[
            "link", "add", port, "type", "veth", "peer", "name", "i", "netns", &ns.name,
        ]);
        ns.ip(&[
            "link",
            "add",
            "r",
            "type",
            "veth",
            "peer",
            "name",
            "wan",
            "netns",
            &router.name,
        ]);
        let rate_bytes = u64::from(wan.mbit) * 1_000_000 / 8;
        // tbf needs a burst of at least rate/HZ; 10 ms worth is safe at any HZ.
        let burst = (rate_bytes / 100).max(32 * 1024);
        let limit = (rate_bytes * wan.rtt.as_millis() as u64 / 1000 / 2).max(64 * 1024);
        for (tap, bridge, veth) in [("ti", "bri", "i"), ("tr", "brr", "r")] {
            ns.ip(&["tuntap", "add", "dev", tap, "mode", "tap"]);
            ns.ip(&["link", "add", bridge, "type", "bridge"]);
            ns.ip(&["link", "set", veth, "master", bridge, "up"]);
            ns.ip(&[
                "link",
                "set",
                tap,
                "master",
                bridge,
                "txqueuelen",
                "10000",
                "up",
            ]);
            ns.ip(&["link", "set", bridge, "up"]);
            let out = run_cmd(ns.command(&program("tc")).args([
                "qdisc",
                "add",
                "dev",
                tap,
                "root",
                "tbf",
                "rate",
                &format!("{}mbit", wan.mbit),
                "burst",
                &burst.to_string(),
                "limit",
                &limit.to_string(),
            ]));
            assert_success(&out, &format!("[{}] tc qdisc add dev {tap} tbf", ns.name));
        }
        if wan.loss_per_10k > 0 {
            router.nft(&format!(
                "table ip wanloss {{
                    chain forward {{
                        type filter hook forward priority -20; policy accept;
                        numgen random mod 10000 < {} drop
                    }}
                }}",
                wan.loss_per_10k
            ));
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let one_way = wan.rtt / 4;
        let thread = {
            let stop = stop.clone();
            let ns_name = ns.name.clone();
            std::thread::Builder::new()
                .name(format!("delay-{ns_name}"))
                .spawn(move || {
                    let taps =
                        enter_netns(&ns_name).and_then(|()| Ok([open_tap("ti")?, open_tap("tr")?]));
                    match taps {
                        Ok(taps) => {
                            let _ = ready_tx.send(Ok(()));
                            forward_with_delay(&taps, one_way, &stop);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                        }
                    }
                })
                .expect("spawn delay thread")
        };
        let line = DelayLine {
            stop,
            thread: Some(thread),
            ns,
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => line,
            Ok(Err(e)) => panic!("delay line {}: {e}", line.ns.name),
            Err(_) => panic!("delay line {} did not start", line.ns.name),
        }
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Moves the calling thread into network namespace `ns` (`ip netns` names it under
/// /run/netns). Sockets and TAPs it opens afterwards belong to that namespace, wherever they
/// are used from later.
fn enter_netns(ns: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(format!("/run/netns/{ns}"))?;
    // SAFETY: a valid fd of a namespace file; only this thread's network namespace changes.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` in a fresh thread inside namespace `ns` (for making sockets there).
pub fn in_netns_thread<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_string();
    std::thread::spawn(move || {
        enter_netns(&ns).unwrap_or_else(|e| panic!("setns into {ns}: {e}"));
        f()
    })
    .join()
    .expect("thread in netns")
}

/// Attaches to the (persistent, `ip tuntap add`) TAP device `name` of this thread's
/// namespace, non-blocking, frames without a packet-info header.
fn open_tap(name: &str) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    /// `_IOW('T', 202, int)` from <linux/if_tun.h>.
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `IfReq` lays out.
    if unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF as _, &mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f.into())
}

/// The delay line's loop: every frame read from `taps[k]` is written to `taps[1 - k]` once
/// `delay` has passed since it was read (frames keep their order). Sleeps in `ppoll` until
/// the next frame is due or one arrives; returns when `stop` is set.
fn forward_with_delay(
    taps: &[std::os::fd::OwnedFd; 2],
    delay: Duration,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::collections::VecDeque;
    use std::os::fd::AsRawFd;
    use std::time::Instant;
    let mut queues: [VecDeque<(Instant, Vec<u8>)>; 2] = [VecDeque::new(), VecDeque::new()];
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let next_due = queues
            .iter()
            .filter_map(|q| q.front().map(|(t, _)| t.saturating_duration_since(now)))
            .min()
            .unwrap_or(Duration::from_millis(100))
            .min(Duration::from_millis(100));
        let ts = libc::timespec {
            tv_sec: next_due.as_secs() as libc::time_t,
            tv_nsec: next_due.subsec_nanos() as libc::c_long,
        };
        let mut fds = [
            libc::pollfd {
                fd: taps[0].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: taps[1].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds, a valid timespec, no signal mask change.
        unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
        for (k, pfd) in fds.iter().enumerate() {
            if pfd.revents & libc::POLLIN == 0 {
                continue;
            }
            // A bounded batch per wake-up, so the other direction's due frames never wait
            // behind a flood.
            for _ in 0..256 {
                // SAFETY: reading into a buffer we own, of its length.
                let n = unsafe { libc::read(pfd.fd, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break;
                }
                if queues[k].len() < DELAY_QUEUE_FRAMES {
                    queues[k].push_back((Instant::now() + delay, buf[..n as usize].to_vec()));
                }
            }
        }
        let now = Instant::now();
        for k in 0..2 {
            let out = taps[1 - k].as_raw_fd();
            while queues[k].front().is_some_and(|(t, _)| *t <= now) {
                let (_, frame) = queues[k].pop_front().expect("front");
                // SAFETY: writing one frame we own to a TAP fd (one write = one frame).
                unsafe { libc::write(out, frame.as_ptr().cast(), frame.len()) };
            }
        }
    }
}

/// What a long link measured before a test relied on it ([`NatNet::measure_wan`]).
#[derive(Debug, Clone, Copy)]
pub struct LinkFigures {
    pub wan: Wan,
    /// Round trip machine a → relay plus machine b → relay (ping, average of 5 each): the
    /// machine-to-machine round trip.
    pub rtt: Duration,
    /// The slower of a plain TCP socket's upload from a and download to b (each through one
    /// uplink), over the last half of 3 s.
    pub tcp_mbit: f64,
}

impl LinkFigures {
    /// True when the link is what was set: RTT within -10 %/+30 % (+10 ms), TCP at least
    /// 75 % of the rate. Otherwise the machine is too loaded for the delay line to keep up,
    /// and figures measured over it would mean nothing.
    pub fn ok(&self) -> bool {
        let want = self.wan.rtt.as_secs_f64();
        let got = self.rtt.as_secs_f64();
        got >= want * 0.9
            && got <= want * 1.3 + 0.010
            && self.tcp_mbit >= 0.75 * f64::from(self.wan.mbit)
    }
}

impl std::fmt::Display for LinkFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "link set to {}: measured RTT {:.1} ms (ping), TCP {:.0} Mbit/s (plain socket): {}",
            self.wan,
            self.rtt.as_secs_f64() * 1000.0,
            self.tcp_mbit,
            if self.ok() {
                "as set"
            } else {
                "OFF (not judging)"
            }
        )
    }
}

/// Average RTT of 5 pings from `ns` to `to`, or `None` if none came back.
fn ping_avg(ns: &Netns, to: Ipv4Addr) -> Option<Duration> {
    let out = run_cmd(
        ns.command("ping")
            .args(["-q", "-c", "5", "-i", "0.2", "-W", "3"])
            .arg(to.to_string()),
    );
    // "rtt min/avg/max/mdev = 50.1/50.3/50.9/0.2 ms"
    let text = stdout_of(&out);
    let line = text.lines().find(|l| l.contains("min/avg/max"))?;
    let nums = line.split('=').nth(1)?.trim();
    let avg: f64 = nums.split('/').nth(1)?.parse().ok()?;
    Some(Duration::from_secs_f64(avg / 1000.0))
}

/// Mbit/s a plain TCP connection carried from `writer` to `reader` over the last half of
/// `secs` seconds of writing.
fn tcp_rate(mut writer: std::net::TcpStream, mut reader: std::net::TcpStream, secs: f64) -> f64 {
    use std::io::{Read, Write};
    use std::time::Instant;
    let w = std::thread::spawn(move || {
        let chunk = vec![0x5au8; 64 * 1024];
        let t0 = Instant::now();
        while t0.elapsed().as_secs_f64() < secs {
            if writer.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = writer.shutdown(std::net::Shutdown::Write);
    });
    let mut buf = vec![0u8; 256 * 1024];
    let t0 = Instant::now();
    let mut counted = 0u64;
    let mut counting_since = None;
    let mut last = t0;
    reader
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    while let Ok(n) = reader.read(&mut buf) {
        if n == 0 {
            break;
        }
        last = Instant::now();
        if t0.elapsed().as_secs_f64() >= secs / 2.0 {
            counting_since.get_or_insert(last);
            counted += n as u64;
        }
    }
    let _ = w.join();
    match counting_since {
        Some(since) if last > since => counted as f64 * 8.0 / 1e6 / (last - since).as_secs_f64(),
        _ => 0.0,
    }
}

impl NatNet {
    /// The long link set by [`NatNet::with_wan`], if any.
    pub fn wan(&self) -> Option<Wan> {
        self.wan
    }

    /// Measures the link between machines `a` and `b` as it is now (about 4 s): ping RTT
    /// to the relay's address from each (summed: the machine-to-machine round trip), and a
    /// plain TCP socket's rate up from `a` and down to `b` at the same time. Print it; a
    /// test or benchmark that depends on the link's figures must not judge when
    /// [`LinkFigures::ok`] is false.
    pub fn measure_wan(&self, a: &str, b: &str) -> LinkFigures {
        let wan = self.wan.expect("measure_wan needs NatNet::with_wan");
        let rtt_a = ping_avg(self.machine(a), RELAY_IP);
        let rtt_b = ping_avg(self.machine(b), RELAY_IP);
        let rtt = match (rtt_a, rtt_b) {
            (Some(x), Some(y)) => x + y,
            _ => Duration::from_secs(3600),
        };
        let listener = in_netns_thread(self.internet.name(), || {
            std::net::TcpListener::bind((RELAY_IP, 0)).expect("bind TCP sink")
        });
        let port = listener.local_addr().expect("addr").port();
        let connect = |ns: &str| {
            in_netns_thread(ns, move || {
                std::net::TcpStream::connect_timeout(
                    &SocketAddr::from((RELAY_IP, port)),
                    Duration::from_secs(10),
                )
                .expect("connect to the TCP sink")
            })
        };
        let up_client = connect(self.ns(a));
        let (up_server, _) = listener.accept().expect("accept");
        let down_client = connect(self.ns(b));
        let (down_server, _) = listener.accept().expect("accept");
        let up = std::thread::spawn(move || tcp_rate(up_client, up_server, 3.0));
        let down = tcp_rate(down_server, down_client, 3.0);
        let up = up.join().expect("upload");
        LinkFigures {
            wan,
            rtt,
            tcp_mbit: up.min(down),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A LAN without internet
// ---------------------------------------------------------------------------------------------

/// Two namespaces on one veth link: `a` = 198.19.0.1/24, `b` = 198.19.0.2/24. No router, no
/// relay, nothing else reachable.
pub struct LanNet {
    a: Netns,
    b: Netns,
}

impl LanNet {
    pub fn new() -> LanNet {
        let tag = unique_tag();
        let a = Netns::add(format!("{tag}a"));
        let b = Netns::add(format!("{tag}b"));
        a.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b.name,
        ]);
        a.ip(&["addr", "add", "198.19.0.1/24", "dev", "eth0"]);
        b.ip(&["addr", "add", "198.19.0.2/24", "dev", "eth0"]);
        a.ip(&["link", "set", "eth0", "up"]);
        b.ip(&["link", "set", "eth0", "up"]);
        LanNet { a, b }
    }

    /// 198.19.0.1.
    pub fn a(&self) -> &Netns {
        &self.a
    }

    /// 198.19.0.2.
    pub fn b(&self) -> &Netns {
        &self.b
    }

    pub const A_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
    pub const B_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
}

// ---------------------------------------------------------------------------------------------
// The relay
// ---------------------------------------------------------------------------------------------

/// The tests' iroh relay: HTTPS on 198.18.0.1:3340, QUIC address discovery on :7842, the
/// captive-portal probe on :80, with a certificate for the IP signed by a CA made here.
/// Killed on drop.
pub struct Relay {
    child: Child,
    dir: PathBuf,
    ca_path: PathBuf,
    ip: Ipv4Addr,
}

impl Relay {
    fn start(internet: &Netns, dir: &Path) -> Relay {
        Relay::start_at(internet, dir, RELAY_IP)
    }

    fn start_at(internet: &Netns, dir: &Path, ip: Ipv4Addr) -> Relay {
        fs::create_dir_all(dir).expect("create relay dir");
        let (ca_pem, cert_pem, key_pem) = make_certificates(ip);
        let ca_path = dir.join("relay-ca.pem");
        fs::write(&ca_path, &ca_pem).expect("write CA");
        fs::write(dir.join("relay.crt"), cert_pem).expect("write cert");
        fs::write(dir.join("relay.key"), key_pem).expect("write key");
        Relay::spawn(internet, dir, ip, ca_path)
    }

    /// Runs the relay process (certificates already in `dir`) and waits until it serves.
    fn spawn(internet: &Netns, dir: &Path, ip: Ipv4Addr, ca_path: PathBuf) -> Relay {
        let _ = fs::remove_file(dir.join("ready"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("relay.log"))
            .expect("open relay log");
        let exe = std::env::current_exe().expect("current_exe");
        let mut cmd = internet.command(&exe.display().to_string());
        cmd.args([
            "netsim::relay_process",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(RELAY_ENV, dir)
        .env(RELAY_IP_ENV, ip.to_string())
        .env("RUST_LOG", "iroh_relay=info,iroh_relay::quic=debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("dup log"))
        .stderr(log);
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let child = cmd.spawn().expect("spawn relay");
        let mut relay = Relay {
            child,
            dir: dir.to_path_buf(),
            ca_path,
            ip,
        };
        let ready = poll_until(RELAY_READY_TIMEOUT, || {
            if dir.join("ready").exists() {
                return Some(true);
            }
            matches!(relay.child.try_wait(), Ok(Some(_))).then_some(false)
        });
        if ready != Some(true) {
            let log = relay.log();
            drop(relay);
            panic!("relay did not come up within {RELAY_READY_TIMEOUT:?}:\n{log}");
        }
        relay
    }

    /// `https://198.18.0.1:3340` (or its own IP): the value for `MALAI_RELAY` and the
    /// cluster file's `relays`.
    pub fn url(&self) -> String {
        format!("https://{}:{RELAY_HTTPS_PORT}", self.ip)
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// SIGKILL (idempotent); the process is reaped.
    pub fn kill(&mut self) {
        // std's kill: SIGKILL, and nothing once the child was reaped (no reused pid hit).
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// PEM file of the CA that signed the relay's certificate (`MALAI_RELAY_CA`).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// The CA's PEM text (the cluster file's `relay-ca`).
    pub fn ca_pem(&self) -> String {
        fs::read_to_string(&self.ca_path).expect("read CA")
    }

    /// What the relay logged.
    pub fn log(&self) -> String {
        read_lossy(&self.dir.join("relay.log"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A throwaway CA and a certificate for `ip` signed by it: (CA PEM, cert PEM, key PEM).
fn make_certificates(ip: Ipv4Addr) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "malai e2e relay CA");
    let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("relay key");
    // An IP string becomes an IP SAN.
    let mut leaf = CertificateParams::new(vec![ip.to_string()]).expect("relay params");
    leaf.distinguished_name
        .push(DnType::CommonName, "malai e2e relay");
    let cert = leaf.signed_by(&key, &issuer).expect("sign relay cert");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// Not a test: the relay process. `Relay::start` re-executes this binary with
/// `--exact netsim::relay_process --ignored` and `MALAI_NETSIM_RELAY_DIR` set; without that
/// variable (e.g. `cargo test -- --ignored`) it returns at once. Exits when its parent (the
/// test binary) is gone, so a killed test run leaves no relay behind.
#[test]
#[ignore = "the relay process of the network tests, started by netsim::Relay"]
fn relay_process() {
    let Some(dir) = std::env::var_os(RELAY_ENV) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let ip: Ipv4Addr = std::env::var(RELAY_IP_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(RELAY_IP);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(serve_relay(&dir, ip));
}

async fn serve_relay(dir: &Path, ip: Ipv4Addr) {
    use iroh_relay::server::{
        CertConfig, QuicConfig, RelayConfig, Server, ServerConfig, TlsConfig,
    };
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("relay.crt"))
        .expect("open relay.crt")
        .collect::<Result<_, _>>()
        .expect("parse relay.crt");
    let key = PrivateKeyDer::from_pem_file(dir.join("relay.key")).expect("parse relay.key");
    let tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("TLS versions")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("TLS config");

    let mut relay = RelayConfig::new(SocketAddr::from((ip, 80)));
    relay.tls = Some(TlsConfig::new(
        SocketAddr::from((ip, RELAY_HTTPS_PORT)),
        CertConfig::Manual { server_config: tls },
    ));
    let mut config = ServerConfig::default();
    config.relay = Some(relay);
    config.quic = Some(QuicConfig::new(SocketAddr::from((ip, RELAY_QUIC_PORT))));
    let server = Server::spawn(config).await.expect("spawn relay server");
    eprintln!(
        "relay ready: https {:?}, http {:?}, quic {:?}",
        server.https_addr(),
        server.http_addr(),
        server.quic_addr()
    );
    fs::write(dir.join("ready"), b"ready\n").expect("write ready");
    let parent = nix::unistd::getppid();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if nix::unistd::getppid() != parent {
            eprintln!("relay: parent gone, exiting");
            std::process::exit(0);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests of the network itself (no malai)
// ---------------------------------------------------------------------------------------------

mod smoke {
    use super::*;

    fn ping(from: &Netns, to: Ipv4Addr) -> bool {
        // ping may be absent; a TCP connect attempt by bash needs a listener. Use ping.
        run_cmd(
            from.command("ping")
                .args(["-c", "1", "-W", "1", &to.to_string()]),
        )
        .status
        .success()
    }

    #[test]
    fn netsim_nat_lets_replies_in_and_nothing_else() {
        if !available("netsim::smoke::netsim_nat_lets_replies_in_and_nothing_else") {
            return;
        }
        let net = NatNet::new(&["a", "b"]);
        // Out through the NAT to the internet works.
        assert!(
            ping(net.machine("a"), RELAY_IP),
            "a cannot reach the internet"
        );
        // Nothing unsolicited gets in: b cannot reach a's public address or a's LAN address.
        assert!(!ping(net.machine("b"), net.public_ip("a")));
        assert!(!ping(net.machine("b"), net.lan_ip("a")));
        // An outage cuts a off; restoring brings it back.
        net.cut("a");
        assert!(!ping(net.machine("a"), RELAY_IP), "cut did not cut");
        net.restore("a");
        assert!(ping(net.machine("a"), RELAY_IP), "restore did not restore");
    }

    #[test]
    fn netsim_lan_links_two_namespaces() {
        if !available("netsim::smoke::netsim_lan_links_two_namespaces") {
            return;
        }
        let lan = LanNet::new();
        assert!(ping(lan.a(), LanNet::B_IP));
        assert!(ping(lan.b(), LanNet::A_IP));
    }

    #[test]
    fn netsim_namespaces_are_deleted_on_drop() {
        if !available("netsim::smoke::netsim_namespaces_are_deleted_on_drop") {
            return;
        }
        let names: Vec<String> = {
            let net = NatNet::new(&["a"]);
            vec![net.internet().name().to_string(), net.ns("a").to_string()]
        };
        let list = stdout_of(&run_cmd(
            Command::new(program("ip")).args(["netns", "list"]),
        ));
        for n in names {
            assert!(
                !list.split_whitespace().any(|w| w == n),
                "{n} still exists:\n{list}"
            );
        }
    }

    #[test]
    fn netsim_relay_serves_https_with_the_test_ca() {
        if !available("netsim::smoke::netsim_relay_serves_https_with_the_test_ca") {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let mut net = NatNet::new(&["a"]);
        let relay = net.start_relay(dir.path());
        let url = relay.url();
        let ca = relay.ca_path().to_path_buf();
        // curl from behind a's NAT, verifying the relay's certificate with the test CA.
        let out = run_cmd(net.command("a", "curl").args([
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            &ca.display().to_string(),
            &format!("{url}/healthz"),
        ]));
        assert_success(&out, &format!("curl {url}/healthz\n{}", net.relay().log()));
    }
}

mod wan_smoke {
    use super::*;

    /// The delay line delays and limits: the round trip between two machines is at least
    /// what was set (it never delivers early; a loaded machine only adds), and a plain TCP
    /// socket gets through. Prints what it measured.
    #[test]
    fn netsim_wan_link_delays_and_carries_tcp() {
        if !available("netsim::wan_smoke::netsim_wan_link_delays_and_carries_tcp") {
            return;
        }
        let _lock = heavy_net_lock();
        let net = NatNet::with_wan(&["a", "b"], Wan::new(100, 50));
        let fig = net.measure_wan("a", "b");
        eprintln!("WAN {fig}");
        assert!(
            fig.rtt >= Duration::from_millis(95),
            "round trip shorter than the delay set: {fig}"
        );
        assert!(fig.tcp_mbit > 0.0, "no TCP got through: {fig}");
    }
}
