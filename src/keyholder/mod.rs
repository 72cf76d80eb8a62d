//! The key-holder service: what the process that holds a cluster's key runs so that every
//! other malai process on the machine can use that key without binding it (one endpoint per
//! id52 per machine, DESIGN §8). The agent runs it for the clusters it holds, the server for
//! the clusters it serves; both on their control socket, with the same protocol
//! (`control::protocol`).
//!
//! - [`pool`]: one endpoint per cluster, one connection per peer, reused.
//! - [`stream`]: one request's stream on a pooled connection, and its lease.
//! - [`resume`]: a resumable session the holder runs for a command, redialled through the
//!   pool.
//! - [`serve`]: one control connection: `status`, `stop`, `release`, `stream`, or `open` on
//!   passed descriptors.
//! - [`fds`]: the descriptors a command passed, as async streams.
//! - [`inbound`]: the server's accepted connections, listed by `status` beside the pool's.
//! - [`accept`]: the bounded accept loop both control sockets (and the HTTP proxy) use.

pub mod accept;
pub mod fds;
pub mod inbound;
pub mod pool;
pub mod resume;
pub mod serve;
pub mod stream;
