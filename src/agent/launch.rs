//! "Make sure an agent is running" — for `malai ssh agent -e` and `malai ssh curl`.
//!
//! The order (atuin's daemon lifecycle): take the startup lock (two shells starting an
//! agent at once get one agent) → probe the socket (hello) → a live agent of our version
//! is used as is; one of another version is asked to stop (SIGTERM to the pid from its
//! hello) → a socket nobody answers on is stale and removed → spawn `malai ssh agent`
//! detached (new session, stdio away from the caller, so `$(malai ssh agent -e)` returns)
//! → probe until it answers, with a deadline, reporting its stderr if it dies first →
//! release the lock.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use tokio::net::UnixStream;

use super::{AgentError, lock_path};
use crate::config::paths::Dirs;
use crate::control::protocol::{self, FromHolder, HolderHello, ToHolder, VERSION};
use crate::control::{ENV_LOCKDOWN, ENV_SOCKET, agent_socket as socket_path};

/// How long to wait for another process's startup to finish.
const LOCK_DEADLINE: Duration = Duration::from_secs(15);
/// How long a new agent may take until it answers.
const READY_DEADLINE: Duration = Duration::from_secs(15);
/// How long a probe waits for the hello.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long an old agent gets to stop after SIGTERM.
const STOP_DEADLINE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(20);

/// An exclusive `flock` on `run/agent.lock`, released on drop.
pub struct StartupLock {
    _lock: Flock<std::fs::File>,
}

impl StartupLock {
    pub async fn acquire(path: &Path) -> Result<StartupLock, AgentError> {
        let err = |msg: String| AgentError::Lock {
            path: path.to_path_buf(),
            msg,
        };
        let deadline = Instant::now() + LOCK_DEADLINE;
        loop {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(path)
                .map_err(|e| err(e.to_string()))?;
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(l) => return Ok(StartupLock { _lock: l }),
                Err((_, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    tokio::time::sleep(POLL).await;
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(err(format!(
                        "still held by another malai after {} s",
                        LOCK_DEADLINE.as_secs()
                    )));
                }
                Err((_, e)) => return Err(err(e.to_string())),
            }
        }
    }
}

/// What is at the socket path.
#[derive(Debug)]
pub enum Probe {
    /// An agent of our protocol version answered.
    Alive(HolderHello),
    /// An agent answered, but speaks another version.
    OtherVersion(HolderHello),
    /// The file exists but nobody answers properly (a crashed agent's leftover).
    Stale,
    /// No socket file.
    Missing,
}

/// Say hello to whatever listens at `path`.
pub async fn probe(path: &Path) -> Probe {
    if std::fs::symlink_metadata(path).is_err() {
        return Probe::Missing;
    }
    let hello = async {
        let mut sock = UnixStream::connect(path).await.ok()?;
        let token = crate::control::token::read(path);
        protocol::write(
            &mut sock,
            &ToHolder::Hello {
                version: VERSION,
                token,
            },
        )
        .await
        .ok()?;
        match protocol::read::<_, FromHolder>(&mut sock).await.ok()? {
            FromHolder::Hello(h) => Some(h),
            _ => None,
        }
    };
    match tokio::time::timeout(PROBE_TIMEOUT, hello).await {
        Ok(Some(h)) if h.version == VERSION => Probe::Alive(h),
        Ok(Some(h)) => Probe::OtherVersion(h),
        _ => Probe::Stale,
    }
}

/// A running agent, as `-e` prints it.
#[derive(Debug, Clone)]
pub struct Running {
    pub socket: PathBuf,
    pub hello: HolderHello,
    /// Whether this call started it.
    pub started: bool,
}

