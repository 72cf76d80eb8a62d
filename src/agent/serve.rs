//! One control connection to the agent: hello, then one request — `status`, `stop`, or
//! `open` (a tunnel or an exec on the descriptors the CLI passed).
//!
//! An `open` is served like the CLI would serve it itself, but over the pooled connection:
//! the tunnel is the same raw pump as `malai ssh proxy`, the exec the same frames as
//! native exec. The passed descriptors are closed before the final message (`exit`,
//! `done`, `broken`), so whoever reads the caller's stdout sees EOF as soon as the CLI
//! exits. If the CLI disappears mid-request (killed), the request is abandoned at once.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::fds::{self, PassedReader, PassedWriter};
use super::pool::{Pool, PooledStream};
use super::protocol::{
    self, AgentHello, AgentStatus, ControlError, FailKind, FrameReader, FromAgent, OpenRequest,
    ToAgent, VERSION,
};
use crate::client::{ClientError, resolve};
use crate::config::names::TargetKind;
use crate::config::paths::Dirs;
use crate::protocol::Request;
use crate::protocol::exec::{self as frames, DataKind, ExitStatus, Frame, MAX_DATA};
use crate::transport::pump;

/// A client that connects must say hello (and then its request) this quickly.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a finished tunnel waits for the server to acknowledge our last bytes.
const LINGER: Duration = Duration::from_secs(5);

/// What every control connection shares.
pub struct AgentContext {
    pub dirs: Dirs,
    pub pool: Pool,
    pub socket: std::path::PathBuf,
    pub http: Option<std::net::SocketAddr>,
    /// Cancelled by `stop` or a signal: the whole agent shuts down.
    pub shutdown: CancellationToken,
    /// Whether `stop` may cancel it: the agent, yes; the server's control socket, no.
    pub stoppable: bool,
    /// The server's accepted connections, listed by `status` beside the pool's.
    pub inbound: Option<Arc<crate::server::Inbound>>,
}

impl AgentContext {
    pub fn hello(&self) -> AgentHello {
        AgentHello {
            version: VERSION,
            pid: std::process::id(),
            http: self.http,
        }
    }

    fn status(&self) -> AgentStatus {
        AgentStatus {
            version: VERSION,
            pid: std::process::id(),
            socket: self.socket.display().to_string(),
            http: self.http,
            clusters: self.pool.clusters(),
            dials: self.pool.dials(),
            requests: self.pool.requests(),
            connections: {
                let mut c = self.pool.connections();
                if let Some(i) = &self.inbound {
                    c.extend(i.list());
                }
                c
            },
        }
    }
}

