//! id52: how a machine is named everywhere in malai.
//!
//! An id52 is a 32-byte ed25519 public key written in `BASE32_DNSSEC` (RFC 4648 base32hex,
//! lowercase, no padding): 52 characters. This is the encoding of fastn's `fastn-id52` crate
//! and of malai's other tools, so ids are interchangeable with them. It is *not* iroh's
//! z-base-32 (also 52 characters): the conversion happens only in `transport::iroh`.
//!
//! This module is the only place where ids are parsed or printed. It also holds the
//! [`SecretKey`] type (the bytes only: making and using keys is `keys`' and `transport`'s job),
//! so every layer can carry a key without naming the key store.

use std::fmt;
use std::str::FromStr;

/// A 32-byte ed25519 secret. Debug never prints it; it is never serialized.
#[derive(Clone)]
pub struct SecretKey([u8; 32]);

impl SecretKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        SecretKey(b)
    }
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        // Best effort: don't leave the secret lying in freed memory.
        for b in self.0.iter_mut() {
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

/// Length of an id52 in characters.
pub const ID52_LEN: usize = 52;

/// A machine's public identity (ed25519 public key bytes).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id52([u8; 32]);

/// Why a string is not an id52.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Id52Error {
    #[error("id52 must be {ID52_LEN} characters, got {0}")]
    Length(usize),
    #[error("id52 has a character outside 0-9 a-v: {0:?}")]
    Alphabet(char),
    #[error("id52 does not decode to 32 bytes")]
    Decode,
}

impl Id52 {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Id52(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first 8 characters: enough for tables and log lines meant for people.
    pub fn short(&self) -> String {
        self.to_string()[..8].to_string()
    }

    /// True when `s` has the shape of an id52 (length and alphabet); used by name resolution
    /// to tell ids from aliases without reporting an error.
    pub fn looks_like(s: &str) -> bool {
        s.len() == ID52_LEN && s.parse::<Id52>().is_ok()
    }
}

impl FromStr for Id52 {
    type Err = Id52Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let n = s.chars().count();
        if n != ID52_LEN {
            return Err(Id52Error::Length(n));
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_digit() || ('a'..='v').contains(c)))
        {
            return Err(Id52Error::Alphabet(c));
        }
        let bytes = data_encoding::BASE32_DNSSEC
            .decode(s.as_bytes())
            .map_err(|_| Id52Error::Decode)?;
        let arr: [u8; 32] = bytes.try_into().map_err(|_| Id52Error::Decode)?;
        // Reject non-canonical encodings (stray low bits in the last character), so that one
        // key has exactly one spelling and string comparison equals key comparison.
        if data_encoding::BASE32_DNSSEC.encode(&arr) != s {
            return Err(Id52Error::Decode);
        }
        Ok(Id52(arr))
    }
}

impl fmt::Display for Id52 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&data_encoding::BASE32_DNSSEC.encode(&self.0))
    }
}

impl fmt::Debug for Id52 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Id52({self})")
    }
}

impl serde::Serialize for Id52 {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Id52 {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let id = Id52::from_bytes([7u8; 32]);
        let s = id.to_string();
        assert_eq!(s.len(), ID52_LEN);
        assert_eq!(s.parse::<Id52>().unwrap(), id);
    }

    /// Shared vector with `fastn-id52`: its encoding is `BASE32_DNSSEC` of the raw key bytes.
    /// Bytes 0..32 encode to this string in that alphabet (checked against data-encoding's
    /// spec: base32hex lowercase without padding).
    #[test]
    fn known_vector() {
        let bytes: [u8; 32] = core::array::from_fn(|i| i as u8);
        let s = Id52::from_bytes(bytes).to_string();
        assert_eq!(s, "000g40o40k30e209185go38e1s8124gj2gahc5oo34d1m70t3ofg");
        assert_eq!(s.parse::<Id52>().unwrap().as_bytes(), &bytes);
    }

    #[test]
    fn errors() {
        assert_eq!("abc".parse::<Id52>(), Err(Id52Error::Length(3)));
        let bad = "z".repeat(52);
        assert_eq!(bad.parse::<Id52>(), Err(Id52Error::Alphabet('z')));
        let upper = Id52::from_bytes([1; 32]).to_string().to_uppercase();
        assert!(upper.parse::<Id52>().is_err());
        // Non-canonical last character.
        let mut s = Id52::from_bytes([0; 32]).to_string();
        s.pop();
        s.push('1');
        assert_eq!(s.parse::<Id52>(), Err(Id52Error::Decode));
    }
}
