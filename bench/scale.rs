//! Scale benchmark (issue 7): one `malai ssh server` with N connected idle peers.
//!
//! The server is the real binary (own process and MALAI_HOME, so /proc gives its RSS and
//! CPU). The peers are iroh endpoints in this process (`malai::transport::iroh::Node`), each
//! with its own fresh key (named as a device in the cluster file: the server cuts strangers),
//! each holding one connection to the server with nothing to say —
//! the transport's 1 s keep-alives keep it open. Connections are added in steps (N is
//! cumulative), 256 handshakes in flight at a time. Loopback, relays off.
//!
//! Measured per N: time to connect the step's new peers, server RSS minus its RSS with no
//! peers, divided by N (RSS per connection), server CPU while idle (% of one core over 10 s),
//! and this process's CPU in the same window (the peers' keep-alives).
//!
//! Run: `cargo bench --bench scale -- 1000 2000` (needs `ulimit -n` ≥ N + 100: it is raised to
//! the hard limit here). The server holds at most 2,048 connections of one cluster
//! (`server::guard::MAX_CONNECTIONS_PER_CLUSTER`): a larger N stops there.
//!
//! `MALAI_SCALE_WRAP` runs the server under a command (split on whitespace, the server's
//! command line appended). `env MALLOC_ARENA_MAX=1` or `env LD_PRELOAD=…` keep the pid (env
//! execs), so the RSS columns stay the server's. Under `heaptrack -o /tmp/h` the pid is
//! heaptrack's script and RSS means nothing; to see what N idle connections hold, `kill -9`
//! the `malai ssh server` child while the table's idle sample runs (after its header plus the
//! connect time and 5 s), then `heaptrack_print -f /tmp/h.zst --print-leaks 1`: "leaked" is
//! then what was live at that moment. Build with `CARGO_PROFILE_RELEASE_DEBUG=line-tables-only
//! CARGO_PROFILE_RELEASE_STRIP=false` for symbols.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use malai::id52::Id52;
use malai::transport::iroh::{NetConfig, Node, PeerConnection};

const MALAI: &str = env!("CARGO_BIN_EXE_malai");
const USER_HZ: f64 = 100.0;
const IDLE_SAMPLE: Duration = Duration::from_secs(10);
const IN_FLIGHT: usize = 256;

