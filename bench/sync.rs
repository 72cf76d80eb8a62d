//! Config sync benchmark: how long a cluster file takes to reach N members, and what the
//! manager costs while idle with N members.
//!
//! The manager is the real `malai ssh server` binary (its own process and MALAI_HOME, so its
//! CPU and memory can be read from /proc). The N members run in this process, each a real
//! `malai::server::run` with its own MALAI_HOME, key and iroh endpoint on 127.0.0.1 — the
//! same code as a member's `malai ssh server`, without N processes' worth of memory. They
//! start with no cluster file (joined only), as freshly joined servers do. Relays are off;
//! everything is loopback.
//!
//! Measured per N:
//! - first sync: manager start → every member has the manager's file;
//! - change: an edit of the manager's file → every member has the new file;
//! - manager idle CPU (% of one core, over 10 s) and RSS once in sync.
//!
//! Run: `bench/sync.sh [N …]` or `cargo bench --bench sync -- 10 100 500 1000`.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use malai::config::paths::Dirs;
use malai::config::store::ClusterDir;
use malai::id52::Id52;
use malai::server::{ServeOptions, run};
use sha2::Digest;
use tokio_util::sync::CancellationToken;

const MALAI: &str = env!("CARGO_BIN_EXE_malai");
const CLUSTER: &str = "bench";
/// Give up on a run after this long.
const DEADLINE: Duration = Duration::from_secs(300);
/// Clock ticks per second of /proc CPU times (USER_HZ, 100 on Linux).
const USER_HZ: f64 = 100.0;
/// How long the manager's idle CPU is sampled.
const IDLE_SAMPLE: Duration = Duration::from_secs(10);

fn main() {
    // SAFETY: set before any thread exists. Loopback only: no relay, endpoints on 127.0.0.1.
    unsafe {
        std::env::set_var("MALAI_RELAY", "disabled");
        std::env::set_var("MALAI_BIND", "127.0.0.1:0");
    }
    let ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let ns = if ns.is_empty() {
        vec![10, 100, 500, 1000]
    } else {
        ns
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "| members | first sync | change reaches all | manager CPU for the change | members' CPU for the change (all N) | manager idle CPU | manager RSS |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for n in ns {
        let r = rt.block_on(bench(n));
        println!(
            "| {n} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.2} % | {:.0} MiB |",
            r.first.as_secs_f64(),
            r.change.as_secs_f64(),
            r.change_cpu_manager,
            r.change_cpu_members,
            r.idle_cpu_percent,
            r.rss_kib as f64 / 1024.0
        );
    }
}

struct Result {
    first: Duration,
    change: Duration,
    /// CPU seconds the manager process spent while the change spread.
    change_cpu_manager: f64,
    /// CPU seconds the members (this process's runtime workers) spent meanwhile.
    change_cpu_members: f64,
    idle_cpu_percent: f64,
    rss_kib: u64,
}

fn malai(home: &Path) -> Command {
    let mut c = Command::new(MALAI);
    c.env("MALAI_HOME", home)
        .env("MALAI_RELAY", "disabled")
        .env("MALAI_BIND", "127.0.0.1:0")
        .env("MALAI_USE_KEYRING", "false")
        .env_remove("RUST_LOG")
        .env_remove("MALAI_SSH_AGENT");
    c
}

fn free_udp() -> SocketAddr {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
}

