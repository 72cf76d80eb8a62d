//! `malai ssh demo` (the README's first command) runs to the end on this machine: config
//! sync over the cluster, a native command, a denial, OpenSSH through the ProxyCommand (to
//! the embedded SSH server when no sshd answers on 127.0.0.1:22) and a `-L` forward.

use std::process::Command;

use crate::harness::*;

#[test]
fn demo_runs_every_step() {
    let mut cmd = Command::new(MALAI);
    cmd.args(["ssh", "demo"])
        .env_remove("MALAI_HOME")
        .env_remove("MALAI_SSH_AGENT")
        .env_remove("RUST_LOG");
    let out = run_cmd(&mut cmd);
    assert_success(&out, "malai ssh demo");
    let text = stdout_of(&out);
    for want in [
        "received the file from the manager",
        "hello from",
        "permission denied",
        "hello from foo's web server",
    ] {
        assert!(
            text.contains(want) || stderr_of(&out).contains(want),
            "demo output lacks {want:?}\n{}",
            fmt_output(&out)
        );
    }
    let sshd_on_22 = std::net::TcpStream::connect("127.0.0.1:22").is_ok();
    if !sshd_on_22 {
        assert!(
            text.contains("ok: ssh reached foo through malai"),
            "OpenSSH to the embedded server failed\n{}",
            fmt_output(&out)
        );
    }
}
