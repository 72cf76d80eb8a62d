//! malai ssh: SSH between the machines of a cluster over the iroh peer-to-peer network.
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
//! ## Module map (find any behaviour by its name)
//! - [`id52`]: the only place machine ids are parsed and printed.
//! - [`keys`]: per-cluster secret keys in the OS keyring or a 0600 file.
//! - [`config`]: the cluster file (parse, validate, names), on-disk layout, atomic writes.
//! - [`acl`]: the one pure function that says who may do what.
//! - [`audit`]: one JSON line per request decision (`LOGDIR/ssh/audit.log`).
//! - [`protocol`]: the malai wire protocol over one byte stream (header, accept/deny, limits).
//! - [`transport`]: iroh (the only module that touches iroh's API) and stdio streams.
//! - [`server`]: `malai ssh server`: accept loop, the ACL choke point, request handlers.
//! - [`client`]: `malai ssh proxy` and friends: dial a server, run a request.
//! - [`cluster`]: `malai ssh cluster …`: init, join (also by DNS TXT), add, allow, remove,
//!   import; config sync to members (push, pull, status).
//! - [`endpoint`]: the one place a cluster key is bound (one endpoint per id52 per machine).
//! - [`demo`]: `malai ssh demo`, a throwaway cluster on one machine.
//! - [`doctor`]: `malai ssh doctor [host]`, one report of every check a connection needs.
//! - [`manuals`]: man pages and shell completions generated from the clap definitions.
//! - [`logging`]: tracing to files under LOGDIR; stdout is never touched.
//! - [`table`]: aligned text columns for the reports people read (`status`, `cluster status`).
//! - [`agent`]: `malai ssh agent`: pooled connections, keys in one process, the HTTP proxy.
//! - [`cli`]: clap definitions and dispatch for the `malai` binary.

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
