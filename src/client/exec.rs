//! Native exec: `malai ssh [ssh flags] <host> [command …]` without OpenSSH.
//!
//! Behaves like ssh where users can tell: stdout and stderr stay apart and binary-safe,
//! stdin streams with EOF (`-n`: none), the remote exit code is ours, 255 is malai's own
//! failure, a remote death by signal is 255 with ssh's message, `-t`/`-T` as ssh decides,
//! raw mode restored on every exit, SIGWINCH forwarded. A local SIGINT/SIGTERM/SIGHUP
//! closes the connection at once, so the server hangs up the remote command.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::signal::unix::{Signal, SignalKind, signal};

use super::ssh_args::{SshArgs, TtyChoice};
use super::tty::{RawMode, is_tty, window_size};
use super::{ClientError, Resolved, Session, open_with};
use crate::config::Server;
use crate::protocol::Request;
use crate::protocol::exec::{self as frames, ExecRequest, ExitStatus, Frame, MAX_DATA, PtyRequest};
use crate::transport::stdio;

/// What the remote side ended with, mapped to our exit code.
pub fn exit_code(st: &ExitStatus) -> i32 {
    match st {
        ExitStatus::Code(c) => *c,
        // ssh: a remote killed by a signal makes ssh exit 255.
        ExitStatus::Signal(_) => 255,
    }
}

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
    std::env::vars()
        .filter(|(k, _)| crate::server::process::env_allowed(k))
        .collect()
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
    }
}

/// Run on one server with this process's stdio. Returns the exit code to use.
pub async fn run_one(
    resolved: &Resolved,
    server: &Server,
    args: &SshArgs,
) -> Result<i32, ClientError> {
    let pty = want_pty(args);
    let req = exec_request(args, pty);
    // Before anything starts remotely: a signal from here on ends the session cleanly
    // (and, once raw mode is on, with the terminal restored) instead of killing us.
    let mut interrupts = Interrupts::install()?;
    // `-o` options reach the ssh child when the server is reached `ssh-via`.
    let session = tokio::select! {
        s = open_with(resolved, server, Request::Exec(req), &args.options) => s?,
        n = interrupts.recv() => return Err(ClientError::Killed(n)),
    };
    run_session(session, args, pty, &mut interrupts).await
}

/// The exec part of [`run_one`] on an opened session (also used by `client::forward`,
/// which opens it on the connection that carries its forwards).
pub(crate) async fn run_session(
    session: Session,
    args: &SshArgs,
    pty: bool,
    interrupts: &mut Interrupts,
) -> Result<i32, ClientError> {
    let _raw = if pty && is_tty(0) {
        RawMode::enter()
    } else {
        None
    };
    let stdin: Option<Box<dyn AsyncRead + Unpin + Send>> = if args.no_stdin {
        None
    } else {
        Some(Box::new(stdio::stdin()))
    };
    let mut out = stdio::stdout();
    let mut err = stdio::stderr();
    let r = drive(session, stdin, &mut out, &mut err, pty, interrupts).await;
    drop(_raw);
    if pty && !args.quiet && r.is_ok() {
        // ssh's closing line for interactive sessions.
        eprintln!("Connection to {} closed.\r", args.host);
    }
    r
}

/// SIGTERM, SIGINT and SIGHUP, caught from the moment [`Interrupts::install`] runs. Install
/// before opening the session: a signal that arrives while connecting, or between raw mode
/// and the relay loop, then ends the session like ssh ("Killed by signal N.", exit 255, the
/// terminal restored) instead of killing the process with its default action.
pub struct Interrupts {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Interrupts {
    pub fn install() -> Result<Self, ClientError> {
        Ok(Interrupts {
            term: signal(SignalKind::terminate()).map_err(io_err)?,
            int: signal(SignalKind::interrupt()).map_err(io_err)?,
            hup: signal(SignalKind::hangup()).map_err(io_err)?,
        })
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
) -> Result<i32, ClientError>
where
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    let result = {
        let (send, recv) = (&mut session.send, &mut session.recv);
        let input = pump_input(stdin, send, pty);
        let output = pump_output(recv, out, err);
        tokio::pin!(input, output);
        let mut input_done = false;
        loop {
            tokio::select! {
                r = &mut output => break r,
                r = &mut input, if !input_done => {
                    input_done = true;
                    // The server stops reading stdin once the command has exited, which
                    // can race our last stdin frame: the exit status (or, if the
                    // connection really died, an error) still comes from `output`.
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "stdin direction ended early");
                    }
                }
                n = interrupts.recv() => break Err(ClientError::Killed(n)),
            }
        }
    };
    match result {
        Ok(status) => {
            session.finish().await;
            Ok(exit_code(&status))
        }
        Err(e) => {
            let e = match e {
                ClientError::Killed(_) => e,
                e => session.broken(e),
            };
            session.abort().await;
            Err(e)
        }
    }
}

