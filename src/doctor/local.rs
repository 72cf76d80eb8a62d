//! Local files and permissions: DATADIR and the runtime dir (ours, not too open), a
//! cluster's key file (0600, ours: malai refuses it otherwise), and the agent that
//! `MALAI_SSH_AGENT` names.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{Check, holder_status};
use crate::config::paths::Dirs;
use crate::config::store::ClusterDir;

pub(super) fn files(dirs: &Dirs) -> Vec<Check> {
    let mut out = vec![];
    out.push(match dir_check(&dirs.data, 0o022) {
        DirState::Missing => Check::fail(
            "DATADIR",
            format!(
                "{} does not exist: this machine is in no cluster",
                dirs.data.display()
            ),
            "`malai ssh cluster init <alias>` or `malai ssh cluster join <alias> <manager-id52>`",
        ),
        DirState::Fine(mode) => Check::pass(
            "DATADIR",
            format!("{} (mode {mode:o})", dirs.data.display()),
        ),
        DirState::Bad(why) => Check::fail(
            "DATADIR",
            format!("{}: {why}", dirs.data.display()),
            format!(
                "chmod go-w {} (and chown it to this user)",
                dirs.data.display()
            ),
        ),
    });
    out.push(match dir_check(&dirs.run, 0o077) {
        DirState::Missing => Check::pass(
            "runtime dir",
            format!(
                "{} not created yet (the first server or agent makes it, mode 0700)",
                dirs.run.display()
            ),
        ),
        DirState::Fine(mode) => Check::pass(
            "runtime dir",
            format!("{} (mode {mode:o})", dirs.run.display()),
        ),
        DirState::Bad(why) => Check::fail(
            "runtime dir",
            format!(
                "{}: {why}; the server and agent refuse to use it",
                dirs.run.display()
            ),
            format!(
                "chmod 700 {} (and chown it to this user)",
                dirs.run.display()
            ),
        ),
    });
    out
}

enum DirState {
    Missing,
    Fine(u32),
    Bad(String),
}

/// A directory that must be ours, a real directory, with none of `forbidden` mode bits.
fn dir_check(path: &Path, forbidden: u32) -> DirState {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return DirState::Missing,
        Err(e) => return DirState::Bad(e.to_string()),
    };
    let mode = meta.mode() & 0o777;
    let me = nix::unistd::geteuid().as_raw();
    if !meta.is_dir() {
        DirState::Bad("not a directory (a symlink?)".into())
    } else if meta.uid() != me {
        DirState::Bad(format!(
            "owned by uid {}, not this user (uid {me})",
            meta.uid()
        ))
    } else if mode & forbidden != 0 {
        DirState::Bad(format!("mode {mode:o} is too open"))
    } else {
        DirState::Fine(mode)
    }
}

/// `MALAI_SSH_AGENT`, when set, must name an agent that answers: proxy and exec use it.
pub(super) async fn agent_env() -> Option<Check> {
    let socket = crate::control::socket_from_env()?;
    let what = format!("agent {}", socket.display());
    Some(match holder_status(&socket).await {
        Ok(s) => Check::pass(
            what,
            format!(
                "answers (pid {}, clusters: {})",
                s.pid,
                s.clusters.join(", ")
            ),
        ),
        Err(e) => Check::fail(
            what,
            format!("MALAI_SSH_AGENT names it, but it does not answer: {e}"),
            "`eval \"$(malai ssh agent -e)\"` starts it (or unset MALAI_SSH_AGENT)",
        ),
    })
}

/// The secret key file, when the key lives in a file: 0600 and ours (malai refuses it
/// otherwise).
pub(super) fn key_file(dir: &ClusterDir) -> Check {
    let what = format!("key {}", dir.alias);
    let path = dir.dir.join(crate::keys::SECRET_FILE);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Check::pass(what, "in the OS keyring (no key file)")
        }
        Err(e) => Check::fail(
            what,
            format!("{}: {e}", path.display()),
            "fix the permissions of the cluster folder",
        ),
        Ok(m) if m.mode() & 0o077 != 0 => Check::fail(
            what,
            format!(
                "{} is mode {:o}: group or others can read it, so malai refuses it",
                path.display(),
                m.mode() & 0o777
            ),
            format!("chmod 600 {}", path.display()),
        ),
        Ok(m) if m.uid() != nix::unistd::geteuid().as_raw() => Check::fail(
            what,
            format!("{} is owned by uid {}", path.display(), m.uid()),
            format!("chown it to this user: {}", path.display()),
        ),
        Ok(_) => Check::pass(what, format!("{} (mode 600)", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_runtime_dir_fails_and_a_private_one_passes() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dirs = Dirs::under(t.path());
        std::fs::create_dir_all(&dirs.run).unwrap();
        std::fs::set_permissions(&dirs.run, std::fs::Permissions::from_mode(0o755)).unwrap();
        let c = files(&dirs);
        let run = c.iter().find(|c| c.check == "runtime dir").unwrap();
        assert!(!run.ok, "{run:?}");
        assert!(
            run.fix.as_deref().unwrap().starts_with("chmod 700"),
            "{run:?}"
        );
        std::fs::set_permissions(&dirs.run, std::fs::Permissions::from_mode(0o700)).unwrap();
        let c = files(&dirs);
        assert!(c.iter().all(|c| c.ok), "{c:?}");
    }
}
