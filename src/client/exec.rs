//! Native exec: `malai ssh [ssh flags] <host> [command …]` without OpenSSH.
//!
//! Behaves like ssh where users can tell: stdout and stderr stay apart and binary-safe,
//! stdin streams with EOF (`-n`: none), the remote exit code is ours, 255 is malai's own
//! failure, a remote death by signal is 255 with ssh's message, `-t`/`-T` as ssh decides,
//! raw mode restored on every exit, SIGWINCH forwarded. A local SIGINT/SIGTERM/SIGHUP
//! closes the connection at once, so the server hangs up the remote command.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::ssh_args::{SshArgs, TtyChoice};
use super::tty::{RawMode, is_tty, window_size};
use crate::config::Server;
use crate::control::client::ControlClient;
use crate::protocol::Request;
use crate::protocol::exec::{ExecRequest, PtyRequest};
use crate::protocol::exec_pump::{self, PumpEnd, env_allowed, exit_code};
use crate::session::exec_resume::{self, ExecEnd};
use crate::session::{
    Resolved, Route, Session, SessionError, open_on, open_with, resume, via_resume,
};
use crate::transport::stdio;

/// Whether to ask for a pty, as ssh decides, plus ssh's warning when it can't.
pub fn want_pty(args: &SshArgs) -> bool {
    let stdin_tty = is_tty(0);
    match args.tty {
        TtyChoice::Never => false,
        TtyChoice::Force => true,
        TtyChoice::Want => {
            if !stdin_tty && !args.quiet {
                eprintln!("Pseudo-terminal will not be allocated because stdin is not a terminal.");
            }
            stdin_tty
        }
        TtyChoice::Auto => args.command.is_none() && stdin_tty,
    }
}

/// The environment ssh would send by default (`SendEnv LANG LC_*` in Debian's ssh_config).
fn local_env() -> Vec<(String, String)> {
    std::env::vars().filter(|(k, _)| env_allowed(k)).collect()
}

pub fn exec_request(args: &SshArgs, pty: bool) -> ExecRequest {
    let (cols, rows) = window_size().unwrap_or((80, 24));
    ExecRequest {
        command: args.command.clone(),
        env: local_env(),
        pty: pty.then(|| PtyRequest {
            term: std::env::var("TERM").unwrap_or_else(|_| "xterm".into()),
            cols,
            rows,
        }),
        // The server checks it: only its own user can run commands there.
        user: args.user.clone(),
        // Set by the caller that can resume (its own endpoint).
        resume: false,
    }
}

/// Run on one server with this process's stdio. Returns the exit code to use.
pub async fn run_one(
    resolved: &Resolved,
    server: &Server,
    args: &SshArgs,
    route: Option<Route>,
) -> Result<i32, SessionError> {
    let pty = want_pty(args);
    // Before anything starts remotely: a signal from here on ends the session cleanly
    // (and, once raw mode is on, with the terminal restored) instead of killing us; and a
    // window change from here on is sent, since the size in the request is read after.
    let mut interrupts = Interrupts::install()?;
    let mut req = exec_request(args, pty);
    // `-o` options reach the ssh child when the server is reached `ssh-via`. Over our own
    // endpoint the session is resumable when the server offers it (`session::resume`).
    let opened = tokio::select! {
        s = async {
            match route {
                Some(Route::Own(own)) if resume::enabled() => {
                    req.resume = true;
                    resume::open(own, resolved, server, Request::Exec(req)).await
                }
                Some(route) => open_on(route, resolved, server, Request::Exec(req))
                    .await
                    .map(|s| resume::Opened::Plain(Box::new(s))),
                // ssh-via: resumable too (a fresh ssh resumes it, `session::via_resume`).
                None if resume::enabled() => {
                    req.resume = true;
                    via_resume::open(resolved, server, Request::Exec(req), &args.options).await
                }
                None => open_with(resolved, server, Request::Exec(req), &args.options)
                    .await
                    .map(|s| resume::Opened::Plain(Box::new(s))),
            }
        } => s?,
        n = interrupts.recv() => return Err(SessionError::Killed(n)),
    };
    match opened {
        resume::Opened::Plain(session) => run_session(*session, args, pty, &mut interrupts).await,
        resume::Opened::Resumable(r) => run_resumable_session(*r, args, pty, &mut interrupts).await,
        resume::Opened::Via(r) => run_resumable_session(*r, args, pty, &mut interrupts).await,
    }
}

