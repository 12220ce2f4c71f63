//! End-to-end harness: Kubernetes-like pods made of Linux network namespaces.
//!
//! A [`Cluster`] is one "node" network namespace holding a Linux bridge (`br0`) plus any number
//! of [`Pod`]s. A pod is a network namespace whose `eth0` is one end of a veth pair; the other
//! end lives in the node namespace and is enslaved to the bridge. Both ends are created directly
//! in their target namespaces (`ip link add eth0 netns POD type veth peer name vN netns NODE`),
//! so nothing — not even for an instant — is created in the root namespace and interface names
//! cannot collide between tests running in parallel.
//!
//! Isolation is the safety property: pods route by default via the node's bridge address, and
//! the node namespace has no route out (its default route is `unreachable`, so a stray packet
//! gets an immediate ICMP error instead of a slow timeout). A packet to a Service ClusterIP that
//! capture fails to catch therefore dies inside namespaces the test created; the tests never
//! send anything to an address outside them.
//!
//! Unique names: every namespace is called `veer-<tag>-<pid>-<n>-<role>` where `<pid>` is the
//! test process id and `<n>` a per-process counter, so parallel tests in one process and
//! parallel test processes (or `scripts/demo.sh`, which uses `veer-demo-<pid>-…`) never share a
//! name. Each cluster also gets its own /24, `10.<200 + pid % 50>.<n % 256>.0/24` (node bridge
//! `.1`, pods from `.10`). Because clusters share no link, route or namespace, two clusters
//! that happened to get the same /24 would still not see each other; the per-cluster subnet
//! only keeps logs and packet captures unambiguous.
//!
//! Cleanup runs on `Drop`, also while unwinding from a failed assertion: every [`Proc`] kills
//! its process group and reaps the child (printing the tail of its log if the test is
//! panicking); the [`Cluster`] then SIGKILLs anything still running in its namespaces
//! (`ip netns pids`), deletes the namespaces and removes its scratch directory (kept when
//! `VEER_E2E_KEEP=1`).
//!
//! Everything is bounded: connects and reads time out after [`IO_TIMEOUT`], polling loops have
//! deadlines, and helper commands are killed when they overrun.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::CloneFlags;

/// Bound for every connect, read and write the harness does.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound for helper commands (`ip`, `iptables-save`, `veer-init`, `veer client` …).
pub const CMD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a proxy may take to answer `GET /ready` with 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The proxy's uid/gid, as in Istio's injected sidecar.
pub const PROXY_UID: u32 = 1337;
pub const ADMIN_PORT: u16 = 15000;

/// The flags `istioctl kube-inject` gives istio-iptables for a default sidecar.
pub const INJECTED_INIT_FLAGS: &[&str] = &[
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

static CLUSTER_COUNTER: AtomicU32 = AtomicU32::new(0);
/// `ip netns add` mounts /run/netns on first use; concurrent first uses can race, so the
/// harness serialises namespace creation within the process (and retries across processes).
static NETNS_LOCK: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// Binaries and prerequisites

/// The `veer` binary cargo built for this test run.
pub fn veer_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_veer"))
}

