//! `malai ssh stdinserver <identity>`: the malai protocol over OpenSSH, zrepl style.
//!
//! An admin binds an SSH key to `command="malai ssh stdinserver alice@acme",restrict` in
//! `authorized_keys` (see `contrib/authorized_keys`). sshd runs that forced command with
//! the SSH channel as its stdin/stdout; the command connects to the running
//! `malai ssh server`'s unix socket (`<runtime dir>/server.sock`), passes those two fds
//! (SCM_RIGHTS), and waits. The server serves one malai request on them exactly as if
//! `alice` had connected over iroh — same `request::handle`, same ACL — then reports an
//! exit status, which the forced command exits with.
//!
//! Trust: whoever can connect to the socket can claim any identity, so the socket is only
//! as safe as its folder. Like zrepl, the server refuses to start unless the runtime dir is
//! a real directory owned by it with no group/other permissions, and it only talks to
//! peers with its own uid (SO_PEERCRED). The identity names one principal completely:
//! `alias@cluster` or an id52 ([`Identity`]); a bare alias is refused (a server may serve
//! several clusters, each with its own `alice`), one unknown to the cluster is denied, and
//! a request whose header names another cluster than the pinned one is denied. `SSH_ORIGINAL_COMMAND` is ignored: the protocol
//! header says what to do.
//!
//! Stdout of the forced command is the protocol stream: nothing else is ever written to
//! it. Wire on the unix socket: forced command → server, one message with the fds and JSON
//! [`Hello`]; server → forced command, JSON [`Outcome`] when the request is over.

use std::io::Cursor;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::ClusterState;
use super::request::{self, reply};
use crate::config::paths::Dirs;
use crate::id52::Id52;
use crate::protocol::{self, FrameError, HEADER_TIMEOUT, Header, MAGIC, Response, VERSION};
use crate::transport::fdpass::{self, FdPassError};
use crate::transport::fdstream::{FdReader, FdWriter};

