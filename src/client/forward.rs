//! Native forwarding: `malai ssh -L`, `-D`, `-W`, `-R`, `-A`, `-N` (and `-g`,
//! `-o ExitOnForwardFailure=yes`), without OpenSSH.
//!
//! One iroh connection to the server carries everything: each forwarded connection is one
//! `forward` stream (`protocol::forward`) opened when a local client connects, and the
//! remote command (unless `-N`) is one `exec` stream beside them. The server decides each
//! stream with `acl::decide` and connects before answering, so a refusal or an unreachable
//! target is reported per connection the way ssh reports a failed channel, and for `-D` as
//! the SOCKS failure reply.
//!
//! `-R` and `-A` are `remote-forward` streams: the server listens (for `-A`, on a private
//! agent socket whose path the remote command gets as `SSH_AUTH_SOCK`) and announces each
//! connection; we claim it with a `remote-connection` stream and connect it to the local
//! target (for `-A`, our `SSH_AUTH_SOCK`).
//!
//! Spec syntax is OpenSSH's (`-R` mirrors `-L`: the listen side is on the server): `-L [bind:]port:host:hostport`, `-L [bind:]port:/remote.sock`,
//! `-L /local.sock:host:hostport`, `-L /local.sock:/remote.sock` (IPv6 in brackets),
//! `-D [bind:]port`, `-W host:port`. Local listeners bind loopback unless `-g` or an
//! explicit bind address says otherwise, as with ssh.
//!
//! `-f` re-runs this same command line as a child in its own process group, stdin from
//! /dev/null, and waits until the child says its forwards (and remote command) are up
//! through an inherited pipe (`MALAI_SSH_FORK_FD`); then the parent exits 0. A child that
//! fails first closes the pipe without a word and the parent exits with its status.
//!
//! The run ends when the remote command ends (open forwards are cut, unlike ssh which waits
//! for them), or for `-N` on a signal or when the connection to the server is lost.

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::exec::{Interrupts, exec_request, run_resumable_session, run_session, want_pty};
use super::forward_resume::{Channel, Command, Opener};
use super::socks;
use super::ssh_args::SshArgs;
use crate::config::Server;
use crate::config::paths::Dirs;
use crate::protocol::forward::{ForwardTarget, RemoteEvent, RemoteListen};
use crate::session::link::Link;
use crate::session::{LINGER, Resolved, SessionError, SessionWrite};
use crate::transport::{pump, stdio};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("bad forwarding specification {0:?}")]
    Bad(String),
    #[error("bad port {1:?} in forwarding specification {0:?}")]
    Port(String, String),
}

/// Where a local forward listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// `None`: ssh's default (loopback, or all interfaces with `-g`).
    Tcp {
        bind: Option<String>,
        port: u16,
    },
    Unix(PathBuf),
}

/// One `-L`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalForward {
    pub listen: Listen,
    pub to: ForwardTarget,
}

