//! malai ssh: SSH between the machines of a cluster over the iroh peer-to-peer network.
//!
//! Module map (find any behaviour by its name):
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
//! - [`agent`]: `malai ssh agent`: pooled connections, keys in one process, the HTTP proxy.
//! - [`cli`]: clap definitions and dispatch for the `malai` binary.

pub mod acl;
pub mod agent;
pub mod audit;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod demo;
pub mod doctor;
pub mod endpoint;
pub mod id52;
pub mod keys;
pub mod localsock;
pub mod logging;
pub mod manuals;
pub mod protocol;
pub mod server;
pub mod transport;
