//! The member's side of config sync: accept a file from the manager, or fetch it.
//!
//! [`apply`] is the one place where a file from the network becomes this machine's cluster
//! file, whether it was pushed (`server::config_sync`) or pulled ([`pull`]). It refuses, and
//! keeps the old file, unless every check passes, in this order:
//!
//! 1. it came from the manager id52 this machine joined (the ACL already checked the peer
//!    against the current file; this checks it against what was joined, which a file can't
//!    change);
//! 2. it is not over the size cap and its bytes match the hash the manager announced;
//! 3. it is a valid cluster file;
//! 4. its manager id52 and alias are the ones joined (Ganeti's `prepare-node-join` rule);
//! 5. it carries none of the manager's key settings (the manager strips them; a file with
//!    them is a bug or an attack, never something to keep on a member).
//!
//! Then it is written atomically (temp file, fsync, rename), so a crash mid-write leaves the
//! old file, and a running server picks it up on its next request (mtime check).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{self as sync, SyncError};
use crate::config::store::{ClusterDir, StoreError, write_atomic};
use crate::config::{ClusterConfig, ConfigError};
use crate::id52::Id52;
use crate::protocol::config::{HashQuery, MAX_CONFIG_LEN, hash_text, short_hash};
use crate::session::dial::Dialer;

/// One lock per cluster folder: two pushes racing for the same file must not interleave
/// their check-then-write (the temp file name is per process, not per call), while
/// different clusters (or, in the sync benchmark, different members in one process) never
/// wait for each other's fsync.
static APPLY_LOCKS: Mutex<Option<HashMap<PathBuf, Arc<Mutex<()>>>>> = Mutex::new(None);

fn folder_lock(cd: &ClusterDir) -> Arc<Mutex<()>> {
    let mut locks = APPLY_LOCKS.lock().unwrap_or_else(|p| p.into_inner());
    locks
        .get_or_insert_with(HashMap::new)
        .entry(cd.dir.clone())
        .or_default()
        .clone()
}

/// What an accepted file did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The file replaced the old one; the new hash.
    Replaced(String),
    /// This exact file was already in place.
    Unchanged(String),
}

impl Applied {
    pub fn hash(&self) -> &str {
        match self {
            Applied::Replaced(h) | Applied::Unchanged(h) => h,
        }
    }
}

/// Why a file was refused; the old file is kept in every case. Each message is one line,
/// sent back to the manager in the ack.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0} is not the manager this machine joined ({1})")]
    NotManager(Id52, Id52),
    #[error("this machine has not joined cluster {0:?}")]
    NotJoined(String),
    #[error("file of {0} bytes is over the {MAX_CONFIG_LEN}-byte limit")]
    TooLarge(usize),
    #[error("file hash {got} does not match the announced {want}")]
    HashMismatch { got: String, want: String },
    #[error("invalid cluster file: {0}")]
    Invalid(ConfigError),
    #[error("file is for another cluster: {0}")]
    OtherCluster(String),
    #[error("file carries the manager's key settings (private-key, private-key-file)")]
    CarriesSecrets,
    #[error(transparent)]
    Store(#[from] StoreError),
}

// By hand rather than `#[from]`: the message already includes the cause, and a `source`
// would print it twice in `{:#}` chains.
impl From<ConfigError> for ApplyError {
    fn from(e: ConfigError) -> Self {
        ApplyError::Invalid(e)
    }
}

/// Hash of this machine's copy of the cluster file, if it has one.
pub fn current_hash(cd: &ClusterDir) -> Option<String> {
    cd.read_text().ok().map(|t| hash_text(&t))
}

