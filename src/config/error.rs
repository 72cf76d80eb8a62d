//! Why a cluster file was refused: the one error type of parsing and validation, and the
//! mapping from a TOML syntax error to a line and column a person can find.

/// Why a cluster file was refused. Every message is one line that names the table and key
/// (`server.foo.allow-from: unknown name "alce"`), with the line number when it is known.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("TOML syntax error at line {line}, column {column}: {message}")]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("missing table [cluster-manager]: the file must name the cluster's manager")]
    MissingManager,
    #[error(
        "unknown table [{table}]: expected cluster-manager, server, device or group{}",
        at(.line)
    )]
    UnknownTable { table: String, line: Option<usize> },
    #[error("{table}: missing key {key}{}", at(.line))]
    MissingKey {
        table: String,
        key: String,
        line: Option<usize>,
    },
    #[error("{table}: unknown key {key:?}{}", at(.line))]
    UnknownKey {
        table: String,
        key: String,
        line: Option<usize>,
    },
    #[error("{key}: expected {expected}, found {found}{}", at(.line))]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
        line: Option<usize>,
    },
    #[error("{key}: {message}{}", at(.line))]
    BadValue {
        key: String,
        message: String,
        line: Option<usize>,
    },
    #[error("{table}: invalid name {name:?}: {reason}{}", at(.line))]
    BadName {
        table: String,
        name: String,
        reason: &'static str,
        line: Option<usize>,
    },
    #[error("{key}: unknown name {name:?}{}", at(.line))]
    UnknownName {
        key: String,
        name: String,
        line: Option<usize>,
    },
    #[error("{key}: group cycle {cycle}{}", at(.line))]
    GroupCycle {
        key: String,
        cycle: String,
        line: Option<usize>,
    },
    #[error("duplicate id52 {id52} in {first} and {second}{}", at(.line))]
    DuplicateId52 {
        id52: String,
        first: String,
        second: String,
        line: Option<usize>,
    },
    #[error("name {name:?} is used twice: {first} and {second}{}", at(.line))]
    DuplicateName {
        name: String,
        first: String,
        second: String,
        line: Option<usize>,
    },
}

fn at(line: &Option<usize>) -> String {
    match line {
        Some(n) => format!(" (line {n})"),
        None => String::new(),
    }
}

/// A TOML syntax error as one line with its position: every refusal is one line, so the
/// lines of `toml`'s message are joined.
pub(super) fn syntax_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let Position { line, column } = e
        .span()
        .map(|s| position(text, s.start))
        .unwrap_or(Position { line: 1, column: 1 });
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    ConfigError::Syntax {
        line,
        column,
        message,
    }
}

/// Where a byte offset sits in the text, as an editor counts: 1-based, columns in characters.
struct Position {
    line: usize,
    column: usize,
}

/// The position of a byte offset; offsets past the end clamp.
fn position(text: &str, offset: usize) -> Position {
    let before = text.as_bytes().iter().take(offset);
    let mut line = 1;
    let mut column = 1;
    for &b in before {
        if b == b'\n' {
            line += 1;
            column = 1;
        } else if b & 0xC0 != 0x80 {
            column += 1;
        }
    }
    Position { line, column }
}
