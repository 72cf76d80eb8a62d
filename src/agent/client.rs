//! The CLI's side of the agent: connect and check the version, ask for status or stop,
//! and run `proxy`/exec through it by handing over stdio.
//!
//! [`route`] decides, once per command, whether to use the agent: `MALAI_SSH_AGENT` set
//! and answering → the agent; set but dead, or unset → a direct connection, unless
//! `MALAI_LOCKDOWN_MODE=true`, which turns that into a clear error (the CLI may not read a
//! key). Servers reached `ssh-via` are always direct: no malai key is involved.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::signal::unix::{SignalKind, signal};

use super::protocol::{
    self, AgentHello, AgentStatus, FailKind, FromAgent, OpenRequest, ToAgent, VERSION,
};
use super::{AgentError, lockdown_help, lockdown_mode, socket_from_env};
use crate::client::ClientError;
use crate::client::exec::exit_code;
use crate::client::tty::window_size;

/// How long the CLI waits for the agent's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// A control connection that has passed the hello.
pub struct AgentClient {
    sock: UnixStream,
    path: PathBuf,
    pub hello: AgentHello,
}

impl AgentClient {
    /// Connect to the agent at `path` and check it speaks our version.
    pub async fn connect(path: &Path) -> Result<AgentClient, AgentError> {
        let control = |source| AgentError::Control {
            path: path.to_path_buf(),
            source,
        };
        let exchange = async {
            // Only a socket in a directory of ours, served by this user, gets our stdio and
            // tty descriptors (docs/security.md).
            let mut sock: UnixStream =
                crate::localsock::connect(path).await.map_err(|e| match e {
                    crate::localsock::ConnectError::Trust(t) => AgentError::Untrusted(t),
                    crate::localsock::ConnectError::Io(source) => AgentError::Unreachable {
                        path: path.to_path_buf(),
                        source,
                    },
                })?;
            protocol::write(&mut sock, &ToAgent::Hello { version: VERSION })
                .await
                .map_err(control)?;
            match protocol::read::<_, FromAgent>(&mut sock)
                .await
                .map_err(control)?
            {
                FromAgent::Hello(h) => Ok((sock, h)),
                other => Err(control(protocol::ControlError::Malformed(format!(
                    "expected hello, got {other:?}"
                )))),
            }
        };
        let (sock, hello) = tokio::time::timeout(HELLO_TIMEOUT, exchange)
            .await
            .map_err(|_| AgentError::Timeout {
                path: path.to_path_buf(),
                secs: HELLO_TIMEOUT.as_secs(),
            })??;
        if hello.version != VERSION {
            return Err(AgentError::Version {
                path: path.to_path_buf(),
                pid: hello.pid,
                theirs: hello.version,
                ours: VERSION,
            });
        }
        Ok(AgentClient {
            sock,
            path: path.to_path_buf(),
            hello,
        })
    }

    fn control(&self, source: protocol::ControlError) -> AgentError {
        AgentError::Control {
            path: self.path.clone(),
            source,
        }
    }

    pub async fn status(mut self) -> Result<AgentStatus, AgentError> {
        protocol::write(&mut self.sock, &ToAgent::Status)
            .await
            .map_err(|e| self.control(e))?;
        match protocol::read::<_, FromAgent>(&mut self.sock).await {
            Ok(FromAgent::Status(s)) => Ok(s),
            Ok(other) => Err(self.control(protocol::ControlError::Malformed(format!(
                "expected status, got {other:?}"
            )))),
            Err(e) => Err(self.control(e)),
        }
    }

    /// Ask the agent to shut down; returns once it has acknowledged.
    pub async fn stop(mut self) -> Result<(), AgentError> {
        protocol::write(&mut self.sock, &ToAgent::Stop)
            .await
            .map_err(|e| self.control(e))?;
        match protocol::read::<_, FromAgent>(&mut self.sock).await {
            Ok(FromAgent::Stopping) => Ok(()),
            Ok(other) => Err(self.control(protocol::ControlError::Malformed(format!(
                "expected stopping, got {other:?}"
            )))),
            Err(e) => Err(self.control(e)),
        }
    }

    /// The socket, after the hello, for a request this module has no helper for.
    pub fn into_socket(self) -> UnixStream {
        self.sock
    }

