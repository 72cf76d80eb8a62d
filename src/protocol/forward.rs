//! The `forward` request: one forwarded connection (native `malai ssh -L`, `-D`, `-W`) is
//! one stream whose header names where the server should connect.
//!
//! Header: `{"kind": "forward", "to": {"tcp": {"host": "db", "port": 5432}}}` or
//! `{"kind": "forward", "to": {"unix": {"path": "/run/x.sock"}}}`. The server asks the ACL
//! (`forward`: full access, and `forwarding` not off), then connects *before* answering, so
//! an unreachable target is an `error` frame the client can report (a SOCKS failure reply,
//! `-W`'s exit 255) rather than a stream that closes silently. After `accept` the stream is
//! that connection, raw bytes both ways with half-close, like `tunnel`.

use serde::{Deserialize, Serialize};

/// Longest host name in a `forward` header (DNS's limit); longer is refused before any IO.
pub const MAX_HOST_LEN: usize = 255;
/// Longest unix socket path (Linux `sun_path` is 108 bytes including the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Where the server connects for a `forward` stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ForwardTarget {
    Tcp { host: String, port: u16 },
    Unix { path: String },
}

impl ForwardTarget {
    /// `host:port` or the path, for logs and the audit line.
    pub fn describe(&self) -> String {
        match self {
            ForwardTarget::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
            ForwardTarget::Tcp { host, port } => format!("{host}:{port}"),
            ForwardTarget::Unix { path } => path.clone(),
        }
    }

    /// The limits above: `Err` is a one-line reason for the peer.
    pub fn check(&self) -> Result<(), String> {
        match self {
            ForwardTarget::Tcp { host, .. } => {
                if host.is_empty() || host.len() > MAX_HOST_LEN || host.contains('\0') {
                    return Err("bad forward host".into());
                }
            }
            ForwardTarget::Unix { path } => {
                if path.is_empty() || path.len() > MAX_SOCKET_PATH || path.contains('\0') {
                    return Err("bad forward socket path".into());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_shape_and_limits() {
        let t = ForwardTarget::Tcp {
            host: "db".into(),
            port: 5432,
        };
        assert_eq!(
            serde_json::to_string(&t).unwrap(),
            r#"{"tcp":{"host":"db","port":5432}}"#
        );
        let u: ForwardTarget = serde_json::from_str(r#"{"unix":{"path":"/run/x.sock"}}"#).unwrap();
        assert_eq!(u.describe(), "/run/x.sock");
        assert!(u.check().is_ok());
        assert!(
            serde_json::from_str::<ForwardTarget>(r#"{"tcp":{"host":"h","port":70000}}"#).is_err()
        );
        assert!(serde_json::from_str::<ForwardTarget>(r#"{"udp":{}}"#).is_err());
        let long = ForwardTarget::Tcp {
            host: "a".repeat(256),
            port: 1,
        };
        assert!(long.check().is_err());
        let v6 = ForwardTarget::Tcp {
            host: "::1".into(),
            port: 22,
        };
        assert_eq!(v6.describe(), "[::1]:22");
        assert!(
            ForwardTarget::Unix {
                path: "/x".repeat(60)
            }
            .check()
            .is_err()
        );
    }
}

/// What a `remote-forward` request asks the server to listen on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RemoteListen {
    /// `-R [address:]port:…`: a TCP port on the server (loopback only, like sshd's
    /// `GatewayPorts no`); port 0 lets the server pick.
    Tcp { address: String, port: u16 },
    /// `-R /remote.sock:…`: a unix socket on the server (an existing file is an error).
    Unix { path: String },
    /// `-A`: a private agent socket; its path goes to the remote command as
    /// `SSH_AUTH_SOCK` (the exec request's env).
    Agent {},
}

/// Frames the server sends on a `remote-forward` stream after `accept` (same framing and
/// 64 KiB cap as headers). The client sends nothing; its EOF (or the stream's end) closes
/// the listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum RemoteEvent {
    /// Once, first: where the server listens (`port` for TCP, `path` for unix and agent).
    Listening {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        port: Option<u16>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        path: Option<String>,
    },
    /// A connection arrived; the client claims it with a `remote-connection` stream
    /// naming `id` within [`PENDING_TTL`](crate::protocol::forward::PENDING_TTL).
    Connection { id: u64 },
}

/// How long an accepted remote-forward connection waits for the client's
/// `remote-connection` stream before it is dropped.
pub const PENDING_TTL: std::time::Duration = std::time::Duration::from_secs(30);
/// Accepted connections waiting to be claimed, server-wide; more are closed at once.
pub const MAX_PENDING: usize = 1024;