fn io_err(e: std::io::Error) -> ClientError {
    ClientError::Refused(format!("local i/o: {e}"))
}

/// stdin (and window changes) → frames. Ends after sending `StdinEof`; window changes
/// keep flowing after that while a pty is in use.
async fn pump_input<W: AsyncWrite + Unpin>(
    stdin: Option<Box<dyn AsyncRead + Unpin + Send>>,
    w: &mut W,
    pty: bool,
) -> std::io::Result<()> {
    let mut winch = if pty {
        signal(SignalKind::window_change()).ok()
    } else {
        None
    };
    let mut stdin = stdin;
    let mut buf = vec![0u8; MAX_DATA];
    let mut eof_sent = false;
    if stdin.is_none() {
        send(w, &Frame::StdinEof).await?;
        eof_sent = true;
    }
    loop {
        tokio::select! {
            n = async { match stdin.as_mut() { Some(s) => s.read(&mut buf).await, None => std::future::pending().await } }, if !eof_sent => {
                match n? {
                    0 => {
                        send(w, &Frame::StdinEof).await?;
                        eof_sent = true;
                        stdin = None;
                        if winch.is_none() {
                            return Ok(());
                        }
                    }
                    n => frames::write_data(w, frames::DataKind::Stdin, &buf[..n]).await.map_err(|e| std::io::Error::other(e.to_string()))?,
                }
            }
            Some(()) = async { match winch.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                if let Some((cols, rows)) = window_size() {
                    send(w, &Frame::Window { cols, rows }).await?;
                }
            }
            else => return Ok(()),
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    frames::write(w, f).await.map_err(|e| match e {
        frames::ExecFrameError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    })
}

/// Frames → our stdout/stderr, until `Exit`. Also the agent's, with passed descriptors.
pub(crate) async fn pump_output<R, O, E>(
    r: &mut R,
    out: &mut O,
    err: &mut E,
) -> Result<ExitStatus, ClientError>
where
    R: AsyncRead + Unpin,
    O: AsyncWrite + Unpin,
    E: AsyncWrite + Unpin,
{
    loop {
        let frame = match frames::read(r).await {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Err(ClientError::Refused(
                    "connection closed before the command's exit status arrived".into(),
                ));
            }
            Err(e) => return Err(ClientError::Refused(format!("connection lost: {e}"))),
        };
        match frame {
            Frame::Stdout(d) => {
                // A closed stdout (`| head`) is not our failure: drop the rest like ssh.
                let _ = out.write_all(&d).await;
            }
            Frame::Stderr(d) => {
                let _ = err.write_all(&d).await;
            }
            Frame::Exit(st) => {
                let _ = out.flush().await;
                let _ = err.flush().await;
                return Ok(st);
            }
            other => {
                return Err(ClientError::Refused(format!(
                    "server sent an unexpected frame: {other:?}"
                )));
            }
        }
    }
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
pub async fn run(dirs: &crate::config::paths::Dirs, argv: &[String]) -> Result<i32, ClientError> {
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
    let resolved = super::resolve(dirs, &args.host)?;
    if args.forwards()
        && !matches!(
            resolved.target.kind,
            crate::config::names::TargetKind::Server { .. }
        )
    {
        return Err(ClientError::Refused(format!(
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
            Err(ClientError::NotAServer(args.host.clone(), "service"))
        }
        crate::config::names::TargetKind::Server { .. } => {
            let server = resolved
                .server()
                .cloned()
                .ok_or_else(|| ClientError::Refused("server vanished".into()))?;
            if args.forwards() {
                return super::forward::run(&resolved, &server, &args).await;
            }
            // ssh-via servers need no malai key: always direct.
            if server.ssh_via.is_none()
                && let crate::agent::client::Route::Agent(agent) =
                    crate::agent::client::route(&resolved.dir).await?
            {
                return run_via_agent(agent, &args).await;
            }
            run_one(&resolved, &server, &args).await
        }
    }
}

/// [`run_one`] through the agent (`MALAI_SSH_AGENT`): it gets our stdio and uses its
/// pooled connection; we keep the terminal (raw mode, window size) and the exit status.
async fn run_via_agent(
    agent: crate::agent::client::AgentClient,
    args: &SshArgs,
) -> Result<i32, ClientError> {
    let pty = want_pty(args);
    let req = exec_request(args, pty);
    let r = crate::agent::client::exec(agent, &args.host, req, !args.no_stdin, || {
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