/// `veer-init` lives in another package of the workspace, so cargo does not hand its path to
/// this crate's tests. It is looked up next to the `veer` binary (`target/<profile>/`), and
/// built there once (`cargo build -p veer-init` with the same profile and target dir) if
/// missing. `VEER_INIT_BIN` overrides the lookup.
pub fn veer_init_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("VEER_INIT_BIN") {
            return PathBuf::from(p);
        }
        let veer = veer_bin();
        let profile_dir = veer
            .parent()
            .expect("veer binary has a parent dir")
            .to_path_buf();
        let init = profile_dir.join("veer-init");
        if !init.exists() {
            let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
                Some("debug") | None => "dev".to_string(),
                Some(other) => other.to_string(),
            };
            let target_dir = profile_dir.parent().expect("profile dir has a parent");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            eprintln!(
                "[harness] building veer-init ({profile}) into {}",
                target_dir.display()
            );
            let status = Command::new(cargo)
                .args([
                    "build",
                    "-p",
                    "veer-init",
                    "--profile",
                    &profile,
                    "--target-dir",
                ])
                .arg(target_dir)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .status()
                .expect("run cargo build -p veer-init");
            assert!(
                status.success(),
                "cargo build -p veer-init failed: {status}"
            );
            assert!(
                init.exists(),
                "cargo built veer-init but {} is missing",
                init.display()
            );
        }
        init
    })
    .clone()
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(
            ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .iter()
                .map(PathBuf::from),
        )
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Panics with an actionable message unless the test runs as root with the tools it needs.
pub fn require_prerequisites() {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECK.get_or_init(|| {
        if !nix::unistd::Uid::effective().is_root() {
            return Err(
                "the end-to-end tests create network namespaces and iptables rules and \
                        must run as root (use `sudo bash scripts/test.sh`)"
                    .into(),
            );
        }
        let missing: Vec<&str> = [
            "ip",
            "iptables",
            "iptables-save",
            "setpriv",
            "kill",
            "sysctl",
        ]
        .into_iter()
        .filter(|t| find_in_path(t).is_none())
        .collect();
        if !missing.is_empty() {
            return Err(format!(
                "missing tools {missing:?}: run `bash scripts/install-deps.sh` (Debian packages \
                 iproute2 iptables util-linux procps)"
            ));
        }
        Ok(())
    });
    if let Err(msg) = result {
        panic!("e2e prerequisites not met: {msg}");
    }
}

// ---------------------------------------------------------------------------------------------
// Running commands with a deadline

