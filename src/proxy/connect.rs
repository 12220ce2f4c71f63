//! Opening the upstream side.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::{TcpSocket, TcpStream};

use crate::routing::snapshot::Keepalive;
use crate::routing::EndpointAddr;

/// Connects within `timeout`, optionally from a fixed source address (the inbound forwarder
/// uses 127.0.0.6 so its own traffic is not captured again). TCP_NODELAY is set: the proxy
/// forwards whatever it read immediately, so Nagle would only add latency.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    source: Option<IpAddr>,
) -> io::Result<TcpStream> {
    let sock = socket_for(addr)?;
    if let Some(ip) = source {
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    finish_connect(sock, addr, timeout).await
}

/// Connects from `source`'s IP as if it were local (IP_TRANSPARENT) with `mark` set, so the
/// local app sees the original client address (TPROXY inbound). Needs CAP_NET_ADMIN.
pub async fn connect_transparent(
    addr: SocketAddr,
    source: SocketAddr,
    mark: u32,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let sock = socket_for(addr)?;
    {
        let s = socket2::SockRef::from(&sock);
        if addr.is_ipv4() {
            s.set_ip_transparent_v4(true)?;
        } else {
            s.set_ip_transparent_v6(true)?;
        }
        s.set_mark(mark)?;
    }
    sock.bind(SocketAddr::new(source.ip().to_canonical(), 0))?;
    finish_connect(sock, addr, timeout).await
}

fn socket_for(addr: SocketAddr) -> io::Result<TcpSocket> {
    if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
}

/// Connects within `timeout` and sets TCP_NODELAY.
async fn finish_connect(
    sock: TcpSocket,
    addr: SocketAddr,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, sock.connect(addr))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr} timed out after {timeout:?}"),
            )
        })??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Resolves an endpoint (DNS endpoints at connect time), connects, and applies the
/// DestinationRule's `tcpKeepalive` (so dead peers behind NAT or a silent network are found).
pub async fn connect_endpoint(
    ep: &EndpointAddr,
    timeout: Duration,
    keepalive: Option<&Keepalive>,
) -> io::Result<TcpStream> {
    let addr = match ep {
        EndpointAddr::Socket(a) => *a,
        EndpointAddr::Dns { host, port } => {
            tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), *port)))
                .await
                .map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("resolving {host} timed out"),
                    )
                })??
                .next()
                .ok_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, format!("{host} has no addresses"))
                })?
        }
    };
    let stream = connect(addr, timeout, None).await?;
    if let Some(k) = keepalive {
        let mut ka = socket2::TcpKeepalive::new();
        if let Some(t) = k.time {
            ka = ka.with_time(t);
        }
        if let Some(i) = k.interval {
            ka = ka.with_interval(i);
        }
        if let Some(p) = k.probes {
            ka = ka.with_retries(p);
        }
        socket2::SockRef::from(&stream).set_tcp_keepalive(&ka)?;
    }
    Ok(stream)
}
