//! `malai ssh doctor [host]`: one report that answers "why can't I connect?", a line per
//! check, each passed (✔) or failed (✘) with the reason and the fix — like
//! `tailscale netcheck` or `tsh status`.
//!
//! Checks, in the order a connection needs them: local files and permissions (DATADIR,
//! the runtime dir, key files); each cluster this machine is in and its role there; who
//! holds each cluster key and whether that process answers; each relay in use (reachable,
//! TLS named on failure, latency) and QUIC address discovery (this machine's public
//! address as the relays see it); and for a host: the name, the dial (direct or relayed,
//! how long), the server's ACL answer, and whether the server reaches its sshd.
//!
//! Doctor only looks: it never binds a cluster key of its own (the relay probe uses a
//! throwaway key), never writes a file, and a host check goes through the key's holder
//! exactly as `malai ssh proxy` would. Exit status 0 only when every check passed.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use crate::config::paths::Dirs;
use crate::config::store::ClusterDir;
use crate::config::{ClusterConfig, MemberKind, SshTarget};
use crate::transport::probe::{self, RelayReport};

/// How long a key holder may take to answer its status.
const HOLDER_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the server's SSH endpoint may take to send its banner.
const BANNER_TIMEOUT: Duration = Duration::from_secs(5);

/// One line of the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    /// What was checked (`cluster acme`, `relay https://…`, `dial foo.acme`).
    pub check: String,
    pub ok: bool,
    /// What was found, or why it failed.
    pub detail: String,
    /// What to do about a failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn pass(check: impl Into<String>, detail: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            ok: true,
            detail: detail.into(),
            fix: None,
        }
    }

    fn fail(check: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            check: check.into(),
            ok: false,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// The whole report (`--json` prints it as is).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Every check passed.
    pub ok: bool,
    pub checks: Vec<Check>,
}

/// Run every check (and the host's, when one is given).
pub async fn run(dirs: &Dirs, host: Option<&str>) -> Report {
    let mut checks = local_files(dirs);
    checks.extend(agent_env().await);
    let mut relays: Vec<(String, RelayReport)> = vec![];
    match crate::config::store::list_clusters(dirs) {
        Ok(list) if list.is_empty() => checks.push(Check::fail(
            "clusters",
            "this machine is in no cluster",
            "`malai ssh cluster init <alias>` (a new cluster) or `malai ssh cluster join <alias> <manager-id52>`",
        )),
        Ok(list) => {
            for dir in &list {
                let (c, report) = cluster(dir).await;
                checks.extend(c);
                if let Some(r) = report {
                    relays.push((dir.alias.clone(), r));
                }
            }
        }
        Err(e) => checks.push(Check::fail(
            "clusters",
            e.to_string(),
            "fix the permissions of DATADIR",
        )),
    }
    if let Some(host) = host {
        checks.extend(host_checks(dirs, host, &relays).await);
    }
    Report {
        ok: checks.iter().all(|c| c.ok),
        checks,
    }
}

