//! The argument shapes `ssh` accepts, so `malai ssh` can stand in for it
//! (`rsync -e "malai ssh"`, `GIT_SSH_COMMAND="malai ssh"`, muscle memory).
//!
//! Like OpenSSH's getopt loop: options may come before the host and again right after it;
//! the first word after that starts the command, and every remaining word is joined with
//! spaces into one command string (so `malai ssh foo ls -la` runs `ls -la`). Options that
//! change nothing here (ciphers, identity files, …) are accepted and ignored (logged),
//! because rsync and git pass them; an `-o` keyword OpenSSH does not know is an error, as
//! it is for ssh. `-v` and `-E file` are honoured for malai's own log (more detail, on
//! stderr or into the file). Forwarding flags (`-L -R -D -W -N -f -g -A`) are collected
//! here and served by `client::forward`. A user name (`-l`, `user@host`, `-o User=`) is
//! passed on in the request: the server runs commands only as itself and refuses another
//! user by name. Options that ask for something malai does not do (yet) are errors naming
//! the option ([`UNSUPPORTED`], [`UNSUPPORTED_OPTIONS`], `-S` other than `none`): running
//! the command without the asked-for jump host, X11 or control socket would be silently
//! wrong.

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
    /// `-l user` / `user@host` / `-o User=user`: sent with the request; a server refuses a
    /// user other than the one it runs as (it cannot switch users).
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
    /// `-v` (repeatable): malai's log in more detail, and on stderr unless `-E` names a file.
    pub verbose: u8,
    /// `-E file`: malai's log appended to this file instead.
    pub log_file: Option<String>,
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
    /// An `-o` keyword OpenSSH does not have either (a typo would otherwise be ignored).
    #[error("-o {option}: unknown ssh option {keyword:?} (see ssh_config(5))")]
    UnknownOption { option: String, keyword: String },
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
    ("controlpath", &["none"]),
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
        "user" if !v.is_empty() => {
            out.user.get_or_insert_with(|| v.to_string());
        }
        _ => {}
    }
}

/// The error for an `-o` option OpenSSH does not know, or that malai does not implement
/// with the given value, if any.
fn unsupported_option(o: &str) -> Option<ArgsError> {
    let (k, v) = o.split_once(['=', ' ']).unwrap_or((o, ""));
    let k = k.trim().to_ascii_lowercase();
    if !SSH_OPTIONS.contains(&k.as_str()) {
        return Some(ArgsError::UnknownOption {
            option: o.trim().to_string(),
            keyword: o
                .split_once(['=', ' '])
                .map_or(o, |(k, _)| k)
                .trim()
                .to_string(),
        });
    }
    let v = v.trim().trim_start_matches('=').trim().to_ascii_lowercase();
    let (_, harmless) = UNSUPPORTED_OPTIONS.iter().find(|(name, _)| *name == k)?;
    if harmless.contains(&v.as_str()) {
        return None;
    }
    Some(ArgsError::Unsupported(format!("-o {}", o.trim())))
}

