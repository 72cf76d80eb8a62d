//! Load (issue 7): many concurrent scp/rsync transfers through one server, each verified by
//! checksum; many concurrent native `exec true` from many peers. Bounded: every transfer
//! and request has a deadline; counts are the unless the comments say otherwise.
//!
//! Numbers are printed (`--nocapture`) for docs/benchmarks.md; nothing here asserts speed.

use std::fs;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Transfers at once through one server: the 100.
const TRANSFERS: usize = 100;
/// Bytes per transfer (small: the point is concurrency, not throughput, on 2 cores).
const TRANSFER_BYTES: usize = 256 << 10;
/// A hang guard per transfer, not a speed goal. The 100 run at once, so the last ends when
/// the whole batch does: measured 106–116 s on this 2-core machine under `stress-ng --cpu 4`
/// with the debug build, the same with the resumable layer off (109 s) — about 2 CPU
/// seconds per transfer (ssh, the proxy's own endpoint, the server, russh), all of it
/// waiting for a core. The default 120 s left no room; a stalled transfer (what this
/// catches) still fails.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(360);

/// 100 concurrent transfers (half `scp`, half `rsync`, both through `malai ssh proxy`) to one
/// server, every file checked by sha256 on arrival. The server's SSH endpoint is the embedded
/// russh server: Debian's sshd drops pre-auth connections beyond `MaxStartups 10:30:100`,
/// which would measure sshd's admission policy rather than malai.
#[test]
fn hundred_concurrent_scp_and_rsync_transfers_all_arrive_intact() {
    let _heavy = heavy_lock();
    let c = TestCluster::builder("acme")
        .server_with("foo", SshTarget::Embedded)
        .device("alice")
        .allow("foo", &["alice"])
        .build();
    let src = c.scratch("src");
    let dst = c.scratch("dst");
    let mut want = vec![];
    for i in 0..TRANSFERS {
        let p = src.join(format!("f{i}"));
        write_random_file(&p, TRANSFER_BYTES, 1000 + i as u64);
        want.push(sha256_file(&p));
    }
    // Prime known_hosts once, so 100 clients don't race to append the same host key.
    assert_success(&c.ssh("alice", &c.host("foo"), "true"), "first ssh");

    let c = Arc::new(c);
    let started = Instant::now();
    let handles: Vec<_> = (0..TRANSFERS)
        .map(|i| {
            let c = c.clone();
            let (src, dst) = (src.join(format!("f{i}")), dst.join(format!("f{i}")));
            thread::spawn(move || {
                let to = format!("{}:{}", c.host("foo"), dst.display());
                let args = [src.display().to_string(), to];
                let out = if i % 2 == 0 {
                    c.scp_within("alice", &args, TRANSFER_TIMEOUT)
                } else {
                    c.rsync_within("alice", &args, TRANSFER_TIMEOUT)
                };
                (i, out)
            })
        })
        .collect();
    let mut failed = vec![];
    for h in handles {
        // Join every thread before judging: one that panicked (its transfer timed out)
        // must not leave the others holding the cluster, and its servers, alive.
        let Ok((i, out)) = h.join() else {
            failed.push("a transfer timed out (its thread panicked)".to_string());
            continue;
        };
        if !out.status.success() {
            failed.push(format!("#{i}: {}", fmt_output(&out)));
        }
    }
    let took = started.elapsed();
    assert!(
        failed.is_empty(),
        "{} of {TRANSFERS} transfers failed:\n{}",
        failed.len(),
        failed.join("\n")
    );
    let corrupted: Vec<usize> = (0..TRANSFERS)
        .filter(|i| sha256_file(&dst.join(format!("f{i}"))) != want[*i])
        .collect();
    assert!(corrupted.is_empty(), "corrupted: {corrupted:?}");
    eprintln!(
        "load: {TRANSFERS} concurrent scp/rsync of {} KiB through one server: 0 failed, \
         0 corrupted, {took:?}",
        TRANSFER_BYTES >> 10
    );
}

/// Peers and requests per peer for the exec load: 50 × 20 = the 1,000, all in flight
/// at once (20 < the 64-stream cap of a connection).
const PEERS: usize = 50;
const PER_PEER: usize = 20;

