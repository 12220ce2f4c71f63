//! The routing core: pure functions from config to a snapshot, and from a connection's
//! original destination to a cluster and endpoint. No sockets, no files.

pub mod cells;
pub mod compile;
pub mod explain;
pub mod fast;
pub mod host;
pub mod lb;
pub mod outlier;
pub mod snapshot;
pub mod weighted;

pub use compile::{compile, recompile};
pub use fast::{Picked, Route, Routed};
pub use snapshot::{
    Cluster, ClusterPolicy, Condition, Considered, Endpoint, EndpointAddr, Listener, Outbound,
    OutboundTrafficPolicy, ProxyIdentity, ProxyMode, RouteName, RouteRule, RuleKind, Snapshot,
};

#[cfg(test)]
mod tests;