/// Every keyword OpenSSH 9 accepts in `-o` (ssh_config(5), lower-case), including the
/// deprecated spellings it still takes. `Host`, `Match` and `Include` are not among them:
/// ssh refuses those on the command line too.
const SSH_OPTIONS: &[&str] = &[
    "addkeystoagent",
    "addressfamily",
    "batchmode",
    "bindaddress",
    "bindinterface",
    "canonicaldomains",
    "canonicalizefallbacklocal",
    "canonicalizehostname",
    "canonicalizemaxdots",
    "canonicalizepermittedcnames",
    "casignaturealgorithms",
    "certificatefile",
    "challengeresponseauthentication",
    "checkhostip",
    "cipher",
    "ciphers",
    "clearallforwardings",
    "compression",
    "connectionattempts",
    "connecttimeout",
    "controlmaster",
    "controlpath",
    "controlpersist",
    "dynamicforward",
    "enableescapecommandline",
    "enablesshkeysign",
    "escapechar",
    "exitonforwardfailure",
    "fingerprinthash",
    "forkafterauthentication",
    "forwardagent",
    "forwardx11",
    "forwardx11timeout",
    "forwardx11trusted",
    "gatewayports",
    "globalknownhostsfile",
    "gssapiauthentication",
    "gssapiclientidentity",
    "gssapidelegatecredentials",
    "gssapikexalgorithms",
    "gssapikeyexchange",
    "gssapirenewalforcesrekey",
    "gssapiserveridentity",
    "gssapitrustdns",
    "hashknownhosts",
    "hostbasedacceptedalgorithms",
    "hostbasedauthentication",
    "hostbasedkeytypes",
    "hostkeyalgorithms",
    "hostkeyalias",
    "hostname",
    "identitiesonly",
    "identityagent",
    "identityfile",
    "identityfile2",
    "ignoreunknown",
    "ipqos",
    "kbdinteractiveauthentication",
    "kbdinteractivedevices",
    "kexalgorithms",
    "knownhostscommand",
    "localcommand",
    "localforward",
    "loglevel",
    "logverbose",
    "macs",
    "nohostauthenticationforlocalhost",
    "numberofpasswordprompts",
    "passwordauthentication",
    "permitlocalcommand",
    "permitremoteopen",
    "pkcs11provider",
    "port",
    "preferredauthentications",
    "protocol",
    "proxycommand",
    "proxyjump",
    "proxyusefdpass",
    "pubkeyacceptedalgorithms",
    "pubkeyacceptedkeytypes",
    "pubkeyauthentication",
    "rekeylimit",
    "remotecommand",
    "remoteforward",
    "requesttty",
    "requiredrsasize",
    "revokedhostkeys",
    "securitykeyprovider",
    "sendenv",
    "serveralivecountmax",
    "serveraliveinterval",
    "sessiontype",
    "setenv",
    "smartcarddevice",
    "stdinnull",
    "streamlocalbindmask",
    "streamlocalbindunlink",
    "stricthostkeychecking",
    "syslogfacility",
    "tcpkeepalive",
    "tunnel",
    "tunneldevice",
    "updatehostkeys",
    "useprivilegedport",
    "user",
    "userknownhostsfile",
    "useroaming",
    "verifyhostkeydns",
    "visualhostkey",
    "xauthlocation",
];

/// ssh options that take a value.
const WITH_VALUE: &str = "BbcDEeFIiJLlmOoPpQRSWw";
/// ssh options without a value.
const NO_VALUE: &str = "46AaCfGgKkMNnqsTtVvXxYy";

/// Parses ssh's argument shapes in two stages, as ripgrep does: [`scan`] reads the words
/// and checks each one on its own (known flag, value present, value well-formed, not
/// something malai refuses), then [`build`] turns what was read into [`SshArgs`]. Errors
/// therefore come in command-line order, and `build` only fails for a missing host.
pub fn parse(args: &[String]) -> Result<SshArgs, ArgsError> {
    build(scan(args)?)
}

/// One flag as read, its value already checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Flag {
    Parallel(usize),
    Port(u16),
    User(String),
    /// `-o`, already checked against [`UNSUPPORTED_OPTIONS`].
    Option(String),
    LocalForward(String),
    RemoteForward(String),
    DynamicForward(String),
    StdioForward(String),
    /// `-t`; counted, as `-tt` means more than `-t`.
    Tty,
    NoTty,
    NoStdin,
    Quiet,
    PrintConfig,
    NoCommand,
    /// `-A` (true) / `-a` (false): the last one wins.
    ForwardAgent(bool),
    Background,
    GatewayPorts,
    /// `-v`; counted.
    Verbose,
    /// `-E file`.
    LogFile(String),
    /// Accepted and meaningless here, as given (for the log).
    Ignored(String),
}

/// The command line as read: flags in order, the host word, and the command words.
struct Scanned {
    flags: Vec<Flag>,
    host: Option<String>,
    command: Vec<String>,
}

/// Stage one: the getopt loop. Options may come before the host and again right after it;
/// the first other word after the host starts the command.
fn scan(args: &[String]) -> Result<Scanned, ArgsError> {
    let mut flags = Vec::new();
    let mut i = 0;
    let mut host: Option<String> = None;
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
            let n = val
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or(ArgsError::BadParallel(val))?;
            flags.push(Flag::Parallel(n));
            i += 1;
            continue;
        }
        if a.len() > 1 && a.starts_with('-') {
            i = scan_bundle(args, i, &mut flags)?;
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
    Ok(Scanned {
        flags,
        host,
        command: args[i.min(args.len())..].to_vec(),
    })
}

