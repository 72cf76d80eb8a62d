//! Byte streams that carry the malai protocol.
//!
//! - [`iroh`]: QUIC over iroh; the *only* module that uses iroh's API (it changes between
//!   releases). Identity = the remote's verified id52.
//! - [`stdio`]: this process's stdin/stdout as a fast non-blocking stream (ProxyCommand).
//! - [`fdpass`]: SCM_RIGHTS over unix sockets (stdinserver, agent).
//! - [`fdstream`]: received fds (stdinserver's stdin/stdout) as async streams.
//! - [`probe`]: a cluster's relays probed (TCP, TLS, HTTP, address discovery), each failure
//!   named, for `malai ssh doctor` and for a dial that timed out.
//! - [`failover`]: an endpoint with several relays moves off a dead home relay within
//!   seconds (iroh alone takes 20–26 s or longer) and back once it answers.
//! - [`relay_rejoin`]: after an outage of this machine's own network, a fresh relay
//!   connection at once instead of the kernel's retransmission backoff (seconds, growing).
//! - [`pump`]: moving raw bytes both ways with half-close, shared by every raw-bytes path.

pub mod failover;
pub mod fdpass;
pub mod fdstream;
pub mod iroh;
pub mod probe;
pub mod pump;
pub mod rawfd;
pub mod relay_rejoin;
pub mod stdio;
