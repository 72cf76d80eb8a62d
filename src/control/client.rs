//! The client side of the control socket: connect to a key holder (the agent or the
//! server), check it speaks our version, and make one request.
//!
//! Only a socket in a directory of ours, served by this user, gets our stdio and tty
//! descriptors (`localsock`, docs/security.md). What a request *means* to a command (a
//! handover of stdio, a stream for a forward) is decided above, in `session` and `client`.

use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::UnixStream;

use super::protocol::{
    self, ControlError, FailKind, FromHolder, HolderHello, HolderStatus, ToHolder, VERSION,
};
use crate::id52::Id52;

/// How long a client waits for the holder's hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a control connection could not be used; one line each.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("agent socket not trusted: {0}")]
    Untrusted(#[from] crate::localsock::SocketTrustError),
    #[error("no agent at {path}: {source}")]
    Unreachable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent at {path} did not answer within {secs} s")]
    Timeout { path: PathBuf, secs: u64 },
    #[error(
        "the agent at {path} (pid {pid}) speaks control protocol {theirs}; this malai speaks {ours}"
    )]
    Version {
        path: PathBuf,
        pid: u32,
        theirs: u32,
        ours: u32,
    },
    #[error("agent at {path}: {source}")]
    Control {
        path: PathBuf,
        #[source]
        source: ControlError,
    },
}

/// How a `stream` or `open` request ended before any payload.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The holder (or the server behind it) said no.
    #[error("{message}")]
    Failed { kind: FailKind, message: String },
    /// The control connection broke or spoke out of turn.
    #[error("key holder at {path}: {source}")]
    Lost {
        path: PathBuf,
        #[source]
        source: ControlError,
    },
    #[error("key holder at {path} sent {got} instead of opened")]
    Unexpected { path: PathBuf, got: String },
}

/// A control connection that has passed the hello.
pub struct ControlClient {
    sock: UnixStream,
    path: PathBuf,
    pub hello: HolderHello,
}

impl ControlClient {
    /// Connect to the holder at `path` and check it speaks our version.
    pub async fn connect(path: &Path) -> Result<ControlClient, ConnectError> {
        let control = |source| ConnectError::Control {
            path: path.to_path_buf(),
            source,
        };
        let exchange = async {
            let mut sock: UnixStream =
                crate::localsock::connect(path).await.map_err(|e| match e {
                    crate::localsock::ConnectError::Trust(t) => ConnectError::Untrusted(t),
                    crate::localsock::ConnectError::Io(source) => ConnectError::Unreachable {
                        path: path.to_path_buf(),
                        source,
                    },
                })?;
            let token = super::token::read(path);
            protocol::write(
                &mut sock,
                &ToHolder::Hello {
                    version: VERSION,
                    token,
                },
            )
            .await
            .map_err(control)?;
            match protocol::read::<_, FromHolder>(&mut sock)
                .await
                .map_err(control)?
            {
                FromHolder::Hello(h) => Ok((sock, h)),
                other => Err(control(ControlError::Malformed(format!(
                    "expected hello, got {other:?}"
                )))),
            }
        };
        let (sock, hello) = tokio::time::timeout(HELLO_TIMEOUT, exchange)
            .await
            .map_err(|_| ConnectError::Timeout {
                path: path.to_path_buf(),
                secs: HELLO_TIMEOUT.as_secs(),
            })??;
        if hello.version != VERSION {
            return Err(ConnectError::Version {
                path: path.to_path_buf(),
                pid: hello.pid,
                theirs: hello.version,
                ours: VERSION,
            });
        }
        Ok(ControlClient {
            sock,
            path: path.to_path_buf(),
            hello,
        })
    }

    fn control(&self, source: ControlError) -> ConnectError {
        ConnectError::Control {
            path: self.path.clone(),
            source,
        }
    }

    fn lost(&self, source: ControlError) -> RequestError {
        RequestError::Lost {
            path: self.path.clone(),
            source,
        }
    }

