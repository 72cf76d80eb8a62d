//! The embedded SSH server: a `tunnel` served in-process by russh, for machines with no
//! sshd (or whose sshd refuses connections).
//!
//! Why it is safe to accept every SSH authentication: a stream only gets here after the
//! peer's id52 passed the ACL (`request::handle`), over a transport that verified it (iroh's
//! TLS, or the admin's `authorized_keys` line for stdinserver). So `none` and `publickey`
//! are accepted as they come; the SSH user name is only logged, and everything runs as the
//! server process's user, like native exec. What a session may *do* is decided again, per
//! channel request, by the same `acl::decide`: a command-scoped peer gets exactly its
//! command (`execvp`, no shell), never a shell, a pty login or the sftp subsystem.
//!
//! Host key: the server's ed25519 key for this cluster, so its public half is the server's
//! id52 and every member can print correct `known_hosts` lines ([`known_hosts_line`])
//! without any secret.
//!
//! Processes and ptys come from `server::process` (the native exec machinery). This file
//! only relays between russh's channel events and a [`Running`] child:
//!
//! - Requests (`pty-req`, `env`, `exec`, `shell`, `subsystem`, `window-change`, `signal`)
//!   are answered inside the russh handler callback, because russh keeps one "wants reply"
//!   flag per channel that the next request overwrites: an answer sent later from a task
//!   could land on the wrong request.
//! - Client data goes through a bounded queue per channel to a relay task that writes the
//!   child's stdin. russh opens the SSH window as data *arrives*, not as it is consumed, so
//!   this queue (not the window) is where input back-pressure happens.
//! - Child output is sent with russh's `Handle`, which stops taking data while the client's
//!   window is full: output back-pressure is the client's window, as with sshd.
//! - EOF, exit status (or exit signal), then close — sshd's order.
//! - A closed channel or a dropped connection hangs up the child's whole session.
//!
//! Forwarding (`direct-tcpip`, `tcpip-forward`, streamlocal, agent): decided here per
//! request with `server::forward::check` (ACL + audit), served by `embedded_forward`.
//!
//! SFTP: the system's `sftp-server` (OpenSSH's, found at the usual paths or
//! `MALAI_SFTP_SERVER`), run through the same process machinery. It is the implementation
//! OpenSSH's own clients are tested against (every extension `sftp`/`scp` use), and it
//! keeps file-system code out of this process.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::public::Ed25519PublicKey;
use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Msg, Session};
use russh::{Channel, ChannelId, MethodKind, MethodSet, Pty, Sig, SshId};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::ClusterState;
use super::embedded_forward::{self as fwd, Listener, Target};
use super::embedded_holdings::{Asked, ChannelKind, Holding, Holdings, Slot};
use super::embedded_relay::{Input, Stops, clamp16, refuse, relay, sig_name};
use super::forward::{self, Asker};
use super::process::{self, ChildControl, Program, SpawnSpec};
use super::request::reply;
use crate::acl::{self, Decision, ForwardKind, Grant};
use crate::id52::Id52;
use crate::keys::{self, SecretKey};
use crate::protocol::Response;
use crate::protocol::exec::PtyRequest;
use crate::transport::pump;

/// Input messages queued per channel: 512 × ≤32 KiB packets ≈ 16 MiB at most in memory.
const INPUT_QUEUE: usize = 512;
/// After the byte stream ends, how long the SSH session may take to wind down.
const WIND_DOWN: Duration = Duration::from_secs(5);
/// Where OpenSSH's `sftp-server` lives on the common systems (Debian/Ubuntu, Fedora/RHEL,
/// Arch, macOS/BSD).
const SFTP_SERVER_PATHS: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
    "/usr/lib/sftp-server",
];
/// A command the ACL refused exits 255, as it does natively (`malai ssh foo.acme cmd`):
/// malai refused it, and 255 is the status of ssh's (and malai's) own failures.
const EXIT_NOT_ALLOWED: u32 = 255;
/// A command that could not be started (the shell's convention).
const EXIT_CANNOT_RUN: u32 = 127;

