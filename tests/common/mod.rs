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
pub use veer_init::flags::ISTIO_INJECTED_ARGS as INJECTED_INIT_FLAGS;

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
        Sidecar::launch(pod, configs, None, &[], extra)
    }

    /// [`Sidecar::start`] with the admin endpoint on `admin` when given (its port must stay
    /// [`ADMIN_PORT`] for the helpers), run under `launcher` when given: a command that sets
    /// something up and execs the proxy in place, e.g. `["prlimit", "--nofile=200:200"]`.
    pub fn launch(
        pod: &Pod,
        configs: &[&Path],
        admin: Option<&str>,
        launcher: &[&str],
        extra: &[&str],
    ) -> Sidecar {
        let mut args: Vec<String> = launcher.iter().map(|s| s.to_string()).collect();
        args.extend([veer_bin().display().to_string(), "proxy".into()]);
        for c in configs {
            args.push("--config".into());
            args.push(c.display().to_string());
        }
        let admin = admin.map_or_else(|| format!("127.0.0.1:{ADMIN_PORT}"), str::to_string);
        args.extend(["--admin".to_string(), admin]);
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let (prog, rest) = argv.split_first().expect("at least the proxy binary");
        let proxy = pod.spawn_as(PROXY_UID, PROXY_UID, prog, rest);
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

// =============================================================================================
// Shared by e2e_gateway, e2e_admin and e2e_reload (appended; the helpers above are unchanged).

/// The tcp-echo Service's ClusterIP in the sidecar tests (outside every cluster's pod /24).
pub const TCP_ECHO_CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 100);

/// `TCP_ECHO_CLUSTER_IP:port`.
pub fn tcp_echo_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(TCP_ECHO_CLUSTER_IP), port)
}

/// Starts `veer echo 9000,9001 PREFIX` (the sample's tcp-echo server) in `pod` and waits until
/// both ports accept connections.
pub fn start_tcp_echo(pod: &Pod, prefix: &str) -> Proc {
    let proc = pod.spawn(veer_bin(), &["echo", "9000,9001", prefix]);
    for port in [9000, 9001] {
        pod.wait_listening(pod.addr(port), Duration::from_secs(10));
    }
    proc
}

/// What the API server would say about the tcp-echo workloads: one `Pod` document per
/// `(pod, version)` with labels `app: tcp-echo, version: <version>` and `status.podIP`.
pub fn tcp_echo_pods_yaml(pods: &[(&Pod, &str)]) -> String {
    let mut y = String::new();
    for (pod, version) in pods {
        y.push_str(&format!(
            "---
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: tcp-echo, version: {version}}}
spec:
  containers:
  - name: tcp-echo
    image: docker.io/istio/tcp-echo-server:1.2
status:
  podIP: {ip}
  podIPs:
  - ip: {ip}
",
            name = pod.name,
            ip = pod.ip
        ));
    }
    y
}

/// The tcp-echo `Service` (ports 9000 `tcp`, 9001 `tcp-other`) with [`TCP_ECHO_CLUSTER_IP`].
pub fn tcp_echo_service_yaml() -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata:
  name: tcp-echo
  labels: {{app: tcp-echo, service: tcp-echo}}
spec:
  clusterIP: {TCP_ECHO_CLUSTER_IP}
  ports:
  - {{name: tcp, port: 9000}}
  - {{name: tcp-other, port: 9001}}
  selector: {{app: tcp-echo}}
"
    )
}

/// The sample's DestinationRule: subsets v1 / v2 by the `version` label.
pub const TCP_ECHO_DESTINATION_RULE: &str = "---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: tcp-echo-destination
spec:
  host: tcp-echo
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
";

/// A mesh VirtualService `name` for host `tcp-echo`: one `tcp` rule matching `port`, routing
/// to the weighted subsets (destination port `port`).
pub fn tcp_echo_virtual_service(name: &str, port: u16, routes: &[(&str, u32)]) -> String {
    let mut y = format!(
        "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: {name}
spec:
  hosts:
  - tcp-echo
  tcp:
  - match:
    - port: {port}
    route:
"
    );
    for (subset, weight) in routes {
        y.push_str(&format!(
            "    - destination:
        host: tcp-echo
        port:
          number: {port}
        subset: {subset}
      weight: {weight}
"
        ));
    }
    y
}