/// The report as text: a line per check, the fix indented under a failure.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    for c in &report.checks {
        let mark = if c.ok { '✔' } else { '✘' };
        out.push_str(&format!("{mark} {}: {}\n", c.check, c.detail));
        if let Some(fix) = &c.fix {
            out.push_str(&format!("    fix: {fix}\n"));
        }
    }
    let failed = report.checks.iter().filter(|c| !c.ok).count();
    if failed == 0 {
        out.push_str(&format!("all {} checks passed\n", report.checks.len()));
    } else {
        out.push_str(&format!(
            "{failed} of {} checks failed\n",
            report.checks.len()
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Local files
// ---------------------------------------------------------------------------------------------

fn local_files(dirs: &Dirs) -> Vec<Check> {
    let mut out = vec![];
    out.push(match dir_check(&dirs.data, 0o022) {
        DirState::Missing => Check::fail(
            "DATADIR",
            format!(
                "{} does not exist: this machine is in no cluster",
                dirs.data.display()
            ),
            "`malai ssh cluster init <alias>` or `malai ssh cluster join <alias> <manager-id52>`",
        ),
        DirState::Fine(mode) => Check::pass(
            "DATADIR",
            format!("{} (mode {mode:o})", dirs.data.display()),
        ),
        DirState::Bad(why) => Check::fail(
            "DATADIR",
            format!("{}: {why}", dirs.data.display()),
            format!(
                "chmod go-w {} (and chown it to this user)",
                dirs.data.display()
            ),
        ),
    });
    out.push(match dir_check(&dirs.run, 0o077) {
        DirState::Missing => Check::pass(
            "runtime dir",
            format!(
                "{} not created yet (the first server or agent makes it, mode 0700)",
                dirs.run.display()
            ),
        ),
        DirState::Fine(mode) => Check::pass(
            "runtime dir",
            format!("{} (mode {mode:o})", dirs.run.display()),
        ),
        DirState::Bad(why) => Check::fail(
            "runtime dir",
            format!(
                "{}: {why}; the server and agent refuse to use it",
                dirs.run.display()
            ),
            format!(
                "chmod 700 {} (and chown it to this user)",
                dirs.run.display()
            ),
        ),
    });
    out
}

enum DirState {
    Missing,
    Fine(u32),
    Bad(String),
}

/// A directory that must be ours, a real directory, with none of `forbidden` mode bits.
fn dir_check(path: &Path, forbidden: u32) -> DirState {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DirState::Missing,
        Err(e) => return DirState::Bad(e.to_string()),
    };
    let mode = meta.mode() & 0o777;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() {
        DirState::Bad("not a directory (a symlink?)".into())
    } else if meta.uid() != me {
        DirState::Bad(format!(
            "owned by uid {}, not this user (uid {me})",
            meta.uid()
        ))
    } else if mode & forbidden != 0 {
        DirState::Bad(format!("mode {mode:o} is too open"))
    } else {
        DirState::Fine(mode)
    }
}

/// `MALAI_SSH_AGENT`, when set, must name an agent that answers: proxy and exec use it.
async fn agent_env() -> Option<Check> {
    let socket = crate::control::socket_from_env()?;
    let what = format!("agent {}", socket.display());
    Some(match holder_status(&socket).await {
        Ok(s) => Check::pass(
            what,
            format!(
                "answers (pid {}, clusters: {})",
                s.pid,
                s.clusters.join(", ")
            ),
        ),
        Err(e) => Check::fail(
            what,
            format!("MALAI_SSH_AGENT names it, but it does not answer: {e}"),
            "`eval \"$(malai ssh agent -e)\"` starts it (or unset MALAI_SSH_AGENT)",
        ),
    })
}

async fn holder_status(socket: &Path) -> Result<crate::control::protocol::HolderStatus, String> {
    let ask = async {
        let client = crate::control::client::ControlClient::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        client.status().await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(HOLDER_TIMEOUT, ask).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {} s", HOLDER_TIMEOUT.as_secs())),
    }
}

// ---------------------------------------------------------------------------------------------
// One cluster: membership, role, key, holder, relays
// ---------------------------------------------------------------------------------------------

async fn cluster(dir: &ClusterDir) -> (Vec<Check>, Option<RelayReport>) {
    let name = format!("cluster {}", dir.alias);
    let mut out = vec![];
    let me = match crate::keys::id52(&dir.dir) {
        Ok(id) => id,
        Err(e) => {
            out.push(Check::fail(
                name,
                format!("no key: {e}"),
                format!(
                    "join again: `malai ssh cluster join {} <manager-id52>`",
                    dir.alias
                ),
            ));
            return (out, None);
        }
    };
    let cfg = if dir.has_file() {
        match dir.load() {
            Ok(c) => Some(c),
            Err(e) => {
                out.push(Check::fail(
                    name.clone(),
                    format!("its cluster file is broken: {e}"),
                    "fix the file on the manager and push it (`malai ssh cluster push`)",
                ));
                None
            }
        }
    } else {
        out.push(Check::fail(
            name.clone(),
            format!("joined as {me}, but there is no cluster file yet"),
            format!(
                "ask the manager to add {me}; then `malai ssh cluster pull --cluster {}` (or wait for its push)",
                dir.alias
            ),
        ));
        None
    };
    let role = cfg.as_ref().map(|c| role_of(c, &me));
    if let (Some(cfg), Some(role)) = (&cfg, &role) {
        out.push(match role {
            Role::Unknown => Check::fail(
                name.clone(),
                format!("the cluster file does not name this machine ({me})"),
                format!("on the manager: `malai ssh cluster add server|device <name> {me}`"),
            ),
            r => Check::pass(
                name.clone(),
                format!(
                    "{} (manager {})",
                    r.describe(),
                    short(&cfg.manager.to_string())
                ),
            ),
        });
    }
    out.push(key_file(dir));
    let server_name = match &role {
        Some(Role::Member(n, MemberKind::Server)) => Some(n.clone()),
        _ => None,
    };
    out.extend(holder(dir, server_name.as_deref()).await);
    let (relay_checks, report) = relays(dir, cfg.as_ref()).await;
    out.extend(relay_checks);
    (out, report)
}

enum Role {
    Manager(Option<(String, MemberKind)>),
    Member(String, MemberKind),
    Unknown,
}

impl Role {
    fn describe(&self) -> String {
        let member = |n: &str, k: &MemberKind| match k {
            MemberKind::Server => format!("server {n}"),
            MemberKind::Device => format!("device {n}"),
        };
        match self {
            Role::Manager(None) => "manager".into(),
            Role::Manager(Some((n, k))) => format!("manager, and {}", member(n, k)),
            Role::Member(n, k) => member(n, k),
            Role::Unknown => "not named in the file".into(),
        }
    }
}

fn role_of(cfg: &ClusterConfig, me: &crate::id52::Id52) -> Role {
    let member = cfg.name_of(me).map(|(n, k)| (n.to_string(), k));
    match (cfg.manager == *me, member) {
        (true, m) => Role::Manager(m),
        (false, Some((n, k))) => Role::Member(n, k),
        (false, None) => Role::Unknown,
    }
}

fn short(id: &str) -> String {
    format!("{}…", &id[..id.len().min(8)])
}

/// The secret key file, when the key lives in a file: 0600 and ours (malai refuses it
/// otherwise).
fn key_file(dir: &ClusterDir) -> Check {
    let what = format!("key {}", dir.alias);
    let path = dir.dir.join(crate::keys::SECRET_FILE);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Check::pass(what, "in the OS keyring (no key file)")
        }
        Err(e) => Check::fail(
            what,
            format!("{}: {e}", path.display()),
            "fix the permissions of the cluster folder",
        ),
        Ok(m) if m.mode() & 0o077 != 0 => Check::fail(
            what,
            format!(
                "{} is mode {:o}: group or others can read it, so malai refuses it",
                path.display(),
                m.mode() & 0o777
            ),
            format!("chmod 600 {}", path.display()),
        ),
        Ok(m) if m.uid() != nix::unistd::geteuid().as_raw() => Check::fail(
            what,
            format!("{} is owned by uid {}", path.display(), m.uid()),
            format!("chown it to this user: {}", path.display()),
        ),
        Ok(_) => Check::pass(what, format!("{} (mode 600)", path.display())),
    }
}

