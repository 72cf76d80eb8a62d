//! The clusters this machine belongs to, as folders under `DATADIR/ssh/clusters/<alias>/`.
//!
//! Each folder holds:
//! - `cluster-manager.toml`: the manager's own file, or the copy a member was given;
//! - `manager-id52`: the manager id52 this machine joined (a member refuses any file whose
//!   manager disagrees, Ganeti's `prepare-node-join` rule);
//! - the key reference (see `crate::keys`).
//!
//! All writes are atomic (temp file in the same folder, fsync, rename).
//!
//! The folders are private (issue 19, finding 8): a server hot-reloads the cluster file, so
//! whoever can replace it owns the ACL. New folders are made 0700 whatever the umask, and a
//! cluster file is not read while it, its folder, or `clusters/`, `ssh/` and `DATADIR`
//! above it can be written by group or others, or belong to another user (root excepted).

use std::io::Write;
use std::path::{Path, PathBuf};

use super::paths::Dirs;
use super::{CLUSTER_FILE, ClusterConfig, ConfigError};
use crate::id52::Id52;

/// File holding the manager id52 this machine joined.
pub const MANAGER_ID_FILE: &str = "manager-id52";
/// Present in a folder joined by domain (`cluster join <domain>`): the folder is named by
/// the domain whose TXT record named the manager, so the manager's file may carry another
/// alias (`sync::member::check_same_cluster` accepts it; the manager id52 still must match).
pub const DOMAIN_JOIN_FILE: &str = "joined-by-domain";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cluster {0:?} is not set up on this machine (no folder {1})")]
    UnknownCluster(String, PathBuf),
    #[error(
        "cluster {alias:?} has no cluster file yet ({path}); import one with `malai ssh cluster import {alias} <file>`"
    )]
    NoFile { alias: String, path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: ConfigError,
    },
    #[error("{path}: bad manager id52: {msg}")]
    BadManagerId { path: PathBuf, msg: String },
    #[error("invalid cluster alias {0:?}: use letters, digits, '.', '-' and '_' only")]
    BadAlias(String),
    #[error("{path} {why}; refusing to read the cluster file through it. Fix: {fix}")]
    Unsafe {
        path: PathBuf,
        why: String,
        fix: String,
    },
}

/// Refuse `path` if another local user could replace what is in (or at) it: writable by
/// group or others, or owned by someone other than us or root.
fn check_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let me = nix::unistd::geteuid().as_raw();
    let shown = path.display();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(StoreError::Unsafe {
            path: path.to_path_buf(),
            why: format!("belongs to uid {}, not to this user", meta.uid()),
            fix: format!("chown {me} {shown}"),
        });
    }
    let mode = meta.mode() & 0o7777;
    // A root-owned sticky folder (/tmp) lets nobody replace another user's entries.
    let sticky = meta.is_dir() && mode & 0o1000 != 0 && meta.uid() == 0;
    if mode & 0o022 != 0 && !sticky {
        return Err(StoreError::Unsafe {
            path: path.to_path_buf(),
            why: format!("can be written by group or others (mode {mode:o})"),
            fix: format!("chmod go-w {shown}"),
        });
    }
    Ok(())
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Check that an alias is safe as a folder name and a DNS-ish label sequence.
pub fn check_alias(alias: &str) -> Result<(), StoreError> {
    let ok = !alias.is_empty()
        && alias.len() <= 253
        && !alias.starts_with('.')
        && !alias.contains("..")
        && alias
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadAlias(alias.to_string()))
    }
}

/// Write `bytes` to `path` atomically: a reader sees the old file or the new one, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        // fsync the folder so the rename itself survives a crash.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// One cluster folder on this machine.
#[derive(Debug, Clone)]
pub struct ClusterDir {
    pub alias: String,
    pub dir: PathBuf,
}

impl ClusterDir {
    pub fn new(dirs: &Dirs, alias: &str) -> Result<ClusterDir, StoreError> {
        check_alias(alias)?;
        Ok(ClusterDir {
            alias: alias.to_string(),
            dir: dirs.cluster_dir(alias),
        })
    }

    /// An existing cluster folder, or a clear error when this machine has not joined it.
    pub fn open(dirs: &Dirs, alias: &str) -> Result<ClusterDir, StoreError> {
        let cd = ClusterDir::new(dirs, alias)?;
        if !cd.dir.is_dir() {
            return Err(StoreError::UnknownCluster(alias.to_string(), cd.dir));
        }
        Ok(cd)
    }