/// Polls `f` every 50 ms until it returns `Some`, panicking with `what` after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// `GET path` on the pod's admin endpoint; asserts 200 and parses the body as JSON.
pub fn admin_json(pod: &Pod, path: &str) -> serde_json::Value {
    let (code, body) = pod
        .admin_get(path)
        .unwrap_or_else(|e| panic!("GET {path} in {}: {e}", pod.name));
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path} is not JSON ({e}):\n{body}"))
}

/// Reads from `stream` until EOF, reset or timeout. Returns the bytes and how it ended
/// (`Ok(())` for EOF).
pub fn read_until_closed(stream: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return (buf, Ok(())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return (buf, Err(e)),
        }
    }
}

/// Asserts the peer closed `stream` (EOF or reset) without sending a byte, within the
/// stream's read timeout ([`IO_TIMEOUT`] for pod sockets): a timeout fails, since a proxy
/// that just sits on the connection has not refused it.
pub fn assert_closed_without_reply(stream: &mut TcpStream, what: &str) {
    let (got, end) = read_until_closed(stream);
    assert!(
        got.is_empty(),
        "{what}: expected the connection to be closed without a reply, got {:?}",
        String::from_utf8_lossy(&got)
    );
    if let Err(e) = end {
        assert!(
            matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
            ),
            "{what}: expected the connection to be closed, but reading ended with {e} ({:?})",
            e.kind()
        );
    }
}

/// A TLS record carrying a ClientHello (RFC 8446 §4.1.2, TLS 1.3 with the legacy 1.2 version
/// fields) with an optional `server_name` extension (RFC 6066 §3), as a client would send it.
pub fn tls_client_hello(sni: Option<&str>) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut exts = Vec::new();
    if let Some(name) = sni {
        let mut list = vec![0u8]; // host_name
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name.as_bytes());
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        ext(&mut exts, 0x0000, &data);
    }
    ext(&mut exts, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // supported_groups
    ext(&mut exts, 0x000d, &[0, 4, 0x04, 0x03, 0x08, 0x04]); // signature_algorithms
    ext(&mut exts, 0x002b, &[4, 0x03, 0x04, 0x03, 0x03]); // supported_versions
    let mut key_share = vec![0, 36, 0x00, 0x1d, 0, 32];
    key_share.extend((0..32u8).map(|i| i.wrapping_mul(7).wrapping_add(3)));
    ext(&mut exts, 0x0033, &key_share);
    let mut body = vec![3, 3];
    body.extend((0..32u8).map(|i| i.wrapping_mul(13).wrapping_add(1))); // random
    body.push(32); // legacy_session_id
    body.extend((0..32u8).map(|i| i.wrapping_mul(5).wrapping_add(9)));
    body.extend_from_slice(&[0, 6, 0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]); // cipher suites
    body.extend_from_slice(&[1, 0]); // null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut msg = vec![0x01]; // client_hello
    msg.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    msg.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01]; // handshake, legacy record version TLS 1.0
    record.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    record.extend_from_slice(&msg);
    record
}

/// `GET /stats/prometheus` from the pod's admin endpoint, checked line by line against the
/// text exposition format (every line a `# HELP` / `# TYPE` / `# UNIT` comment, a sample
/// `name{label="value",...} number`, or the final `# EOF`), then parsed with the
/// `prometheus-parse` crate. Returns the parsed scrape and the raw text.
pub fn scrape_prometheus(pod: &Pod, path: &str) -> (prometheus_parse::Scrape, String) {
    let (code, text) = pod
        .admin_get(path)
        .unwrap_or_else(|e| panic!("GET {path} in {}: {e}", pod.name));
    assert_eq!(code, 200, "GET {path}: {text}");
    check_exposition_format(&text);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines)
        .unwrap_or_else(|e| panic!("{path} does not parse: {e}\n{text}"));
    let sample_lines = text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count();
    assert_eq!(
        scrape.samples.len(),
        sample_lines,
        "prometheus-parse kept {} samples of {sample_lines} sample lines:\n{text}",
        scrape.samples.len()
    );
    (scrape, text)
}

