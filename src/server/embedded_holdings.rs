//! What one embedded SSH session holds, and the two rules on it (issue 19, findings 2 and 4).
//!
//! An OpenSSH connection to the embedded server is one `tunnel` request, but inside it the
//! peer opens channels (each may run a process) and forwards. Two things follow, both kept
//! here so `embedded.rs` only relays:
//!
//! - **Slots** ([`Holdings::slot`]): every channel the peer opens takes one of the peer's
//!   request slots (`ClusterState::admit`, the cap native exec and native forwards have)
//!   *and* one of its kind's per-session slots: [`MAX_SESSION_CHANNELS`] for session
//!   channels (each may run a process and holds a pty or pipes), [`MAX_FORWARD_CHANNELS`]
//!   for forwarded connections (a browser through `-D` opens many). So a peer allowed only
//!   `ls` cannot run hundreds of processes or pin memory through one connection, while a
//!   full-access peer's forwards get the same room natively and through OpenSSH. A channel
//!   over a cap is refused with "resource shortage".
//! - **Revocation** ([`Holdings::watch`]): every allowed channel command and forward is
//!   kept as a [`Holding`] (what the ACL was asked, and a token that cuts it). On each
//!   reload of the cluster file the session asks the ACL again for each; one now denied —
//!   or a shell that is now only a command scope — is cut and audited `"revoked"`, while
//!   the rest of the session goes on. The `tunnel` itself is watched by `request.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::process::Program;
use super::{ClusterState, PeerPermit};
use crate::acl::{self, Decision, ForwardKind, Grant};
use crate::id52::Id52;

/// Session channels (exec, shell, sftp) per SSH session at once. OpenSSH's `MaxSessions`
/// is 10.
pub const MAX_SESSION_CHANNELS: usize = 64;
/// Forwarded connections (`direct-tcpip`, `direct-streamlocal`, agent connections) per SSH
/// session at once; each also takes one of the peer's request slots (256 by default), which
/// is the tighter bound in practice. Measured: a forwarded channel's buffers are small next
/// to a session channel's process.
pub const MAX_FORWARD_CHANNELS: usize = 1024;

/// What a channel is, for its cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Session,
    Forward,
}

/// What was allowed, in the ACL's terms, kept to ask again.
#[derive(Debug, Clone)]
pub enum Asked {
    /// A session channel's command (`None`: login shell or sftp) and what it was allowed
    /// to run: a shell program needs full access still.
    Exec {
        command: Option<String>,
        ran: Program,
    },
    Forward(ForwardKind),
}

impl Asked {
    fn kind(&self) -> &'static str {
        match self {
            Asked::Exec { .. } => "exec",
            Asked::Forward(_) => "forward",
        }
    }

    fn detail(&self) -> String {
        match self {
            Asked::Exec { command, .. } => command
                .clone()
                .unwrap_or_else(|| "(login shell or sftp)".into()),
            Asked::Forward(k) => k.as_str().to_string(),
        }
    }

    /// Whether the ACL's current answer still covers what runs. `Err` is the reason to cut.
    pub fn still_allowed(&self, decision: Decision) -> Result<(), String> {
        match (self, decision) {
            (_, Decision::Deny(reason)) => Err(reason.to_string()),
            (Asked::Exec { ran, .. }, Decision::Allow(grant)) => match (ran, grant) {
                (Program::Shell(_), Grant::Shell) => Ok(()),
                (Program::Argv(a), Grant::Argv(b)) if *a == b => Ok(()),
                // sftp-server runs under full access only.
                (Program::Argv(_), Grant::Shell) => Ok(()),
                _ => Err("access changed: what runs is no longer granted".into()),
            },
            (Asked::Forward(_), Decision::Allow(_)) => Ok(()),
        }
    }

    fn acl_request(&self) -> acl::Request<'_> {
        match self {
            Asked::Exec { command, .. } => acl::Request::Exec {
                command: command.as_deref(),
            },
            Asked::Forward(kind) => acl::Request::Forward { kind: *kind },
        }
    }
}

struct Held {
    asked: Asked,
    cut: CancellationToken,
}

/// Everything one embedded SSH session holds.
pub struct Holdings {
    state: Arc<ClusterState>,
    /// This machine's server name when the session started (re-found on each reload).
    server: String,
    peer: Id52,
    transport: &'static str,
    /// The per-session caps, one per [`ChannelKind`].
    sessions: Arc<Semaphore>,
    forwards: Arc<Semaphore>,
    held: Mutex<HashMap<u64, Held>>,
    next: AtomicU64,
}

/// One channel's slot: freed (both caps) when dropped.
pub struct Slot {
    _session: OwnedSemaphorePermit,
    _peer: PeerPermit,
}

/// A kept grant: forgotten when dropped (the channel or forward ended).
pub struct Holding {
    holdings: Arc<Holdings>,
    id: u64,
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.holdings.lock().remove(&self.id);
    }
}