    /// Make the folder (and `DATADIR/ssh/clusters` above it) 0700, whatever the umask.
    pub fn create(&self) -> Result<(), StoreError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_err(&self.dir))
    }

    /// [`check_private`] on the file, its folder and the three folders above
    /// (`clusters/`, `ssh/`, `DATADIR`).
    fn check_private_chain(&self) -> Result<(), StoreError> {
        check_private(&self.file_path())?;
        for dir in self.dir.ancestors().take(4) {
            check_private(dir)?;
        }
        Ok(())
    }

    pub fn file_path(&self) -> PathBuf {
        self.dir.join(CLUSTER_FILE)
    }

    pub fn has_file(&self) -> bool {
        self.file_path().is_file()
    }

    pub fn read_text(&self) -> Result<String, StoreError> {
        let path = self.file_path();
        match std::fs::read_to_string(&path) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(StoreError::NoFile {
                alias: self.alias.clone(),
                path,
            }),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    /// Read and validate the cluster file (refused while others could replace it).
    pub fn load(&self) -> Result<ClusterConfig, StoreError> {
        self.check_private_chain()?;
        let text = self.read_text()?;
        ClusterConfig::parse(&text).map_err(|source| StoreError::Invalid {
            path: self.file_path(),
            source,
        })
    }

    /// Validate `text` and replace the cluster file with it atomically.
    pub fn save_text(&self, text: &str) -> Result<ClusterConfig, StoreError> {
        let cfg = ClusterConfig::parse(text).map_err(|source| StoreError::Invalid {
            path: self.file_path(),
            source,
        })?;
        let path = self.file_path();
        // Keep the mode the admin gave the file (a 0600 file stays 0600 through `cluster
        // add/allow/remove`); a new file is 0644 (it holds no secret: the parser refuses
        // key settings).
        let mode = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(&path)
                .map(|m| m.permissions().mode() & 0o777)
                .unwrap_or(0o644)
        };
        write_atomic(&path, text.as_bytes(), mode).map_err(io_err(&path))?;
        Ok(cfg)
    }

    /// The manager id52 this machine joined (or created, on the manager).
    pub fn manager_id(&self) -> Result<Option<Id52>, StoreError> {
        let path = self.dir.join(MANAGER_ID_FILE);
        match std::fs::read_to_string(&path) {
            Ok(t) => t
                .trim()
                .parse()
                .map(Some)
                .map_err(|e: crate::id52::Id52Error| StoreError::BadManagerId {
                    path,
                    msg: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path)(e)),
        }
    }

    pub fn set_manager_id(&self, id: &Id52) -> Result<(), StoreError> {
        let path = self.dir.join(MANAGER_ID_FILE);
        write_atomic(&path, format!("{id}\n").as_bytes(), 0o644).map_err(io_err(&path))
    }

    /// Whether this folder was joined by domain ([`DOMAIN_JOIN_FILE`]).
    pub fn joined_by_domain(&self) -> bool {
        self.dir.join(DOMAIN_JOIN_FILE).exists()
    }

    pub fn set_joined_by_domain(&self) -> Result<(), StoreError> {
        let path = self.dir.join(DOMAIN_JOIN_FILE);
        write_atomic(&path, b"", 0o644).map_err(io_err(&path))
    }
}

/// Every cluster folder under DATADIR, sorted by alias.
pub fn list_clusters(dirs: &Dirs) -> Result<Vec<ClusterDir>, StoreError> {
    let root = dirs.clusters();
    let rd = match std::fs::read_dir(&root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(io_err(&root)(e)),
    };
    let mut out = vec![];
    for entry in rd {
        let entry = entry.map_err(io_err(&root))?;
        if !entry.path().is_dir() {
            continue;
        }
        let alias = entry.file_name().to_string_lossy().into_owned();
        if check_alias(&alias).is_ok() {
            out.push(ClusterDir {
                alias,
                dir: entry.path(),
            });
        }
    }
    out.sort_by(|a, b| a.alias.cmp(&b.alias));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn cluster(root: &Path) -> ClusterDir {
        let dir = root.join("data/ssh/clusters/acme");
        ClusterDir {
            alias: "acme".into(),
            dir,
        }
    }

    fn minimal() -> String {
        let id = Id52::from_bytes([7; 32]);
        format!("[cluster-manager]\nid52 = \"{id}\"\n")
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn new_folders_are_private_whatever_the_umask_leaves() {
        let root = tempfile::tempdir().unwrap();
        let cd = cluster(root.path());
        cd.create().unwrap();
        for d in cd.dir.ancestors().take(4) {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
    }

    #[test]
    fn a_folder_others_can_write_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let cd = cluster(root.path());
        cd.create().unwrap();
        cd.save_text(&minimal()).unwrap();
        // Allowed twin: private folders, a 0644 file.
        cd.load().unwrap();
        for (i, p) in [cd.dir.clone(), cd.file_path(), root.path().join("data")]
            .iter()
            .enumerate()
        {
            let old = mode(p);
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
            let err = cd.load().expect_err("a world-writable path was trusted");
            assert!(err.to_string().contains("chmod go-w"), "{i}: {err}");
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(old)).unwrap();
        }
        cd.load().unwrap();
    }

    #[test]
    fn a_file_of_another_user_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let cd = cluster(root.path());
        cd.create().unwrap();
        cd.save_text(&minimal()).unwrap();
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let nobody = nix::unistd::Uid::from_raw(65534);
        nix::unistd::chown(&cd.file_path(), Some(nobody), None).unwrap();
        let err = cd.load().expect_err("another user's file was trusted");
        assert!(err.to_string().contains("uid 65534"), "{err}");
        nix::unistd::chown(&cd.file_path(), Some(nix::unistd::geteuid()), None).unwrap();
        cd.load().unwrap();
    }
}
