//! Relay failover (issue 21): a cluster that names several relays keeps working when its
//! home relay dies.
//!
//! iroh keeps one home relay per endpoint, chosen by latency and re-checked every 20–26 s;
//! when the home relay dies its relay actor keeps reconnecting to that same relay, and
//! peers (which reach an endpoint only through its home relay when hole punching fails) see
//! it unreachable until the next check moves it — and not even then if the dead relay's
//! latency probe is still cached. Measured on the namespace network: see docs/benchmarks.md
//! "Relay failover".
//!
//! So every endpoint with two or more relays runs [`watch`]: when its home relay has been
//! disconnected with an error for [`DOWN_AFTER`], the relay is set aside — removed from the
//! endpoint's relay map, which makes iroh run a new net report at once and pick another home
//! among the rest. A set-aside relay is probed (a TCP connect to its HTTPS port) every
//! [`RETRY_EVERY`] and put back once it answers. The last relay is never set aside: with
//! one left there is nowhere to move. Only the cluster's own relays are ever in the map; a
//! relay the file does not name is never used.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iroh::{Endpoint, RelayUrl, Watcher as _};

/// How long the home relay must be down (not connected since a connection error, through
/// any reconnect attempts) before it is set aside. Long enough that one failed reconnect (a relay restarting) does not move
/// every member, short enough that new connections find members within seconds.
pub const DOWN_AFTER: Duration = Duration::from_secs(2);
/// How often a set-aside relay is probed.
pub const RETRY_EVERY: Duration = Duration::from_secs(5);
/// How often the home relay's status is looked at (besides every change it reports).
const TICK: Duration = Duration::from_millis(500);
/// How long one probe of a set-aside relay may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// One relay of the cluster as this endpoint sees it (for `malai ssh status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayState {
    pub url: String,
    /// iroh's home relay now.
    pub home: bool,
    /// Connected (only the home relay keeps a standing connection).
    pub connected: bool,
    /// Set aside by [`watch`] after it went down, and when.
    pub set_aside: Option<std::time::SystemTime>,
    /// The home relay's last connection error, if it has one.
    pub error: Option<String>,
}

/// What [`watch`] shares with the endpoint's owner.
#[derive(Debug, Default)]
pub struct Shared {
    /// Relays taken out of the endpoint's map, with their config and when.
    set_aside: Mutex<Vec<(RelayUrl, Arc<iroh::RelayConfig>, std::time::SystemTime)>>,
    /// Set once the endpoint leaves its relays for good (`Node::leave_relays`): nothing is
    /// put back after that.
    left: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub fn leave(&self) {
        self.left.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn has_left(&self) -> bool {
        self.left.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Every relay of the cluster: iroh's view of the home relay plus what was set aside.
    pub fn states(&self, endpoint: &Endpoint, relays: &[RelayUrl]) -> Vec<RelayState> {
        let status = endpoint.home_relay_status().get();
        let aside = lock(&self.set_aside);
        relays
            .iter()
            .map(|u| {
                // The home relay may be in the map under an alias (`relay_rejoin`).
                let home = status
                    .iter()
                    .find(|s| super::relay_rejoin::canonical(s.url()) == *u);
                RelayState {
                    url: u.to_string(),
                    home: home.is_some(),
                    connected: home.is_some_and(|s| s.is_connected()),
                    set_aside: aside
                        .iter()
                        .find(|(a, _, _)| super::relay_rejoin::canonical(a) == *u)
                        .map(|(_, _, t)| *t),
                    error: home.and_then(|s| s.last_error().map(|e| e.to_string())),
                }
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Watches `endpoint`'s home relay until the endpoint closes (see the module docs).
pub async fn watch(endpoint: Endpoint, relays: Vec<RelayUrl>, shared: Arc<Shared>) {
    let closed = endpoint.closed();
    tokio::pin!(closed);
    let mut status_w = endpoint.home_relay_status();
    let mut down_since: Option<(RelayUrl, Instant)> = None;
    let mut last_probe = Instant::now();
    loop {
        tokio::select! {
            _ = &mut closed => return,
            _ = status_w.updated() => {}
            _ = tokio::time::sleep(TICK) => {}
        }
        if shared.has_left() {
            return;
        }
        let status = status_w.get();
        // The home relay, if it is not connected. A relay that dies alternates between
        // `Disconnected` (with the error) and `Connecting` (a retry, no error): the clock
        // starts at the first error and keeps running through retries until it connects.
        let down = status.iter().find(|s| !s.is_connected());
        down_since = match (down, down_since.take()) {
            (None, _) => None,
            (Some(s), Some((u, t))) if &u == s.url() => Some((u, t)),
            (Some(s), _) if s.last_error().is_some() => Some((s.url().clone(), Instant::now())),
            (Some(_), _) => None,
        };
        if let Some((url, since)) = &down_since
            && since.elapsed() >= DOWN_AFTER
        {
            let in_map = relays.len() - lock(&shared.set_aside).len();
            if in_map > 1 {
                let error = down
                    .and_then(|s| s.last_error().map(|e| e.to_string()))
                    .unwrap_or_default();
                if let Some(cfg) = endpoint.remove_relay(url).await {
                    tracing::warn!(
                        relay = %url,
                        %error,
                        "home relay down for {DOWN_AFTER:?}: set aside, moving to the cluster's other relays until it answers again"
                    );
                    lock(&shared.set_aside).push((url.clone(), cfg, std::time::SystemTime::now()));
                }
                down_since = None;
            }
        }
        if last_probe.elapsed() >= RETRY_EVERY {
            last_probe = Instant::now();
            let aside: Vec<RelayUrl> = lock(&shared.set_aside)
                .iter()
                .map(|(u, _, _)| u.clone())
                .collect();
            for url in aside {
                if !answers(&url).await || shared.has_left() {
                    continue;
                }
                let entry = {
                    let mut a = lock(&shared.set_aside);
                    let i = a.iter().position(|(u, _, _)| *u == url);
                    i.map(|i| a.remove(i))
                };
                if let Some((url, cfg, _)) = entry {
                    tracing::info!(relay = %url, "set-aside relay answers again: back in use");
                    endpoint.insert_relay(url, cfg).await;
                }
            }
        }
    }
}

/// Whether something accepts TCP connections at the relay's host and port.
async fn answers(url: &RelayUrl) -> bool {
    super::relay_rejoin::answers_within(url, PROBE_TIMEOUT).await
}
