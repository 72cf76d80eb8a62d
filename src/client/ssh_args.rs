//! The argument shapes `ssh` accepts, so `malai ssh` can stand in for it
//! (`rsync -e "malai ssh"`, `GIT_SSH_COMMAND="malai ssh"`, muscle memory).
//!
//! Like OpenSSH's getopt loop: options may come before the host and again right after it;
//! the first word after that starts the command, and every remaining word is joined with
//! spaces into one command string (so `malai ssh foo ls -la` runs `ls -la`). Options that
//! change nothing here (ciphers, identity files, verbosity, …) are accepted and ignored
//! (logged), because rsync and git pass them. Forwarding flags (`-L -R -D -W -N -f -g -A`)
//! are collected here and served by `client::forward`. Options that ask for something malai
//! does not do (yet) are errors naming the option ([`UNSUPPORTED`], [`UNSUPPORTED_OPTIONS`]):
//! running the command without the asked-for jump host, X11 or control socket would be
//! silently wrong.

/// `-t`/`-T` as ssh counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TtyChoice {
    /// No flag: a pty only for an interactive session (no command, stdin a terminal).
    #[default]
    Auto,
    /// `-t`: a pty if stdin is a terminal.
    Want,
    /// `-tt`: a pty even if stdin is not a terminal.
    Force,
    /// `-T`: never.
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SshArgs {
    pub host: String,
    /// `-l user` / `user@host`: logged only; commands run as the server process's user.
    pub user: Option<String>,
    /// `-p port`: informational.
    pub port: Option<u16>,
    pub command: Option<String>,
    pub tty: TtyChoice,
    /// `-n`: stdin from /dev/null.
    pub no_stdin: bool,
    /// `-q`: no diagnostics for the remote's signal death etc.
    pub quiet: bool,
    /// `-o Opt=val` as given (matched case-insensitively where malai uses one).
    pub options: Vec<String>,
    /// `--parallel N` (malai): concurrent hosts for a group.
    pub parallel: Option<usize>,
    /// `-G`: print the configuration for the host and exit without connecting. git runs
    /// `<GIT_SSH_COMMAND> -G … host` to learn whether it is OpenSSH; connecting there would
    /// start a login shell on the server.
    pub print_config: bool,
    /// Flags that were accepted but mean nothing here (for the log).
    pub ignored: Vec<String>,
    /// `-L spec` / `-o LocalForward=…`, as given (parsed by `client::forward`).
    pub local_forwards: Vec<String>,
    /// `-R spec` / `-o RemoteForward=…`.
    pub remote_forwards: Vec<String>,
    /// `-A` / `-o ForwardAgent=yes` (`-a` / `ForwardAgent=no` turn it off).
    pub forward_agent: bool,
    /// `-D spec` / `-o DynamicForward=…`.
    pub dynamic_forwards: Vec<String>,
    /// `-W host:port`: stdio forward, no session.
    pub stdio_forward: Option<String>,
    /// `-N` / `-o SessionType=none`: no remote command, forwards only.
    pub no_command: bool,
    /// `-g`: local forwards listen on all interfaces unless a bind address is given.
    pub gateway_ports: bool,
    /// `-o ExitOnForwardFailure=yes`: a forward that cannot be set up is fatal.
    pub exit_on_forward_failure: bool,
    /// `-f` / `-o ForkAfterAuthentication=yes`: go to the background once the forwards
    /// (and the remote command) are up.
    pub background: bool,
}

impl SshArgs {
    /// Any forward or `-N`: the run goes through `client::forward`.
    pub fn forwards(&self) -> bool {
        !self.local_forwards.is_empty()
            || !self.dynamic_forwards.is_empty()
            || self.stdio_forward.is_some()
            || self.no_command
            || !self.remote_forwards.is_empty()
            || self.forward_agent
            || self.background
    }
}