/// The server's socket, in the runtime dir.
pub const SOCKET_NAME: &str = "server.sock";
/// Longest identity accepted (aliases and id52s are far shorter).
const MAX_IDENTITY: usize = 256;
/// How long the server waits for the forced command's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest outcome message the forced command reads.
const MAX_OUTCOME: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StdinServerError {
    #[error(transparent)]
    RuntimeDir(#[from] crate::localsock::PrivateDirError),
    #[error("another malai ssh server is already listening on {0}")]
    AlreadyRunning(String),
    #[error("cannot listen on {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("identity {0:?} is empty or too long")]
    BadIdentity(String),
    #[error("{0}")]
    UnpinnedIdentity(String),
    #[error("no malai ssh server is running here (cannot connect to {path}: {source})")]
    NoServer {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    FdPass(#[from] FdPassError),
    #[error("the server ended the session without a status")]
    Lost,
    #[error("{0}")]
    Untrusted(crate::localsock::SocketTrustError),
}

/// Forced command → server, sent with the stdin and stdout fds.
#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    identity: String,
}

/// Server → forced command when the request is over.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Outcome {
    /// The forced command's exit status.
    status: u8,
    /// One line for the forced command's stderr (which reaches the ssh user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

impl Outcome {
    fn fail(message: impl Into<String>) -> Outcome {
        Outcome {
            status: 255,
            message: Some(message.into()),
        }
    }
}

/// The clusters the server serves, shared with the stdinserver listener (which has to pick
/// one per request). Grows as the server starts clusters.
#[derive(Default)]
pub struct Registry(Mutex<Vec<Arc<ClusterState>>>);

impl Registry {
    pub fn add(&self, state: Arc<ClusterState>) {
        match self.0.lock() {
            Ok(mut v) => v.push(state),
            Err(p) => p.into_inner().push(state),
        }
    }

    fn snapshot(&self) -> Vec<Arc<ClusterState>> {
        match self.0.lock() {
            Ok(v) => v.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }
}

/// Make sure `run` exists and is private: created 0700 if missing; refused if it is a
/// symlink, not a directory, not ours, or open to group/other.
pub fn check_runtime_dir(run: &Path) -> Result<(), StdinServerError> {
    Ok(crate::localsock::prepare_private_dir(run)?)
}

/// The listening socket; the file is removed when this is dropped.
pub struct Listener {
    path: PathBuf,
    listener: UnixListener,
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Check the runtime dir and listen on its socket. A socket file left by a dead server is
/// replaced; a live one is an error (two servers would fight over requests).
pub fn listen(dirs: &Dirs) -> Result<Listener, StdinServerError> {
    check_runtime_dir(&dirs.run)?;
    let path = dirs.run.join(SOCKET_NAME);
    let shown = path.display().to_string();
    if std::fs::symlink_metadata(&path).is_ok() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(StdinServerError::AlreadyRunning(shown));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|source| StdinServerError::Bind {
        path: shown.clone(),
        source,
    })?;
    // The dir is what protects it; 0600 on the socket as well costs nothing.
    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
    Ok(Listener { path, listener })
}

/// Accept forced commands until `shutdown`; each is served on its own task.
pub async fn serve(
    listener: Listener,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    tracing::info!(socket = %listener.path.display(), "stdinserver socket ready");
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.listener.accept() => match a {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "stdinserver accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        tracker.spawn(async move { serve_forced_command(stream, &registry).await });
    }
}

async fn serve_forced_command(mut stream: UnixStream, registry: &Registry) {
    if let Err(e) = crate::localsock::check_caller(&stream) {
        tracing::warn!(error = %e, "stdinserver: peer is not this user; dropped");
        return;
    }
    let (payload, mut fds) =
        match tokio::time::timeout(HELLO_TIMEOUT, fdpass::recv_fds(&stream)).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                tracing::info!(error = %e, "stdinserver: bad hello");
                return;
            }
            Err(_) => {
                tracing::info!("stdinserver: no hello in time");
                return;
            }
        };
    let outcome = match (serde_json::from_slice::<Hello>(&payload), fds.len()) {
        (Ok(hello), 2) => {
            let stdout = fds.pop();
            let stdin = fds.pop();
            match (stdin, stdout) {
                (Some(i), Some(o)) => serve_fds(registry, &hello.identity, i, o).await,
                _ => Outcome::fail("malai: internal error: descriptors missing"),
            }
        }
        (Ok(_), n) => Outcome::fail(format!("malai: expected 2 descriptors, got {n}")),
        (Err(e), _) => Outcome::fail(format!("malai: bad hello: {e}")),
    };
    let mut line = serde_json::to_vec(&outcome).unwrap_or_default();
    line.push(b'\n');
    let _ = stream.write_all(&line).await;
    let _ = stream.shutdown().await;
}

/// Serve one malai request on the forced command's stdin/stdout as `identity`.
async fn serve_fds(
    registry: &Registry,
    identity: &str,
    stdin: OwnedFd,
    stdout: OwnedFd,
) -> Outcome {
    let (mut r, mut w) = match (FdReader::new(stdin), FdWriter::new(stdout)) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => return Outcome::fail(format!("malai: stdio: {e}")),
    };
    let outcome = serve_stream(registry, identity, &mut r, &mut w).await;
    let _ = w.shutdown().await;
    outcome
}