/// Check `text` (from `from`, announced as `claimed`) and make it this machine's cluster
/// file. See the module docs for the checks.
pub fn apply(
    cd: &ClusterDir,
    text: &str,
    claimed: Option<&str>,
    from: &Id52,
) -> Result<Applied, ApplyError> {
    let joined = cd
        .manager_id()?
        .ok_or_else(|| ApplyError::NotJoined(cd.alias.clone()))?;
    if *from != joined {
        return Err(ApplyError::NotManager(*from, joined));
    }
    if text.len() > MAX_CONFIG_LEN {
        return Err(ApplyError::TooLarge(text.len()));
    }
    let hash = hash_text(text);
    if let Some(want) = claimed
        && want != hash
    {
        return Err(ApplyError::HashMismatch {
            got: short_hash(&hash).to_string(),
            want: short_hash(want).to_string(),
        });
    }
    let cfg = ClusterConfig::parse(text)?;
    check_same_cluster(cd, &cfg).map_err(ApplyError::OtherCluster)?;
    if cfg.private_key.is_some() || cfg.private_key_file.is_some() {
        return Err(ApplyError::CarriesSecrets);
    }
    let lock = folder_lock(cd);
    let _guard = lock.lock().unwrap_or_else(|p| p.into_inner());
    if current_hash(cd).as_deref() == Some(hash.as_str()) {
        return Ok(Applied::Unchanged(hash));
    }
    // Validated above; written atomically (temp file, fsync, rename, fsync of the folder).
    let path = cd.file_path();
    write_atomic(&path, text.as_bytes(), 0o644)
        .map_err(|source| StoreError::Io { path, source })?;
    tracing::info!(cluster = %cd.alias, hash = short_hash(&hash), "cluster file updated from the manager");
    Ok(Applied::Replaced(hash))
}

/// Why a pull did not bring a file.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("this machine has not joined cluster {0:?}")]
    NotJoined(String),
    #[error("cannot reach the manager: {0}")]
    Sync(SyncError),
    #[error("the manager sent no file")]
    NoFile,
    #[error("refused the manager's file: {0}")]
    Refused(ApplyError),
}

impl From<SyncError> for PullError {
    fn from(e: SyncError) -> Self {
        PullError::Sync(e)
    }
}

impl From<ApplyError> for PullError {
    fn from(e: ApplyError) -> Self {
        PullError::Refused(e)
    }
}

/// Ask the manager for the current file (`config-hash` with `fetch`) and apply it, using
/// `node` (an endpoint with this machine's key for the cluster). The manager is dialed by
/// its joined id52, with the `cluster-manager.addrs` hints of the current file if any, and
/// `from` (`cluster pull --from`: a member with no file yet, on a network without relays).
pub async fn pull(
    cd: &ClusterDir,
    node: &Dialer,
    from: &[std::net::SocketAddr],
) -> Result<Applied, PullError> {
    let manager = cd
        .manager_id()?
        .ok_or_else(|| PullError::NotJoined(cd.alias.clone()))?;
    let mut hints = cd.load().map(|c| c.manager_addrs).unwrap_or_default();
    hints.extend_from_slice(from);
    let query = HashQuery {
        fetch: true,
        have: current_hash(cd),
    };
    let (reply, _) = sync::query(
        node,
        &manager,
        &manager,
        &hints,
        &query,
        sync::manager::REQUEST_TIMEOUT,
    )
    .await?;
    let claimed = reply.hash.clone();
    let text = match (reply.text, reply.hash) {
        (Some(text), _) => text,
        // The manager sends no file to a member that has the current one.
        (None, Some(hash)) if query.have.as_deref() == Some(hash.as_str()) => {
            return Ok(Applied::Unchanged(hash));
        }
        (None, _) => return Err(PullError::NoFile),
    };
    let cd = cd.clone();
    // File IO (fsync) off the async workers.
    let applied =
        tokio::task::spawn_blocking(move || apply(&cd, &text, claimed.as_deref(), &manager))
            .await
            .map_err(|_| PullError::NoFile)??;
    Ok(applied)
}

