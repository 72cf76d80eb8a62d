//! `malai ssh demo`: a whole throwaway cluster on this machine, in a minute.
//!
//! Makes a temporary folder with three "machines" (each its own `MALAI_HOME`): a manager,
//! a server `foo` and a device `laptop`; builds the cluster with the same commands a user
//! would type (printed as it goes), starts `malai ssh server` for the manager and foo (the
//! manager pushes the file to foo over the cluster; laptop pulls it), runs a command
//! natively, runs OpenSSH through the ProxyCommand (to the sshd on 127.0.0.1:22 when one
//! answers, else to malai's embedded SSH server with strict host key checking), fetches a
//! web page through `malai ssh -N -L`, and removes everything. Relays are disabled: nothing
//! leaves loopback.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const CLUSTER: &str = "demo";

struct Machine {
    name: &'static str,
    home: PathBuf,
}

struct Demo {
    exe: PathBuf,
    root: PathBuf,
}

impl Demo {
    fn cmd(&self, m: &Machine, args: &[&str]) -> Command {
        let mut c = Command::new(&self.exe);
        c.args(args)
            .env("MALAI_HOME", &m.home)
            .env("MALAI_RELAY", "disabled")
            .env("MALAI_BIND", "127.0.0.1:0")
            .env("MALAI_USE_KEYRING", "false")
            .env_remove("MALAI_SSH_AGENT")
            .env_remove("MALAI_LOCKDOWN_MODE");
        c
    }

    fn show(&self, m: &Machine, args: &[&str]) {
        let words: Vec<String> = args
            .iter()
            .map(|a| match shlex::try_quote(a) {
                Ok(q) if *a != "&" => q.into_owned(),
                _ => a.to_string(),
            })
            .collect();
        println!("\n[{}]$ malai {}", m.name, words.join(" "));
    }

    /// Run, echo the command and its output, return stdout.
    fn run(&self, m: &Machine, args: &[&str]) -> anyhow::Result<String> {
        self.show(m, args);
        let out = self.cmd(m, args).stdin(Stdio::null()).output()?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        print!("{stdout}");
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            anyhow::bail!("`malai {}` failed ({})", args.join(" "), out.status);
        }
        Ok(stdout.trim().to_string())
    }
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // SIGTERM for a graceful drain, then make sure.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_udp_port() -> anyhow::Result<u16> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn run(keep: bool) -> anyhow::Result<()> {
    let root = std::env::temp_dir().join(format!("malai-demo-{}", std::process::id()));
    std::fs::create_dir_all(&root)?;
    let demo = Demo {
        exe: std::env::current_exe()?,
        root: root.clone(),
    };
    println!("malai ssh demo: a throwaway cluster in {}", root.display());
    println!("(each machine below is a folder used as MALAI_HOME; relays are disabled)");
    let result = steps(&demo);
    if keep {
        println!("\nkept {} (--keep)", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
        println!("\ncleaned up {}", root.display());
    }
    result
}

