//! Exact weighted choice.
//!
//! Envoy draws a weighted cluster at random per connection, so an 80/20 split is only 80/20
//! on average: ten connections can easily show 10/0 or 6/4. veer uses smooth weighted
//! round-robin (as nginx does for upstreams): deterministic, and every window of
//! `sum(weights)/gcd` consecutive picks carries the configured shares exactly, interleaved
//! rather than bunched (80/20 → `a a b a a`, so exactly 2 of every 10).
//!
//! The state is a pick count `n` and each destination's current weight `c`; it starts at
//! zero, and every pick adds each weight to its `c` and takes the total off the winner's.
//! So `c = n·w − total·picks` for every destination, and the picks each destination got
//! are derived from the state, not counted beside it. With one or two destinations (almost
//! every rule: a route or an A/B split) the state is one word, `n` and the first `c` (the
//! second is its negative), kept in the rule's [`RouteCell`](super::cells::RouteCell):
//! a pick is one compare-and-swap there. More destinations, or a two-way split whose
//! reduced weights sum past 2^18, keep their currents behind a mutex (one uncontended lock
//! per pick).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use smallvec::SmallVec;

use serde::Serialize;

/// A relative route weight. Istio weights need not sum to 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Weight(pub u32);

/// Bits of a two-way state word holding the first current weight (two's complement); the
/// pick count takes the 44 above it (1.7·10^13 picks, decades at 10 000 a second).
const C_BITS: u32 = 20;
const C_MASK: u64 = (1 << C_BITS) - 1;
/// Largest reduced total a two-way split keeps in one word: currents stay within
/// ±total, well inside the 20 bits.
const PAIR_MAX_TOTAL: u64 = 1 << 18;

/// Smooth weighted round-robin over a fixed list of weights. The state lives outside (a
/// word in the rule's cell) so a lookup can reach it without the rule; see the module
/// docs.
#[derive(Debug)]
pub struct SmoothWeighted {
    /// Reduced by their gcd: the sequence is scale-invariant and the numbers stay small.
    weights: SmallVec<[u64; 2]>,
    total: u64,
    /// More than two destinations, or a large two-way total: `(n, currents)`.
    general: Option<Mutex<(u64, SmallVec<[i64; 4]>)>>,
}

impl SmoothWeighted {
    /// `None` when every weight is zero (nothing can be picked).
    pub fn new(weights: &[Weight]) -> Option<Self> {
        let g = weights.iter().fold(0u32, |g, w| gcd(g, w.0));
        if g == 0 {
            return None;
        }
        let weights: SmallVec<[u64; 2]> = weights.iter().map(|w| u64::from(w.0 / g)).collect();
        let total = weights.iter().sum();
        let general = (weights.len() > 2 || (weights.len() == 2 && total > PAIR_MAX_TOTAL))
            .then(|| Mutex::new((0, weights.iter().map(|_| 0).collect())));
        Some(SmoothWeighted {
            weights,
            total,
            general,
        })
    }

    /// The reduced weights of a split whose state fits in one word (one or two
    /// destinations): what a lookup needs to pick with [`pick_in_word`].
    pub fn in_word(&self) -> Option<WordWeights> {
        if self.general.is_some() {
            return None;
        }
        Some(match self.weights[..] {
            [_] => WordWeights::Single,
            [a, b] => WordWeights::Pair(a, b),
            _ => return None,
        })
    }

    /// The index of the next destination, advancing `state`. Zero-weight entries are never
    /// picked.
    pub fn pick(&self, state: &AtomicU64) -> usize {
        match &self.general {
            Some(g) => {
                // A poisoned lock only means another pick panicked mid-loop; the state is
                // still valid integers, so keep going rather than take the proxy down.
                let mut g = g.lock().unwrap_or_else(|e| e.into_inner());
                let (n, cur) = &mut *g;
                *n += 1;
                let mut best = 0;
                for i in 0..cur.len() {
                    cur[i] += self.weights[i] as i64;
                    if cur[i] > cur[best] {
                        best = i;
                    }
                }
                cur[best] -= self.total as i64;
                best
            }
            None => pick_in_word(
                state,
                self.in_word()
                    .expect("one or two destinations without a mutex"),
            ),
        }
    }

