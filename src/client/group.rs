//! Running one command on every server of a group (`admins.acme`, `group:admins`).
//!
//! Concurrent (bounded by `--parallel`, default 8), stdin not shared (each host gets EOF,
//! like `ssh -n`), every output line prefixed `name: ` and written whole so lines from
//! different hosts never interleave mid-line. A summary line per failed host goes to
//! stderr; the exit code is 0 only if every host succeeded (255 if any failed to connect,
//! else the highest remote exit code). SIGINT/SIGTERM/SIGHUP end the running hosts like
//! ssh and start no more. Each member's exec is resumable when its server offers it (on
//! the group's one endpoint, or run by the key holder), so a lost connection stalls that
//! member's output instead of ending it; a member refused on resume fails alone.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::AsyncWrite;

use super::exec::{Interrupts, drive, drive_resumable, exec_request};
use super::ssh_args::SshArgs;
use crate::protocol::Request;
use crate::session::own::OwnEndpoint;
use crate::session::{Resolved, Route, SessionError, open, open_on, resume, via_resume};

pub const DEFAULT_PARALLEL: usize = 8;

/// Runs `args.command` on every server member of `group`.
pub async fn run(resolved: &Resolved, group: &str, args: &SshArgs) -> Result<i32, SessionError> {
    let members = resolved
        .config
        .groups
        .get(group)
        .map(|g| g.members.clone())
        .unwrap_or_default();
    let servers: Vec<_> = members
        .iter()
        .filter_map(|m| resolved.config.servers.get(m).cloned())
        .collect();
    if servers.is_empty() {
        return Err(SessionError::Usage(format!(
            "group {group} has no servers to run on"
        )));
    }
    if args.command.is_none() {
        return Err(SessionError::Usage(
            "a group needs a command (no interactive session on many hosts)".into(),
        ));
    }
    // Through the agent when one is set (each member its own request on its pooled
    // connection); required under lockdown.
    // Over our own endpoint, one for all members, kept until the last has ended.
    let (agent, own): (Option<Arc<std::path::Path>>, _) =
        match crate::session::route(&resolved.dir, Some(&resolved.config)).await? {
            Route::Holder(a) => (Some(Arc::from(a.path())), None),
            Route::Own(own) => (None, Some(own)),
        };
    // A signal stops the hosts still waiting for a slot; the running ones end on it too.
    let mut interrupts = Interrupts::install()?;
    let sem = Arc::new(tokio::sync::Semaphore::new(
        args.parallel.unwrap_or(DEFAULT_PARALLEL),
    ));
    let width = servers.iter().map(|s| s.name.len()).max().unwrap_or(0);
    let mut tasks = tokio::task::JoinSet::new();
    for server in servers {
        let sem = sem.clone();
        let resolved = Resolved {
            dir: resolved.dir.clone(),
            config: resolved.config.clone(),
            target: resolved.target.clone(),
        };
        let mut req = exec_request(args, false);
        // Resumable when the server offers it, like one host's exec: a member's command
        // outlives a lost connection (the holder, or `run_member`, redials).
        req.resume = resume::enabled();
        let agent = agent.clone().filter(|_| server.ssh_via.is_none());
        let own = own.clone().filter(|_| server.ssh_via.is_none());
        tasks.spawn(async move {
            let Ok(permit) = sem.acquire_owned().await else {
                let e = SessionError::Local("not started: interrupted".into());
                return (server.name, Err(e));
            };
            let prefix = format!("{:width$}: ", server.name);
            let mut out = Prefixed::new(prefix.clone(), Sink::Stdout);
            let mut err = Prefixed::new(prefix, Sink::Stderr);
            let r = if let Some(path) = agent {
                // `<server-id52>.<cluster-id52>` names exactly this member for the agent.
                let host = format!("{}.{}", server.id52, resolved.config.manager);
                crate::client::handover::exec_into(&path, &host, req, &mut out, &mut err).await
            } else {
                run_member(&resolved, &server, own, req, &mut out, &mut err).await
            };
            if matches!(r, Err(SessionError::Killed(_))) {
                // Before our slot is free: hosts still waiting for one must not start.
                permit.semaphore().close();
            }
            drop(permit);
            out.flush_rest();
            err.flush_rest();
            (server.name, r)
        });
    }
    let mut results = vec![];
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                Some(Ok(r)) => results.push(r),
                Some(Err(_)) => {}
                None => break,
            },
            _ = interrupts.recv(), if !sem.is_closed() => sem.close(),
        }
    }
    if let Some(own) = own {
        own.done(std::time::Duration::from_secs(1)).await;
    }
    results.sort_by(|a, b| a.0.cmp(&b.0));
    let mut code = 0;
    for (name, r) in results {
        match r {
            Ok(0) => {}
            Ok(c) => {
                eprintln!("malai: {name}: exit {c}");
                if code != 255 {
                    code = code.max(c);
                }
            }
            Err(e) => {
                eprintln!("malai: {name}: {e}");
                code = 255;
            }
        }
    }
    Ok(code)
}