/// Who holds the key (server, agent, none) and whether it answers; a server machine
/// whose server is not running fails.
async fn holder(dir: &ClusterDir, server: Option<&str>) -> Vec<Check> {
    use crate::control::lock::Role as HolderRole;
    let what = format!("key holder {}", dir.alias);
    let h = match crate::control::lock::holder(dir) {
        Ok(h) => h,
        Err(e) => {
            return vec![Check::fail(
                what,
                e.to_string(),
                "fix the permissions of the cluster folder",
            )];
        }
    };
    let mut out = vec![];
    match &h {
        None => out.push(Check::pass(
            what,
            "no server or agent holds it: each command binds it for its own length (`malai ssh agent` pools connections)",
        )),
        Some(h) => {
            let who = match h.role {
                HolderRole::Server => "malai ssh server",
                HolderRole::Agent => "malai ssh agent",
                HolderRole::Command => "a malai command",
            };
            let Some(socket) = &h.socket else {
                out.push(Check::pass(what, format!("{who} (pid {})", h.pid)));
                return out;
            };
            out.push(match holder_status(socket).await {
                Ok(_) => Check::pass(
                    what,
                    format!("{who} (pid {}) answers on {}", h.pid, socket.display()),
                ),
                Err(e) => Check::fail(
                    what,
                    format!(
                        "{who} (pid {}) holds it but does not answer on {}: {e}",
                        h.pid,
                        socket.display()
                    ),
                    format!(
                        "a stopped process resumes with `kill -CONT {pid}`; a hung one: `kill {pid}` and start it again (every command of this cluster waits on it meanwhile)",
                        pid = h.pid
                    ),
                ),
            });
        }
    }
    if let Some(name) = server {
        let serving = matches!(&h, Some(h) if h.role == HolderRole::Server);
        if !serving {
            out.push(Check::fail(
                format!("server {name}.{}", dir.alias),
                "this machine is a server in the cluster, but no `malai ssh server` runs here",
                "`systemctl start malai-ssh-server` (the Debian package's unit) or run `malai ssh server`",
            ));
        }
    }
    out
}