fn check_exposition_format(text: &str) {
    let is_name = |s: &str| {
        !s.is_empty()
            && s.chars().enumerate().all(|(i, c)| {
                c == '_' || c == ':' || c.is_ascii_alphabetic() || (i > 0 && c.is_ascii_digit())
            })
    };
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let bad = |why: &str| -> ! { panic!("metrics line {}: {why}: {line:?}\n{text}", i + 1) };
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("EOF"), None, None) => {
                    if i + 1 != lines.len() {
                        bad("# EOF before the end");
                    }
                }
                (Some("HELP"), Some(n), _) if is_name(n) => {}
                (Some("UNIT"), Some(n), _) if is_name(n) => {}
                (Some("TYPE"), Some(n), Some(t)) if is_name(n) => {
                    if ![
                        "counter",
                        "gauge",
                        "histogram",
                        "summary",
                        "unknown",
                        "untyped",
                        "info",
                        "stateset",
                        "gaugehistogram",
                    ]
                    .contains(&t)
                    {
                        bad("unknown metric type");
                    }
                }
                _ => bad("unknown comment"),
            }
            continue;
        }
        // name{labels} value [timestamp]
        let (name_labels, value) = match line.rfind('}') {
            Some(end) => (&line[..=end], line[end + 1..].trim()),
            None => match line.split_once(' ') {
                Some((n, v)) => (n, v.trim()),
                None => bad("no value"),
            },
        };
        let name = name_labels.split('{').next().unwrap_or("");
        if !is_name(name) {
            bad("bad metric name");
        }
        if let Some(labels) = name_labels
            .strip_prefix(name)
            .and_then(|l| l.strip_prefix('{'))
        {
            let labels = labels.strip_suffix('}').unwrap_or_else(|| bad("labels"));
            let mut rest = labels;
            while !rest.is_empty() {
                let (k, after) = rest.split_once("=\"").unwrap_or_else(|| bad("label"));
                if !is_name(k) || k.contains(':') {
                    bad("bad label name");
                }
                // The value runs to the next unescaped quote.
                let mut end = None;
                let mut escaped = false;
                for (j, c) in after.char_indices() {
                    match (escaped, c) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => {
                            end = Some(j);
                            break;
                        }
                        _ => {}
                    }
                }
                let end = end.unwrap_or_else(|| bad("unterminated label value"));
                rest = &after[end + 1..];
                rest = rest.strip_prefix(',').unwrap_or(rest);
            }
        }
        let number = value.split_whitespace().next().unwrap_or("");
        if number.parse::<f64>().is_err() && !["NaN", "+Inf", "-Inf"].contains(&number) {
            bad("value is not a number");
        }
    }
}

/// The value of a parsed sample, whatever its type.
pub fn sample_value(s: &prometheus_parse::Sample) -> f64 {
    match &s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{}: unexpected value {other:?}", s.metric),
    }
}

/// Sum of the samples named `metric` whose labels satisfy `keep`.
pub fn metric_sum(
    scrape: &prometheus_parse::Scrape,
    metric: &str,
    keep: impl Fn(&prometheus_parse::Labels) -> bool,
) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && keep(&s.labels))
        .map(sample_value)
        .sum()
}

