//! Recovering where a captured connection was going.
//!
//! A seam (`OrigDstLookup`) so the proxy can be exercised without iptables: tests can map
//! connections to destinations themselves.

use std::io;

use tokio::net::TcpStream;

use crate::addr::OrigDst;

pub trait OrigDstLookup: Send + Sync + 'static {
    fn lookup(&self, stream: &TcpStream) -> io::Result<OrigDst>;
}

/// The kernel's NAT table, via `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`. A connection with
/// no NAT entry (TPROXY interception keeps the destination as is) reports `ENOENT`: its
/// local address *is* the original destination.
#[derive(Debug, Default, Clone, Copy)]
pub struct Kernel;

impl OrigDstLookup for Kernel {
    fn lookup(&self, stream: &TcpStream) -> io::Result<OrigDst> {
        let local = stream.local_addr()?;
        match crate::sys::original_dst(stream, local.is_ipv6()) {
            Ok(dst) => Ok(OrigDst(dst)),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => Ok(OrigDst(local)),
            Err(e) => Err(e),
        }
    }
}