fn malai(home: &Path, args: &[&str]) -> String {
    let out = Command::new(MALAI)
        .args(args)
        .env("MALAI_HOME", home)
        .env("MALAI_RELAY", "disabled")
        .env("MALAI_BIND", "127.0.0.1:0")
        .env("MALAI_USE_KEYRING", "false")
        .env_remove("RUST_LOG")
        .output()
        .expect("run malai");
    assert!(out.status.success(), "malai {args:?}: {:?}", out);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Reads a /proc file through a handle opened up front: with 10,000 endpoints this process
/// has no file descriptors left to open one later.
fn reread(f: &mut std::fs::File) -> String {
    use std::io::{Read, Seek};
    let mut s = String::new();
    let _ = f.seek(std::io::SeekFrom::Start(0));
    let _ = f.read_to_string(&mut s);
    s
}

fn proc_rss_kib(f: &mut std::fs::File) -> u64 {
    let s = reread(f);
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn proc_cpu_ticks(f: &mut std::fs::File) -> u64 {
    let s = reread(f);
    let rest = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields after the name: state is [0]; utime [11], stime [12].
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn main() {
    raise_nofile();
    let mut ns: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    if ns.is_empty() {
        ns = vec![1000, 5000, 10000];
    }
    ns.sort();
    let root = tempfile::tempdir().expect("tempdir");
    let (mgr, foo) = (root.path().join("mgr"), root.path().join("foo"));
    let mgr_id = malai(&mgr, &["ssh", "cluster", "init", "acme"]);
    let foo_id = malai(&foo, &["ssh", "cluster", "join", "acme", &mgr_id]);
    malai(&mgr, &["ssh", "cluster", "add", "server", "foo", &foo_id]);
    let file = mgr.join("ssh/clusters/acme/cluster-manager.toml");
    // The peers are members (devices in the file): the server cuts a stranger right after
    // its handshake (issue 12), which would leave nothing idle to measure.
    let keys: Vec<_> = (0..*ns.last().unwrap_or(&0))
        .map(|_| malai::keys::generate())
        .collect();
    let mut toml = std::fs::read_to_string(&file).expect("read the cluster file");
    for (i, k) in keys.iter().enumerate() {
        toml.push_str(&format!(
            "\n[device.peer{i}]\nid52 = \"{}\"\n",
            malai::keys::public_id(k)
        ));
    }
    std::fs::write(&file, toml).expect("write the cluster file");
    malai(
        &foo,
        &["ssh", "cluster", "import", "acme", file.to_str().unwrap()],
    );
    let port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let bind: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // MALAI_SCALE_WRAP: run the server under a profiler or with another allocator (see top).
    let wrap: Vec<String> = std::env::var("MALAI_SCALE_WRAP")
        .map(|w| w.split_whitespace().map(String::from).collect())
        .unwrap_or_default();
    let mut server = match wrap.split_first() {
        Some((prog, args)) => {
            let mut c = Command::new(prog);
            c.args(args).arg(MALAI);
            c
        }
        None => Command::new(MALAI),
    };
    let mut server = server
        .args(["ssh", "server", "--bind", &bind.to_string()])
        .env("MALAI_HOME", &foo)
        .env("MALAI_RELAY", "disabled")
        .env("MALAI_BIND", "127.0.0.1:0")
        .env("MALAI_USE_KEYRING", "false")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start server");
    let pid = server.id();
    let mut err = BufReader::new(server.stderr.take().unwrap());
    let mut line = String::new();
    while err.read_line(&mut line).unwrap_or(0) > 0 && !line.contains("server ready") {}
    assert!(
        line.contains("server ready"),
        "server did not start: {line}"
    );
    std::thread::spawn(move || {
        // The server's stderr after `ready` (a crash would be reported here).
        let mut l = String::new();
        while err.read_line(&mut l).unwrap_or(0) > 0 {
            eprint!("server: {l}");
            l.clear();
        }
    });
    std::thread::sleep(Duration::from_secs(2));
    let open = |p: String| std::fs::File::open(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
    let mut status = open(format!("/proc/{pid}/status"));
    let mut stat = open(format!("/proc/{pid}/stat"));
    let mut my_stat = open("/proc/self/stat".to_string());
    let base_rss = proc_rss_kib(&mut status);
    let server_id: Id52 = foo_id.parse().unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("server RSS with no peers: {base_rss} KiB");
    println!(
        "| peers | connect this step | server RSS | RSS per connection | server idle CPU | peers' process CPU |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut peers: Vec<(Node, PeerConnection)> = vec![];
    for n in ns {
        let add = n.saturating_sub(peers.len());
        let started = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let new: Vec<(Node, PeerConnection)> = rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..add {
                let sem = sem.clone();
                let key = keys[peers.len() + i].clone();
                set.spawn(async move {
                    let _p = sem.acquire_owned().await.unwrap();
                    let node = Node::bind(
                        &key,
                        &NetConfig::disabled(Some(([127, 0, 0, 1], 0).into())),
                        None,
                        false,
                    )
                    .await?;
                    match node.connect(&server_id, &[bind]).await {
                        Ok(c) => Ok((node, c)),
                        Err(e) => {
                            node.close().await;
                            Err(e)
                        }
                    }
                });
            }
            let mut ok = vec![];
            let mut failed = 0;
            while let Some(r) = set.join_next().await {
                match r {
                    Ok(Ok(p)) => ok.push(p),
                    _ => failed += 1,
                }
            }
            if failed > 0 {
                eprintln!("{failed} of {add} connections failed");
            }
            ok
        });
        let took = started.elapsed();
        peers.extend(new);
        std::thread::sleep(Duration::from_secs(5));
        if let Ok(Some(st)) = server.try_wait() {
            panic!(
                "the server exited with {peers_len} peers: {st}",
                peers_len = peers.len()
            );
        }
        let alive = peers.iter().filter(|(_, c)| !c.is_closed()).count();
        let rss = proc_rss_kib(&mut status);
        let (s0, c0) = (proc_cpu_ticks(&mut stat), proc_cpu_ticks(&mut my_stat));
        std::thread::sleep(IDLE_SAMPLE);
        let (s1, c1) = (proc_cpu_ticks(&mut stat), proc_cpu_ticks(&mut my_stat));
        let pct = |a: u64, b: u64| (b - a) as f64 / USER_HZ / IDLE_SAMPLE.as_secs_f64() * 100.0;
        println!(
            "| {alive} | {:.1} s ({add} new) | {:.0} MiB | {:.0} KiB | {:.0} % | {:.0} % |",
            took.as_secs_f64(),
            rss as f64 / 1024.0,
            (rss.saturating_sub(base_rss)) as f64 / alive.max(1) as f64,
            pct(s0, s1),
            pct(c0, c1),
        );
    }
    rt.block_on(async {
        for (n, _) in &peers {
            n.close().await;
        }
    });
    let _ = server.kill();
    let _ = server.wait();
}
