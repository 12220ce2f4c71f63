//! veer-init against the real kernel: every test builds its own network
//! namespace, runs the built binary inside it with `ip netns exec`, and looks
//! at iptables-save output and at where connections land. Nothing here sends
//! traffic or changes rules outside the test namespaces.
//!
//! Needs root (namespaces, iptables); without it each test prints why it is
//! skipped and passes.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{
    Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpListener, TcpStream,
};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;
use nix::sys::socket::{getsockopt, sockopt};

const VEER_INIT: &str = env!("CARGO_BIN_EXE_veer-init");

use veer_init::flags::ISTIO_INJECTED_ARGS as INJECTED;

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
        let ns = Netns { name };
        // As in every pod: the self-check's probe goes over lo.
        ns.ok(&["ip", "link", "set", "lo", "up"]);
        ns
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
    assert!(
        stdout.starts_with("# IPv4: input for `iptables-restore --noflush`\n*nat\n"),
        "{stdout}"
    );
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
    assert!(stderr.contains("lacks CAP_NET_ADMIN in"), "{stderr}");
    assert!(
        stderr.contains(r#"securityContext: {capabilities: {add: ["NET_ADMIN", "NET_RAW"]}}"#),
        "{stderr}"
    );
    assert_eq!(ns.save("nft"), before);

    // NET_RAW is named the same way, and so are both at once.
    for (drop, needle) in [
        ("-net_raw", "lacks CAP_NET_RAW in"),
        (
            "-net_admin,-net_raw",
            "lacks CAP_NET_ADMIN and CAP_NET_RAW in",
        ),
    ] {
        let mut cmd = ns.cmd(&[
            "setpriv",
            "--inh-caps=-all",
            &format!("--bounding-set={drop}"),
            VEER_INIT,
        ]);
        let out = cmd.args(INJECTED).output().expect("run veer-init");
        assert!(!out.status.success());
        let stderr = text(&out.stderr);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
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
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("install the `iptables` package"),
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

/// Where a redirected IPv6 connection was headed (IP6T_SO_ORIGINAL_DST).
fn original_dst6(stream: &TcpStream) -> SocketAddrV6 {
    let sa = getsockopt(stream, sockopt::Ip6tOriginalDst).expect("IP6T_SO_ORIGINAL_DST");
    SocketAddrV6::new(
        Ipv6Addr::from(sa.sin6_addr.s6_addr),
        u16::from_be(sa.sin6_port),
        0,
        0,
    )
}

/// A pod namespace whose only way out is a veth into a second namespace
/// that neither answers nor forwards (the "sink"), with the given addresses
/// on the pod side and default routes through it. Anything not captured goes
/// nowhere. IPv6 addresses skip duplicate address detection so they are
/// usable at once.
fn pod_with_sink(addrs: &[&str]) -> (Netns, Netns) {
    let pod = Netns::new();
    let sink = Netns::new();
    pod.ok(&[
        "ip", "link", "add", "vo0", "type", "veth", "peer", "name", "vs0", "netns", &sink.name,
    ]);
    for addr in addrs {
        if addr.contains(':') {
            pod.ok(&["ip", "-6", "addr", "add", addr, "dev", "vo0", "nodad"]);
        } else {
            pod.ok(&["ip", "addr", "add", addr, "dev", "vo0"]);
        }
    }
    pod.ok(&["ip", "link", "set", "vo0", "up"]);
    sink.ok(&["ip", "link", "set", "vs0", "up"]);
    for addr in addrs {
        let family = if addr.contains(':') { "-6" } else { "-4" };
        pod.ok(&["ip", family, "route", "replace", "default", "dev", "vo0"]);
    }
    (pod, sink)
}

fn lines_with<'a>(haystack: &'a str, needle: &str) -> Vec<&'a str> {
    haystack.lines().filter(|l| l.contains(needle)).collect()
}

