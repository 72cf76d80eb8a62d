//! The routing policy: how this process reaches a cluster, decided in one place for every
//! command that talks to a peer (exec, proxy, forwards, groups, cluster push/pull/status,
//! doctor) — one endpoint per id52 per machine (DESIGN §8).
//!
//! In order, the first that applies:
//! 1. This process already bound the cluster's key (a group's earlier member): reuse it.
//! 2. `MALAI_SSH_AGENT` names an agent that answers: through it. (It holds the key, or
//!    reaches the server that does.) A socket there that is not trusted is warned about
//!    and not used.
//! 3. The lock file names a holder (the server, else an agent started without the
//!    variable): through its control socket. A holder that is shutting down still holds the
//!    lock for a moment after its socket is gone: wait for it (up to 3 s) rather than fail.
//! 4. `MALAI_LOCKDOWN_MODE=true`: refuse, naming the agent and how to start one — the CLI
//!    never reads a secret key.
//! 5. Bind the key for this command's length (a shared claim: concurrent commands may
//!    too; a server or agent cannot start holding it meanwhile).
//!
//! Servers reached `ssh-via` need no malai key and never come here.

use std::sync::Arc;
use std::time::Duration;

use super::SessionError;
use super::own::OwnEndpoint;
use crate::config::ClusterConfig;
use crate::config::store::ClusterDir;
use crate::control::client::{ConnectError, ControlClient};
use crate::control::lock::{self, Claimed, Role};

/// How often, and how long, a holder whose socket does not answer is waited for.
const HOLDER_RETRY: Duration = Duration::from_millis(100);
const HOLDER_TRIES: usize = 30;

/// How a command reaches a cluster.
pub enum Route {
    /// A key holder's control socket (the agent, or the server).
    Holder(ControlClient),
    /// This process's own endpoint.
    Own(Arc<OwnEndpoint>),
}

/// Decide how to reach `dir`'s cluster (module docs: the order).
pub async fn route(dir: &ClusterDir, cfg: Option<&ClusterConfig>) -> Result<Route, SessionError> {
    if let Some(own) = OwnEndpoint::existing(&dir.alias) {
        return Ok(Route::Own(own));
    }
    let lockdown = crate::control::lockdown_mode();
    let mut why = None;
    if let Some(path) = crate::control::socket_from_env() {
        match ControlClient::connect(&path).await {
            Ok(c) => return Ok(Route::Holder(c)),
            Err(e @ ConnectError::Untrusted(_)) => {
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
    let lock_err = |e: lock::LockError| SessionError::Local(e.to_string());
    for _ in 0..HOLDER_TRIES {
        if let Some(h) = lock::holder(dir).map_err(lock_err)?
            && let Some(socket) = h.socket
        {
            match ControlClient::connect(&socket).await {
                Ok(c) => return Ok(Route::Holder(c)),
                Err(e) => {
                    tracing::info!(error = %e, "key holder not answering yet");
                    tokio::time::sleep(HOLDER_RETRY).await;
                    continue;
                }
            }
        }
        if lockdown {
            return Err(SessionError::Lockdown(crate::control::lockdown_help(
                why.as_deref(),
            )));
        }
        match lock::claim(dir, Role::Command, None).map_err(lock_err)? {
            Claimed::Mine(claim) => {
                return Ok(Route::Own(OwnEndpoint::bind(dir, cfg, claim).await?));
            }
            // A server or agent took it between our look and our claim: look again.
            Claimed::Held(_) => continue,
        }
    }
    Err(SessionError::Local(format!(
        "cluster {}: its key is held by a process that does not answer on its control socket",
        dir.alias
    )))
}
