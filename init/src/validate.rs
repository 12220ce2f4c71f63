//! The capture self-check, as istio-iptables' validation does it: before the
//! proxy runs, veer-init itself listens on the proxy's loopback ports, and a
//! probe connection from the proxy uid to 127.0.0.6 (or ::6) on the probe
//! port must arrive there with that address as its original destination.
//!
//! Why that connection: it leaves via lo from the proxy uid to an address
//! other than 127.0.0.1, which is what the proxy dialing the pod's own
//! address looks like, so the OUTPUT rules hand it to the inbound capture
//! port. It never leaves the pod whether or not the rules work, and nothing
//! listens on the probe port, so an uncaptured probe is refused at once.
//! (The probe binds 127.0.0.1 as its source, because the kernel would
//! otherwise pick 127.0.0.6, whose traffic the rules deliberately return.)
//!
//! Only a socket opened by the proxy uid matches those rules. When veer-init
//! is not already running as that uid (istio's validation container is), it
//! starts a copy of itself as the proxy uid (`--probe-client`) before giving
//! up its privileges; that needs CAP_SETUID and CAP_SETGID at start-up.

use std::io::{self, BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, SockRef, Socket, Type};

use crate::flags::Flags;
use crate::plan::Family;
use crate::Error;

/// One probe: where it goes, where it must arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub family: Family,
    /// 127.0.0.6 / ::6 on the probe port.
    pub probe: SocketAddr,
    /// The probe's source: 127.0.0.1 / ::1, any port.
    pub bind: SocketAddr,
    /// The proxy's ports on loopback, where veer-init listens meanwhile.
    pub listen: [SocketAddr; 2],
}

impl Target {
    pub fn new(flags: &Flags, family: Family) -> Self {
        let (loopback, inbound_source): (IpAddr, IpAddr) = match family {
            Family::V4 => (
                Ipv4Addr::LOCALHOST.into(),
                Ipv4Addr::new(127, 0, 0, 6).into(),
            ),
            Family::V6 => (
                Ipv6Addr::LOCALHOST.into(),
                Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6).into(),
            ),
        };
        Target {
            family,
            probe: SocketAddr::new(inbound_source, flags.probe_port),
            bind: SocketAddr::new(loopback, 0),
            listen: [
                SocketAddr::new(loopback, flags.envoy_port),
                SocketAddr::new(loopback, flags.inbound_capture_port),
            ],
        }
    }
}

/// Who opens the probe connections.
pub enum Client {
    /// veer-init already runs as the proxy uid.
    InProcess,
    /// A copy of veer-init running as the proxy uid.
    Child(ProbeChild),
}

impl Client {
    fn probe(&mut self, target: &Target, timeout: Duration) -> Result<(), String> {
        match self {
            Client::InProcess => connect_once(target.probe, target.bind, timeout),
            Client::Child(child) => child.probe(target, timeout),
        }
    }
}

/// The probe client process; it exits when its stdin closes (on drop).
pub struct ProbeChild {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl ProbeChild {
    /// Starts `veer-init --probe-client` as `uid`/`gid` with no
    /// supplementary groups; the uid change also clears its capabilities.
    pub fn spawn(uid: u32, gid: u32) -> io::Result<Self> {
        use std::os::unix::process::CommandExt;
        // /proc/self/exe needs no search permission on the directories the
        // binary lives in, which the proxy uid may lack.
        let mut child = Command::new("/proc/self/exe")
            .arg("--probe-client")
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        Ok(ProbeChild {
            child,
            stdin,
            stdout,
        })
    }

