//! The `exec` request and, after `accept`, its multiplexed frames.
//!
//! The command is one string, as with ssh: full-access peers get it run by `$SHELL -c`,
//! command-scoped peers get it split into words (no expansion) and `execvp`ed.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// `None` = an interactive login shell (only for full-access peers).
    #[serde(default)]
    pub command: Option<String>,
    /// Environment the client would like set; the server keeps only allow-listed names
    /// (like OpenSSH's `AcceptEnv LANG LC_*`).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub pty: Option<PtyRequest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PtyRequest {
    pub term: String,
    pub cols: u16,
    pub rows: u16,
}