/// Who the SSH session is for: the verified peer, and where its permissions come from.
pub struct EmbeddedContext {
    pub state: Arc<ClusterState>,
    pub peer: Id52,
    /// This machine's server name in the cluster file (the ACL's `server`).
    pub server: String,
    /// "iroh" or "stdinserver", for logs.
    pub transport: &'static str,
}

/// The SSH host key for a cluster key: the same ed25519 key, so it matches the id52.
pub fn host_key(secret: &SecretKey) -> PrivateKey {
    PrivateKey::from(Ed25519Keypair::from_seed(secret.as_bytes()))
}

/// `ssh-ed25519 AAAA…` for a server's id52 (its host key's public half).
pub fn known_hosts_key(id: &Id52) -> String {
    PublicKey::from(Ed25519PublicKey(*id.as_bytes()))
        .to_openssh()
        .unwrap_or_default()
}

/// A `known_hosts` line: `name1,name2 ssh-ed25519 AAAA…`.
pub fn known_hosts_line(names: &[String], id: &Id52) -> String {
    format!("{} {}", names.join(","), known_hosts_key(id))
}

fn config(key: PrivateKey) -> russh::server::Config {
    russh::server::Config {
        server_id: SshId::Standard(format!("SSH-2.0-malai_{}", env!("CARGO_PKG_VERSION")).into()),
        // Only what we accept is advertised: the ACL already authenticated the peer.
        methods: MethodSet::from(&[MethodKind::None, MethodKind::PublicKey][..]),
        // OpenSSH probes with `none` first; it is accepted, so no delay is ever due.
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![key],
        nodelay: true,
        // The transport has its own liveness (QUIC idle timeout / the ssh-via child); an
        // idle interactive shell must not be cut after russh's default 10 minutes.
        inactivity_timeout: None,
        keepalive_interval: None,
        ..Default::default()
    }
}

/// Serve SSH on a stream whose `tunnel` request the ACL allowed. Sends `accept` (or an
/// `error` when the host key can't be read). Returns `true` when the stream ended cleanly.
pub async fn serve<R, W>(ctx: EmbeddedContext, r: &mut R, w: &mut W) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let key = match keys::load(&ctx.state.dir.dir) {
        Ok(k) => host_key(&k),
        Err(e) => {
            tracing::error!(error = %e, "embedded ssh: cannot load the host key");
            let reason = format!("the server cannot load its host key: {e}");
            let _ = reply(w, &Response::Error { reason }).await;
            return true;
        }
    };
    if reply(w, &Response::Accept).await.is_err() {
        return false;
    }
    let peer = ctx.peer;
    let holdings = Holdings::new(ctx.state.clone(), ctx.server.clone(), peer, ctx.transport);
    // russh wants an owned `'static` stream; ours is borrowed, so an in-memory pipe sits
    // between them (one memcpy, cheap next to the crypto).
    let (ours, theirs) = tokio::io::duplex(pump::PUMP_BUF);
    let handler = SshHandler::new(Arc::new(ctx), holdings.clone());
    let ssh = tokio::spawn(async move {
        match russh::server::run_stream(Arc::new(config(key)), theirs, handler).await {
            Ok(session) => session.await,
            Err(e) => Err(e),
        }
    });
    let (mut or, mut ow) = tokio::io::split(ours);
    // While bytes flow, every channel and forward is re-decided on each reload.
    let pumped = tokio::select! {
        p = pump::both_ways(r, &mut ow, &mut or, w) => p,
        _ = holdings.watch() => unreachable!("the watcher never returns"),
    };
    // Our end gone = EOF for russh, so the session ends even if the pump failed.
    drop((or, ow));
    let ended = tokio::time::timeout(WIND_DOWN, ssh).await;
    match (&pumped, ended) {
        (Ok(m), Ok(Ok(Ok(())))) => {
            tracing::info!(%peer, up = m.up, down = m.down, "embedded ssh session closed")
        }
        (Err(e), Ok(Ok(Ok(())))) => tracing::info!(%peer, error = %e, "embedded ssh stream broke"),
        (_, Ok(Ok(Err(e)))) => tracing::info!(%peer, error = %e, "embedded ssh session ended"),
        (_, Ok(Err(e))) => tracing::error!(%peer, error = %e, "embedded ssh task failed"),
        (_, Err(_)) => tracing::warn!(%peer, "embedded ssh session did not wind down in time"),
    }
    pumped.is_ok()
}

