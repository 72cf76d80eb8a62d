//! Command-line definitions (clap) and dispatch for the `malai` binary.
//!
//! Errors are mapped once, in `main`: one line on stderr prefixed `malai: `, exit 255 for
//! malai's own failures (the OpenSSH convention), nothing ever on stdout but payload or the
//! value a command was asked to print.
//!
//! The subcommand groups that need more than a line have a file each: [`cluster`] (admin
//! commands) and [`agent`] (the agent, `status`, `curl`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use crate::config::paths::Dirs;

mod agent;
mod cluster;

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
    /// Why can't I connect? One line per check, each ✔ or ✘ with the reason and the fix.
    ///
    /// Checks local files and permissions, each cluster and this machine's role in it, who holds
    /// each key and whether it answers, each relay (TLS, latency) and QUIC address
    /// discovery; with a host: the name, the dial (direct or relayed), the server's ACL
    /// answer and its sshd. Exit status 0 only when every check passes.
    Doctor {
        /// A host to check end to end (foo.<cluster>, …).
        host: Option<String>,
        /// Print JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script: `malai ssh completions bash > /etc/bash_completion.d/malai`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the man pages (malai.1, malai-ssh.1, malai-ssh-<command>.1, …) into <dir>;
    /// without one, print malai-ssh(1).
    #[command(hide = true)]
    Man { dir: Option<PathBuf> },
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
    /// Make a group or add members to one: `group admins alice bob`. A group may name
    /// servers, devices, other groups and id52s, and is usable wherever a name is
    /// (`allow foo admins`; `malai ssh admins.<cluster> uptime` runs on its servers).
    Group {
        group: String,
        #[arg(required = true, value_name = "MEMBER")]
        members: Vec<String>,
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Publish an HTTP service of a server: `service foo web 8000` makes
    /// web.foo.<cluster> reach 127.0.0.1:8000 on foo (through `malai ssh curl` or the
    /// agent's HTTP proxy). Full-access peers of foo may use it; grant others with
    /// `allow foo.service.web <who>`. On an existing service this changes its port.
    Service {
        server: String,
        service: String,
        /// The port on the server's 127.0.0.1 (1-65535).
        port: u16,
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Pin the arguments a command scope allows: `args foo.rsync '--server *'`. Words are
    /// matched one for one and a last `*` matches any rest; several patterns are
    /// alternatives; `''` allows no arguments; `--any` removes the pin (any arguments).
    /// The scope must exist (`allow foo.rsync <who>` makes it).
    Args {
        /// <server>.<command>
        scope: String,
        #[arg(value_name = "PATTERN", required_unless_present = "any")]
        patterns: Vec<String>,
        /// Allow any arguments again (removes `args`).
        #[arg(long, conflicts_with = "patterns")]
        any: bool,
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Place a cluster file from the manager on this member (checked against what was joined).
    Import { alias: String, file: PathBuf },
    /// Remove a server, device or group and every mention of it from the cluster file
    /// (once synced, a removed machine's id52 is denied everywhere), or one command scope
    /// (`foo.ls`) or service (`foo.service.web`) of a server.
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

/// A status to exit with and nothing to print: the message (if any) is already out.
#[derive(Debug, thiserror::Error)]
#[error("exit status {0}")]
pub struct ExitStatus(pub u8);

/// If `args` (the whole argv) is the ssh-like shape `malai ssh [flags] <host> [command…]`
/// rather than a subcommand, return the part after `ssh`. Subcommand names win over host
/// names; `malai ssh -- <host>` reaches a host that is named like a subcommand.
pub fn exec_shape(args: &[String]) -> Option<Vec<String>> {
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

/// The error line for `malai ssh <word> …` when `<word>` names no host and could have been
/// meant as a subcommand (one label, no cluster part): `malai ssh stauts` says "no such
/// command or host" and lists the commands, instead of only "unknown host".
pub fn mistyped_command(host: &str, e: &crate::session::SessionError) -> Option<String> {
    use crate::config::ResolveError;
    use crate::session::SessionError;
    use clap::CommandFactory;
    let unknown = matches!(
        e,
        SessionError::Resolve(ResolveError::NotFound { .. } | ResolveError::NoClusters(_))
    );
    if !unknown || host.is_empty() || host.contains('.') || host.contains(':') {
        return None;
    }
    let cmd = Cli::command();
    let commands: Vec<String> = cmd
        .find_subcommand("ssh")?
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| c.get_name().to_string())
        .collect();
    let reason = e.to_string();
    let prefix = format!("unknown host {host:?}: ");
    let reason = reason.strip_prefix(&prefix).unwrap_or(&reason);
    Some(format!(
        "no such command or host {host:?}: not a command ({}), and {reason}",
        commands.join(", ")
    ))
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
        SshCommand::Cluster { command } => cluster::run(command, dirs).await,
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
                print!("{}", agent::render_status(&holders));
                // Commands that bound a key themselves hold connections no holder lists.
                for dir in crate::config::store::list_clusters(&dirs)? {
                    print!(
                        "{}",
                        agent::render_client_sessions(&crate::session::registry::list(&dir))
                    );
                    if crate::control::lock::commands_running(&dir) {
                        println!(
                            "{}: commands that bound the key themselves are running (their connections are not listed; start the agent to see and share them)",
                            dir.alias
                        );
                    }
                }
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
        } => agent::run(dirs, command, environment, lockdown, http, under_lock).await,
        SshCommand::Curl { args } => agent::curl(dirs, args).await,
        SshCommand::Doctor { host, json } => {
            let report = crate::doctor::run(&dirs, host.as_deref()).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", crate::doctor::render(&report));
            }
            if report.ok {
                Ok(())
            } else {
                Err(ExitStatus(1).into())
            }
        }
        SshCommand::Completions { shell } => {
            print_bytes(&crate::manuals::completions(Cli::command(), shell))
        }
        SshCommand::Man { dir } => {
            match dir {
                Some(d) => {
                    for name in crate::manuals::write_man_pages(Cli::command(), &d)? {
                        eprintln!("malai: wrote {}", d.join(name).display());
                    }
                }
                None => return print_bytes(&crate::manuals::ssh_man_page(Cli::command())?),
            }
            Ok(())
        }
    }
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

/// Write generated text to stdout; a reader that stopped early (`| head`) is no error.
fn print_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