/// What an [`EchoSession`] did, once finished.
#[derive(Debug, Clone)]
pub struct SessionReport {
    /// The backend's prefix (`one`, `two`): the same for every reply of the connection.
    pub prefix: String,
    /// Lines sent, each of which was answered.
    pub lines: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

/// A long-lived connection to a tcp-echo backend: after a first line answered synchronously
/// (so [`EchoSession::prefix`] is known at once), a thread sends a line every `interval`
/// and checks each reply is `<prefix> <line>`, with the same prefix throughout (a connection
/// never moves to another backend). [`EchoSession::finish`] sends a last line, half-closes and
/// expects exactly that reply and then EOF.
pub struct EchoSession {
    pub tag: String,
    prefix: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    echoed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    handle: Option<thread::JoinHandle<Result<SessionReport, String>>>,
}

impl EchoSession {
    /// Connects from `pod` to `addr` and starts the session; `Err` if the connection or the
    /// first exchange fails.
    pub fn start(pod: &Pod, addr: SocketAddr, tag: &str, interval: Duration) -> io::Result<Self> {
        use std::io::BufRead;
        let stream = pod.connect(addr)?;
        stream.set_nodelay(true)?;
        let mut reader = io::BufReader::new(stream.try_clone()?);
        let mut writer = stream;
        let first = format!("{tag} 0\n");
        writer.write_all(first.as_bytes())?;
        let mut reply = String::new();
        reader.read_line(&mut reply)?;
        let prefix = match reply.strip_suffix(&first) {
            Some(p) if p.ends_with(' ') && !p.trim().is_empty() => p.trim().to_string(),
            _ => {
                return Err(io::Error::other(format!(
                    "{tag}: unexpected first reply {reply:?}"
                )))
            }
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let echoed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
        let (t_stop, t_echoed, t_tag, t_prefix) = (
            stop.clone(),
            echoed.clone(),
            tag.to_string(),
            prefix.clone(),
        );
        let mut bytes_sent = first.len() as u64;
        let mut bytes_received = reply.len() as u64;
        let handle = thread::spawn(move || -> Result<SessionReport, String> {
            let mut n: u64 = 1;
            let mut exchange = |line: &str, last: bool| -> Result<(), String> {
                let err = |what: &str, e: io::Error| {
                    format!("{t_tag}: {what} {line:?} failed: {e} ({:?})", e.kind())
                };
                writer
                    .write_all(line.as_bytes())
                    .map_err(|e| err("writing", e))?;
                bytes_sent += line.len() as u64;
                if last {
                    writer
                        .shutdown(Shutdown::Write)
                        .map_err(|e| err("half-closing after", e))?;
                }
                let mut reply = String::new();
                reader
                    .read_line(&mut reply)
                    .map_err(|e| err("reading the reply to", e))?;
                bytes_received += reply.len() as u64;
                let want = format!("{t_prefix} {line}");
                if reply != want {
                    return Err(format!("{t_tag}: expected {want:?}, got {reply:?}"));
                }
                Ok(())
            };
            loop {
                let deadline = Instant::now() + interval;
                while Instant::now() < deadline {
                    if t_stop.load(Ordering::SeqCst) {
                        break;
                    }
                    thread::sleep(Duration::from_millis(10).min(interval));
                }
                let last = t_stop.load(Ordering::SeqCst);
                let line = format!("{t_tag} {n}{}\n", if last { " last" } else { "" });
                exchange(&line, last)?;
                n += 1;
                t_echoed.store(n, Ordering::SeqCst);
                if last {
                    break;
                }
            }
            let mut rest = Vec::new();
            match reader.read_to_end(&mut rest) {
                Ok(_) if rest.is_empty() => {}
                Ok(_) => {
                    return Err(format!(
                        "{t_tag}: unexpected bytes after the last reply: {:?}",
                        String::from_utf8_lossy(&rest)
                    ))
                }
                Err(e) => {
                    return Err(format!(
                        "{t_tag}: waiting for EOF after the last reply: {e} ({:?})",
                        e.kind()
                    ))
                }
            }
            Ok(SessionReport {
                prefix: t_prefix,
                lines: n,
                bytes_sent,
                bytes_received,
            })
        });
        Ok(EchoSession {
            tag: tag.to_string(),
            prefix,
            stop,
            echoed,
            handle: Some(handle),
        })
    }

    /// The prefix of the backend this connection reached.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Lines answered so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::SeqCst)
    }

    /// `false` once the session thread has ended (it only ends early on an error).
    pub fn is_alive(&self) -> bool {
        self.handle.as_ref().is_some_and(|h| !h.is_finished())
    }

    /// Sends the last line, half-closes and waits for its reply and EOF.
    pub fn finish(mut self) -> Result<SessionReport, String> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle
            .take()
            .expect("session running")
            .join()
            .unwrap_or_else(|_| Err(format!("{}: session thread panicked", self.tag)))
    }
}