/// Runs `cmd` to completion, capturing stdout/stderr; kills it after `timeout`.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> io::Result<Output> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))?;
    let mut out = child.stdout.take().expect("piped stdout");
    let mut err = child.stderr.take().expect("piped stderr");
    let out_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let err_reader = thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = err.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            kill_group(child.id(), "KILL");
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{what} did not finish within {timeout:?}"),
            ));
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// Runs a command that must succeed; panics with its output otherwise.
pub fn must(cmd: Command) -> Output {
    let what = format!("{cmd:?}");
    let out = run_with_timeout(cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip(args: &[&str]) -> Output {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    must(cmd)
}

fn kill_group(pgid: u32, signal: &str) {
    // `kill -SIG -- -PGID` signals the whole process group (the child was made a group leader).
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn kill_pid(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A child process running in a pod. Dropping it kills its process group and reaps it.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    status: Option<ExitStatus>,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(st)) = child.try_wait() {
                    self.status = Some(st);
                }
            }
        }
        self.status
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL to the process group, then reap.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if self.status.is_none() {
                kill_group(child.id(), "KILL");
                let _ = child.kill();
                if let Ok(st) = child.wait() {
                    self.status = Some(st);
                }
            }
        }
    }

    /// SIGTERM, a grace period, then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.is_running() {
            kill_pid(self.pid(), "TERM");
            if self.wait_timeout(grace).is_none() {
                self.kill();
            }
        }
        self.status
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    fn dump_tail(&self) {
        let tail = |s: String| {
            let lines: Vec<&str> = s.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        eprintln!(
            "----- {} (pid {}, {:?}) stdout tail -----\n{}\n----- {} stderr tail -----\n{}",
            self.name,
            self.pid(),
            self.status,
            tail(self.stdout()),
            self.name,
            tail(self.stderr())
        );
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            self.dump_tail();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Cluster

/// One node namespace with a bridge, plus its pods. See the module docs.
pub struct Cluster {
    pub tag: String,
    /// Name prefix shared by all namespaces of this cluster: `veer-<tag>-<pid>-<n>`.
    pub prefix: String,
    pub node: String,
    /// First three octets of this cluster's /24.
    net: [u8; 3],
    next_host: u8,
    pods: Vec<String>,
    /// Scratch directory for configs and process logs (world-readable: the proxy runs as 1337).
    pub dir: PathBuf,
    proc_counter: AtomicU32,
}

impl Cluster {
    /// Creates the node namespace and bridge. `tag` names the test in namespace names.
    pub fn new(tag: &str) -> Cluster {
        require_prerequisites();
        let pid = std::process::id();
        let n = CLUSTER_COUNTER.fetch_add(1, Ordering::SeqCst);
        let tag: String = tag
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let prefix = format!("veer-{tag}-{pid}-{n}");
        let net = [10, 200 + (pid % 50) as u8, (n % 256) as u8];
        let dir = std::env::temp_dir().join(&prefix);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create scratch dir");
        set_mode(&dir, 0o755);
        let node = format!("{prefix}-node");
        let mut cluster = Cluster {
            tag,
            prefix,
            node: node.clone(),
            net,
            next_host: 10,
            pods: Vec::new(),
            dir,
            proc_counter: AtomicU32::new(0),
        };
        // From here on, Drop cleans up whatever was created, even if a step below fails.
        netns_add(&node);
        cluster.pods.push(node.clone()); // deleted last (see Drop)
        let bridge_addr = format!("{}/24", cluster.addr(1));
        ip(&["-n", &node, "link", "set", "lo", "up"]);
        ip(&["-n", &node, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &node, "addr", "add", &bridge_addr, "dev", "br0"]);
        ip(&["-n", &node, "link", "set", "br0", "up"]);
        // No way out of the node: anything not on the bridge gets an ICMP unreachable.
        ip(&["-n", &node, "route", "add", "unreachable", "default"]);
        let mut sysctl = Command::new("ip");
        sysctl.args([
            "netns",
            "exec",
            &node,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ]);
        must(sysctl);
        cluster
    }

    /// The address `10.a.b.host` in this cluster's /24.
    pub fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(self.net[0], self.net[1], self.net[2], host)
    }

    /// The node's bridge address: every pod's default gateway.
    pub fn gateway(&self) -> Ipv4Addr {
        self.addr(1)
    }

    /// Adds a pod (network namespace with `eth0` on the node bridge) and returns its handle.
    pub fn add_pod(&mut self, name: &str) -> Pod {
        let host = self.next_host;
        assert!(host < 250, "too many pods in one cluster");
        self.next_host += 1;
        let netns = format!("{}-{name}", self.prefix);
        let ip_addr = self.addr(host);
        netns_add(&netns);
        // Keep the node namespace last in the list so it is deleted after its pods.
        self.pods.insert(self.pods.len() - 1, netns.clone());
        let peer = format!("v{host}");
        ip(&["-n", &netns, "link", "set", "lo", "up"]);
        ip(&[
            "link", "add", "eth0", "netns", &netns, "type", "veth", "peer", "name", &peer, "netns",
            &self.node,
        ]);
        ip(&["-n", &self.node, "link", "set", &peer, "master", "br0"]);
        ip(&["-n", &self.node, "link", "set", &peer, "up"]);
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{ip_addr}/24"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", &netns, "link", "set", "eth0", "up"]);
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            &self.gateway().to_string(),
        ]);
        Pod {
            name: name.to_string(),
            netns,
            ip: ip_addr,
            dir: self.dir.clone(),
            counter: std::sync::Arc::new(AtomicU32::new(0)),
        }
    }

    /// Creates (empty) `<scratch>/<name>/` for config files, readable by the proxy user.
    pub fn config_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.join(name);
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).expect("create config dir");
        set_mode(&d, 0o755);
        d
    }

    /// Names of every namespace of this cluster (pods first, node last).
    pub fn namespaces(&self) -> Vec<String> {
        self.pods.clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for ns in &self.pods {
            // Anything still running in the namespace (a forgotten child, a grandchild).
            if let Ok(out) = run_with_timeout(
                {
                    let mut c = Command::new("ip");
                    c.args(["netns", "pids", ns]);
                    c
                },
                CMD_TIMEOUT,
            ) {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<u32>() {
                        kill_pid(pid, "KILL");
                    }
                }
            }
        }
        for ns in &self.pods {
            let mut ok = false;
            for _ in 0..20 {
                let st = Command::new("ip")
                    .args(["netns", "del", ns])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
                if matches!(st, Ok(s) if s.success()) || !Path::new("/run/netns").join(ns).exists()
                {
                    ok = true;
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
            if !ok {
                eprintln!("[harness] warning: could not delete network namespace {ns}");
            }
        }
        if std::env::var_os("VEER_E2E_KEEP").is_some() {
            eprintln!("[harness] keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn netns_add(name: &str) {
    let _guard = NETNS_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let mut last = String::new();
    for _ in 0..10 {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "add", name]);
        match run_with_timeout(cmd, CMD_TIMEOUT) {
            Ok(out) if out.status.success() => return,
            Ok(out) => last = String::from_utf8_lossy(&out.stderr).into_owned(),
            Err(e) => last = e.to_string(),
        }
        thread::sleep(Duration::from_millis(100));
    }
    panic!("ip netns add {name} failed: {last}");
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).expect("chmod");
}

