//! The `malai` binary: parse, start logging, run, map errors to exit codes. All behaviour
//! lives in the library (`malai::cli`).

use std::process::ExitCode;

use clap::Parser;
use malai::cli::{Cli, dispatch, log_name};
use malai::config::paths::Dirs;

/// OpenSSH's convention: 255 means ssh itself (here: malai) failed, not the remote command.
const EXIT_MALAI: u8 = 255;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if let Some(exec_args) = malai::cli::exec_shape(&args) {
        return run_exec(exec_args);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_MALAI } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let dirs = match Dirs::from_env() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("malai: {e}");
            return ExitCode::from(EXIT_MALAI);
        }
    };
    let _log = malai::logging::init(&dirs, log_name(&cli));
    // The proxy is one stream, like exec; long-running services keep all cores.
    let rt = if log_name(&cli) == "proxy" {
        client_runtime()
    } else {
        match service_workers() {
            Ok(n) => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(n)
                .enable_all()
                .build(),
            Err(e) => {
                eprintln!("malai: {e}");
                return ExitCode::from(EXIT_MALAI);
            }
        }
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("malai: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_MALAI);
        }
    };
    let result = rt.block_on(dispatch(cli, dirs));
    // Don't wait for stray blocking tasks (a stdin read) to finish.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<malai::cli::ExitStatus>().is_some() => ExitCode::from(
            e.downcast_ref::<malai::cli::ExitStatus>()
                .map_or(EXIT_MALAI, |s| s.0),
        ),
        Err(e) => {
            let msg = error_line(&e);
            tracing::error!(error = %msg, "command failed");
            eprintln!("malai: {msg}");
            ExitCode::from(EXIT_MALAI)
        }
    }
}

/// `malai ssh [flags] <host> [command …]`: exit with the remote command's status.
fn run_exec(args: Vec<String>) -> ExitCode {
    let dirs = match Dirs::from_env() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("malai: {e}");
            return ExitCode::from(EXIT_MALAI);
        }
    };
    // Parsed first for `-v`/`-E`; a parse error is reported by `exec::run` like any other.
    let parsed = malai::client::ssh_args::parse(&args);
    let verbosity = match &parsed {
        Ok(a) => malai::logging::Verbosity {
            level: a.verbose,
            file: a.log_file.as_ref().map(std::path::PathBuf::from),
        },
        Err(_) => malai::logging::Verbosity::default(),
    };
    let _log = match malai::logging::init_with(&dirs, "exec", &verbosity) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("malai: {e}");
            return ExitCode::from(EXIT_MALAI);
        }
    };
    let rt = match client_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("malai: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_MALAI);
        }
    };
    let host = parsed.map(|a| a.host).unwrap_or_default();
    // What `-v` shows at least, as ssh's first and last debug lines do.
    tracing::debug!(version = env!("CARGO_PKG_VERSION"), %host, "malai ssh: starting");
    let result = rt.block_on(malai::client::exec::run(&dirs, &args));
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => {
            tracing::debug!(%host, status = code, "malai ssh: remote command finished");
            ExitCode::from(code.clamp(0, 255) as u8)
        }
        Err(malai::client::SessionError::Killed(n)) => {
            eprintln!("Killed by signal {n}.");
            ExitCode::from(EXIT_MALAI)
        }
        Err(e) => {
            tracing::error!(error = %e, "exec failed");
            let msg = one_line(&e.to_string());
            if let Some(line) = malai::cli::mistyped_command(&host, &e) {
                eprintln!("malai: {}", one_line(&line));
            } else if host.is_empty() {
                eprintln!("malai: {msg}");
            } else {
                eprintln!("malai: {host}: {msg}");
            }
            ExitCode::from(EXIT_MALAI)
        }
    }
}

/// Runtime for one client request (native exec, proxy): a single thread. One stream's
/// bytes then never hop between threads (QUIC driver, stream task, stdio): measured here,
/// 1 GiB through native exec's stdin took 1.35 s on one thread vs 2.1 s on the default
/// multi-thread runtime, whose cross-thread wake-ups dominated the profile.
fn client_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// Worker threads of the long-running services (server, agent) and the other commands:
/// half this machine's cores, at least one; `MALAI_WORKER_THREADS` sets it.
///
/// Why not every core (tokio's default): every byte a server carries is encrypted again on
/// the same machine, by sshd or the embedded server (and on a small box by the clients'
/// ssh too), so malai's share of the work is about half. A second worker on 2 cores only
/// moved one connection's tasks between threads, each move a futex wake-up and a cold
/// cache: with one worker the server spent 11–18 % less CPU per GiB through the
/// ProxyCommand and 5–10 % less in native exec, and two native transfers at once through
/// one server finished 9 % sooner (docs/benchmarks.md, issue 23). Blocking work (files,
/// spawned commands) runs on tokio's blocking pool either way.
fn service_workers() -> Result<usize, String> {
    match std::env::var("MALAI_WORKER_THREADS") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "MALAI_WORKER_THREADS must be a number of threads, 1 or more (got {v:?})"
            )),
        },
        Err(_) => Ok(std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .max(1)),
    }
}

/// Errors go to stderr as one line.
fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An error and its causes as one line, each text once: many errors already include their
/// cause's text (`"…: {0}"` with a `#[source]`), which `{:#}` would print again.
fn error_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !c.is_empty() && !out.contains(&c) {
            out.push_str(": ");
            out.push_str(&c);
        }
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::error_line;

    #[derive(Debug, thiserror::Error)]
    #[error("agent socket not trusted: {0}")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let e = anyhow::Error::new(Outer(std::io::Error::other("dir unreadable")));
        assert_eq!(error_line(&e), "agent socket not trusted: dir unreadable");
        let e = anyhow::Error::new(std::io::Error::other("disk\nfull")).context("writing x");
        assert_eq!(error_line(&e), "writing x: disk full");
    }
}