impl Drop for EchoSession {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The sidecar topology of the traffic-shifting task: a client pod `sleep` (capture + sidecar
/// when started with [`MeshWorld::start_sidecar`]) and `tcp-echo-v1` / `tcp-echo-v2` pods
/// running `veer echo 9000,9001 one|two`. Field order matters: processes are killed before
/// the cluster is torn down.
pub struct MeshWorld {
    pub echo: Vec<Proc>,
    pub client: Pod,
    pub v1: Pod,
    pub v2: Pod,
    pub cluster: Cluster,
}

impl MeshWorld {
    pub fn new(tag: &str) -> MeshWorld {
        let mut cluster = Cluster::new(tag);
        let client = cluster.add_pod("sleep");
        let v1 = cluster.add_pod("tcp-echo-v1");
        let v2 = cluster.add_pod("tcp-echo-v2");
        let echo = vec![start_tcp_echo(&v1, "one"), start_tcp_echo(&v2, "two")];
        MeshWorld {
            echo,
            client,
            v1,
            v2,
            cluster,
        }
    }

    /// The Service plus the Pods (v2's only when `with_v2`).
    pub fn endpoints_yaml(&self, with_v2: bool) -> String {
        let mut pods = vec![(&self.v1, "v1")];
        if with_v2 {
            pods.push((&self.v2, "v2"));
        }
        format!("{}{}", tcp_echo_service_yaml(), tcp_echo_pods_yaml(&pods))
    }

    /// Writes `endpoints.yaml` (both pods), `destination-rule.yaml` and
    /// `virtual-service.yaml` into a fresh config dir `name` and returns it.
    pub fn config_dir(&self, name: &str, virtual_service: &str) -> PathBuf {
        let dir = self.cluster.config_dir(name);
        write_file(&dir.join("endpoints.yaml"), &self.endpoints_yaml(true));
        write_file(
            &dir.join("destination-rule.yaml"),
            TCP_ECHO_DESTINATION_RULE,
        );
        write_file(&dir.join("virtual-service.yaml"), virtual_service);
        dir
    }

    /// Installs capture in the client pod and starts its sidecar (`--pod-labels app=sleep`
    /// plus `extra`), waiting for `/ready`.
    pub fn start_sidecar(&self, configs: &[&Path], extra: &[&str]) -> Sidecar {
        install_capture(&self.client);
        let mut args = vec!["--pod-labels", "app=sleep"];
        args.extend_from_slice(extra);
        Sidecar::start(&self.client, configs, &args)
    }

    /// `n` sequential one-line connections to tcp-echo:`port` from the client pod; returns
    /// each reply's prefix after checking the reply is exactly `<prefix> <line>\n`.
    pub fn prefixes(&self, port: u16, n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let line = format!("hello {i}");
                let reply = self
                    .client
                    .exchange(tcp_echo_addr(port), &[&line])
                    .unwrap_or_else(|e| panic!("connection {i} to tcp-echo:{port} failed: {e}"));
                match reply.split_once(' ') {
                    Some((p, rest))
                        if (p == "one" || p == "two") && rest == format!("{line}\n") =>
                    {
                        p.to_string()
                    }
                    _ => panic!("connection {i} to tcp-echo:{port}: unexpected reply {reply:?}"),
                }
            })
            .collect()
    }
}

/// How many of `prefixes` are `want`.
pub fn count_of(prefixes: &[String], want: &str) -> usize {
    prefixes.iter().filter(|p| *p == want).count()
}

// =============================================================================================
// Shared by e2e_reliability (appended; the helpers above are unchanged).

/// Raises this test process's soft open-file limit to `want` (at most the hard limit) and
/// returns the soft limit in force. Children spawned afterwards (echo servers) inherit it.
pub fn raise_nofile_soft_limit(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit NOFILE");
    let target = want.min(hard);
    if soft < target {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard).expect("setrlimit NOFILE");
        return target;
    }
    soft
}

/// `n` connections to `addr` from `pod`, opened one after another by one thread inside the
/// pod's network namespace (like [`Pod::connect`], without a thread per connection). Each
/// connect is bounded by [`IO_TIMEOUT`]; reads and writes get `IO_TIMEOUT` too.
pub fn connect_many(pod: &Pod, addr: SocketAddr, n: usize) -> Vec<io::Result<TcpStream>> {
    let ns_path = Path::new("/run/netns").join(&pod.netns);
    thread::spawn(move || -> Vec<io::Result<TcpStream>> {
        let ns = match File::open(&ns_path) {
            Ok(ns) => ns,
            Err(e) => return vec![Err(e)],
        };
        if let Err(e) = nix::sched::setns(&ns, CloneFlags::CLONE_NEWNET) {
            return vec![Err(io::Error::from(e))];
        }
        (0..n)
            .map(|_| {
                let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                s.set_nodelay(true)?;
                Ok(s)
            })
            .collect()
    })
    .join()
    .unwrap_or_else(|_| vec![Err(io::Error::other("connect thread panicked"))])
}

