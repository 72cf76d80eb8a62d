//! The SOCKS side of `malai ssh -D`: just enough of SOCKS4, SOCKS4a and SOCKS5 (RFC 1928)
//! to take one CONNECT request from a local client (curl, browsers, VS Code) and answer it,
//! as OpenSSH's `-D` does. No authentication (the listener is local, like ssh's), no BIND,
//! no UDP ASSOCIATE: those are refused with the protocol's own "not supported" reply.
//!
//! Why not a crate: the maintained Rust SOCKS server crate (fast-socks5) speaks only SOCKS5
//! on the server side and brings its own error and logging stacks; SOCKS4a is still what
//! some tools send, and the subset here is ~150 lines with every branch tested below.
//!
//! Every length comes from the wire and is bounded by the format itself (one byte, or a
//! NUL-terminated string capped at [`MAX_STRING`]); the whole handshake must finish within
//! [`HANDSHAKE_TIMEOUT`].

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// A client that does not finish its SOCKS request within this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest SOCKS4 user id or SOCKS4a host name accepted (SOCKS5's are one length byte).
pub const MAX_STRING: usize = 255;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V4,
    V5,
}

/// One CONNECT request: where the client wants to go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub host: String,
    pub port: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum SocksError {
    #[error("not a SOCKS request (first byte {0:#04x})")]
    NotSocks(u8),
    #[error("the SOCKS client offers no usable authentication method")]
    NoMethod,
    #[error("SOCKS command {0} is not supported (only CONNECT)")]
    Command(u8),
    #[error("SOCKS address type {0} is not supported")]
    AddressType(u8),
    #[error("SOCKS string longer than {MAX_STRING} bytes")]
    TooLong,
    #[error("bad SOCKS host name")]
    BadHost,
    #[error("the SOCKS client did not finish its request in time")]
    Timeout,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a CONNECT failed, for the reply code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The server's ACL said no.
    NotAllowed,
    /// The server could not reach the target.
    Unreachable,
    General,
}

/// Read the client's greeting and CONNECT request (answering SOCKS5's method negotiation).
/// Unsupported commands and address types get their refusal reply before the error.
pub async fn accept<S>(s: &mut S) -> Result<Connect, SocksError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_request(s)).await {
        Ok(r) => r,
        Err(_) => Err(SocksError::Timeout),
    }
}

async fn read_request<S>(s: &mut S) -> Result<Connect, SocksError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match s.read_u8().await? {
        4 => read_v4(s).await,
        5 => read_v5(s).await,
        b => Err(SocksError::NotSocks(b)),
    }
}

async fn read_v4<S>(s: &mut S) -> Result<Connect, SocksError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let cmd = s.read_u8().await?;
    let port = s.read_u16().await?;
    let mut ip = [0u8; 4];
    s.read_exact(&mut ip).await?;
    let _user = read_cstring(s).await?;
    if cmd != 1 {
        s.write_all(&v4_reply(false)).await?;
        return Err(SocksError::Command(cmd));
    }
    // SOCKS4a: 0.0.0.x (x != 0) means "the host name follows".
    let host = if ip[..3] == [0, 0, 0] && ip[3] != 0 {
        let name = read_cstring(s).await?;
        String::from_utf8(name).map_err(|_| SocksError::BadHost)?
    } else {
        Ipv4Addr::from(ip).to_string()
    };
    if host.is_empty() {
        return Err(SocksError::BadHost);
    }
    Ok(Connect {
        version: Version::V4,
        host,
        port,
    })
}

async fn read_v5<S>(s: &mut S) -> Result<Connect, SocksError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let n = s.read_u8().await? as usize;
    let mut methods = vec![0u8; n];
    s.read_exact(&mut methods).await?;
    if !methods.contains(&0) {
        s.write_all(&[5, 0xff]).await?;
        return Err(SocksError::NoMethod);
    }
    s.write_all(&[5, 0]).await?;
    let mut head = [0u8; 4];
    s.read_exact(&mut head).await?;
    if head[0] != 5 {
        return Err(SocksError::NotSocks(head[0]));
    }
    let (cmd, atyp) = (head[1], head[3]);
    let host = match atyp {
        1 => {
            let mut ip = [0u8; 4];
            s.read_exact(&mut ip).await?;
            Ipv4Addr::from(ip).to_string()
        }
        3 => {
            let len = s.read_u8().await? as usize;
            let mut name = vec![0u8; len];
            s.read_exact(&mut name).await?;
            String::from_utf8(name).map_err(|_| SocksError::BadHost)?
        }
        4 => {
            let mut ip = [0u8; 16];
            s.read_exact(&mut ip).await?;
            Ipv6Addr::from(ip).to_string()
        }
        other => {
            s.write_all(&v5_reply(8)).await?;
            return Err(SocksError::AddressType(other));
        }
    };
    let port = s.read_u16().await?;
    if cmd != 1 {
        s.write_all(&v5_reply(7)).await?;
        return Err(SocksError::Command(cmd));
    }
    if host.is_empty() || host.contains('\0') {
        s.write_all(&v5_reply(1)).await?;
        return Err(SocksError::BadHost);
    }
    Ok(Connect {
        version: Version::V5,
        host,
        port,
    })
}

async fn read_cstring<S: AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>, SocksError> {
    let mut out = Vec::new();
    loop {
        let b = s.read_u8().await?;
        if b == 0 {
            return Ok(out);
        }
        if out.len() == MAX_STRING {
            return Err(SocksError::TooLong);
        }
        out.push(b);
    }
}

fn v4_reply(ok: bool) -> [u8; 8] {
    [0, if ok { 0x5a } else { 0x5b }, 0, 0, 0, 0, 0, 0]
}

