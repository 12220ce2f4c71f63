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

/// The kernel's NAT table, via `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`.
#[derive(Debug, Default, Clone, Copy)]
pub struct Kernel;

impl OrigDstLookup for Kernel {
    fn lookup(&self, stream: &TcpStream) -> io::Result<OrigDst> {
        let v6 = stream.local_addr()?.is_ipv6();
        crate::sys::original_dst(stream, v6).map(OrigDst)
    }
}
