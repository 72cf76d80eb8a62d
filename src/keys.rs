//! Per-cluster secret keys: the OS keyring when a backend works, else a 0600 file.
//!
//! A machine has one ed25519 keypair per cluster. In the cluster folder:
//! - `id52`: this machine's public id in the cluster (readable without touching the secret,
//!   so `malai ssh id52` and lockdown mode never open a secret);
//! - `secret-key`: the secret as hex, mode 0600, when the file store is used. A key file that
//!   group or others can read is refused, with the `chmod` that fixes it.
//!
//! Keyring entries are found where malai's other tools put them: shipped malai (0.2.x) uses
//! service `kulfi`, account = the id52, the raw 32 secret bytes; `fastn-id52` uses service
//! `fastn` with the hex secret as password. Both are read; the `kulfi` form is written. On
//! headless Linux the keyring is usually unusable (no D-Bus, keyutils gives EACCES outside a
//! login session), so the file is the normal server path. `MALAI_USE_KEYRING=false` forces it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::store::write_atomic;
use crate::id52::Id52;

pub const ID_FILE: &str = "id52";
pub const SECRET_FILE: &str = "secret-key";
const KEYRING_SERVICE: &str = "kulfi";
const FASTN_SERVICE: &str = "fastn";

pub use crate::id52::SecretKey;

/// A new random secret key (ed25519, from the transport's generator).
pub fn generate() -> SecretKey {
    crate::transport::iroh::generate_secret()
}

/// The public id of `key`.
pub fn public_id(key: &SecretKey) -> Id52 {
    crate::transport::iroh::public_id52(key)
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by group or others (mode {mode:o}); refusing to use it. Fix: chmod 600 {path}"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error(
        "{path} belongs to uid {owner}, not to this user; refusing to use it. Fix: chown {me} {path}"
    )]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path}: not a 64-character hex ed25519 secret key")]
    BadFile { path: PathBuf },
    #[error("no key for this machine in {0} (join or init the cluster first)")]
    Missing(PathBuf),
    #[error("no secret key for {0} in the file store or the OS keyring")]
    NotFound(Id52),
    #[error("key in {path} is for {found}, but this machine's id52 there is {expected}")]
    Mismatch {
        path: PathBuf,
        found: Id52,
        expected: Id52,
    },
    #[error("a key already exists in {0}")]
    Exists(PathBuf),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether to try the OS keyring (`MALAI_USE_KEYRING=false|0|no` turns it off).
pub fn keyring_enabled() -> bool {
    !matches!(
        std::env::var("MALAI_USE_KEYRING").as_deref(),
        Ok("false") | Ok("0") | Ok("no")
    )
}

/// Where a new key went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Keyring,
    File(PathBuf),
}

/// Make a new key for the cluster folder `dir`, store it, and return its id52.
pub fn create(dir: &Path, use_keyring: bool) -> Result<(Id52, Stored), KeyError> {
    let id_path = dir.join(ID_FILE);
    if id_path.exists() {
        return Err(KeyError::Exists(id_path));
    }
    let key = generate();
    let id = public_id(&key);
    let stored = if use_keyring && keyring_enabled() && store_in_keyring(&id, &key) {
        Stored::Keyring
    } else {
        let path = dir.join(SECRET_FILE);
        write_atomic(
            &path,
            format!("{}\n", hex::encode(key.as_bytes())).as_bytes(),
            0o600,
        )
        .map_err(io(&path))?;
        Stored::File(path)
    };
    write_atomic(&id_path, format!("{id}\n").as_bytes(), 0o644).map_err(io(&id_path))?;
    tracing::info!(%id, ?stored, "created cluster key");
    Ok((id, stored))
}

/// Store in the keyring and read back: a backend that accepts a write it can't return (as
/// keyutils does outside a login session) must not be trusted with the only copy.
fn store_in_keyring(id: &Id52, key: &SecretKey) -> bool {
    let r = (|| -> Result<bool, keyring::Error> {
        let entry = keyring::Entry::new(KEYRING_SERVICE, &id.to_string())?;
        entry.set_secret(key.as_bytes())?;
        let back = entry.get_secret()?;
        Ok(back.as_slice() == key.as_bytes())
    })();
    match r {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!("keyring returned a different secret; using the key file");
            false
        }
        Err(e) => {
            tracing::info!(error = %e, "OS keyring unavailable; using the 0600 key file");
            false
        }
    }
}

