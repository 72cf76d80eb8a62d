//! The control socket's secret (issue 19, finding 1): a caller must show it in its `hello`.
//!
//! "Same uid" (SO_PEERCRED) is not enough: sshd runs as the server's user, so a key bound
//! to `command="malai ssh stdinserver …"` *without* `restrict` can `ssh -N -L
//! x.sock:<run dir>/server-control.sock` and reach the socket as that uid — and a `stream`
//! request needs no descriptors, so it could dial peers with the server's key. The same
//! holds for a command scope on any program that can write to a unix socket (`socat`,
//! `nc -U`). So each holder writes a fresh random token at start to `<socket>.token`
//! (0600, in the private runtime dir) and serves a request only after a `hello` carrying
//! it. A forwarded socket carries no file read; a program that can *read files* as the
//! server's user defeats it (that is the user's own access, outside what this guards).

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::config::store::write_atomic;

/// Bytes of randomness in a token (hex in the file and on the wire).
const TOKEN_BYTES: usize = 32;

/// The token file of the control socket at `socket`.
pub fn path_for(socket: &Path) -> PathBuf {
    let mut s = socket.as_os_str().to_owned();
    s.push(".token");
    PathBuf::from(s)
}

/// Make a fresh token for `socket` and write it (0600, atomically) before the socket is
/// bound, so no caller ever reads a stale one from an earlier run.
pub fn create(socket: &Path) -> std::io::Result<String> {
    let mut bytes = [0u8; TOKEN_BYTES];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let token = hex::encode(bytes);
    write_atomic(&path_for(socket), format!("{token}\n").as_bytes(), 0o600)?;
    Ok(token)
}

/// The token of the holder at `socket`, if its file is readable.
pub fn read(socket: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path_for(socket)).ok()?;
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_string())
}

/// Remove the token file (the holder is stopping).
pub fn remove(socket: &Path) {
    let _ = std::fs::remove_file(path_for(socket));
}

/// Whether `got` is `expected`, compared in constant time.
pub fn matches(expected: &str, got: Option<&str>) -> bool {
    let Some(got) = got else { return false };
    let (a, b) = (expected.as_bytes(), got.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_fresh_private_and_checked_whole() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("server-control.sock");
        let t1 = create(&sock).unwrap();
        assert_eq!(read(&sock).as_deref(), Some(t1.as_str()));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path_for(&sock))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let t2 = create(&sock).unwrap();
        assert_ne!(t1, t2, "a restart makes a new token");
        assert!(matches(&t2, Some(&t2)));
        assert!(!matches(&t2, Some(&t1)));
        assert!(!matches(&t2, Some(&t2[..10])));
        assert!(!matches(&t2, None));
        remove(&sock);
        assert_eq!(read(&sock), None);
    }
}
