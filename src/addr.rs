//! Address newtypes: the kernel hands the proxy several socket addresses per connection, and
//! swapping them (dialling the client, logging the proxy's own port as the destination) is a
//! bug the compiler should catch.

use std::fmt;
use std::net::SocketAddr;

/// Where the application meant to connect, recovered from the NAT table (`SO_ORIGINAL_DST`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct OrigDst(pub SocketAddr);

/// The peer of an accepted connection: the application (outbound) or the remote client (inbound).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

impl fmt::Display for OrigDst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
