//! `malai ssh agent …`, `malai ssh status` and `malai ssh curl`: the commands that talk to
//! the local key holders, and how their answers are shown to people.

use tokio_util::sync::CancellationToken;

use super::AgentCommand;
use crate::config::paths::Dirs;
use crate::table::Table;

/// The agent at `path`, or `None` when none runs there (no socket file, or one nobody
/// listens on). The trust checks come first: a socket someone else planted is an error,
/// never connected to.
async fn connect_agent(
    path: &std::path::Path,
) -> Result<Option<crate::control::client::ControlClient>, crate::control::client::ConnectError> {
    use crate::control::client::{ConnectError, ControlClient};
    match ControlClient::connect(path).await {
        Ok(c) => Ok(Some(c)),
        Err(_) if std::fs::symlink_metadata(path).is_err() => Ok(None),
        Err(ConnectError::Unreachable { source, .. })
            if source.kind() == std::io::ErrorKind::ConnectionRefused =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `malai ssh agent …`.
pub(super) async fn run(
    dirs: Dirs,
    command: Option<AgentCommand>,
    environment: bool,
    lockdown: bool,
    http: bool,
    under_lock: bool,
) -> anyhow::Result<()> {
    use crate::agent::launch;
    let socket =
        || crate::control::socket_from_env().unwrap_or_else(|| crate::control::agent_socket(&dirs));
    match command {
        Some(AgentCommand::Status { json }) => {
            let path = socket();
            let Some(client) = connect_agent(&path).await? else {
                anyhow::bail!(
                    "no agent is running (nothing answers on {}); start one with: eval \"$(malai ssh agent -e)\"",
                    path.display()
                );
            };
            let status = client.status().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render_agent_status(&status));
            }
            Ok(())
        }
        Some(AgentCommand::Stop) => {
            let path = socket();
            let Some(client) = connect_agent(&path).await? else {
                eprintln!(
                    "malai: no agent is running (nothing answers on {}); nothing to stop",
                    path.display()
                );
                return Ok(());
            };
            let hello = client.hello.clone();
            client.stop().await?;
            // Return once the socket is gone, so a following `agent -e` starts afresh; a
            // socket still there after 5 s is a failure, not "ok".
            for _ in 0..250 {
                if !path.exists() {
                    eprintln!("malai: {}", launch::stopped_line(&path, &hello));
                    return Ok(());
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            anyhow::bail!(
                "the agent said it is stopping, but its socket {} is still there after 5 s",
                path.display()
            )
        }
        None if environment => {
            let running = launch::ensure_running(&dirs, http).await?;
            let http_addr = if http { running.hello.http } else { None };
            if http && http_addr.is_none() {
                eprintln!(
                    "malai: the running agent has no HTTP proxy (started with --http=false); `malai ssh agent stop` and start it again to get one"
                );
            }
            print!(
                "{}",
                launch::export_lines(&running.socket, lockdown, http_addr)
            );
            Ok(())
        }
        None => {
            let shutdown = CancellationToken::new();
            let token = shutdown.clone();
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
            tokio::spawn(async move {
                tokio::select! {
                    _ = term.recv() => {},
                    _ = hup.recv() => {},
                    _ = tokio::signal::ctrl_c() => {},
                    _ = token.cancelled() => return,
                }
                tracing::info!("signal received; agent shutting down");
                token.cancel();
            });
            let opts = crate::agent::daemon::AgentOptions { http, under_lock };
            let result = crate::agent::daemon::run(dirs, opts, shutdown.clone(), |ready| {
                eprintln!("malai: agent ready on {}", ready.socket.display());
                if let Some(a) = ready.http {
                    eprintln!("malai: HTTP proxy on http://{a}");
                }
            })
            .await;
            shutdown.cancel();
            Ok(result?)
        }
    }
}

/// Human-readable `malai ssh status`.
pub fn render_status(holders: &[crate::control::LiveHolder]) -> String {
    if holders.is_empty() {
        return "no malai ssh server or agent is running here\n".into();
    }
    let mut table = Table::new(["HOLDER", "CLUSTER", "PEER", "DIR", "PATH", "ADDRESS", "RTT"]);
    for h in holders {
        let who = format!("{} {}", h.role, h.status.pid);
        if h.status.connections.is_empty() {
            table.row([who.as_str(), "-", "-"]);
        }
        for c in &h.status.connections {
            let path = if c.path.is_empty() { "-" } else { &c.path };
            let rtt = c.rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_default();
            table.row([
                who.clone(),
                c.cluster.clone(),
                c.server.clone(),
                c.direction.clone(),
                path.to_string(),
                c.addr.clone(),
                rtt,
            ]);
        }
    }
    let mut out = table.render();
    // Each cluster's relays: which one is home (peers reach this machine through it when
    // no direct path works), and any set aside after it went down.
    for h in holders {
        for r in &h.status.relays {
            let state = match (r.home, r.connected, r.set_aside_secs) {
                (_, _, Some(s)) => format!("down, set aside {s} s ago"),
                (true, true, _) => "home, connected".into(),
                (true, false, _) => match &r.error {
                    Some(e) => format!("home, not connected: {e}"),
                    None => "home, connecting".into(),
                },
                (false, _, _) => "standby".into(),
            };
            out.push_str(&format!(
                "{} {} relay for {}: {} ({state})\n",
                h.role, h.status.pid, r.cluster, r.url
            ));
        }
    }
    // Resumable sessions a server keeps (issue 18): attached, or detached awaiting their
    // client.
    for h in holders {
        for s in &h.status.sessions {
            let state = match s.detached_secs {
                Some(d) => format!("detached {}", secs(d)),
                None => "attached".to_string(),
            };
            out.push_str(&format!(
                "{} {} session {}/{}: {state}, age {}, {} bytes buffered\n",
                h.role,
                h.status.pid,
                s.cluster,
                s.peer,
                secs(s.age_secs),
                s.buffered
            ));
        }
    }
    // Which clusters each holder serves, and why not the others.
    for h in holders {
        let serves = match h.status.clusters.is_empty() {
            true => "(none)".to_string(),
            false => h.status.clusters.join(", "),
        };
        out.push_str(&format!("{} {} serves: {serves}\n", h.role, h.status.pid));
        for (cluster, why) in &h.status.not_served {
            out.push_str(&format!(
                "{} {} does not serve {cluster}: {why}\n",
                h.role, h.status.pid
            ));
        }
    }
    out
}

/// `90` → `1m 30s`.
/// This machine's resumable client sessions (`session::registry`): attached, or
/// reconnecting since when.
pub fn render_client_sessions(records: &[crate::session::registry::Record]) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut out = String::new();
    for r in records {
        let state = match r.reconnecting_since {
            Some(t) => format!("reconnecting for {}", secs(now.saturating_sub(t))),
            None => "attached".to_string(),
        };
        let what = if r.kind == "tunnel" {
            "malai ssh proxy"
        } else {
            "malai ssh"
        };
        out.push_str(&format!(
            "client {} session {}/{} ({what}): {state}, age {}, {} bytes buffered\n",
            r.pid,
            r.cluster,
            r.server,
            secs(now.saturating_sub(r.started)),
            r.buffered
        ));
    }
    out
}

fn secs(n: u64) -> String {
    humantime::format_duration(std::time::Duration::from_secs(n)).to_string()
}

/// Human-readable `agent status`.
pub fn render_agent_status(s: &crate::control::protocol::HolderStatus) -> String {
    let mut out = format!(
        "agent pid {} (control protocol {}) on {}\n",
        s.pid, s.version, s.socket
    );
    match s.http {
        Some(a) => out.push_str(&format!("http proxy: http://{a}\n")),
        None => out.push_str("http proxy: off\n"),
    }
    out.push_str(&format!("clusters: {}\n", s.clusters.join(", ")));
    for (cluster, why) in &s.not_served {
        out.push_str(&format!("not serving {cluster}: {why}\n"));
    }
    out.push_str(&format!("dials: {}\n", s.dials));
    out.push_str(&format!("requests: {}\n", s.requests));
    for c in &s.connections {
        out.push_str(&format!(
            "connection {}/{}: active {}, requests {}, idle {} s, {} {}\n",
            c.cluster,
            c.server,
            c.active,
            c.requests,
            c.idle_secs,
            if c.path.is_empty() { "-" } else { &c.path },
            c.addr
        ));
    }
    out
}

/// `malai ssh curl …`: curl with the agent's proxy in its environment. curl replaces this
/// process, so its exit status (and signals) are the caller's to see, untouched.
pub(super) async fn curl(dirs: Dirs, args: Vec<String>) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let running = crate::agent::launch::ensure_running(&dirs, true).await?;
    let Some(addr) = running.hello.http else {
        anyhow::bail!(
            "the running agent has no HTTP proxy (started with --http=false); `malai ssh agent stop` and retry"
        );
    };
    let url = format!("http://{addr}");
    let err = std::process::Command::new("curl")
        .args(&args)
        .env("http_proxy", &url)
        .env("HTTP_PROXY", &url)
        .env("https_proxy", &url)
        .env("HTTPS_PROXY", &url)
        .exec();
    Err(anyhow::anyhow!("cannot run curl: {err}"))
}