    fn probe(&mut self, target: &Target, timeout: Duration) -> Result<(), String> {
        let request = format!("{} {} {}\n", target.probe, target.bind, timeout.as_millis());
        let stdin = self.stdin.as_mut().ok_or("the probe client has exited")?;
        stdin
            .write_all(request.as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("the probe client is gone: {e}"))?;
        let mut answer = String::new();
        match self.stdout.read_line(&mut answer) {
            Ok(0) => Err("the probe client exited unexpectedly".to_string()),
            Ok(_) if answer.trim() == "ok" => Ok(()),
            Ok(_) => Err(answer.trim().trim_start_matches("error ").to_string()),
            Err(e) => Err(format!("reading from the probe client: {e}")),
        }
    }
}

impl Drop for ProbeChild {
    fn drop(&mut self) {
        // Closing stdin ends the client's loop; it answers within one
        // connect timeout, and then it is reaped here.
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// The `--probe-client` side: one line per probe on stdin
/// (`PROBE BIND TIMEOUT_MS`), one answer per line on stdout (`ok` or
/// `error …`). Ends at end of input.
pub fn probe_client_loop() -> Result<(), String> {
    let stdin = io::stdin();
    let mut stdout = io::stdout();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| format!("probe client: reading stdin: {e}"))?;
        let answer = match parse_request(&line) {
            Some((probe, bind, timeout)) => match connect_once(probe, bind, timeout) {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("error {e}"),
            },
            None => format!("error bad request `{line}`"),
        };
        writeln!(stdout, "{answer}")
            .and_then(|()| stdout.flush())
            .map_err(|e| format!("probe client: writing stdout: {e}"))?;
    }
    Ok(())
}

fn parse_request(line: &str) -> Option<(SocketAddr, SocketAddr, Duration)> {
    let mut parts = line.split_whitespace();
    let probe = parts.next()?.parse().ok()?;
    let bind = parts.next()?.parse().ok()?;
    let millis: u64 = parts.next()?.parse().ok()?;
    Some((probe, bind, Duration::from_millis(millis.max(1))))
}

/// One probe connection from `bind` to `probe`, closed at once.
pub fn connect_once(probe: SocketAddr, bind: SocketAddr, timeout: Duration) -> Result<(), String> {
    let socket = Socket::new(Domain::for_address(probe), Type::STREAM, None)
        .map_err(|e| format!("socket: {e}"))?;
    socket
        .bind(&SockAddr::from(bind))
        .map_err(|e| format!("binding {bind}: {e}"))?;
    socket
        .connect_timeout(&SockAddr::from(probe), timeout)
        .map_err(|e| match e.kind() {
            ErrorKind::ConnectionRefused => "connection refused: nothing redirected it".to_string(),
            ErrorKind::TimedOut | ErrorKind::WouldBlock => "connect timed out".to_string(),
            _ => e.to_string(),
        })
}

/// Why the self-check could not run at all (as opposed to failing).
#[derive(Debug)]
pub struct Unavailable(pub String);

/// Probes one family; on success, says where the probe arrived.
pub fn check(
    flags: &Flags,
    target: &Target,
    client: &mut Client,
) -> Result<Result<String, Unavailable>, Error> {
    let fail = |msg: String| Error::Validation(format!("capture self-check failed: {msg}"));
    let port = flags.probe_port;
    if port == flags.inbound_tunnel_port
        || flags.outbound_exclude_ports.0.contains(&port)
        || port == flags.envoy_port
        || port == flags.inbound_capture_port
    {
        return Err(fail(format!(
            "the probe port {port} is the tunnel, a proxy or an excluded outbound port, so the \
             rules leave it alone by design; choose another --iptables-probe-port"
        )));
    }
    if target.family == Family::V6 && !crate::apply::ipv6_inbound_source_present() {
        return Err(fail(
            "::6 is not assigned to lo (veer-init adds it when it installs the IPv6 rules), so \
             an IPv6 probe could leave the pod; install the rules first"
                .to_string(),
        ));
    }

    let mut listeners = Vec::new();
    for addr in target.listen {
        match TcpListener::bind(addr) {
            Ok(l) => {
                l.set_nonblocking(true)
                    .map_err(|e| fail(format!("listening on {addr}: {e}")))?;
                listeners.push(l);
            }
            Err(e) if e.kind() == ErrorKind::AddrInUse => {
                return Ok(Err(Unavailable(format!(
                    "{addr} is already in use (is the proxy running?); the self-check must run \
                     before the proxy starts"
                ))))
            }
            Err(e) => return Err(fail(format!("listening on {addr}: {e}"))),
        }
    }

    let deadline = Instant::now() + flags.probe_timeout;
    let mut last = String::from("no probe was sent");
    let mut unexpected = None;
    while Instant::now() < deadline {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match client.probe(target, remaining.min(Duration::from_secs(1))) {
            Ok(()) => last = "the probe connected, but not to veer-init".to_string(),
            Err(e) => last = e,
        }
        // A captured probe is already in a listener's accept queue once the
        // client's connect returned; the short wait only covers scheduling.
        let accept_until = Instant::now() + Duration::from_millis(100);
        loop {
            for listener in &listeners {
                match listener.accept() {
                    Ok((stream, _)) => match original_dst(&stream, target.family) {
                        Ok(dst) if dst == target.probe => {
                            let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
                            return Ok(Ok(format!(
                                "a connection from uid {} to {} was redirected to port {port} \
                                 with its original destination intact",
                                flags.proxy_uid.0[0], target.probe
                            )));
                        }
                        Ok(dst) => unexpected = Some(dst),
                        Err(e) => last = format!("reading the original destination: {e}"),
                    },
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => last = format!("accept: {e}"),
                }
            }
            if Instant::now() >= accept_until.min(deadline) {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        thread::sleep(
            Duration::from_millis(100).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
    let extra = unexpected
        .map(|dst| format!("; a connection did arrive, but for {dst}"))
        .unwrap_or_default();
    Err(fail(format!(
        "{}: a connection from uid {} to {} did not reach {} or {} within {:?} ({last}{extra}); \
         the capture rules are not in effect in this network namespace. If the node uses the \
         other iptables backend, pass --iptables-backend=legacy or =nft",
        target.family.name(),
        flags.proxy_uid.0[0],
        target.probe,
        target.listen[0],
        target.listen[1],
        flags.probe_timeout,
    )))
}

/// Where a redirected connection was headed (SO_ORIGINAL_DST /
/// IP6T_SO_ORIGINAL_DST).
pub fn original_dst(stream: &TcpStream, family: Family) -> io::Result<SocketAddr> {
    let sock = SockRef::from(stream);
    let addr = match family {
        Family::V4 => sock.original_dst_v4()?,
        Family::V6 => sock.original_dst_v6()?,
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::other("not an IP address"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn targets_follow_istio() {
        let flags = Flags::try_parse_from(["veer-init"]).unwrap();
        let v4 = Target::new(&flags, Family::V4);
        assert_eq!(v4.probe, "127.0.0.6:15002".parse().unwrap());
        assert_eq!(v4.bind, "127.0.0.1:0".parse().unwrap());
        assert_eq!(
            v4.listen,
            [
                "127.0.0.1:15001".parse().unwrap(),
                "127.0.0.1:15006".parse().unwrap()
            ]
        );
        let v6 = Target::new(&flags, Family::V6);
        assert_eq!(v6.probe, "[::6]:15002".parse().unwrap());
        assert_eq!(v6.bind, "[::1]:0".parse().unwrap());
    }

    #[test]
    fn requests_round_trip() {
        assert_eq!(
            parse_request("127.0.0.6:15002 127.0.0.1:0 250"),
            Some((
                "127.0.0.6:15002".parse().unwrap(),
                "127.0.0.1:0".parse().unwrap(),
                Duration::from_millis(250)
            ))
        );
        assert_eq!(
            parse_request("[::6]:1 [::1]:0 0").unwrap().2,
            Duration::from_millis(1)
        );
        assert_eq!(parse_request("nonsense"), None);
    }

    #[test]
    fn probe_port_that_the_rules_skip_is_rejected() {
        let flags = Flags::try_parse_from(["veer-init", "-o", "15002"]).unwrap();
        let target = Target::new(&flags, Family::V4);
        let err = check(&flags, &target, &mut Client::InProcess).unwrap_err();
        assert!(err.to_string().contains("--iptables-probe-port"), "{err}");
    }
}
