//! Security review findings (issue 12) that need whole processes: concurrent `cluster
//! add` runs do not lose an edit. (Most findings are proven next to the feature they
//! touch: `shim` for stdinserver identities, `sync` for join by domain and pushed key
//! settings, `secrets` for logs and comments, `exec` for pinned arguments, `agent` for
//! planted sockets.)

use std::fs;
use std::process::Stdio;

use crate::harness::*;

#[test]
fn concurrent_cluster_adds_lose_no_edit() {
    let root = tempfile::Builder::new()
        .prefix("malai-e2e-lock-")
        .tempdir()
        .unwrap();
    let mgr = Machine::new(root.path(), "mgr");
    mgr.run_ok(["ssh", "cluster", "init", "acme"]);
    const N: u8 = 16;
    let mut children = vec![];
    for n in 0..N {
        let id = data_encoding::BASE32_DNSSEC.encode(&[n + 10; 32]);
        let name = format!("d{n}");
        let mut cmd = mgr.cmd(["ssh", "cluster", "add", "device", &name, &id]);
        cmd.stdout(Stdio::null()).stderr(Stdio::piped());
        children.push((name, cmd.spawn().expect("spawn malai")));
    }
    for (name, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cluster add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = fs::read_to_string(mgr.cluster_file("acme")).unwrap();
    let missing: Vec<String> = (0..N)
        .map(|n| format!("[device.d{n}]"))
        .filter(|t| !text.contains(t.as_str()))
        .collect();
    assert!(missing.is_empty(), "edits lost: {missing:?}\n{text}");
}