/// The embedded SSH server for a resumable tunnel (`server::resume`): it runs on an
/// in-process pipe whose other end, returned, becomes the session's local leg. It runs in
/// a task of its own that outlives the stream (its channels and forwards re-decided on
/// every reload while it runs, attached or detached) and ends when the leg closes (the
/// session ended: finished, expired, revoked). Fails only when the host key cannot be
/// loaded (the reason for the client).
pub fn start_detachable(ctx: EmbeddedContext) -> Result<tokio::io::DuplexStream, String> {
    let key = match keys::load(&ctx.state.dir.dir) {
        Ok(k) => host_key(&k),
        Err(e) => {
            tracing::error!(error = %e, "embedded ssh: cannot load the host key");
            return Err(format!("the server cannot load its host key: {e}"));
        }
    };
    let peer = ctx.peer;
    let holdings = Holdings::new(ctx.state.clone(), ctx.server.clone(), peer, ctx.transport);
    let (ours, theirs) = tokio::io::duplex(pump::PUMP_BUF);
    let handler = SshHandler::new(Arc::new(ctx), holdings.clone());
    tokio::spawn(async move {
        let ssh = async {
            match russh::server::run_stream(Arc::new(config(key)), theirs, handler).await {
                Ok(session) => session.await,
                Err(e) => Err(e),
            }
        };
        let ended = tokio::select! {
            r = ssh => r,
            _ = holdings.watch() => unreachable!("the watcher never returns"),
        };
        match ended {
            Ok(()) => tracing::info!(%peer, "embedded ssh session closed (resumable)"),
            Err(e) => tracing::info!(%peer, error = %e, "embedded ssh session ended (resumable)"),
        }
    });
    Ok(ours)
}

/// One session channel's state, kept by the handler.
struct ChannelState {
    /// Its place under the channel caps.
    _slot: Slot,
    /// What it runs, kept for revocation's re-checks (`None` until something runs).
    hold: Option<Holding>,
    /// The forwarded agent's grant, kept the same way.
    agent_hold: Option<Holding>,
    /// Cancelled when what runs is revoked (which also cancels `stop`).
    revoked: CancellationToken,
    pty: Option<PtyRequest>,
    env: Vec<(String, String)>,
    /// Client data for the child; `None` after the client's EOF.
    input: Option<mpsc::Sender<Input>>,
    /// Handed to the relay task when something starts.
    input_rx: Option<mpsc::Receiver<Input>>,
    /// Set once a child runs: window changes and signals.
    control: Option<ChildControl>,
    /// Cancelled when the channel closes, the connection drops or `revoked`: the child is
    /// hung up.
    stop: CancellationToken,
    /// `SSH_AUTH_SOCK` for the child, after an allowed `auth-agent-req@openssh.com`.
    agent: Option<String>,
}

impl ChannelState {
    fn new(slot: Slot) -> ChannelState {
        let (tx, rx) = mpsc::channel(INPUT_QUEUE);
        let revoked = CancellationToken::new();
        ChannelState {
            _slot: slot,
            hold: None,
            agent_hold: None,
            stop: revoked.child_token(),
            revoked,
            pty: None,
            env: vec![],
            input: Some(tx),
            input_rx: Some(rx),
            control: None,
            agent: None,
        }
    }

    fn started(&self) -> bool {
        self.input_rx.is_none()
    }
}

/// What a channel asked to run.
enum Want {
    Exec(String),
    Shell,
    Sftp,
}

