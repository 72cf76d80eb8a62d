//! Secrets audit (issue 7): after a full scenario — `cluster init`/`join`, config sync push,
//! native exec, ssh through `malai ssh proxy`, the agent — no file any machine wrote (logs,
//! the audit log, server stderr/stdout, received cluster files, sync state, sockets' dirs)
//! contains any machine's secret key, in hex (either case), base32 (the id52 alphabet or
//! RFC 4648), base64 or raw bytes. Only the `secret-key` files themselves may.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::agent::Agent;
use crate::harness::*;

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            walk(&p, out);
        } else if meta.is_file() {
            out.push(p);
        }
    }
}

/// Every encoding of a 32-byte secret someone might log by mistake.
fn forms(key: &[u8; 32]) -> Vec<(String, Vec<u8>)> {
    use data_encoding::{
        BASE32, BASE32_DNSSEC, BASE32_NOPAD, BASE64, BASE64_NOPAD, BASE64URL_NOPAD,
    };
    let mut v = vec![
        ("raw".to_string(), key.to_vec()),
        ("hex".into(), hex::encode(key).into_bytes()),
        ("HEX".into(), hex::encode_upper(key).into_bytes()),
        (
            "base32-dnssec".into(),
            BASE32_DNSSEC.encode(key).into_bytes(),
        ),
        ("base32".into(), BASE32.encode(key).into_bytes()),
        ("base32-nopad".into(), BASE32_NOPAD.encode(key).into_bytes()),
        (
            "base32-lower".into(),
            BASE32_NOPAD.encode(key).to_lowercase().into_bytes(),
        ),
        ("base64".into(), BASE64.encode(key).into_bytes()),
        ("base64-nopad".into(), BASE64_NOPAD.encode(key).into_bytes()),
        ("base64url".into(), BASE64URL_NOPAD.encode(key).into_bytes()),
    ];
    // Rust's `{:?}` of the byte array, in case a key struct gets a derived Debug.
    v.push(("debug".into(), format!("{key:?}").into_bytes()));
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn no_secret_key_in_any_log_audit_log_or_pushed_file() {
    let mut c = TestCluster::builder("acme")
        .manager("mgr")
        .server("foo")
        .device("alice")
        .allow("foo", &["alice"])
        .build();
    // The manager serves too (its sync loop pushes to foo).
    let bind: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().unwrap();
    let hint = format!("[{}]", toml_str(&bind.to_string()));
    c.edit_manager_file(|t| set_table_keys(&t, "cluster-manager", &[("addrs", hint)]));
    // The manager's own secret, commented out in its file (an admin's leftover): the file
    // is the manager's, but no comment may reach a member.
    let mgr_key =
        fs::read_to_string(c.manager().home().join("ssh/clusters/acme/secret-key")).unwrap();
    c.edit_manager_file(|t| format!("{t}\n# private-key = \"{}\"\n", mgr_key.trim()));
    // An admin's 0600 stays 0600 through `cluster allow` (the tool rewrites the file).
    {
        use std::os::unix::fs::PermissionsExt;
        let f = c.manager_file();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o600)).unwrap();
        c.manager()
            .run_ok(["ssh", "cluster", "allow", "foo", "alice"]);
        let mode = fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "cluster allow changed the manager file's mode");
    }
    let _mgr = c.manager().spawn_server(bind);
    let host = c.host("foo");

    // A push (and the sync loop's), native exec, ssh/scp through the proxy, the agent.
    let out = c
        .manager()
        .run_ok(["ssh", "cluster", "push", "--to", "foo"]);
    assert!(out.starts_with("foo: "), "{out}");
    let out = c.machine("alice").run(["ssh", &host, "echo", "native"]);
    assert_success(&out, "native exec");
    assert_success(
        &c.ssh("alice", &host, "echo proxied"),
        "ssh through the proxy",
    );
    let f = c.scratch("x").join("f");
    write_random_file(&f, 64 << 10, 3);
    let out = c.scp(
        "alice",
        &[
            f.display().to_string(),
            format!("{host}:{}", c.dir().join("f2").display()),
        ],
    );
    assert_success(&out, "scp");
    {
        let agent = Agent::start(c.machine("alice"), &[]);
        let out = run_cmd(&mut agent.cmd(["ssh", &host, "echo", "agent"]));
        assert_success(&out, "exec through the agent");
    }
    let out = c.machine("alice").run(["ssh", &host, "exit", "3"]);
    assert_exit_code(&out, 3, "exit status");
    let out = c.machine("alice").run(["ssh", "nosuch.acme", "true"]);
    assert_exit_code(&out, 255, "unknown host");
    c.manager().run_ok(["ssh", "cluster", "status"]);
    c.stop_server("foo"); // flush its logs

    // Secrets: every machine's `secret-key` file.
    let mut files = vec![];
    walk(c.dir(), &mut files);
    let keys: Vec<(PathBuf, [u8; 32])> = files
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "secret-key"))
        .map(|p| {
            let text = fs::read_to_string(p).unwrap();
            let bytes: [u8; 32] = hex::decode(text.trim()).unwrap().try_into().unwrap();
            (p.clone(), bytes)
        })
        .collect();
    assert_eq!(
        keys.len(),
        3,
        "one key per machine (mgr, foo, alice): {keys:?}"
    );

    // Logs name peers and commands: only the user may read them (folder 0700).
    for m in ["mgr", "foo", "alice"] {
        use std::os::unix::fs::PermissionsExt;
        let d = c.dir().join(m).join("logs/ssh");
        let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{}: mode {mode:o}", d.display());
    }

    // Everything else the machines wrote: logs, audit log, cluster files, state. The
    // manager's own file is the admin's (it holds the commented-out key on purpose).
    let own = c.manager_file();
    let scanned: Vec<&PathBuf> = files
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "secret-key"))
        .filter(|p| **p != own)
        .filter(|p| {
            ["mgr", "foo", "alice"]
                .iter()
                .any(|m| p.starts_with(c.dir().join(m)))
        })
        .collect();
    let names: Vec<String> = scanned
        .iter()
        .map(|p| p.strip_prefix(c.dir()).unwrap().display().to_string())
        .collect();
    assert!(
        names.iter().any(|n| n.contains("audit")),
        "no audit log in {names:?}"
    );
    assert!(
        names.iter().any(|n| n.starts_with("foo/logs")),
        "no logs in {names:?}"
    );
    assert!(
        names
            .iter()
            .any(|n| n == "foo/ssh/clusters/acme/cluster-manager.toml"),
        "no pushed file in {names:?}"
    );
    let mut leaks = vec![];
    for p in &scanned {
        let data = fs::read(p).unwrap_or_default();
        for (kp, key) in &keys {
            for (form, needle) in forms(key) {
                if contains(&data, &needle) {
                    leaks.push(format!("{} holds {} as {form}", p.display(), kp.display()));
                }
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "secret key material found:\n{}",
        leaks.join("\n")
    );
    eprintln!(
        "secrets: {} files scanned for {} keys in {} forms each: none found",
        scanned.len(),
        keys.len(),
        forms(&keys[0].1).len()
    );
}