/// Make sure this machine's agent runs (starting it with the HTTP proxy unless
/// `http == false`), and return its socket and hello.
pub async fn ensure_running(dirs: &Dirs, http: bool) -> Result<Running, AgentError> {
    crate::localsock::prepare_private_dir(&dirs.run)?;
    let socket = socket_path(dirs);
    let _lock = StartupLock::acquire(&lock_path(dirs)).await?;
    match probe(&socket).await {
        Probe::Alive(hello) => {
            return Ok(Running {
                socket,
                hello,
                started: false,
            });
        }
        Probe::OtherVersion(old) => {
            tracing::info!(
                pid = old.pid,
                version = old.version,
                "replacing an agent of another version"
            );
            stop_pid(old.pid, &socket).await?;
        }
        Probe::Stale => {
            tracing::info!(socket = %socket.display(), "removing stale agent socket");
            let _ = std::fs::remove_file(&socket);
        }
        Probe::Missing => {}
    }
    let hello = spawn(dirs, &socket, http).await?;
    Ok(Running {
        socket,
        hello,
        started: true,
    })
}

/// SIGTERM an agent and wait for its socket to stop answering.
async fn stop_pid(pid: u32, socket: &Path) -> Result<(), AgentError> {
    let target = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + STOP_DEADLINE;
    loop {
        match probe(socket).await {
            Probe::Missing => return Ok(()),
            Probe::Stale => {
                let _ = std::fs::remove_file(socket);
                return Ok(());
            }
            _ if Instant::now() >= deadline => return Err(AgentError::OldAgent { pid }),
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// Start `malai ssh agent --under-lock` detached and wait until it answers.
async fn spawn(dirs: &Dirs, socket: &Path, http: bool) -> Result<HolderHello, AgentError> {
    let exe = std::env::current_exe().map_err(|e| AgentError::Spawn(e.to_string()))?;
    let log_dir = dirs.ssh_logs();
    let _ = std::fs::create_dir_all(&log_dir);
    let stderr_path = log_dir.join("agent.stderr");
    let stderr = std::fs::File::create(&stderr_path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null());
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["ssh", "agent", "--under-lock"])
        .arg(format!("--http={http}"))
        // The agent reads keys itself and must never route through another agent.
        .env_remove(ENV_SOCKET)
        .env_remove(ENV_LOCKDOWN)
        .env_remove(super::daemon::ENV_HTTP_PORT)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    // SAFETY: setsid is async-signal-safe; it detaches the agent from the caller's session
    // and terminal, so closing the shell (SIGHUP) or a test's process-group kill spares it.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    if let Some(port) = advertised_http_port() {
        cmd.env(super::daemon::ENV_HTTP_PORT, port.to_string());
    }
    let mut child = cmd.spawn().map_err(|e| AgentError::Spawn(e.to_string()))?;
    let deadline = Instant::now() + READY_DEADLINE;
    loop {
        if let Probe::Alive(h) = probe(socket).await {
            return Ok(h);
        }
        if let Ok(Some(status)) = child.try_wait() {
            let text = std::fs::read_to_string(&stderr_path).unwrap_or_default();
            let last = text.lines().rev().find(|l| !l.trim().is_empty());
            return Err(AgentError::NotReady {
                secs: READY_DEADLINE.as_secs(),
                detail: format!(
                    ": it exited ({status}){}",
                    last.map(|l| format!(": {l}")).unwrap_or_default()
                ),
            });
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(AgentError::NotReady {
                secs: READY_DEADLINE.as_secs(),
                detail: format!(" (see {})", stderr_path.display()),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The shell lines `agent -e` prints (values quoted for `eval`).
pub fn export_lines(socket: &Path, lockdown: bool, http: Option<std::net::SocketAddr>) -> String {
    let q = |s: &str| {
        shlex::try_quote(s)
            .map(|c| c.into_owned())
            .unwrap_or_else(|_| format!("'{}'", s.replace('\'', r"'\''")))
    };
    let mut out = format!("export {ENV_SOCKET}={}\n", q(&socket.display().to_string()));
    if lockdown {
        out.push_str(&format!("export {ENV_LOCKDOWN}=true\n"));
    }
    if let Some(addr) = http {
        let url = format!("http://{addr}");
        out.push_str(&format!(
            "export HTTP_PROXY={url}\nexport http_proxy={url}\n"
        ));
    }
    out
}

/// What `agent stop` says: what it stopped, and which variables of the shells that ran
/// `eval "$(malai ssh agent -e)"` now point at nothing (the next agent comes back on the
/// same HTTP port when it is free, `daemon`, so a restart makes them good again).
pub fn stopped_line(socket: &Path, hello: &HolderHello) -> String {
    let mut stale = vec![ENV_SOCKET.to_string()];
    if let Some(addr) = hello.http {
        stale.insert(0, format!("HTTP_PROXY/http_proxy (http://{addr})"));
    }
    format!(
        "stopped the agent (pid {}) on {}; in shells that ran `eval \"$(malai ssh agent -e)\"` {} {} stale until an agent runs again (run it again, or unset them)",
        hello.pid,
        socket.display(),
        stale.join(" and "),
        if stale.len() == 1 { "is" } else { "are" },
    )
}

/// The HTTP proxy port this environment advertises: `http_proxy`/`HTTP_PROXY` naming a
/// loopback address in a shell that ran `agent -e` (`MALAI_SSH_AGENT` is set, so the
/// proxy is an agent's, not some other local proxy). A newly started agent takes it again
/// when it is free, so that shell's variables work again.
pub fn advertised_http_port() -> Option<u16> {
    std::env::var_os(ENV_SOCKET).filter(|v| !v.is_empty())?;
    ["http_proxy", "HTTP_PROXY"].iter().find_map(|k| {
        let v = std::env::var(k).ok()?;
        let rest = v.trim().strip_prefix("http://")?;
        let addr: std::net::SocketAddr = rest.trim_end_matches('/').parse().ok()?;
        (addr.ip().is_loopback() && addr.port() != 0).then_some(addr.port())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_line_names_the_stale_variables() {
        let mut h = HolderHello {
            version: VERSION,
            pid: 42,
            http: Some("127.0.0.1:4000".parse().unwrap()),
        };
        let s = stopped_line(Path::new("/run/a.sock"), &h);
        assert!(
            s.starts_with("stopped the agent (pid 42) on /run/a.sock;"),
            "{s}"
        );
        assert!(
            s.contains(
                "HTTP_PROXY/http_proxy (http://127.0.0.1:4000) and MALAI_SSH_AGENT are stale"
            ),
            "{s}"
        );
        h.http = None;
        let s = stopped_line(Path::new("/run/a.sock"), &h);
        assert!(s.contains("MALAI_SSH_AGENT is stale"), "{s}");
    }

    #[test]
    fn export_lines_quote_and_follow_flags() {
        let addr: std::net::SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let s = export_lines(Path::new("/tmp/a b/agent.sock"), true, Some(addr));
        assert_eq!(
            s,
            "export MALAI_SSH_AGENT='/tmp/a b/agent.sock'\nexport MALAI_LOCKDOWN_MODE=true\n\
             export HTTP_PROXY=http://127.0.0.1:4000\nexport http_proxy=http://127.0.0.1:4000\n"
        );
        let s = export_lines(Path::new("/r/agent.sock"), false, None);
        assert_eq!(s, "export MALAI_SSH_AGENT=/r/agent.sock\n");
    }

    #[tokio::test]
    async fn probe_tells_missing_from_stale() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("agent.sock");
        assert!(matches!(probe(&p).await, Probe::Missing));
        // A socket file nobody listens on (a crashed agent's leftover).
        drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
        assert!(matches!(probe(&p).await, Probe::Stale));
    }

    #[tokio::test]
    async fn lock_is_exclusive() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("agent.lock");
        let held = StartupLock::acquire(&p).await.unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        assert!(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err());
        drop(held);
        let file = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        assert!(Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok());
    }
}