/// Read the header (to pick the cluster and resolve the identity in it), then hand the
/// whole stream — header replayed — to `request::handle`, the one ACL choke point.
async fn serve_stream<R, W>(registry: &Registry, identity: &str, r: &mut R, w: &mut W) -> Outcome
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let body = match tokio::time::timeout(HEADER_TIMEOUT, protocol::read_frame_body(r)).await {
        Err(_) => return Outcome::fail("malai: no malai request arrived in time"),
        Ok(Err(FrameError::Truncated)) => {
            return Outcome::fail(
                "malai: this ssh key only carries the malai protocol (use `malai ssh` with ssh-via; see contrib/authorized_keys)",
            );
        }
        Ok(Err(e)) => {
            let reason = e.to_string();
            let _ = reply(
                w,
                &Response::Error {
                    reason: reason.clone(),
                },
            )
            .await;
            return Outcome::fail(format!("malai: {reason}"));
        }
        Ok(Ok(b)) => b,
    };
    let header: Header = match protocol::decode_header(&body) {
        Ok(h) => h,
        Err(e) => {
            let reason = e.to_string();
            let _ = reply(
                w,
                &Response::Error {
                    reason: reason.clone(),
                },
            )
            .await;
            return Outcome::fail(format!("malai: {reason}"));
        }
    };
    let (state, peer) = match pick(registry, identity, &header) {
        Ok(x) => x,
        Err((resp, msg)) => {
            tracing::warn!(%identity, %msg, "stdinserver: refused");
            let _ = reply(w, &resp).await;
            return Outcome::fail(format!("malai: {msg}"));
        }
    };
    tracing::info!(%identity, %peer, cluster = %state.dir.alias, kind = header.request.kind(), "stdinserver request");
    let mut raw = Vec::with_capacity(9 + body.len());
    raw.extend_from_slice(&MAGIC);
    raw.push(VERSION);
    raw.extend_from_slice(&(body.len() as u32).to_be_bytes());
    raw.extend_from_slice(&body);
    let mut replayed = Cursor::new(raw).chain(r);
    let ctx = request::Context {
        state,
        peer,
        transport: "stdinserver",
        conn: None,
    };
    let mut w = FirstFrame::new(w);
    let ok = request::handle(&ctx, &mut replayed, &mut w).await;
    // sshd passes the forced command's status to the ssh client: a denied or failed
    // request is 255 (OpenSSH's "ssh itself failed"), not 0.
    match (ok, w.response()) {
        (true, Some(Response::Deny { .. } | Response::Error { .. })) | (false, _) => Outcome {
            status: 255,
            message: None,
        },
        _ => Outcome::default(),
    }
}

/// Keeps a copy of the first frame written through it (the server's answer to the
/// header), so the forced command can exit 255 on a deny without `request::handle`
/// having to report what it answered.
struct FirstFrame<'a, W: ?Sized> {
    inner: &'a mut W,
    seen: Vec<u8>,
}

/// More than any accept/deny/error frame the server writes.
const FIRST_FRAME_CAP: usize = 16 * 1024;

impl<'a, W: ?Sized> FirstFrame<'a, W> {
    fn new(inner: &'a mut W) -> Self {
        FirstFrame {
            inner,
            seen: Vec::new(),
        }
    }

    /// The first frame as a response, when one was written whole.
    fn response(&self) -> Option<Response> {
        let head = self.seen.get(..9)?;
        let len = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) as usize;
        let body = self.seen.get(9..9 + len)?;
        serde_json::from_slice(body).ok()
    }
}

impl<W: AsyncWrite + Unpin + ?Sized> AsyncWrite for FirstFrame<'_, W> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut *this.inner).poll_write(cx, data);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            let room = FIRST_FRAME_CAP.saturating_sub(this.seen.len());
            this.seen.extend_from_slice(&data[..(*n).min(room)]);
        }
        r
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Who the admin bound an ssh key to, parsed from the forced command's argument.
///
/// It must name one principal on this server, whatever clusters the server serves now or
/// later: a bare alias (`alice`) would mean every cluster's `alice` (finding 1 of issue
/// 12), so it is refused. `alice@acme` names the member `alice` of the served cluster
/// `acme` (its folder alias, its `cluster-manager.alias`, or its manager id52); an id52
/// names a key, which malai makes per cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Key(Id52),
    Member { alias: String, cluster: String },
}

impl Identity {
    pub fn parse(s: &str) -> Result<Identity, String> {
        if let Ok(id) = s.parse::<Id52>() {
            return Ok(Identity::Key(id));
        }
        match s.split_once('@') {
            Some((alias, cluster))
                if !alias.is_empty() && !cluster.is_empty() && !cluster.contains('@') =>
            {
                Ok(Identity::Member {
                    alias: alias.to_string(),
                    cluster: cluster.to_string(),
                })
            }
            _ => Err(format!(
                "identity {s:?} does not name a cluster: bind the key to `{s}@<cluster>` or to an id52 in authorized_keys (a bare alias would mean that alias in every cluster this server serves)"
            )),
        }
    }
}

