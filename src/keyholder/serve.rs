//! One control connection to the agent: hello, then one request — `status`, `stop`, or
//! `open` (a tunnel or an exec on the descriptors the CLI passed).
//!
//! An `open` is served like the CLI would serve it itself, but over the pooled connection:
//! the tunnel is the same raw pump as `malai ssh proxy`, the exec the same frames as
//! native exec. The passed descriptors are closed before the final message (`exit`,
//! `done`, `broken`), so whoever reads the caller's stdout sees EOF as soon as the CLI
//! exits. If the CLI disappears mid-request (killed), the request is abandoned at once.
//! An `open` for a cluster whose key another process holds (an agent's, while this
//! machine's server holds the key) is passed on to that holder whole ([`pass_on`]).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::fds::{self, PassedReader, PassedWriter};
use super::pool::{Pool, PooledStream};
use super::resume::{HolderResumable, Target};
use crate::config::names::TargetKind;
use crate::config::paths::Dirs;
use crate::control::protocol::{
    self, ControlError, FailKind, FrameReader, FromHolder, HolderHello, HolderStatus, OpenRequest,
    ToHolder, VERSION,
};
use crate::protocol::Request;
use crate::protocol::exec::ExitStatus;
use crate::protocol::exec_pump::{self, PumpEnd};
use crate::session::exec_resume::{self, ExecEnd};
use crate::session::open::Accepted;
use crate::session::resume::End;
use crate::session::{SessionError, resolve};
use crate::transport::pump;

/// A client that connects must say hello (and then its request) this quickly.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a finished tunnel waits for the server to acknowledge our last bytes.
const LINGER: Duration = Duration::from_secs(5);

/// What every control connection shares.
pub struct HolderContext {
    pub dirs: Dirs,
    pub pool: Arc<Pool>,
    pub socket: std::path::PathBuf,
    pub http: Option<std::net::SocketAddr>,
    /// Cancelled by `stop` or a signal: the whole agent shuts down.
    pub shutdown: CancellationToken,
    /// Whether `stop` may cancel it: the agent, yes; the server's control socket, no.
    pub stoppable: bool,
    /// The server's accepted connections, listed by `status` beside the pool's.
    pub inbound: Option<Arc<crate::keyholder::inbound::Inbound>>,
    /// What a caller's hello must carry (`control::token`) before any request is served.
    pub token: String,
}

impl HolderContext {
    pub fn hello(&self) -> HolderHello {
        HolderHello {
            version: VERSION,
            pid: std::process::id(),
            http: self.http,
        }
    }

    fn status(&self) -> HolderStatus {
        HolderStatus {
            version: VERSION,
            pid: std::process::id(),
            socket: self.socket.display().to_string(),
            http: self.http,
            clusters: self.pool.clusters(),
            not_served: self.pool.not_served(),
            dials: self.pool.dials(),
            requests: self.pool.requests(),
            connections: {
                let mut c = self.pool.connections();
                if let Some(i) = &self.inbound {
                    c.extend(i.list());
                }
                c
            },
            relays: self.pool.relays(),
            sessions: self
                .inbound
                .as_ref()
                .map(|i| i.sessions())
                .unwrap_or_default(),
        }
    }
}

/// Control connections served at once; more wait in the kernel's backlog. Each holds up to
/// three descriptors and a stream, so a runaway script can't exhaust the holder's fds.
const MAX_CONTROL_CONNECTIONS: usize = 256;

/// Serve control connections on `listener` (the agent's socket, and the server's for the
/// keys it holds) until `ctx.shutdown`.
pub async fn accept_loop(
    listener: tokio::net::UnixListener,
    ctx: Arc<HolderContext>,
    tracker: TaskTracker,
) {
    let shutdown = ctx.shutdown.clone();
    super::accept::serve(
        listener,
        "control socket",
        MAX_CONTROL_CONNECTIONS,
        shutdown,
        tracker.clone(),
        move |sock| connection(ctx.clone(), sock),
    )
    .await
}

