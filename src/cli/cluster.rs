//! `malai ssh cluster …`: the admin subcommands, one function each where there is more
//! than one call to make, and what they print (results on stdout, notes on stderr).

use std::net::SocketAddr;

use anyhow::Context as _;

use super::{ClusterCommand, Kind};
use crate::config::MemberKind;
use crate::config::paths::Dirs;
use crate::id52::Id52;

/// `malai ssh cluster …`: one line per subcommand; the longer ones have their own function.
pub(super) async fn run(cmd: ClusterCommand, dirs: Dirs) -> anyhow::Result<()> {
    use crate::cluster as c;
    let dirs = &dirs;
    match cmd {
        ClusterCommand::Init { alias } => cluster_init(dirs, &alias)?,
        ClusterCommand::Join {
            alias,
            manager,
            pin,
        } => cluster_join(dirs, &alias, manager, pin).await?,
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
        } => warn_scopes(&c::allow(dirs, cluster.as_deref(), &server, &who)?),
        ClusterCommand::Group {
            group,
            members,
            cluster,
        } => warn_scopes(&c::group(dirs, cluster.as_deref(), &group, &members)?),
        ClusterCommand::Service {
            server,
            service,
            port,
            cluster,
        } => warn_scopes(&c::service(
            dirs,
            cluster.as_deref(),
            &server,
            &service,
            port,
        )?),
        ClusterCommand::Args {
            scope,
            patterns,
            any,
            cluster,
        } => {
            let patterns = (!any).then_some(patterns.as_slice());
            warn_scopes(&c::args(dirs, cluster.as_deref(), &scope, patterns)?)
        }
        ClusterCommand::Import { alias, file } => {
            c::import(dirs, &alias, &file)?;
        }
        ClusterCommand::Remove { name, cluster } => {
            warn_scopes(&c::remove(dirs, cluster.as_deref(), &name)?)
        }
        ClusterCommand::Status { cluster, json } => {
            cluster_status(dirs, cluster.as_deref(), json).await?
        }
        ClusterCommand::DnsRecord { alias } => {
            println!("{}", c::dns_record(dirs, alias.as_deref())?);
        }
        ClusterCommand::Serve { bind } => super::serve(dirs.clone(), bind, true).await?,
        ClusterCommand::Push {
            cluster,
            to,
            file,
            dry_run,
        } => {
            let push = PushArgs {
                cluster: cluster.as_deref(),
                to: &to,
                file: file.as_deref(),
                dry_run,
            };
            cluster_push(dirs, push).await?
        }
        ClusterCommand::Pull { cluster, from } => {
            cluster_pull(dirs, cluster.as_deref(), &from).await?
        }
    }
    Ok(())
}

/// `cluster init`: the new manager's id52 on stdout, where to edit on stderr.
fn cluster_init(dirs: &Dirs, alias: &str) -> anyhow::Result<()> {
    let id = crate::cluster::init(dirs, alias)?;
    println!("{id}");
    eprintln!(
        "malai: created cluster {alias}; edit {}",
        dirs.cluster_dir(alias)
            .join(crate::config::CLUSTER_FILE)
            .display()
    );
    Ok(())
}

/// `cluster join`: the manager named on the command line (checked against `--manager`
/// when both are given), or found in DNS and confirmed.
async fn cluster_join(
    dirs: &Dirs,
    alias: &str,
    manager: Option<String>,
    pin: Option<String>,
) -> anyhow::Result<()> {
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
        None => confirm_dns_manager(alias, pin).await?,
    };
    println!("{}", crate::cluster::join(dirs, alias, &m, by_domain)?);
    Ok(())
}

/// `cluster status`: the members' sync state, as a table or JSON.
async fn cluster_status(dirs: &Dirs, cluster: Option<&str>, json: bool) -> anyhow::Result<()> {
    use crate::cluster as c;
    if let Ok(cd) = c::pick_cluster(dirs, cluster) {
        warn_scopes(&cd);
    }
    let s = c::status::status(dirs, cluster).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        print!(
            "{}",
            c::status::render(&s, crate::sync::manager::unix_now())
        );
    }
    Ok(())
}

/// The options of `cluster push`.
struct PushArgs<'a> {
    cluster: Option<&'a str>,
    to: &'a [String],
    file: Option<&'a std::path::Path>,
    dry_run: bool,
}

/// `cluster push`: one line per member; an error when any push did not apply.
async fn cluster_push(dirs: &Dirs, push: PushArgs<'_>) -> anyhow::Result<()> {
    use crate::cluster as c;
    use crate::protocol::config::{PushAck, short_hash};
    if let Ok(cd) = c::pick_cluster(dirs, push.cluster) {
        warn_scopes(&cd);
    }
    if push.dry_run {
        let cd = c::pick_cluster(dirs, push.cluster)?;
        print!("{}", c::pushed_text(&cd, push.file)?);
        return Ok(());
    }
    let reports = c::push_now(dirs, push.cluster, push.to, push.file).await?;
    let mut failed = 0;
    for r in &reports {
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
    Ok(())
}

/// `cluster pull`: what happened to the local file, on stderr.
async fn cluster_pull(
    dirs: &Dirs,
    cluster: Option<&str>,
    from: &[SocketAddr],
) -> anyhow::Result<()> {
    use crate::cluster as c;
    let applied = c::pull(dirs, cluster, from).await?;
    let what = match &applied {
        crate::sync::member::Applied::Replaced(_) => "updated",
        crate::sync::member::Applied::Unchanged(_) => "already current",
    };
    eprintln!(
        "malai: cluster file {what} ({})",
        crate::protocol::config::short_hash(applied.hash())
    );
    Ok(())
}

/// Warn (stderr) about command scopes that let their peers run any program: a program that
/// runs others (`rsync -e`, `git -c`, `find -exec`, shells…) with no `args` pinned.
fn warn_scopes(cd: &crate::config::store::ClusterDir) {
    if let Ok(cfg) = cd.load() {
        for w in cfg.scope_warnings().into_iter().chain(cfg.relay_warnings()) {
            eprintln!("malai: warning: {w}");
        }
    }
}

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
