//! Where malai keeps its files on this machine.
//!
//! `MALAI_HOME=<dir>` overrides every directory (DATADIR = `$MALAI_HOME`, logs in
//! `$MALAI_HOME/logs`, sockets in `$MALAI_HOME/run`): that is how one machine hosts several
//! simulated "machines" in tests. Without it, the `directories` crate gives the OS defaults.

use std::path::{Path, PathBuf};

/// Every directory malai uses, resolved once at start.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// DATADIR: clusters, keys, sync state.
    pub data: PathBuf,
    /// LOGDIR: tracing output and the audit log live under `logs/ssh/`.
    pub logs: PathBuf,
    /// Runtime dir for unix sockets; must be private (0700) because sockets in it are trusted.
    pub run: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum PathsError {
    #[error("cannot find a home directory for malai's data; set MALAI_HOME")]
    NoHome,
}

impl Dirs {
    /// Resolve from the environment (`MALAI_HOME`, else the OS defaults).
    pub fn from_env() -> Result<Dirs, PathsError> {
        if let Some(home) = std::env::var_os("MALAI_HOME").filter(|h| !h.is_empty()) {
            return Ok(Dirs::under(Path::new(&home)));
        }
        let pd = directories::ProjectDirs::from("", "", "malai").ok_or(PathsError::NoHome)?;
        let data = pd.data_dir().to_path_buf();
        // Linux has no LOGDIR convention in `directories`; the state dir is where logs belong
        // (XDG), falling back to the data dir.
        let logs = pd
            .state_dir()
            .map(|p| p.join("logs"))
            .unwrap_or_else(|| data.join("logs"));
        let run = pd
            .runtime_dir()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| data.join("run"));
        Ok(Dirs { data, logs, run })
    }

    /// Every directory below one root (the `MALAI_HOME` layout).
    pub fn under(home: &Path) -> Dirs {
        Dirs {
            data: home.to_path_buf(),
            logs: home.join("logs"),
            run: home.join("run"),
        }
    }

    /// `DATADIR/ssh/clusters`: one folder per cluster this machine belongs to.
    pub fn clusters(&self) -> PathBuf {
        self.data.join("ssh").join("clusters")
    }

    pub fn cluster_dir(&self, alias: &str) -> PathBuf {
        self.clusters().join(alias)
    }

    /// `LOGDIR/ssh`: tracing logs and the audit log.
    pub fn ssh_logs(&self) -> PathBuf {
        self.logs.join("ssh")
    }
}