struct SshHandler {
    ctx: Arc<EmbeddedContext>,
    /// Channel slots and the grants revocation re-checks.
    holdings: Arc<Holdings>,
    user: String,
    channels: HashMap<ChannelId, ChannelState>,
    /// Remote forwards (`tcp:addr:port` / `unix:path`) → their listener's stop and grant.
    remote: HashMap<String, (CancellationToken, Holding)>,
    /// Cancelled when the connection goes: ends every forward it started.
    conn_stop: CancellationToken,
}

impl SshHandler {
    fn new(ctx: Arc<EmbeddedContext>, holdings: Arc<Holdings>) -> SshHandler {
        SshHandler {
            ctx,
            holdings,
            user: String::new(),
            channels: HashMap::new(),
            remote: HashMap::new(),
            conn_stop: CancellationToken::new(),
        }
    }

    /// The ACL and audit log for one forward request.
    fn forward_check(&self, kind: ForwardKind, detail: &str) -> Result<(), String> {
        let asker = Asker {
            state: &self.ctx.state,
            server: &self.ctx.server,
            peer: &self.ctx.peer,
            transport: self.ctx.transport,
        };
        forward::check(&asker, kind, detail)
    }

    /// Bind a remote forward's listener and start serving it, after the ACL said yes.
    fn start_remote(
        &mut self,
        key: String,
        kind: ForwardKind,
        listener: Listener,
        session: &mut Session,
    ) {
        let stop = self.conn_stop.child_token();
        let hold = self.holdings.hold(Asked::Forward(kind), stop.clone());
        self.remote.insert(key, (stop.clone(), hold));
        tokio::spawn(fwd::serve_remote(session.handle(), listener, stop));
    }

    /// A slot for a channel the peer opens, or the refusal to send.
    fn channel_slot(&self, kind: ChannelKind) -> Result<Slot, russh::ChannelOpenFailure> {
        self.holdings.slot(kind).map_err(|reason| {
            tracing::info!(peer = %self.ctx.peer, reason, "embedded ssh: channel refused");
            // 4: SSH_OPEN_RESOURCE_SHORTAGE, with malai's reason for the user.
            russh::ChannelOpenFailure::Other {
                code: 4,
                reason: format!("malai: {reason}"),
            }
        })
    }

    /// A `direct-tcpip` / `direct-streamlocal` channel the ACL allowed: take a slot, keep
    /// the grant for re-checks, connect and splice in a task that owns both.
    async fn open_local(
        &self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        kind: ForwardKind,
        target: Target,
    ) {
        let slot = match self.channel_slot(ChannelKind::Forward) {
            Ok(s) => s,
            Err(refusal) => return reply.reject(refusal).await,
        };
        let stop = self.conn_stop.child_token();
        let hold = self.holdings.hold(Asked::Forward(kind), stop.clone());
        tokio::spawn(async move {
            let _kept = (slot, hold);
            fwd::open_local(channel, reply, target, stop).await
        });
    }

    fn note_user(&mut self, user: &str, method: &str) {
        self.user = user.chars().take(64).collect();
        tracing::info!(peer = %self.ctx.peer, user = %self.user, method, "embedded ssh: authenticated by the cluster ACL");
    }

    /// Ask the ACL what `want` may run as, right now (the cluster file may have changed
    /// since the tunnel was allowed).
    fn decide(&self, want: &Want) -> Result<Program, String> {
        let cfg = self.ctx.state.current();
        let command = match want {
            Want::Exec(c) => Some(c.as_str()),
            Want::Shell | Want::Sftp => None,
        };
        let req = acl::Request::Exec { command };
        match (
            acl::decide(&cfg, &self.ctx.server, &self.ctx.peer, &req),
            want,
        ) {
            (Decision::Allow(Grant::Shell), Want::Sftp) => sftp_server()
                .map(|p| Program::Argv(vec![p]))
                .ok_or_else(|| {
                    "no sftp-server on this machine (install openssh-sftp-server)".into()
                }),
            (Decision::Allow(Grant::Shell), Want::Exec(c)) => Ok(Program::Shell(Some(c.clone()))),
            (Decision::Allow(Grant::Shell), Want::Shell) => Ok(Program::Shell(None)),
            (Decision::Allow(Grant::Argv(argv)), Want::Exec(_)) => Ok(Program::Argv(argv)),
            (Decision::Deny(reason), _) => Err(reason.to_string()),
            (Decision::Allow(_), _) => Err("permission denied".into()),
        }
    }

