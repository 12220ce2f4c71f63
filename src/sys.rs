//! The few socket and process calls the standard library and tokio do not offer.
//!
//! Almost everything goes through `nix`'s safe wrappers. The crate's only `unsafe` code is here
//! ([`epolls_created_by`]), with `// SAFETY:` notes; the crate denies it elsewhere.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, OwnedFd, RawFd};

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

/// Runs `make` and returns, with what it made, a duplicate of every epoll descriptor opened
/// meanwhile (tokio's I/O driver, when `make` builds a runtime). A duplicate keeps its epoll
/// instance alive and pollable for as long as the caller holds it. Found by comparing
/// `/proc/self/fd` before and after, as tokio does not expose its descriptor; another thread
/// opening an epoll meanwhile would be picked up too (harmless for a spin: it only ends a
/// spin early).
#[allow(unsafe_code)]
pub fn epolls_created_by<T>(make: impl FnOnce() -> T) -> io::Result<(T, Vec<OwnedFd>)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    let before = epoll_fds()?;
    let made = make();
    let mut dups = Vec::new();
    for fd in epoll_fds()? {
        if before.contains(&fd) {
            continue;
        }
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) takes the descriptor as a plain number and touches no
        // memory of ours: if another thread closed `fd` since the scan it fails with EBADF, if
        // the number was reused it duplicates that descriptor, which the check below rejects.
        let dup = unsafe { nix::libc::fcntl(fd, nix::libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            continue;
        }
        // SAFETY: `dup` is a descriptor the kernel just opened for us and nothing else knows
        // of, so the OwnedFd is its only owner.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        // Checked on the duplicate, which nobody else can close or reuse.
        if is_epoll(&format!("/proc/self/fd/{}", dup.as_raw_fd())) {
            dups.push(dup);
        }
    }
    Ok((made, dups))
}

fn epoll_fds() -> io::Result<Vec<RawFd>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let entry = entry?;
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if is_epoll(&entry.path().to_string_lossy()) {
            out.push(fd);
        }
    }
    Ok(out)
}

fn is_epoll(link: &str) -> bool {
    std::fs::read_link(link).is_ok_and(|t| t.as_os_str() == "anon_inode:[eventpoll]")
}

/// Whether any of `fds` is readable right now (`poll(2)` with a zero timeout; an epoll
/// descriptor is readable while it has events to report). Errors (EINTR) count as ready:
/// the caller stops waiting and lets the runtime look.
pub fn any_readable(fds: &mut [nix::poll::PollFd<'_>]) -> bool {
    !matches!(nix::poll::poll(fds, nix::poll::PollTimeout::ZERO), Ok(0))
}