/// The exec part of [`run_one`] on an opened session (also used by `client::forward`,
/// which opens it on the connection that carries its forwards).
pub(crate) async fn run_session(
    session: Session,
    args: &SshArgs,
    pty: bool,
    interrupts: &mut Interrupts,
) -> Result<i32, SessionError> {
    let mut t = Terminal::enter(args, pty);
    let r = drive(
        session,
        t.stdin.take(),
        &mut t.out,
        &mut t.err,
        pty,
        interrupts,
    )
    .await;
    t.leave(args, pty, &r);
    r
}

/// [`run_session`] for a resumable session (`client::forward`'s remote command on its own
/// pool).
pub(crate) async fn run_resumable_session<S: exec_resume::RunResumable>(
    session: S,
    args: &SshArgs,
    pty: bool,
    interrupts: &mut Interrupts,
) -> Result<i32, SessionError> {
    let mut t = Terminal::enter(args, pty);
    let stdin = t.stdin.take();
    let r = drive_resumable(session, stdin, &mut t.out, &mut t.err, pty, interrupts).await;
    t.leave(args, pty, &r);
    r
}

/// This process's stdio with the terminal as ssh keeps it for a session: raw mode for a
/// pty on a terminal (restored on every exit, [`Terminal::leave`] or drop).
struct Terminal {
    raw: Option<RawMode>,
    stdin: Option<Box<dyn AsyncRead + Unpin + Send>>,
    out: stdio::Stdout,
    err: stdio::Stdout,
}

impl Terminal {
    fn enter(args: &SshArgs, pty: bool) -> Terminal {
        Terminal {
            raw: if pty && is_tty(0) {
                RawMode::enter()
            } else {
                None
            },
            stdin: if args.no_stdin {
                None
            } else {
                Some(Box::new(stdio::stdin()))
            },
            out: stdio::stdout(),
            err: stdio::stderr(),
        }
    }

    /// Restore the terminal, then ssh's closing line after an interactive session.
    fn leave(mut self, args: &SshArgs, pty: bool, r: &Result<i32, SessionError>) {
        drop(self.raw.take());
        if pty && !args.quiet && r.is_ok() {
            eprintln!("Connection to {} closed.\r", args.host);
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP, caught from the moment [`Interrupts::install`] runs. Install
/// before opening the session: a signal that arrives while connecting, or between raw mode
/// and the relay loop, then ends the session like ssh ("Killed by signal N.", exit 255, the
/// terminal restored) instead of killing the process with its default action.
///
/// SIGWINCH is caught from then on too: a window change between the request (which carries
/// the size) and the start of the relay loop is kept by the listener and sent when the loop
/// starts. Listening only once the loop ran lost it (the signal's default action ignores
/// it): a resize right after the remote command started never reached its pty.
pub struct Interrupts {
    term: Signal,
    int: Signal,
    hup: Signal,
    winch: Signal,
}

/// What [`Interrupts::next`] saw.
enum Interrupt {
    Signal(i32),
    WindowChanged,
}

impl Interrupts {
    pub fn install() -> Result<Self, SessionError> {
        Ok(Interrupts {
            term: signal(SignalKind::terminate()).map_err(io_err)?,
            int: signal(SignalKind::interrupt()).map_err(io_err)?,
            hup: signal(SignalKind::hangup()).map_err(io_err)?,
            winch: signal(SignalKind::window_change()).map_err(io_err)?,
        })
    }

    /// The next ending signal, or a window change when `winch` (a pty session).
    async fn next(&mut self, winch: bool) -> Interrupt {
        tokio::select! {
            _ = self.term.recv() => Interrupt::Signal(15),
            _ = self.int.recv() => Interrupt::Signal(2),
            _ = self.hup.recv() => Interrupt::Signal(1),
            Some(()) = self.winch.recv(), if winch => Interrupt::WindowChanged,
        }
    }

    /// The next of these signals, as its number.
    pub async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.term.recv() => 15,
            _ = self.int.recv() => 2,
            _ = self.hup.recv() => 1,
        }
    }
}

/// Move frames for one exec session until `Exit`. Shared by the direct path and groups.
pub async fn drive<O, E>(
    mut session: Session,
    stdin: Option<Box<dyn AsyncRead + Unpin + Send>>,
    out: &mut O,
    err: &mut E,
    pty: bool,
    interrupts: &mut Interrupts,
) -> Result<i32, SessionError>
where
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let (stop, win_rx) = until_signal(interrupts, pty);
    let result = {
        let (send, recv) = (&mut session.send, &mut session.recv);
        exec_pump::run(recv, send, stdin, win_rx, out, err, stop).await
    };
    match result {
        Ok(status) => {
            session.finish().await;
            Ok(exit_code(&status))
        }
        Err(PumpEnd::Stopped(n)) => {
            session.abort().await;
            Err(SessionError::Killed(n))
        }
        Err(PumpEnd::Broken(e)) => {
            let e = session.broken(SessionError::Lost(e.to_string()));
            session.abort().await;
            Err(e)
        }
    }
}