    /// Run `want` on `channel`, answering the request. A refusal still answers `success`
    /// and then reports on stderr with an exit status, so ssh/git/rsync show the reason
    /// instead of a bare "exec request failed".
    fn start(
        &mut self,
        channel: ChannelId,
        want: Want,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(st) = self.channels.get(&channel) else {
            return session.channel_failure(channel);
        };
        if st.started() {
            return session.channel_failure(channel);
        }
        let what = match &want {
            Want::Exec(c) => c.clone(),
            Want::Shell => "(login shell)".into(),
            Want::Sftp => "(sftp subsystem)".into(),
        };
        // The tracing log names only the program (docs/security.md); whole command lines,
        // which may hold anything, belong in the 0600 audit log.
        let logged = what.split(' ').next().unwrap_or_default();
        let peer = self.ctx.peer;
        let decided = self.decide(&want);
        self.holdings.audit_exec(&what, decided.as_ref().err());
        let (program, refusal) = match decided {
            Ok(p) => (Some(p), None),
            Err(reason) => {
                tracing::warn!(%peer, user = %self.user, program = %logged, %reason, "embedded ssh: refused");
                (None, Some((format!("malai: {reason}"), EXIT_NOT_ALLOWED)))
            }
        };
        let Some(st) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        let pty = match want {
            Want::Sftp => None,
            _ => st.pty.clone(),
        };
        let newline = if pty.is_some() { "\r\n" } else { "\n" };
        let handle = session.handle();
        let input_rx = st.input_rx.take();
        let stops = Stops {
            stop: st.stop.clone(),
            revoked: st.revoked.clone(),
        };
        let child = match program {
            None => None,
            Some(program) => {
                let asked = Asked::Exec {
                    command: match &want {
                        Want::Exec(c) => Some(c.clone()),
                        Want::Shell | Want::Sftp => None,
                    },
                    ran: program.clone(),
                };
                st.hold = Some(self.holdings.hold(asked, st.revoked.clone()));
                let spec = SpawnSpec {
                    program,
                    env: st.env.clone(),
                    pty,
                    peer: peer.to_string(),
                    agent_socket: st.agent.clone(),
                };
                match process::spawn(&spec) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        let msg = format!("malai: cannot run {what}: {e}");
                        tracing::info!(%peer, error = %e, program = %logged, "embedded ssh: spawn failed");
                        return {
                            session.channel_success(channel)?;
                            tokio::spawn(refuse(handle, channel, msg + newline, EXIT_CANNOT_RUN));
                            Ok(())
                        };
                    }
                }
            }
        };
        session.channel_success(channel)?;
        match (child, refusal, input_rx) {
            (Some(child), _, Some(rx)) => {
                tracing::info!(%peer, user = %self.user, program = %logged, pid = child.pid(), transport = self.ctx.transport, "embedded ssh: started");
                st.control = Some(child.control());
                tokio::spawn(relay(handle, channel, child, rx, stops));
            }
            (_, Some((msg, code)), _) => {
                tokio::spawn(refuse(handle, channel, msg + newline, code));
            }
            _ => {}
        }
        Ok(())
    }
}

impl Drop for SshHandler {
    /// The connection is gone: hang up every child it started.
    fn drop(&mut self) {
        for st in self.channels.values() {
            st.stop.cancel();
        }
        self.conn_stop.cancel();
    }
}

