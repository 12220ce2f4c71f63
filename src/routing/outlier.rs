//! Outlier detection for TCP (DestinationRule `outlierDetection`).
//!
//! For TCP there are no response codes: a failed connect (refused, reset, timed out) is the
//! error, as Envoy counts it when local-origin errors are not split out. `consecutive5xxErrors`
//! (Istio's default 5) and `consecutiveGatewayErrors` both count these; the smaller enabled
//! threshold ejects. An ejected endpoint gets no new connections for `baseEjectionTime` ×
//! times ejected (capped at 300 s, Envoy's default `max_ejection_time`), then comes back on
//! its own; a success resets the count. At most `maxEjectionPercent` of a cluster's endpoints
//! are ejected at once (at least one, as Envoy allows). Ejection is checked when picking, so
//! there is no sweeper task. Time is passed in: this module reads no clock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::config::model::OutlierDetection;

/// Longest ejection, whatever the multiplier (Envoy's default `max_ejection_time`).
const MAX_EJECTION: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OutlierPolicy {
    pub consecutive_errors: u32,
    #[serde(serialize_with = "ser_secs")]
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl OutlierPolicy {
    /// Istio's defaults for whatever the block leaves out; `None` when nothing can eject.
    pub fn from_config(o: &OutlierDetection) -> Option<Self> {
        let five_xx = o
            .consecutive_5xx_errors
            .or(o.consecutive_errors)
            .unwrap_or(5);
        let thresholds = [Some(five_xx), o.consecutive_gateway_errors];
        let consecutive_errors = thresholds
            .iter()
            .flatten()
            .filter(|n| **n > 0)
            .min()
            .copied()?;
        Some(OutlierPolicy {
            consecutive_errors: u32::try_from(consecutive_errors).unwrap_or(u32::MAX),
            base_ejection_time: o
                .base_ejection_time
                .map_or(Duration::from_secs(30), |d| d.0),
            max_ejection_percent: o
                .max_ejection_percent
                .map_or(10, |p| u32::try_from(p.clamp(0, 100)).unwrap_or(10)),
        })
    }

    /// How many of `n` endpoints may be ejected at once.
    pub fn max_ejected(&self, n: usize) -> usize {
        if self.max_ejection_percent == 0 {
            return 0;
        }
        (n * self.max_ejection_percent as usize / 100).max(1)
    }
}

/// Instants as integers, so ejection deadlines fit in an atomic.
fn nanos_since_epoch(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| t.checked_sub(Duration::from_secs(1)).unwrap_or(t));
    u64::try_from(t.saturating_duration_since(epoch).as_nanos())
        .unwrap_or(u64::MAX)
        .max(1)
}

/// One endpoint's health as outlier detection sees it.
#[derive(Debug, Default)]
pub struct OutlierState {
    consecutive_failures: AtomicU32,
    /// 0: not ejected; else the deadline (see [`nanos_since_epoch`]).
    ejected_until: AtomicU64,
    times_ejected: AtomicU32,
}

/// What a failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    Counted,
    Ejected {
        for_: Duration,
    },
    /// The threshold was reached but ejecting would pass `maxEjectionPercent`.
    NotEjectedAtCap,
}

impl OutlierState {
    pub fn is_ejected(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && nanos_since_epoch(now) < until
    }

    pub fn success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Counts a failed connect; ejects when the threshold is reached and the cap allows.
    /// `ejected_now` is how many endpoints of the cluster are ejected at `now`.
    pub fn failure(
        &self,
        policy: &OutlierPolicy,
        now: Instant,
        ejected_now: usize,
        endpoints: usize,
    ) -> FailureOutcome {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if n < policy.consecutive_errors || self.is_ejected(now) {
            return FailureOutcome::Counted;
        }
        if ejected_now >= policy.max_ejected(endpoints) {
            return FailureOutcome::NotEjectedAtCap;
        }
        let times = self.times_ejected.fetch_add(1, Ordering::Relaxed) + 1;
        let for_ = policy
            .base_ejection_time
            .saturating_mul(times)
            .min(MAX_EJECTION);
        self.ejected_until
            .store(nanos_since_epoch(now + for_), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        FailureOutcome::Ejected { for_ }
    }

    /// For `/clusters`.
    pub fn describe(&self, now: Instant) -> serde_json::Value {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let left = until.saturating_sub(nanos_since_epoch(now));
        serde_json::json!({
            "health": if self.is_ejected(now) { "ejected" } else { "healthy" },
            "ejected_for_seconds": if self.is_ejected(now) { left as f64 / 1e9 } else { 0.0 },
            "consecutive_failures": self.consecutive_failures.load(Ordering::Relaxed),
            "times_ejected": self.times_ejected.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::model::IstioDuration;

    fn policy(errors: i64, base_secs: u64, pct: i64) -> OutlierPolicy {
        OutlierPolicy::from_config(&OutlierDetection {
            consecutive_5xx_errors: Some(errors),
            base_ejection_time: Some(IstioDuration(Duration::from_secs(base_secs))),
            max_ejection_percent: Some(pct),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn ejects_after_consecutive_failures_and_returns_after_the_ejection_time() {
        let p = policy(3, 10, 100);
        let s = OutlierState::default();
        let t0 = Instant::now();
        assert_eq!(s.failure(&p, t0, 0, 2), FailureOutcome::Counted);
        assert_eq!(s.failure(&p, t0, 0, 2), FailureOutcome::Counted);
        assert_eq!(
            s.failure(&p, t0, 0, 2),
            FailureOutcome::Ejected {
                for_: Duration::from_secs(10)
            }
        );
        assert!(s.is_ejected(t0 + Duration::from_secs(9)));
        assert!(!s.is_ejected(t0 + Duration::from_secs(11)));
        // Second ejection lasts twice as long.
        let t1 = t0 + Duration::from_secs(20);
        for _ in 0..2 {
            s.failure(&p, t1, 0, 2);
        }
        assert_eq!(
            s.failure(&p, t1, 0, 2),
            FailureOutcome::Ejected {
                for_: Duration::from_secs(20)
            }
        );
    }

    #[test]
    fn success_resets_the_count() {
        let p = policy(2, 10, 100);
        let s = OutlierState::default();
        let t = Instant::now();
        s.failure(&p, t, 0, 1);
        s.success();
        assert_eq!(s.failure(&p, t, 0, 1), FailureOutcome::Counted);
    }

    #[test]
    fn max_ejection_percent_caps_ejections_but_allows_one() {
        let p = policy(1, 10, 10);
        assert_eq!(p.max_ejected(2), 1);
        assert_eq!(p.max_ejected(30), 3);
        let s = OutlierState::default();
        assert_eq!(
            s.failure(&p, Instant::now(), 1, 2),
            FailureOutcome::NotEjectedAtCap
        );
        assert!(policy(1, 10, 0).max_ejected(10) == 0);
    }

    #[test]
    fn defaults_and_disabled() {
        let p = OutlierPolicy::from_config(&OutlierDetection::default()).unwrap();
        assert_eq!(
            (
                p.consecutive_errors,
                p.base_ejection_time,
                p.max_ejection_percent
            ),
            (5, Duration::from_secs(30), 10)
        );
        let gw = OutlierPolicy::from_config(&OutlierDetection {
            consecutive_gateway_errors: Some(2),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(gw.consecutive_errors, 2);
        let off = OutlierDetection {
            consecutive_5xx_errors: Some(0),
            ..Default::default()
        };
        assert!(OutlierPolicy::from_config(&off).is_none());
    }
}