/// This machine's id52 in the cluster folder `dir` (no secret is read).
pub fn id52(dir: &Path) -> Result<Id52, KeyError> {
    let path = dir.join(ID_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(KeyError::Missing(dir.to_path_buf()));
        }
        Err(e) => return Err(io(&path)(e)),
    };
    text.trim()
        .parse()
        .map_err(|_| KeyError::BadFile { path: path.clone() })
}

/// Load the secret key for the cluster folder `dir`: file first, then the keyring.
pub fn load(dir: &Path) -> Result<SecretKey, KeyError> {
    let expected = id52(dir)?;
    let path = dir.join(SECRET_FILE);
    let key = match read_key_file(&path)? {
        Some(k) => k,
        None => read_keyring(&expected)?,
    };
    let found = public_id(&key);
    if found != expected {
        return Err(KeyError::Mismatch {
            path: dir.to_path_buf(),
            found,
            expected,
        });
    }
    Ok(key)
}

fn read_key_file(path: &Path) -> Result<Option<SecretKey>, KeyError> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    // Another user's key file (even 0600) could be swapped under us: not ours, not used.
    let me = nix::unistd::geteuid().as_raw();
    if std::os::unix::fs::MetadataExt::uid(&meta) != me {
        return Err(KeyError::Owner {
            path: path.to_path_buf(),
            owner: std::os::unix::fs::MetadataExt::uid(&meta),
            me,
        });
    }
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    parse_hex_key(text.trim())
        .map(Some)
        .ok_or_else(|| KeyError::BadFile {
            path: path.to_path_buf(),
        })
}

fn parse_hex_key(s: &str) -> Option<SecretKey> {
    let bytes = hex::decode(s).ok()?;
    let arr: [u8; 32] = bytes.try_into().ok()?;
    Some(SecretKey::from_bytes(arr))
}

fn read_keyring(id: &Id52) -> Result<SecretKey, KeyError> {
    if !keyring_enabled() {
        return Err(KeyError::NotFound(*id));
    }
    let account = id.to_string();
    if let Ok(entry) = keyring::Entry::new(KEYRING_SERVICE, &account)
        && let Ok(secret) = entry.get_secret()
        && let Ok(arr) = <[u8; 32]>::try_from(secret.as_slice())
    {
        return Ok(SecretKey::from_bytes(arr));
    }
    if let Ok(entry) = keyring::Entry::new(FASTN_SERVICE, &account)
        && let Ok(pw) = entry.get_password()
        && let Some(k) = parse_hex_key(pw.trim())
    {
        return Ok(k);
    }
    Err(KeyError::NotFound(*id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_store_round_trip_and_permissions() {
        // SAFETY of env: this test module is the only one touching MALAI_USE_KEYRING.
        let dir = tempfile::tempdir().unwrap();
        let (id, stored) = create(dir.path(), false).unwrap();
        assert_eq!(stored, Stored::File(dir.path().join(SECRET_FILE)));
        assert_eq!(id52(dir.path()).unwrap(), id);
        assert_eq!(public_id(&load(dir.path()).unwrap()), id);
        let mode = std::fs::metadata(dir.path().join(SECRET_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A second create refuses to overwrite.
        assert!(matches!(
            create(dir.path(), false),
            Err(KeyError::Exists(_))
        ));
        // Group-readable → refused with a fix.
        let p = dir.path().join(SECRET_FILE);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn bad_and_mismatched_files() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path(), false).unwrap();
        let p = dir.path().join(SECRET_FILE);
        write_atomic(&p, b"not hex\n", 0o600).unwrap();
        assert!(matches!(load(dir.path()), Err(KeyError::BadFile { .. })));
        let other = generate();
        write_atomic(&p, hex::encode(other.as_bytes()).as_bytes(), 0o600).unwrap();
        assert!(matches!(load(dir.path()), Err(KeyError::Mismatch { .. })));
        let empty = tempfile::tempdir().unwrap();
        assert!(matches!(load(empty.path()), Err(KeyError::Missing(_))));
    }

    #[test]
    fn a_key_file_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        create(dir.path(), false).unwrap();
        // Allowed twin: our own 0600 file.
        load(dir.path()).unwrap();
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to chown");
            return;
        }
        let p = dir.path().join(SECRET_FILE);
        nix::unistd::chown(&p, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("belongs to uid 65534"), "{err}");
    }

    #[test]
    fn debug_redacts() {
        let k = SecretKey::from_bytes([0xab; 32]);
        assert!(!format!("{k:?}").contains("ab"));
    }
}
