//! The clusters this machine belongs to, as folders under `DATADIR/ssh/clusters/<alias>/`.
//!
//! Each folder holds:
//! - `cluster-manager.toml`: the manager's own file, or the copy a member was given;
//! - `manager-id52`: the manager id52 this machine joined (a member refuses any file whose
//!   manager disagrees, Ganeti's `prepare-node-join` rule);
//! - the key reference (see `crate::keys`).
//!
//! All writes are atomic (temp file in the same folder, fsync, rename).

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

    pub fn create(&self) -> Result<(), StoreError> {
        std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))
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

    /// Read and validate the cluster file.
    pub fn load(&self) -> Result<ClusterConfig, StoreError> {
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