/// One word of bundled single-letter flags (`-tt`, `-qX`, `-p2222`, `-o` then its value
/// in the next word). Returns the index of the last word it used.
fn scan_bundle(args: &[String], mut i: usize, flags: &mut Vec<Flag>) -> Result<usize, ArgsError> {
    let letters: Vec<char> = args[i][1..].chars().collect();
    for (j, &c) in letters.iter().enumerate() {
        if UNSUPPORTED.contains(c) {
            return Err(ArgsError::Unsupported(format!("-{c}")));
        }
        if WITH_VALUE.contains(c) {
            let rest: String = letters[j + 1..].iter().collect();
            let val = if !rest.is_empty() {
                rest
            } else {
                i += 1;
                args.get(i).cloned().ok_or(ArgsError::MissingValue(c))?
            };
            flags.push(valued_flag(c, val)?);
            return Ok(i);
        }
        if !NO_VALUE.contains(c) {
            return Err(ArgsError::Unknown(c));
        }
        flags.push(match c {
            't' => Flag::Tty,
            'T' => Flag::NoTty,
            'n' => Flag::NoStdin,
            'q' => Flag::Quiet,
            'G' => Flag::PrintConfig,
            'N' => Flag::NoCommand,
            'A' => Flag::ForwardAgent(true),
            'a' => Flag::ForwardAgent(false),
            'f' => Flag::Background,
            'g' => Flag::GatewayPorts,
            'v' => Flag::Verbose,
            _ => Flag::Ignored(format!("-{c}")),
        });
    }
    Ok(i)
}

/// A flag of [`WITH_VALUE`] with its value, checked.
fn valued_flag(c: char, val: String) -> Result<Flag, ArgsError> {
    Ok(match c {
        'p' => Flag::Port(val.parse().map_err(|_| ArgsError::BadPort(val.clone()))?),
        'l' => Flag::User(val),
        'o' => {
            if let Some(e) = unsupported_option(&val) {
                return Err(e);
            }
            Flag::Option(val)
        }
        'L' => Flag::LocalForward(val),
        'R' => Flag::RemoteForward(val),
        'D' => Flag::DynamicForward(val),
        'W' => Flag::StdioForward(val),
        'E' => Flag::LogFile(val),
        // `-S ctl_path` is ControlPath: sharing a master connection malai does not have.
        'S' if val != "none" => return Err(ArgsError::Unsupported("-S".into())),
        _ => Flag::Ignored(format!("-{c} {val}")),
    })
}

/// Stage two: what was read, resolved into [`SshArgs`] (`user@host` split, `-t`/`-T` and
/// `RequestTTY` into one choice, the command words joined).
fn build(scanned: Scanned) -> Result<SshArgs, ArgsError> {
    let mut out = SshArgs::default();
    let mut tees = 0;
    for flag in scanned.flags {
        match flag {
            Flag::Parallel(n) => out.parallel = Some(n),
            Flag::Port(p) => out.port = Some(p),
            Flag::User(u) => out.user = Some(u),
            Flag::Option(o) => {
                forward_option(&mut out, &o);
                out.options.push(o);
            }
            Flag::LocalForward(v) => out.local_forwards.push(v),
            Flag::RemoteForward(v) => out.remote_forwards.push(v),
            Flag::DynamicForward(v) => out.dynamic_forwards.push(v),
            Flag::StdioForward(v) => out.stdio_forward = Some(v),
            Flag::Tty => tees += 1,
            Flag::NoTty => out.tty = TtyChoice::Never,
            Flag::NoStdin => out.no_stdin = true,
            Flag::Quiet => out.quiet = true,
            Flag::PrintConfig => out.print_config = true,
            Flag::NoCommand => out.no_command = true,
            Flag::ForwardAgent(on) => out.forward_agent = on,
            Flag::Background => out.background = true,
            Flag::GatewayPorts => out.gateway_ports = true,
            Flag::Verbose => out.verbose = out.verbose.saturating_add(1),
            Flag::LogFile(f) => out.log_file = Some(f),
            Flag::Ignored(f) => out.ignored.push(f),
        }
    }
    let mut host = scanned.host.ok_or(ArgsError::NoHost)?;
    if let Some((user, h)) = host.split_once('@') {
        out.user.get_or_insert_with(|| user.to_string());
        host = h.to_string();
    }
    if host.is_empty() {
        return Err(ArgsError::NoHost);
    }
    out.host = host;
    out.tty = tty_choice(out.tty, tees, &out.options);
    if !scanned.command.is_empty() {
        out.command = Some(scanned.command.join(" "));
    }
    Ok(out)
}

