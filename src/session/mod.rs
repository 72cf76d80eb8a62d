//! THE way to reach a peer: resolve a name against this machine's clusters, decide the
//! route (own endpoint, or the key holder's control socket), open one request and get an
//! accepted byte stream, keep a link for forwards, watch the connection's liveness. Every
//! command that talks to a peer (exec, proxy, forwards, groups, cluster push/pull/status,
//! the agent's and the server's pools) goes through this module, and it has one error type.
//!
//! - [`resolve`]: host names → cluster, server, service or group.
//! - [`route`]: the routing policy (one function; its order is written there).
//! - [`open`]: a request on a route → an accepted [`open::Session`].
//! - [`dial`]: a request from a known endpoint or holder (config sync, the pools).
//! - [`connect`]: a command's own dial to a server, naming the relays when they are why it
//!   fails.
//! - [`link`]: one route kept for many requests (native forwards).
//! - [`own`]: the endpoint a command binds itself when nobody holds the key.
//! - [`liveness`]: noticing a restarted server (boot id probes).
//! - [`resume`]: the resumable byte stream (both ends' engine) and the client's redial.
//! - [`exec_resume`]: native exec's frames over a resumable session (both clients').
//! - [`registry`]: this machine's resumable client sessions, for status.
//! - [`ssh_via`]: servers reached through OpenSSH + `malai ssh stdinserver`.
//! - [`via_resume`]: a resumable session carried by `ssh-via` (redials spawn a new ssh).

pub mod connect;
pub mod dial;
pub mod exec_resume;
pub mod link;
pub mod liveness;
pub mod open;
pub mod own;
pub mod registry;
pub mod resolve;
pub mod resume;
pub mod route;
pub mod ssh_via;
pub mod via_resume;

use std::time::Duration;

use crate::config::ResolveError;
use crate::config::store::StoreError;
use crate::keys::KeyError;
use crate::protocol::FrameError;
use crate::transport::iroh::TransportError;

pub use open::{
    Session, SessionRead, SessionWrite, exchange, open, open_on, open_with, request_on,
};
pub use resolve::{LocalClusters, Resolved, my_id52, resolve};
pub use route::{Route, route};

/// Dialing plus handshake (through a relay when there is no direct path yet). The QUIC
/// idle limit is long (sessions ride out outages), so this is what bounds a dial to a
/// server that is down or unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a sent request waits for the server's `accept`/`deny`. The connection is up by
/// then, so this only bounds a server that is alive but slow (a loaded machine spawning the
/// command, which it does before it answers; its own 10 s connect to sshd) or one that
/// never answers; a dead server is noticed by the liveness watchdog and the idle limit.
/// 15 s was measured too short: 1 of 1,000 concurrent execs on a machine at load 27.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// How long closing a command's own endpoint may wait for the peers' acknowledgements.
pub(crate) const ENDPOINT_CLOSE: Duration = Duration::from_secs(3);
/// After an error, how long the endpoint's close may wait for acknowledgements.
pub const ABORT_CLOSE: Duration = Duration::from_millis(300);
/// How long to wait for the peer to acknowledge our last bytes before closing.
pub(crate) const LINGER: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Resolve(#[from] ResolveError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("{0}")]
    Transport(#[from] TransportError),
    /// The server's ACL said no; the reason is the server's one line.
    #[error("{0}")]
    Denied(String),
    /// The server could not serve the request (target down, unsupported kind, …).
    #[error("{0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(#[from] FrameError),
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// A local signal ended the session (ssh's wording).
    #[error("Killed by signal {0}.")]
    Killed(i32),
    /// The command line asks for something this command cannot do.
    #[error("{0}")]
    Usage(String),
    /// Something on this machine failed (a local socket, a lock file, a terminal).
    #[error("{0}")]
    Local(String),
    /// The session broke after the server accepted it.
    #[error("{0}")]
    Lost(String),
    #[error("{0} is a {1}; use a server name")]
    NotAServer(String, &'static str),
    #[error("{0}")]
    SshVia(#[from] ssh_via::SshViaError),
    #[error("server closed the stream without answering")]
    NoAnswer,
    /// `MALAI_LOCKDOWN_MODE=true` and no usable agent: the CLI may not read a secret key.
    #[error("{0}")]
    Lockdown(String),
    /// The key holder (the agent, or the server's control socket) failed while serving
    /// the request.
    #[error("{0}")]
    Holder(String),
}

impl SessionError {
    /// A key holder's answer to a `stream` or `open` as the command's error.
    pub fn from_holder(e: crate::control::client::RequestError) -> SessionError {
        use crate::control::client::RequestError;
        use crate::control::protocol::FailKind;
        match e {
            RequestError::Failed {
                kind: FailKind::Denied,
                message,
            } => SessionError::Denied(message),
            RequestError::Failed { message, .. } => SessionError::Refused(message),
            other => SessionError::Holder(other.to_string()),
        }
    }
}

impl From<crate::control::client::ConnectError> for SessionError {
    fn from(e: crate::control::client::ConnectError) -> Self {
        SessionError::Holder(e.to_string())
    }
}