#[test]
fn ipv6_pod_outbound_lands_on_the_outbound_port() {
    require!(
        "iptables-nft",
        "iptables-legacy",
        "ip6tables-nft",
        "ip6tables-legacy"
    );
    for backend in BACKENDS {
        // An IPv6-only pod: IPv6 capture is detected from its address.
        let (pod, _sink) = pod_with_sink(&["fd00:99::2/64"]);
        let out = pod.veer_ok(INJECTED, &[&format!("--iptables-backend={backend}")]);
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("capturing IPv4 and IPv6 (the pod has IPv6 address vo0 fd00:99::2)"),
            "{backend}: {stderr}"
        );
        assert_eq!(
            lines_with(&stderr, "capture self-check passed").len(),
            2,
            "{backend}: {stderr}"
        );
        assert!(pod
            .ok(&["ip", "-6", "addr", "show", "dev", "lo"])
            .contains("inet6 ::6/128"));
        let saved6 = normalize(&pod.ok(&[&format!("ip6tables-{backend}-save")]));
        for line in [
            "-A VEER_OUTPUT -s ::6/128 -o lo -j RETURN",
            "-A VEER_OUTPUT -d ::1/128 -j RETURN",
            "-A VEER_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "-A OUTPUT -p tcp -j VEER_OUTPUT",
            "-A PREROUTING -p tcp -j VEER_INBOUND",
        ] {
            assert_eq!(count(&saved6, line), 1, "{backend}: `{line}` in\n{saved6}");
        }
        // Installing again changes nothing in either family.
        let saved4 = pod.save(backend);
        pod.veer_ok(INJECTED, &[&format!("--iptables-backend={backend}")]);
        assert_eq!(pod.save(backend), saved4);
        assert_eq!(
            normalize(&pod.ok(&[&format!("ip6tables-{backend}-save")])),
            saved6
        );

        // A root client dialing an IPv6 "service" lands on [::1]:15001,
        // where the proxy would listen, with its original destination.
        let proxy = pod.enter(|| TcpListener::bind("[::1]:15001").expect("bind [::1]:15001"));
        send_from(&pod, "[fd00:96::1]:80", "hello6").expect("captured connect");
        let conn = accept_within(&proxy, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("{backend}: nothing arrived on [::1]:15001"));
        assert_eq!(
            original_dst6(&conn),
            "[fd00:96::1]:80".parse::<SocketAddrV6>().unwrap()
        );
        assert_eq!(read_all(conn), "hello6");

        // App-to-app over ::1 is not captured.
        let err = send_from(&pod, "[::1]:80", "x").expect_err("::1 is not captured");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{backend}: {err}");

        // Cleanup removes both families.
        pod.veer_ok(
            &["--cleanup-only"],
            &[&format!("--iptables-backend={backend}")],
        );
        assert!(!pod.save(backend).contains("VEER"));
        assert!(!pod
            .ok(&[&format!("ip6tables-{backend}-save")])
            .contains("VEER"));
    }
}

#[test]
fn dual_stack_pod_captures_both_families() {
    require!("iptables-nft", "ip6tables-nft");
    let (pod, _sink) = pod_with_sink(&["10.99.0.2/24", "fd00:99::2/64"]);
    let out = pod.veer_ok(INJECTED, &[]);
    assert!(text(&out.stderr).contains("capturing IPv4 and IPv6"));
    let proxy4 = pod.enter(|| TcpListener::bind("127.0.0.1:15001").expect("bind 15001"));
    let proxy6 = pod.enter(|| TcpListener::bind("[::1]:15001").expect("bind [::1]:15001"));
    send_from(&pod, "10.255.255.1:443", "v4").expect("captured v4");
    send_from(&pod, "[fd00:96::7]:443", "v6").expect("captured v6");
    let conn = accept_within(&proxy4, Duration::from_secs(5)).expect("v4 not captured");
    assert_eq!(original_dst(&conn), "10.255.255.1:443".parse().unwrap());
    let conn6 = accept_within(&proxy6, Duration::from_secs(5)).expect("v6 not captured");
    assert_eq!(
        original_dst6(&conn6),
        "[fd00:96::7]:443".parse::<SocketAddrV6>().unwrap()
    );

    // --dual-stack installs IPv6 rules in a pod that has no IPv6 address yet,
    // and the dry run shows both families' restore input.
    let bare = Netns::new();
    let out = bare.veer_ok(INJECTED, &["--dual-stack"]);
    assert!(text(&out.stderr).contains("capturing IPv4 and IPv6 (--dual-stack)"));
    assert!(bare
        .ok(&["ip6tables-nft-save"])
        .contains("-A VEER_OUTPUT -d ::1/128 -j RETURN"));
    let dry = bare.veer_ok(INJECTED, &["--dual-stack", "-n"]);
    let stdout = text(&dry.stdout);
    for line in [
        "# IPv4: input for `iptables-restore --noflush`",
        "# IPv6: first runs `ip -6 addr add ::6/128 dev lo`",
        "# IPv6: input for `ip6tables-restore --noflush`",
    ] {
        assert_eq!(count(&stdout, line), 1, "`{line}` in\n{stdout}");
    }
}