/// Split on `:` outside `[…]`, dropping the brackets (`[::1]:80` → `::1`, `80`).
fn split_spec(spec: &str) -> Result<Vec<String>, SpecError> {
    let mut parts = vec![];
    let mut cur = String::new();
    let mut in_brackets = false;
    for c in spec.chars() {
        match c {
            '[' if !in_brackets && cur.is_empty() => in_brackets = true,
            ']' if in_brackets => in_brackets = false,
            ':' if !in_brackets => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    if in_brackets {
        return Err(SpecError::Bad(spec.into()));
    }
    parts.push(cur);
    Ok(parts)
}

fn port(spec: &str, p: &str) -> Result<u16, SpecError> {
    p.parse::<u16>()
        .map_err(|_| SpecError::Port(spec.into(), p.into()))
}

fn is_path(s: &str) -> bool {
    s.contains('/')
}

fn target(spec: &str, host: &str, hostport: &str) -> Result<ForwardTarget, SpecError> {
    if host.is_empty() {
        return Err(SpecError::Bad(spec.into()));
    }
    let to = ForwardTarget::Tcp {
        host: host.into(),
        port: port(spec, hostport)?,
    };
    to.check().map_err(|_| SpecError::Bad(spec.into()))?;
    Ok(to)
}

fn unix_target(spec: &str, path: &str) -> Result<ForwardTarget, SpecError> {
    let to = ForwardTarget::Unix { path: path.into() };
    to.check().map_err(|_| SpecError::Bad(spec.into()))?;
    Ok(to)
}

/// Parse one `-L` spec (OpenSSH's forms, see the module header).
pub fn parse_local(spec: &str) -> Result<LocalForward, SpecError> {
    let p = split_spec(spec)?;
    let bad = || SpecError::Bad(spec.into());
    let tcp = |bind: Option<&str>, p: &str| -> Result<Listen, SpecError> {
        Ok(Listen::Tcp {
            bind: bind.map(str::to_string),
            port: port(spec, p)?,
        })
    };
    let (listen, to) = match p.as_slice() {
        [bind, lport, host, hport] => (tcp(Some(bind), lport)?, target(spec, host, hport)?),
        [a, b, c] if is_path(a) => (Listen::Unix(a.into()), target(spec, b, c)?),
        [a, b, c] if is_path(c) => (tcp(Some(a), b)?, unix_target(spec, c)?),
        [a, b, c] => (tcp(None, a)?, target(spec, b, c)?),
        [a, b] if is_path(a) && is_path(b) => (Listen::Unix(a.into()), unix_target(spec, b)?),
        [a, b] if is_path(b) => (tcp(None, a)?, unix_target(spec, b)?),
        _ => return Err(bad()),
    };
    Ok(LocalForward { listen, to })
}

/// Parse one `-D [bind:]port`.
pub fn parse_dynamic(spec: &str) -> Result<Listen, SpecError> {
    match split_spec(spec)?.as_slice() {
        [p] => Ok(Listen::Tcp {
            bind: None,
            port: port(spec, p)?,
        }),
        [bind, p] => Ok(Listen::Tcp {
            bind: Some(bind.clone()),
            port: port(spec, p)?,
        }),
        _ => Err(SpecError::Bad(spec.into())),
    }
}

/// Parse `-W host:port`.
pub fn parse_stdio(spec: &str) -> Result<ForwardTarget, SpecError> {
    match split_spec(spec)?.as_slice() {
        [host, p] => target(spec, host, p),
        _ => Err(SpecError::Bad(spec.into())),
    }
}

/// The address a TCP listen spec binds, as ssh decides: no bind address → loopback (all
/// interfaces with `-g`); `*` or empty → all; `localhost` → loopback; else as given.
pub fn bind_addr(bind: Option<&str>, port: u16, gateway: bool) -> String {
    match bind {
        None if gateway => format!("0.0.0.0:{port}"),
        None | Some("localhost") => format!("127.0.0.1:{port}"),
        Some("") | Some("*") => format!("0.0.0.0:{port}"),
        Some(b) if b.contains(':') => format!("[{b}]:{port}"),
        Some(b) => format!("{b}:{port}"),
    }
}

enum Bound {
    Tcp(TcpListener, String),
    Unix(UnixListener, PathBuf),
}

impl Bound {
    fn label(&self) -> String {
        match self {
            Bound::Tcp(_, a) => a.clone(),
            Bound::Unix(_, p) => p.display().to_string(),
        }
    }
}

async fn bind(listen: &Listen, gateway: bool) -> Result<Bound, String> {
    match listen {
        Listen::Tcp { bind, port } => {
            let addr = bind_addr(bind.as_deref(), *port, gateway);
            TcpListener::bind(&addr)
                .await
                .map(|l| Bound::Tcp(l, addr.clone()))
                .map_err(|e| format!("bind {addr}: {e}"))
        }
        Listen::Unix(path) => UnixListener::bind(path)
            .map(|l| Bound::Unix(l, path.clone()))
            .map_err(|e| format!("bind {}: {e}", path.display())),
    }
}

/// What a listener's connections become.
#[derive(Clone)]
enum Kind {
    /// `-L`: always this target.
    Fixed(ForwardTarget),
    /// `-D`: the target each SOCKS client asks for.
    Socks,
}

/// `malai ssh` with forwards: see the module header.
pub async fn run(
    dirs: &Dirs,
    resolved: &Resolved,
    server: &Server,
    args: &SshArgs,
) -> Result<i32, SessionError> {
    let plan = Plan::parse(server, args)?;
    let ready = match background::child_fd() {
        Some(fd) => Some(fd),
        None if args.background => return background::fork_and_wait().await,
        None => None,
    };
    let mut interrupts = Interrupts::install()?;
    let link = tokio::select! {
        c = Link::connect(resolved, server) => c?,
        n = interrupts.recv() => return Err(SessionError::Killed(n)),
    };
    let opener = Opener::new(dirs, &link, resolved, server).await;
    if let Some(to) = plan.stdio_to {
        let r = stdio_forward(&opener, to, &mut interrupts).await;
        link.close().await;
        return r;
    }
    let forwards = Forwards {
        link: link.clone(),
        opener,
        stop: CancellationToken::new(),
        tasks: TaskTracker::new(),
        remote: RemoteState::default(),
    };
    let result = match forwards.set_up(plan.locals, plan.remotes, args).await {
        Ok(agent_env) => forwards.main(args, agent_env, ready, &mut interrupts).await,
        Err(e) => Err(e),
    };
    forwards.stop().await;
    link.close().await;
    result
}

/// What the command line asks for, checked before anything connects.
struct Plan {
    /// `-L` and `-D` listeners.
    locals: Vec<(Listen, Kind)>,
    /// `-R`: the spec as typed (for messages) and its parsed form.
    remotes: Vec<(String, LocalForward)>,
    /// `-W host:port`.
    stdio_to: Option<ForwardTarget>,
}

impl Plan {
    fn parse(server: &Server, args: &SshArgs) -> Result<Plan, SessionError> {
        let usage = SessionError::Usage;
        if server.ssh_via.is_some() {
            return Err(SessionError::Refused(
                "forwarding (-L, -D, -W, -N) is not supported for ssh-via servers yet; \
                 use OpenSSH through `malai ssh proxy`"
                    .into(),
            ));
        }
        let locals = args
            .local_forwards
            .iter()
            .map(|s| parse_local(s).map(|l| (l.listen, Kind::Fixed(l.to))))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| usage(e.to_string()))?;
        let dynamics = args
            .dynamic_forwards
            .iter()
            .map(|s| parse_dynamic(s).map(|l| (l, Kind::Socks)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| usage(e.to_string()))?;
        let stdio_to = args
            .stdio_forward
            .as_deref()
            .map(parse_stdio)
            .transpose()
            .map_err(|e| usage(e.to_string()))?;
        if stdio_to.is_some() && args.command.is_some() {
            return Err(usage("-W takes no remote command".into()));
        }
        let remotes = args
            .remote_forwards
            .iter()
            .map(|s| parse_local(s).map(|f| (s.clone(), f)))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| usage(e.to_string()))?;
        if args.background && args.command.is_none() && !args.no_command {
            return Err(usage(
                "cannot fork into background without a command to execute (use -N)".into(),
            ));
        }
        Ok(Plan {
            locals: locals.into_iter().chain(dynamics).collect(),
            remotes,
            stdio_to,
        })
    }
}

/// The running forwards of one `malai ssh` and the tasks that serve them.
struct Forwards {
    link: Link,
    /// Opens the `-L`/`-D` channels and the remote command (`client::forward_resume`).
    opener: Opener,
    /// Ends every forward's task.
    stop: CancellationToken,
    tasks: TaskTracker,
    remote: RemoteState,
}

impl Forwards {
    /// Bind every local listener and set up every remote forward (and `-A`) before anything
    /// runs, so failures are reported up front. Returns the forwarded agent's socket path.
    async fn set_up(
        &self,
        locals: Vec<(Listen, Kind)>,
        remotes: Vec<(String, LocalForward)>,
        args: &SshArgs,
    ) -> Result<Option<String>, SessionError> {
        let mut bound = vec![];
        for (listen, kind) in locals {
            match bind(&listen, args.gateway_ports).await {
                Ok(b) => bound.push((b, kind)),
                Err(e) if args.exit_on_forward_failure => {
                    return Err(SessionError::Refused(format!(
                        "{e}; could not request local forwarding"
                    )));
                }
                Err(e) => eprintln!("malai: {e}; could not request local forwarding"),
            }
        }
        for (spec, f) in remotes {
            self.remote(&spec, f, args).await?;
        }
        let agent_env = self.forward_agent(args).await;
        for (b, kind) in bound {
            tracing::info!(listen = %b.label(), "local forward listening");
            self.tasks.spawn(serve_listener(
                b,
                kind,
                self.opener.clone(),
                self.stop.clone(),
                self.tasks.clone(),
            ));
        }
        Ok(agent_env)
    }

    /// One `-R`: set up (or refused) before anything runs.
    async fn remote(
        &self,
        spec: &str,
        f: LocalForward,
        args: &SshArgs,
    ) -> Result<(), SessionError> {
        let listen = match &f.listen {
            Listen::Tcp { bind, port } => RemoteListen::Tcp {
                address: bind.clone().unwrap_or_else(|| "localhost".into()),
                port: *port,
            },
            Listen::Unix(p) => RemoteListen::Unix {
                path: p.display().to_string(),
            },
        };
        match start_remote(
            &self.opener,
            listen,
            f.to.clone(),
            &self.stop,
            &self.tasks,
            &self.remote,
        )
        .await
        {
            Ok((Some(port), _)) if matches!(f.listen, Listen::Tcp { port: 0, .. }) => {
                // ssh's line, so scripts that parse it keep working.
                eprintln!(
                    "Allocated port {port} for remote forward to {}",
                    f.to.describe()
                );
            }
            Ok(_) => {}
            Err(e) if args.exit_on_forward_failure => {
                return Err(SessionError::Refused(format!(
                    "remote port forwarding failed for {spec}: {e}"
                )));
            }
            Err(e) => eprintln!("Warning: remote port forwarding failed for {spec}: {e}"),
        }
        Ok(())
    }

    /// `-A`: only when we have an agent, like ssh. The remote socket's path, if set up.
    async fn forward_agent(&self, args: &SshArgs) -> Option<String> {
        let sock = std::env::var_os("SSH_AUTH_SOCK").filter(|s| !s.is_empty());
        let (true, Some(sock)) = (args.forward_agent, sock) else {
            return None;
        };
        let to = ForwardTarget::Unix {
            path: sock.to_string_lossy().into_owned(),
        };
        match start_remote(
            &self.opener,
            RemoteListen::Agent {},
            to,
            &self.stop,
            &self.tasks,
            &self.remote,
        )
        .await
        {
            Ok((_, path)) => path,
            Err(e) => {
                if !args.quiet {
                    eprintln!("malai: agent forwarding refused: {e}");
                }
                None
            }
        }
    }

    /// With `-N`, wait for a signal or the connection's end; else run the command (its
    /// exit status is ours).
    async fn main(
        &self,
        args: &SshArgs,
        agent_env: Option<String>,
        mut ready: Option<std::os::fd::OwnedFd>,
        interrupts: &mut Interrupts,
    ) -> Result<i32, SessionError> {
        if args.no_command {
            background::signal_ready(ready.take());
            // Resumable channels outlive the connection (new ones redial), and so do `-R`
            // and `-A` listeners on a resumable stream; one on a plain stream does not, so
            // with it a lost connection ends the run, as does a remote forward that could
            // not be resumed.
            let plain_remote = self.remote.plain.load(std::sync::atomic::Ordering::SeqCst);
            let ends_with_the_connection = plain_remote || !self.opener.outlives_the_connection();
            return tokio::select! {
                n = interrupts.recv() => Err(SessionError::Killed(n)),
                _ = self.link.lost(), if ends_with_the_connection => Err(SessionError::Lost("the connection to the server was lost".into())),
                why = self.remote.lost.fired() => Err(SessionError::Lost(why)),
            };
        }
        // Beside a command, a remote forward that cannot be resumed says so at once.
        self.remote
            .lost
            .say
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let pty = want_pty(args);
        let mut req = exec_request(args, pty);
        if let Some(path) = agent_env {
            req.env.push(("SSH_AUTH_SOCK".into(), path));
        }
        let opened = tokio::select! {
            s = self.opener.command(req) => s,
            n = interrupts.recv() => Err(SessionError::Killed(n)),
        };
        if opened.is_ok() {
            background::signal_ready(ready.take());
        }
        match opened? {
            Command::Plain(session) => run_session(*session, args, pty, interrupts).await,
            Command::Resumable(session) => {
                run_resumable_session(*session, args, pty, interrupts).await
            }
        }
    }

    /// Every task ends on `stop`; they hold the link, and the last holder closes the
    /// endpoint (flushing the connection's close to the server).
    async fn stop(&self) {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(LINGER, self.tasks.wait()).await;
    }
}

/// Ask the server to listen for one `-R`/`-A`; `Ok` once it does (with the port it got,
/// or the agent socket's path). A task then claims each connection it announces. A
/// resumable one (issue 18) outlives the connection; when it cannot be resumed (revoked,
/// the server restarted) `remote.lost` fires with the reason, which ends a `-N` run.
async fn start_remote(
    opener: &Opener,
    listen: RemoteListen,
    local: ForwardTarget,
    stop: &CancellationToken,
    tasks: &TaskTracker,
    remote: &RemoteState,
) -> Result<(Option<u16>, Option<String>), SessionError> {
    let what = crate::server::forward::describe_listen(&listen);
    let (send, mut recv): (
        Box<dyn tokio::io::AsyncWrite + Send + Unpin>,
        Box<dyn tokio::io::AsyncRead + Send + Unpin>,
    ) = match opener.remote_forward(listen).await? {
        Channel::Plain(send, recv) => {
            remote
                .plain
                .store(true, std::sync::atomic::Ordering::SeqCst);
            (Box::new(send), Box::new(recv))
        }
        resumable => {
            // The session runs on one end of a pipe; the events are read from the other.
            let (ours, theirs) = tokio::io::duplex(pump::PUMP_BUF);
            let (stop2, lost) = (stop.clone(), remote.lost.clone());
            tasks.spawn(async move {
                let (mut tr, mut tw) = tokio::io::split(theirs);
                if let Err(e) = resumable.run_reporting(&mut tr, &mut tw, &stop2).await {
                    tracing::info!(listen = %what, error = %e, "resumable remote forward ended");
                    lost.fire(format!("remote forward {what}: {e}"));
                }
            });
            let (r, w) = tokio::io::split(ours);
            (Box::new(w), Box::new(r))
        }
    };
    let first = tokio::time::timeout(
        crate::session::CONNECT_TIMEOUT,
        crate::protocol::read_json(&mut recv),
    )
    .await
    .map_err(|_| SessionError::Timeout("waiting for the remote listener"))??;
    let RemoteEvent::Listening { port, path } = first else {
        return Err(SessionError::Refused(
            "server sent a connection before listening".into(),
        ));
    };
    let (opener, stop2, tasks2) = (opener.clone(), stop.clone(), tasks.clone());
    let lost2 = remote.lost.clone();
    tasks.spawn(async move {
        // Holding `send` keeps the server's listener open; dropping it closes it.
        let _send = send;
        loop {
            let ev = tokio::select! {
                _ = stop2.cancelled() => break,
                ev = crate::protocol::read_json::<_, RemoteEvent>(&mut recv) => ev,
            };
            match ev {
                Ok(RemoteEvent::Connection { id }) => {
                    let (opener, local, stop3) = (opener.clone(), local.clone(), stop2.clone());
                    let lost = lost2.clone();
                    tasks2.spawn(async move {
                        tokio::select! {
                            _ = claim(&opener, id, &local, &stop3, &lost) => {}
                            _ = stop3.cancelled() => {}
                        }
                    });
                }
                Ok(RemoteEvent::Listening { .. }) => {}
                Err(e) => {
                    tracing::info!(error = %e, "remote forward ended");
                    break;
                }
            }
        }
    });
    Ok((port, path))
}

/// Move one claimed connection's bytes; a resumable one that cannot be resumed fires `lost`.
async fn carry<R, W>(
    channel: Channel,
    r: &mut R,
    w: &mut W,
    stop: &CancellationToken,
    what: &str,
    lost: &Lost,
) where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    if let Err(e) = channel.run_reporting(r, w, stop).await {
        tracing::info!(target = %what, error = %e, "resumable remote-forward connection ended");
        lost.fire(format!("remote-forward connection to {what}: {e}"));
    }
}