/// A member accepts a file only for the cluster it joined: same manager id52, and the same
/// alias when the file names one — unless the folder was joined by domain (the domain's
/// DNS record named this manager, so the domain is this machine's name for the cluster,
/// whatever alias the manager's file carries).
pub fn check_same_cluster(cd: &ClusterDir, cfg: &ClusterConfig) -> Result<(), String> {
    let joined = cd
        .manager_id()
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("this machine has not joined {:?}", cd.alias))?;
    if cfg.manager != joined {
        return Err(format!(
            "its manager is {}, but this machine joined {:?} with manager {}",
            cfg.manager, cd.alias, joined
        ));
    }
    if let Some(a) = &cfg.alias
        && !a.eq_ignore_ascii_case(&cd.alias)
        && !cd.joined_by_domain()
    {
        return Err(format!(
            "it is for cluster {a:?}, but this folder is {:?}",
            cd.alias
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::paths::Dirs;

    fn member(manager: &Id52) -> (tempfile::TempDir, ClusterDir) {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = Dirs::under(tmp.path());
        let cd = ClusterDir::new(&dirs, "acme").unwrap();
        cd.create().unwrap();
        cd.set_manager_id(manager).unwrap();
        (tmp, cd)
    }

    fn file(manager: &Id52, alias: &str, extra: &str) -> String {
        format!("[cluster-manager]\nid52 = \"{manager}\"\nalias = \"{alias}\"\n{extra}")
    }

    #[test]
    fn applies_checks_and_keeps_the_old_file_on_refusal() {
        let m = Id52::from_bytes([1; 32]);
        let other = Id52::from_bytes([2; 32]);
        let (_tmp, cd) = member(&m);
        let good = file(&m, "acme", "");
        let h = hash_text(&good);

        assert_eq!(
            apply(&cd, &good, Some(&h), &m).unwrap(),
            Applied::Replaced(h.clone())
        );
        assert_eq!(
            apply(&cd, &good, Some(&h), &m).unwrap(),
            Applied::Unchanged(h.clone())
        );

        let refusals: Vec<(String, Option<String>, Id52)> = vec![
            (file(&m, "acme", "\n"), None, other),
            (file(&m, "acme", "\n"), Some(h.clone()), m),
            ("not toml [".to_string(), None, m),
            (file(&other, "acme", ""), None, m),
            (file(&m, "other", ""), None, m),
            (file(&m, "acme", "private-key = \"00\"\n"), None, m),
            (file(&m, "acme", "private-key-file = \"/k\"\n"), None, m),
            ("#".repeat(MAX_CONFIG_LEN + 1), None, m),
        ];
        for (text, claimed, from) in refusals {
            let e = apply(&cd, &text, claimed.as_deref(), &from);
            assert!(e.is_err(), "accepted {:?}", &text[..text.len().min(80)]);
            assert_eq!(current_hash(&cd).as_deref(), Some(h.as_str()));
        }
        // Without `alias`, only the manager id52 is checked.
        let no_alias = format!("[cluster-manager]\nid52 = \"{m}\"\n");
        assert!(apply(&cd, &no_alias, None, &m).is_ok());
    }

    #[test]
    fn a_stale_temp_file_changes_nothing() {
        let m = Id52::from_bytes([1; 32]);
        let (_tmp, cd) = member(&m);
        let good = file(&m, "acme", "");
        apply(&cd, &good, None, &m).unwrap();
        // What a crash between create and rename leaves behind.
        std::fs::write(
            cd.dir.join(".cluster-manager.toml.tmp.999999"),
            &good.as_bytes()[..10],
        )
        .unwrap();
        assert_eq!(cd.load().unwrap().manager, m);
        let next = file(&m, "acme", "# v2\n");
        assert!(matches!(
            apply(&cd, &next, None, &m).unwrap(),
            Applied::Replaced(_)
        ));
        assert_eq!(cd.read_text().unwrap(), next);
    }

    #[test]
    fn a_domain_join_takes_the_managers_alias_and_still_checks_the_manager() {
        let m = Id52::from_bytes([1; 32]);
        let other = Id52::from_bytes([2; 32]);
        let tmp = tempfile::tempdir().unwrap();
        let cd = ClusterDir::new(&Dirs::under(tmp.path()), "acme.example.test").unwrap();
        cd.create().unwrap();
        cd.set_manager_id(&m).unwrap();
        assert!(matches!(
            apply(&cd, &file(&m, "acme", ""), None, &m),
            Err(ApplyError::OtherCluster(_))
        ));
        cd.set_joined_by_domain().unwrap();
        assert!(apply(&cd, &file(&m, "acme", ""), None, &m).is_ok());
        assert!(matches!(
            apply(&cd, &file(&other, "acme", ""), None, &m),
            Err(ApplyError::OtherCluster(_))
        ));
    }

    #[test]
    fn unjoined_folder_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let cd = ClusterDir::new(&Dirs::under(tmp.path()), "acme").unwrap();
        cd.create().unwrap();
        let m = Id52::from_bytes([1; 32]);
        assert!(matches!(
            apply(&cd, &file(&m, "acme", ""), None, &m),
            Err(ApplyError::NotJoined(_))
        ));
    }
}