/// Serve one accepted control connection until its request is done.
pub async fn connection(ctx: Arc<AgentContext>, mut sock: UnixStream) {
    // Only the user who runs the agent may use its keys.
    match sock.peer_cred() {
        Ok(c) if c.uid() == nix::unistd::geteuid().as_raw() => {}
        Ok(c) => {
            tracing::warn!(
                uid = c.uid(),
                "control connection from another user refused"
            );
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "no peer credentials; refusing control connection");
            return;
        }
    }
    let mut reader = FrameReader::new();
    let first = tokio::time::timeout(HELLO_TIMEOUT, reader.next::<ToAgent>(&sock)).await;
    match first {
        Ok(Ok((ToAgent::Hello { version }, _))) => {
            if protocol::write(&mut sock, &FromAgent::Hello(ctx.hello()))
                .await
                .is_err()
                || version != VERSION
            {
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
    let next = tokio::time::timeout(HELLO_TIMEOUT, reader.next::<ToAgent>(&sock)).await;
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
        ToAgent::Status => {
            let _ = protocol::write(&mut sock, &FromAgent::Status(ctx.status())).await;
        }
        ToAgent::Stop if !ctx.stoppable => {
            let msg = "this is malai ssh server's socket; stop the server itself (SIGTERM)";
            let _ = reply_failed(&mut sock, FailKind::BadRequest, msg.into()).await;
        }
        ToAgent::Stop => {
            tracing::info!("stop requested over the socket");
            let _ = protocol::write(&mut sock, &FromAgent::Stopping).await;
            ctx.shutdown.cancel();
        }
        ToAgent::Stream {
            cluster,
            peer,
            hints,
            request,
        } => stream(&ctx, sock, cluster, peer, hints, request).await,
        ToAgent::Release { cluster } => {
            ctx.pool.release(&cluster).await;
            let _ = protocol::write(&mut sock, &FromAgent::Released).await;
        }
        ToAgent::Open {
            host,
            request,
            stdin,
        } => open(&ctx, sock, reader, host, request, stdin, passed).await,
        ToAgent::Hello { .. } | ToAgent::Window { .. } | ToAgent::Finish => {
            let _ =
                reply_failed(&mut sock, FailKind::BadRequest, "unexpected message".into()).await;
        }
    }
}

/// `stream`: one request to a peer on the key we hold, its raw bytes relayed over the
/// control socket until both directions end (or either side breaks).
async fn stream(
    ctx: &AgentContext,
    mut sock: UnixStream,
    cluster: String,
    peer: crate::id52::Id52,
    hints: Vec<std::net::SocketAddr>,
    request: Request,
) {
    let mut s = match ctx.pool.open_raw(&cluster, peer, &hints, request).await {
        Ok(s) => s,
        Err(e) => {
            let _ = reply_failed(&mut sock, fail_kind(&e), e.to_string()).await;
            return;
        }
    };
    if protocol::write(&mut sock, &FromAgent::Opened)
        .await
        .is_err()
    {
        s.abort();
        return;
    }
    let (mut r, mut w) = sock.into_split();
    let moved = tokio::select! {
        m = pump::both_ways(&mut r, &mut s.send, &mut s.recv, &mut w) => m,
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
    protocol::write(sock, &FromAgent::Failed { kind, message }).await
}

fn fail_kind(e: &ClientError) -> FailKind {
    match e {
        ClientError::Denied(_) => FailKind::Denied,
        ClientError::Resolve(_) | ClientError::NotAServer(..) => FailKind::Resolve,
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
    ctx: &AgentContext,
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
    let stream = match open_stream(ctx, &host, &request).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(%host, error = %e, "open failed");
            let _ = reply_failed(&mut sock, fail_kind(&e), e.to_string()).await;
            return;
        }
    };
    if protocol::write(&mut sock, &FromAgent::Opened)
        .await
        .is_err()
    {
        return; // the CLI is gone; dropping the stream ends the request
    }
    let end = match request {
        OpenRequest::Tunnel { .. } => tunnel(ctx, &sock, &mut reader, stream, passed, &host).await,
        OpenRequest::Exec(e) => {
            exec(ctx, &sock, &mut reader, stream, passed, e.pty.is_some()).await
        }
    };
    let _ = protocol::write(&mut sock, &end).await;
    let _ = sock.shutdown().await;
}

async fn open_stream(
    ctx: &AgentContext,
    host: &str,
    request: &OpenRequest,
) -> Result<PooledStream, ClientError> {
    let resolved = resolve(&ctx.dirs, host)?;
    match &resolved.target.kind {
        TargetKind::Server { .. } => {}
        TargetKind::Service { .. } => {
            return Err(ClientError::NotAServer(host.to_string(), "service"));
        }
        TargetKind::Group { .. } => return Err(ClientError::NotAServer(host.to_string(), "group")),
    }
    let server = resolved
        .server()
        .cloned()
        .ok_or_else(|| ClientError::Refused("server vanished".into()))?;
    let request = match request {
        OpenRequest::Tunnel { port } => Request::Tunnel { port: *port },
        OpenRequest::Exec(e) => Request::Exec(e.clone()),
    };
    ctx.pool.open(&resolved, &server, request).await
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
        match reader.next::<ToAgent>(sock).await {
            Ok((ToAgent::Window { cols, rows }, _)) => {
                if let Some(w) = &windows {
                    let _ = w.send((cols, rows)).await;
                }
            }
            Ok((ToAgent::Finish, _)) => return Control::Finish,
            Ok(_) => {}
            Err(_) => return Control::Gone,
        }
    }
}

