//! The bodies of `config-push` and `config-hash` (DESIGN §5): how the manager hands the
//! cluster file to members and how anyone asks which version a machine has.
//!
//! After `accept`, each of these requests exchanges exactly one more frame each way, client
//! first:
//!
//! | request       | client sends   | server answers |
//! |---------------|----------------|----------------|
//! | `config-push` | [`ConfigFile`] | [`PushAck`]    |
//! | `config-hash` | [`HashQuery`]  | [`HashReply`]  |
//!
//! These frames have the ordinary layout (`MAGIC | VERSION | LEN | JSON`) but their own cap,
//! [`MAX_CONFIG_FRAME`], because a cluster file (and so a frame carrying one) may be larger
//! than the 64 KiB header cap, which stays as it is for every other frame. The file text
//! itself is capped at [`MAX_CONFIG_LEN`] on both ends.
//!
//! A file's hash is the lowercase hex sha256 of its exact bytes ([`hash_text`]). The manager's
//! hash is that of the file *as members get it* (key settings stripped), so it compares
//! directly with the hash a member reports for its own copy.

use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{FrameError, MAGIC, VERSION};

/// Largest cluster file that is pushed or accepted. Thousands of members fit well within it;
/// the cap only keeps a hostile or broken peer from making us buffer without bound.
pub const MAX_CONFIG_LEN: usize = 1024 * 1024;

/// Cap on a `config-*` body frame: JSON escaping can make the text longer on the wire
/// (quotes, newlines, control characters), so the frame cap is a generous multiple.
pub const MAX_CONFIG_FRAME: u32 = 4 * MAX_CONFIG_LEN as u32;

/// The file a manager pushes, after the `config-push` header was accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigFile {
    pub text: String,
}

/// A member's answer to a push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum PushAck {
    /// The file was valid and is now in force; `hash` is the member's file hash.
    Applied { hash: String },
    /// The member already had exactly this file.
    Unchanged { hash: String },
    /// The member kept its old file (`hash`, if it has one) and says why.
    Refused {
        reason: String,
        #[serde(default)]
        hash: Option<String>,
    },
}

impl PushAck {
    /// The hash of the file the member has after the push (what the manager records).
    pub fn member_hash(&self) -> Option<&str> {
        match self {
            PushAck::Applied { hash } | PushAck::Unchanged { hash } => Some(hash),
            PushAck::Refused { hash, .. } => hash.as_deref(),
        }
    }
}

/// What the asker of `config-hash` wants.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HashQuery {
    /// Also send the file (answered only by the manager, and only to members): how a
    /// restarted member or a device catches up without waiting for a push.
    #[serde(default)]
    pub fetch: bool,
    /// The asker's own hash, if it has a file (for the answerer's logs and sync state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub have: Option<String>,
}

/// The answer to `config-hash`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HashReply {
    /// Hash of the file the answerer has (the manager: as members get it); `None` when it
    /// has none yet.
    pub hash: Option<String>,
    /// True when the answerer is the cluster's manager (its hash is the one to converge to).
    #[serde(default)]
    pub manager: bool,
    /// The file as members get it, when `fetch` was asked of the manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// Hash of a cluster file: lowercase hex sha256 of its bytes.
pub fn hash_text(text: &str) -> String {
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

/// The first 12 characters of a hash, for tables and log lines.
pub fn short_hash(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// Write one `config-*` body frame.
pub async fn write_config_frame<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(value).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = u32::try_from(body.len())
        .ok()
        .filter(|l| *l <= MAX_CONFIG_FRAME)
        .ok_or_else(|| too_large(body.len()))?;
    let mut buf = Vec::with_capacity(9 + body.len());
    buf.extend_from_slice(&MAGIC);
    buf.push(VERSION);
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    w.flush().await?;
    Ok(())
}

/// Largest `config-hash` query: a hash and a flag. The frame limit for a whole cluster
/// file is far more than a query needs, and any member may send one.
pub const MAX_QUERY_FRAME: u32 = 1024;

/// Read one `config-*` body frame (magic, version and size checked before the body is read).
pub async fn read_config_frame<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut R,
) -> Result<T, FrameError> {
    read_config_frame_max(r, MAX_CONFIG_FRAME).await
}

/// [`read_config_frame`] with a smaller limit (a `config-hash` query: [`MAX_QUERY_FRAME`]).
/// The body buffer grows with the bytes received, never to the announced length up front.
pub async fn read_config_frame_max<R: AsyncRead + Unpin, T: serde::de::DeserializeOwned>(
    r: &mut R,
    max: u32,
) -> Result<T, FrameError> {
    let mut head = [0u8; 9];
    read_exact(r, &mut head).await?;
    let magic = [head[0], head[1], head[2], head[3]];
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    if head[4] != VERSION {
        return Err(FrameError::Version(head[4]));
    }
    let len = u32::from_be_bytes([head[5], head[6], head[7], head[8]]);
    if len > max.min(MAX_CONFIG_FRAME) {
        return Err(too_large(len as usize));
    }
    let body = super::read_body(r, len as usize).await?;
    serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(e.to_string()))
}

