//! Logging: tracing to a file under `LOGDIR/ssh/`, never to stdout.
//!
//! Stdout of `proxy`, `stdinserver` and exec is the data channel, so nothing here may ever
//! write to it. Errors meant for the user go to stderr from `main`, one line each.
//! Filter: `MALAI_LOG` (tracing `EnvFilter` syntax), default `info` with iroh's noisy
//! internals turned down (noq_proto warns `failed closing path` on normal closes).

use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

use crate::config::paths::Dirs;

/// Keeps the background log writer alive; dropping it flushes the log.
pub struct LogGuard {
    _worker: Option<tracing_appender::non_blocking::WorkerGuard>,
}

const DEFAULT_FILTER: &str =
    "info,iroh=warn,noq=warn,noq_proto=error,iroh_relay=warn,portmapper=warn,netwatch=warn";

/// Logs name peers, commands and their arguments: only this user may read them. The
/// appender creates files with the umask's mode, so the folder is what protects them: it is
/// made 0700 (tightened if it is ours and wider; the audit log in it is 0600 as well).
pub fn private_dir(dir: &std::path::Path) {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if let Ok(m) = std::fs::symlink_metadata(dir)
        && m.is_dir()
        && m.uid() == nix::unistd::geteuid().as_raw()
        && m.permissions().mode() & 0o077 != 0
    {
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
}

/// Start logging to `LOGDIR/ssh/<name>.log`. If the folder can't be made, logging is off
/// (a broken log folder must not stop ssh from working).
pub fn init(dirs: &Dirs, name: &str) -> LogGuard {
    let dir = dirs.ssh_logs();
    if std::fs::create_dir_all(&dir).is_err() {
        return LogGuard { _worker: None };
    }
    private_dir(&dir);
    let filter = std::env::var("MALAI_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new(DEFAULT_FILTER));
    let appender = tracing_appender::rolling::daily(&dir, format!("{name}.log"));
    let (writer, guard) = tracing_appender::non_blocking(appender);
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .with_target(true);
    if tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .try_init()
        .is_err()
    {
        return LogGuard { _worker: None };
    }
    LogGuard {
        _worker: Some(guard),
    }
}
