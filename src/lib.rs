//! malai ssh: SSH between the machines of a cluster over the iroh peer-to-peer network.
//! "DESIGN §n" in the module docs is a section of `docs/design.md`.
//!
//! ## Layers
//!
//! Lowest first. A module names only modules of its own layer or lower, and the top-level
//! modules never import each other round a circle; `iroh::` appears only in `transport`.
//! The architecture test (`src/architecture.rs`, run by `cargo test`) reads this table and
//! enforces it, naming file and line. A helper two layers need moves down to the lower one.
//!
//! | layer | modules | role |
//! |---|---|---|
//! | L0 | `id52`, `localsock`, `config`, `logging`, `audit`, `table`, `manuals` | ids and secret-key type, trusted local sockets, the cluster file and on-disk layout, tracing to files, the audit log, aligned text tables, man pages and shell completions from a clap command |
//! | L1 | `acl`, `protocol` | the one pure ACL function; the wire protocol (frames, limits, exec pump helpers) |
//! | L2 | `transport`, `keys` | iroh (the only place that names it), stdio and fd streams; secret keys in the keyring or a 0600 file |
//! | L3 | `control` | the local control socket: lock file (who holds a key), control protocol, its client, env names |
//! | L4 | `session` | THE way to reach a peer: resolve a name, the route (own endpoint, the holder's socket), open a request, the link forwards use, liveness, one error type |
//! | L5 | `sync`, `keyholder` | config sync between manager and members; the key-holder service (pool, control server, inbound table) run by agent and server alike |
//! | L6 | `server`, `agent` | `malai ssh server`; `malai ssh agent` (and its HTTP proxy) |
//! | L7 | `client`, `cluster`, `demo`, `doctor` | CLI commands (exec, proxy, forwards, groups, the agent handover); admin commands; the demo; `malai ssh doctor` |
//! | L8 | `cli` | clap definitions and dispatch (`main.rs` only maps errors to exit codes) |
//!
//! ## Module map (find any behaviour by its name), by layer
//! - L0 [`id52`]: the only place machine ids are parsed and printed (and the secret-key type).
//!   [`localsock`]: trust checks of local unix sockets and their private runtime dir.
//!   [`config`]: the cluster file (parse, validate, names, `ssh-via` targets), on-disk
//!   layout, atomic writes. [`logging`]: tracing to files under LOGDIR, peer text escaped;
//!   stdout is never touched. [`audit`]: one JSON line per request decision. [`table`]:
//!   aligned text columns. [`manuals`]: man pages and completions from the clap definitions.
//! - L1 [`acl`]: the one pure function that says who may do what. [`protocol`]: the malai
//!   wire protocol over one byte stream (header, accept/deny, limits, the exec pump).
//! - L2 [`transport`]: iroh (the only module that touches its API), stdio and fd streams.
//!   [`keys`]: per-cluster secret keys in the OS keyring or a 0600 file.
//! - L3 [`control`]: the local control socket — `control::lock` (who holds a key),
//!   `control::protocol`, `control::client`, the environment's names.
//! - L4 [`session`]: how every command reaches a peer — `session::resolve`,
//!   `session::route` (the routing policy), `session::open`, `session::link` (forwards),
//!   `session::dial`, `session::own` (a command's own endpoint), `session::liveness`,
//!   `session::resume` (the resumable byte stream: both ends' engine, the client's redial),
//!   `session::registry` (this machine's resumable client sessions, for status),
//!   `session::ssh_via`, and `SessionError`.
//! - L5 [`sync`]: config sync (the manager's poller, a member's apply and pull, the requests).
//!   [`keyholder`]: the pool and control server both the agent and the server run.
//! - L6 [`server`]: `malai ssh server`: accept loop, the ACL choke point, request handlers,
//!   the embedded SSH server, stdinserver, `server::resume` (detached resumable sessions). [`agent`]: `malai ssh agent` and its HTTP proxy.
//! - L7 [`client`]: native exec, groups, forwards, `proxy`, the stdio handover to a holder.
//!   [`cluster`]: `malai ssh cluster …` (init, join, add, allow, remove, import, push, pull,
//!   status). [`demo`]: a throwaway cluster on one machine. [`doctor`]: `malai ssh doctor`.
//! - L8 [`cli`]: clap definitions and dispatch for the `malai` binary.

#[cfg(test)]
mod architecture;

pub mod acl;
pub mod agent;
pub mod audit;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod control;
pub mod demo;
pub mod doctor;
pub mod id52;
pub mod keyholder;
pub mod keys;
pub mod localsock;
pub mod logging;
pub mod manuals;
pub mod protocol;
pub mod server;
pub mod session;
pub mod sync;
pub mod table;
pub mod transport;