/// Writes `contents` to `path` (mode 0644, so the proxy user can read it).
pub fn write_file(path: &Path, contents: &str) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    set_mode(path, 0o644);
}

/// Replaces `path` atomically: writes a dot-file beside it (config loaders skip dot-entries)
/// and renames it over `path`, so a watching proxy never sees a half-written file.
pub fn replace_file(path: &Path, contents: &str) {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("file name");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    write_file(&tmp, contents);
    fs::rename(&tmp, path).unwrap_or_else(|e| panic!("rename onto {}: {e}", path.display()));
}

// ---------------------------------------------------------------------------------------------
// Pod

/// A pod: a network namespace with one address on the cluster bridge.
#[derive(Clone)]
pub struct Pod {
    pub name: String,
    /// Network namespace name (`/run/netns/<netns>`).
    pub netns: String,
    pub ip: Ipv4Addr,
    dir: PathBuf,
    counter: std::sync::Arc<AtomicU32>,
}

impl Pod {
    pub fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ip), port)
    }

    /// `ip netns exec <ns> [prefix...] prog args...` as a Command.
    fn command(&self, prefix: &[String], prog: &Path, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns])
            .args(prefix)
            .arg(prog)
            .args(args);
        cmd
    }

    fn setpriv(uid: u32, gid: u32) -> Vec<String> {
        vec![
            "setpriv".into(),
            "--reuid".into(),
            uid.to_string(),
            "--regid".into(),
            gid.to_string(),
            "--clear-groups".into(),
        ]
    }

    fn spawn_cmd(&self, label: &str, mut cmd: Command) -> Proc {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let stdout_path = self.dir.join(format!("{}.{n}.{label}.out", self.name));
        let stderr_path = self.dir.join(format!("{}.{n}.{label}.err", self.name));
        let out = File::create(&stdout_path).expect("create stdout log");
        let err = File::create(&stderr_path).expect("create stderr log");
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let what = format!("{cmd:?}");
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        Proc {
            name: format!("{}/{label}", self.name),
            child: Some(child),
            status: None,
            stdout_path,
            stderr_path,
        }
    }

    /// Starts `prog args...` as root inside the pod; output goes to log files.
    pub fn spawn(&self, prog: impl AsRef<Path>, args: &[&str]) -> Proc {
        let label = label_of(prog.as_ref(), args);
        self.spawn_cmd(&label, self.command(&[], prog.as_ref(), args))
    }

    /// Starts `prog args...` inside the pod as `uid:gid` with no supplementary groups.
    pub fn spawn_as(&self, uid: u32, gid: u32, prog: impl AsRef<Path>, args: &[&str]) -> Proc {
        let label = format!("{}-as{uid}", label_of(prog.as_ref(), args));
        self.spawn_cmd(
            &label,
            self.command(&Self::setpriv(uid, gid), prog.as_ref(), args),
        )
    }

    /// Runs `prog args...` as root in the pod to completion (bounded by [`CMD_TIMEOUT`]).
    pub fn output(&self, prog: impl AsRef<Path>, args: &[&str]) -> Output {
        let cmd = self.command(&[], prog.as_ref(), args);
        run_with_timeout(cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Pod::output`] but as `uid:gid`.
    pub fn output_as(&self, uid: u32, gid: u32, prog: impl AsRef<Path>, args: &[&str]) -> Output {
        let cmd = self.command(&Self::setpriv(uid, gid), prog.as_ref(), args);
        run_with_timeout(cmd, CMD_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Runs a command that must succeed and returns its stdout.
    pub fn run(&self, prog: impl AsRef<Path>, args: &[&str]) -> String {
        let cmd = self.command(&[], prog.as_ref(), args);
        String::from_utf8_lossy(&must(cmd).stdout).into_owned()
    }

    /// Opens a TCP connection *from this pod*: the socket is created by a thread that entered
    /// the pod's network namespace, and keeps that namespace for its whole life, so it can be
    /// used from any thread afterwards. It is subject to the pod's iptables rules like any
    /// root-owned application socket. Connect, read and write are bounded by [`IO_TIMEOUT`].
    pub fn connect(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let ns_path = Path::new("/run/netns").join(&self.netns);
        thread::spawn(move || -> io::Result<TcpStream> {
            let ns = File::open(&ns_path)?;
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
            stream.set_read_timeout(Some(IO_TIMEOUT))?;
            stream.set_write_timeout(Some(IO_TIMEOUT))?;
            Ok(stream)
        })
        .join()
        .map_err(|_| io::Error::other("connect thread panicked"))?
    }

    /// Binds a TCP listener *inside this pod's namespace* (same trick as [`Pod::connect`]).
    pub fn listen(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        let ns_path = Path::new("/run/netns").join(&self.netns);
        thread::spawn(move || -> io::Result<std::net::TcpListener> {
            let ns = File::open(&ns_path)?;
            nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            std::net::TcpListener::bind(addr)
        })
        .join()
        .map_err(|_| io::Error::other("listen thread panicked"))?
    }

    /// Connects to `addr`, writes each line + "\n", half-closes, and returns everything read
    /// until EOF — what `(date; sleep 1) | nc HOST PORT` does in the Istio task.
    pub fn exchange(&self, addr: SocketAddr, lines: &[&str]) -> io::Result<String> {
        let mut stream = self.connect(addr)?;
        let mut payload = String::new();
        for l in lines {
            payload.push_str(l);
            payload.push('\n');
        }
        stream.write_all(payload.as_bytes())?;
        stream.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(reply)
    }

    /// Polls until something accepts TCP connections at `addr` (seen from this pod).
    pub fn wait_listening(&self, addr: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.connect(addr) {
                Ok(_) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!(
                        "{addr} not accepting connections from {} after {timeout:?}: {e}",
                        self.name
                    )
                }
                Err(_) => thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// A minimal HTTP/1.1 request without a body from this pod (`Connection: close`).
    /// Returns (status, body).
    pub fn http_request(
        &self,
        method: &str,
        addr: SocketAddr,
        path: &str,
    ) -> io::Result<(u16, String)> {
        let mut stream = self.connect(addr)?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        )?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        parse_http_response(&raw)
    }

    /// `GET` from this pod. Returns (status, body).
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
        self.http_request("GET", addr, path)
    }

    /// GET against the pod's admin endpoint (127.0.0.1:15000 in the pod).
    pub fn admin_get(&self, path: &str) -> io::Result<(u16, String)> {
        self.http_get(SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), path)
    }

    /// POST (empty body) against the pod's admin endpoint.
    pub fn admin_post(&self, path: &str) -> io::Result<(u16, String)> {
        self.http_request("POST", SocketAddr::from(([127, 0, 0, 1], ADMIN_PORT)), path)
    }
}

fn label_of(prog: &Path, args: &[&str]) -> String {
    let base = prog.file_name().and_then(|n| n.to_str()).unwrap_or("proc");
    match args.first() {
        Some(a) if !a.starts_with('-') && a.chars().all(|c| c.is_ascii_alphanumeric()) => {
            format!("{base}-{a}")
        }
        _ => base.to_string(),
    }
}

/// Parses a complete HTTP/1.x response (content-length, chunked or read-to-EOF body).
pub fn parse_http_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: BTreeMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if headers
        .get("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("chunk"))?;
            let size_txt = String::from_utf8_lossy(&rest[..eol]);
            let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("chunk size"))?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size {
                return Err(bad("short chunk"));
            }
            out.extend_from_slice(&rest[..size]);
            rest = rest.get(size + 2..).unwrap_or(&[]);
        }
        body = out;
    } else if let Some(len) = headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

// ---------------------------------------------------------------------------------------------
// Sidecar: veer-init + veer proxy in a pod

/// Runs `veer-init` with the injected default flags in `pod` (as root) and asserts success.
pub fn install_capture(pod: &Pod) -> Output {
    let out = pod.output(veer_init_bin(), INJECTED_INIT_FLAGS);
    assert!(
        out.status.success(),
        "veer-init failed in {} ({}):\nstdout: {}\nstderr: {}",
        pod.name,
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A running `veer proxy` (uid 1337) in a pod.
pub struct Sidecar {
    pub proxy: Proc,
    pub pod: Pod,
}

impl Sidecar {
    /// Starts `veer proxy --config <each> --admin 127.0.0.1:15000 <extra>` as uid/gid 1337 in
    /// `pod` and waits until `GET /ready` answers 200. Does not install capture.
    pub fn start(pod: &Pod, configs: &[&Path], extra: &[&str]) -> Sidecar {
        let mut args: Vec<String> = vec!["proxy".into()];
        for c in configs {
            args.push("--config".into());
            args.push(c.display().to_string());
        }
        args.extend(["--admin".to_string(), format!("127.0.0.1:{ADMIN_PORT}")]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let proxy = pod.spawn_as(PROXY_UID, PROXY_UID, veer_bin(), &argv);
        let mut sidecar = Sidecar {
            proxy,
            pod: pod.clone(),
        };
        sidecar.wait_ready(READY_TIMEOUT);
        sidecar
    }

    /// Polls `GET /ready` until 200; fails early (with the proxy's stderr) if it exits.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last;
        loop {
            if let Some(st) = self.proxy.try_wait() {
                panic!(
                    "veer proxy in {} exited ({st}) before becoming ready:\n{}",
                    self.pod.name,
                    self.proxy.stderr()
                );
            }
            match self.pod.admin_get("/ready") {
                Ok((200, _)) => return,
                Ok((code, body)) => last = format!("HTTP {code}: {body}"),
                Err(e) => last = e.to_string(),
            }
            if Instant::now() >= deadline {
                panic!(
                    "veer proxy in {} not ready after {timeout:?} (last: {last}); stderr:\n{}",
                    self.pod.name,
                    self.proxy.stderr()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET /config_dump`, parsed as JSON.
    pub fn config_dump(&self) -> serde_json::Value {
        let (code, body) = self
            .pod
            .admin_get("/config_dump")
            .expect("GET /config_dump");
        assert_eq!(code, 200, "GET /config_dump: {body}");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("/config_dump is not JSON ({e}):\n{body}"))
    }
}

