//! Whether `malai ssh stdinserver` runs under an `authorized_keys` line with `restrict`
//! (issue 19, finding 1).
//!
//! A key bound to `command="malai ssh stdinserver …"` without `restrict` (or at least
//! `no-port-forwarding`) can ask sshd for socket forwarding with `ssh -N`, and then the
//! forced command never runs: sshd connects to local sockets as the server's user. The
//! control socket's token stops that from reaching the key holder, but the line is still
//! wrong, so the forced command says so whenever it can tell: a pty it was given (`restrict`
//! forbids one), or a line in the user's `authorized_keys` that forces stdinserver without
//! those options. One line on stderr and in the log; the request is still served.

use std::path::Path;

/// Options that make a stdinserver line safe against forwarding.
const SAFE: &[&str] = &["restrict", "no-port-forwarding"];

/// The warnings for this process's environment and the user's `authorized_keys` files.
pub fn warnings() -> Vec<String> {
    let mut out = vec![];
    if std::env::var_os("SSH_TTY").is_some() {
        out.push(
            "sshd gave this key a pty, so its authorized_keys line lacks `restrict`: add it \
             (contrib/authorized_keys)"
                .to_string(),
        );
    }
    if let Some(home) = std::env::var_os("HOME") {
        let ssh = Path::new(&home).join(".ssh");
        for name in ["authorized_keys", "authorized_keys2"] {
            let path = ssh.join(name);
            if let Ok(text) = std::fs::read_to_string(&path) {
                for n in unrestricted_lines(&text) {
                    out.push(format!(
                        "{}:{n} forces `malai ssh stdinserver` without `restrict`: that key \
                         can forward sockets with `ssh -N`; add `restrict` (contrib/authorized_keys)",
                        path.display()
                    ));
                }
            }
        }
    }
    out
}

/// Line numbers (1-based) of stdinserver lines that allow forwarding.
pub fn unrestricted_lines(text: &str) -> Vec<usize> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let opts = options(l.trim());
            let forced = opts
                .iter()
                .any(|o| o.starts_with("command=") && o.contains("stdinserver"));
            forced && !opts.iter().any(|o| SAFE.contains(&o.as_str()))
        })
        .map(|(i, _)| i + 1)
        .collect()
}

/// The comma-separated options before the key type (quotes respected), lower-cased names.
fn options(line: &str) -> Vec<String> {
    if line.is_empty() || line.starts_with('#') {
        return vec![];
    }
    // The options field ends at the first space outside quotes.
    let mut field = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' | '\t' if !quoted => break,
            _ => {}
        }
        field.push(c);
    }
    let mut opts = vec![];
    let mut cur = String::new();
    let mut quoted = false;
    for c in field.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ',' if !quoted => opts.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    opts.push(cur);
    opts.into_iter()
        .map(|o| match o.split_once('=') {
            Some((k, v)) => format!("{}={v}", k.to_ascii_lowercase()),
            None => o.to_ascii_lowercase(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stdinserver_lines_without_restrict_are_found() {
        let text = "\
# comment
command=\"malai ssh stdinserver alice@acme\",restrict ssh-ed25519 AAAA alice
command=\"malai ssh stdinserver bob@acme\" ssh-ed25519 AAAA bob
command=\"malai ssh stdinserver carol@acme\",no-pty ssh-ed25519 AAAA carol
COMMAND=\"malai ssh stdinserver dave@acme\",no-port-forwarding ssh-ed25519 AAAA dave
ssh-ed25519 AAAA plain-login
command=\"/usr/bin/backup, stdinserver-like\",restrict ssh-ed25519 AAAA other
";
        // bob (no options) and carol (no-pty does not stop forwarding); not alice, not
        // dave (forwarding off), not a plain login key.
        assert_eq!(unrestricted_lines(text), vec![3, 4]);
    }
}
