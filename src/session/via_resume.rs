//! A resumable session through `ssh-via` (issue 18): the same engine and run loop as over
//! iroh (`session::resume`), carried by an `ssh` child whose remote end is `malai ssh
//! stdinserver`. When that ssh ends (its TCP connection died, ssh's keepalives gave up, it
//! was killed) a fresh `ssh` presents the session and the count it received, and the
//! byte stream goes on where it stopped: the server daemon keeps the session detached the
//! way it does for an iroh peer (stdinserver hands the daemon its descriptors).
//!
//! What differs from iroh, and why:
//! - **Dead-peer notice** is ssh's own: `ServerAliveInterval`/`ServerAliveCountMax`
//!   ([`ALIVE`]), so a cut link ends the ssh child within about 30 s. A user's `-o` (or
//!   `MALAI_SSH_COMMAND`) comes first on ssh's command line and so wins.
//! - **Redials are whole ssh runs** (TCP, key exchange, auth, the forced command): a new
//!   one starts every second at first, every 15 s at most after a long outage ([`PACE`]).
//!   They run with `BatchMode=yes` (never a prompt in the middle of a session) and their
//!   stderr goes to the log, not the user's terminal.
//! - **A stopped server** is an answer, not an outage: the forced command that finds no
//!   server says so in-band (`server::stdinserver`), and the resume is refused with it.
//! - **Attempts do not take turns.** Over iroh the resume waits for its turn after the
//!   connection is up; an ssh's request is sent before ssh has connected, so a turn held
//!   across it would serialize every attempt behind one hanging on a dead path. When two
//!   resumes do reach the server, the later one takes the session from the earlier
//!   (`server::resume`, "taken over by a newer stream"): the client keeps the first answer,
//!   loses that attachment, and resumes once more. Counts make that harmless.
//! - **A restarted server** is told apart from an expired session by its boot id, asked
//!   with a `ping` over one more ssh after a refusal.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::open::{Accepted, Closer, Session, SessionRead, SessionWrite, exchange_for};
use super::resolve::Resolved;
use super::resume::{
    Attempt, Carrier, End, Opened, Pace, Resumable, Stream, Turn, redial_until, short,
};
use super::ssh_via::{self, SshChild, Stderr};
use super::{LINGER, SessionError};
use crate::config::Server;
use crate::id52::Id52;
use crate::protocol::resume::{Grant, Resume};
use crate::protocol::{self, Header, PingInfo, Request};

/// ssh's keepalive for a resumable session's child: a probe after 10 s of silence, gone
/// after 3 unanswered (≈ 30–40 s to notice a dead link; then the session resumes).
/// Shorter would end sessions' ssh on every long Wi-Fi blip for nothing; longer leaves a
/// frozen terminal longer.
pub const ALIVE: [&str; 2] = ["ServerAliveInterval=10", "ServerAliveCountMax=3"];

/// Redials through ssh: a fresh attempt every second (one whose TCP SYN went out during
/// the outage retries only after seconds; a fresh one connects as soon as the link is
/// back), slowing to one every 15 s over a long outage (a tenth of the time detached: an
/// ssh that fails to log in, say, is not run 43,200 times over a 12 h keep time), at most
/// 4 at once, each given 20 s for TCP, key exchange, auth and the answer on a slow path.
pub const PACE: Pace = Pace {
    every: Duration::from_secs(1),
    slowest: Duration::from_secs(15),
    parallel: 4,
    timeout: Duration::from_secs(20),
};

/// How long asking for the server's boot id, or telling it a session is over, may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(15);

/// A resumable session's carrier: the ssh child whose stdio is its network stream now.
pub struct ViaNet {
    server: Server,
    cluster: Id52,
    /// The user's `-o` options, then [`ALIVE`].
    options: Vec<String>,
    child: Option<SshChild>,
    send: SessionWrite,
    recv: SessionRead,
}

/// The ssh options of a resumable session: the user's first (ssh keeps the first value it
/// is given), then [`ALIVE`].
fn session_options(user: &[String]) -> Vec<String> {
    let mut o = user.to_vec();
    o.extend(ALIVE.map(String::from));
    o
}

