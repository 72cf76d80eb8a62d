//! One host, end to end as `malai ssh proxy` would reach it: the name, the dial (direct or
//! relayed, how long; through the key's holder when one runs), whether the server's ACL
//! admits us (its answer to a `tunnel`), and whether the server reaches its sshd (the SSH
//! banner tells sshd from the embedded server a refused sshd falls back to).

use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use super::{Check, ms};
use crate::config::SshTarget;
use crate::config::paths::Dirs;
use crate::transport::probe::RelayReport;

/// How long the server's SSH endpoint may take to send its banner.
const BANNER_TIMEOUT: Duration = Duration::from_secs(5);

/// A cluster's relay probe, for naming its relays when a dial fails.
pub(super) struct ClusterRelays {
    pub alias: String,
    pub report: RelayReport,
}

pub(super) async fn checks(dirs: &Dirs, host: &str, relays: &[ClusterRelays]) -> Vec<Check> {
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
        crate::protocol::Request::Tunnel {
            port: None,
            resume: false,
        },
    )
    .await;
    let took = started.elapsed();
    let relay_trouble = || {
        relays
            .iter()
            .filter(|c| c.alias == resolved.dir.alias)
            .flat_map(|c| c.report.relays.iter())
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

#[cfg(test)]
mod tests {
    use super::*;

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
            session_keep: None,
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
