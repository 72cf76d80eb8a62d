//! The two config-sync requests, `config-push` and `config-hash`, from whichever endpoint or
//! key holder the caller dials from (`session::dial`): the manager's poller, `cluster
//! push`, `cluster status`, and a member's pull.

use std::net::SocketAddr;
use std::time::Duration;

use super::SyncError;
use crate::id52::Id52;
use crate::protocol::Request;
use crate::protocol::config::{
    ConfigFile, HashQuery, HashReply, MAX_CONFIG_LEN, PushAck, read_config_frame,
    write_config_frame,
};
use crate::session::SessionError;
use crate::session::dial::{Dialed, Dialer};

/// Dial `peer` and open one accepted request for cluster `cluster`.
async fn open(
    dialer: &Dialer,
    cluster: &Id52,
    peer: &Id52,
    hints: &[SocketAddr],
    request: Request,
) -> Result<Dialed, SyncError> {
    dialer
        .request(*cluster, *peer, hints, request)
        .await
        .map_err(|e| match e {
            SessionError::Denied(r) => SyncError::Denied(r),
            SessionError::Transport(t) => SyncError::Transport(t),
            SessionError::Protocol(f) => SyncError::Protocol(f),
            SessionError::Timeout(_) => SyncError::Timeout,
            e => SyncError::Refused(e.to_string()),
        })
}

/// `config-push`: send `text` (whose hash is `hash`) to `member`; returns the member's ack and
/// the connection's round-trip time.
pub async fn push(
    node: &Dialer,
    cluster: &Id52,
    member: &Id52,
    hints: &[SocketAddr],
    text: &str,
    hash: &str,
    timeout: Duration,
) -> Result<(PushAck, Duration), SyncError> {
    if text.len() > MAX_CONFIG_LEN {
        return Err(SyncError::TooLarge(text.len()));
    }
    let exchange = async {
        let request = Request::ConfigPush {
            hash: hash.to_string(),
        };
        let mut st = open(node, cluster, member, hints, request).await?;
        let result = async {
            write_config_frame(
                &mut st.send,
                &ConfigFile {
                    text: text.to_string(),
                },
            )
            .await?;
            read_config_frame::<_, PushAck>(&mut st.recv).await
        }
        .await;
        let rtt = st.rtt();
        st.close();
        Ok((result?, rtt))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| SyncError::Timeout)?
}

/// `config-hash`: ask `peer` which file it has (and, with `fetch`, the manager for the file).
pub async fn query(
    node: &Dialer,
    cluster: &Id52,
    peer: &Id52,
    hints: &[SocketAddr],
    q: &HashQuery,
    timeout: Duration,
) -> Result<(HashReply, Duration), SyncError> {
    let exchange = async {
        let mut st = open(node, cluster, peer, hints, Request::ConfigHash).await?;
        let result = async {
            write_config_frame(&mut st.send, q).await?;
            read_config_frame::<_, HashReply>(&mut st.recv).await
        }
        .await;
        let rtt = st.rtt();
        st.close();
        Ok((result?, rtt))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| SyncError::Timeout)?
}
