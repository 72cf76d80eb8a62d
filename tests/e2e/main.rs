//! End-to-end tests of `malai ssh`: one test binary, real processes (sshd, ssh, scp, rsync,
//! git, `malai`), every simulated machine its own `MALAI_HOME`, on loopback or in network
//! namespaces the tests make themselves (`netsim`).

// Reusable helpers: sshd, simulated machines, `malai ssh server` processes, CLI-built clusters.
mod harness;
// The OpenSSH bridge: ssh/scp/rsync/git through `malai ssh proxy`, denials, SIGTERM, reload.
mod bridge;
// Native exec (`malai ssh host cmd`): exit codes, streams, rsync/git -e, pty, ACL scopes, groups.
mod exec;
// The malai protocol over OpenSSH: stdinserver as sshd's forced command, ssh-via clients.
mod shim;
// The embedded SSH server: ssh, scp, sftp, rsync, git with no sshd; known-hosts; scoping.
mod embedded;
// Config sync, `cluster status/remove`, join by domain (dnsmasq), two clusters on one machine.
mod sync;
// `malai ssh agent`: -e lifecycle, connection reuse, lockdown, fallback, idle/broken, new clusters.
mod agent;
// The agent's HTTP proxy: services with ACL, 403/404/502, CONNECT, 64 MiB, malai ssh curl.
mod http;
// Port forwarding: ssh -L/-D/-R/-W/-A and unix sockets via embedded and sshd; ACL twins.
mod forward;
// Faults: killed servers, restarts, stopped sshd, slowloris and silent streams, stream cap,
// unwritable cluster folder during a push.
mod faults;
// Load: 100 concurrent scp/rsync through one server; 1,000 concurrent exec from 50 peers.
mod load;
// Simulated networks: namespaces, NAT routers (nftables), the tests' own iroh relay.
mod netsim;
// Real networks: an offline LAN by `addrs` (issue 14); NAT'd machines found by id52 through
// the cluster's own relay, relay-only with UDP blocked, config sync across NATs, outages,
// restarts, one identity per machine (issue 11).
mod nat;
// Long links (issue 21): a 200 ms WAN in the namespace network; the WAN benchmark.
mod wan;
// Several relays (issue 21): the home relay killed idle and during a session, re-homing,
// `malai ssh status`, and a relay not in the cluster file never used.
mod failover;
// Sessions that outlive the connection (issue 18): a stopped proxy, cuts past the idle limit,
// restarts, revocation while detached, caps.
mod resume;
// One endpoint per id52 per machine: the server holds the key; CLI and agent go through it.
mod holder;
// `malai ssh demo` end to end.
mod demo;
// Secrets audit: no key material in any log, audit log or pushed file after a full scenario.
mod secrets;
// Security review (issue 12): concurrent cluster edits, revocation, strangers.
mod security;
// Installing like a system tool: the Debian package (cargo-deb), systemd units verified.
mod package;
// `malai ssh doctor`: healthy, refused peer, stopped sshd, stopped/missing holder, relay CA.
mod doctor;
// First use (issue 24): devices follow the manager, lockdown for every key reader, messages.
mod firstuse;
