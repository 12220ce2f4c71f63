//! Listening sockets and accept loops.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};

use prometheus_client::metrics::counter::Counter;

use crate::addr::ClientAddr;

/// Pending connections the kernel holds before `accept`: an application that starts sending
/// while the proxy is busy waits in this queue instead of being refused.
const BACKLOG: i32 = 4096;

/// A slot under the process-wide connection limit, held for a connection's lifetime.
pub type Permit = Option<tokio::sync::OwnedSemaphorePermit>;

/// Binds a TCP listener. IPv6 sockets are v6-only so an IPv4 listener on the same port can
/// coexist and each accepted socket's family says which original-destination call applies.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::from_std(bind_std(addr)?)
}

/// [`bind`] without a runtime: the socket listens (connections queue in the backlog) before
/// anything else is ready.
pub fn bind_std(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    bind_std_with(addr, false)
}

/// [`bind_std`], optionally transparent (TPROXY inbound: the listener accepts connections
/// addressed to any local-routed address; setting it needs CAP_NET_ADMIN or CAP_NET_RAW).
pub fn bind_std_with(addr: SocketAddr, transparent: bool) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let sock = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    if transparent {
        if addr.is_ipv4() {
            sock.set_ip_transparent_v4(true)?;
        } else {
            sock.set_ip_transparent_v6(true)?;
        }
    }
    // Accepted sockets inherit TCP_NODELAY from the listener on Linux, so it is set once here
    // instead of once per connection (one setsockopt(2) less for every accept; a relay must
    // not hold back small writes). The test below checks the inheritance.
    sock.set_tcp_nodelay(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    Ok(sock.into())
}

/// Binds `0.0.0.0:port` and, where the namespace has IPv6, `[::]:port`.
pub fn bind_dual(port: u16) -> io::Result<Vec<TcpListener>> {
    bind_dual_std(port)?
        .into_iter()
        .map(TcpListener::from_std)
        .collect()
}

/// [`bind_dual`] without a runtime.
pub fn bind_dual_std(port: u16) -> io::Result<Vec<std::net::TcpListener>> {
    bind_dual_std_with(port, false)
}

/// [`bind_dual_std`], optionally transparent.
pub fn bind_dual_std_with(port: u16, transparent: bool) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out = vec![bind_std_with(
        SocketAddr::from(([0, 0, 0, 0], port)),
        transparent,
    )?];
    match bind_std_with(SocketAddr::from(([0u16; 8], port)), transparent) {
        Ok(l) => out.push(l),
        Err(e) => tracing::debug!(port, error = %e, "no IPv6 listener (IPv6 unavailable here?)"),
    }
    Ok(out)
}

/// Accepts until `drain` turns true, handing each connection to `handle`; then the listening
/// socket is closed while accepted connections carry on in their own tasks. Accept errors
/// never end the loop: running out of descriptors pauses briefly (the connections in the
/// backlog wait) instead of spinning or exiting. With a `limit`, each accepted connection
/// takes a slot; at the process-wide connection limit accepting pauses, so new connections
/// wait in the backlog rather than being accepted and failing later.
pub async fn accept_loop<F>(
    listener: TcpListener,
    mut drain: tokio::sync::watch::Receiver<bool>,
    limit: Option<(std::sync::Arc<tokio::sync::Semaphore>, Counter)>,
    mut handle: F,
) where
    F: FnMut(TcpStream, ClientAddr, Permit),
{
    let mut backoff = Duration::from_millis(5);
    // Once the sender is gone no drain can come; stop polling it (it would be ready forever).
    let mut watching = true;
    loop {
        if *drain.borrow() {
            tracing::info!(addr = ?listener.local_addr().ok(), "draining: listener closed");
            return;
        }
        // Drain first: with both ready, an unbiased select picks at random and could accept
        // (and serve) a connection that arrived after the drain began.
        let accepted = tokio::select! {
            biased;
            changed = drain.changed(), if watching => {
                watching = changed.is_ok();
                continue;
            }
            a = listener.accept() => a,
        };
        // The slot is taken after accepting: idle loops (one per listener) hold none, so the
        // limit counts connections only. At the limit this loop stops accepting until a
        // connection closes; newer connections wait in the kernel's backlog meanwhile.
        let permit = match (&limit, &accepted) {
            (Some((sem, paused)), Ok(_)) => match sem.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    paused.inc();
                    tracing::warn!(
                        addr = ?listener.local_addr().ok(),
                        "connection limit reached: accepting paused until a connection closes"
                    );
                    sem.clone().acquire_owned().await.ok()
                }
            },
            _ => None,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff = Duration::from_millis(5);
                handle(stream, ClientAddr(peer), permit);
            }
            Err(e) => {
                let local = listener.local_addr().ok();
                tracing::warn!(?local, error = %e, "accept failed; pausing {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept path no longer sets TCP_NODELAY itself: it relies on this inheritance.
    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        assert!(
            accepted.nodelay().unwrap(),
            "accepted socket has TCP_NODELAY"
        );
        drop(client);
    }
}