async fn relays(
    dir: &ClusterDir,
    cfg: Option<&ClusterConfig>,
) -> (Vec<Check>, Option<RelayReport>) {
    let what = format!("relays {}", dir.alias);
    let net = match crate::session::own::net_config(cfg) {
        Ok(n) => n,
        Err(e) => {
            return (
                vec![Check::fail(
                    what,
                    e.to_string(),
                    "fix `relays`/`relay-ca` in the cluster file, or MALAI_RELAY / MALAI_RELAY_CA",
                )],
                None,
            );
        }
    };
    if probe::relay_urls(&net).is_empty() {
        return (
            vec![Check::pass(
                what,
                "disabled (MALAI_RELAY=disabled): peers are reached through `addrs` hints only",
            )],
            None,
        );
    }
    let report = match probe::probe(&net).await {
        Ok(r) => r,
        Err(e) => {
            return (
                vec![Check::fail(
                    what,
                    e.to_string(),
                    "check MALAI_BIND and the relay settings",
                )],
                None,
            );
        }
    };
    let mut out = vec![];
    for r in &report.relays {
        let what = format!("relay {}", r.url);
        out.push(match &r.problem {
            None => Check::pass(
                what,
                format!(
                    "reachable, {:.1} ms{}",
                    r.latency_ms.unwrap_or_default(),
                    if r.home { " (home relay)" } else { "" }
                ),
            ),
            Some(p) => Check::fail(what, p.to_string(), p.fix()),
        });
    }
    let d = &report.discovery;
    let what = format!("address discovery {}", dir.alias);
    let none_reachable = report.relays.iter().all(|r| r.problem.is_some());
    out.push(if none_reachable {
        Check::fail(
            what,
            "not tried: no relay is reachable",
            "fix the relay problems above first",
        )
    } else if d.answered {
        let public: Vec<String> = [d.public_v4, d.public_v6]
            .iter()
            .flatten()
            .map(|a| a.to_string())
            .collect();
        Check::pass(
            what,
            format!(
                "QUIC address discovery answers; public address {}",
                if public.is_empty() {
                    "unknown".to_string()
                } else {
                    public.join(", ")
                }
            ),
        )
    } else {
        Check::fail(
            what,
            "no QUIC address discovery answer from any relay: no hole punching, connections stay relayed",
            "open UDP 7842 to the relay and run it with enable_quic_addr_discovery = true",
        )
    });
    (out, Some(report))
}

// ---------------------------------------------------------------------------------------------
// One host: name, dial, ACL, sshd
// ---------------------------------------------------------------------------------------------