/// The path of the system's sftp-server, if any.
fn sftp_server() -> Option<String> {
    if let Some(p) = std::env::var_os("MALAI_SFTP_SERVER").filter(|p| !p.is_empty()) {
        return Some(p.to_string_lossy().into_owned());
    }
    SFTP_SERVER_PATHS
        .iter()
        .find(|p| std::path::Path::new(p).is_file())
        .map(|p| p.to_string())
}

impl russh::server::Handler for SshHandler {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        self.note_user(user, "none");
        Ok(Auth::Accept)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        _key: russh::server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        self.note_user(user, "publickey");
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Every event also comes through the handler callbacks below; the channel's own
        // message queue is dropped so russh never waits on it.
        let id = channel.id();
        drop(channel);
        let slot = match self.channel_slot(ChannelKind::Session) {
            Ok(s) => s,
            Err(refusal) => {
                reply.reject(refusal).await;
                return Ok(());
            }
        };
        self.channels.insert(id, ChannelState::new(slot));
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let host: String = host_to_connect
            .chars()
            .take(forward::MAX_HOST_LEN + 1)
            .collect();
        let detail = format!("{host}:{port_to_connect}");
        if let Err(reason) = self.forward_check(ForwardKind::Local, &detail) {
            reply.reject(fwd::prohibited(&reason)).await;
            return Ok(());
        }
        let Ok(port) = u16::try_from(port_to_connect) else {
            reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
            return Ok(());
        };
        self.open_local(channel, reply, ForwardKind::Local, Target::Tcp(host, port))
            .await;
        Ok(())
    }

    async fn channel_open_direct_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let path: String = socket_path
            .chars()
            .take(forward::MAX_SOCKET_PATH + 1)
            .collect();
        if let Err(reason) = self.forward_check(ForwardKind::LocalUnix, &path) {
            reply.reject(fwd::prohibited(&reason)).await;
            return Ok(());
        }
        self.open_local(channel, reply, ForwardKind::LocalUnix, Target::Unix(path))
            .await;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let address: String = address.chars().take(forward::MAX_HOST_LEN).collect();
        let detail = format!("{address}:{port}");
        if self.forward_check(ForwardKind::Remote, &detail).is_err() {
            return Ok(false);
        }
        let Ok(want) = u16::try_from(*port) else {
            return Ok(false);
        };
        if self.remote.len() >= forward::MAX_LISTENERS {
            tracing::info!(peer = %self.ctx.peer, "embedded ssh: too many remote forwards");
            return Ok(false);
        }
        match forward::listen_tcp(&address, want) {
            Ok((listener, got)) => {
                *port = u32::from(got);
                tracing::info!(peer = %self.ctx.peer, %address, port = got, "embedded ssh: remote forward listening");
                let key = format!("tcp:{address}:{got}");
                self.start_remote(
                    key,
                    ForwardKind::Remote,
                    Listener::Tcp(listener, address, u32::from(got)),
                    session,
                );
                Ok(true)
            }
            Err(e) => {
                tracing::info!(peer = %self.ctx.peer, error = %e, "embedded ssh: remote forward failed");
                Ok(false)
            }
        }
    }

    async fn cancel_tcpip_forward(
        &mut self,
        address: &str,
        port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        match self.remote.remove(&format!("tcp:{address}:{port}")) {
            Some((stop, _hold)) => {
                stop.cancel();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let path: String = socket_path
            .chars()
            .take(forward::MAX_SOCKET_PATH + 1)
            .collect();
        if self.forward_check(ForwardKind::RemoteUnix, &path).is_err() {
            return Ok(false);
        }
        if self.remote.len() >= forward::MAX_LISTENERS {
            return Ok(false);
        }
        match forward::listen_unix(&path) {
            Ok(listener) => {
                tracing::info!(peer = %self.ctx.peer, %path, "embedded ssh: remote unix forward listening");
                let key = format!("unix:{path}");
                self.start_remote(
                    key,
                    ForwardKind::RemoteUnix,
                    Listener::Unix(listener, path),
                    session,
                );
                Ok(true)
            }
            Err(e) => {
                tracing::info!(peer = %self.ctx.peer, error = %e, "embedded ssh: remote unix forward failed");
                Ok(false)
            }
        }
    }

    async fn cancel_streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        match self.remote.remove(&format!("unix:{socket_path}")) {
            Some((stop, _hold)) => {
                stop.cancel();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn agent_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        match self.channels.get(&channel) {
            Some(st) if !st.started() && st.agent.is_none() => {}
            _ => return Ok(false),
        }
        if self.forward_check(ForwardKind::Agent, "").is_err() {
            return Ok(false);
        }
        let sock = match forward::AgentSocket::new() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "embedded ssh: cannot make the agent socket");
                return Ok(false);
            }
        };
        let Some(st) = self.channels.get_mut(&channel) else {
            return Ok(false);
        };
        st.agent = Some(fwd::agent_path(&sock).display().to_string());
        let stop = st.stop.child_token();
        st.agent_hold = Some(
            self.holdings
                .hold(Asked::Forward(ForwardKind::Agent), stop.clone()),
        );
        tokio::spawn(fwd::serve_agent(session.handle(), sock, stop));
        Ok(true)
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(st) = self.channels.remove(&channel) {
            st.stop.cancel();
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = self
            .channels
            .get_mut(&channel)
            .and_then(|st| st.input.take())
        {
            let _ = tx.send(Input::Eof).await;
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let tx = self.channels.get(&channel).and_then(|st| st.input.clone());
        if let Some(tx) = tx {
            // Waits only when the queue is full (the child is not reading).
            let _ = tx.send(Input::Data(data.to_vec())).await;
        }
        Ok(())
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(st) if !st.started() => {
                st.pty = Some(PtyRequest {
                    term: term.chars().take(64).collect(),
                    cols: clamp16(col_width, 80),
                    rows: clamp16(row_height, 24),
                });
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match self.channels.get_mut(&channel) {
            Some(st)
                if !st.started() && process::env_allowed(variable_name) && st.env.len() < 64 =>
            {
                st.env
                    .push((variable_name.to_string(), variable_value.to_string()));
                session.channel_success(channel)
            }
            _ => session.channel_failure(channel),
        }
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match std::str::from_utf8(data) {
            Ok(cmd) => self.start(channel, Want::Exec(cmd.to_string()), session),
            Err(_) => session.channel_failure(channel),
        }
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, Want::Shell, session)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if name == "sftp" {
            self.start(channel, Want::Sftp, session)
        } else {
            tracing::info!(peer = %self.ctx.peer, subsystem = %name.chars().take(64).collect::<String>(), "embedded ssh: unknown subsystem");
            session.channel_failure(channel)
        }
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        _pix_width: u32,
        _pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(st) = self.channels.get_mut(&channel) {
            let (cols, rows) = (clamp16(col_width, 80), clamp16(row_height, 24));
            match (&st.control, &mut st.pty) {
                (Some(c), _) => c.resize(cols, rows),
                (None, Some(p)) => {
                    p.cols = cols;
                    p.rows = rows;
                }
                (None, None) => {}
            }
        }
        session.channel_success(channel)
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(c) = self
            .channels
            .get(&channel)
            .and_then(|st| st.control.as_ref())
        {
            c.signal(sig_name(&signal));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host key's public half is the id52's key, so `known-hosts` needs no secret.
    #[test]
    fn host_key_matches_id52() {
        let secret = crate::keys::generate();
        let id = crate::keys::public_id(&secret);
        let pk = host_key(&secret).public_key().to_openssh().unwrap();
        assert_eq!(pk, known_hosts_key(&id));
        assert!(pk.starts_with("ssh-ed25519 AAAA"));
        let line = known_hosts_line(&["foo.acme".into(), "foo.x".into()], &id);
        assert!(line.starts_with("foo.acme,foo.x ssh-ed25519 "));
    }
}