/// A listener as the proxy's TPROXY inbound listener must be: IP_TRANSPARENT,
/// on all addresses of the family.
fn transparent_listener(addr: &str) -> TcpListener {
    let addr: SocketAddr = addr.parse().expect("address");
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    socket.set_reuse_address(true).expect("SO_REUSEADDR");
    if addr.is_ipv4() {
        socket.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
    } else {
        socket.set_only_v6(true).expect("IPV6_V6ONLY");
        socket
            .set_ip_transparent_v6(true)
            .expect("IPV6_TRANSPARENT");
    }
    socket.bind(&addr.into()).expect("bind");
    socket.listen(16).expect("listen");
    socket.into()
}

#[test]
fn tproxy_inbound_keeps_the_client_address() {
    require!("iptables-nft", "ip6tables-nft", "bash", "timeout");
    let pod = Netns::new();
    let client = Netns::new();
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
    for (ns, dev, v4, v6) in [
        (&pod, "va0", "10.97.0.1/24", "fd00:97::1/64"),
        (&client, "vb0", "10.97.0.2/24", "fd00:97::2/64"),
    ] {
        ns.ok(&["ip", "addr", "add", v4, "dev", dev]);
        ns.ok(&["ip", "-6", "addr", "add", v6, "dev", dev, "nodad"]);
        ns.ok(&["ip", "link", "set", dev, "up"]);
    }
    let out = pod.veer_ok(INJECTED, &["-m", "TPROXY"]);
    let stderr = text(&out.stderr);
    assert_eq!(
        lines_with(&stderr, "capture self-check passed").len(),
        2,
        "{stderr}"
    );
    for family in ["-4", "-6"] {
        let rules = pod.ok(&["ip", family, "rule", "show"]);
        assert!(rules.contains("fwmark 0x539 lookup 133"), "{rules}");
        let routes = pod.ok(&["ip", family, "route", "show", "table", "133"]);
        assert!(routes.contains("local default dev lo"), "{routes}");
    }
    let mangle = pod.save("nft");
    assert!(
        mangle.contains("-A PREROUTING -j VEER_PREROUTING"),
        "{mangle}"
    );
    assert!(mangle.contains("-j TPROXY --on-port 15006"), "{mangle}");
    assert!(
        !mangle.contains("-A PREROUTING -p tcp -j VEER_INBOUND"),
        "{mangle}"
    );

    // Inbound connections reach the transparent listener with the client's
    // own address as their peer and the original destination as their
    // local address; no NAT is involved.
    let inbound4 = pod.enter(|| transparent_listener("0.0.0.0:15006"));
    let inbound6 = pod.enter(|| transparent_listener("[::]:15006"));
    for (listener, to, client_ip) in [
        (&inbound4, "10.97.0.1:8080", "10.97.0.2"),
        (&inbound6, "[fd00:97::1]:8080", "fd00:97::2"),
    ] {
        send_from(&client, to, "tproxied").expect("captured inbound");
        let conn = accept_within(listener, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("nothing arrived on 15006 for {to}"));
        let peer = conn.peer_addr().expect("peer");
        assert_eq!(peer.ip().to_string(), client_ip, "client address lost");
        assert_eq!(conn.local_addr().expect("local"), to.parse().unwrap());
        assert_eq!(read_all(conn), "tproxied");
    }
    // The tunnel and excluded ports are left alone (refused by the pod).
    for to in ["10.97.0.1:15008", "10.97.0.1:15021", "[fd00:97::1]:15090"] {
        let err = send_from(&client, to, "x").expect_err("excluded port was captured");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{to}: {err}");
    }

    // Back to REDIRECT: the mangle chains go, the routing stays (as istio);
    // cleanup removes everything, including the policy routing.
    pod.veer_ok(INJECTED, &["--skip-validation"]);
    let redirect = pod.save("nft");
    assert!(!redirect.contains("VEER_TPROXY"), "{redirect}");
    assert!(
        redirect.contains("-A PREROUTING -p tcp -j VEER_INBOUND"),
        "{redirect}"
    );
    pod.veer_ok(&["--cleanup-only"], &[]);
    assert!(!pod.save("nft").contains("VEER"));
    assert!(!pod.ok(&["ip", "-4", "rule", "show"]).contains("lookup 133"));
    assert!(!pod.ok(&["ip", "-6", "rule", "show"]).contains("lookup 133"));
}