/// `-T` wins over any number of `-t`; a `RequestTTY` in `-o` (ssh_config spelling) wins
/// over both.
fn tty_choice(flags: TtyChoice, tees: usize, options: &[String]) -> TtyChoice {
    let mut tty = if flags == TtyChoice::Never {
        TtyChoice::Never
    } else {
        match tees {
            0 => TtyChoice::Auto,
            1 => TtyChoice::Want,
            _ => TtyChoice::Force,
        }
    };
    for o in options {
        if let Some((k, v)) = o.split_once(['=', ' '])
            && k.eq_ignore_ascii_case("RequestTTY")
        {
            tty = match v.trim().to_ascii_lowercase().as_str() {
                "no" => TtyChoice::Never,
                "yes" => TtyChoice::Want,
                "force" => TtyChoice::Force,
                _ => tty,
            };
        }
    }
    tty
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

    /// Issue 24: flags that used to be accepted and dropped are now honoured or refused.
    #[test]
    fn user_verbosity_log_file_and_control_path() {
        let e = |s: &[&str]| parse(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        // Every spelling of a user name reaches SshArgs (the server decides).
        assert_eq!(p(&["nobody@foo"]).user.as_deref(), Some("nobody"));
        assert_eq!(p(&["-l", "nobody", "foo"]).user.as_deref(), Some("nobody"));
        assert_eq!(
            p(&["-o", "User=nobody", "foo"]).user.as_deref(),
            Some("nobody")
        );
        assert_eq!(
            p(&["-o", "User nobody", "foo"]).user.as_deref(),
            Some("nobody")
        );
        assert_eq!(p(&["foo"]).user, None);
        // -l and -o User win over user@host, as the first name given does in ssh.
        assert_eq!(p(&["-o", "User=a", "b@foo"]).user.as_deref(), Some("a"));
        // -v counts, also bundled; -E names the log file.
        assert_eq!(p(&["foo"]).verbose, 0);
        assert_eq!(p(&["-v", "foo"]).verbose, 1);
        assert_eq!(p(&["-vvv", "foo", "ls"]).verbose, 3);
        let a = p(&["-E", "/tmp/x.log", "-v", "foo"]);
        assert_eq!(a.log_file.as_deref(), Some("/tmp/x.log"));
        assert_eq!(p(&["-E/tmp/y", "foo"]).log_file.as_deref(), Some("/tmp/y"));
        // -S is a control socket: refused, except its off value.
        assert_eq!(
            e(&["-S", "/tmp/ctl", "foo"]),
            Err(ArgsError::Unsupported("-S".into()))
        );
        assert_eq!(
            e(&["-o", "ControlPath=/tmp/ctl", "foo"]),
            Err(ArgsError::Unsupported("-o ControlPath=/tmp/ctl".into()))
        );
        assert!(e(&["-S", "none", "foo"]).is_ok());
        assert!(e(&["-o", "ControlPath=none", "foo"]).is_ok());
    }

    /// An `-o` keyword OpenSSH does not know is an error naming it; every keyword it knows
    /// (any case) is not.
    #[test]
    fn unknown_ssh_options_are_errors() {
        let e = |s: &[&str]| parse(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let err = e(&["-o", "Bogus=1", "foo"]).unwrap_err();
        assert_eq!(
            err,
            ArgsError::UnknownOption {
                option: "Bogus=1".into(),
                keyword: "Bogus".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "-o Bogus=1: unknown ssh option \"Bogus\" (see ssh_config(5))"
        );
        assert!(matches!(
            e(&["-oBogus yes", "foo"]),
            Err(ArgsError::UnknownOption { .. })
        ));
        for o in ["Host=x", "Match=all", "Include=/etc/x"] {
            assert!(e(&["-o", o, "foo"]).is_err(), "{o}");
        }
        for o in [
            "SendEnv=GIT_PROTOCOL",
            "batchmode=yes",
            "IDENTITIESONLY yes",
            "LogLevel=INFO",
            "UserKnownHostsFile=/dev/null",
            "ServerAliveInterval=5",
        ] {
            assert!(e(&["-o", o, "foo"]).is_ok(), "{o}");
        }
        assert!(
            SSH_OPTIONS.windows(2).all(|w| w[0] < w[1]),
            "sorted, no duplicates"
        );
        for (name, _) in UNSUPPORTED_OPTIONS {
            assert!(SSH_OPTIONS.contains(name), "{name}");
        }
    }
}
