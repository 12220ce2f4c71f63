//! Recovering where a captured connection was going.
//!
//! A seam (`OrigDstLookup`) so the proxy can be exercised without iptables: tests can map
//! connections to destinations themselves.

use std::io;

use tokio::net::TcpStream;

use crate::addr::{ClientAddr, OrigDst};

pub trait OrigDstLookup: Send + Sync + 'static {
    /// Where `stream`, accepted from `client`, was going.
    fn lookup(&self, stream: &TcpStream, client: ClientAddr) -> io::Result<OrigDst>;
}

/// The kernel's NAT table, via `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`. A connection with
/// no NAT entry (TPROXY interception keeps the destination as is) reports `ENOENT`: its
/// local address *is* the original destination.
#[derive(Debug, Default, Clone, Copy)]
pub struct Kernel;

impl OrigDstLookup for Kernel {
    fn lookup(&self, stream: &TcpStream, client: ClientAddr) -> io::Result<OrigDst> {
        // Listeners are v6-only, so the client's family is the socket's: no getsockname.
        match crate::sys::original_dst(stream, client.0.is_ipv6()) {
            Ok(dst) => Ok(OrigDst(dst)),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOENT) => {
                Ok(OrigDst(stream.local_addr()?))
            }
            Err(e) => Err(e),
        }
    }
}
