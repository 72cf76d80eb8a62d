//! Command-line definitions (clap) and dispatch for the `malai` binary.
//!
//! Errors are mapped once, in `main`: one line on stderr prefixed `malai: `, exit 255 for
//! malai's own failures (the OpenSSH convention), nothing ever on stdout but payload or the
//! value a command was asked to print.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::MemberKind;
use crate::config::paths::Dirs;
use crate::id52::Id52;

#[derive(Debug, Parser)]
#[command(
    name = "malai",
    version,
    about = "SSH between the machines of a cluster over the iroh peer-to-peer network",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Top,
}

#[derive(Debug, Subcommand)]
pub enum Top {
    /// SSH over the cluster. Also `malai ssh [ssh flags] <host> [command …]` runs a
    /// command natively, like `ssh host command` (exit status passed through; 255 for
    /// malai's own failures).
    #[command(
        after_help = "Native exec: malai ssh [-t|-T] [-n] [-p port] [-l user] [-o opt] [--parallel N] <host|group> [command …]\n\nForwarding: malai ssh [-N] [-f] [-g] [-A] [-L [bind:]port:host:hostport] [-R [bind:]port:host:hostport] [-D [bind:]port] [-W host:port] [-o ExitOnForwardFailure=yes] <host> [command …] (unix socket paths work on either side of -L/-R)\n\nHost names: foo.<cluster>, foo.<cluster-id52>, <foo-id52>.<cluster-id52>, a bare foo (when unambiguous), <group>.<cluster> or group:<name>."
    )]
    Ssh {
        #[command(subcommand)]
        command: SshCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum SshCommand {
    /// Create, join and edit clusters.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// A whole throwaway cluster on this machine: manager, server, device, a native command
    /// and (when sshd runs here) OpenSSH through the ProxyCommand. Cleans up after itself.
    Demo {
        /// Keep the temporary folder for a look afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Show the server's audit log (one line per request decision) as a table.
    Audit {
        /// Only entries newer than this (e.g. 30m, 2h, 1day).
        #[arg(long)]
        since: Option<String>,
        /// Only denied requests.
        #[arg(long)]
        deny: bool,
    },
    /// Print this machine's id52 in a cluster.
    Id52 {
        /// The cluster alias (optional when this machine is in exactly one).
        cluster: Option<String>,
    },
    /// Print an ssh_config block (Host *.<cluster> + ProxyCommand) for every cluster. The
    /// ProxyCommand pins MALAI_HOME, MALAI_RELAY, MALAI_RELAY_CA, MALAI_BIND and
    /// MALAI_USE_KEYRING as this shell has them, so ssh from any terminal behaves the same.
    Config,
    /// Show every live cluster connection of this machine, like `tailscale status`: which
    /// process holds it (server, agent), the peer, direct or through a relay, the address
    /// and the round-trip time.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Serve every cluster where this machine is listed as a server.
    ///
    /// Runs in the foreground; SIGTERM or Ctrl-C drains running requests and exits 0.
    /// Logs go to LOGDIR/ssh/server.log.<date> (one file a day; README "Files and
    /// environment" says where LOGDIR is). MALAI_RELAY=disabled runs fully offline (peers
    /// are reached only through `addrs` hints).
    Server {
        /// Fixed UDP address to listen on (e.g. 0.0.0.0:7744). With several clusters the
        /// n-th gets port+n.
        #[arg(long)]
        bind: Option<SocketAddr>,
        /// Most requests one peer may have in flight at once (over all its connections);
        /// more are refused with a clear error.
        #[arg(long, default_value_t = crate::server::DEFAULT_MAX_REQUESTS_PER_PEER)]
        max_requests_per_peer: usize,
    },
    /// OpenSSH ProxyCommand: `ProxyCommand malai ssh proxy %h %p`.
    ///
    /// Connects stdin/stdout to the server's sshd over the cluster. Exits 255 with one line
    /// on stderr when the host is unknown, unreachable or denies this machine.
    Proxy {
        /// foo.<cluster>, foo.<cluster-id52>, <foo-id52>.<cluster-id52>, or a bare foo.
        host: String,
        /// The port ssh was asked for (informational: the server's config picks the target).
        port: Option<u16>,
    },
    /// sshd forced command: serve the malai protocol on stdin/stdout as <identity>.
    ///
    /// In authorized_keys: `command="malai ssh stdinserver alice@acme",restrict ssh-ed25519 …`
    /// (see contrib/authorized_keys). Hands stdin/stdout to the running `malai ssh server`
    /// (same user), which answers requests as if <identity> had connected over the
    /// cluster; exits with the status the server reports. SSH_ORIGINAL_COMMAND is ignored.
    Stdinserver {
        /// `alias@cluster` or an id52 from the cluster file (a bare alias, or one unknown to
        /// the cluster, is denied).
        identity: String,
    },
    /// Print known_hosts lines for the servers using the embedded SSH server (their host
    /// key is their id52), under every name form: `malai ssh known-hosts >> ~/.ssh/known_hosts`.
    KnownHosts,
    /// The agent: holds the cluster keys, keeps iroh connections open for reuse, and runs
    /// the HTTP proxy to cluster services.
    ///
    /// `eval "$(malai ssh agent -e)"` starts it in the background unless it runs, and sets
    /// MALAI_SSH_AGENT, MALAI_LOCKDOWN_MODE=true and HTTP_PROXY/http_proxy. Without -e it
    /// runs in the foreground until SIGTERM or Ctrl-C. One agent serves every cluster.
    Agent {
        #[command(subcommand)]
        command: Option<AgentCommand>,
        /// Start the agent in the background if needed and print `export` lines for eval.
        #[arg(short = 'e', long = "environment")]
        environment: bool,
        /// With -e: export MALAI_LOCKDOWN_MODE=true, so the CLI never reads a secret key
        /// (`--lockdown=false` to leave it out).
        #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true,
              default_value_t = true, default_missing_value = "true")]
        lockdown: bool,
        /// Run the HTTP proxy (and with -e export HTTP_PROXY/http_proxy); `--http=false`
        /// turns it off.
        #[arg(long, action = clap::ArgAction::Set, num_args = 0..=1, require_equals = true,
              default_value_t = true, default_missing_value = "true")]
        http: bool,
        /// Started by `agent -e`, which holds the startup lock.
        #[arg(long, hide = true)]
        under_lock: bool,
    },
    /// Run the system curl through the agent's HTTP proxy (starting the agent if needed):
    /// `malai ssh curl http://web.foo.acme/`. curl's exit status is passed through.
    #[command(disable_help_flag = true)]
    Curl {
        /// Arguments for curl, as given.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// Show the running agent: pid, socket, HTTP proxy, clusters, connections and counters.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop the running agent (it drains requests and removes its socket).
    Stop,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Kind {
    Server,
    Device,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make this machine the manager of a new cluster; prints the manager id52.
    Init {
        /// The cluster's alias: a domain you own, or any short name.
        alias: String,
    },
    /// Join a cluster as a member: makes this machine's key for it and prints its id52,
    /// which the manager then adds with `cluster add`.
    ///
    /// Without the manager id52, <alias> must be a domain with a TXT record
    /// "malai-cluster=<manager id52>" (see `cluster dns-record`); MALAI_DNS_SERVER=ip:port
    /// asks that DNS server instead of the system's. DNS is not trusted: the id52 found is
    /// shown (with whether DNSSEC validated it) and must be confirmed on a terminal, or
    /// pinned with `--manager <id52>` (a mismatch is refused).
    Join {
        alias: String,
        /// The manager's id52 (from `cluster init` on the manager); DNS is then not asked.
        manager: Option<String>,
        /// The manager id52 you expect DNS to name: join without asking if it does, refuse
        /// if it does not (for scripts; check the id52 with the manager's admin first).
        #[arg(long = "manager", value_name = "ID52")]
        pin: Option<String>,
    },
    /// Add a server or device to the cluster file (manager only).
    Add {
        kind: Kind,
        /// Member name: lowercase letters, digits, '-' and '_'.
        name: String,
        id52: String,
        /// Which managed cluster (needed when this machine manages several).
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Let members, groups or id52s use a server: `allow foo alice admins`; `allow foo.ls bob`
    /// for a single command; `allow foo.service.web alice` for an HTTP service.
    Allow {
        server: String,
        #[arg(required = true)]
        who: Vec<String>,
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Place a cluster file from the manager on this member (checked against what was joined).
    Import { alias: String, file: PathBuf },
    /// Remove a server or device (and every mention of it) from the cluster file; once
    /// synced, its id52 is denied everywhere.
    Remove {
        name: String,
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Every member: online, in sync with the manager's file, last seen, latency.
    Status {
        #[arg(long)]
        cluster: Option<String>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print the DNS TXT record that lets members join with `cluster join <domain>`.
    DnsRecord {
        /// The managed cluster (optional when this machine manages one).
        alias: Option<String>,
    },
    /// Run only the manager's side: sync the file to members and answer their pulls.
    /// (`malai ssh server` does this too, besides serving the clusters this machine is a
    /// server in.)
    Serve {
        /// Fixed UDP address (put it in `[cluster-manager] addrs` so members can pull).
        #[arg(long)]
        bind: Option<SocketAddr>,
    },
    /// Push a cluster file to servers now, as this machine (members accept pushes only from
    /// their manager). Prints one line per server.
    Push {
        #[arg(long)]
        cluster: Option<String>,
        /// Server names or id52s (default: every server).
        #[arg(long = "to")]
        to: Vec<String>,
        /// Send this file instead of the cluster file (key settings stripped if it parses).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Print the file as members would get it and send nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Fetch the current file from the manager now (devices, or a member that missed pushes).
    Pull {
        #[arg(long)]
        cluster: Option<String>,
        /// Where the manager's server listens (ip:port), for a member that has no file
        /// yet on a network without relays (MALAI_RELAY=disabled); may be repeated.
        #[arg(long = "from", value_name = "IP:PORT")]
        from: Vec<SocketAddr>,
    },
}

/// Warn (stderr) about command scopes that let their peers run any program: a program that
/// runs others (`rsync -e`, `git -c`, `find -exec`, shells…) with no `args` pinned.
fn warn_scopes(cd: &crate::config::store::ClusterDir) {
    if let Ok(cfg) = cd.load() {
        for w in cfg.scope_warnings() {
            eprintln!("malai: warning: {w}");
        }
    }
}

/// A status to exit with and nothing to print: the message (if any) is already out.
#[derive(Debug, thiserror::Error)]
#[error("exit status {0}")]
pub struct ExitStatus(pub u8);

/// Join by domain: look the manager up in DNS, say whether DNSSEC vouched for it, and
/// take it only if the user pinned the same id52 (`--manager`) or confirms it on a
/// terminal. DNS is not trusted (a forged answer makes the forger the manager, who can
/// then push an ACL giving itself a shell), so without a person or a pin this refuses.
async fn confirm_dns_manager(domain: &str, pin: Option<Id52>) -> anyhow::Result<Id52> {
    use crate::cluster::dns::Validation;
    use std::io::{BufRead, IsTerminal, Write};
    let found = crate::cluster::dns::manager_of(domain).await?;
    let m = found.manager;
    eprintln!(
        "malai: {domain}: DNS names manager {m} ({})",
        found.validation
    );
    if let Some(p) = pin {
        if p != m {
            anyhow::bail!(
                "{domain}: DNS names manager {m}, but --manager says {p}: refusing to join (a forged DNS answer, or a stale record)"
            );
        }
        return Ok(m);
    }
    if found.validation == Validation::Bogus {
        anyhow::bail!(
            "{domain}: the DNS answer failed DNSSEC validation; refusing it (pin the manager you checked with --manager <id52>, or pass it as the second argument)"
        );
    }
    let hint = format!(
        "check the id52 with the manager's admin (`malai ssh id52 {domain}` on the manager), then run `malai ssh cluster join {domain} --manager <id52>`"
    );
    if !(std::io::stdin().is_terminal() && std::io::stderr().is_terminal()) {
        anyhow::bail!(
            "{domain}: not joining a manager found in DNS without confirmation (no terminal to ask on); {hint}"
        );
    }
    eprint!("Is {m} the manager of {domain}? Check it with the manager's admin. Join? [y/N] ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    if matches!(line.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(m)
    } else {
        anyhow::bail!("{domain}: not confirmed; nothing joined")
    }
}

fn parse_id52(s: &str, what: &str) -> anyhow::Result<Id52> {
    s.parse::<Id52>()
        .with_context(|| format!("{what} {s:?} is not an id52"))
}

/// If `args` (the whole argv) is the ssh-like shape `malai ssh [flags] <host> [command…]`
/// rather than a subcommand, return the part after `ssh`. Subcommand names win over host
/// names; `malai ssh -- <host>` reaches a host that is named like a subcommand.
pub fn exec_shape(args: &[String]) -> Option<Vec<String>> {
    use clap::CommandFactory;
    if args.get(1).map(String::as_str) != Some("ssh") {
        return None;
    }
    let first = args.get(2)?;
    if matches!(
        first.as_str(),
        "-h" | "--help" | "-V" | "--version" | "help"
    ) {
        return None;
    }
    let cmd = Cli::command();
    let ssh = cmd.find_subcommand("ssh")?;
    if ssh.get_subcommands().any(|c| c.get_name() == first) {
        return None;
    }
    Some(args[2..].to_vec())
}

/// Which log file a command writes to.
pub fn log_name(cli: &Cli) -> &'static str {
    match &cli.command {
        Top::Ssh { command } => match command {
            SshCommand::Server { .. } => "server",
            SshCommand::Cluster {
                command: ClusterCommand::Serve { .. },
            } => "server",
            SshCommand::Proxy { .. } => "proxy",
            SshCommand::Stdinserver { .. } => "stdinserver",
            SshCommand::Agent {
                command: None,
                environment: false,
                ..
            } => "agent",
            _ => "cli",
        },
    }
}

/// Run a parsed command.
pub async fn dispatch(cli: Cli, dirs: Dirs) -> anyhow::Result<()> {
    let Top::Ssh { command } = cli.command;
    match command {
        SshCommand::Cluster { command } => cluster(command, dirs).await,
        SshCommand::Id52 { cluster } => {
            let cd = match cluster {
                Some(c) => crate::config::store::ClusterDir::open(&dirs, &c)?,
                None => {
                    let mut all = crate::config::store::list_clusters(&dirs)?;
                    match all.len() {
                        1 => all.remove(0),
                        0 => anyhow::bail!("this machine is in no cluster yet"),
                        _ => anyhow::bail!(
                            "this machine is in several clusters ({}); name one",
                            all.iter()
                                .map(|c| c.alias.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    }
                }
            };
            println!("{}", crate::keys::id52(&cd.dir)?);
            Ok(())
        }
        SshCommand::Demo { keep } => tokio::task::spawn_blocking(move || crate::demo::run(keep))
            .await
            .map_err(|e| anyhow::anyhow!("demo: {e}"))?,
        SshCommand::Audit { since, deny } => {
            let since = since
                .map(|s| {
                    humantime::parse_duration(&s)
                        .with_context(|| format!("--since {s:?}: use a duration like 30m or 2h"))
                })
                .transpose()?;
            let entries = crate::audit::read_all(&dirs.ssh_logs());
            print!("{}", crate::audit::table(&entries, since, deny));
            Ok(())
        }
        SshCommand::Config => {
            print!("{}", crate::cluster::ssh_config_blocks(&dirs)?);
            Ok(())
        }
        SshCommand::Status { json } => {
            let holders = crate::control::live_holders(&dirs).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&holders)?);
            } else {
                print!("{}", render_status(&holders));
            }
            Ok(())
        }
        SshCommand::Server {
            bind,
            max_requests_per_peer,
        } => {
            crate::server::set_max_requests_per_peer(max_requests_per_peer);
            serve(dirs, bind, false).await
        }
        SshCommand::Proxy { host, port } => crate::client::proxy::run(&dirs, &host, port)
            .await
            .map_err(|e| anyhow::anyhow!("{host}: {e}")),
        SshCommand::Stdinserver { identity } => {
            let code = crate::server::stdinserver::run_forced_command(&dirs, &identity).await?;
            if code != 0 {
                // The server's status is the forced command's (ssh passes it on). Returned,
                // not `process::exit`, so the log is flushed on the way out.
                return Err(ExitStatus(code).into());
            }
            Ok(())
        }
        SshCommand::KnownHosts => {
            for line in crate::client::known_hosts::lines(&dirs)? {
                println!("{line}");
            }
            Ok(())
        }
        SshCommand::Agent {
            command,
            environment,
            lockdown,
            http,
            under_lock,
        } => agent(dirs, command, environment, lockdown, http, under_lock).await,
        SshCommand::Curl { args } => curl(dirs, args).await,
    }
}

async fn cluster(cmd: ClusterCommand, dirs: Dirs) -> anyhow::Result<()> {
    use crate::cluster as c;
    let dirs = &dirs;
    match cmd {
        ClusterCommand::Init { alias } => {
            let id = c::init(dirs, &alias)?;
            println!("{id}");
            eprintln!(
                "malai: created cluster {alias}; edit {}",
                dirs.cluster_dir(&alias)
                    .join(crate::config::CLUSTER_FILE)
                    .display()
            );
        }
        ClusterCommand::Join {
            alias,
            manager,
            pin,
        } => {
            let pin = pin.map(|p| parse_id52(&p, "--manager")).transpose()?;
            let by_domain = manager.is_none();
            let m = match manager {
                Some(m) => {
                    let m = parse_id52(&m, "manager")?;
                    if let Some(p) = pin
                        && p != m
                    {
                        anyhow::bail!("the manager id52 and --manager differ");
                    }
                    m
                }
                None => confirm_dns_manager(&alias, pin).await?,
            };
            println!("{}", c::join(dirs, &alias, &m, by_domain)?);
        }
        ClusterCommand::Add {
            kind,
            name,
            id52,
            cluster,
        } => {
            let id = parse_id52(&id52, "member")?;
            let kind = match kind {
                Kind::Server => MemberKind::Server,
                Kind::Device => MemberKind::Device,
            };
            warn_scopes(&c::add(dirs, cluster.as_deref(), kind, &name, &id)?);
        }
        ClusterCommand::Allow {
            server,
            who,
            cluster,
        } => {
            warn_scopes(&c::allow(dirs, cluster.as_deref(), &server, &who)?);
        }
        ClusterCommand::Import { alias, file } => {
            c::import(dirs, &alias, &file)?;
        }
        ClusterCommand::Remove { name, cluster } => {
            warn_scopes(&c::remove(dirs, cluster.as_deref(), &name)?);
        }
        ClusterCommand::Status { cluster, json } => {
            if let Ok(cd) = c::pick_cluster(dirs, cluster.as_deref()) {
                warn_scopes(&cd);
            }
            let s = c::status::status(dirs, cluster.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!(
                    "{}",
                    c::status::render(&s, crate::sync::manager::unix_now())
                );
            }
        }
        ClusterCommand::DnsRecord { alias } => {
            println!("{}", c::dns_record(dirs, alias.as_deref())?);
        }
        ClusterCommand::Serve { bind } => serve(dirs.clone(), bind, true).await?,
        ClusterCommand::Push {
            cluster,
            to,
            file,
            dry_run,
        } => {
            if let Ok(cd) = c::pick_cluster(dirs, cluster.as_deref()) {
                warn_scopes(&cd);
            }
            if dry_run {
                let cd = c::pick_cluster(dirs, cluster.as_deref())?;
                print!("{}", c::pushed_text(&cd, file.as_deref())?);
                return Ok(());
            }
            let reports = c::push_now(dirs, cluster.as_deref(), &to, file.as_deref()).await?;
            let mut failed = 0;
            for r in &reports {
                use crate::protocol::config::{PushAck, short_hash};
                let line = match &r.result {
                    Ok(PushAck::Applied { hash }) => format!("applied {}", short_hash(hash)),
                    Ok(PushAck::Unchanged { hash }) => format!("unchanged {}", short_hash(hash)),
                    Ok(PushAck::Refused { reason, .. }) => {
                        failed += 1;
                        format!("refused: {reason}")
                    }
                    Err(e) => {
                        failed += 1;
                        format!("failed: {e}")
                    }
                };
                println!("{}: {line}", r.member);
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} pushes did not apply", reports.len());
            }
        }
        ClusterCommand::Pull { cluster, from } => {
            let applied = c::pull(dirs, cluster.as_deref(), &from).await?;
            let what = match &applied {
                crate::sync::member::Applied::Replaced(_) => "updated",
                crate::sync::member::Applied::Unchanged(_) => "already current",
            };
            eprintln!(
                "malai: cluster file {what} ({})",
                crate::protocol::config::short_hash(applied.hash())
            );
        }
    }
    Ok(())
}

async fn serve(dirs: Dirs, bind: Option<SocketAddr>, managed_only: bool) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
        tracing::info!("signal received; shutting down");
        token.cancel();
    });
    let opts = crate::server::ServeOptions { bind, managed_only };
    crate::server::run(dirs, opts, shutdown, |started| {
        if started.is_empty() {
            eprintln!(
                "malai: this machine is not a server in any cluster yet; waiting for one to appear"
            );
        }
        for s in started {
            eprintln!(
                "malai: serving cluster {} as {} on {:?}",
                s.alias, s.id, s.addrs
            );
        }
        eprintln!("malai: server ready");
    })
    .await?;
    Ok(())
}

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
async fn agent(
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
        return "no malai ssh server or agent is running here; no cluster connections\n".into();
    }
    let mut rows = vec![[
        "HOLDER".to_string(),
        "CLUSTER".into(),
        "PEER".into(),
        "DIR".into(),
        "PATH".into(),
        "ADDRESS".into(),
        "RTT".into(),
    ]];
    for h in holders {
        let who = format!("{} {}", h.role, h.status.pid);
        if h.status.connections.is_empty() {
            rows.push([
                who.clone(),
                "-".into(),
                "-".into(),
                "".into(),
                "".into(),
                "".into(),
                "".into(),
            ]);
        }
        for c in &h.status.connections {
            rows.push([
                who.clone(),
                c.cluster.clone(),
                c.server.clone(),
                c.direction.clone(),
                if c.path.is_empty() {
                    "-".into()
                } else {
                    c.path.clone()
                },
                c.addr.clone(),
                c.rtt_ms.map(|r| format!("{r:.1} ms")).unwrap_or_default(),
            ]);
        }
    }
    let mut widths = [0usize; 7];
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
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
async fn curl(dirs: Dirs, args: Vec<String>) -> anyhow::Result<()> {
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
