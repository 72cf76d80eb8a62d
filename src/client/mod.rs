//! The CLI commands that use a server: native exec (`malai ssh <host> …`), groups, native
//! forwards, `malai ssh proxy` (the OpenSSH ProxyCommand), and the handover of a command's
//! stdio to a key holder. How a peer is reached is the session layer's (`session`); this
//! layer is what the user typed and what their terminal sees.
//!
//! - [`ssh_args`]: the ssh-compatible command line (what rsync and git pass to "ssh").
//! - [`exec`]: native exec: stdin/stdout/stderr, exit status, pty and raw mode.
//! - [`group`]: a command on every server of a group, output prefixed per host.
//! - [`forward`]: `-L`, `-R`, `-D`, `-W`, `-N`, `-f` ([`socks`]: the SOCKS parser).
//! - [`proxy`]: `malai ssh proxy <host> [port]`.
//! - [`handover`]: proxy and exec through a key holder that takes our stdio descriptors.
//! - [`known_hosts`]: `malai ssh known-hosts` for the embedded server's host keys.
//! - [`tty`]: raw mode and the window size.

pub mod exec;
pub mod forward;
pub mod forward_resume;
pub mod group;
pub mod handover;
pub mod known_hosts;
pub mod proxy;
pub mod socks;
pub mod ssh_args;
pub mod tty;

pub use crate::session::SessionError;
