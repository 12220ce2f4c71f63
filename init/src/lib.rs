//! veer-init: installs (or removes) the iptables rules that steer a pod's TCP
//! traffic through the veer sidecar, with istio-iptables compatible flags.
//!
//! The work is split so that the interesting part stays pure and testable:
//! [`flags`] parses and validates the command line, [`plan`] turns flags into
//! the exact `iptables-restore` input (no I/O), and [`apply`] is the only
//! module that talks to the system (capabilities, binaries, iptables).

#![forbid(unsafe_code)]

pub mod apply;
pub mod flags;
pub mod plan;

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

    #[error("inbound interception mode TPROXY is not supported yet; use -m REDIRECT")]
    TproxyUnsupported,

    // Kept to one sentence: this is what an operator sees in `kubectl logs`.
    #[error(
        "the CAP_NET_ADMIN capability is missing from veer-init's effective set, so it cannot \
         change iptables rules; grant it in the init container spec with \
         `securityContext: {{capabilities: {{add: [\"NET_ADMIN\", \"NET_RAW\"]}}}}`"
    )]
    MissingNetAdmin,

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
}
