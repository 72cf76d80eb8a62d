//! The `ssh-via = "user@host[:port]"` target of a server entry: parsed and checked here, where
//! the cluster file is validated, and used by the client that runs OpenSSH to it.

/// A value that is not `[user@]host[:port]` of safe characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ssh-via {0:?}: expected \"user@host[:port]\"")]
pub struct BadTarget(pub String);

/// A parsed `ssh-via` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ViaTarget {
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
}

/// Parse `user@host[:port]` (user optional; `[v6]:port` for IPv6 literals).
pub fn parse_target(s: &str) -> Result<ViaTarget, BadTarget> {
    let bad = || BadTarget(s.to_string());
    let (user, rest) = match s.rsplit_once('@') {
        Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
        Some(_) => return Err(bad()),
        None => (None, s),
    };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(bad)?;
        match after {
            "" => (h, None),
            p => (h, Some(p.strip_prefix(':').ok_or_else(bad)?)),
        }
    } else {
        match rest.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    let port = match port {
        Some(p) => Some(p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad)?),
        None => None,
    };
    // Only what a host name (or an IP literal) and a user name may hold. OpenSSH expands
    // `%h`/`%r` into ProxyCommand and Match exec lines run by a shell from the user's own
    // ssh_config, so a value from the cluster file with shell syntax in it would run
    // commands on this machine (CVE-2023-51385).
    let host_ok = !host.is_empty()
        && !host.starts_with('-')
        && !host.starts_with('.')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if !host_ok || (host.contains(':') && !rest.starts_with('[')) {
        return Err(bad());
    }
    if user.as_deref().is_some_and(|u| {
        u.starts_with('-')
            || u.len() > 64
            || !u
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    }) {
        return Err(bad());
    }
    Ok(ViaTarget {
        user,
        host: host.to_string(),
        port,
    })
}
