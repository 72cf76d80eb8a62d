//! Rejoining the home relay at once when this machine's own network comes back (issue 18).
//!
//! An endpoint's relay connection is one TCP connection. When this machine's network is cut
//! (a tunnel, a Wi-Fi that drops, a router that reboots) that connection is not closed: its
//! unacknowledged bytes wait in the kernel, which retransmits them with exponential backoff
//! (0.2 s, 0.4 s, … doubling up to two minutes). When the network comes back nothing flows
//! through the relay until the next retransmission, and iroh's own check (a ping every 15 s
//! when idle, then reconnecting with up to 16 s of backoff) is no faster. Measured on the
//! namespace network, a 12 s cut: bytes flowed again 2.2 s after the network was back, and
//! the wait grows with the outage. For a peer that only the relay reaches (no hole punched)
//! that is the whole session standing still.
//!
//! So [`watch`] looks at the relay path whenever something suggests it is down: a
//! connection of the endpoint timed out, a dial failed, or the endpoint went on sending
//! through the relay for [`SILENCE`] without receiving anything through it (a live peer
//! answers every keep-alive, once a second; this catches an outage shorter than the idle
//! limit, which ends no connection). It probes the home relay (a TCP connect to its port)
//! every [`PROBE_EVERY`]. If the first probe answers, the network is fine (the peer is
//! the one that went away) and nothing happens. If a probe fails, the probing goes on until
//! one answers; then the relay connection is replaced by a fresh one at once, instead of
//! waiting for the kernel's backoff. The relay delivers to an endpoint's newest connection,
//! so the fresh one takes over at once and the old one is left to iroh's cleanup.
//!
//! iroh 1.4 has no call that reconnects a relay; a relay removed from the endpoint's map and
//! put back under the same URL keeps its old connection. The fresh connection is made by
//! putting the relay back under an *alias*: the same URL with a `malai-rejoin=N` query
//! (the relay serves by path and ignores the query). [`canonical`] maps an alias back to
//! the cluster file's URL wherever relays are shown or compared.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use iroh::{Endpoint, RelayUrl, Watcher as _};
use tokio::sync::Notify;

/// How often the relay is probed while this machine's network looks down. Four probes a
/// second of a SYN each: the network coming back is seen within about a quarter second.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How long one probe may take. Longer than [`PROBE_EVERY`], so probes overlap: a probe
/// whose SYN was lost would only be retried by the kernel after a second.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Sending through the relay this long with nothing received through it makes [`watch`]
/// look (keep-alives go both ways every second while a connection lives).
pub const SILENCE: Duration = Duration::from_secs(3);
/// How often the relay byte counters are read.
const TICK: Duration = Duration::from_secs(1);
/// The query key of an alias URL.
const ALIAS_KEY: &str = "malai-rejoin";

/// What an endpoint shares with its [`watch`] task.
#[derive(Debug, Default)]
pub struct Rejoin {
    suspect: Notify,
    generation: AtomicU64,
    /// The alias each relay is in the endpoint's map under now, if not its own URL.
    aliases: Mutex<Vec<RelayUrl>>,
    /// Set once the endpoint leaves its relays for good: nothing is put back after that.
    left: std::sync::atomic::AtomicBool,
    /// The generation of the newest rejoin, for connections that should move off the old
    /// relay connection ([`Rejoin::renewals`]).
    renewed: tokio::sync::watch::Sender<u64>,
}

impl Rejoin {
    /// A connection of this endpoint timed out, or a dial did: look at the relay path.
    pub fn suspect(&self) {
        self.suspect.notify_one();
    }

    /// The URL `relay` (the cluster file's) is in the endpoint's map under now. A dial must
    /// name it: iroh sends through the relay connection of the URL a peer's address names,
    /// and the old connection under the file's URL is the one still waiting out its backoff.
    pub fn current(&self, relay: &RelayUrl) -> RelayUrl {
        lock(&self.aliases)
            .iter()
            .find(|a| canonical(a) == *relay)
            .cloned()
            .unwrap_or_else(|| relay.clone())
    }

    /// Told each time a relay connection is renewed from now on. A connection that lived
    /// through the outage goes on sending through the old relay connection (iroh keeps the
    /// relay actor of the URL its path names), which waits out the kernel's backoff: a
    /// session that can move to a fresh connection should, at once.
    pub fn renewals(&self) -> tokio::sync::watch::Receiver<u64> {
        self.renewed.subscribe()
    }

    /// Stop rejoining for good (`Node::leave_relays`); the aliases in use, to remove.
    pub fn leave(&self) -> Vec<RelayUrl> {
        self.left.store(true, Ordering::SeqCst);
        lock(&self.aliases).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The cluster file's URL of `url` (itself unless it is an alias made here).
pub fn canonical(url: &RelayUrl) -> RelayUrl {
    let is_alias = url.query_pairs().any(|(k, _)| k.as_ref() == ALIAS_KEY);
    if !is_alias {
        return url.clone();
    }
    let mut u = (**url).clone();
    u.set_query(None);
    RelayUrl::from(u)
}

/// Watches for suspected outages until the endpoint closes (see the module docs).
pub async fn watch(endpoint: Endpoint, shared: std::sync::Arc<Rejoin>) {
    let closed = endpoint.closed();
    tokio::pin!(closed);
    let mut silence = Silence::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut closed => return,
            _ = shared.suspect.notified() => {}
            _ = tick.tick() => {
                let m = &endpoint.metrics().socket;
                if !silence.observe(m.send_relay.get(), m.recv_data_relay.get(), tokio::time::Instant::now()) {
                    continue;
                }
                tracing::debug!("sending through the relay without an answer for {SILENCE:?}: probing it");
            }
        }
        let outage = tokio::select! {
            _ = &mut closed => return,
            o = back_after_outage(&endpoint) => o,
        };
        if let Some((home, down_for)) = outage {
            rejoin(&endpoint, &home, &shared, down_for).await;
        }
    }
}