/// What the remote forwards of one run share with its main loop.
#[derive(Default)]
struct RemoteState {
    /// A remote forward got a plain stream (the server is older, or at its caps): it ends
    /// with the connection, and so must a `-N` run.
    plain: std::sync::atomic::AtomicBool,
    lost: Lost,
}

/// Fired (once, with the first reason) when a resumable remote forward, or a connection it
/// carried, could not be resumed: a `-N` run then ends with that one line; beside a
/// command (`say`) the line goes to stderr at once and the command runs on.
#[derive(Clone, Default)]
struct Lost {
    token: CancellationToken,
    why: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    say: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Lost {
    fn fire(&self, why: String) {
        let mut g = self.why.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_some() {
            return;
        }
        if self.say.load(std::sync::atomic::Ordering::SeqCst) {
            eprintln!("malai: {why}");
        }
        *g = Some(why);
        self.token.cancel();
    }

    async fn fired(&self) -> String {
        self.token.cancelled().await;
        let g = self.why.lock().unwrap_or_else(|e| e.into_inner());
        g.clone().unwrap_or_default()
    }
}

/// Claim a connection the server announced and connect it to `local`.
async fn claim(
    opener: &Opener,
    id: u64,
    local: &ForwardTarget,
    stop: &CancellationToken,
    lost: &Lost,
) {
    let channel = match opener.remote_connection(id).await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(error = %e, id, "cannot claim a remote-forward connection");
            return;
        }
    };
    let what = local.describe();
    match local {
        ForwardTarget::Tcp { host, port } => {
            match crate::server::forward::connect_tcp(host, *port).await {
                Ok(s) => {
                    let (mut r, mut w) = s.into_split();
                    carry(channel, &mut r, &mut w, stop, &what, lost).await;
                }
                Err(e) => {
                    eprintln!("malai: connect to {what} failed: {e}");
                    channel.abort();
                }
            }
        }
        ForwardTarget::Unix { path } => match crate::server::forward::connect_unix(path).await {
            Ok(s) => {
                let (mut r, mut w) = s.into_split();
                carry(channel, &mut r, &mut w, stop, &what, lost).await;
            }
            Err(e) => {
                eprintln!("malai: connect to {what} failed: {e}");
                channel.abort();
            }
        },
    }
}

