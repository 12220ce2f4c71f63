//! Exact weighted choice.
//!
//! Envoy draws a weighted cluster at random per connection, so an 80/20 split is only 80/20
//! on average: ten connections can easily show 10/0 or 6/4. veer uses smooth weighted
//! round-robin (as nginx does for upstreams): deterministic, and every window of
//! `sum(weights)/gcd` consecutive picks carries the configured shares exactly, interleaved
//! rather than bunched (80/20 → `a a b a a`, so exactly 2 of every 10). Cost: one uncontended
//! mutex per pick, held for a loop over the (few) destinations.

use std::sync::Mutex;

use smallvec::SmallVec;

use serde::Serialize;

/// A relative route weight. Istio weights need not sum to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Weight(pub u32);

/// Smooth weighted round-robin over a fixed list of weights.
///
/// `repr(C)`, the state first: the rule's hot fields follow it (see `RouteRule`).
#[derive(Debug)]
#[repr(C)]
pub struct SmoothWeighted {
    /// `(weight, current)` per destination, side by side and, for up to two destinations
    /// (an A/B split), inside the rule itself: a lookup to a cold service pays a cache miss
    /// for every pointer it follows, and this one was followed on every pick. (Four inline
    /// pushed the rule's destinations onto another cache line.)
    state: Mutex<SmallVec<[(i64, i64); 2]>>,
    total: i64,
    /// One destination: no lock taken (the common rule).
    single: bool,
}

impl SmoothWeighted {
    /// `None` when every weight is zero (nothing can be picked).
    pub fn new(weights: &[Weight]) -> Option<Self> {
        let g = weights.iter().fold(0u32, |g, w| gcd(g, w.0));
        if g == 0 {
            return None;
        }
        // Reducing by the gcd keeps the numbers small; the sequence is scale-invariant.
        let state: SmallVec<[(i64, i64); 2]> =
            weights.iter().map(|w| (i64::from(w.0 / g), 0)).collect();
        let total = state.iter().map(|(w, _)| w).sum();
        Some(SmoothWeighted {
            single: state.len() == 1,
            total,
            state: Mutex::new(state),
        })
    }

    /// The index of the next destination. Zero-weight entries are never picked.
    pub fn pick(&self) -> usize {
        if self.single {
            return 0;
        }
        // A poisoned lock only means another pick panicked mid-loop; the state is still a
        // valid vector of integers, so keep going rather than take the proxy down.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut best = 0;
        for i in 0..state.len() {
            state[i].1 += state[i].0;
            if state[i].1 > state[best].1 {
                best = i;
            }
        }
        state[best].1 -= self.total;
        best
    }

    /// Continues `old`'s sequence when the weights are the same, so a reload that leaves a
    /// rule as it was does not restart its split: restarting would favour the first
    /// destinations whenever reloads come more often than `sum(weights)/gcd` connections
    /// (an 80/20 rule given 2 connections per reload would send all of them to the 80).
    pub fn resume_from(&self, old: &SmoothWeighted) {
        if std::ptr::eq(self, old) || self.single {
            return;
        }
        let old = old.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut new = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if new.len() == old.len() && new.iter().zip(old.iter()).all(|(n, o)| n.0 == o.0) {
            new.copy_from_slice(&old);
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(weights: &[u32], n: usize) -> Vec<usize> {
        let w: Vec<Weight> = weights.iter().map(|&w| Weight(w)).collect();
        let s = SmoothWeighted::new(&w).unwrap();
        let mut c = vec![0; weights.len()];
        for _ in 0..n {
            c[s.pick()] += 1;
        }
        c
    }

    #[test]
    fn eighty_twenty_is_exact_in_every_window_of_ten() {
        let s = SmoothWeighted::new(&[Weight(80), Weight(20)]).unwrap();
        for _window in 0..10 {
            let twos = (0..10).filter(|_| s.pick() == 1).count();
            assert_eq!(twos, 2);
        }
    }

    #[test]
    fn picks_are_interleaved_not_bunched() {
        let s = SmoothWeighted::new(&[Weight(80), Weight(20)]).unwrap();
        let seq: Vec<usize> = (0..5).map(|_| s.pick()).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 0]);
    }

    #[test]
    fn weights_need_not_sum_to_100() {
        assert_eq!(counts(&[3, 1], 100), vec![75, 25]);
        assert_eq!(counts(&[1, 1, 1], 99), vec![33, 33, 33]);
        assert_eq!(counts(&[70, 20, 10], 100), vec![70, 20, 10]);
    }

    #[test]
    fn zero_weight_gets_nothing_and_all_zero_is_none() {
        assert_eq!(counts(&[0, 5], 50), vec![0, 50]);
        assert_eq!(counts(&[5, 0, 5], 50), vec![25, 0, 25]);
        assert!(SmoothWeighted::new(&[Weight(0), Weight(0)]).is_none());
    }

    #[test]
    fn a_resumed_sequence_continues_where_the_old_one_was() {
        let old = SmoothWeighted::new(&[Weight(80), Weight(20)]).unwrap();
        let mut seq: Vec<usize> = (0..2).map(|_| old.pick()).collect();
        let new = SmoothWeighted::new(&[Weight(8), Weight(2)]).unwrap(); // the same split
        new.resume_from(&old);
        seq.extend((0..8).map(|_| new.pick()));
        let fresh: Vec<usize> = {
            let s = SmoothWeighted::new(&[Weight(80), Weight(20)]).unwrap();
            (0..10).map(|_| s.pick()).collect()
        };
        assert_eq!(seq, fresh, "as if there had been no reload");
        // Other weights: a fresh start (the old state means nothing for them).
        let other = SmoothWeighted::new(&[Weight(50), Weight(50)]).unwrap();
        other.resume_from(&old);
        assert_eq!((0..2).map(|_| other.pick()).collect::<Vec<_>>(), vec![0, 1]);
    }

    #[test]
    fn single_destination_always_wins() {
        assert_eq!(counts(&[7], 10), vec![10]);
    }
}