    /// The agent's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Send an `open` with this process's stdio and wait until the server accepted.
    async fn open(
        &mut self,
        host: &str,
        request: OpenRequest,
        stdin: bool,
    ) -> Result<(), ClientError> {
        let mut fds: Vec<RawFd> = vec![];
        if stdin {
            fds.push(0);
        }
        fds.push(1);
        if request.output_fds() > 1 {
            fds.push(2);
        }
        self.open_fds(host, request, stdin, &fds).await
    }

    /// Send an `open` with these descriptors (stdin first when `stdin`) and wait until the
    /// server accepted.
    async fn open_fds(
        &mut self,
        host: &str,
        request: OpenRequest,
        stdin: bool,
        fds: &[RawFd],
    ) -> Result<(), ClientError> {
        let msg = ToAgent::Open {
            host: host.to_string(),
            request,
            stdin,
        };
        protocol::write_with_fds(&self.sock, &msg, fds)
            .await
            .map_err(|e| agent_lost(&self.path, e))?;
        match protocol::read::<_, FromAgent>(&mut self.sock).await {
            Ok(FromAgent::Opened) => Ok(()),
            Ok(FromAgent::Failed { kind, message }) => Err(match kind {
                FailKind::Denied => ClientError::Denied(message),
                FailKind::Resolve | FailKind::Refused | FailKind::BadRequest => {
                    ClientError::Refused(message)
                }
            }),
            Ok(other) => Err(ClientError::Agent(format!(
                "agent sent {other:?} instead of opened"
            ))),
            Err(e) => Err(agent_lost(&self.path, e)),
        }
    }

    async fn next(&mut self) -> Result<FromAgent, ClientError> {
        protocol::read::<_, FromAgent>(&mut self.sock)
            .await
            .map_err(|e| agent_lost(&self.path, e))
    }
}

fn agent_lost(path: &Path, e: protocol::ControlError) -> ClientError {
    ClientError::Agent(format!("agent at {}: {e}", path.display()))
}

/// Whether a connecting command should go through the agent.
pub enum Route {
    Agent(AgentClient),
    Direct,
}

/// Decide once per command of cluster `dir`: the agent (`MALAI_SSH_AGENT`) if usable;
/// else the process that holds the cluster's key on this machine (the server, or an agent
/// started without the variable) — one endpoint per id52 per machine; otherwise direct,
/// or the lockdown error.
pub async fn route(dir: &crate::config::store::ClusterDir) -> Result<Route, ClientError> {
    let lockdown = lockdown_mode();
    let mut why = None;
    if let Some(path) = socket_from_env() {
        match AgentClient::connect(&path).await {
            Ok(c) => return Ok(Route::Agent(c)),
            Err(e @ AgentError::Untrusted(_)) => {
                // Someone else's socket where ours should be: say so, use nothing of it.
                if !lockdown {
                    eprintln!("malai: warning: {e}; not using it");
                }
                why = Some(e.to_string());
            }
            Err(e) => {
                tracing::info!(error = %e, "agent not usable");
                why = Some(e.to_string());
            }
        }
    }
    if let Ok(Some(h)) = crate::endpoint::holder(dir)
        && let Some(path) = h.socket
    {
        match AgentClient::connect(&path).await {
            Ok(c) => return Ok(Route::Agent(c)),
            Err(e) => tracing::info!(error = %e, "key holder not usable"),
        }
    }
    if lockdown {
        return Err(ClientError::Lockdown(lockdown_help(why.as_deref())));
    }
    Ok(Route::Direct)
}

/// Point fds 0 and 1 at /dev/null: the agent now holds the only live copies, so the
/// caller (ssh) sees EOF on our stdout exactly when the agent closes it.
fn give_up_stdio() {
    // SAFETY: open/dup2/close on this process's own descriptors.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
}