/// The served cluster a request means and the identity's id52 in it. Errors carry the
/// response frame for the client and a line for stderr.
fn pick(
    registry: &Registry,
    identity: &str,
    header: &Header,
) -> Result<(Arc<ClusterState>, Id52), (Response, String)> {
    let deny = |m: String| (Response::Deny { reason: m.clone() }, m);
    let err = |m: String| (Response::Error { reason: m.clone() }, m);
    let identity = Identity::parse(identity).map_err(deny)?;
    let clusters = registry.snapshot();
    match identity {
        Identity::Member { alias, cluster } => {
            let state = clusters
                .iter()
                .find(|s| {
                    let cfg = s.current();
                    s.dir.alias == cluster
                        || cfg.alias.as_deref() == Some(cluster.as_str())
                        || cfg.manager.to_string() == cluster
                })
                .cloned()
                .ok_or_else(|| deny(format!("this server does not serve cluster {cluster:?}")))?;
            let cfg = state.current();
            if let Some(m) = header.cluster
                && m != cfg.manager
            {
                return Err(deny(format!(
                    "this ssh key is bound to {alias}@{cluster}; the request names another cluster ({})",
                    m.short()
                )));
            }
            let peer = cfg.id52_of(&alias).ok_or_else(|| {
                deny(format!(
                    "identity {alias:?} is not a member of cluster {}",
                    state.dir.alias
                ))
            })?;
            Ok((state, peer))
        }
        Identity::Key(id) => {
            // A key belongs to the clusters whose file lists it; the request may only
            // mean one of those.
            let theirs: Vec<_> = clusters
                .iter()
                .filter(|s| s.current().name_of(&id).is_some())
                .cloned()
                .collect();
            let state = match header.cluster {
                Some(m) => theirs
                    .iter()
                    .find(|s| s.current().manager == m)
                    .cloned()
                    .ok_or_else(|| {
                        deny(format!(
                            "identity {} is not a member of cluster {}",
                            id.short(),
                            m.short()
                        ))
                    })?,
                None => match theirs.as_slice() {
                    [one] => one.clone(),
                    [] => {
                        return Err(deny(format!(
                            "identity {} is not a member of any cluster this server serves",
                            id.short()
                        )));
                    }
                    _ => {
                        return Err(err(
                            "this key is a member of several clusters here; the request must name one".into(),
                        ));
                    }
                },
            };
            Ok((state, id))
        }
    }
}

// ---------------------------------------------------------------------------------------
// The forced command's side.

/// Run as the forced command: hand our stdin/stdout to the server and wait for its status.
pub async fn run_forced_command(dirs: &Dirs, identity: &str) -> Result<u8, StdinServerError> {
    if identity.is_empty() || identity.len() > MAX_IDENTITY {
        return Err(StdinServerError::BadIdentity(
            identity.chars().take(64).collect(),
        ));
    }
    Identity::parse(identity).map_err(StdinServerError::UnpinnedIdentity)?;
    if let Ok(cmd) = std::env::var("SSH_ORIGINAL_COMMAND") {
        tracing::debug!(original = %cmd.chars().take(200).collect::<String>(), "SSH_ORIGINAL_COMMAND ignored");
    }
    // Stdout is the protocol; a misconfigured key line is worth one stderr line.
    if let Some(w) = super::restrict::warnings().first() {
        tracing::warn!(warning = %w, "stdinserver: authorized_keys line without restrict");
        eprintln!("malai: warning: {w}");
    }
    let mut candidates = vec![dirs.run.join(SOCKET_NAME)];
    // A server started from a login session has XDG_RUNTIME_DIR; sshd without PAM does
    // not give it to the forced command, which then looks in the data dir's fallback.
    let fallback = dirs.data.join("run").join(SOCKET_NAME);
    if !candidates.contains(&fallback) {
        candidates.push(fallback);
    }
    let mut last = None;
    let mut sock = None;
    for p in &candidates {
        // The ssh channel goes only to a socket in a directory of ours whose listener is
        // this user: never to one planted by someone else.
        match crate::localsock::connect(p).await {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(crate::localsock::ConnectError::Io(e)) => last = Some((p.display().to_string(), e)),
            Err(crate::localsock::ConnectError::Trust(t)) => {
                if p.exists() {
                    return Err(StdinServerError::Untrusted(t));
                }
                last = Some((p.display().to_string(), std::io::ErrorKind::NotFound.into()));
            }
        }
    }
    let Some(mut sock) = sock else {
        let (path, source) =
            last.unwrap_or_else(|| (String::new(), std::io::ErrorKind::NotFound.into()));
        let e = StdinServerError::NoServer { path, source };
        // Said in-band, where a malai client reads its answer: a resumable session through
        // ssh-via then knows the server is gone (its sessions with it), not unreachable,
        // and stops redialling. On stderr it would only be said twice.
        let reason = e.to_string();
        tracing::warn!(%reason, "stdinserver: no server to hand the channel to");
        let mut out = tokio::io::stdout();
        if reply(&mut out, &Response::Error { reason }).await.is_ok() && out.flush().await.is_ok() {
            return Ok(255);
        }
        return Err(e);
    };
    let hello = serde_json::to_vec(&Hello {
        identity: identity.to_string(),
    })
    .unwrap_or_default();
    fdpass::send_fds(&sock, &hello, &[0, 1]).await?;
    // From now on only the server holds the channel's fds: its EOF must not wait for us.
    detach_stdio();
    let mut buf = Vec::new();
    let _ = (&mut sock).take(MAX_OUTCOME).read_to_end(&mut buf).await;
    let outcome: Outcome = serde_json::from_slice(&buf).map_err(|_| StdinServerError::Lost)?;
    if let Some(m) = outcome.message {
        eprintln!("{}", m.replace('\n', " "));
    }
    Ok(outcome.status)
}

