//! `ssh-via`: reaching a server through OpenSSH when only TCP/22 gets through.
//!
//! zrepl's `ssh+stdinserver` connect mode: run the system `ssh` to the server entry's
//! `ssh-via = "user@host[:port]"` target; the key used there is bound in the server's
//! `authorized_keys` to `command="malai ssh stdinserver <identity>"`, so the child's
//! stdin/stdout *are* a malai protocol stream, the same one an iroh bi-stream carries.
//!
//! The ssh program is `ssh`, or `MALAI_SSH_COMMAND` split like a shell would (the way git's
//! `GIT_SSH_COMMAND` works) — that is how a user (or a test) adds `-F config` without
//! touching `~/.ssh/config`, which OpenSSH finds through the password database, not `$HOME`.
//! The child's environment loses `SSH_AUTH_SOCK`, as in zrepl: the identity file decides
//! which key reaches the forced command, not whatever an agent happens to offer first.

use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// Run on the remote side when the key has *no* forced command: a clear line on stderr
/// instead of a shell that would read our binary header as commands.
const NO_FORCED_COMMAND: &str = "echo 'malai: this ssh key has no command=\"malai ssh stdinserver <identity>\" in authorized_keys (see contrib/authorized_keys)' >&2; exit 255";

pub use crate::config::ssh_via::{ViaTarget, parse_target};

#[derive(Debug, thiserror::Error)]
pub enum SshViaError {
    #[error(transparent)]
    BadTarget(#[from] crate::config::ssh_via::BadTarget),
    #[error("MALAI_SSH_COMMAND {0:?}: not a valid command line")]
    BadCommand(String),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ssh to {target} ended ({status}) before the server answered")]
    Exited { target: String, status: String },
}

/// The program and leading arguments of the ssh to run.
fn ssh_program() -> Result<Vec<String>, SshViaError> {
    match std::env::var("MALAI_SSH_COMMAND") {
        Ok(c) if !c.trim().is_empty() => match shlex::split(&c) {
            Some(v) if !v.is_empty() => Ok(v),
            _ => Err(SshViaError::BadCommand(c)),
        },
        _ => Ok(vec!["ssh".into()]),
    }
}

/// The arguments after the program: no pty, no forwarding of any kind, no escape
/// character (the stream is binary), then the user's `-o` options, then the target.
pub fn ssh_args(target: &ViaTarget, identity: Option<&str>, options: &[String]) -> Vec<String> {
    let mut a: Vec<String> = [
        "-T",
        "-x",
        "-a",
        "-e",
        "none",
        "-o",
        "ClearAllForwardings=yes",
    ]
    .map(String::from)
    .into();
    if let Some(id) = identity {
        a.extend([
            "-i".into(),
            id.into(),
            "-o".into(),
            "IdentitiesOnly=yes".into(),
        ]);
    }
    for o in options {
        a.extend(["-o".into(), o.clone()]);
    }
    if let Some(p) = target.port {
        a.extend(["-p".into(), p.to_string()]);
    }
    if let Some(u) = &target.user {
        a.extend(["-l".into(), u.clone()]);
    }
    a.extend(["--".into(), target.host.clone(), NO_FORCED_COMMAND.into()]);
    a
}

/// A running `ssh` child whose stdio is a session's stream.
pub struct SshChild {
    child: Child,
    target: String,
    /// The task that copies a piped stderr ([`Stderr::Log`], [`Stderr::UntilAccepted`]).
    stderr: Option<tokio::task::JoinHandle<()>>,
}

impl SshChild {
    /// After our stdin pipe is closed: give ssh `linger` to deliver the tail and exit,
    /// then kill it.
    pub async fn finish(mut self, linger: Duration) {
        match tokio::time::timeout(linger, self.child.wait()).await {
            Ok(Ok(st)) => tracing::debug!(target = %self.target, status = %st, "ssh exited"),
            _ => self.kill().await,
        }
    }

    pub async fn kill(mut self) {
        let _ = self.child.kill().await;
    }

    /// How the child ended, waiting at most `limit` (to explain a failed handshake).
    pub async fn status(&mut self, limit: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .ok()?
            .ok()
    }

