//! Config sync (DESIGN §5): the manager keeps every member's copy of the cluster file equal
//! to its own (without the manager's key settings); members accept files only from their
//! manager and apply them without a restart.
//!
//! - [`manager`]: the manager's poller ([`manager::Syncer`]), run inside its server.
//! - [`member`]: a member's side: apply a pushed file, pull one.
//! - [`follow`]: a member's schedule of checks with the manager (devices get no pushes).
//! - [`request`]: the `config-push` and `config-hash` requests.

pub mod follow;
pub mod manager;
pub mod member;
pub mod request;

use crate::protocol::FrameError;
use crate::protocol::config::MAX_CONFIG_LEN;
use crate::transport::iroh::TransportError;

pub use manager::{Source, Syncer};
pub use request::{push, query};

/// Why one sync request failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("timed out")]
    Timeout,
    /// The peer's ACL said no.
    #[error("denied: {0}")]
    Denied(String),
    /// The peer could not serve the request.
    #[error("{0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(FrameError),
    #[error("cluster file of {0} bytes is over the {MAX_CONFIG_LEN}-byte limit")]
    TooLarge(usize),
}

// By hand rather than `#[from]`: the message includes the cause already.
impl From<FrameError> for SyncError {
    fn from(e: FrameError) -> Self {
        SyncError::Protocol(e)
    }
}
