//! End-to-end tests of `malai ssh`: one test binary, real processes (sshd, ssh, scp, rsync,
//! git, `malai`), every simulated machine its own `MALAI_HOME`, loopback only.

// Reusable helpers: sshd, simulated machines, `malai ssh server` processes, CLI-built clusters.
mod harness;
// The OpenSSH bridge: ssh/scp/rsync/git through `malai ssh proxy`, denials, SIGTERM, reload.
mod bridge;