    pub async fn status(mut self) -> Result<HolderStatus, ConnectError> {
        protocol::write(&mut self.sock, &ToHolder::Status)
            .await
            .map_err(|e| self.control(e))?;
        match protocol::read::<_, FromHolder>(&mut self.sock).await {
            Ok(FromHolder::Status(s)) => Ok(s),
            Ok(other) => Err(self.control(ControlError::Malformed(format!(
                "expected status, got {other:?}"
            )))),
            Err(e) => Err(self.control(e)),
        }
    }

    /// Ask the agent to shut down; returns once it has acknowledged.
    pub async fn stop(mut self) -> Result<(), ConnectError> {
        protocol::write(&mut self.sock, &ToHolder::Stop)
            .await
            .map_err(|e| self.control(e))?;
        match protocol::read::<_, FromHolder>(&mut self.sock).await {
            Ok(FromHolder::Stopping) => Ok(()),
            Ok(other) => Err(self.control(ControlError::Malformed(format!(
                "expected stopping, got {other:?}"
            )))),
            Err(e) => Err(self.control(e)),
        }
    }

    /// Ask the agent to give up `cluster`'s key (a server is starting).
    pub async fn release(mut self, cluster: &str) -> Result<(), RequestError> {
        let msg = ToHolder::Release {
            cluster: cluster.to_string(),
        };
        protocol::write(&mut self.sock, &msg)
            .await
            .map_err(|e| self.lost(e))?;
        match protocol::read::<_, FromHolder>(&mut self.sock).await {
            Ok(FromHolder::Released) => Ok(()),
            Ok(other) => Err(RequestError::Unexpected {
                path: self.path.clone(),
                got: format!("{other:?}"),
            }),
            Err(e) => Err(self.lost(e)),
        }
    }

    /// One request stream to `peer` of `cluster` on the key the holder binds (the
    /// protocol's `stream`): the returned socket carries the stream's raw bytes once the
    /// server accepted.
    pub async fn stream(
        mut self,
        cluster: &str,
        peer: Id52,
        hints: &[std::net::SocketAddr],
        request: crate::protocol::Request,
    ) -> Result<UnixStream, RequestError> {
        let msg = ToHolder::Stream {
            cluster: cluster.to_string(),
            peer,
            hints: hints.to_vec(),
            request,
        };
        protocol::write(&mut self.sock, &msg)
            .await
            .map_err(|e| self.lost(e))?;
        self.opened().await?;
        Ok(self.sock)
    }

    /// Send an `open` (a request on the caller's own descriptors: stdin first when
    /// `stdin`) and wait until the server accepted.
    pub async fn open(
        &mut self,
        host: &str,
        request: protocol::OpenRequest,
        stdin: bool,
        fds: &[RawFd],
    ) -> Result<(), RequestError> {
        let msg = ToHolder::Open {
            host: host.to_string(),
            request,
            stdin,
        };
        protocol::write_with_fds(&self.sock, &msg, fds)
            .await
            .map_err(|e| self.lost(e))?;
        self.opened().await
    }

    async fn opened(&mut self) -> Result<(), RequestError> {
        match protocol::read::<_, FromHolder>(&mut self.sock).await {
            Ok(FromHolder::Opened) => Ok(()),
            Ok(FromHolder::Failed { kind, message }) => Err(RequestError::Failed { kind, message }),
            Ok(other) => Err(RequestError::Unexpected {
                path: self.path.clone(),
                got: format!("{other:?}"),
            }),
            Err(e) => Err(self.lost(e)),
        }
    }

    /// The holder's next frame after `opened` (`exit`, `done`, `broken`).
    pub async fn next(&mut self) -> Result<FromHolder, RequestError> {
        let r = protocol::read::<_, FromHolder>(&mut self.sock).await;
        r.map_err(|e| self.lost(e))
    }

    /// Send one frame after `opened` (`window`, `finish`).
    pub async fn send(&mut self, msg: &ToHolder) -> Result<(), RequestError> {
        let r = protocol::write(&mut self.sock, msg).await;
        r.map_err(|e| self.lost(e))
    }

    /// The socket, after the hello, for a request this module has no helper for.
    pub fn into_socket(self) -> UnixStream {
        self.sock
    }

    /// The holder's socket.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