/// Serve one accepted control connection until its request is done.
pub async fn connection(ctx: Arc<HolderContext>, mut sock: UnixStream) {
    // Only the user who runs the agent may use its keys.
    if let Err(e) = crate::localsock::check_caller(&sock) {
        tracing::warn!(error = %e, "control connection refused");
        return;
    }
    let mut reader = FrameReader::new();
    let first = tokio::time::timeout(HELLO_TIMEOUT, reader.next::<ToHolder>(&sock)).await;
    match first {
        Ok(Ok((ToHolder::Hello { version, token }, _))) => {
            if protocol::write(&mut sock, &FromHolder::Hello(ctx.hello()))
                .await
                .is_err()
                || version != VERSION
            {
                return;
            }
            if !crate::control::token::matches(&ctx.token, token.as_deref()) {
                // The same uid, but not a malai process of ours (e.g. sshd forwarding the
                // socket for a key without `restrict`): nothing beyond the hello.
                tracing::warn!("control connection without this holder's token; refused");
                let msg = "this socket's token was not presented; refused";
                let _ = reply_failed(&mut sock, FailKind::BadRequest, msg.into()).await;
                return;
            }
        }
        Ok(Ok(_)) => {
            tracing::info!("control connection did not start with hello");
            return;
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "control connection ended before hello");
            return;
        }
        Err(_) => return,
    }
    let next = tokio::time::timeout(HELLO_TIMEOUT, reader.next::<ToHolder>(&sock)).await;
    let (msg, passed) = match next {
        Ok(Ok(m)) => m,
        Ok(Err(ControlError::Closed)) => return, // a probe: hello was all it wanted
        Ok(Err(e)) => {
            let _ = reply_failed(&mut sock, FailKind::BadRequest, e.to_string()).await;
            return;
        }
        Err(_) => return,
    };
    match msg {
        ToHolder::Status => {
            let _ = protocol::write(&mut sock, &FromHolder::Status(ctx.status())).await;
        }
        ToHolder::Stop if !ctx.stoppable => {
            let msg = "this is malai ssh server's socket; stop the server itself (SIGTERM)";
            let _ = reply_failed(&mut sock, FailKind::BadRequest, msg.into()).await;
        }
        ToHolder::Stop => {
            tracing::info!("stop requested over the socket");
            let _ = protocol::write(&mut sock, &FromHolder::Stopping).await;
            ctx.shutdown.cancel();
        }
        ToHolder::Stream {
            cluster,
            peer,
            hints,
            request,
        } => stream(&ctx, sock, cluster, peer, hints, request).await,
        ToHolder::Release { cluster } => {
            ctx.pool.release(&cluster).await;
            let _ = protocol::write(&mut sock, &FromHolder::Released).await;
        }
        ToHolder::Open {
            host,
            request,
            stdin,
        } => open(&ctx, sock, reader, host, request, stdin, passed).await,
        ToHolder::Hello { .. } | ToHolder::Window { .. } | ToHolder::Finish => {
            let _ =
                reply_failed(&mut sock, FailKind::BadRequest, "unexpected message".into()).await;
        }
    }
}

/// `stream`: one request to a peer on the key we hold, its raw bytes relayed over the
/// control socket until both directions end (or either side breaks). A `forward`,
/// `remote-forward` or `remote-connection` that asks for resume and gets it is run here as a
/// resumable session (`keyholder::resume`): the caller (a native `-L`/`-D`/`-W`/`-R`/`-A`
/// channel) relays plain bytes and never sees an outage.
async fn stream(
    ctx: &HolderContext,
    mut sock: UnixStream,
    cluster: String,
    peer: crate::id52::Id52,
    hints: Vec<std::net::SocketAddr>,
    request: Request,
) {
    // Only forwarding streams may ask for resume here: their bytes (a remote forward's
    // event frames included) pass the caller unchanged, so the holder can run the
    // resumable session and relay plain bytes to it.
    let request = match request {
        Request::Tunnel { port, .. } => Request::Tunnel {
            port,
            resume: false,
        },
        Request::Exec(mut e) => {
            e.resume = false;
            Request::Exec(e)
        }
        other => other,
    };
    let opened = ctx
        .pool
        .open_raw_accepted(&cluster, peer, &hints, request)
        .await;
    let (mut s, accepted, target) = match opened {
        Ok(s) => s,
        Err(e) => {
            let _ = reply_failed(&mut sock, fail_kind(&e), e.to_string()).await;
            return;
        }
    };
    if protocol::write(&mut sock, &FromHolder::Opened)
        .await
        .is_err()
    {
        s.abort();
        return;
    }
    let (mut r, mut w) = sock.into_split();
    if let Accepted::Resumable(grant) = accepted {
        let session = HolderResumable::new(ctx.pool.clone(), target, "forward", s, grant);
        let close = CancellationToken::new();
        let run = session.run(&mut r, &mut w, &close);
        tokio::pin!(run);
        let ended = tokio::select! {
            e = &mut run => Some(e),
            _ = ctx.shutdown.cancelled() => None,
        };
        let ended = match ended {
            Some(e) => e,
            None => {
                close.cancel();
                tokio::time::timeout(CLOSE_GRACE, run)
                    .await
                    .unwrap_or(Ok(End::ClosedByUs))
            }
        };
        tracing::debug!(%cluster, %peer, end = ?ended, "resumable forward done");
        return;
    }
    let moved = tokio::select! {
        // The far end may stop reading before its last frames (an exec's exit status):
        // those still reach the caller.
        m = pump::relay(&mut r, &mut s.send, &mut s.recv, &mut w) => m,
        _ = ctx.shutdown.cancelled() => {
            s.abort();
            return;
        }
    };
    match moved {
        Ok(m) => {
            tracing::debug!(%cluster, %peer, up = m.up, down = m.down, "relayed stream done");
            let _ = tokio::time::timeout(LINGER, s.send.acknowledged()).await;
        }
        Err(e) => {
            tracing::info!(%cluster, %peer, error = %e, "relayed stream broke");
            s.abort();
        }
    }
}