#[test]
fn interface_and_invalid_flags_install_on_both_backends() {
    require!("iptables-nft", "iptables-legacy");
    for backend in BACKENDS {
        let ns = Netns::new();
        let flag = format!("--iptables-backend={backend}");
        let extra = ["-c", "eth7,tun+", "-k", "vm0", "--drop-invalid", &flag];
        ns.veer_ok(INJECTED, &extra);
        let first = ns.save(backend);
        for line in [
            "-A VEER_INBOUND -i vm0 -j VEER_REDIRECT",
            "-A VEER_INBOUND -i vm0 -j RETURN",
            "-A VEER_INBOUND -i eth7 -j RETURN",
            "-A VEER_OUTPUT -o tun+ -j RETURN",
            "-A VEER_PREROUTING -m conntrack --ctstate INVALID -j DROP",
            "-A PREROUTING -j VEER_PREROUTING",
        ] {
            assert_eq!(count(&first, line), 1, "{backend}: `{line}` in\n{first}");
        }
        ns.veer_ok(INJECTED, &extra);
        assert_eq!(ns.save(backend), first, "{backend}: not idempotent");
        ns.veer_ok(INJECTED, &[&flag]);
        let plain = ns.save(backend);
        assert!(!plain.contains("VEER_PREROUTING"), "{backend}: {plain}");
        assert!(!plain.contains("vm0"), "{backend}: {plain}");
    }
}

#[test]
fn validation_fails_when_rules_are_absent() {
    require!("iptables-nft");
    let ns = Netns::new();
    let out = ns.veer(
        &[
            "--run-validation",
            "--skip-rule-apply",
            "--probe-timeout",
            "500ms",
        ],
        &[],
    );
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    let errors = lines_with(&stderr, "error:");
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("capture self-check failed: IPv4: a connection from uid 1337 to 127.0.0.6:15002 did not reach 127.0.0.1:15001 or 127.0.0.1:15006 within 500ms (connection refused: nothing redirected it)"),
        "{stderr}"
    );

    // A probe port the rules deliberately leave alone is refused up front.
    let broken = Netns::new();
    let out = broken.veer(INJECTED, &["-o", "15002", "--probe-timeout", "300ms"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("choose another --iptables-probe-port"));

    // Once the rules are in, the validation container's way (as the proxy
    // uid, no capabilities at all) passes.
    ns.veer_ok(INJECTED, &["--skip-validation"]);
    let out = ns
        .cmd(&[
            "setpriv",
            "--reuid=1337",
            "--regid=1337",
            "--clear-groups",
            "--inh-caps=-all",
            VEER_INIT,
            "--run-validation",
            "--skip-rule-apply",
        ])
        .output()
        .expect("run veer-init as 1337");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("capture self-check passed for IPv4"));

    // Without CAP_SETUID/CAP_SETGID, root cannot probe as uid 1337: the
    // default install warns and succeeds, --run-validation fails.
    let nocaps = |extra: &[&str]| {
        let mut cmd = ns.cmd(&[
            "setpriv",
            "--inh-caps=-all",
            "--bounding-set=-setuid,-setgid",
            VEER_INIT,
        ]);
        cmd.args(INJECTED)
            .args(extra)
            .output()
            .expect("run veer-init")
    };
    let out = nocaps(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("warning: capture self-check skipped"));
    let out = nocaps(&["--run-validation"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("add SETUID and SETGID"),
        "{}",
        text(&out.stderr)
    );

    // The proxy's ports taken (the proxy already runs): skipped, not failed.
    let _proxy = ns.enter(|| TcpListener::bind("127.0.0.1:15006").expect("bind 15006"));
    let out = ns.veer_ok(INJECTED, &[]);
    assert!(text(&out.stderr).contains("127.0.0.1:15006 is already in use"));
}