async fn host_checks(dirs: &Dirs, host: &str, relays: &[(String, RelayReport)]) -> Vec<Check> {
    use crate::session::SessionError;
    let mut out = vec![];
    let resolved = match crate::session::resolve(dirs, host) {
        Ok(r) => r,
        Err(e) => {
            out.push(Check::fail(
                format!("name {host}"),
                e.to_string(),
                "check the name (`malai ssh config` lists every cluster's hosts) and that the cluster file is current (`malai ssh cluster pull`)",
            ));
            return out;
        }
    };
    let Some(server) = resolved.server().cloned() else {
        out.push(Check::fail(
            format!("name {host}"),
            "names a group, not one server",
            "give one server's name",
        ));
        return out;
    };
    out.push(Check::pass(
        format!("name {host}"),
        format!(
            "server {} of cluster {} ({})",
            server.name, resolved.dir.alias, server.id52
        ),
    ));
    let dial = format!("dial {host}");
    let started = Instant::now();
    let opened = crate::session::open(
        &resolved,
        &server,
        crate::protocol::Request::Tunnel { port: None },
    )
    .await;
    let took = started.elapsed();
    let relay_trouble = || {
        relays
            .iter()
            .filter(|(alias, _)| *alias == resolved.dir.alias)
            .flat_map(|(_, r)| r.relays.iter())
            .any(|r| r.problem.is_some())
    };
    let acl = format!("access {host}");
    let sshd = format!("sshd behind {host}");
    let mut session = match opened {
        Ok(s) => s,
        Err(SessionError::Denied(reason)) => {
            out.push(Check::pass(
                dial,
                format!("the server answered in {}", ms(took)),
            ));
            out.push(Check::fail(
                acl,
                format!("the server's ACL refuses us: {reason}"),
                "on the manager: `malai ssh cluster allow <server> <this machine>`, then push",
            ));
            return out;
        }
        Err(SessionError::Refused(reason)) if reason.contains("cannot reach its ssh") => {
            out.push(Check::pass(
                dial,
                format!("the server answered in {}", ms(took)),
            ));
            out.push(Check::pass(acl, "the server's ACL admits us for ssh"));
            out.push(Check::fail(
                sshd,
                reason,
                format!(
                    "start sshd on {}, or fix `ssh = …` in [server.{}] (or `ssh = \"embedded\"`)",
                    server.name, server.name
                ),
            ));
            return out;
        }
        Err(e) => {
            let fix = if relay_trouble() {
                "fix the relay problems above first".to_string()
            } else {
                format!(
                    "is `malai ssh server` running on {}? Check `addrs` in [server.{}] and the network between",
                    server.name, server.name
                )
            };
            out.push(Check::fail(dial, format!("{e} (after {})", ms(took)), fix));
            return out;
        }
    };
    out.push(Check::pass(
        dial,
        format!(
            "connected and answered in {}{}",
            ms(took),
            path_text(dirs, &resolved.dir.alias, &server, &session).await
        ),
    ));
    out.push(Check::pass(acl, "the server's ACL admits us for ssh"));
    let banner = read_banner(&mut session.recv).await;
    session.abort().await;
    out.push(sshd_check(sshd, &server, banner));
    out
}

async fn path_text(
    dirs: &Dirs,
    cluster: &str,
    server: &crate::config::Server,
    session: &crate::session::Session,
) -> String {
    if let Some(via) = &server.ssh_via {
        return format!(", through ssh-via {via}");
    }
    if let Some(p) = session.path() {
        let kind = if p.direct { "direct" } else { "relayed" };
        return format!(", {kind} {}, rtt {}", p.addr, ms(p.rtt));
    }
    // Through the key's holder: its status says which path its connection took.
    let peer = server.id52.to_string();
    for h in crate::control::live_holders(dirs).await {
        if let Some(c) = h
            .status
            .connections
            .iter()
            .find(|c| c.cluster == cluster && c.peer == peer)
        {
            let kind = match c.path.as_str() {
                "" => "path unknown",
                p => p,
            };
            let rtt = c
                .rtt_ms
                .map(|r| format!(", rtt {r:.1} ms"))
                .unwrap_or_default();
            return format!(
                ", via the {} (pid {}): {kind} {}{rtt}",
                h.role, h.status.pid, c.addr
            );
        }
    }
    ", via the key holder".into()
}

/// The first line the server's SSH endpoint sends (`SSH-2.0-…`), if it sends one in time.
async fn read_banner<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Result<String, String> {
    let read = async {
        let mut buf = Vec::with_capacity(256);
        let mut byte = [0u8; 1];
        while buf.len() < 255 {
            match r.read(&mut byte).await {
                Ok(0) => break,
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => buf.push(byte[0]),
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(String::from_utf8_lossy(&buf).trim_end().to_string())
    };
    match tokio::time::timeout(BANNER_TIMEOUT, read).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no SSH banner within {} s",
            BANNER_TIMEOUT.as_secs()
        )),
    }
}