async fn reply_failed(
    sock: &mut UnixStream,
    kind: FailKind,
    message: String,
) -> Result<(), ControlError> {
    protocol::write(sock, &FromHolder::Failed { kind, message }).await
}

fn fail_kind(e: &SessionError) -> FailKind {
    match e {
        SessionError::Denied(_) => FailKind::Denied,
        SessionError::Resolve(_) | SessionError::NotAServer(..) => FailKind::Resolve,
        _ => FailKind::Refused,
    }
}

/// The descriptors of an `open`, checked against what the request needs.
struct Passed {
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
}

fn split_fds(request: &OpenRequest, stdin: bool, fds: Vec<OwnedFd>) -> Result<Passed, String> {
    let want = usize::from(stdin) + request.output_fds();
    if fds.len() != want {
        return Err(format!(
            "expected {want} file descriptors, got {}",
            fds.len()
        ));
    }
    let mut it = fds.into_iter();
    let stdin = if stdin { it.next() } else { None };
    let stdout = it.next().ok_or("no stdout descriptor")?;
    let stderr = it.next();
    Ok(Passed {
        stdin,
        stdout,
        stderr,
    })
}

async fn open(
    ctx: &HolderContext,
    mut sock: UnixStream,
    mut reader: FrameReader,
    host: String,
    request: OpenRequest,
    stdin: bool,
    passed: Vec<OwnedFd>,
) {
    let passed = match split_fds(&request, stdin, passed) {
        Ok(p) => p,
        Err(m) => {
            let _ = reply_failed(&mut sock, FailKind::BadRequest, m).await;
            return;
        }
    };
    if let Some(holder) = held_elsewhere(ctx, &host).await {
        return pass_on(ctx, sock, reader, &holder, &host, request, passed).await;
    }
    let (stream, accepted, target) = match open_stream(ctx, &host, &request).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%host, error = %e, "open failed");
            let _ = reply_failed(&mut sock, fail_kind(&e), e.to_string()).await;
            return;
        }
    };
    if protocol::write(&mut sock, &FromHolder::Opened)
        .await
        .is_err()
    {
        return; // the CLI is gone; dropping the stream ends the request
    }
    let end = match (request, accepted) {
        (OpenRequest::Tunnel { .. }, Accepted::Resumable(grant)) => {
            let r = HolderResumable::new(ctx.pool.clone(), target, "tunnel", stream, grant);
            tunnel_resumable(ctx, &sock, &mut reader, r, passed, &host).await
        }
        (OpenRequest::Tunnel { .. }, _) => {
            tunnel(ctx, &sock, &mut reader, stream, passed, &host).await
        }
        (OpenRequest::Exec(e), Accepted::Resumable(grant)) => {
            let r = HolderResumable::new(ctx.pool.clone(), target, "exec", stream, grant);
            exec_resumable(ctx, &sock, &mut reader, r, passed, e.pty.is_some()).await
        }
        (OpenRequest::Exec(e), _) => {
            exec(ctx, &sock, &mut reader, stream, passed, e.pty.is_some()).await
        }
    };
    let _ = protocol::write(&mut sock, &end).await;
    let _ = sock.shutdown().await;
}

