//! veer-init: installs (or removes) the iptables rules that steer a pod's TCP
//! traffic through the veer sidecar, with istio-iptables compatible flags.
//!
//! The work is split so that the interesting part stays pure and testable:
//! [`flags`] parses and validates the command line, [`plan`] turns flags into
//! the exact `iptables-restore` input (no I/O), and [`apply`] is the only
//! module that changes the system (capabilities, binaries, iptables, ip);
//! [`validate`] proves afterwards that connections really are redirected.

#![forbid(unsafe_code)]

pub mod apply;
pub mod flags;
pub mod plan;
pub mod validate;

use std::process::ExitStatus;

/// Everything that can go wrong, from flag parsing to running iptables.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("`{value}` is not a port: {reason}")]
    InvalidPort { value: String, reason: String },

    #[error("`{value}` is not a CIDR such as 10.0.0.0/8 or fd00::/8: {reason}")]
    InvalidCidr { value: String, reason: String },

    #[error("`{value}` is not a numeric uid/gid: {reason}")]
    InvalidId { value: String, reason: String },

    #[error("`*` is not allowed here: {0}")]
    WildcardNotAllowed(&'static str),

    #[error("`{value}` is not an interface name: {reason}")]
    InvalidInterface { value: String, reason: String },

    #[error("`{value}` is not valid here: {reason}")]
    InvalidNumber { value: String, reason: String },

    #[error("`{0}` is not a duration such as 5s or 500ms (at most 1h)")]
    InvalidDuration(String),

    // Kept to one line: this is what an operator sees in `kubectl logs`.
    #[error(
        "veer-init lacks {missing} in its effective capability set; it needs CAP_NET_ADMIN to \
         change iptables rules, addresses and routes, and CAP_NET_RAW because iptables opens \
         raw sockets; grant both in the init container spec with \
         `securityContext: {{capabilities: {{add: [\"NET_ADMIN\", \"NET_RAW\"]}}}}` \
         (veer-init drops every other capability itself)"
    )]
    MissingCapabilities { missing: String },

    #[error("could not read the process capabilities: {0}")]
    Capabilities(String),

    #[error(
        "no working iptables binary was found (tried {tried}); install the `iptables` package \
         in the init container image"
    )]
    MissingIptables { tried: String },

    #[error("the requested iptables backend `{backend}` does not work here: {detail}")]
    BackendUnusable { backend: String, detail: String },

    #[error("could not run `{command}`: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },

    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: ExitStatus,
        stderr: String,
    },

    #[error("the rules read back after applying do not match the plan: {0}")]
    Verify(String),

    #[error(
        "IPv6 capture was requested with --dual-stack but this kernel has IPv6 disabled \
         (/proc/net/if_inet6 is missing)"
    )]
    NoIpv6,

    #[error("{0}")]
    Validation(String),
}