fn steps(d: &Demo) -> anyhow::Result<()> {
    let mk = |name| Machine {
        name,
        home: d.root.join(name),
    };
    let (mgr, foo, laptop) = (mk("manager"), mk("foo"), mk("laptop"));

    println!("\n# 1. The manager creates the cluster; its file is the alias book and the ACL.");
    let mgr_id = d.run(&mgr, &["ssh", "cluster", "init", CLUSTER])?;
    println!("\n# 2. Each member joins and prints its id52 for the manager to add.");
    let foo_id = d.run(&foo, &["ssh", "cluster", "join", CLUSTER, &mgr_id])?;
    let laptop_id = d.run(&laptop, &["ssh", "cluster", "join", CLUSTER, &mgr_id])?;
    println!("\n# 3. The manager adds them and lets laptop use foo.");
    d.run(&mgr, &["ssh", "cluster", "add", "server", "foo", &foo_id])?;
    d.run(
        &mgr,
        &["ssh", "cluster", "add", "device", "laptop", &laptop_id],
    )?;
    d.run(&mgr, &["ssh", "cluster", "allow", "foo", "laptop"])?;

    // Offline demo (relays off): tell members where the manager and foo listen (`addrs`
    // hints), as an admin of a LAN without internet would. With relays, no addrs at all.
    let port = free_udp_port()?;
    let mgr_port = free_udp_port()?;
    // Without an sshd here, foo serves OpenSSH clients with malai's embedded SSH server.
    let sshd_here =
        std::net::TcpStream::connect_timeout(&"127.0.0.1:22".parse()?, Duration::from_millis(300))
            .is_ok();
    let file = mgr
        .home
        .join("ssh/clusters")
        .join(CLUSTER)
        .join(crate::config::CLUSTER_FILE);
    let text = std::fs::read_to_string(&file)?;
    let ssh_line = if sshd_here {
        ""
    } else {
        "ssh = \"embedded\"\n"
    };
    let text = text
        .replacen(
            "\n[server.foo]\n",
            &format!("\n[server.foo]\naddrs = [\"127.0.0.1:{port}\"]\n{ssh_line}"),
            1,
        )
        .replacen(
            "\n[cluster-manager]\n",
            &format!("\n[cluster-manager]\naddrs = [\"127.0.0.1:{mgr_port}\"]\n"),
            1,
        );
    std::fs::write(&file, text)?;
    println!(
        "\n# (edited {}: addrs = [\"127.0.0.1:{mgr_port}\"] under [cluster-manager], addrs = [\"127.0.0.1:{port}\"]{} under [server.foo])",
        short(&file, &d.root),
        if sshd_here {
            ""
        } else {
            " and ssh = \"embedded\" (no sshd here)"
        }
    );

    println!("\n# 4. The manager and foo run `malai ssh server`; the manager pushes the file.");
    let spawn_server = |m: &Machine, bind: &str| -> anyhow::Result<KillOnDrop> {
        d.show(m, &["ssh", "server", "--bind", bind, "&"]);
        let mut child = d
            .cmd(m, &["ssh", "server", "--bind", bind])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take();
        let server = KillOnDrop(child);
        wait_ready(stderr)?;
        Ok(server)
    };
    let _manager_server = spawn_server(&mgr, &format!("127.0.0.1:{mgr_port}"))?;
    let server = spawn_server(&foo, &format!("127.0.0.1:{port}"))?;
    let foo_file = foo
        .home
        .join("ssh/clusters")
        .join(CLUSTER)
        .join(crate::config::CLUSTER_FILE);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !foo_file.exists() {
        if Instant::now() > deadline {
            anyhow::bail!("foo did not get the cluster file from the manager in 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("# (foo received the file from the manager over the cluster)");
    println!("# laptop runs no server: it pulls (with relays it would need no --from).");
    let from = format!("127.0.0.1:{mgr_port}");
    d.run(&laptop, &["ssh", "cluster", "pull", "--from", &from])?;

    println!("\n# 5. laptop runs a command on foo, natively (no OpenSSH involved).");
    d.run(&laptop, &["ssh", &format!("foo.{CLUSTER}"), "uname", "-a"])?;
    d.run(
        &laptop,
        &[
            "ssh",
            &format!("foo.{CLUSTER}"),
            "echo",
            "hello from $(hostname)",
        ],
    )?;

    println!("\n# 6. A machine not allowed is denied (exit 255, one line on stderr).");
    let stranger = mk("stranger");
    let st_id = d.run(&stranger, &["ssh", "cluster", "join", CLUSTER, &mgr_id])?;
    d.run(
        &mgr,
        &["ssh", "cluster", "add", "device", "stranger", &st_id],
    )?;
    d.run(&stranger, &["ssh", "cluster", "pull", "--from", &from])?;
    // foo gets the new file by push: until then it does not know the stranger at all.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(&foo_file)
        .unwrap_or_default()
        .contains(&st_id)
    {
        if Instant::now() > deadline {
            anyhow::bail!("foo did not get the manager's new file in 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    d.show(&stranger, &["ssh", &format!("foo.{CLUSTER}"), "true"]);
    let out = d
        .cmd(&stranger, &["ssh", &format!("foo.{CLUSTER}"), "true"])
        .stdin(Stdio::null())
        .output()?;
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    println!("(exit {})", out.status.code().unwrap_or(-1));

    println!("\n# 7. OpenSSH through the cluster: ssh -o ProxyCommand=\"malai ssh proxy %h %p\"");
    let proxy = format!(
        "ProxyCommand=env MALAI_HOME={} MALAI_RELAY=disabled MALAI_BIND=127.0.0.1:0 MALAI_USE_KEYRING=false {} ssh proxy %h %p",
        laptop.home.display(),
        d.exe.display()
    );
    let known_hosts = d.root.join("known_hosts");
    let mut ssh = Command::new("ssh");
    ssh.args(["-o", &proxy, "-o", "BatchMode=yes"]);
    if sshd_here {
        ssh.args(["-o", "StrictHostKeyChecking=accept-new"]);
    } else {
        // The embedded server's host key is foo's id52: laptop can vouch for it.
        let lines = d.run(&laptop, &["ssh", "known-hosts"])?;
        std::fs::write(&known_hosts, format!("{lines}\n"))?;
        println!("# (saved as known_hosts: strict host key checking stays on)");
        ssh.args(["-o", "StrictHostKeyChecking=yes"]);
    }
    ssh.arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg(format!("foo.{CLUSTER}"))
        .arg("echo ok: ssh reached foo through malai")
        .stdin(Stdio::null());
    println!("$ ssh -o '{proxy}' foo.{CLUSTER} 'echo ok: …'");
    match ssh.status() {
        Ok(s) if s.success() => {}
        Ok(s) if sshd_here => println!(
            "(ssh exited {}: the tunnel worked, but sshd did not accept your key — expected unless your key is in ~/.ssh/authorized_keys)",
            s.code().unwrap_or(-1)
        ),
        Ok(s) => anyhow::bail!("ssh to the embedded server failed ({s})"),
        Err(e) => println!("(could not run ssh: {e})"),
    }
    forward_step(d, &laptop)?;
    drop(server);
    println!("\n# Done. For your own cluster: README.md, and `malai ssh --help`.");
    Ok(())
}

/// Step 9: a web server only foo's loopback can reach, fetched on laptop through
/// `malai ssh -N -L` (with curl when it is installed).
fn forward_step(d: &Demo, laptop: &Machine) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    println!("\n# 8. Port forwarding: a web server on foo's 127.0.0.1, reached from laptop.");
    // The "web server on foo": this process, answering one line of HTML per request.
    let web = std::net::TcpListener::bind("127.0.0.1:0")?;
    let web_port = web.local_addr()?.port();
    std::thread::spawn(move || {
        for s in web.incoming() {
            let Ok(mut s) = s else { return };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let body = "<h1>hello from foo's web server</h1>\n";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let local = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let spec = format!("{local}:127.0.0.1:{web_port}");
    let host = format!("foo.{CLUSTER}");
    let args = ["ssh", "-N", "-L", &spec, &host];
    d.show(laptop, &[&args[..], &["&"]].concat());
    let fwd = KillOnDrop(
        d.cmd(laptop, &args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            // Its "Killed by signal 15." when the demo stops it is noise here.
            .stderr(Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", local)).is_err() {
        if Instant::now() > deadline {
            anyhow::bail!("the forward did not come up in 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("http://127.0.0.1:{local}/");
    println!("[laptop]$ curl -s {url}");
    match Command::new("curl")
        .args(["-s", &url])
        .stdin(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => {}
        Ok(s) => println!("(curl exited {})", s.code().unwrap_or(-1)),
        Err(_) => {
            // No curl here: the same request by hand.
            let mut s = std::net::TcpStream::connect(("127.0.0.1", local))?;
            write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut resp = String::new();
            s.read_to_string(&mut resp)?;
            print!("{}", resp.split("\r\n\r\n").nth(1).unwrap_or(""));
        }
    }
    drop(fwd);
    Ok(())
}

fn short(p: &Path, root: &Path) -> String {
    p.strip_prefix(root)
        .map(|r| r.display().to_string())
        .unwrap_or_else(|_| p.display().to_string())
}

fn wait_ready(stderr: Option<std::process::ChildStderr>) -> anyhow::Result<()> {
    use std::io::BufRead;
    let Some(stderr) = stderr else {
        anyhow::bail!("server has no stderr");
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            println!("  {line}");
            if line.contains("server ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(30))
        .map_err(|_| anyhow::anyhow!("the server did not become ready in 30 s"))
}