/// The control socket of the process holding the key of `host`'s cluster, when that is
/// not us (this machine's server, for an agent). `None` also when `host` does not resolve
/// to a server: [`open_stream`] says why.
async fn held_elsewhere(ctx: &HolderContext, host: &str) -> Option<std::path::PathBuf> {
    let resolved = resolve(&ctx.dirs, host).ok()?;
    if !matches!(resolved.target.kind, TargetKind::Server { .. }) {
        return None;
    }
    ctx.pool.held_by(&resolved.dir).await.ok().flatten()
}

/// An `open` for a cluster whose key another holder on this machine has (an agent asked
/// while the server holds the key): the request and the caller's descriptors go on to
/// that holder whole, and its frames come back to the caller. So it runs the session as if
/// the command had asked it directly: resumable on its pool, with its own end lines
/// (`the server restarted; …`), where relaying the stream's bytes could only be plain.
async fn pass_on(
    ctx: &HolderContext,
    mut sock: UnixStream,
    mut reader: FrameReader,
    holder: &std::path::Path,
    host: &str,
    request: OpenRequest,
    passed: Passed,
) {
    use std::os::fd::AsRawFd;
    let stdin = passed.stdin.is_some();
    let fds: Vec<std::os::fd::RawFd> = passed
        .stdin
        .iter()
        .chain(std::iter::once(&passed.stdout))
        .chain(passed.stderr.iter())
        .map(|f| f.as_raw_fd())
        .collect();
    let up = async {
        let mut c = crate::control::client::ControlClient::connect(holder)
            .await
            .map_err(|e| (FailKind::Refused, e.to_string()))?;
        match c.open(host, request, stdin, &fds).await {
            Ok(()) => Ok(c),
            Err(crate::control::client::RequestError::Failed { kind, message }) => {
                Err((kind, message))
            }
            Err(e) => Err((FailKind::Refused, e.to_string())),
        }
    }
    .await;
    // Our copies: the holder has its own now, and the caller's reader must see EOF when
    // the holder closes them, not when we do.
    drop(passed);
    let up = match up {
        Ok(c) => c,
        Err((kind, message)) => {
            tracing::info!(%host, error = %message, "open passed on to the key's holder failed");
            let _ = reply_failed(&mut sock, kind, message).await;
            return;
        }
    };
    tracing::info!(%host, holder = %holder.display(), "open passed on to the key's holder");
    if protocol::write(&mut sock, &FromHolder::Opened)
        .await
        .is_err()
    {
        return; // the CLI is gone; closing our socket to the holder abandons it there
    }
    let mut up = up.into_socket();
    let mut up_reader = FrameReader::new();
    loop {
        tokio::select! {
            m = reader.next::<ToHolder>(&sock) => match m {
                Ok((m @ (ToHolder::Window { .. } | ToHolder::Finish), _)) => {
                    if protocol::write(&mut up, &m).await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                // The CLI is gone: closing our socket to the holder abandons it there.
                Err(_) => return,
            },
            m = up_reader.next::<FromHolder>(&up) => {
                let end = match m {
                    Ok((m, _)) => m,
                    Err(_) => FromHolder::Broken {
                        message: format!("the key's holder ({}) went away", holder.display()),
                    },
                };
                // Every frame after `opened` is the last (`exit`, `done`, `broken`).
                let _ = protocol::write(&mut sock, &end).await;
                break;
            }
            _ = ctx.shutdown.cancelled() => return,
        }
    }
    let _ = sock.shutdown().await;
}

async fn open_stream(
    ctx: &HolderContext,
    host: &str,
    request: &OpenRequest,
) -> Result<(PooledStream, Accepted, Target), SessionError> {
    let resolved = resolve(&ctx.dirs, host)?;
    match &resolved.target.kind {
        TargetKind::Server { .. } => {}
        TargetKind::Service { .. } => {
            return Err(SessionError::NotAServer(host.to_string(), "service"));
        }
        TargetKind::Group { .. } => {
            return Err(SessionError::NotAServer(host.to_string(), "group"));
        }
    }
    let server = resolved
        .server()
        .cloned()
        .ok_or_else(|| SessionError::Local("server vanished".into()))?;
    let request = match request {
        OpenRequest::Tunnel { port, resume } => Request::Tunnel {
            port: *port,
            resume: *resume,
        },
        OpenRequest::Exec(e) => Request::Exec(e.clone()),
    };
    let (stream, accepted) = ctx.pool.open_accepted(&resolved, &server, request).await?;
    let target = Target {
        dir: resolved.dir.clone(),
        peer: server.id52,
        server: server.name.clone(),
        hints: server.addrs.clone(),
    };
    Ok((stream, accepted, target))
}

/// Why the request stopped early, from the control socket's point of view.
enum Control {
    /// The CLI closed the socket (it was killed): abandon the request.
    Gone,
    /// The CLI asked to end the upload (ssh's SIGHUP to its ProxyCommand).
    Finish,
}

/// Read control messages until the CLI closes the socket or asks to finish; window sizes
/// go to `windows`.
async fn watch_control(
    sock: &UnixStream,
    reader: &mut FrameReader,
    windows: Option<mpsc::Sender<(u16, u16)>>,
) -> Control {
    loop {
        match reader.next::<ToHolder>(sock).await {
            Ok((ToHolder::Window { cols, rows }, _)) => {
                if let Some(w) = &windows {
                    let _ = w.send((cols, rows)).await;
                }
            }
            Ok((ToHolder::Finish, _)) => return Control::Finish,
            Ok(_) => {}
            Err(_) => return Control::Gone,
        }
    }
}

async fn tunnel(
    ctx: &HolderContext,
    sock: &UnixStream,
    reader: &mut FrameReader,
    mut stream: PooledStream,
    passed: Passed,
    host: &str,
) -> FromHolder {
    let Some(stdin) = passed.stdin else {
        stream.abort();
        return FromHolder::Broken {
            message: "a tunnel needs stdin".into(),
        };
    };
    let mut input: PassedReader = fds::reader(stdin);
    let mut output: PassedWriter = fds::writer(passed.stdout);
    let result = {
        let pump = pump::both_ways(&mut input, &mut stream.send, &mut stream.recv, &mut output);
        tokio::select! {
            r = pump => Ok(r),
            c = watch_control(sock, reader, None) => Err(c),
            _ = ctx.shutdown.cancelled() => Err(Control::Gone),
        }
    };
    // Close our copies before answering: EOF for the caller's reader.
    drop(input);
    drop(output);
    match result {
        Ok(Ok(m)) => {
            tracing::info!(%host, up = m.up, down = m.down, "tunnel done");
            let _ = tokio::time::timeout(LINGER, stream.send.acknowledged()).await;
            FromHolder::Done
        }
        Ok(Err(e)) => {
            stream.abort();
            FromHolder::Broken {
                message: stream
                    .lost_reason()
                    .unwrap_or_else(|| format!("connection lost: {e}")),
            }
        }
        Err(Control::Finish) => {
            tracing::info!(%host, "CLI asked to finish: ending the tunnel");
            let _ = stream.send.shutdown().await;
            let _ =
                tokio::time::timeout(Duration::from_millis(500), stream.send.acknowledged()).await;
            FromHolder::Done
        }
        Err(Control::Gone) => {
            stream.abort();
            FromHolder::Broken {
                message: "abandoned".into(),
            }
        }
    }
}

/// How long a session closed by the command (or the holder stopping) may take to end; the
/// session bounds its own close (`session::resume::CLOSE_GRACE`), this is the backstop
/// (dropped, it still tells the server in the background).
const CLOSE_GRACE: Duration = Duration::from_secs(8);

/// [`tunnel`] on a resumable session: a lost connection is redialled through the pool and
/// the bytes go on where they stopped; the command waits on its socket meanwhile. Its
/// `finish` (ssh's SIGHUP: the session is over), its going away and the holder stopping
/// all close the session, so the server ends its side instead of keeping it detached.
async fn tunnel_resumable(
    ctx: &HolderContext,
    sock: &UnixStream,
    reader: &mut FrameReader,
    session: HolderResumable,
    passed: Passed,
    host: &str,
) -> FromHolder {
    let Some(stdin) = passed.stdin else {
        return FromHolder::Broken {
            message: "a tunnel needs stdin".into(),
        };
    };
    let mut input: PassedReader = fds::reader(stdin);
    let mut output: PassedWriter = fds::writer(passed.stdout);
    let close = CancellationToken::new();
    let result = {
        let run = session.run(&mut input, &mut output, &close);
        tokio::pin!(run);
        let watch = watch_control(sock, reader, None);
        tokio::pin!(watch);
        let mut asked = None;
        let grace = tokio::time::sleep(Duration::from_secs(86400 * 365));
        tokio::pin!(grace);
        loop {
            tokio::select! {
                r = &mut run => break Some(r),
                _ = &mut grace => break None,
                c = &mut watch, if asked.is_none() => {
                    asked = Some(matches!(c, Control::Finish));
                    close.cancel();
                    grace.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
                }
                _ = ctx.shutdown.cancelled(), if asked.is_none() => {
                    asked = Some(false);
                    close.cancel();
                    grace.as_mut().reset(tokio::time::Instant::now() + CLOSE_GRACE);
                }
            }
        }
        .map(|r| (r, asked))
    };
    // Close our copies before answering: EOF for the caller's reader.
    drop(input);
    drop(output);
    match result {
        Some((Ok(End::Finished), _)) => {
            tracing::info!(%host, "resumable tunnel done");
            FromHolder::Done
        }
        Some((Ok(_), Some(true))) => FromHolder::Done,
        Some((Ok(_), _)) | None => FromHolder::Broken {
            message: "abandoned".into(),
        },
        Some((Err(e), _)) => {
            tracing::info!(%host, error = %e, "resumable tunnel ended");
            FromHolder::Broken {
                message: e.to_string(),
            }
        }
    }
}

async fn exec(
    ctx: &HolderContext,
    sock: &UnixStream,
    reader: &mut FrameReader,
    mut stream: PooledStream,
    passed: Passed,
    pty: bool,
) -> FromHolder {
    let Some(stderr) = passed.stderr else {
        stream.abort();
        return FromHolder::Broken {
            message: "exec needs stderr".into(),
        };
    };
    let stdin = passed.stdin.map(fds::reader);
    let mut out = fds::writer(passed.stdout);
    let mut err = fds::writer(stderr);
    let (win_tx, win_rx) = mpsc::channel(8);
    let stop = async {
        tokio::select! {
            _ = watch_control(sock, reader, pty.then_some(win_tx)) => "abandoned".to_string(),
            _ = ctx.shutdown.cancelled() => "the agent is shutting down".to_string(),
        }
    };
    let result: Result<ExitStatus, String> = {
        let (send, recv) = (&mut stream.send, &mut stream.recv);
        exec_pump::run(recv, send, stdin, win_rx, &mut out, &mut err, stop)
            .await
            .map_err(|e| match e {
                PumpEnd::Stopped(message) => message,
                PumpEnd::Broken(e) => e.to_string(),
            })
    };
    // Close our copies (restoring their flags) before the CLI hears the end.
    drop(out);
    drop(err);
    match result {
        Ok(status) => FromHolder::Exit { status },
        Err(message) => {
            let message = stream.lost_reason().unwrap_or(message);
            stream.abort();
            FromHolder::Broken { message }
        }
    }
}

/// [`exec`] on a resumable session (`session::exec_resume`): a lost connection is
/// redialled through the pool and the command's stdio goes on where it stopped. The
/// command going away, or the holder stopping, closes the session (the server hangs the
/// command up).
async fn exec_resumable(
    ctx: &HolderContext,
    sock: &UnixStream,
    reader: &mut FrameReader,
    session: HolderResumable,
    passed: Passed,
    pty: bool,
) -> FromHolder {
    let Some(stderr) = passed.stderr else {
        return FromHolder::Broken {
            message: "exec needs stderr".into(),
        };
    };
    let stdin = passed.stdin.map(fds::reader);
    let mut out = fds::writer(passed.stdout);
    let mut err = fds::writer(stderr);
    let (win_tx, win_rx) = mpsc::channel(8);
    let stop = async {
        tokio::select! {
            _ = watch_control(sock, reader, pty.then_some(win_tx)) => "abandoned".to_string(),
            _ = ctx.shutdown.cancelled() => "the agent is shutting down".to_string(),
        }
    };
    let result = exec_resume::drive(session, stdin, win_rx, &mut out, &mut err, stop).await;
    // Close our copies (restoring their flags) before the CLI hears the end.
    drop(out);
    drop(err);
    match result {
        Ok(status) => FromHolder::Exit { status },
        Err(ExecEnd::Stopped(message)) => FromHolder::Broken { message },
        Err(ExecEnd::Broken(e)) => FromHolder::Broken {
            message: format!("the session ended before the command's exit status arrived: {e}"),
        },
        Err(ExecEnd::Session(e)) => FromHolder::Broken {
            message: e.to_string(),
        },
    }
}
