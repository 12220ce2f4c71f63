//! The few socket and process calls the standard library and tokio do not offer.
//!
//! Everything goes through `nix`'s safe wrappers, so the crate needs no `unsafe` at all;
//! if a raw call is ever needed it belongs here, with a `// SAFETY:` note.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt};

/// The destination a connection had before iptables NAT rewrote it (`SO_ORIGINAL_DST`).
/// `v6` selects the IPv6 variant (`IP6T_SO_ORIGINAL_DST`), which must match the socket's family.
pub fn original_dst<F: AsFd>(fd: &F, v6: bool) -> io::Result<SocketAddr> {
    if v6 {
        let sa = getsockopt(fd, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(sa.sin6_addr.s6_addr),
            u16::from_be(sa.sin6_port),
            u32::from_be(sa.sin6_flowinfo),
            sa.sin6_scope_id,
        )))
    } else {
        let sa = getsockopt(fd, sockopt::OriginalDst).map_err(io::Error::from)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
            u16::from_be(sa.sin_port),
        )))
    }
}

/// Raises the soft open-file limit to the hard limit (allowed without privileges): a sidecar
/// holds two descriptors per connection, and the usual soft default of 1024 is far too low.
pub fn raise_nofile_limit() -> io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    Ok(hard)
}

/// Drops every capability the process holds (effective, permitted, inheritable, ambient, and
/// the bounding set where allowed), keeping only `keep`. The proxy needs none to relay
/// (capture ports are above 1024 and the inbound forwarder's 127.0.0.6 source needs no
/// privilege); a gateway serving a port below 1024 keeps CAP_NET_BIND_SERVICE.
pub fn drop_capabilities(keep: &[caps::Capability]) -> Result<(), caps::errors::CapsError> {
    use caps::{CapSet, CapsHashSet};
    let keep: CapsHashSet = keep.iter().copied().collect();
    // Bounding-set changes need CAP_SETPCAP, which a non-root proxy usually lacks; the
    // permitted set below is what really limits the process, so this part is best effort.
    for cap in caps::read(None, CapSet::Bounding).unwrap_or_default() {
        if !keep.contains(&cap) {
            let _ = caps::drop(None, CapSet::Bounding, cap);
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())?;
    let permitted: CapsHashSet = caps::read(None, CapSet::Permitted)?
        .intersection(&keep)
        .copied()
        .collect();
    caps::set(None, CapSet::Effective, &permitted)?;
    caps::set(None, CapSet::Permitted, &permitted)?;
    Ok(())
}