/// `-f`: the parent's wait and the child's "ready".
mod background {
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use super::SessionError;

    /// The environment variable naming the child's end of the ready pipe.
    pub const FORK_FD: &str = "MALAI_SSH_FORK_FD";

    /// In the `-f` child: the ready pipe's write end (taken once; the variable is removed
    /// so nothing this process starts inherits the meaning).
    pub fn child_fd() -> Option<OwnedFd> {
        let v = std::env::var(FORK_FD).ok()?;
        // SAFETY: single-threaded at this point of the CLI (no other thread reads the
        // environment while the variable is removed).
        unsafe { std::env::remove_var(FORK_FD) };
        let fd: i32 = v.parse().ok().filter(|fd| *fd > 2)?;
        // The fd must be an open pipe we inherited; fstat tells.
        nix::sys::stat::fstat(unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }).ok()?;
        // SAFETY: the parent passed us this descriptor for our exclusive use.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Tell the waiting parent we are up (then it exits 0).
    pub fn signal_ready(fd: Option<OwnedFd>) {
        if let Some(fd) = fd {
            let mut f = std::fs::File::from(fd);
            let _ = f.write_all(b"1");
        }
    }

    /// Start this command line again as a background child and wait for its "ready".
    pub async fn fork_and_wait() -> Result<i32, SessionError> {
        let io =
            |e: std::io::Error| SessionError::Local(format!("cannot go to the background: {e}"));
        let (r, w) = nix::unistd::pipe().map_err(|e| io(e.into()))?;
        // The read end stays here only.
        nix::fcntl::fcntl(
            &r,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .map_err(|e| io(e.into()))?;
        let exe = std::env::current_exe().map_err(io)?;
        let mut cmd = std::process::Command::new(exe);
        use std::os::unix::process::CommandExt;
        cmd.args(std::env::args_os().skip(1))
            .env(FORK_FD, w.as_raw_fd().to_string())
            .stdin(std::process::Stdio::null())
            .process_group(0);
        let mut child = cmd.spawn().map_err(io)?;
        drop(w);
        let mut got = [0u8; 1];
        let n = tokio::task::spawn_blocking(move || std::fs::File::from(r).read(&mut got))
            .await
            .map_err(|e| io(std::io::Error::other(e)))?
            .unwrap_or(0);
        if n == 1 {
            return Ok(0);
        }
        // The child failed before it was up; its stderr (ours) said why.
        let st = tokio::task::spawn_blocking(move || child.wait())
            .await
            .map_err(|e| io(std::io::Error::other(e)))?
            .map_err(io)?;
        Ok(st.code().unwrap_or(255))
    }
}

/// `-W`: our stdin/stdout are the forwarded connection.
async fn stdio_forward(
    opener: &Opener,
    to: ForwardTarget,
    interrupts: &mut Interrupts,
) -> Result<i32, SessionError> {
    let channel = tokio::select! {
        s = opener.forward(to) => s?,
        n = interrupts.recv() => return Err(SessionError::Killed(n)),
    };
    let mut stdin = stdio::stdin();
    let mut stdout = stdio::stdout();
    let (mut send, mut recv) = match channel {
        Channel::Plain(send, recv) => (send, recv),
        Channel::Resumable(session) => {
            let close = CancellationToken::new();
            let run = session.run(&mut stdin, &mut stdout, &close);
            tokio::pin!(run);
            return tokio::select! {
                r = &mut run => r.map(|_| 0),
                n = interrupts.recv() => {
                    close.cancel();
                    // The session bounds its close by `session::resume::CLOSE_GRACE`.
                    let _ = tokio::time::timeout(LINGER, run).await;
                    Err(SessionError::Killed(n))
                }
            };
        }
    };
    tokio::select! {
        r = pump::both_ways(&mut stdin, &mut send, &mut recv, &mut stdout) => match r {
            Ok(_) => {
                if let SessionWrite::Iroh(s) = &mut send {
                    let _ = tokio::time::timeout(LINGER, s.acknowledged()).await;
                }
                Ok(0)
            }
            Err(e) => Err(SessionError::Lost(format!("stdio forward broke: {e}"))),
        },
        n = interrupts.recv() => Err(SessionError::Killed(n)),
    }
}

/// Accept local connections until `stop`; each becomes one `forward` stream.
async fn serve_listener(
    bound: Bound,
    kind: Kind,
    opener: Opener,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let label = bound.label();
    loop {
        let accepted: std::io::Result<Local> = tokio::select! {
            _ = stop.cancelled() => break,
            a = async {
                match &bound {
                    Bound::Tcp(l, _) => l.accept().await.map(|(s, a)| {
                        let _ = s.set_nodelay(true);
                        Local::Tcp(s, Some(a))
                    }),
                    Bound::Unix(l, _) => l.accept().await.map(|(s, _)| Local::Unix(s)),
                }
            } => a,
        };
        let local = match accepted {
            Ok(l) => l,
            Err(e) => {
                tracing::info!(listen = %label, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let (opener, kind, stop) = (opener.clone(), kind.clone(), stop.clone());
        // Ends on `stop` by itself (a resumable channel tells the server first).
        tasks.spawn(async move { one_connection(local, kind, &opener, &stop).await });
    }
    if let Bound::Unix(_, path) = &bound {
        let _ = std::fs::remove_file(path);
    }
}

enum Local {
    Tcp(tokio::net::TcpStream, Option<SocketAddr>),
    Unix(tokio::net::UnixStream),
}

async fn one_connection(local: Local, kind: Kind, opener: &Opener, stop: &CancellationToken) {
    match local {
        Local::Tcp(mut s, from) => {
            tracing::debug!(?from, "forwarded connection");
            forward_stream(&mut s, kind, opener, stop).await
        }
        Local::Unix(mut s) => forward_stream(&mut s, kind, opener, stop).await,
    }
}

async fn forward_stream<S>(local: &mut S, kind: Kind, opener: &Opener, stop: &CancellationToken)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let opening = async {
        let (to, socks_version) = match kind {
            Kind::Fixed(to) => (to, None),
            Kind::Socks => match socks::accept(local).await {
                Ok(c) => (
                    ForwardTarget::Tcp {
                        host: c.host,
                        port: c.port,
                    },
                    Some(c.version),
                ),
                Err(e) => {
                    tracing::info!(error = %e, "SOCKS request refused");
                    return None;
                }
            },
        };
        let what = to.describe();
        let channel = match opener.forward(to).await {
            Ok(c) => c,
            Err(e) => {
                // ssh's wording for a refused channel, so users recognise it.
                eprintln!("malai: channel to {what}: open failed: {e}");
                if let Some(v) = socks_version {
                    let why = match e {
                        SessionError::Denied(_) => socks::Failure::NotAllowed,
                        SessionError::Refused(_) => socks::Failure::Unreachable,
                        _ => socks::Failure::General,
                    };
                    let _ = socks::reply_failed(local, v, why).await;
                }
                return None;
            }
        };
        if let Some(v) = socks_version
            && socks::reply_ok(local, v).await.is_err()
        {
            channel.abort();
            return None;
        }
        Some((channel, what))
    };
    let opened = tokio::select! {
        o = opening => o,
        _ = stop.cancelled() => None,
    };
    let Some((channel, what)) = opened else {
        return;
    };
    let (mut lr, mut lw) = tokio::io::split(local);
    channel.run(&mut lr, &mut lw, stop, &what).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16) -> ForwardTarget {
        ForwardTarget::Tcp {
            host: host.into(),
            port,
        }
    }

    fn unix(p: &str) -> ForwardTarget {
        ForwardTarget::Unix { path: p.into() }
    }

    #[test]
    fn local_specs_in_every_openssh_form() {
        let l = |s: &str| parse_local(s).unwrap();
        assert_eq!(
            l("8080:localhost:80"),
            LocalForward {
                listen: Listen::Tcp {
                    bind: None,
                    port: 8080
                },
                to: tcp("localhost", 80)
            }
        );
        assert_eq!(
            l("0.0.0.0:8080:db:5432").listen,
            Listen::Tcp {
                bind: Some("0.0.0.0".into()),
                port: 8080
            }
        );
        assert_eq!(l("[::1]:8080:[fe80::1]:22").to, tcp("fe80::1", 22));
        assert_eq!(
            l("[::1]:8080:[fe80::1]:22").listen,
            Listen::Tcp {
                bind: Some("::1".into()),
                port: 8080
            }
        );
        assert_eq!(l("8080:/run/x.sock").to, unix("/run/x.sock"));
        assert_eq!(
            l("localhost:8080:/run/x.sock").listen,
            Listen::Tcp {
                bind: Some("localhost".into()),
                port: 8080
            }
        );
        let f = l("/tmp/l.sock:web:80");
        assert_eq!(f.listen, Listen::Unix("/tmp/l.sock".into()));
        assert_eq!(f.to, tcp("web", 80));
        let f = l("/tmp/l.sock:/run/r.sock");
        assert_eq!(f.listen, Listen::Unix("/tmp/l.sock".into()));
        assert_eq!(f.to, unix("/run/r.sock"));
    }

    #[test]
    fn bad_specs_are_errors() {
        for s in [
            "",
            "8080",
            "8080:host",
            "x:host:80",
            "8080:host:x",
            "8080:host:70000",
            "8080::80",
            "a:b:c:d:e",
            "[::1:8080:h:80",
        ] {
            assert!(parse_local(s).is_err(), "{s:?}");
        }
        assert_eq!(
            parse_local("8080:h:x").unwrap_err().to_string(),
            "bad port \"x\" in forwarding specification \"8080:h:x\""
        );
        assert!(parse_dynamic("x").is_err());
        assert!(parse_dynamic("a:b:c").is_err());
        assert!(parse_stdio("host").is_err());
        assert!(parse_stdio(":22").is_err());
    }

    #[test]
    fn dynamic_and_stdio_specs() {
        assert_eq!(
            parse_dynamic("1080").unwrap(),
            Listen::Tcp {
                bind: None,
                port: 1080
            }
        );
        assert_eq!(
            parse_dynamic("*:1080").unwrap(),
            Listen::Tcp {
                bind: Some("*".into()),
                port: 1080
            }
        );
        assert_eq!(parse_stdio("db:5432").unwrap(), tcp("db", 5432));
        assert_eq!(parse_stdio("[::1]:22").unwrap(), tcp("::1", 22));
    }

    #[test]
    fn bind_addresses_as_ssh_chooses_them() {
        assert_eq!(bind_addr(None, 80, false), "127.0.0.1:80");
        assert_eq!(bind_addr(None, 80, true), "0.0.0.0:80");
        assert_eq!(bind_addr(Some("localhost"), 80, true), "127.0.0.1:80");
        assert_eq!(bind_addr(Some("*"), 80, false), "0.0.0.0:80");
        assert_eq!(bind_addr(Some(""), 80, false), "0.0.0.0:80");
        assert_eq!(bind_addr(Some("::1"), 80, false), "[::1]:80");
        assert_eq!(bind_addr(Some("10.0.0.1"), 80, false), "10.0.0.1:80");
    }
}