/// The next ending signal, window changes meanwhile sent on the channel returned (a pty
/// session's; without a pty its sender is dropped at once). Window changes reach the input
/// direction through a channel, as they do in the key holder (whose come from the CLI).
fn until_signal(
    interrupts: &mut Interrupts,
    pty: bool,
) -> (
    impl std::future::Future<Output = i32> + '_,
    tokio::sync::mpsc::Receiver<(u16, u16)>,
) {
    let (win_tx, win_rx) = tokio::sync::mpsc::channel(8);
    let win_tx = pty.then_some(win_tx);
    let stop = async move {
        loop {
            match interrupts.next(win_tx.is_some()).await {
                Interrupt::Signal(n) => return n,
                Interrupt::WindowChanged => {
                    if let (Some(tx), Some(size)) = (&win_tx, window_size()) {
                        let _ = tx.try_send(size);
                    }
                }
            }
        }
    };
    (stop, win_rx)
}

/// [`drive`] on a resumable session (`session::exec_resume`): a lost connection is
/// redialled and the command's stdio goes on where it stopped. A signal closes the session
/// (the server hangs the command up); the server restarting, or refusing the resume, ends
/// it with that error.
pub(crate) async fn drive_resumable<S, O, E>(
    session: S,
    stdin: Option<Box<dyn AsyncRead + Unpin + Send>>,
    out: &mut O,
    err: &mut E,
    pty: bool,
    interrupts: &mut Interrupts,
) -> Result<i32, SessionError>
where
    S: exec_resume::RunResumable,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let (stop, win_rx) = until_signal(interrupts, pty);
    match exec_resume::drive(session, stdin, win_rx, out, err, stop).await {
        Ok(status) => Ok(exit_code(&status)),
        Err(ExecEnd::Stopped(n)) => Err(SessionError::Killed(n)),
        Err(ExecEnd::Broken(e)) => Err(SessionError::Lost(format!(
            "the session ended before the command's exit status arrived: {e}"
        ))),
        Err(ExecEnd::Session(e)) => Err(e),
    }
}

fn io_err(e: std::io::Error) -> SessionError {
    SessionError::Local(format!("local i/o: {e}"))
}

/// `-G`: what ssh would print (`key value` lines), without resolving or connecting.
fn print_config(args: &SshArgs) {
    let user = args
        .user
        .clone()
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "root".into());
    println!("host {}", args.host);
    println!("hostname {}", args.host);
    println!("user {user}");
    println!("port {}", args.port.unwrap_or(22));
}