    /// How many picks each destination has had, derived from the state (`c = n·w −
    /// total·picks`).
    pub fn picks(&self, state: &AtomicU64) -> SmallVec<[u64; 2]> {
        let (n, cur): (u64, SmallVec<[i64; 4]>) = match &self.general {
            Some(g) => g.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            None => {
                let s = state.load(Ordering::Relaxed);
                let (n, c0) = unpack(s);
                match self.weights.len() {
                    1 => (s, SmallVec::from_slice(&[0])),
                    _ => (n, SmallVec::from_slice(&[c0, -c0])),
                }
            }
        };
        self.weights
            .iter()
            .zip(&cur)
            .map(|(&w, &c)| {
                let picks =
                    (i128::from(n) * i128::from(w) - i128::from(c)) / i128::from(self.total);
                u64::try_from(picks).unwrap_or(0)
            })
            .collect()
    }

    /// Continues `old`'s sequence (state `old_state`) in `state` when the weights are the
    /// same, so a reload that leaves a rule as it was does not restart its split:
    /// restarting would favour the first destinations whenever reloads come more often
    /// than `sum(weights)/gcd` connections (an 80/20 rule given 2 connections per reload
    /// would send all of them to the 80). The picks each destination had come along.
    pub fn resume_from(&self, state: &AtomicU64, old: &SmoothWeighted, old_state: &AtomicU64) {
        if std::ptr::eq(self, old) || self.weights != old.weights {
            return;
        }
        match (&self.general, &old.general) {
            (Some(new), Some(old)) => {
                let old = old.lock().unwrap_or_else(|e| e.into_inner()).clone();
                *new.lock().unwrap_or_else(|e| e.into_inner()) = old;
            }
            _ => state.store(old_state.load(Ordering::Relaxed), Ordering::Relaxed),
        }
    }
}

/// A split whose state is one word: one destination (the word counts picks) or two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WordWeights {
    Single,
    Pair(u64, u64),
}

/// One pick of a one-word split: the rule's own pick and a lookup's go through here, on the
/// same word. A compare-and-swap loop, retried only when another thread picked meanwhile.
pub fn pick_in_word(state: &AtomicU64, weights: WordWeights) -> usize {
    let WordWeights::Pair(wa, wb) = weights else {
        state.fetch_add(1, Ordering::Relaxed);
        return 0;
    };
    let total = (wa + wb) as i64;
    let mut picked = 0;
    let _ = state.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| {
        let (n, c0) = unpack(s);
        let a = c0 + wa as i64;
        let b = -c0 + wb as i64; // the second current is always −c0: the sum stays zero
                                 // Ties go to the first, as in the general loop.
        picked = usize::from(b > a);
        let c0 = if picked == 0 { a - total } else { a };
        Some(((n + 1) << C_BITS) | (c0 as u64 & C_MASK))
    });
    picked
}

