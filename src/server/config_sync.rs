//! The server's handlers for `config-push` and `config-hash` (bodies: `protocol::config`).
//!
//! Both run only after `acl::decide` allowed them: a push only from the cluster's manager,
//! a hash query only from a member or the manager. What a pushed file must pass before it
//! replaces this machine's copy is `sync::member::apply`'s job; the running server picks
//! the new file up on its next request (`ClusterState::current` checks the mtime), so no
//! restart is needed.
//!
//! On the manager's own endpoint, `config-hash` answers with the file *as members get it*
//! (key settings stripped) and, when asked to `fetch`, sends it: that is how a restarted
//! member or a device catches up without waiting for a push.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::request::{Context, reply};
use crate::protocol::Response;
use crate::protocol::config::{
    ConfigFile, HashQuery, HashReply, PushAck, read_config_frame, short_hash, write_config_frame,
};
use crate::sync::Source;
use crate::sync::member::{self, Applied};

/// How long the body frame may take after `accept` (a 1 MiB file over a slow path).
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a pushed file was not applied, and the hash of the file kept instead (so the
/// manager learns what this member still has).
struct Refusal {
    reason: String,
    kept: Option<String>,
}

/// `config-push`: accept, read the file, apply it (or refuse and keep the old one), ack.
pub async fn serve_push<R, W>(ctx: &Context, hash: String, r: &mut R, w: &mut W) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cluster = &ctx.state.dir.alias;
    let peer = ctx.peer;
    if reply(w, &Response::Accept).await.is_err() {
        return false;
    }
    let file = match tokio::time::timeout(BODY_TIMEOUT, read_config_frame::<_, ConfigFile>(r)).await
    {
        Ok(Ok(f)) => f,
        Ok(Err(e)) => {
            tracing::warn!(%peer, %cluster, error = %e, "bad config-push body; file unchanged");
            return false;
        }
        Err(_) => {
            tracing::warn!(%peer, %cluster, "config-push body did not arrive in time; file unchanged");
            return false;
        }
    };
    let ack = if ctx.state.me == ctx.state.current().manager {
        PushAck::Refused {
            reason: "this machine is the cluster's manager; its file is the source".into(),
            hash: None,
        }
    } else {
        let cd = ctx.state.dir.clone();
        let applied = tokio::task::spawn_blocking(move || {
            match member::apply(&cd, &file.text, Some(&hash), &peer) {
                Ok(a) => Ok(a),
                Err(e) => Err(Refusal {
                    reason: e.to_string(),
                    kept: member::current_hash(&cd),
                }),
            }
        })
        .await;
        match applied {
            Ok(Ok(Applied::Replaced(hash))) => PushAck::Applied { hash },
            Ok(Ok(Applied::Unchanged(hash))) => PushAck::Unchanged { hash },
            Ok(Err(Refusal { reason, kept })) => {
                tracing::warn!(%peer, %cluster, %reason, "refused a pushed cluster file; keeping the old one");
                PushAck::Refused { reason, hash: kept }
            }
            Err(e) => PushAck::Refused {
                reason: format!("internal error: {e}"),
                hash: None,
            },
        }
    };
    if let PushAck::Applied { hash } = &ack {
        // Load it now, so that a file the server itself would not take shows up in the log
        // at once rather than at the next request.
        let _ = ctx.state.current();
        tracing::info!(%peer, %cluster, hash = short_hash(hash), "applied a cluster file from the manager");
    }
    finish(w, &ack).await
}

/// `config-hash`: accept, read the query, answer with this machine's hash (and, on the
/// manager with `fetch`, the file).
pub async fn serve_hash<R, W>(ctx: &Context, r: &mut R, w: &mut W) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let cluster = &ctx.state.dir.alias;
    let peer = ctx.peer;
    if reply(w, &Response::Accept).await.is_err() {
        return false;
    }
    let query = match tokio::time::timeout(
        BODY_TIMEOUT,
        crate::protocol::config::read_config_frame_max::<_, HashQuery>(
            r,
            crate::protocol::config::MAX_QUERY_FRAME,
        ),
    )
    .await
    {
        Ok(Ok(q)) => q,
        Ok(Err(e)) => {
            tracing::info!(%peer, %cluster, error = %e, "bad config-hash query");
            return false;
        }
        Err(_) => return false,
    };
    let is_manager = ctx.state.me == ctx.state.current().manager;
    let answer = if is_manager {
        let sync = ctx.state.sync.get();
        let source = match sync.and_then(|s| s.current()) {
            Some(s) => Some(s),
            None => ctx
                .state
                .dir
                .read_text()
                .ok()
                .and_then(|t| Source::from_manager_text(&t).ok()),
        };
        if let Some(s) = sync
            && peer != ctx.state.me
        {
            s.member_seen(&peer, query.have.as_deref());
        }
        // A member that already has the current file gets only the hash: that keeps the
        // devices' scheduled checks (`sync::follow`) one small frame each.
        let current = source.as_ref().map(|s| s.hash.as_str()) == query.have.as_deref();
        let fetch = query.fetch && peer != ctx.state.me && !current;
        if fetch {
            tracing::info!(%peer, %cluster, "member fetched the cluster file");
        }
        HashReply {
            hash: source.as_ref().map(|s| s.hash.clone()),
            manager: true,
            text: source.filter(|_| fetch).map(|s| s.text.as_ref().clone()),
        }
    } else {
        HashReply {
            hash: member::current_hash(&ctx.state.dir),
            manager: false,
            text: None,
        }
    };
    finish(w, &answer).await
}

/// Write the answer and end our direction (FIN): through a key holder's pooled connection
/// nothing else ends the stream (the connection stays open), so without it the holder
/// would wait for our end and the request would count as active for ever.
async fn finish<W: AsyncWrite + Unpin, T: serde::Serialize>(w: &mut W, answer: &T) -> bool {
    if write_config_frame(w, answer).await.is_err() {
        return false;
    }
    w.shutdown().await.is_ok()
}
