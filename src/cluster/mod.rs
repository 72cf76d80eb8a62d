//! `malai ssh cluster …`: creating a cluster, joining one, editing the manager's file.
//!
//! The manager's file is edited with `toml_edit` (comments and layout kept) and validated
//! before it replaces the old one atomically. Members get it by config sync (`sync`: the
//! manager's loop, a member accepting a pushed or pulled file); here:
//!
//! - [`status`]: `cluster status`, every member online / in sync / last seen;
//! - [`dns`]: `cluster join <domain>` finds the manager from a `malai-cluster=` TXT record.
//!
//! `cluster import` places a file by hand (same checks as a push).

pub mod dns;
pub mod status;

use std::path::Path;

use crate::config::MemberKind;
use crate::config::paths::Dirs;
use crate::config::store::{ClusterDir, StoreError, list_clusters};
use crate::config::{ClusterConfig, edit};
use crate::id52::Id52;
use crate::keys::{self, KeyError};
use crate::session::dial::Routed;
use crate::sync::manager::REQUEST_TIMEOUT;
pub use crate::sync::{self, member};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Edit(#[from] edit::EditError),
    #[error("cluster {0:?} already exists on this machine ({1})")]
    Exists(String, String),
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing {file}: {why}")]
    Mismatch { file: String, why: String },
    #[error(transparent)]
    Dns(#[from] dns::DnsError),
    /// Boxed: a pull error is large and rare, and every cluster command returns this type.
    #[error(transparent)]
    Pull(Box<member::PullError>),
    #[error(transparent)]
    Transport(#[from] crate::transport::iroh::TransportError),
}

/// `cluster init <alias>`: a new manager key and a starter file. Returns the manager id52.
pub fn init(dirs: &Dirs, alias: &str) -> Result<Id52, ClusterError> {
    let cd = ClusterDir::new(dirs, alias)?;
    if cd.dir.join(keys::ID_FILE).exists() || cd.has_file() {
        return Err(ClusterError::Exists(
            alias.to_string(),
            cd.dir.display().to_string(),
        ));
    }
    cd.create()?;
    let (id, _) = keys::create(&cd.dir, true)?;
    cd.set_manager_id(&id)?;
    cd.save_text(&edit::new_cluster_file(alias, &id))?;
    Ok(id)
}

/// What the ProxyCommand of `malai ssh config` depends on, pinned as this shell has it, so
/// `ssh foo.acme` from any terminal behaves like this one: the folders and the relay choice
/// (an unset variable stays unset; the file's `relays` then decide).
const PINNED_ENV: [&str; 5] = [
    "MALAI_HOME",
    "MALAI_RELAY",
    "MALAI_RELAY_CA",
    "MALAI_BIND",
    "MALAI_USE_KEYRING",
];

/// `env K=V … ` for the ProxyCommand (OpenSSH runs it through `exec`, so `VAR=x cmd` does
/// not work), or nothing when none of [`PINNED_ENV`] is set.
fn pinned_env_prefix() -> String {
    let set: Vec<String> = PINNED_ENV
        .iter()
        .filter_map(|k| {
            let v = std::env::var(k).ok().filter(|v| !v.is_empty())?;
            let v = shlex::try_quote(&v).ok()?.into_owned();
            Some(format!("{k}={v}"))
        })
        .collect();
    if set.is_empty() {
        String::new()
    } else {
        format!("env {} ", set.join(" "))
    }
}

/// `cluster join <alias> <manager-id52>`: this machine's key for the cluster. Joining again
/// with the same manager prints the same id (idempotent); a different manager is refused.
/// `by_domain`: the manager was found in `alias`'s DNS record, so the manager's file may
/// call the cluster something else (its names here still end in `alias`).
pub fn join(
    dirs: &Dirs,
    alias: &str,
    manager: &Id52,
    by_domain: bool,
) -> Result<Id52, ClusterError> {
    let cd = ClusterDir::new(dirs, alias)?;
    cd.create()?;
    if let Some(existing) = cd.manager_id()? {
        if &existing != manager {
            return Err(ClusterError::Exists(
                alias.to_string(),
                format!("joined with manager {existing}"),
            ));
        }
        return Ok(keys::id52(&cd.dir)?);
    }
    let (id, _) = keys::create(&cd.dir, true)?;
    if by_domain {
        cd.set_joined_by_domain()?;
    }
    cd.set_manager_id(manager)?;
    Ok(id)
}

/// The cluster this machine manages: the one named, or the only one.
pub fn managed_cluster(dirs: &Dirs, name: Option<&str>) -> Result<ClusterDir, ClusterError> {
    let mut managed = vec![];
    let mut member_of = vec![];
    for cd in list_clusters(dirs)? {
        let me = keys::id52(&cd.dir).ok();
        if me.is_some() && me == cd.manager_id()? {
            managed.push(cd);
        } else {
            member_of.push(cd.alias);
        }
    }
    match name {
        Some(n) => managed.into_iter().find(|c| c.alias == n).ok_or_else(|| {
            ClusterError::Usage(format!("this machine is not the manager of a cluster {n:?}"))
        }),
        None => match managed.len() {
            // A member asking a manager's question: point at the manager, not at `init`.
            0 if !member_of.is_empty() => Err(ClusterError::Usage(format!(
                "this machine is a member of {}, not its manager: run this on the manager (a member catches up with `malai ssh cluster pull`)",
                member_of.join(", ")
            ))),
            0 => Err(ClusterError::Usage(
                "this machine manages no cluster (create one with `malai ssh cluster init <alias>`)"
                    .into(),
            )),
            1 => Ok(managed.remove(0)),
            _ => Err(ClusterError::Usage(format!(
                "this machine manages several clusters ({}); say which with --cluster",
                managed
                    .iter()
                    .map(|c| c.alias.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        },
    }
}

/// `cluster add server|device <name> <id52>`.
pub fn add(
    dirs: &Dirs,
    cluster: Option<&str>,
    kind: MemberKind,
    name: &str,
    id: &Id52,
) -> Result<ClusterDir, ClusterError> {
    edit_file(dirs, cluster, |text| edit::add_member(text, kind, name, id))
}

/// `cluster allow <server> <who…>`.
pub fn allow(
    dirs: &Dirs,
    cluster: Option<&str>,
    server: &str,
    who: &[String],
) -> Result<ClusterDir, ClusterError> {
    edit_file(dirs, cluster, |text| edit::allow(text, server, who))
}

/// `cluster import <alias> <file>`: place a file given by the manager, after checking that
/// it is for the cluster this machine joined (Ganeti's `prepare-node-join` rule).
pub fn import(dirs: &Dirs, alias: &str, file: &Path) -> Result<ClusterConfig, ClusterError> {
    let cd = ClusterDir::open(dirs, alias)?;
    let text = std::fs::read_to_string(file).map_err(|source| ClusterError::Io {
        path: file.display().to_string(),
        source,
    })?;
    let cfg = ClusterConfig::parse(&text).map_err(|e| ClusterError::Mismatch {
        file: file.display().to_string(),
        why: e.to_string(),
    })?;
    member::check_same_cluster(&cd, &cfg).map_err(|why| ClusterError::Mismatch {
        file: file.display().to_string(),
        why,
    })?;
    // A member never keeps the manager's key-storage settings.
    let text = edit::strip_secrets(&text)?;
    Ok(cd.save_text(&text)?)
}

/// `malai ssh config`: an ssh_config block per cluster.
pub fn ssh_config_blocks(dirs: &Dirs) -> Result<String, ClusterError> {
    let exe = std::env::current_exe()
        .ok()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "malai".into());
    let prefix = pinned_env_prefix();
    let mut out = String::new();
    for cd in list_clusters(dirs)? {
        let mut names = vec![format!("*.{}", cd.alias)];
        if let Ok(cfg) = cd.load() {
            names.push(format!("*.{}", cfg.manager));
            if let Some(a) = cfg.alias
                && a != cd.alias
            {
                names.push(format!("*.{a}"));
            }
        }
        out.push_str(&format!(
            "# malai ssh: cluster {}\nHost {}\n    ProxyCommand {prefix}{exe} ssh proxy %h %p\n\n",
            cd.alias,
            names.join(" ")
        ));
    }
    Ok(out)
}

/// The cluster a member-side command means: the one named, or the only one on this machine.
pub fn pick_cluster(dirs: &Dirs, name: Option<&str>) -> Result<ClusterDir, ClusterError> {
    if let Some(n) = name {
        return Ok(ClusterDir::open(dirs, n)?);
    }
    let mut all = list_clusters(dirs)?;
    match all.len() {
        1 => Ok(all.remove(0)),
        0 => Err(ClusterError::Usage(
            "this machine is in no cluster yet".into(),
        )),
        _ => Err(ClusterError::Usage(format!(
            "this machine is in several clusters ({}); say which with --cluster",
            all.iter()
                .map(|c| c.alias.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// `cluster remove <name>`: the member and every mention of it go; the sync loop then
/// pushes the new file, after which the removed id52 is denied everywhere.
pub fn remove(dirs: &Dirs, cluster: Option<&str>, name: &str) -> Result<ClusterDir, ClusterError> {
    edit_file(dirs, cluster, |text| edit::remove(text, name))
}

/// `cluster group <group> <member…>`.
pub fn group(
    dirs: &Dirs,
    cluster: Option<&str>,
    group: &str,
    members: &[String],
) -> Result<ClusterDir, ClusterError> {
    edit_file(dirs, cluster, |text| edit::group(text, group, members))
}

/// `cluster service <server> <service> <port>`.
pub fn service(
    dirs: &Dirs,
    cluster: Option<&str>,
    server: &str,
    service: &str,
    port: u16,
) -> Result<ClusterDir, ClusterError> {
    edit_file(dirs, cluster, |text| {
        edit::service(text, server, service, port)
    })
}

/// `cluster args <server>.<command> <pattern…>` (`None`: `--any`).
pub fn args(
    dirs: &Dirs,
    cluster: Option<&str>,
    scope: &str,
    patterns: Option<&[String]>,
) -> Result<ClusterDir, ClusterError> {
    edit_file(dirs, cluster, |text| edit::set_args(text, scope, patterns))
}

/// One read-edit-write of a managed cluster's file under [`edit_lock`].
fn edit_file(
    dirs: &Dirs,
    cluster: Option<&str>,
    edit: impl FnOnce(&str) -> Result<String, edit::EditError>,
) -> Result<ClusterDir, ClusterError> {
    let cd = managed_cluster(dirs, cluster)?;
    let _lock = edit_lock(&cd)?;
    let text = cd.read_text()?;
    cd.save_text(&edit(&text)?)?;
    Ok(cd)
}

/// An exclusive `flock` on `<cluster folder>/.edit.lock` for one read-edit-write of the
/// cluster file, so two `cluster add/allow/remove` at once cannot lose an edit (each would
/// otherwise rewrite the file it read before the other's write). Released on drop.
fn edit_lock(cd: &ClusterDir) -> Result<nix::fcntl::Flock<std::fs::File>, ClusterError> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = cd.dir.join(".edit.lock");
    let io = |source| ClusterError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(io)?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io(std::io::Error::from(e)))
}

/// `cluster dns-record [alias]`: the TXT record that lets members join by domain.
pub fn dns_record(dirs: &Dirs, cluster: Option<&str>) -> Result<String, ClusterError> {
    let cd = managed_cluster(dirs, cluster)?;
    let manager = keys::id52(&cd.dir)?;
    let alias = cd
        .load()
        .ok()
        .and_then(|c| c.alias)
        .unwrap_or_else(|| cd.alias.clone());
    Ok(dns::record_for(&alias, &manager))
}

/// The file `cluster push` sends: `file` if given (key settings stripped when it parses; it
/// is sent as is otherwise, so a member's refusal can be tested), else this machine's
/// cluster file as members get it.
pub fn pushed_text(cd: &ClusterDir, file: Option<&Path>) -> Result<String, ClusterError> {
    match file {
        Some(f) => {
            let text = std::fs::read_to_string(f).map_err(|source| ClusterError::Io {
                path: f.display().to_string(),
                source,
            })?;
            // Never fall back to the unstripped text: it may hold the manager's secrets.
            // A TOML file that does not validate is still stripped and sent (the member
            // must refuse it); one that is not TOML at all is refused here.
            Ok(edit::strip_secrets(&text).or_else(|_| edit::strip_secrets_unchecked(&text))?)
        }
        None => Ok(sync::Source::from_manager_text(&cd.read_text()?)?
            .text
            .as_ref()
            .clone()),
    }
}

/// One line of `cluster push` output.
pub struct PushReport {
    pub member: String,
    pub result: Result<crate::protocol::config::PushAck, sync::SyncError>,
}

/// `cluster push`: send a file to servers now, as this machine's key for the cluster
/// (members accept it only if that is the manager's). `to`: server names or id52s; empty
/// means every server but this machine.
pub async fn push_now(
    dirs: &Dirs,
    cluster: Option<&str>,
    to: &[String],
    file: Option<&Path>,
) -> Result<Vec<PushReport>, ClusterError> {
    let cd = pick_cluster(dirs, cluster)?;
    let cfg = cd.load()?;
    let me = keys::id52(&cd.dir)?;
    let text = pushed_text(&cd, file)?;
    let hash = crate::protocol::config::hash_text(&text);
    let mut targets: Vec<(String, Id52, Vec<std::net::SocketAddr>)> = vec![];
    if to.is_empty() {
        for s in cfg.servers.values().filter(|s| s.id52 != me) {
            targets.push((s.name.clone(), s.id52, s.addrs.clone()));
        }
    } else {
        for t in to {
            let server = cfg
                .servers
                .values()
                .find(|s| s.name.eq_ignore_ascii_case(t) || s.id52.to_string() == *t);
            match (server, t.parse::<Id52>()) {
                (Some(s), _) => targets.push((s.name.clone(), s.id52, s.addrs.clone())),
                (None, Ok(id)) => targets.push((t.clone(), id, vec![])),
                (None, Err(_)) => {
                    return Err(ClusterError::Usage(format!(
                        "no server {t:?} in cluster {}",
                        cd.alias
                    )));
                }
            }
        }
    }
    let Routed { dialer: node, own } = dialer_for(&cd, Some(&cfg)).await?;
    let mut tasks = tokio::task::JoinSet::new();
    let names: Vec<String> = targets.iter().map(|(n, _, _)| n.clone()).collect();
    for (i, (name, id, hints)) in targets.into_iter().enumerate() {
        let node = node.clone();
        let text = text.clone();
        let hash = hash.clone();
        let manager = cfg.manager;
        tasks.spawn(async move {
            let r = sync::push(&node, &manager, &id, &hints, &text, &hash, REQUEST_TIMEOUT)
                .await
                .map(|(ack, _)| ack);
            (i, name, r)
        });
    }
    let mut out = vec![];
    while let Some(j) = tasks.join_next().await {
        match j {
            Ok(r) => out.push(r),
            Err(e) => tracing::error!(error = %e, "a push task failed"),
        }
    }
    if let Some(own) = own {
        own.done(std::time::Duration::from_secs(3)).await;
    }
    // A task that panicked left no report: it is a failure, never a silent success.
    for (i, name) in names.into_iter().enumerate() {
        if !out.iter().any(|(j, _, _)| *j == i) {
            out.push((
                i,
                name,
                Err(sync::SyncError::Refused("the push task failed".into())),
            ));
        }
    }
    out.sort_by_key(|(i, _, _)| *i);
    Ok(out
        .into_iter()
        .map(|(_, member, result)| PushReport { member, result })
        .collect())
}

/// How `cluster push/pull/status` reach the cluster: the routing policy every command
/// follows (`session::route`; lockdown included: these commands never read a key either).
pub(crate) async fn dialer_for(
    cd: &ClusterDir,
    cfg: Option<&crate::config::ClusterConfig>,
) -> Result<Routed, ClusterError> {
    Routed::for_cluster(cd, cfg)
        .await
        .map_err(|e| ClusterError::Usage(e.to_string()))
}

/// `cluster pull`: fetch the current file from the manager now (how a device catches up).
pub async fn pull(
    dirs: &Dirs,
    cluster: Option<&str>,
    from: &[std::net::SocketAddr],
) -> Result<member::Applied, ClusterError> {
    let cd = pick_cluster(dirs, cluster)?;
    let cfg = cd.load().ok();
    let Routed { dialer, own } = dialer_for(&cd, cfg.as_ref()).await?;
    let r = member::pull(&cd, &dialer, from).await;
    if let Some(own) = own {
        own.done(std::time::Duration::from_secs(3)).await;
    }
    r.map_err(|e| ClusterError::Pull(Box::new(e)))
}