/// `malai ssh proxy` through the agent.
pub async fn proxy(
    mut agent: AgentClient,
    host: &str,
    port: Option<u16>,
) -> Result<(), ClientError> {
    // Signals first, so none arriving after the handover kills us before we pass it on.
    let mut hup = signal(SignalKind::hangup()).map_err(local)?;
    let mut term = signal(SignalKind::terminate()).map_err(local)?;
    agent.open(host, OpenRequest::Tunnel { port }, true).await?;
    give_up_stdio();
    let end = tokio::select! {
        r = agent.next() => r?,
        _ = hup.recv() => {
            // OpenSSH's "session over": end the upload cleanly, like the direct proxy.
            let _ = protocol::write(&mut agent.sock, &ToAgent::Finish).await;
            return match tokio::time::timeout(Duration::from_secs(1), agent.next()).await {
                Ok(Ok(FromAgent::Done)) | Err(_) => Ok(()),
                Ok(Ok(FromAgent::Broken { message })) => Err(ClientError::Refused(message)),
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e),
            };
        }
        _ = term.recv() => return Err(ClientError::Killed(15)),
    };
    match end {
        FromAgent::Done => Ok(()),
        FromAgent::Broken { message } => Err(ClientError::Refused(message)),
        other => Err(ClientError::Agent(format!("agent sent {other:?}"))),
    }
}

/// Native exec through the agent; returns the exit code to use. `on_opened` runs once the
/// server accepted (the caller enters raw mode there); its guard lives until the end.
pub async fn exec<G>(
    mut agent: AgentClient,
    host: &str,
    request: crate::protocol::exec::ExecRequest,
    stdin: bool,
    on_opened: impl FnOnce() -> G,
) -> Result<i32, ClientError> {
    let pty = request.pty.is_some();
    let mut term = signal(SignalKind::terminate()).map_err(local)?;
    let mut int = signal(SignalKind::interrupt()).map_err(local)?;
    let mut hup = signal(SignalKind::hangup()).map_err(local)?;
    let mut winch = signal(SignalKind::window_change()).map_err(local)?;
    agent.open(host, OpenRequest::Exec(request), stdin).await?;
    let _guard = on_opened();
    loop {
        let end = tokio::select! {
            r = agent.next() => r?,
            _ = winch.recv(), if pty => {
                if let Some((cols, rows)) = window_size() {
                    protocol::write(&mut agent.sock, &ToAgent::Window { cols, rows })
                        .await
                        .map_err(|e| agent_lost(&agent.path, e))?;
                }
                continue;
            }
            // Dropping the socket makes the agent abandon the request at once.
            _ = term.recv() => return Err(ClientError::Killed(15)),
            _ = int.recv() => return Err(ClientError::Killed(2)),
            _ = hup.recv() => return Err(ClientError::Killed(1)),
        };
        return match end {
            FromAgent::Exit { status } => Ok(exit_code(&status)),
            FromAgent::Broken { message } => Err(ClientError::Refused(message)),
            other => Err(ClientError::Agent(format!("agent sent {other:?}"))),
        };
    }
}

/// Exec through the agent at `path` with no stdin and the command's output copied into
/// `out`/`err` (a group's prefixed writers): the agent writes into pipes we read.
pub async fn exec_into<O, E>(
    path: &Path,
    host: &str,
    request: crate::protocol::exec::ExecRequest,
    out: &mut O,
    err: &mut E,
) -> Result<i32, ClientError>
where
    O: tokio::io::AsyncWrite + Unpin,
    E: tokio::io::AsyncWrite + Unpin,
{
    use std::os::fd::AsRawFd;
    let mut agent = AgentClient::connect(path)
        .await
        .map_err(|e| ClientError::Agent(e.to_string()))?;
    let (out_tx, mut out_rx) = tokio::net::unix::pipe::pipe().map_err(local)?;
    let (err_tx, mut err_rx) = tokio::net::unix::pipe::pipe().map_err(local)?;
    let fds = [out_tx.as_raw_fd(), err_tx.as_raw_fd()];
    let opened = agent
        .open_fds(host, OpenRequest::Exec(request), false, &fds)
        .await;
    // Only the agent's copies may keep the pipes open now: EOF comes when it closes them.
    drop(out_tx);
    drop(err_tx);
    opened?;
    let (o, e, end) = tokio::join!(
        tokio::io::copy(&mut out_rx, out),
        tokio::io::copy(&mut err_rx, err),
        agent.next()
    );
    if let Err(e) = o.and(e) {
        tracing::debug!(error = %e, "copying a group member's output");
    }
    match end? {
        FromAgent::Exit { status } => Ok(exit_code(&status)),
        FromAgent::Broken { message } => Err(ClientError::Refused(message)),
        other => Err(ClientError::Agent(format!("agent sent {other:?}"))),
    }
}

fn local(e: std::io::Error) -> ClientError {
    ClientError::Refused(format!("local i/o: {e}"))
}