/// Ask `server` (reached `ssh-via`) for `request` — a `tunnel` or an `exec` that asks for
/// resume — through an ssh whose stderr is the user's (host key, auth errors).
pub async fn open(
    resolved: &Resolved,
    server: &Server,
    request: Request,
    user_options: &[String],
) -> Result<Opened, SessionError> {
    let via = server
        .ssh_via
        .as_deref()
        .ok_or_else(|| SessionError::Local("the server has no ssh-via".into()))?;
    let kind = request.kind();
    let options = session_options(user_options);
    let accepted = Arc::new(AtomicBool::new(false));
    let stderr = Stderr::UntilAccepted(accepted.clone());
    let (child, stdin, stdout) =
        ssh_via::spawn_with(via, server.ssh_identity_file.as_deref(), &options, stderr)?;
    let mut send = SessionWrite::Pipe(Some(stdin));
    let mut recv = SessionRead::Pipe(stdout);
    let header = Header {
        cluster: Some(resolved.config.manager),
        request,
    };
    match exchange_for(&mut send, &mut recv, header).await {
        Ok(Accepted::Plain) => Ok(Opened::Plain(Box::new(Session {
            closer: Closer::Ssh(child),
            send,
            recv,
        }))),
        Ok(Accepted::Resumable(grant)) => {
            accepted.store(true, Ordering::SeqCst);
            tracing::info!(server = %server.name, kind, session = %short(&grant.session), keep_secs = grant.keep_secs, "resumable {kind} through ssh");
            let carrier = ViaNet {
                server: server.clone(),
                cluster: resolved.config.manager,
                options,
                child: Some(child),
                send,
                recv,
            };
            Ok(Opened::Via(Box::new(Resumable::new(
                carrier,
                &resolved.dir,
                kind,
                grant,
            ))))
        }
        Err(e) => Err(super::open::ssh_failed(child, e).await),
    }
}

/// One request over a fresh, quiet ssh (stderr to the log, never a prompt): its stream
/// and the server's answer.
async fn quiet_request(
    server: &Server,
    options: &[String],
    cluster: Id52,
    request: Request,
) -> Result<(SshChild, SessionWrite, SessionRead, Accepted), SessionError> {
    let via = server
        .ssh_via
        .as_deref()
        .ok_or_else(|| SessionError::Local("the server has no ssh-via".into()))?;
    let mut options = options.to_vec();
    options.push("BatchMode=yes".into());
    let (child, stdin, stdout) = ssh_via::spawn_with(
        via,
        server.ssh_identity_file.as_deref(),
        &options,
        Stderr::Log,
    )?;
    let mut send = SessionWrite::Pipe(Some(stdin));
    let mut recv = SessionRead::Pipe(stdout);
    let header = Header {
        cluster: Some(cluster),
        request,
    };
    match exchange_for(&mut send, &mut recv, header).await {
        Ok(a) => Ok((child, send, recv, a)),
        Err(e) => {
            child.kill().await;
            Err(e)
        }
    }
}

/// The server's boot id, asked with a `ping` over one more ssh.
async fn boot_of(server: &Server, options: &[String], cluster: Id52) -> Option<String> {
    let asked = async {
        let (child, _send, mut recv, _) = quiet_request(server, options, cluster, Request::Ping)
            .await
            .ok()?;
        let info: Option<PingInfo> = protocol::read_json(&mut recv).await.ok();
        child.kill().await;
        info.map(|i| i.boot)
    };
    tokio::time::timeout(ASK_TIMEOUT, asked)
        .await
        .ok()
        .flatten()
}

/// Tell `server` (reached `ssh-via`) that the session `close` names is over (a resume
/// with `close`), so it does not keep it detached for its keep time; `true` when it
/// answered.
pub async fn tell_closed(server: &Server, cluster: Id52, close: Resume) -> bool {
    tell_closed_with(server, &session_options(&[]), cluster, close).await
}