/// 1,000 concurrent `exec true` from 50 peers, each peer one iroh endpoint with its own
/// member key (what 50 agents would do: one pooled connection each, requests as streams),
/// driven through the library in this process so that 1,000 CLI processes don't measure
/// process start-up on 2 cores instead of the server. Every one must exit 0. Plus 50
/// concurrent `malai ssh foo true` CLI processes, one per peer.
#[test]
fn thousand_concurrent_exec_true_from_fifty_peers() {
    let _heavy = heavy_lock();
    use malai::protocol::Request;
    use malai::protocol::exec::{self as frames, ExecRequest, ExitStatus, Frame};
    use malai::transport::iroh::{NetConfig, Node};

    let names: Vec<String> = (0..PEERS).map(|i| format!("p{i}")).collect();
    let mut b = TestCluster::builder("acme").server_with("foo", SshTarget::Unset);
    for n in &names {
        b = b.device(n);
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let c = b.allow("foo", &refs).build();
    let server: malai::id52::Id52 = c.id52("foo").parse().unwrap();
    let cluster: malai::id52::Id52 = c.id52("mgr").parse().unwrap();
    let bind = c.server_bind("foo");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    let results: Vec<Result<i32, String>> = rt.block_on(async {
        let mut peers = vec![];
        for n in &names {
            let dir = c
                .machine(n)
                .cluster_file("acme")
                .parent()
                .unwrap()
                .to_path_buf();
            let key = malai::keys::load(&dir).expect("key");
            let node = Node::bind(
                &key,
                &NetConfig::disabled(Some(([127, 0, 0, 1], 0).into())),
                None,
                false,
            )
            .await
            .expect("bind");
            let conn = node.connect(&server, &[bind]).await.expect("connect");
            peers.push((node, conn));
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (_, conn) in &peers {
            for _ in 0..PER_PEER {
                let conn = conn.clone();
                tasks.spawn(async move {
                    let one = async {
                        let req = Request::Exec(ExecRequest {
                            command: Some("true".into()),
                            env: vec![],
                            pty: None,
                            user: None,
                            resume: false,
                        });
                        let (mut s, mut r) = malai::session::request_on(&conn, cluster, req)
                            .await
                            .map_err(|e| format!("open: {e}"))?;
                        // As the real client (protocol::exec_pump::run): a failed stdin
                        // direction is not the end. `true` may exit, and the server stop
                        // reading stdin (STOP_SENDING), before this write goes out; the exit
                        // status still follows on the other direction. (Seen 3 of 1,000
                        // times at load 15: "sending stopped by peer: error 0".)
                        let _ = frames::write(&mut s, &Frame::StdinEof).await;
                        loop {
                            match frames::read(&mut r).await {
                                Ok(Some(Frame::Exit(ExitStatus::Code(c)))) => return Ok(c),
                                Ok(Some(Frame::Exit(s))) => return Err(format!("{s:?}")),
                                Ok(Some(_)) => {}
                                Ok(None) => return Err("no exit status".into()),
                                Err(e) => return Err(format!("read: {e}")),
                            }
                        }
                    };
                    tokio::time::timeout(Duration::from_secs(120), one)
                        .await
                        .unwrap_or_else(|_| Err("timed out".into()))
                });
            }
        }
        let mut out = vec![];
        while let Some(r) = tasks.join_next().await {
            out.push(r.unwrap_or_else(|e| Err(format!("join: {e}"))));
        }
        for (node, _) in &peers {
            node.close().await;
        }
        out
    });
    let took = started.elapsed();
    let bad: Vec<_> = results.iter().filter(|r| **r != Ok(0)).collect();
    assert_eq!(results.len(), PEERS * PER_PEER);
    assert!(
        bad.is_empty(),
        "{} of {} failed, e.g. {:?}",
        bad.len(),
        results.len(),
        &bad[..bad.len().min(5)]
    );
    eprintln!(
        "load: {} concurrent exec true from {PEERS} peers (library clients): all exit 0, {took:?}",
        results.len()
    );

    // The CLI as well: one process per peer, all at once.
    let c = Arc::new(c);
    let started = Instant::now();
    let handles: Vec<_> = names
        .iter()
        .map(|n| {
            let (c, n) = (c.clone(), n.clone());
            thread::spawn(move || c.machine(&n).run(["ssh", &c.host("foo"), "true"]))
        })
        .collect();
    let outs: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let bad: Vec<String> = outs
        .iter()
        .filter(|o| !o.status.success())
        .map(fmt_output)
        .collect();
    assert!(
        bad.is_empty(),
        "{} CLI execs failed:\n{}",
        bad.len(),
        bad.join("\n")
    );
    eprintln!(
        "load: {PEERS} concurrent `malai ssh foo true` processes: all exit 0, {:?}",
        started.elapsed()
    );
    let _ = fs::metadata(c.dir());
}