async fn bench(n: usize) -> Result {
    let root = tempfile::Builder::new()
        .prefix("malai-bench-sync-")
        .tempdir()
        .expect("tempdir");
    let mgr_home = root.path().join("mgr");
    let out = malai(&mgr_home)
        .args(["ssh", "cluster", "init", CLUSTER])
        .output()
        .expect("cluster init");
    assert!(out.status.success(), "cluster init: {out:?}");
    let mgr_id: Id52 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("manager id52");

    // Members: joined (key + manager id), no file, each serving on its own endpoint.
    let shutdown = CancellationToken::new();
    let mut members = Vec::with_capacity(n);
    let mut tasks = Vec::with_capacity(n);
    let mut entries = String::new();
    for i in 0..n {
        let dirs = Dirs::under(&root.path().join(format!("m{i}")));
        let cd = ClusterDir::new(&dirs, CLUSTER).expect("dir");
        cd.create().expect("create");
        let (id, _) = malai::keys::create(&cd.dir, false).expect("key");
        cd.set_manager_id(&mgr_id).expect("manager id");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let opts = ServeOptions {
            bind: None,
            managed_only: false,
        };
        tasks.push(tokio::spawn(run(dirs, opts, shutdown.clone(), move |s| {
            let _ = tx.send(s.first().and_then(|s| s.addrs.first().copied()));
        })));
        let addr = rx.await.ok().flatten().expect("member bound");
        entries.push_str(&format!(
            "\n[server.m{i}]\nid52 = \"{id}\"\naddrs = [\"{addr}\"]\n"
        ));
        members.push(cd.file_path());
    }

    let mgr_bind = free_udp();
    let file = mgr_home
        .join("ssh/clusters")
        .join(CLUSTER)
        .join("cluster-manager.toml");
    let text = std::fs::read_to_string(&file).expect("manager file");
    // (The header comment mentions [cluster-manager] too: match the table line itself.)
    let text = text.replacen(
        "\n[cluster-manager]\n",
        &format!("\n[cluster-manager]\naddrs = [\"{mgr_bind}\"]\n"),
        1,
    );
    write(&file, &format!("{text}{entries}"));
    let want = pushed_hash(&mgr_home);

    let started = Instant::now();
    let mut mgr = spawn_manager(&mgr_home, mgr_bind);
    wait_all(&members, &want, started).await;
    let first = started.elapsed();

    // A change: one more device, allowed on the first server.
    let text = std::fs::read_to_string(&file).expect("manager file");
    let dev = Id52::from_bytes([0xab; 32]);
    let text = format!("{text}\n[device.probe]\nid52 = \"{dev}\"\n").replacen(
        "[server.m0]\n",
        "[server.m0]\nallow-from = \"probe\"\n",
        1,
    );
    let want = {
        write(&file, &text);
        pushed_hash(&mgr_home)
    };
    let (mgr_before, members_before) = (cpu_ticks(mgr.id()), member_ticks());
    let changed = Instant::now();
    wait_all(&members, &want, changed).await;
    let change = changed.elapsed();
    let change_cpu_manager = (cpu_ticks(mgr.id()) - mgr_before) as f64 / USER_HZ;
    let change_cpu_members = (member_ticks() - members_before) as f64 / USER_HZ;

    // Idle: let acknowledgements settle, then sample the manager.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = mgr.id();
    let before = cpu_ticks(pid);
    tokio::time::sleep(IDLE_SAMPLE).await;
    let after = cpu_ticks(pid);
    let idle_cpu_percent = (after - before) as f64 / USER_HZ / IDLE_SAMPLE.as_secs_f64() * 100.0;
    let rss_kib = rss_kib(pid);

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = mgr.wait();
    shutdown.cancel();
    for t in tasks {
        let _ = t.await;
    }
    if std::env::var_os("MALAI_BENCH_KEEP").is_some() {
        eprintln!("kept {}", root.keep().display());
    }
    Result {
        first,
        change,
        change_cpu_manager,
        change_cpu_members,
        idle_cpu_percent,
        rss_kib,
    }
}

fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("bench-tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// Hash and length of the file as members get it (`cluster push --dry-run` prints those
/// bytes).
fn pushed_hash(mgr_home: &Path) -> (String, u64) {
    let out = malai(mgr_home)
        .args(["ssh", "cluster", "push", "--dry-run"])
        .output()
        .expect("push --dry-run");
    assert!(out.status.success(), "push --dry-run: {out:?}");
    (
        hex::encode(sha2::Sha256::digest(&out.stdout)),
        out.stdout.len() as u64,
    )
}

fn spawn_manager(home: &Path, bind: SocketAddr) -> Child {
    let mut child = malai(home)
        .args(["ssh", "server", "--bind", &bind.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the manager");
    let stderr = child.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        if line.map(|l| l.contains("server ready")).unwrap_or(true) {
            break;
        }
    }
    // Keep draining so the manager never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    child
}

/// Wait until every member file hashes to `want`. A file is read only once its size is
/// right: reading a thousand 100 KiB files every round would cost more than the sync.
async fn wait_all(members: &[PathBuf], (want, len): &(String, u64), since: Instant) {
    let mut pending: Vec<&PathBuf> = members.iter().collect();
    while !pending.is_empty() {
        pending.retain(|p| {
            if std::fs::metadata(p).map(|m| m.len()).ok() != Some(*len) {
                return true;
            }
            std::fs::read(p)
                .map(|b| hex::encode(sha2::Sha256::digest(&b)) != *want)
                .unwrap_or(true)
        });
        if since.elapsed() > DEADLINE {
            panic!("{} members not in sync after {DEADLINE:?}", pending.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    stat_ticks(&format!("/proc/{pid}/stat"))
}

/// CPU of this process's runtime workers (the members), without the main thread that
/// runs the measuring loop.
fn member_ticks() -> u64 {
    let pid = std::process::id();
    cpu_ticks(pid).saturating_sub(stat_ticks(&format!("/proc/{pid}/task/{pid}/stat")))
}

fn stat_ticks(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