impl Holdings {
    pub fn new(
        state: Arc<ClusterState>,
        server: String,
        peer: Id52,
        transport: &'static str,
    ) -> Arc<Holdings> {
        Arc::new(Holdings {
            state,
            server,
            peer,
            transport,
            sessions: Arc::new(Semaphore::new(MAX_SESSION_CHANNELS)),
            forwards: Arc::new(Semaphore::new(MAX_FORWARD_CHANNELS)),
            held: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Held>> {
        match self.held.lock() {
            Ok(h) => h,
            Err(p) => p.into_inner(),
        }
    }

    /// A slot for one more channel of `kind`, or why not.
    pub fn slot(&self, kind: ChannelKind) -> Result<Slot, &'static str> {
        let cap = match kind {
            ChannelKind::Session => &self.sessions,
            ChannelKind::Forward => &self.forwards,
        };
        let session = cap
            .clone()
            .try_acquire_owned()
            .map_err(|_| "too many channels on this ssh connection")?;
        let peer = self
            .state
            .admit(self.peer)
            .ok_or("too many concurrent requests from this machine")?;
        Ok(Slot {
            _session: session,
            _peer: peer,
        })
    }

    /// The audit line of one session channel's decision (the `tunnel` around it has its
    /// own): the whole command line, allow or deny and why.
    pub fn audit_exec(&self, what: &str, denied: Option<&String>) {
        let cfg = self.state.current();
        crate::audit::write(&crate::audit::Entry {
            time: crate::audit::now_rfc3339(),
            peer: self.peer.to_string(),
            alias: cfg
                .name_of(&self.peer)
                .map(|(n, _)| n.to_string())
                .unwrap_or_else(|| "-".into()),
            cluster: self.state.dir.alias.clone(),
            transport: self.transport.into(),
            kind: "exec".into(),
            detail: what.to_string(),
            decision: if denied.is_some() { "deny" } else { "allow" }.into(),
            reason: denied.cloned().unwrap_or_default(),
            ..Default::default()
        });
    }

    /// Keep `asked` for re-checks; `cut` is cancelled when it is revoked.
    pub fn hold(self: &Arc<Self>, asked: Asked, cut: CancellationToken) -> Holding {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, Held { asked, cut });
        Holding {
            holdings: self.clone(),
            id,
        }
    }

    /// Re-decide every holding on each reload of the cluster file; never returns (the
    /// session's end drops it).
    pub async fn watch(self: Arc<Self>) {
        let mut rx = self.state.revision.subscribe();
        super::revoke::ensure_poller(&self.state);
        loop {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
            self.recheck();
        }
    }

    /// One re-check against the current file; returns how many holdings were cut.
    pub fn recheck(&self) -> usize {
        let cfg = self.state.current();
        let me = self.state.server_name(&cfg).unwrap_or(self.server.clone());
        let mut cut = 0;
        for held in self.lock().values() {
            if held.cut.is_cancelled() {
                continue;
            }
            let decision = acl::decide(&cfg, &me, &self.peer, &held.asked.acl_request());
            if let Err(reason) = held.asked.still_allowed(decision) {
                tracing::warn!(peer = %self.peer, cluster = %self.state.dir.alias, kind = held.asked.kind(), %reason, "embedded ssh: access revoked; cutting the channel");
                super::revoke::audit_revoked(super::revoke::Revoked {
                    state: &self.state,
                    cfg: &cfg,
                    peer: &self.peer,
                    transport: self.transport,
                    kind: held.asked.kind(),
                    detail: held.asked.detail(),
                    reason: &reason,
                });
                held.cut.cancel();
                cut += 1;
            }
        }
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::DenyReason;

    fn shell() -> Asked {
        Asked::Exec {
            command: None,
            ran: Program::Shell(None),
        }
    }

    #[test]
    fn a_shell_needs_full_access_still() {
        assert!(shell().still_allowed(Decision::Allow(Grant::Shell)).is_ok());
        // Demoted to a command scope: the shell goes.
        let scoped = Decision::Allow(Grant::Argv(vec!["ls".into()]));
        assert!(shell().still_allowed(scoped).is_err());
        assert!(
            shell()
                .still_allowed(Decision::Deny(DenyReason::NotAMember))
                .is_err()
        );
    }

    #[test]
    fn a_scoped_command_keeps_running_only_under_the_same_argv() {
        let ls = Asked::Exec {
            command: Some("ls /".into()),
            ran: Program::Argv(vec!["ls".into(), "/".into()]),
        };
        let same = Decision::Allow(Grant::Argv(vec!["ls".into(), "/".into()]));
        assert!(ls.still_allowed(same).is_ok());
        let other = Decision::Allow(Grant::Argv(vec!["ls".into()]));
        assert!(ls.still_allowed(other).is_err());
        // Promoted to full access: still covered.
        assert!(ls.still_allowed(Decision::Allow(Grant::Shell)).is_ok());
    }

    #[test]
    fn a_forward_lives_while_the_acl_allows_it() {
        let f = Asked::Forward(ForwardKind::Remote);
        assert!(f.still_allowed(Decision::Allow(Grant::Forward)).is_ok());
        assert!(
            f.still_allowed(Decision::Deny(DenyReason::NotAMember))
                .is_err()
        );
    }
}