/// Point fds 0 and 1 at /dev/null.
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        // SAFETY: dup2 onto the standard descriptors; /dev/null stays open until then.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_dir_must_be_private() {
        let tmp = tempfile::tempdir().unwrap();
        // Missing: created 0700.
        let run = tmp.path().join("a").join("run");
        check_runtime_dir(&run).unwrap();
        let mode = std::fs::metadata(&run).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // Deny twins: group/world bits, a file, a symlink to a private dir.
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = check_runtime_dir(&run).unwrap_err();
        assert!(e.to_string().contains("not private"), "{e}");
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o710)).unwrap();
        assert!(check_runtime_dir(&run).is_err());
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_runtime_dir(&run).unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(check_runtime_dir(&file).is_err());
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&run, &link).unwrap();
        assert!(check_runtime_dir(&link).is_err());
    }

    fn id(n: u8) -> Id52 {
        Id52::from_bytes([n; 32])
    }

    /// A registry serving two clusters that both have a member `alice`, with different
    /// keys: `acme` (manager 1, alice = 10) and `beta` (manager 2, alice = 20).
    fn two_clusters(tmp: &Path) -> Registry {
        let reg = Registry::default();
        for (alias, mgr, alice) in [("acme", 1u8, 10u8), ("beta", 2, 20)] {
            let text = format!(
                "[cluster-manager]\nid52 = \"{}\"\nalias = \"{alias}\"\n\n[server.foo]\nid52 = \"{}\"\nallow-from = \"alice\"\n\n[device.alice]\nid52 = \"{}\"\n",
                id(mgr),
                id(mgr + 100),
                id(alice)
            );
            let cfg = crate::config::ClusterConfig::parse(&text).unwrap();
            let dir = crate::config::store::ClusterDir {
                alias: alias.into(),
                dir: tmp.join(alias),
            };
            reg.add(Arc::new(ClusterState::new(dir, id(mgr + 100), cfg)));
        }
        reg
    }

    /// `pick`'s error, for tests (the Ok side holds a state that has no Debug).
    fn denied(reg: &Registry, identity: &str, h: &Header) -> (Response, String) {
        match pick(reg, identity, h) {
            Ok((s, p)) => panic!("{identity}: allowed as {p} in {}", s.dir.alias),
            Err(e) => e,
        }
    }

    fn header(cluster: Option<Id52>) -> Header {
        Header {
            cluster,
            request: protocol::Request::Ping,
        }
    }

    #[test]
    fn identity_must_name_its_cluster() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = two_clusters(tmp.path());
        // A bare alias is refused, whatever the header says: it would be every `alice`.
        for h in [None, Some(id(1)), Some(id(2))] {
            let (resp, msg) = denied(&reg, "alice", &header(h));
            assert!(matches!(resp, Response::Deny { .. }), "{msg}");
            assert!(msg.contains("alice@<cluster>"), "{msg}");
        }
        // alias@cluster: pinned to that cluster, by folder alias or manager id52.
        let (s, peer) = pick(&reg, "alice@acme", &header(Some(id(1)))).unwrap();
        assert_eq!((s.dir.alias.as_str(), peer), ("acme", id(10)));
        let (s, peer) = pick(&reg, "alice@acme", &header(None)).unwrap();
        assert_eq!((s.dir.alias.as_str(), peer), ("acme", id(10)));
        let (s, peer) = pick(&reg, &format!("alice@{}", id(2)), &header(None)).unwrap();
        assert_eq!((s.dir.alias.as_str(), peer), ("beta", id(20)));
        // Deny twin: the header names the other cluster.
        let (resp, msg) = denied(&reg, "alice@acme", &header(Some(id(2))));
        assert!(matches!(resp, Response::Deny { .. }), "{msg}");
        assert!(msg.contains("another cluster"), "{msg}");
        // A cluster this server does not serve, a member the cluster does not have.
        assert!(pick(&reg, "alice@gamma", &header(None)).is_err());
        assert!(pick(&reg, "mallory@acme", &header(None)).is_err());
        // An id52 is a per-cluster key: allowed in its own cluster only.
        let (s, peer) = pick(&reg, &id(10).to_string(), &header(Some(id(1)))).unwrap();
        assert_eq!((s.dir.alias.as_str(), peer), ("acme", id(10)));
        let (s, _) = pick(&reg, &id(20).to_string(), &header(None)).unwrap();
        assert_eq!(s.dir.alias, "beta");
        let (resp, msg) = denied(&reg, &id(10).to_string(), &header(Some(id(2))));
        assert!(matches!(resp, Response::Deny { .. }), "{msg}");
        assert!(pick(&reg, &id(99).to_string(), &header(None)).is_err());
    }

    /// The forced command's status: 0 for a served request, 255 for a denied one (sshd
    /// hands it to the ssh client).
    #[tokio::test]
    async fn a_denied_request_exits_255() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = two_clusters(tmp.path());
        let run = |req: protocol::Request| {
            let reg = &reg;
            async move {
                let mut input = Vec::new();
                protocol::write_frame(
                    &mut input,
                    &Header {
                        cluster: None,
                        request: req,
                    },
                )
                .await
                .unwrap();
                let mut out = Vec::new();
                serve_stream(reg, "alice@acme", &mut Cursor::new(input), &mut out)
                    .await
                    .status
            }
        };
        assert_eq!(run(protocol::Request::Ping).await, 0);
        // Deny twin: only the manager may push.
        let push = protocol::Request::ConfigPush { hash: "x".into() };
        assert_eq!(run(push).await, 255);
    }

    #[test]
    fn identity_parse_forms() {
        assert!(Identity::parse("alice").is_err());
        assert!(Identity::parse("alice@").is_err());
        assert!(Identity::parse("@acme").is_err());
        assert!(Identity::parse("a@b@c").is_err());
        assert_eq!(
            Identity::parse("alice@acme.example").unwrap(),
            Identity::Member {
                alias: "alice".into(),
                cluster: "acme.example".into()
            }
        );
        assert_eq!(
            Identity::parse(&id(7).to_string()).unwrap(),
            Identity::Key(id(7))
        );
    }

    #[tokio::test]
    async fn a_second_listener_is_refused_and_a_stale_socket_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dirs = Dirs::under(tmp.path());
        let first = listen(&dirs).unwrap();
        assert!(matches!(
            listen(&dirs),
            Err(StdinServerError::AlreadyRunning(_))
        ));
        drop(first);
        // A stale file (no listener behind it) is replaced.
        std::fs::write(dirs.run.join(SOCKET_NAME), b"").unwrap();
        let _again = listen(&dirs).unwrap();
    }
}