/// [`tell_closed`] with the session's own ssh options.
async fn tell_closed_with(
    server: &Server,
    options: &[String],
    cluster: Id52,
    close: Resume,
) -> bool {
    let asked = async {
        let (child, ..) = quiet_request(server, options, cluster, Request::Resume(close))
            .await
            .ok()?;
        child.kill().await;
        Some(())
    };
    tokio::time::timeout(ASK_TIMEOUT, asked)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// One resume over a fresh ssh.
async fn attempt(
    server: Server,
    options: Vec<String>,
    cluster: Id52,
    resume: Resume,
    turn: Turn,
) -> Result<(SshChild, SessionWrite, SessionRead, Grant), Attempt> {
    match quiet_request(&server, &options, cluster, Request::Resume(resume)).await {
        Ok((child, send, recv, Accepted::Resumable(g))) => {
            let mut resumed = turn.lock().await;
            if *resumed {
                child.kill().await;
                return Err(Attempt::Retry("another attempt resumed".into()));
            }
            *resumed = true;
            Ok((child, send, recv, g))
        }
        Ok((child, ..)) => {
            child.kill().await;
            Err(Attempt::Refused {
                reason: "the server answered a resume with a plain accept".into(),
                boot: None,
            })
        }
        Err(SessionError::Denied(reason)) | Err(SessionError::Refused(reason)) => {
            let boot = boot_of(&server, &options, cluster).await;
            Err(Attempt::Refused { reason, boot })
        }
        Err(e) => Err(Attempt::Retry(e.to_string())),
    }
}

impl ViaNet {
    async fn tell_closed(&self, close: Resume) {
        let answered = tell_closed_with(&self.server, &self.options, self.cluster, close).await;
        tracing::info!(server = %self.server.name, answered, "abandoned while detached; asked the server to end the session");
    }

    async fn kill(&mut self) {
        if let Some(c) = self.child.take() {
            c.kill().await;
        }
    }
}

impl Carrier for ViaNet {
    type R = SessionRead;
    type W = SessionWrite;

    fn server(&self) -> &str {
        &self.server.name
    }

    fn net(&mut self) -> (&mut SessionRead, &mut SessionWrite) {
        (&mut self.recv, &mut self.send)
    }

    fn outages(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    async fn abandon(&mut self, close: Resume) {
        self.kill().await;
        // The server sees only the ssh go: it would keep the session detached.
        self.tell_closed(close).await;
    }

    async fn closed(&mut self) {
        if let Some(c) = self.child.take() {
            c.finish(Duration::from_millis(500)).await;
        }
    }

    async fn ended(&mut self, end: End) {
        let wait = if end == End::Finished {
            LINGER
        } else {
            Duration::from_millis(500)
        };
        // Closing ssh's stdin is its EOF; it exits once the server's side is done.
        self.send = SessionWrite::Pipe(None);
        if let Some(c) = self.child.take() {
            c.finish(wait).await;
        }
    }

    async fn broken(&mut self) -> Result<(), SessionError> {
        // Nothing here tells an ssh that died from one the server ended: a server that
        // ended the session refuses the resume, and says why.
        Ok(())
    }

    fn detach(&mut self) {
        // Dropped, the child is killed (`kill_on_drop`).
        self.child = None;
        self.send = SessionWrite::Pipe(None);
    }

    async fn redial(
        &mut self,
        stream: &Stream,
        grant: &Grant,
        close: &CancellationToken,
    ) -> Result<Option<u64>, SessionError> {
        let (server, options, cluster) = (self.server.clone(), self.options.clone(), self.cluster);
        let attempt =
            move |resume, turn| attempt(server.clone(), options.clone(), cluster, resume, turn);
        let Some((child, send, recv, granted)) =
            redial_until(stream, grant, &self.server.name, close, PACE, attempt).await?
        else {
            return Ok(None);
        };
        self.child = Some(child);
        self.send = send;
        self.recv = recv;
        Ok(Some(granted.received))
    }

    async fn gave_up(&mut self, closed: Option<Resume>) {
        self.kill().await;
        if let Some(close) = closed {
            self.tell_closed(close).await;
        }
    }

    async fn failed(&mut self) {
        self.kill().await;
    }
}