async fn tunnel(
    ctx: &AgentContext,
    sock: &UnixStream,
    reader: &mut FrameReader,
    mut stream: PooledStream,
    passed: Passed,
    host: &str,
) -> FromAgent {
    let Some(stdin) = passed.stdin else {
        stream.abort();
        return FromAgent::Broken {
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
            FromAgent::Done
        }
        Ok(Err(e)) => {
            stream.abort();
            FromAgent::Broken {
                message: match stream.server_restarted() {
                    true => format!("connection lost: {}", crate::client::liveness::RESTARTED),
                    false => format!("connection lost: {e}"),
                },
            }
        }
        Err(Control::Finish) => {
            tracing::info!(%host, "CLI asked to finish: ending the tunnel");
            let _ = stream.send.shutdown().await;
            let _ =
                tokio::time::timeout(Duration::from_millis(500), stream.send.acknowledged()).await;
            FromAgent::Done
        }
        Err(Control::Gone) => {
            stream.abort();
            FromAgent::Broken {
                message: "abandoned".into(),
            }
        }
    }
}

async fn exec(
    ctx: &AgentContext,
    sock: &UnixStream,
    reader: &mut FrameReader,
    mut stream: PooledStream,
    passed: Passed,
    pty: bool,
) -> FromAgent {
    let Some(stderr) = passed.stderr else {
        stream.abort();
        return FromAgent::Broken {
            message: "exec needs stderr".into(),
        };
    };
    let stdin = passed.stdin.map(fds::reader);
    let mut out = fds::writer(passed.stdout);
    let mut err = fds::writer(stderr);
    let (win_tx, win_rx) = mpsc::channel(8);
    let result: Result<ExitStatus, String> = {
        let input = pump_input(stdin, win_rx, &mut stream.send);
        let output = crate::client::exec::pump_output(&mut stream.recv, &mut out, &mut err);
        let control = watch_control(sock, reader, pty.then_some(win_tx));
        tokio::pin!(input, output, control);
        let mut input_done = false;
        loop {
            tokio::select! {
                r = &mut output => break r.map_err(|e| e.to_string()),
                r = &mut input, if !input_done => {
                    input_done = true;
                    // The server stops reading stdin once the command has exited, which
                    // can race our last stdin frame: the exit status (or, if the
                    // connection really died, an error) still comes from `output`.
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "stdin direction ended early");
                    }
                }
                _ = &mut control => break Err("abandoned".into()),
                _ = ctx.shutdown.cancelled() => break Err("the agent is shutting down".into()),
            }
        }
    };
    // Close our copies (restoring their flags) before the CLI hears the end.
    drop(out);
    drop(err);
    match result {
        Ok(status) => FromAgent::Exit { status },
        Err(message) => {
            let message = match stream.server_restarted() {
                true => format!("connection lost: {}", crate::client::liveness::RESTARTED),
                false => message,
            };
            stream.abort();
            FromAgent::Broken { message }
        }
    }
}

/// Stdin (and window changes) → exec frames. Ends after `StdinEof` once no more window
/// changes can come.
async fn pump_input(
    stdin: Option<PassedReader>,
    mut windows: mpsc::Receiver<(u16, u16)>,
    w: &mut super::pool::PoolSend,
) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt;
    let io = |e: frames::ExecFrameError| match e {
        frames::ExecFrameError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    };
    let mut stdin = stdin;
    let mut buf = vec![0u8; MAX_DATA];
    if stdin.is_none() {
        frames::write(w, &Frame::StdinEof).await.map_err(io)?;
    }
    let mut windows_open = true;
    loop {
        tokio::select! {
            n = async {
                match stdin.as_mut() {
                    Some(s) => s.read(&mut buf).await,
                    None => std::future::pending().await,
                }
            } => {
                match n? {
                    0 => {
                        frames::write(w, &Frame::StdinEof).await.map_err(io)?;
                        stdin = None;
                        if !windows_open {
                            return Ok(());
                        }
                    }
                    n => frames::write_data(w, DataKind::Stdin, &buf[..n]).await.map_err(io)?,
                }
            }
            size = windows.recv(), if windows_open => match size {
                Some((cols, rows)) => frames::write(w, &Frame::Window { cols, rows }).await.map_err(io)?,
                None => {
                    windows_open = false;
                    if stdin.is_none() {
                        return Ok(());
                    }
                }
            },
        }
    }
}