/// `malai ssh [flags] <host> [command …]`: one server or a group.
pub async fn run(dirs: &crate::config::paths::Dirs, argv: &[String]) -> Result<i32, SessionError> {
    let r = run_parsed(dirs, argv).await;
    if r.is_err() {
        // A signal may have come while a request was opening (the server may already have
        // started the command), or a session failed: close our connections now, not at the
        // server's idle limit. A resumable session's server ends it on this close rather
        // than keep it detached for a client that is gone.
        crate::session::own::close_all(crate::session::ABORT_CLOSE).await;
    }
    r
}

async fn run_parsed(
    dirs: &crate::config::paths::Dirs,
    argv: &[String],
) -> Result<i32, SessionError> {
    let args = super::ssh_args::parse(argv)?;
    if args.print_config {
        print_config(&args);
        return Ok(0);
    }
    for o in &args.options {
        tracing::info!(option = %o, "ssh option accepted and ignored");
    }
    if !args.ignored.is_empty() {
        tracing::info!(ignored = ?args.ignored, "ssh flags accepted and ignored");
    }
    let resolved = crate::session::resolve(dirs, &args.host)?;
    if args.forwards()
        && !matches!(
            resolved.target.kind,
            crate::config::names::TargetKind::Server { .. }
        )
    {
        return Err(SessionError::Usage(format!(
            "{} is not a server; forwarding (-L, -D, -W, -N) needs one server",
            args.host
        )));
    }
    match &resolved.target.kind {
        crate::config::names::TargetKind::Group { group } => {
            let group = group.clone();
            super::group::run(&resolved, &group, &args).await
        }
        crate::config::names::TargetKind::Service { .. } => {
            Err(SessionError::NotAServer(args.host.clone(), "service"))
        }
        crate::config::names::TargetKind::Server { .. } => {
            let server = resolved
                .server()
                .cloned()
                .ok_or_else(|| SessionError::Local("server vanished".into()))?;
            if args.forwards() {
                return super::forward::run(dirs, &resolved, &server, &args).await;
            }
            // ssh-via servers need no malai key: always direct. Otherwise the routing
            // policy: a key holder gets our stdio (handover), or this process dials.
            if server.ssh_via.is_some() {
                return run_one(&resolved, &server, &args, None).await;
            }
            match crate::session::route(&resolved.dir, Some(&resolved.config)).await? {
                Route::Holder(holder) => run_via_holder(holder, &args).await,
                own => {
                    // Nothing else follows the manager for this machine: check alongside.
                    let check = match &own {
                        Route::Own(o) if crate::sync::follow::catch_up_due(&resolved.dir) => {
                            Some(tokio::spawn(catch_up(resolved.dir.clone(), o.clone())))
                        }
                        _ => None,
                    };
                    let r = run_one(&resolved, &server, &args, Some(own)).await;
                    if let Some(c) = check {
                        let _ = c.await;
                    }
                    r
                }
            }
        }
    }
}

/// The config-sync check of a command on its own endpoint (`sync::follow::catch_up`); it
/// keeps the endpoint open until done and then lets it go like the session does.
async fn catch_up(
    dir: crate::config::store::ClusterDir,
    own: std::sync::Arc<crate::session::own::OwnEndpoint>,
) {
    let dialer = crate::session::dial::Dialer::Node(own.node.clone());
    crate::sync::follow::catch_up(&dir, &dialer).await;
    own.done(std::time::Duration::from_secs(1)).await;
}

/// [`run_one`] through a key holder (the agent, or the server): it gets our stdio and uses
/// its pooled connection; we keep the terminal (raw mode, window size) and the exit status.
async fn run_via_holder(holder: ControlClient, args: &SshArgs) -> Result<i32, SessionError> {
    let pty = want_pty(args);
    let mut req = exec_request(args, pty);
    // The holder runs it resumable when the server offers it (`keyholder::resume`).
    req.resume = resume::enabled();
    let r = super::handover::exec(holder, &args.host, req, !args.no_stdin, || {
        if pty && is_tty(0) {
            RawMode::enter()
        } else {
            None
        }
    })
    .await;
    if pty && !args.quiet && r.is_ok() {
        eprintln!("Connection to {} closed.\r", args.host);
    }
    r
}