fn too_large(len: usize) -> FrameError {
    FrameError::Malformed(format!(
        "config frame of {len} bytes is over the {MAX_CONFIG_FRAME}-byte limit"
    ))
}

async fn read_exact<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<(), FrameError> {
    match r.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member's `config-hash` query may not announce more than [`MAX_QUERY_FRAME`], and
    /// an announced large frame costs nothing until its bytes arrive.
    #[tokio::test]
    async fn a_query_cannot_make_the_server_allocate_megabytes() {
        let frame = |len: u32, body: &[u8]| {
            let mut b = MAGIC.to_vec();
            b.push(VERSION);
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(body);
            b
        };
        let mut p = crate::protocol::Probe {
            data: std::io::Cursor::new(frame(MAX_CONFIG_FRAME, b"{}")),
            largest: 0,
        };
        let r = read_config_frame_max::<_, HashQuery>(&mut p, MAX_QUERY_FRAME).await;
        assert!(r.is_err());
        assert!(p.largest <= 9, "read into {} bytes", p.largest);
        // Even under the whole-file limit the buffer follows the data.
        let mut p = crate::protocol::Probe {
            data: std::io::Cursor::new(frame(MAX_CONFIG_FRAME, b"{}")),
            largest: 0,
        };
        assert!(read_config_frame::<_, HashQuery>(&mut p).await.is_err());
        assert!(p.largest <= 4096, "read into {} bytes", p.largest);
        // Allowed twin: a real query.
        let mut buf = vec![];
        write_config_frame(
            &mut buf,
            &HashQuery {
                have: Some("ab".into()),
                fetch: true,
            },
        )
        .await
        .unwrap();
        let q: HashQuery = read_config_frame_max(&mut &buf[..], MAX_QUERY_FRAME)
            .await
            .unwrap();
        assert!(q.fetch);
    }

    #[tokio::test]
    async fn round_trips() {
        let text = "[cluster-manager]\nid52 = \"x\"\n# \"quoted\" \u{1}\n".repeat(1000);
        let mut buf = vec![];
        write_config_frame(&mut buf, &ConfigFile { text: text.clone() })
            .await
            .unwrap();
        let back: ConfigFile = read_config_frame(&mut &buf[..]).await.unwrap();
        assert_eq!(back.text, text);

        for ack in [
            PushAck::Applied { hash: "a".into() },
            PushAck::Unchanged { hash: "b".into() },
            PushAck::Refused {
                reason: "no".into(),
                hash: None,
            },
        ] {
            let mut buf = vec![];
            write_config_frame(&mut buf, &ack).await.unwrap();
            assert_eq!(
                read_config_frame::<_, PushAck>(&mut &buf[..])
                    .await
                    .unwrap(),
                ack
            );
        }
        let q = HashQuery {
            fetch: true,
            have: Some("h".into()),
        };
        let mut buf = vec![];
        write_config_frame(&mut buf, &q).await.unwrap();
        assert_eq!(
            read_config_frame::<_, HashQuery>(&mut &buf[..])
                .await
                .unwrap(),
            q
        );
        // Older/newer peers may omit optional fields.
        let r: HashReply = serde_json::from_str("{\"hash\":null}").unwrap();
        assert_eq!(r, HashReply::default());
    }

    #[tokio::test]
    async fn a_file_over_the_header_cap_fits() {
        let text = "x".repeat(super::super::MAX_HEADER_LEN as usize * 3);
        let mut buf = vec![];
        write_config_frame(&mut buf, &ConfigFile { text })
            .await
            .unwrap();
        assert!(
            read_config_frame::<_, ConfigFile>(&mut &buf[..])
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn bad_frames_are_errors_not_panics() {
        let mut big = MAGIC.to_vec();
        big.push(VERSION);
        big.extend_from_slice(&(MAX_CONFIG_FRAME + 1).to_be_bytes());
        assert!(matches!(
            read_config_frame::<_, ConfigFile>(&mut &big[..]).await,
            Err(FrameError::Malformed(m)) if m.contains("limit")
        ));
        let mut good = vec![];
        write_config_frame(&mut good, &ConfigFile { text: "t".into() })
            .await
            .unwrap();
        for n in 0..good.len() {
            assert!(matches!(
                read_config_frame::<_, ConfigFile>(&mut &good[..n]).await,
                Err(FrameError::Truncated)
            ));
        }
        let mut wrong = good.clone();
        wrong[4] = VERSION + 1;
        assert!(matches!(
            read_config_frame::<_, ConfigFile>(&mut &wrong[..]).await,
            Err(FrameError::Version(_))
        ));
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..1000 {
            let mut v = good.clone();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x as usize) % v.len();
            v[at] = (x >> 32) as u8;
            let _ = read_config_frame::<_, ConfigFile>(&mut &v[..]).await;
            let _ = read_config_frame::<_, PushAck>(&mut &v[..]).await;
        }
    }

    #[test]
    fn hashes() {
        assert_eq!(
            hash_text(""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(short_hash(&hash_text("")), "e3b0c44298fc");
        assert_eq!(short_hash("ab"), "ab");
    }
}
