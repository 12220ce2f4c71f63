//! veer-init against the real kernel: every test builds its own network
//! namespace, runs the built binary inside it with `ip netns exec`, and looks
//! at iptables-save output and at where connections land. Nothing here sends
//! traffic or changes rules outside the test namespaces.
//!
//! Needs root (namespaces, iptables); without it each test prints why it is
//! skipped and passes.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::socket::{getsockopt, sockopt};

const VEER_INIT: &str = env!("CARGO_BIN_EXE_veer-init");

/// The arguments Istio's injector passes to istio-iptables by default.
const INJECTED: &[&str] = &[
    "-p",
    "15001",
    "-z",
    "15006",
    "-u",
    "1337",
    "-m",
    "REDIRECT",
    "-i",
    "*",
    "-x",
    "",
    "-b",
    "*",
    "-d",
    "15090,15021,15020",
];

const BACKENDS: [&str; 2] = ["nft", "legacy"];

/// Returns early (passing) with a message when the test cannot run here.
macro_rules! require {
    ($($tool:expr),* $(,)?) => {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: network namespace tests need root");
            return;
        }
        for tool in ["ip", "setpriv", $($tool),*] {
            if !have(tool) {
                eprintln!("skipping: `{tool}` is not installed");
                return;
            }
        }
    };
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A network namespace that is deleted when dropped, also on panic. Names
/// carry the pid and a counter so parallel tests (and parallel test runs)
/// never share one.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "vi-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        Netns { name }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    /// Runs a command in the namespace and insists it succeeds.
    fn ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.cmd(args))
    }

    /// Runs veer-init in the namespace with `args` plus `extra`.
    fn veer(&self, args: &[&str], extra: &[&str]) -> Output {
        self.cmd(&[&[VEER_INIT], args, extra].concat())
            .output()
            .expect("run veer-init")
    }

    fn veer_ok(&self, args: &[&str], extra: &[&str]) -> Output {
        let out = self.veer(args, extra);
        assert!(
            out.status.success(),
            "veer-init {args:?} {extra:?} failed:\n{}",
            text(&out.stderr)
        );
        out
    }

    /// `iptables-<backend>-save` for all tables, without comments and
    /// counters (which change with traffic and time, not with rules).
    fn save(&self, backend: &str) -> String {
        normalize(&self.ok(&[&format!("iptables-{backend}-save")]))
    }

    /// Rules that belong to someone else, so the tests can check veer-init
    /// leaves them alone (and, for legacy, that the backend holds rules).
    fn prime(&self, backend: &str) {
        let ipt = format!("iptables-{backend}");
        for rule in [
            "-t nat -N OTHER",
            "-t nat -A OTHER -p tcp --dport 2222 -j RETURN",
            "-t nat -A PREROUTING -p tcp --dport 2222 -j OTHER",
            "-t nat -A OUTPUT -p udp --dport 5353 -j RETURN",
            "-t filter -A INPUT -p tcp --dport 9 -j DROP",
        ] {
            let args: Vec<&str> = ["-w"].into_iter().chain(rule.split(' ')).collect();
            self.ok(&[&[ipt.as_str()], args.as_slice()].concat());
        }
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it
    /// creates stay in the namespace after it returns.
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).expect("setns into test namespace");
            f()
        })
        .join()
        .expect("thread inside the namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn normalize(save: &str) -> String {
    save.lines()
        .filter(|line| !line.starts_with('#'))
        .map(|line| match line.strip_prefix(':') {
            Some(_) => line.rsplit_once(" [").map_or(line, |(head, _)| head),
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn count(haystack: &str, line: &str) -> usize {
    haystack.lines().filter(|l| *l == line).count()
}

#[test]
fn install_twice_is_idempotent() {
    require!("iptables-nft", "iptables-legacy");
    for backend in BACKENDS {
        let ns = Netns::new();
        ns.prime(backend);
        let flag = format!("--iptables-backend={backend}");
        ns.veer_ok(INJECTED, &[&flag]);
        let first = ns.save(backend);
        ns.veer_ok(INJECTED, &[&flag]);
        let second = ns.save(backend);
        assert_eq!(
            first, second,
            "{backend}: a second install changed the rules"
        );

        assert_eq!(
            count(&first, "-A PREROUTING -p tcp -j VEER_INBOUND"),
            1,
            "{first}"
        );
        assert_eq!(
            count(&first, "-A OUTPUT -p tcp -j VEER_OUTPUT"),
            1,
            "{first}"
        );
        for line in [
            "-A VEER_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A VEER_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "-A VEER_INBOUND -p tcp -m tcp --dport 15008 -j RETURN",
            "-A VEER_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "-A VEER_OUTPUT -j VEER_REDIRECT",
            // Someone else's rules survive.
            "-A PREROUTING -p tcp -m tcp --dport 2222 -j OTHER",
            "-A INPUT -p tcp -m tcp --dport 9 -j DROP",
        ] {
            assert_eq!(count(&first, line), 1, "{backend}: `{line}` in\n{first}");
        }
        let other = if backend == "nft" { "legacy" } else { "nft" };
        assert!(
            !ns.save(other).contains("VEER"),
            "{backend}: rules leaked into iptables-{other}"
        );
    }
}

#[test]
fn cleanup_restores_the_previous_state() {
    require!("iptables-nft", "iptables-legacy");
    for backend in BACKENDS {
        let ns = Netns::new();
        ns.prime(backend);
        let before = ns.save(backend);
        let flag = format!("--iptables-backend={backend}");
        ns.veer_ok(INJECTED, &[&flag]);
        assert_ne!(ns.save(backend), before);

        ns.veer_ok(&["--cleanup-only"], &[&flag]);
        assert_eq!(ns.save(backend), before, "{backend}: cleanup left a trace");

        // A second cleanup has nothing to do and says so; capture flags
        // (even ones install would reject) do not matter to cleanup.
        let again = ns.veer_ok(&["--cleanup-only", "-m", "TPROXY"], &[&flag]);
        assert!(text(&again.stderr).contains("nothing to remove"));
        assert_eq!(ns.save(backend), before);
    }
}

#[test]
fn changed_flags_are_reconciled() {
    require!("iptables-nft");
    let ns = Netns::new();
    let flag = "--iptables-backend=nft";
    ns.veer_ok(INJECTED, &[flag]);
    let full = ns.save("nft");

    // No inbound ports any more: the PREROUTING jump must go.
    ns.veer_ok(INJECTED, &["-b", "", "-i", "10.96.0.0/12", flag]);
    let narrowed = ns.save("nft");
    assert!(!narrowed.contains("-A PREROUTING"), "{narrowed}");
    assert_eq!(count(&narrowed, "-A OUTPUT -p tcp -j VEER_OUTPUT"), 1);
    assert_eq!(
        count(&narrowed, "-A VEER_OUTPUT -d 10.96.0.0/12 -j VEER_REDIRECT"),
        1
    );
    assert!(
        !narrowed.contains("-A VEER_OUTPUT -j VEER_REDIRECT"),
        "{narrowed}"
    );
    assert_eq!(narrowed.matches("-A VEER_INBOUND").count(), 1, "{narrowed}");

    ns.veer_ok(INJECTED, &[flag]);
    assert_eq!(ns.save("nft"), full);
}

#[test]
fn dry_run_changes_nothing_and_needs_no_privileges() {
    require!("iptables-nft", "iptables-legacy");
    let ns = Netns::new();
    ns.prime("nft");
    let before = (ns.save("nft"), ns.save("legacy"));

    // Without CAP_NET_ADMIN and without iptables on PATH, dry-run still works.
    let mut cmd = ns.cmd(&[
        "env",
        "PATH=/nonexistent",
        "/usr/bin/setpriv",
        "--inh-caps=-all",
        "--bounding-set=-net_admin",
        VEER_INIT,
        "-n",
    ]);
    let out = cmd.args(INJECTED).output().expect("run veer-init -n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("# IPv4 nat table"), "{stdout}");
    for line in [
        ":VEER_OUTPUT - [0:0]",
        "-A VEER_INBOUND -p tcp --dport 15020 -j RETURN",
        "-A PREROUTING -p tcp -j VEER_INBOUND",
        "-A OUTPUT -p tcp -j VEER_OUTPUT",
        "COMMIT",
    ] {
        assert_eq!(count(&stdout, line), 1, "`{line}` in\n{stdout}");
    }
    assert_eq!((ns.save("nft"), ns.save("legacy")), before);

    // The printed text is exactly what gets applied: feeding it to
    // iptables-restore by hand gives the same rules as a real install.
    let manual = Netns::new();
    let mut restore = manual
        .cmd(&["iptables-nft-restore", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("spawn iptables-nft-restore");
    restore
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdout.as_bytes())
        .expect("write restore input");
    assert!(restore.wait().expect("wait").success());
    let real = Netns::new();
    real.veer_ok(INJECTED, &["--iptables-backend=nft"]);
    assert_eq!(manual.save("nft"), real.save("nft"));
}

#[test]
fn missing_net_admin_fails_with_one_clear_sentence() {
    require!("iptables-nft");
    let ns = Netns::new();
    ns.prime("nft");
    let before = ns.save("nft");
    let mut cmd = ns.cmd(&[
        "setpriv",
        "--inh-caps=-all",
        "--bounding-set=-net_admin",
        VEER_INIT,
    ]);
    let out = cmd.args(INJECTED).output().expect("run veer-init");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("CAP_NET_ADMIN"), "{stderr}");
    assert!(
        stderr.contains(r#"securityContext: {capabilities: {add: ["NET_ADMIN", "NET_RAW"]}}"#),
        "{stderr}"
    );
    assert_eq!(ns.save("nft"), before);
}

#[test]
fn missing_iptables_fails_with_one_clear_sentence() {
    require!();
    let ns = Netns::new();
    let mut cmd = ns.cmd(&["env", "PATH=/nonexistent", VEER_INIT]);
    let out = cmd.args(INJECTED).output().expect("run veer-init");
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("install the `iptables` package"),
        "{stderr}"
    );
}

#[test]
fn auto_detection_prefers_legacy_only_when_it_holds_rules() {
    require!("iptables-nft", "iptables-legacy");
    // Fresh namespace: legacy is empty, so nft.
    let fresh = Netns::new();
    let out = fresh.veer_ok(INJECTED, &[]);
    assert!(
        text(&out.stderr).contains("using iptables-nft"),
        "{}",
        text(&out.stderr)
    );
    assert!(fresh.save("nft").contains("VEER_OUTPUT"));
    assert!(!fresh.save("legacy").contains("VEER"));

    // Legacy already in use: stay with it, install and clean up there.
    let legacy = Netns::new();
    legacy.prime("legacy");
    let before = legacy.save("legacy");
    let out = legacy.veer_ok(INJECTED, &[]);
    assert!(
        text(&out.stderr).contains("using iptables-legacy"),
        "{}",
        text(&out.stderr)
    );
    assert!(legacy.save("legacy").contains("VEER_OUTPUT"));
    assert!(!legacy.save("nft").contains("VEER"));
    legacy.veer_ok(&["--cleanup-only"], &[]);
    assert_eq!(legacy.save("legacy"), before);

    // The override also works through the environment.
    let forced = Netns::new();
    let mut cmd = forced.cmd(&["env", "VEER_IPTABLES_BACKEND=legacy", VEER_INIT]);
    let out = cmd.args(INJECTED).output().expect("run veer-init");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("using iptables-legacy (requested"));
    assert!(forced.save("legacy").contains("VEER_OUTPUT"));
}

/// Waits (bounded) for a connection on a listener.
fn accept_within(listener: &TcpListener, limit: Duration) -> Option<TcpStream> {
    listener.set_nonblocking(true).expect("nonblocking");
    let deadline = Instant::now() + limit;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).expect("blocking");
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .expect("read timeout");
                return Some(stream);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(e) => panic!("accept: {e}"),
        }
    }
}