/// Whether the endpoint has been sending through the relay with nothing coming back.
#[derive(Debug, Default)]
struct Silence {
    sent: u64,
    received: u64,
    /// Since when bytes went out and none came in; `None` while answers come.
    since: Option<tokio::time::Instant>,
    /// This silence was already reported (once per silence).
    reported: bool,
}

impl Silence {
    /// Take the counters at `now`; `true` once per silence that has lasted [`SILENCE`].
    fn observe(&mut self, sent: u64, received: u64, now: tokio::time::Instant) -> bool {
        let sending = sent != self.sent;
        let answered = received != self.received;
        self.sent = sent;
        self.received = received;
        if answered {
            self.since = None;
            self.reported = false;
            return false;
        }
        if !sending && self.since.is_none() {
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if !self.reported && now.duration_since(since) >= SILENCE {
            self.reported = true;
            return true;
        }
        false
    }
}

fn home(endpoint: &Endpoint) -> Option<RelayUrl> {
    endpoint
        .home_relay_status()
        .get()
        .first()
        .map(|s| s.url().clone())
}

/// Probe the home relay until it answers (the home read again for every probe: relay
/// failover may move it meanwhile). `None` if the first answer came before any probe
/// failed (the network was fine), or there is no home; else the relay that answered and
/// how long it had not.
async fn back_after_outage(endpoint: &Endpoint) -> Option<(RelayUrl, Duration)> {
    let mut probes = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first_failure: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let relay = home(endpoint)?;
                probes.spawn(async move { answers(&relay).await.then_some(relay) });
            }
            Some(r) = probes.join_next() => match r {
                Ok(Some(relay)) => return first_failure.map(|t| (relay, t.elapsed())),
                _ => {
                    first_failure.get_or_insert_with(tokio::time::Instant::now);
                }
            },
        }
    }
}

/// Put `home` back into the endpoint's map under a new alias, which makes iroh connect to
/// it afresh (the module docs say why an alias).
async fn rejoin(endpoint: &Endpoint, home: &RelayUrl, shared: &Rejoin, down_for: Duration) {
    let canon = canonical(home);
    let n = shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
    let mut alias = (*canon).clone();
    alias.set_query(Some(&format!("{ALIAS_KEY}={n}")));
    let alias = RelayUrl::from(alias);
    if shared.left.load(Ordering::SeqCst) {
        return;
    }
    let Some(cfg) = endpoint.remove_relay(home).await else {
        return;
    };
    let mut fresh = (*cfg).clone();
    fresh.url = alias.clone();
    endpoint
        .insert_relay(alias.clone(), std::sync::Arc::new(fresh))
        .await;
    {
        let mut a = lock(&shared.aliases);
        a.retain(|u| canonical(u) != canon);
        a.push(alias);
    }
    shared.renewed.send_replace(n);
    tracing::info!(
        relay = %canon,
        ?down_for,
        "the network is back after the relay did not answer: reconnecting to it now"
    );
}

/// Whether something accepts TCP connections at the relay's host and port.
pub(super) async fn answers_within(url: &RelayUrl, limit: Duration) -> bool {
    let Some(host) = url.host_str() else {
        return false;
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url
        .port_or_known_default()
        .unwrap_or(if url.scheme() == "http" { 80 } else { 443 });
    matches!(
        tokio::time::timeout(limit, tokio::net::TcpStream::connect((host, port))).await,
        Ok(Ok(_))
    )
}

async fn answers(url: &RelayUrl) -> bool {
    answers_within(url, PROBE_TIMEOUT).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_sending_without_an_answer_and_is_reported_once() {
        let t0 = tokio::time::Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut s = Silence::default();
        // Idle (nothing sent, nothing received): never silence.
        for i in 0..10 {
            assert!(!s.observe(0, 0, at(i)));
        }
        // Sending and answered: not silence.
        assert!(!s.observe(100, 50, at(10)));
        assert!(!s.observe(200, 90, at(11)));
        // Sending, nothing back: silence from 12 s, reported once at 15 s.
        assert!(!s.observe(300, 90, at(12)));
        assert!(!s.observe(400, 90, at(14)));
        assert!(s.observe(500, 90, at(15)));
        assert!(!s.observe(600, 90, at(16)));
        assert!(!s.observe(600, 90, at(30)));
        // An answer ends it; the next silence is reported again.
        assert!(!s.observe(700, 95, at(31)));
        assert!(!s.observe(800, 95, at(32)));
        assert!(s.observe(900, 95, at(35)));
    }

    #[test]
    fn an_alias_maps_back_to_the_file_url() {
        let u: RelayUrl = "https://relay.example:3340/".parse().unwrap();
        let mut a = (*u).clone();
        a.set_query(Some("malai-rejoin=3"));
        let a = RelayUrl::from(a);
        assert_ne!(a, u);
        assert_eq!(canonical(&a), u);
        assert_eq!(canonical(&u), u);
    }
}
