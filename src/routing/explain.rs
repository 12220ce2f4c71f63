//! `veer explain` and `GET /explain`: the trip a connection to a destination would take, and
//! why — the answer to "why did my traffic go there?". Reads the snapshot without picking
//! (the weighted round-robin state and counters are left alone).

use std::fmt;
use std::net::SocketAddr;

use serde::Serialize;

use super::snapshot::{Considered, Listener, Outbound, OutboundTrafficPolicy, ProxyMode, Snapshot};
use crate::addr::OrigDst;

#[derive(Debug, Serialize)]
pub struct RuleCheck {
    pub rule: String,
    pub applies: bool,
    pub why: String,
}

#[derive(Debug, Serialize)]
pub struct DestinationExplained {
    pub cluster: String,
    pub weight: u32,
    pub share_percent: f64,
    pub load_balancer: String,
    pub endpoints: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    pub destination: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// The service (or gateway port) that owns the destination.
    pub owner: Option<String>,
    /// One sentence: what happens to the connection.
    pub verdict: String,
    /// Rules looked at when the config was compiled for this proxy, kept or skipped.
    pub considered: Vec<Considered>,
    /// The kept rules, checked in order against this connection.
    pub checked: Vec<RuleCheck>,
    pub destinations: Vec<DestinationExplained>,
}

impl Snapshot {
    pub fn explain(&self, dst: SocketAddr, sni: Option<&str>) -> Explanation {
        let mut e = Explanation {
            destination: dst.to_string(),
            sni: sni.map(str::to_string),
            owner: None,
            verdict: String::new(),
            considered: Vec::new(),
            checked: Vec::new(),
            destinations: Vec::new(),
        };
        let listener = match self.identity.mode {
            ProxyMode::Gateway => match self.gateway_ports.get(&dst.port()) {
                Some(l) => l,
                None => {
                    e.verdict = format!(
                        "closed: no Gateway server of this proxy listens on port {}",
                        dst.port()
                    );
                    return e;
                }
            },
            ProxyMode::Sidecar => match self.route_outbound(OrigDst(dst)) {
                Outbound::Service(l) => l,
                Outbound::Passthrough => {
                    e.verdict = format!(
                        "passed through to {dst} as is: no Service or ServiceEntry owns it and the outbound traffic policy is {:?}",
                        OutboundTrafficPolicy::AllowAny
                    );
                    return e;
                }
                Outbound::Refused => {
                    e.verdict = "refused: no Service or ServiceEntry owns it and the outbound traffic policy is REGISTRY_ONLY".into();
                    return e;
                }
            },
        };
        e.owner = Some(format!("{} port {}", listener.host, listener.port));
        e.considered = listener.considered.clone();
        explain_listener(listener, dst, sni, &mut e);
        e
    }
}

fn explain_listener(l: &Listener, dst: SocketAddr, sni: Option<&str>, e: &mut Explanation) {
    let ip = dst.ip().to_canonical();
    let mut chosen = None;
    for rule in &l.rules {
        let (applies, why) = if rule.conditions.is_empty() {
            (true, "no per-connection conditions".to_string())
        } else {
            let mut reasons = Vec::new();
            let mut any = false;
            for (k, c) in rule.conditions.iter().enumerate() {
                let sni_ok = c.sni_hosts.is_empty()
                    || sni.is_some_and(|s| c.sni_hosts.iter().any(|p| super::host::matches(p, s)));
                let net_ok = c.destination_subnets.is_empty()
                    || c.destination_subnets.iter().any(|n| n.contains(&ip));
                if sni_ok && net_ok {
                    any = true;
                    reasons.push(format!("block {k} matches"));
                    break;
                }
                if !sni_ok {
                    reasons.push(format!(
                        "block {k}: SNI {:?} not in {:?}",
                        sni.unwrap_or("(none)"),
                        c.sni_hosts
                    ));
                }
                if !net_ok {
                    reasons.push(format!(
                        "block {k}: {ip} not in {:?}",
                        c.destination_subnets
                    ));
                }
            }
            (any, reasons.join("; "))
        };
        e.checked.push(RuleCheck {
            rule: rule.name(),
            applies: applies && chosen.is_none(),
            why,
        });
        if applies && chosen.is_none() {
            chosen = Some(rule);
        }
    }
    let dests: Vec<(&std::sync::Arc<super::Cluster>, u32)> = match chosen {
        Some(rule) => {
            e.verdict = format!("routed by {}", rule.name());
            rule.destinations
                .iter()
                .map(|d| (&d.cluster, d.weight.0))
                .collect()
        }
        None => match &l.default_cluster {
            Some(c) => {
                e.verdict =
                    "no rule matched: sent to the whole service (every endpoint, no subset)".into();
                vec![(c, 1)]
            }
            None => {
                e.verdict = "closed: no rule matched and a gateway has no default route".into();
                Vec::new()
            }
        },
    };
    let total: u64 = dests.iter().map(|(_, w)| u64::from(*w)).sum();
    for (c, w) in dests {
        e.destinations.push(DestinationExplained {
            cluster: c.name.clone(),
            weight: w,
            share_percent: if total == 0 {
                0.0
            } else {
                100.0 * f64::from(w) / total as f64
            },
            load_balancer: if c.original_destination {
                "original destination (passthrough)".into()
            } else {
                format!("{:?}", c.policy.load_balancer)
            },
            endpoints: c
                .endpoints
                .iter()
                .map(|ep| format!("{} ({})", ep.address, ep.origin))
                .collect(),
            problem: c.problem.clone(),
        });
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connection to {}", self.destination)?;
        if let Some(s) = &self.sni {
            write!(f, " (SNI {s})")?;
        }
        writeln!(f)?;
        if let Some(o) = &self.owner {
            writeln!(f, "owner: {o}")?;
        }
        if !self.considered.is_empty() {
            writeln!(f, "VirtualService rules considered for this proxy:")?;
            for c in &self.considered {
                writeln!(f, "  {}: {}", c.rule(), c.outcome)?;
            }
        }
        if !self.checked.is_empty() {
            writeln!(f, "checked in order for this connection:")?;
            for c in &self.checked {
                writeln!(
                    f,
                    "  {}: {} ({})",
                    c.rule,
                    if c.applies { "MATCH" } else { "no" },
                    c.why
                )?;
            }
        }
        writeln!(f, "verdict: {}", self.verdict)?;
        for d in &self.destinations {
            writeln!(
                f,
                "  {:>5.1}%  weight {:<4} {}  [{}]",
                d.share_percent, d.weight, d.cluster, d.load_balancer
            )?;
            if let Some(p) = &d.problem {
                writeln!(f, "          problem: {p}")?;
            }
            for ep in &d.endpoints {
                writeln!(f, "          endpoint {ep}")?;
            }
        }
        Ok(())
    }
}
