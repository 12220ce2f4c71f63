//! `veer wait`: block until the proxy in this pod is ready.
//!
//! The injected sidecar's `postStart` hook when a pod asks for
//! `holdApplicationUntilProxyStarts` (Istio's `pilot-agent wait`): the kubelet starts the
//! containers in order and does not start the next one until the hook returns, so the
//! application starts only once the proxy answers `GET /ready` with 200. Plain blocking std
//! I/O: it runs for seconds, once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// How often the readiness endpoint is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

#[derive(clap::Args, Debug, Clone)]
pub struct WaitArgs {
    /// The proxy's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Give up (exit 1) after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

/// Runs `veer wait`: exit 0 once ready, 1 on timeout.
pub fn run(args: &WaitArgs) -> ExitCode {
    match wait_ready(args.admin, "/ready", Duration::from_secs(args.timeout_secs)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("veer wait: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Polls `GET path` on `addr` until it answers 200, for at most `timeout`.
pub fn wait_ready(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match status_of(addr, path) {
            Ok(200) => return Ok(()),
            Ok(code) => format!("HTTP {code}"),
            Err(e) => e.to_string(),
        };
        if Instant::now() + POLL_INTERVAL > deadline {
            return Err(format!(
                "http://{addr}{path} not ready after {}s (last: {last})",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

fn status_of(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let io_timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, io_timeout)?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut head = [0u8; 32];
    let mut len = 0;
    while len < head.len() {
        match stream.read(&mut head[len..])? {
            0 => break,
            k => len += k,
        }
    }
    // "HTTP/1.1 200 OK"
    std::str::from_utf8(&head[..len])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Answers each connection with the next reply, the last one for ever after.
    fn serve(replies: Vec<&'static str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for i in 0.. {
                let reply = replies[i.min(replies.len() - 1)];
                let Ok((mut s, _)) = listener.accept() else {
                    return;
                };
                // Read the whole request (up to the blank line) before answering.
                let mut req = Vec::new();
                let mut buf = [0u8; 256];
                while !req.ends_with(b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => req.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = s.write_all(reply.as_bytes());
            }
        });
        addr
    }

    #[test]
    fn waits_for_200() {
        let addr = serve(vec![
            "HTTP/1.1 503 Service Unavailable\r\n\r\nnot ready",
            "HTTP/1.1 200 OK\r\n\r\nready",
        ]);
        wait_ready(addr, "/ready", Duration::from_secs(10)).unwrap();
    }

    #[test]
    fn times_out() {
        let addr = serve(vec!["HTTP/1.1 503 Service Unavailable\r\n\r\n"]);
        let e = wait_ready(addr, "/ready", Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("not ready") && e.contains("503"), "{e}");
    }
}
