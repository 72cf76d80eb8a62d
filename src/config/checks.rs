//! Checks on single values of the cluster file: names, the cluster alias, command names,
//! `ssh` targets, `ssh-via` destinations and relay URLs. Each says in one phrase what is
//! wrong; the caller adds the key and line.

use crate::id52::Id52;

/// Checks a server, device, group or service name. Names become DNS-like labels
/// (`foo.amitu.com`), appear in comma-separated lists and are compared without regard to case,
/// so they are kept to a small alphabet and must not be mistaken for an id52.
pub(crate) fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("names cannot be empty");
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err("names use only letters, digits, '-' and '_'");
    }
    if name.starts_with('-') {
        return Err("names cannot start with '-'");
    }
    if Id52::looks_like(&name.to_ascii_lowercase()) {
        return Err("a name cannot look like an id52");
    }
    Ok(())
}

/// A cluster alias is a dotted name (often a domain): it is matched as a host-name suffix.
pub(super) fn check_alias(alias: &str) -> Result<(), &'static str> {
    let ok = alias.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    });
    if ok {
        Ok(())
    } else {
        Err("alias must be dot-separated labels of letters, digits, '-' and '_'")
    }
}

/// A command entry's name is the program (argv[0]) peers may run; it must be one word.
pub(super) fn check_command(cmd: &str) -> Result<(), &'static str> {
    if cmd.is_empty() || cmd.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a command entry is named by a program, without spaces");
    }
    Ok(())
}

pub(super) fn check_host_port(s: &str) -> Result<(), String> {
    let bad = || format!("expected host:port or \"embedded\", got {s:?}");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p != 0 => {}
        _ => return Err(bad()),
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        !inner.is_empty() && !inner.contains(['[', ']'])
    } else {
        !host.is_empty() && !host.contains([':', '[', ']'])
    };
    if !host_ok || host.starts_with('-') || host.chars().any(|c| c.is_whitespace()) {
        return Err(bad());
    }
    Ok(())
}

/// `ssh-via` is handed to OpenSSH as its destination, so it is checked here with the same
/// parser the client uses: only host-name and user-name characters (a leading '-' would be
/// an option; shell syntax would reach ProxyCommand `%h`/`%r`, CVE-2023-51385).
pub(super) fn check_ssh_via(s: &str) -> Result<(), &'static str> {
    super::ssh_via::parse_target(s)
        .map(|_| ())
        .map_err(|_| "expected [user@]host[:port] with letters, digits, '.', '-' and '_' only")
}

/// A relay URL as iroh takes it: `http(s)://host[:port][/]`. The transport parses it again
/// (into iroh's type); this check only makes a typo an error that names the key.
pub(super) fn check_relay_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| format!("{url:?} is not an http:// or https:// URL"))?;
    let host = rest.split('/').next().unwrap_or("");
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(format!("{url:?} has no valid host"));
    }
    Ok(())
}