/// Starts `prog args...` as root inside `pod` with extra environment variables.
pub fn spawn_with_env(
    pod: &Pod,
    prog: impl AsRef<Path>,
    args: &[&str],
    env: &[(&str, &str)],
) -> Proc {
    let label = label_of(prog.as_ref(), args);
    let mut cmd = pod.command(&[], prog.as_ref(), args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    pod.spawn_cmd(&label, cmd)
}

/// Open descriptors of a process by kind, from `/proc/PID/fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FdCounts {
    pub sockets: usize,
    pub pipes: usize,
    pub other: usize,
}

impl FdCounts {
    pub fn total(&self) -> usize {
        self.sockets + self.pipes + self.other
    }
}

/// Counts the open descriptors of `pid` (as root, any process).
pub fn fd_counts(pid: u32) -> FdCounts {
    let dir = format!("/proc/{pid}/fd");
    let mut c = FdCounts::default();
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {dir}: {e}")) {
        let Ok(entry) = entry else { continue };
        match fs::read_link(entry.path()) {
            Ok(target) => {
                let t = target.to_string_lossy();
                if t.starts_with("socket:") {
                    c.sockets += 1;
                } else if t.starts_with("pipe:") {
                    c.pipes += 1;
                } else {
                    c.other += 1;
                }
            }
            Err(_) => continue, // closed while listing
        }
    }
    c
}

/// Sends `signal` (e.g. `TERM`) to the process itself (not its group).
pub fn signal_proc(p: &Proc, signal: &str) {
    kill_pid(p.pid(), signal);
}

/// A `Service` `name` with `cluster_ip` and one TCP port (`selector: app=<name>`), plus one
/// `Pod` per `(pod name, ip)` labelled `app: <name>`: a service whose backends are whatever
/// listens at `ip:port` (a thread of the test process, a helper program …).
pub fn service_with_pods_yaml(
    name: &str,
    cluster_ip: Ipv4Addr,
    port: u16,
    pods: &[(&str, Ipv4Addr)],
) -> String {
    let mut y = format!(
        "---
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  clusterIP: {cluster_ip}
  ports:
  - {{name: tcp, port: {port}}}
  selector: {{app: {name}}}
"
    );
    for (pod, ip) in pods {
        y.push_str(&format!(
            "---
apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  labels: {{app: {name}}}
spec:
  containers:
  - name: main
    image: example/none
status:
  podIP: {ip}
"
        ));
    }
    y
}

/// The cluster of `/clusters` whose name contains `needle` (e.g. `"|9000|v1|"`).
pub fn find_cluster(clusters: &serde_json::Value, needle: &str) -> serde_json::Value {
    let found = match clusters {
        serde_json::Value::Object(m) => m
            .iter()
            .find(|(k, _)| k.contains(needle))
            .map(|(_, v)| v.clone()),
        serde_json::Value::Array(a) => a
            .iter()
            .find(|c| c["name"].as_str().is_some_and(|n| n.contains(needle)))
            .cloned(),
        _ => None,
    };
    found.unwrap_or_else(|| panic!("no cluster matching {needle:?} in /clusters: {clusters}"))
}

/// The endpoint of `cluster` (a `/clusters` entry) at `addr`.
pub fn find_endpoint(cluster: &serde_json::Value, addr: SocketAddr) -> serde_json::Value {
    cluster["endpoints"]
        .as_array()
        .and_then(|eps| {
            eps.iter()
                .find(|e| e["address"].as_str() == Some(addr.to_string().as_str()))
                .cloned()
        })
        .unwrap_or_else(|| panic!("no endpoint {addr} in cluster {cluster}"))
}

/// Closes `stream` abruptly: SO_LINGER 0, so the kernel sends RST instead of FIN, as when a
/// process dies with unread data or an application aborts.
pub fn abort_stream(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

/// Reads one line (up to and including `\n`) byte-chunk-wise without buffering past it
/// (replies are one line and nothing follows until the next request).
pub fn read_one_line(stream: &mut TcpStream) -> io::Result<String> {
    let mut out = Vec::new();
    let mut byte = [0u8; 256];
    loop {
        let n = stream.read(&mut byte)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("EOF after {:?}", String::from_utf8_lossy(&out)),
            ));
        }
        out.extend_from_slice(&byte[..n]);
        if out.ends_with(b"\n") {
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
    }
}

/// Lines of `log` (a proxy's stderr) containing every one of `needles`.
pub fn log_lines_with<'a>(log: &'a str, needles: &[&str]) -> Vec<&'a str> {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .collect()
}