fn v5_reply(code: u8) -> [u8; 10] {
    [5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// Tell the client its CONNECT succeeded; bytes flow after this.
pub async fn reply_ok<S: AsyncWrite + Unpin>(s: &mut S, v: Version) -> std::io::Result<()> {
    match v {
        Version::V4 => s.write_all(&v4_reply(true)).await,
        Version::V5 => s.write_all(&v5_reply(0)).await,
    }
}

/// Tell the client its CONNECT failed (then close).
pub async fn reply_failed<S: AsyncWrite + Unpin>(
    s: &mut S,
    v: Version,
    why: Failure,
) -> std::io::Result<()> {
    match v {
        Version::V4 => s.write_all(&v4_reply(false)).await,
        Version::V5 => {
            let code = match why {
                Failure::NotAllowed => 2,
                Failure::Unreachable => 4,
                Failure::General => 1,
            };
            s.write_all(&v5_reply(code)).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `accept` on `input`; returns the result and what it wrote back.
    async fn run(input: &[u8]) -> (Result<Connect, SocksError>, Vec<u8>) {
        let (mut client, mut server) = tokio::io::duplex(4096);
        client.write_all(input).await.unwrap();
        drop(client.shutdown().await);
        let r = accept(&mut server).await;
        drop(server);
        let mut out = vec![];
        client.read_to_end(&mut out).await.unwrap();
        (r, out)
    }

    #[tokio::test]
    async fn socks5_connect_by_name_ipv4_ipv6() {
        let mut req = vec![5, 2, 2, 0, 5, 1, 0, 3, 9];
        req.extend_from_slice(b"localhost");
        req.extend_from_slice(&8080u16.to_be_bytes());
        let (r, out) = run(&req).await;
        assert_eq!(
            r.unwrap(),
            Connect {
                version: Version::V5,
                host: "localhost".into(),
                port: 8080
            }
        );
        assert_eq!(out, [5, 0]);
        let (r, _) = run(&[5, 1, 0, 5, 1, 0, 1, 10, 1, 2, 3, 0, 80]).await;
        assert_eq!(r.unwrap().host, "10.1.2.3");
        let mut req = vec![5, 1, 0, 5, 1, 0, 4];
        req.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        req.extend_from_slice(&[0, 22]);
        let (r, _) = run(&req).await;
        let c = r.unwrap();
        assert_eq!((c.host.as_str(), c.port), ("::1", 22));
    }

    #[tokio::test]
    async fn socks4_and_4a() {
        let (r, _) = run(&[4, 1, 0, 80, 127, 0, 0, 1, b'u', 0]).await;
        let c = r.unwrap();
        assert_eq!(
            (c.version, c.host.as_str(), c.port),
            (Version::V4, "127.0.0.1", 80)
        );
        let mut req = vec![4, 1, 0x1f, 0x90, 0, 0, 0, 1, 0];
        req.extend_from_slice(b"example.internal\0");
        let (r, _) = run(&req).await;
        let c = r.unwrap();
        assert_eq!((c.host.as_str(), c.port), ("example.internal", 8080));
    }

    #[tokio::test]
    async fn refusals_answer_in_the_protocol_and_never_panic() {
        // No "no auth" method offered.
        let (r, out) = run(&[5, 1, 2]).await;
        assert!(matches!(r, Err(SocksError::NoMethod)));
        assert_eq!(out, [5, 0xff]);
        // BIND (2) and UDP ASSOCIATE (3): command not supported.
        let (r, out) = run(&[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 80]).await;
        assert!(matches!(r, Err(SocksError::Command(2))));
        assert_eq!(&out[2..4], &[5, 7]);
        // Unknown address type.
        let (r, out) = run(&[5, 1, 0, 5, 1, 0, 9]).await;
        assert!(matches!(r, Err(SocksError::AddressType(9))));
        assert_eq!(&out[2..4], &[5, 8]);
        // SOCKS4 BIND.
        let (r, out) = run(&[4, 2, 0, 80, 1, 2, 3, 4, 0]).await;
        assert!(matches!(r, Err(SocksError::Command(2))));
        assert_eq!(out, v4_reply(false));
        // Over-long SOCKS4 user id.
        let mut req = vec![4, 1, 0, 80, 1, 2, 3, 4];
        req.extend(std::iter::repeat_n(b'a', 300));
        assert!(matches!(run(&req).await.0, Err(SocksError::TooLong)));
        // Not SOCKS at all (an HTTP request), empty, and truncated at every length.
        assert!(matches!(
            run(b"GET / HTTP/1.1\r\n").await.0,
            Err(SocksError::NotSocks(b'G'))
        ));
        let good = [5u8, 1, 0, 5, 1, 0, 3, 1, b'h', 0, 80];
        for n in 0..good.len() {
            assert!(run(&good[..n]).await.0.is_err(), "{n}");
        }
        // A deterministic smoke fuzz.
        let mut x: u64 = 0x243f6a8885a308d3;
        for _ in 0..500 {
            let len = (x % 40) as usize;
            let mut v = vec![if x & 1 == 0 { 4 } else { 5 }];
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            let _ = run(&v).await;
        }
    }

    #[tokio::test]
    async fn replies() {
        let mut out = vec![];
        reply_ok(&mut out, Version::V5).await.unwrap();
        reply_failed(&mut out, Version::V5, Failure::NotAllowed)
            .await
            .unwrap();
        reply_ok(&mut out, Version::V4).await.unwrap();
        assert_eq!(&out[..2], &[5, 0]);
        assert_eq!(&out[10..12], &[5, 2]);
        assert_eq!(&out[20..22], &[0, 0x5a]);
    }
}