/// `(n, c0)` of a two-way state word.
fn unpack(s: u64) -> (u64, i64) {
    let c = (s & C_MASK) as i64;
    let c0 = (c << (64 - C_BITS)) >> (64 - C_BITS); // sign-extend the 20 bits
    (s >> C_BITS, c0)
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

    fn split(weights: &[u32]) -> (SmoothWeighted, AtomicU64) {
        let w: Vec<Weight> = weights.iter().map(|&w| Weight(w)).collect();
        (SmoothWeighted::new(&w).unwrap(), AtomicU64::new(0))
    }

    fn counts(weights: &[u32], n: usize) -> Vec<usize> {
        let (s, st) = split(weights);
        let mut c = vec![0; weights.len()];
        for _ in 0..n {
            c[s.pick(&st)] += 1;
        }
        c
    }

    /// The textbook loop, as a reference for the one-word state.
    fn reference(weights: &[i64], n: usize) -> Vec<usize> {
        let total: i64 = weights.iter().sum();
        let mut cur = vec![0i64; weights.len()];
        (0..n)
            .map(|_| {
                let mut best = 0;
                for i in 0..cur.len() {
                    cur[i] += weights[i];
                    if cur[i] > cur[best] {
                        best = i;
                    }
                }
                cur[best] -= total;
                best
            })
            .collect()
    }

    #[test]
    fn eighty_twenty_is_exact_in_every_window_of_ten() {
        let (s, st) = split(&[80, 20]);
        for _window in 0..10 {
            let twos = (0..10).filter(|_| s.pick(&st) == 1).count();
            assert_eq!(twos, 2);
        }
    }

    #[test]
    fn picks_are_interleaved_not_bunched() {
        let (s, st) = split(&[80, 20]);
        let seq: Vec<usize> = (0..5).map(|_| s.pick(&st)).collect();
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
        assert_eq!(counts(&[5, 0], 50), vec![50, 0]);
        assert_eq!(counts(&[5, 0, 5], 50), vec![25, 0, 25]);
        assert!(SmoothWeighted::new(&[Weight(0), Weight(0)]).is_none());
    }

    #[test]
    fn the_one_word_state_follows_the_textbook_loop() {
        // Two-way splits of all kinds, including the largest total kept in one word and one
        // just past it (a mutex then), over several whole periods.
        let pairs = [(80, 20), (1, 1), (99, 1), (1, 99), (37, 63), (7, 5), (3, 0)];
        let big = [(PAIR_MAX_TOTAL - 1, 1), (PAIR_MAX_TOTAL, 1)];
        for (a, b) in pairs.iter().chain(&big) {
            let (s, st) = split(&[*a as u32, *b as u32]);
            assert_eq!(s.in_word().is_some(), a + b <= PAIR_MAX_TOTAL, "{a}/{b}");
            let g = gcd(*a as u32, *b as u32) as i64;
            let steps = if a + b > 1000 {
                3_000
            } else {
                3 * (a + b) as usize
            };
            let want = reference(&[*a as i64 / g, *b as i64 / g], steps);
            let got: Vec<usize> = (0..steps).map(|_| s.pick(&st)).collect();
            assert_eq!(got, want, "{a}/{b}");
            let ones = got.iter().filter(|&&d| d == 1).count() as u64;
            assert_eq!(
                s.picks(&st).to_vec(),
                vec![steps as u64 - ones, ones],
                "picks derived from the state, {a}/{b}"
            );
        }
    }

    #[test]
    fn picks_are_derived_for_every_kind_of_split() {
        for weights in [&[7][..], &[80, 20], &[70, 20, 10], &[0, 3, 1]] {
            let (s, st) = split(weights);
            let mut want = vec![0u64; weights.len()];
            for _ in 0..1234 {
                want[s.pick(&st)] += 1;
            }
            assert_eq!(s.picks(&st).to_vec(), want, "{weights:?}");
        }
    }

    #[test]
    fn a_resumed_sequence_continues_where_the_old_one_was() {
        for weights in [&[80, 20][..], &[70, 20, 10]] {
            let (old, old_st) = split(weights);
            let mut seq: Vec<usize> = (0..2).map(|_| old.pick(&old_st)).collect();
            let scaled: Vec<u32> = weights.iter().map(|w| w / 10).collect();
            let (new, st) = split(&scaled); // the same split
            new.resume_from(&st, &old, &old_st);
            seq.extend((0..8).map(|_| new.pick(&st)));
            let fresh: Vec<usize> = {
                let (s, st) = split(weights);
                (0..10).map(|_| s.pick(&st)).collect()
            };
            assert_eq!(seq, fresh, "as if there had been no reload: {weights:?}");
            let total: u64 = new.picks(&st).iter().sum();
            assert_eq!(total, 10, "the old picks come along");
        }
        // Other weights: a fresh start (the old state means nothing for them).
        let (old, old_st) = split(&[80, 20]);
        old.pick(&old_st);
        let (other, st) = split(&[50, 50]);
        other.resume_from(&st, &old, &old_st);
        assert_eq!(
            (0..2).map(|_| other.pick(&st)).collect::<Vec<_>>(),
            vec![0, 1]
        );
    }

    #[test]
    fn single_destination_always_wins() {
        assert_eq!(counts(&[7], 10), vec![10]);
    }
}
