//! The bounded accept loop of a local service (the control sockets, the agent's HTTP
//! proxy): at most `max` connections are served at once — more wait in the kernel's
//! backlog, so a runaway script cannot exhaust the holder's descriptors — each one a task
//! owned by the caller's tracker; one connection's failure never ends the loop; shutdown
//! ends it at once.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A listening socket whose accepted connections [`serve`] hands out.
pub trait Listener {
    type Conn: Send + 'static;
    fn accept_one(&self) -> impl Future<Output = std::io::Result<Self::Conn>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Conn = tokio::net::UnixStream;
    async fn accept_one(&self) -> std::io::Result<Self::Conn> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::TcpListener {
    type Conn = (tokio::net::TcpStream, std::net::SocketAddr);
    async fn accept_one(&self) -> std::io::Result<Self::Conn> {
        self.accept().await
    }
}

/// Accept on `listener` until `shutdown`, serving each connection with `handle` in its own
/// task of `tracker`, at most `max` at once. `what` names the socket in log lines.
pub async fn serve<L, F, Fut>(
    listener: L,
    what: &'static str,
    max: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    handle: F,
) where
    L: Listener,
    F: Fn(L::Conn) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept_one() => match r {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept on the {what} failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let work = handle(conn);
        tracker.spawn(async move {
            work.await;
            drop(permit);
        });
    }
}