// ---------------------------------------------------------------------------------------------
// iptables helpers

/// `iptables-save -t nat` in `pod`, normalised for comparison: comments dropped, packet
/// counters zeroed, and a table holding nothing but empty built-in chains with ACCEPT policy
/// reported as empty (iptables-nft shows such a table once anything has touched it).
pub fn nat_rules(pod: &Pod) -> String {
    let raw = pod.run("iptables-save", &["-t", "nat"]);
    normalize_iptables_save(&raw)
}

pub fn normalize_iptables_save(raw: &str) -> String {
    const BUILTIN: [&str; 5] = [
        ":PREROUTING",
        ":INPUT",
        ":OUTPUT",
        ":POSTROUTING",
        ":FORWARD",
    ];
    let lines: Vec<String> = raw
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| match (l.starts_with(':'), l.rfind(" [")) {
            (true, Some(i)) => format!("{} [0:0]", &l[..i]),
            _ => l.to_string(),
        })
        .collect();
    let trivial = lines.iter().all(|l| {
        l == "*nat"
            || l == "COMMIT"
            || (BUILTIN.iter().any(|b| l.starts_with(&format!("{b} "))) && l.contains(" ACCEPT "))
    });
    if trivial {
        String::new()
    } else {
        lines.join("\n")
    }
}

/// Reply prefixes (first word of each line), e.g. `"one hello\n"` → `["one"]`.
pub fn prefixes(reply: &str) -> Vec<String> {
    reply
        .lines()
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect()
}
