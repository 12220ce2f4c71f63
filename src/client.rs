//! `veer client`: a minimal nc-like client for the demo and tests. Sends the given messages
//! (or standard input), half-closes, and prints everything received until the server closes.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

pub fn run(
    addr: SocketAddr,
    messages: &[String],
    timeout: Duration,
    out: &mut impl Write,
) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| io::Error::new(e.kind(), format!("connect {addr}: {e}")))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    if messages.is_empty() {
        io::copy(&mut io::stdin().lock(), &mut s)?;
    } else {
        for m in messages {
            s.write_all(m.as_bytes())?;
            s.write_all(b"\n")?;
        }
    }
    s.shutdown(Shutdown::Write)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)
        .map_err(|e| io::Error::new(e.kind(), format!("reading from {addr}: {e}")))?;
    out.write_all(&buf)?;
    out.flush()
}