    /// The error for "ssh ended before the server answered", with ssh's exit status.
    pub async fn exited_error(mut self) -> SshViaError {
        let status = match self.status(Duration::from_secs(2)).await {
            Some(st) => st.to_string(),
            None => "still running".into(),
        };
        let target = self.target.clone();
        // What the far end said as it refused us (a forced command's one line) is still on
        // its way through the stderr pipe: show it before our own line, or a process that
        // exits right after would drop it (seen under load: the line never reached the user).
        if let Some(copy) = self.stderr.take() {
            let _ = tokio::time::timeout(STDERR_DRAIN, copy).await;
        }
        self.kill().await;
        SshViaError::Exited { target, status }
    }
}

/// How long a failed ssh's stderr may take to be copied once it exited (its pipe then
/// closes at once, unless something it started still holds it).
const STDERR_DRAIN: Duration = Duration::from_secs(1);

/// Where the ssh child's stderr goes.
#[derive(Debug, Clone)]
pub enum Stderr {
    /// Ours: ssh's own errors (host key, auth) reach the user verbatim.
    Inherit,
    /// Our log file, line by line: a resumable session's redials, which the user must not
    /// see (one "connection refused" line per attempt through an outage).
    Log,
    /// Ours until the flag is set (the session was accepted: a host key or auth error
    /// before it still reaches the user verbatim), then the log: what the far end says as
    /// its ssh dies under a resumable session (the forced command's last words) is no news
    /// to a user whose session resumes.
    UntilAccepted(Arc<AtomicBool>),
}

impl Stderr {
    fn stdio(&self) -> Stdio {
        match self {
            Stderr::Inherit => Stdio::inherit(),
            Stderr::Log | Stderr::UntilAccepted(_) => Stdio::piped(),
        }
    }
}

/// Start `ssh` to `via`. Its stderr is ours: ssh's own errors (host key, auth) reach the
/// user verbatim.
pub fn spawn(
    via: &str,
    identity: Option<&str>,
    options: &[String],
) -> Result<(SshChild, ChildStdin, ChildStdout), SshViaError> {
    spawn_with(via, identity, options, Stderr::Inherit)
}

/// [`spawn`], with ssh's stderr going to `stderr`.
pub fn spawn_with(
    via: &str,
    identity: Option<&str>,
    options: &[String],
    stderr: Stderr,
) -> Result<(SshChild, ChildStdin, ChildStdout), SshViaError> {
    let target = parse_target(via)?;
    let mut argv = ssh_program()?;
    let program = argv.remove(0);
    argv.extend(ssh_args(&target, identity, options));
    tracing::info!(%program, ?argv, "reaching the server through ssh");
    let mut child = Command::new(&program)
        .args(&argv)
        .env_remove("SSH_AUTH_SOCK")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(stderr.stdio())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| SshViaError::Spawn {
            program: program.clone(),
            source,
        })?;
    let copy = child.stderr.take().map(|err| {
        // Ends with the child (its stderr closes).
        let target = via.to_string();
        let shown = match stderr {
            Stderr::UntilAccepted(accepted) => Some(accepted),
            _ => None,
        };
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match &shown {
                    Some(accepted) if !accepted.load(Ordering::SeqCst) => eprintln!("{line}"),
                    _ => tracing::info!(%target, "ssh: {line}"),
                }
            }
        })
    });
    let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
        // Unreachable with Stdio::piped(), but never panic over it.
        return Err(SshViaError::Spawn {
            program,
            source: std::io::Error::other("no stdio pipes"),
        });
    };
    Ok((
        SshChild {
            child,
            target: via.to_string(),
            stderr: copy,
        },
        stdin,
        stdout,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(user: Option<&str>, host: &str, port: Option<u16>) -> ViaTarget {
        ViaTarget {
            user: user.map(String::from),
            host: host.into(),
            port,
        }
    }

    #[test]
    fn parses_targets() {
        assert_eq!(
            parse_target("backup@foo.example.com").unwrap(),
            t(Some("backup"), "foo.example.com", None)
        );
        assert_eq!(
            parse_target("root@127.0.0.1:2222").unwrap(),
            t(Some("root"), "127.0.0.1", Some(2222))
        );
        assert_eq!(parse_target("host").unwrap(), t(None, "host", None));
        assert_eq!(
            parse_target("u@[::1]:22").unwrap(),
            t(Some("u"), "::1", Some(22))
        );
        assert_eq!(parse_target("[::1]").unwrap(), t(None, "::1", None));
        // Allowed twins of the CVE shapes: ordinary names.
        assert_eq!(
            parse_target("svc-backup_1.x@a-b_c.example.com:22").unwrap(),
            t(Some("svc-backup_1.x"), "a-b_c.example.com", Some(22))
        );
    }

    #[test]
    fn rejects_bad_targets() {
        for bad in [
            "",
            "@host",
            "u@",
            "u@host:",
            "u@host:0",
            "u@host:99999",
            "u@host:x",
            "-oProxyCommand=x",
            "u@-host",
            "-u@host",
            "u@[::1",
            "u@[::1]x",
            "u@ho st",
            // CVE-2023-51385 shapes: shell syntax in the user or host.
            "$(touch /tmp/pwned)@host",
            "`id`@host",
            "u;id@host",
            "u@host;id",
            "u@$(id)",
            "u@h|id",
            "u@h&id",
            "u@h'x",
            "u@h\"x",
            "u\n@h",
            "u@h\\x",
            "u@h%x",
            "u@h*",
            "u@h/x",
        ] {
            assert!(parse_target(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn args_end_with_target_and_fallback_command() {
        let a = ssh_args(
            &t(Some("u"), "h", Some(2222)),
            Some("/k"),
            &["BatchMode=yes".into()],
        );
        let n = a.len();
        assert_eq!(&a[n - 3..n - 1], ["--", "h"]);
        assert_eq!(a[n - 1], NO_FORCED_COMMAND);
        assert!(a.windows(2).any(|w| w == ["-p", "2222"]));
        assert!(a.windows(2).any(|w| w == ["-l", "u"]));
        assert!(a.windows(2).any(|w| w == ["-i", "/k"]));
        assert!(a.windows(2).any(|w| w == ["-o", "BatchMode=yes"]));
        assert!(a.contains(&"-T".to_string()));
    }
}