/// The embedded server's banner starts with this (`server::embedded`).
const EMBEDDED_BANNER: &str = "SSH-2.0-malai_";

fn sshd_check(
    what: String,
    server: &crate::config::Server,
    banner: Result<String, String>,
) -> Check {
    let banner = match banner {
        Ok(b) if b.starts_with("SSH-") => b,
        Ok(b) => {
            return Check::fail(
                what,
                format!("the tunnel answered {b:?}, not an SSH banner"),
                format!(
                    "point `ssh = …` in [server.{}] at an SSH server",
                    server.name
                ),
            );
        }
        Err(e) => {
            return Check::fail(
                what,
                e,
                format!("check the SSH server behind {} (its log)", server.name),
            );
        }
    };
    let embedded = banner.starts_with(EMBEDDED_BANNER);
    match (&server.ssh, embedded) {
        (SshTarget::Embedded, _) => {
            Check::pass(what, format!("the embedded SSH server answers ({banner})"))
        }
        (SshTarget::Tcp(addr), false) => Check::pass(
            what,
            format!("the server reaches its sshd at {addr} ({banner})"),
        ),
        (SshTarget::Tcp(addr), true) => Check::fail(
            what,
            format!(
                "nothing listens at {addr} on the server: it answers with its embedded SSH server instead, whose host key is not sshd's (ssh then refuses it)"
            ),
            format!(
                "start sshd on {}, or set `ssh = \"embedded\"` in [server.{}] and add `malai ssh known-hosts` to known_hosts",
                server.name, server.name
            ),
        ),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_marks_each_check_and_counts_failures() {
        let report = Report {
            ok: false,
            checks: vec![
                Check::pass("DATADIR", "/x (mode 700)"),
                Check::fail("relay https://r", "untrusted certificate", "add relay-ca"),
            ],
        };
        let text = render(&report);
        assert!(text.contains("✔ DATADIR: /x (mode 700)\n"), "{text}");
        assert!(
            text.contains("✘ relay https://r: untrusted certificate\n    fix: add relay-ca\n"),
            "{text}"
        );
        assert!(text.ends_with("1 of 2 checks failed\n"), "{text}");
    }

    #[test]
    fn an_open_runtime_dir_fails_and_a_private_one_passes() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dirs = Dirs::under(t.path());
        std::fs::create_dir_all(&dirs.run).unwrap();
        std::fs::set_permissions(&dirs.run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = local_files(&dirs);
        let run = c.iter().find(|c| c.check == "runtime dir").unwrap();
        assert!(!run.ok, "{run:?}");
        assert!(
            run.fix.as_deref().unwrap().starts_with("chmod 700"),
            "{run:?}"
        );
        std::fs::set_permissions(&dirs.run, std::fs::Permissions::from_mode(0o700)).unwrap();
        let c = local_files(&dirs);
        assert!(c.iter().all(|c| c.ok), "{c:?}");
    }

    #[test]
    fn banner_tells_sshd_from_the_embedded_fallback() {
        let server = |ssh| crate::config::Server {
            name: "foo".into(),
            id52: crate::id52::Id52::from_bytes([7; 32]),
            allow_from: vec![],
            ssh,
            addrs: vec![],
            commands: Default::default(),
            services: Default::default(),
            ssh_via: None,
            ssh_identity_file: None,
            forwarding: true,
        };
        let tcp = server(SshTarget::Tcp("127.0.0.1:22".into()));
        assert!(sshd_check("s".into(), &tcp, Ok("SSH-2.0-OpenSSH_9.2p1".into())).ok);
        let fell_back = sshd_check("s".into(), &tcp, Ok("SSH-2.0-malai_0.1.0".into()));
        assert!(
            !fell_back.ok && fell_back.detail.contains("embedded"),
            "{fell_back:?}"
        );
        let emb = server(SshTarget::Embedded);
        assert!(sshd_check("s".into(), &emb, Ok("SSH-2.0-malai_0.1.0".into())).ok);
        assert!(!sshd_check("s".into(), &tcp, Err("no SSH banner".into())).ok);
    }
}
