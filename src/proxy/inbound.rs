//! Connections to this pod, captured by the inbound REDIRECT rule and forwarded to the app.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use super::connect::{connect, connect_transparent};
use super::forward::Connected;
use super::record::{CloseReason, ClusterRef, ConnRecord, Destination, Direction, Upstream};
use super::relay::Limits;
use super::{Shared, INBOUND_SOURCE_V4, INBOUND_SOURCE_V6};
use crate::addr::ClientAddr;
use crate::routing::RouteName;

/// The app is local: if it does not accept within this, it is not going to.
const INBOUND_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn handle(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: ClientAddr,
) -> Option<Connected> {
    // TCP_NODELAY: inherited from the listener (listen::bind_std_with).
    let mut rec = ConnRecord::open(shared.recorder.clone(), Direction::Inbound, client);
    let dst = match shared.orig_dst.lookup(&stream, client) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(%client, error = %e, "inbound connection without original destination");
            rec.reason = CloseReason::NoOriginalDestination;
            return None;
        }
    };
    rec.set_dst(dst);
    if shared.is_loop(&stream, dst) {
        tracing::warn!(%client, %dst, "refusing an inbound connection addressed to the proxy itself");
        shared
            .recorder
            .stats
            .loops_refused
            .fetch_add(1, Ordering::Relaxed);
        rec.reason = CloseReason::Loop;
        return None;
    }
    rec.set_route(RouteName::Fixed("inbound"));
    // The inbound metrics label set is keyed by the local address; formatted here into a
    // stack buffer rather than a heap string.
    let mut app = [0u8; 64];
    let app = fmt_addr(&mut app, dst.0);
    rec.routed(Destination {
        service: Some(app),
        cluster: ClusterRef::Fixed("inbound"),
        endpoint: None,
    });
    rec.set_upstream(Upstream::Addr(dst.0));
    let upstream = match shared.tproxy {
        // TPROXY: the app sees the real client. The mark routes the app's replies back to
        // this socket (veer-init's mangle rules restore it from the connection's mark).
        Some(mark) => connect_transparent(dst.0, client.0, mark, INBOUND_CONNECT_TIMEOUT).await,
        None => {
            let source = if dst.0.is_ipv4() {
                INBOUND_SOURCE_V4
            } else {
                INBOUND_SOURCE_V6
            };
            connect(dst.0, INBOUND_CONNECT_TIMEOUT, Some(source)).await
        }
    };
    let upstream = match upstream {
        Ok(s) => s,
        Err(e) => {
            rec.connect_failed(&e);
            return None;
        }
    };
    Some(Connected::new(rec, stream, upstream, Limits::default()))
}

/// `addr` as text, written into `buf`: the longest socket address (`[v6%scope]:port`) is 58
/// bytes.
fn fmt_addr(buf: &mut [u8; 64], addr: std::net::SocketAddr) -> &str {
    use std::io::Write;
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let n = match write!(cursor, "{addr}") {
        Ok(()) => usize::try_from(cursor.position()).unwrap_or(0),
        Err(_) => 0,
    };
    std::str::from_utf8(&buf[..n]).unwrap_or("unknown")
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_fit_the_buffer() {
        let mut buf = [0u8; 64];
        let widest = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535";
        assert_eq!(super::fmt_addr(&mut buf, widest.parse().unwrap()), widest);
        assert_eq!(
            super::fmt_addr(&mut buf, "10.0.0.1:9000".parse().unwrap()),
            "10.0.0.1:9000"
        );
    }
}