/// A command line that cannot be run is the command's error (one line, exit 255).
impl From<ArgsError> for crate::session::SessionError {
    fn from(e: ArgsError) -> Self {
        crate::session::SessionError::Usage(e.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("option -{0} needs an argument")]
    MissingValue(char),
    #[error("unknown option -{0}")]
    Unknown(char),
    #[error("bad port {0:?}")]
    BadPort(String),
    #[error("bad --parallel value {0:?}")]
    BadParallel(String),
    #[error("no host given; usage: malai ssh [options] <host> [command …]")]
    NoHost,
    /// A flag or `-o` option ssh has and malai does not implement (yet).
    #[error("{0} is not supported by malai ssh")]
    Unsupported(String),
}

/// ssh flags malai does not implement: each one asks for behaviour (a forward, a jump host,
/// X11, a control master, a subsystem, printing instead of connecting) that ignoring it
/// would silently lose. Checked before any connection is made.
pub const UNSUPPORTED: &str = "JMOQsVwXY";

/// `-o` options (lower-case) that, set to anything but their off value, ask for something
/// malai does not do (yet). The second element is the value that is harmless ("" = none).
pub const UNSUPPORTED_OPTIONS: &[(&str, &[&str])] = &[
    ("forwardagent", &["no", "yes"]),
    ("forwardx11", &["no"]),
    ("forwardx11trusted", &["no"]),
    ("proxyjump", &["none"]),
    ("sessiontype", &["default", "none"]),
    ("forkafterauthentication", &["no", "yes"]),
    ("tunnel", &["no"]),
    ("remotecommand", &["none"]),
    ("controlmaster", &["no"]),
    ("streamlocalbindunlink", &["no"]),
];

/// `-o` options that set up forwards (ssh_config spelling: `LocalForward 8080 host:80`).
fn forward_option(out: &mut SshArgs, o: &str) {
    let (k, v) = o.split_once(['=', ' ']).unwrap_or((o, ""));
    let v = v.trim().trim_start_matches('=').trim();
    match k.trim().to_ascii_lowercase().as_str() {
        // `LocalForward [bind:]port host:hostport` → the -L spelling.
        "localforward" => {
            let spec = match v.split_once(char::is_whitespace) {
                Some((a, b)) => format!("{}:{}", a.trim(), b.trim()),
                None => v.to_string(),
            };
            out.local_forwards.push(spec);
        }
        "remoteforward" => {
            let spec = match v.split_once(char::is_whitespace) {
                Some((a, b)) => format!("{}:{}", a.trim(), b.trim()),
                None => v.to_string(),
            };
            out.remote_forwards.push(spec);
        }
        "forwardagent" => out.forward_agent = v.eq_ignore_ascii_case("yes"),
        "forkafterauthentication" => out.background = v.eq_ignore_ascii_case("yes"),
        "dynamicforward" => out.dynamic_forwards.push(v.to_string()),
        "exitonforwardfailure" => out.exit_on_forward_failure = v.eq_ignore_ascii_case("yes"),
        "sessiontype" if v.eq_ignore_ascii_case("none") => out.no_command = true,
        "gatewayports" => out.gateway_ports = v.eq_ignore_ascii_case("yes"),
        _ => {}
    }
}

/// The error for an `-o` option malai does not implement with the given value, if any.
fn unsupported_option(o: &str) -> Option<ArgsError> {
    let (k, v) = o.split_once(['=', ' ']).unwrap_or((o, ""));
    let k = k.trim().to_ascii_lowercase();
    let v = v.trim().trim_start_matches('=').trim().to_ascii_lowercase();
    let (_, harmless) = UNSUPPORTED_OPTIONS.iter().find(|(name, _)| *name == k)?;
    if harmless.contains(&v.as_str()) {
        return None;
    }
    Some(ArgsError::Unsupported(format!("-o {}", o.trim())))
}

/// ssh options that take a value.
const WITH_VALUE: &str = "BbcDEeFIiJLlmOoPpQRSWw";
/// ssh options without a value.
const NO_VALUE: &str = "46AaCfGgKkMNnqsTtVvXxYy";

pub fn parse(args: &[String]) -> Result<SshArgs, ArgsError> {
    let mut out = SshArgs::default();
    let mut i = 0;
    let mut host: Option<String> = None;
    let mut tees = 0;
    while i < args.len() {
        let a = &args[i];
        if a == "--" {
            i += 1;
            if host.is_none() {
                host = args.get(i).cloned();
                i += 1;
            }
            break;
        }
        if let Some(v) = a.strip_prefix("--parallel") {
            let val = if let Some(v) = v.strip_prefix('=') {
                v.to_string()
            } else if v.is_empty() {
                i += 1;
                args.get(i).cloned().ok_or(ArgsError::MissingValue('-'))?
            } else {
                return Err(ArgsError::BadParallel(a.clone()));
            };
            out.parallel = Some(
                val.parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(ArgsError::BadParallel(val))?,
            );
            i += 1;
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            let flags: Vec<char> = a[1..].chars().collect();
            let mut j = 0;
            while j < flags.len() {
                let c = flags[j];
                if UNSUPPORTED.contains(c) {
                    return Err(ArgsError::Unsupported(format!("-{c}")));
                }
                if WITH_VALUE.contains(c) {
                    let rest: String = flags[j + 1..].iter().collect();
                    let val = if !rest.is_empty() {
                        rest
                    } else {
                        i += 1;
                        args.get(i).cloned().ok_or(ArgsError::MissingValue(c))?
                    };
                    match c {
                        'p' => {
                            out.port =
                                Some(val.parse().map_err(|_| ArgsError::BadPort(val.clone()))?)
                        }
                        'l' => out.user = Some(val),
                        'o' => {
                            if let Some(e) = unsupported_option(&val) {
                                return Err(e);
                            }
                            forward_option(&mut out, &val);
                            out.options.push(val)
                        }
                        'L' => out.local_forwards.push(val),
                        'R' => out.remote_forwards.push(val),
                        'D' => out.dynamic_forwards.push(val),
                        'W' => out.stdio_forward = Some(val),
                        _ => out.ignored.push(format!("-{c} {val}")),
                    }
                    break;
                } else if NO_VALUE.contains(c) {
                    match c {
                        't' => tees += 1,
                        'T' => out.tty = TtyChoice::Never,
                        'n' => out.no_stdin = true,
                        'q' => out.quiet = true,
                        'G' => out.print_config = true,
                        'N' => out.no_command = true,
                        'A' => out.forward_agent = true,
                        'f' => out.background = true,
                        'a' => out.forward_agent = false,
                        'g' => out.gateway_ports = true,
                        _ => out.ignored.push(format!("-{c}")),
                    }
                    j += 1;
                } else {
                    return Err(ArgsError::Unknown(c));
                }
            }
            i += 1;
            continue;
        }
        if host.is_none() {
            host = Some(a.clone());
            i += 1;
            continue;
        }
        break;
    }
    let mut host = host.ok_or(ArgsError::NoHost)?;
    if let Some((user, h)) = host.split_once('@') {
        out.user.get_or_insert_with(|| user.to_string());
        host = h.to_string();
    }
    if host.is_empty() {
        return Err(ArgsError::NoHost);
    }
    out.host = host;
    if out.tty != TtyChoice::Never {
        out.tty = match tees {
            0 => TtyChoice::Auto,
            1 => TtyChoice::Want,
            _ => TtyChoice::Force,
        };
    }
    // RequestTTY in -o, as ssh_config spells it.
    for o in &out.options {
        if let Some((k, v)) = o.split_once(['=', ' '])
            && k.eq_ignore_ascii_case("RequestTTY")
        {
            out.tty = match v.trim().to_ascii_lowercase().as_str() {
                "no" => TtyChoice::Never,
                "yes" => TtyChoice::Want,
                "force" => TtyChoice::Force,
                _ => out.tty,
            };
        }
    }
    let rest = &args[i.min(args.len())..];
    if !rest.is_empty() {
        out.command = Some(rest.join(" "));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &[&str]) -> SshArgs {
        parse(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn shapes_rsync_and_git_use() {
        // rsync: ssh [-l user] host rsync --server ...
        let a = p(&[
            "-l",
            "bob",
            "foo.acme",
            "rsync",
            "--server",
            "-vlogDtpre.iLsfxCIvu",
            ".",
            "dir/",
        ]);
        assert_eq!(a.host, "foo.acme");
        assert_eq!(a.user.as_deref(), Some("bob"));
        assert_eq!(
            a.command.as_deref(),
            Some("rsync --server -vlogDtpre.iLsfxCIvu . dir/")
        );
        // git: ssh -o SendEnv=GIT_PROTOCOL host 'git-upload-pack '\''repo.git'\'''
        let a = p(&[
            "-o",
            "SendEnv=GIT_PROTOCOL",
            "-p",
            "22",
            "foo.acme",
            "git-upload-pack 'repo.git'",
        ]);
        assert_eq!(a.command.as_deref(), Some("git-upload-pack 'repo.git'"));
        assert_eq!(a.port, Some(22));
        assert_eq!(a.options, vec!["SendEnv=GIT_PROTOCOL"]);
    }

    #[test]
    fn flags() {
        let a = p(&[
            "-tt", "-x", "-a", "-4", "-e", "none", "root@foo", "--", "ls",
        ]);
        assert_eq!(a.tty, TtyChoice::Force);
        assert_eq!(a.user.as_deref(), Some("root"));
        assert_eq!(a.host, "foo");
        // After the host, getopt still consumes `--`, as with ssh.
        assert_eq!(a.command.as_deref(), Some("ls"));
        let a = p(&["-T", "-t", "foo"]);
        assert_eq!(a.tty, TtyChoice::Never);
        let a = p(&["-p2222", "-oBatchMode=yes", "foo", "-n", "ls", "-la"]);
        assert_eq!(a.port, Some(2222));
        assert!(a.no_stdin);
        assert_eq!(a.command.as_deref(), Some("ls -la"));
        let a = p(&["--", "foo", "echo", "hi"]);
        assert_eq!(a.host, "foo");
        assert_eq!(a.command.as_deref(), Some("echo hi"));
        // git's probe for an OpenSSH-like command.
        let a = p(&["-G", "-o", "SendEnv=GIT_PROTOCOL", "foo.acme"]);
        assert!(a.print_config);
        assert_eq!(a.host, "foo.acme");
        assert_eq!(a.command, None);
        let a = p(&["--parallel", "3", "admins.acme", "uptime"]);
        assert_eq!(a.parallel, Some(3));
        let a = p(&["--parallel=2", "-o", "RequestTTY=force", "foo"]);
        assert_eq!(a.parallel, Some(2));
        assert_eq!(a.tty, TtyChoice::Force);
        assert_eq!(a.command, None);
    }

    #[test]
    fn errors() {
        let e = |s: &[&str]| parse(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(e(&[]), Err(ArgsError::NoHost));
        assert_eq!(e(&["-p"]), Err(ArgsError::MissingValue('p')));
        assert_eq!(e(&["-p", "x", "foo"]), Err(ArgsError::BadPort("x".into())));
        assert_eq!(e(&["-Z", "foo"]), Err(ArgsError::Unknown('Z')));
        assert_eq!(
            e(&["--parallel", "0", "g"]),
            Err(ArgsError::BadParallel("0".into()))
        );
        assert_eq!(e(&["user@"]), Err(ArgsError::NoHost));
    }

    #[test]
    fn forward_flags() {
        let a = p(&[
            "-N",
            "-g",
            "-L",
            "8080:localhost:80",
            "-L9090:db:5432",
            "-D",
            "1080",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LocalForward 127.0.0.1:7000 web:80",
            "-o",
            "DynamicForward=1081",
            "foo",
        ]);
        assert!(a.no_command && a.gateway_ports && a.exit_on_forward_failure);
        assert_eq!(
            a.local_forwards,
            vec!["8080:localhost:80", "9090:db:5432", "127.0.0.1:7000:web:80"]
        );
        assert_eq!(a.dynamic_forwards, vec!["1080", "1081"]);
        assert!(a.forwards());
        let a = p(&["-W", "db:5432", "foo"]);
        assert_eq!(a.stdio_forward.as_deref(), Some("db:5432"));
        assert!(a.forwards());
        let a = p(&["-o", "SessionType=none", "foo"]);
        assert!(a.no_command);
        assert!(!p(&["foo", "ls"]).forwards());
        let a = p(&[
            "-A",
            "-R",
            "9000:localhost:22",
            "-o",
            "RemoteForward 0 /tmp/x.sock",
            "foo",
        ]);
        assert!(a.forward_agent && a.forwards());
        assert_eq!(
            a.remote_forwards,
            vec!["9000:localhost:22", "0:/tmp/x.sock"]
        );
        assert!(!p(&["-A", "-a", "foo"]).forward_agent);
        assert!(p(&["-o", "ForwardAgent=yes", "foo"]).forward_agent);
        assert!(p(&["-f", "-N", "foo"]).background);
        assert!(p(&["-o", "ForkAfterAuthentication=yes", "foo", "x"]).background);
    }

    /// Every flag that asks for something malai does not do is an error naming it, in any
    /// position getopt would read it (alone, bundled, with its value attached or not).
    #[test]
    fn unsupported_flags_are_errors() {
        let e = |s: &[&str]| parse(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        for c in UNSUPPORTED.chars() {
            let flag = format!("-{c}");
            let want = Err(ArgsError::Unsupported(flag.clone()));
            if WITH_VALUE.contains(c) {
                assert_eq!(e(&[&flag, "8080:localhost:80", "foo"]), want, "{flag}");
                assert_eq!(e(&[&format!("{flag}8080"), "foo"]), want, "{flag}");
            } else {
                assert_eq!(e(&[&flag, "foo"]), want, "{flag}");
                assert_eq!(e(&["-q", "foo", &flag, "ls"]), want, "{flag}");
            }
        }
        // Bundled after a harmless flag.
        assert_eq!(e(&["-qX", "foo"]), Err(ArgsError::Unsupported("-X".into())));
        assert_eq!(
            e(&["-TJjump", "foo"]),
            Err(ArgsError::Unsupported("-J".into()))
        );
        let msg = e(&["-s", "foo", "sftp"]).unwrap_err().to_string();
        assert_eq!(msg, "-s is not supported by malai ssh");
        // The same asks spelled as -o.
        for o in [
            "ForwardAgent=/some/socket",
            "forwardx11=yes",
            "ProxyJump=bastion",
            "SessionType=subsystem",
        ] {
            assert_eq!(
                e(&["-o", o, "foo"]),
                Err(ArgsError::Unsupported(format!("-o {o}"))),
                "{o}"
            );
        }
        // Their off values, and options that change nothing here, are fine.
        for o in [
            "ForwardAgent=no",
            "ForwardX11 no",
            "ProxyJump=none",
            "SessionType=default",
            "BatchMode=yes",
            "StrictHostKeyChecking=no",
        ] {
            assert!(e(&["-o", o, "foo"]).is_ok(), "{o}");
        }
        // Harmless flags rsync/git/users pass stay accepted.
        assert!(e(&["-4", "-6", "-a", "-C", "-k", "-K", "-v", "-x", "-y", "foo"]).is_ok());
        assert!(
            e(&[
                "-i", "id", "-c", "aes", "-m", "hmac", "-F", "cfg", "-E", "log", "foo"
            ])
            .is_ok()
        );
    }
}
