//! Moving bytes both ways until both sides are done.
//!
//! Each direction copies until EOF, then passes the FIN on with `shutdown(Write)` while the
//! other direction keeps flowing (half-close), so a client that sends a request and closes its
//! write side still gets the whole reply. An error in either direction ends both. Byte
//! counters are updated per read, so live views see a long connection's traffic before it
//! closes (cost: one relaxed atomic add per read).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::metrics::Meter;
use super::record::Transfer;

/// Per-direction buffer. 16 KiB matches a typical socket read under load; the performance
/// issue revisits this (splice, buffers that grow with traffic).
const BUF_SIZE: usize = 16 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides sent FIN.
    Closed,
    ClientError,
    UpstreamError,
}

pub async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
    t: &Transfer,
) -> (RelayEnd, Option<io::Error>) {
    let (mut cr, mut cw) = client.split();
    let (mut ur, mut uw) = upstream.split();
    let up = async {
        copy(&mut cr, &mut uw, &t.to_upstream, &t.client_fin)
            .await
            .map_err(|(read, e)| (if read { Side::Client } else { Side::Upstream }, e))
    };
    let down = async {
        copy(&mut ur, &mut cw, &t.to_client, &t.upstream_fin)
            .await
            .map_err(|(read, e)| (if read { Side::Upstream } else { Side::Client }, e))
    };
    match tokio::try_join!(up, down) {
        Ok(_) => (RelayEnd::Closed, None),
        Err((Side::Client, e)) => (RelayEnd::ClientError, Some(e)),
        Err((Side::Upstream, e)) => (RelayEnd::UpstreamError, Some(e)),
    }
}

enum Side {
    Client,
    Upstream,
}

/// Copies `r` to `w` until EOF, then half-closes `w`. An error says whether reading (`true`)
/// or writing failed, so the close reason blames the right side.
async fn copy<R, W>(
    r: &mut R,
    w: &mut W,
    meter: &Meter,
    eof: &AtomicBool,
) -> Result<(), (bool, io::Error)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUF_SIZE];
    loop {
        let n = r.read(&mut buf).await.map_err(|e| (true, e))?;
        if n == 0 {
            eof.store(true, Ordering::Relaxed);
            // The peer may already be gone; a failed FIN is not worth failing the relay.
            let _ = w.shutdown().await;
            return Ok(());
        }
        w.write_all(&buf[..n]).await.map_err(|e| (false, e))?;
        meter.add(n as u64);
    }
}