/// Where a redirected connection was originally headed (SO_ORIGINAL_DST).
fn original_dst(stream: &TcpStream) -> SocketAddrV4 {
    let sa = getsockopt(stream, sockopt::OriginalDst).expect("SO_ORIGINAL_DST");
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )
}

fn read_all(mut stream: TcpStream) -> String {
    let mut got = String::new();
    stream.read_to_string(&mut got).expect("read");
    got
}

/// Connects from inside `ns`, sends `payload` and closes; the connection
/// error, if any.
fn send_from(ns: &Netns, to: &str, payload: &'static str) -> Result<(), std::io::Error> {
    let to: SocketAddr = to.parse().expect("address");
    ns.enter(move || {
        let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        stream.write_all(payload.as_bytes())
    })
}

/// `bash -c SCRIPT` inside `ns` as the proxy user, bounded by `timeout`.
fn as_proxy_user(ns: &Netns, script: &str) -> Output {
    ns.cmd(&[
        "setpriv",
        "--reuid=1337",
        "--regid=1337",
        "--clear-groups",
        "timeout",
        "3",
        "bash",
        "-c",
        script,
    ])
    .output()
    .expect("run as uid 1337")
}

#[test]
fn outbound_connections_land_on_the_outbound_port() {
    require!("iptables-nft", "iptables-legacy", "bash", "timeout");
    for backend in BACKENDS {
        let ns = Netns::new();
        // An interface and a default route, so that connect() to an address
        // that exists nowhere gets as far as the OUTPUT chain. The other end
        // is a second namespace that neither answers nor forwards, so
        // anything not captured goes nowhere.
        let sink = Netns::new();
        ns.ok(&[
            "ip", "link", "add", "vo0", "type", "veth", "peer", "name", "vs0", "netns", &sink.name,
        ]);
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns.ok(&["ip", "addr", "add", "10.99.0.2/24", "dev", "vo0"]);
        ns.ok(&["ip", "link", "set", "vo0", "up"]);
        ns.ok(&["ip", "route", "add", "default", "dev", "vo0"]);
        sink.ok(&["ip", "link", "set", "vs0", "up"]);
        ns.veer_ok(INJECTED, &[&format!("--iptables-backend={backend}")]);

        let proxy = ns.enter(|| TcpListener::bind("127.0.0.1:15001").expect("bind 15001"));

        // An app (root here, not the proxy uid) dialing anywhere is captured.
        send_from(&ns, "10.255.255.1:80", "hello").expect("captured connect");
        let conn = accept_within(&proxy, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{backend}: nothing arrived on 15001"));
        assert_eq!(original_dst(&conn), "10.255.255.1:80".parse().unwrap());
        assert_eq!(read_all(conn), "hello");

        // App-to-app traffic over lo is not captured: nothing listens on :80.
        let err = send_from(&ns, "127.0.0.1:80", "x").expect_err("127.0.0.1 is not captured");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{backend}: {err}");

        // The proxy's own connections are not captured (no loop): its SYN
        // goes into the sink and the connect times out.
        let out = as_proxy_user(&ns, "exec 3<>/dev/tcp/10.255.255.1/80");
        assert!(
            !out.status.success(),
            "{backend}: uid 1337 reached something"
        );
        assert!(
            accept_within(&proxy, Duration::from_millis(200)).is_none(),
            "{backend}: the proxy's own connection was captured"
        );
    }
}

#[test]
fn inbound_connections_land_on_the_inbound_port() {
    require!("iptables-nft", "bash", "timeout");
    let pod = Netns::new();
    let client = Netns::new();
    // A veth pair created directly inside the two namespaces, so no
    // interface ever appears in the host namespace.
    pod.ok(&[
        "ip",
        "link",
        "add",
        "va0",
        "type",
        "veth",
        "peer",
        "name",
        "vb0",
        "netns",
        &client.name,
    ]);
    for (ns, dev, addr) in [
        (&pod, "va0", "10.98.0.1/24"),
        (&client, "vb0", "10.98.0.2/24"),
    ] {
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns.ok(&["ip", "addr", "add", addr, "dev", dev]);
        ns.ok(&["ip", "link", "set", dev, "up"]);
    }
    pod.veer_ok(INJECTED, &[]);
    let inbound = pod.enter(|| TcpListener::bind("0.0.0.0:15006").expect("bind 15006"));

    // Any port from outside lands on 15006, keeping its original target.
    send_from(&client, "10.98.0.1:8080", "from outside").expect("captured inbound");
    let conn = accept_within(&inbound, Duration::from_secs(5)).expect("nothing arrived on 15006");
    assert_eq!(original_dst(&conn), "10.98.0.1:8080".parse().unwrap());
    assert_eq!(read_all(conn), "from outside");

    // Excluded ports and the tunnel port are left alone: nothing listens
    // there, so the pod's kernel refuses.
    for port in [15021, 15090, 15008] {
        let to = format!("10.98.0.1:{port}");
        let err = send_from(&client, &to, "x").expect_err("excluded port was captured");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{to}: {err}");
    }
    assert!(accept_within(&inbound, Duration::from_millis(200)).is_none());

    // The proxy dialing the pod's own address (an app calling itself via a
    // service) is handed to the inbound side.
    let out = as_proxy_user(&pod, "exec 3<>/dev/tcp/10.98.0.1/8080 && echo self >&3");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let conn = accept_within(&inbound, Duration::from_secs(5)).expect("self call not captured");
    assert_eq!(original_dst(&conn), "10.98.0.1:8080".parse().unwrap());
    assert_eq!(read_all(conn), "self\n");
}
