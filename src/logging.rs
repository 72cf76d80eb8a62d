//! Logging: tracing to a file under `LOGDIR/ssh/`, never to stdout.
//!
//! Stdout of `proxy`, `stdinserver` and exec is the data channel, so nothing here may ever
//! write to it. Errors meant for the user go to stderr from `main`, one line each.
//! Filter: `MALAI_LOG` (tracing `EnvFilter` syntax), default `info` with iroh's noisy
//! internals turned down (noq_proto warns `failed closing path` on normal closes).
//!
//! `malai ssh -v host …` asks for more, as ssh's `-v` does: each `-v` one level more detail,
//! copied to stderr (which is the remote's stderr too, so only when asked); `-E file` sends
//! the log to that file instead (appended, created 0600), like ssh's `-E`.
//!
//! Peers supply much of what is logged (command lines, SSH user names, paths, reasons), and
//! any member can send CR, LF and terminal escape sequences in them. So every log line goes
//! through one writer ([`Escaping`]) that makes control characters (and bidi overrides)
//! visible as `\n`, `\u{1b}`…: one event is one line, and `tail`/`less` on a log never
//! runs a peer's escape sequence. [`printable`] does the same for tables shown on a terminal
//! (`malai ssh audit`).

use std::borrow::Cow;
use std::io::Write;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;
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

/// `-v` once: malai's own events in detail, iroh's as by default.
const VERBOSE_FILTER: &str = "info,malai=debug,iroh=warn,noq=warn,noq_proto=error,iroh_relay=warn,portmapper=warn,netwatch=warn";
/// `-vv`: everything at debug but the closing-path noise.
const VERY_VERBOSE_FILTER: &str = "debug,noq_proto=error";
/// `-vvv` and more.
const TRACE_FILTER: &str = "trace";

/// How much a command logs and where: ssh's `-v` and `-E` (default: the file under
/// LOGDIR, at `info`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verbosity {
    /// Number of `-v`: 0 = default detail, log file only; more = more detail, and stderr.
    pub level: u8,
    /// `-E file`: the log goes here (appended) instead of LOGDIR or stderr.
    pub file: Option<std::path::PathBuf>,
}

/// Why the log asked for could not be opened (only `-E`: the default log never fails).
#[derive(Debug, thiserror::Error)]
#[error("-E {path}: cannot open the log file: {source}")]
pub struct LogFileError {
    path: String,
    source: std::io::Error,
}

/// Start logging to `LOGDIR/ssh/<name>.log`. If the folder can't be made, logging is off
/// (a broken log folder must not stop ssh from working).
pub fn init(dirs: &Dirs, name: &str) -> LogGuard {
    match init_with(dirs, name, &Verbosity::default()) {
        Ok(guard) => guard,
        Err(_) => LogGuard { _worker: None },
    }
}

/// [`init`] with ssh's `-v`/`-E` applied. Fails only when `-E` names a file that cannot be
/// opened: the user asked for that file, so going on without it would hide the problem.
pub fn init_with(dirs: &Dirs, name: &str, v: &Verbosity) -> Result<LogGuard, LogFileError> {
    let filter = std::env::var("MALAI_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| {
            EnvFilter::new(match v.level {
                0 => DEFAULT_FILTER,
                1 => VERBOSE_FILTER,
                2 => VERY_VERBOSE_FILTER,
                _ => TRACE_FILTER,
            })
        });
    let (writer, guard) = match &v.file {
        Some(path) => {
            let file = open_append(path).map_err(|source| LogFileError {
                path: path.display().to_string(),
                source,
            })?;
            tracing_appender::non_blocking(file)
        }
        None => {
            let dir = dirs.ssh_logs();
            if std::fs::create_dir_all(&dir).is_err() {
                return Ok(LogGuard { _worker: None });
            }
            private_dir(&dir);
            let appender = tracing_appender::rolling::daily(&dir, format!("{name}.log"));
            tracing_appender::non_blocking(appender)
        }
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(Escaping(writer))
        .with_ansi(false)
        .with_target(true);
    let stderr = (v.level > 0 && v.file.is_none()).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(Escaping(std::io::stderr))
            .with_ansi(false)
            .with_target(true)
    });
    if tracing_subscriber::registry()
        .with(filter)
        .with(layer)
        .with(stderr)
        .try_init()
        .is_err()
    {
        return Ok(LogGuard { _worker: None });
    }
    Ok(LogGuard {
        _worker: Some(guard),
    })
}

/// Opens `-E`'s file for appending; a new one is 0600 (logs name peers and commands).
fn open_append(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// Characters a terminal or a line-based reader could be fooled by: C0/C1 controls (CR,
/// LF, ESC, BEL, DEL…) and the bidi overrides and isolates ("trojan source").
fn hazardous(c: char) -> bool {
    c.is_control() || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// `s` with every hazardous character escaped (`\n`, `\r`, `\t`, `\u{1b}`); borrowed when
/// there is none.
pub fn printable(s: &str) -> Cow<'_, str> {
    if !s.chars().any(hazardous) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if hazardous(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Wraps the log's writer: each formatted event is escaped with [`printable`] except its
/// final newline, and written in one piece (so lines of concurrent events never mix).
pub struct Escaping<M>(pub M);

/// The writer [`Escaping`] hands out for one event.
pub struct EscapingWriter<W>(W);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Escaping<M> {
    type Writer = EscapingWriter<M::Writer>;
    fn make_writer(&'a self) -> Self::Writer {
        EscapingWriter(self.0.make_writer())
    }
}

impl<W: Write> Write for EscapingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let (body, newline) = match buf.strip_suffix(b"\n") {
            Some(b) => (b, true),
            None => (buf, false),
        };
        let text = String::from_utf8_lossy(body);
        let mut line = printable(&text).into_owned().into_bytes();
        if newline {
            line.push(b'\n');
        }
        self.0.write_all(&line)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_and_bidi_overrides_are_made_visible() {
        assert!(matches!(printable("ls -la /tmp"), Cow::Borrowed(_)));
        assert_eq!(
            printable("id\r\n2026 INFO allow\u{1b}[2J\u{7}"),
            "id\\r\\n2026 INFO allow\\u{1b}[2J\\u{7}"
        );
        assert_eq!(printable("a\u{202E}b\u{9b}c"), "a\\u{202e}b\\u{9b}c");
        // Ordinary non-ASCII text stays as it is.
        assert_eq!(printable("café — ok"), "café — ok");
    }

    #[test]
    fn one_event_stays_one_line() {
        let mut out = Vec::new();
        let mut w = EscapingWriter(&mut out);
        w.write_all(b"INFO user=root\nFORGED allow\x1b[31m\n")
            .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text, "INFO user=root\\nFORGED allow\\u{1b}[31m\n");
        assert_eq!(text.lines().count(), 1);
    }
}