/// One member, directly: a signal while connecting or running ends it like ssh. On the
/// group's own endpoint (`own`) a request that asks for resume is opened resumable; an
/// `ssh-via` member has no endpoint and stays plain.
async fn run_member(
    resolved: &Resolved,
    server: &crate::config::Server,
    own: Option<Arc<OwnEndpoint>>,
    req: crate::protocol::exec::ExecRequest,
    out: &mut Prefixed,
    err: &mut Prefixed,
) -> Result<i32, SessionError> {
    let mut interrupts = Interrupts::install()?;
    let opened = tokio::select! {
        s = async {
            match own {
                Some(own) if req.resume => resume::open(own, resolved, server, Request::Exec(req)).await,
                Some(own) => open_on(Route::Own(own), resolved, server, Request::Exec(req))
                    .await
                    .map(|s| resume::Opened::Plain(Box::new(s))),
                None if req.resume && server.ssh_via.is_some() => {
                    via_resume::open(resolved, server, Request::Exec(req), &[]).await
                }
                None => open(resolved, server, Request::Exec(req))
                    .await
                    .map(|s| resume::Opened::Plain(Box::new(s))),
            }
        } => s?,
        n = interrupts.recv() => return Err(SessionError::Killed(n)),
    };
    match opened {
        resume::Opened::Plain(s) => drive(*s, None, out, err, false, &mut interrupts).await,
        resume::Opened::Resumable(r) => {
            drive_resumable(*r, None, out, err, false, &mut interrupts).await
        }
        resume::Opened::Via(r) => drive_resumable(*r, None, out, err, false, &mut interrupts).await,
    }
}

#[derive(Clone, Copy)]
enum Sink {
    Stdout,
    Stderr,
}

/// Buffers partial lines and writes whole prefixed lines with one `write` each.
struct Prefixed {
    prefix: String,
    sink: Sink,
    partial: Vec<u8>,
    lock: Arc<Mutex<()>>,
}

impl Prefixed {
    fn new(prefix: String, sink: Sink) -> Self {
        static LOCK: std::sync::OnceLock<Arc<Mutex<()>>> = std::sync::OnceLock::new();
        Prefixed {
            prefix,
            sink,
            partial: vec![],
            lock: LOCK.get_or_init(|| Arc::new(Mutex::new(()))).clone(),
        }
    }

    fn emit(&self, line: &[u8]) {
        use std::io::Write;
        let mut buf = self.prefix.as_bytes().to_vec();
        buf.extend_from_slice(line);
        let _g = self.lock.lock();
        let _ = match self.sink {
            Sink::Stdout => std::io::stdout().lock().write_all(&buf),
            Sink::Stderr => std::io::stderr().lock().write_all(&buf),
        };
    }

    fn flush_rest(&mut self) {
        if !self.partial.is_empty() {
            let mut line = std::mem::take(&mut self.partial);
            line.push(b'\n');
            self.emit(&line);
        }
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.partial.extend_from_slice(data);
        while let Some(pos) = this.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = this.partial.drain(..=pos).collect();
            this.emit(&line);
        }
        Poll::Ready(Ok(data.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
