//! The lookup a new connection makes, packed so that it stays flat as the mesh grows.
//!
//! A snapshot's listeners, rules, clusters and endpoints are separate allocations spread
//! over tens of MB at 10 000 services; following them from an original destination to an
//! endpoint read five or six cache lines there, each a trip to memory (~100-150 ns on the
//! project's VM), and the lookup took 4× as long as at 10 services. This table holds, for
//! every IPv4 service address, the index of a [`RouteCell`] with the whole decision in it:
//! the pick state of the listener's rule, each destination's cluster and endpoints (address
//! and the index of its active-connection count). A lookup reads a slot here, the cell (two
//! adjacent lines) and two counts: three dependent trips, into a few MB.
//!
//! It covers what most listeners are: a first rule without conditions and one or two
//! destinations (or no rule and the service's own cluster), on a port without TLS rules,
//! to clusters with up to six IPv4 endpoints all told, least-request, random or
//! source-IP-hash balancing and no outlier detection. Everything else (and IPv6, CIDR and
//! gateway listeners) is routed by [`Listener::route`], on the same state.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::cells::{RouteCell, RouteHandle, LOADS, ROUTES};
use super::lb::{self, Candidate, LbPolicy};
use super::snapshot::{Cluster, EndpointAddr, Listener, RouteRule};
use super::weighted::{pick_in_word, WordWeights};
use crate::addr::ClientAddr;

/// Endpoints a cell holds, over its one or two destinations.
const MAX_ENDPOINTS: usize = 6;

// Cell layout, in words. Word 0 is the owner's: a rule's pick state, a listener's unmatched
// count. What the pick reads fills the rest of the first line; the addresses, read once it
// is made, the second (fetched beside the first by the adjacent-line prefetcher, or while
// the loads are).
/// Kind (8 bits) | destinations (8 bits).
const HEAD: usize = 1;
/// A two-way split's reduced weights, 32 bits each.
const WEIGHTS: usize = 2;
/// Two words, one a destination: cluster id (32) | endpoints (8) | first endpoint (8) |
/// balancing policy (8).
const DEST: usize = 3;
/// Three words: the [`LOADS`] indexes of two endpoints each (32 + 32).
const LOAD: usize = 5;
/// Six words, one an endpoint: IPv4 address (32) | port (16).
const ADDR: usize = 8;

const KIND_SINGLE: u64 = 1;
const KIND_PAIR: u64 = 2;
const KIND_DEFAULT: u64 = 3;

/// No cell: the listener is routed by [`Listener::route`].
const NO_CELL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// `1 << 63 | ip << 16 | port`; 0 is an empty slot.
    key: u64,
    listener: u32,
    cell: u32,
}

/// A routing decision made in the table: everything the connection needs next, found
/// without reading the listener, rule, cluster or endpoint records (references to them are
/// computed, not followed).
#[derive(Debug, Clone, Copy)]
pub struct Routed<'a> {
    pub listener: &'a Arc<Listener>,
    /// Index into `listener.rules` of the rule that applied; `None`: the default cluster.
    pub rule: Option<usize>,
    pub cluster: &'a Arc<Cluster>,
    /// Index into `cluster.endpoints` of the endpoint picked.
    pub endpoint: usize,
    pub addr: SocketAddr,
}

impl<'a> Routed<'a> {
    pub fn rule(&self) -> Option<&'a RouteRule> {
        self.rule.and_then(|i| self.listener.rules.get(i))
    }
}

/// The IPv4 service addresses of a snapshot, open-addressed, with their listeners and the
/// clusters cells name. Never empty of slots: [`FastBuilder::finish`] makes at least four.
#[derive(Debug)]
pub struct Fast {
    slots: Box<[Slot]>,
    /// 64 − log2(slots): a hash keeps its top bits.
    shift: u32,
    listeners: Vec<Arc<Listener>>,
    clusters: Vec<Arc<Cluster>>,
}

fn key(ip: Ipv4Addr, port: u16) -> u64 {
    1 << 63 | u64::from(u32::from(ip)) << 16 | u64::from(port)
}

/// Builds a [`Fast`] table alongside the listeners: each listener's cell is filled as soon
/// as the listener is made, while what it reads (rules, clusters, endpoints) is still in
/// cache. Filling them afterwards, from the finished snapshot, took 20 ms at 10 000
/// services, nearly all of it misses to memory.
#[derive(Debug, Default)]
pub struct FastBuilder {
    listeners: Vec<Arc<Listener>>,
    clusters: Vec<Arc<Cluster>>,
    cluster_ids: FxHashMap<*const Cluster, u32>,
    keys: Vec<Slot>,
}

/// A listener as [`FastBuilder::add`] numbered it, to index it at its addresses.
#[derive(Debug, Clone, Copy)]
pub struct Added {
    listener: u32,
    cell: u32,
}

impl FastBuilder {
    /// Takes `l` into the table (filling its cell if the table can route it).
    pub fn add(&mut self, l: &Arc<Listener>) -> Added {
        let listener = u32::try_from(self.listeners.len()).expect("under 4 G listeners");
        self.listeners.push(l.clone());
        let (clusters, ids) = (&mut self.clusters, &mut self.cluster_ids);
        let cell = fill(l, &mut |c: &Arc<Cluster>| {
            *ids.entry(Arc::as_ptr(c)).or_insert_with(|| {
                clusters.push(c.clone());
                u32::try_from(clusters.len() - 1).expect("under 4 G clusters")
            })
        });
        Added { listener, cell }
    }

    /// Routes connections to `addr` by `added`. IPv6 addresses are left to the snapshot's
    /// map.
    pub fn index(&mut self, addr: SocketAddr, added: Added) {
        if let SocketAddr::V4(a) = addr {
            self.keys.push(Slot {
                key: key(*a.ip(), a.port()),
                listener: added.listener,
                cell: added.cell,
            });
        }
    }

    pub fn finish(self) -> Fast {
        // At most 70% full: a probe mostly ends in the first line it reads.
        let size = (self.keys.len() * 10 / 7 + 1).next_power_of_two().max(4);
        let mut fast = Fast {
            slots: vec![Slot::default(); size].into_boxed_slice(),
            shift: 64 - size.trailing_zeros(),
            listeners: self.listeners,
            clusters: self.clusters,
        };
        for slot in self.keys {
            fast.insert(slot);
        }
        fast
    }
}

impl Fast {
    fn home(&self, key: u64) -> usize {
        // Fibonacci hashing: the multiply spreads neighbouring addresses; the top bits index.
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    fn insert(&mut self, slot: Slot) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(slot.key);
        while self.slots[i].key != 0 && self.slots[i].key != slot.key {
            i = (i + 1) & mask;
        }
        self.slots[i] = slot;
    }

    fn find(&self, ip: Ipv4Addr, port: u16) -> Option<&Slot> {
        let key = key(ip, port);
        let mask = self.slots.len() - 1;
        let mut i = self.home(key);
        loop {
            let slot = &self.slots[i];
            if slot.key == key {
                return Some(slot);
            }
            if slot.key == 0 {
                return None;
            }
            i = (i + 1) & mask;
        }
    }

    /// The listener at an IPv4 service address, if any.
    pub fn listener(&self, addr: SocketAddrV4) -> Option<&Arc<Listener>> {
        self.find(*addr.ip(), addr.port())
            .map(|s| &self.listeners[s.listener as usize])
    }

    /// Routes a connection to `addr` in the table: `Ok` with the decision when the
    /// listener's cell covers it, `Err` with the listener when [`Listener::route`] must,
    /// `None` when no service has the address.
    pub fn route(
        &self,
        addr: SocketAddrV4,
        client: ClientAddr,
    ) -> Option<Result<Routed<'_>, &Arc<Listener>>> {
        let slot = self.find(*addr.ip(), addr.port())?;
        let listener = &self.listeners[slot.listener as usize];
        if slot.cell == NO_CELL {
            return Some(Err(listener));
        }
        let cell = ROUTES.get(slot.cell);
        let head = cell.get(HEAD);
        let (dest, rule) = match head & 0xff {
            KIND_SINGLE => (pick_in_word(&cell.words[0], WordWeights::Single), Some(0)),
            KIND_PAIR => {
                let w = cell.get(WEIGHTS);
                let weights = WordWeights::Pair(w & 0xffff_ffff, w >> 32);
                (pick_in_word(&cell.words[0], weights), Some(0))
            }
            _ => {
                cell.words[0].fetch_add(1, Ordering::Relaxed); // unmatched: the default
                (0, None)
            }
        };
        let meta = cell.get(DEST + dest);
        let cluster = &self.clusters[(meta & 0xffff_ffff) as usize];
        let count = ((meta >> 32) & 0xff) as usize;
        let first = ((meta >> 40) & 0xff) as usize;
        let policy = decode_policy((meta >> 48) & 0xff);
        let candidates: [InCell<'_>; MAX_ENDPOINTS] =
            std::array::from_fn(|k| InCell(cell, first + k));
        // Round robin (the only user of the cursor) is not in the table.
        static NO_CURSOR: AtomicUsize = AtomicUsize::new(0);
        let endpoint = lb::pick(policy, &candidates[..count], &NO_CURSOR, client.0.ip())?;
        Some(Ok(Routed {
            listener,
            rule,
            cluster,
            endpoint,
            addr: SocketAddr::V4(candidates[endpoint].addr()),
        }))
    }
}

/// Endpoint `.1` of a cell, as the balancer sees it.
struct InCell<'a>(&'a RouteCell, usize);

impl InCell<'_> {
    fn addr(&self) -> SocketAddrV4 {
        let w = self.0.get(ADDR + self.1);
        SocketAddrV4::new(Ipv4Addr::from((w >> 16) as u32), w as u16)
    }
}

impl Candidate for InCell<'_> {
    fn active(&self) -> u64 {
        let w = self.0.get(LOAD + self.1 / 2);
        let index = if self.1 % 2 == 0 { w } else { w >> 32 } as u32;
        LOADS.get(index).load(Ordering::Relaxed)
    }
    fn hash_key(&self) -> String {
        self.addr().to_string()
    }
}

fn encode_policy(p: LbPolicy) -> Option<u64> {
    match p {
        LbPolicy::LeastRequest => Some(0),
        LbPolicy::Random => Some(1),
        LbPolicy::SourceIpHash => Some(2),
        // The cursor lives in the cluster; passthrough connects to the original destination.
        LbPolicy::RoundRobin | LbPolicy::Passthrough => None,
    }
}

fn decode_policy(code: u64) -> LbPolicy {
    match code {
        1 => LbPolicy::Random,
        2 => LbPolicy::SourceIpHash,
        _ => LbPolicy::LeastRequest,
    }
}

/// Whether a lookup can pick among `c`'s endpoints in a cell: the same choice
/// [`Cluster::pick_excluding`] makes when nothing is excluded.
fn coverable(c: &Cluster) -> bool {
    c.problem.is_none()
        && !c.original_destination
        && c.policy.outlier_detection.is_none()
        && encode_policy(c.policy.load_balancer).is_some()
        && !c.endpoints.is_empty()
        && c.endpoints
            .iter()
            .all(|e| matches!(e.address, EndpointAddr::Socket(SocketAddr::V4(_))))
}

/// Fills the cell that routes `l` (its first rule's, or its own), if the table covers it;
/// returns the cell's index or [`NO_CELL`]. `id` numbers clusters for the table.
fn fill(l: &Listener, id: &mut impl FnMut(&Arc<Cluster>) -> u32) -> u32 {
    if l.tls {
        return NO_CELL; // the SNI must be read first
    }
    let (handle, kind, weights, dests): (&RouteHandle, u64, u64, Vec<&Arc<Cluster>>) = match l
        .rules
        .first()
    {
        Some(r) if r.conditions.is_empty() => match r.picker.in_word() {
            Some(WordWeights::Single) => (&r.hot, KIND_SINGLE, 0, vec![&r.destinations[0].cluster]),
            Some(WordWeights::Pair(a, b)) => (
                &r.hot,
                KIND_PAIR,
                a | b << 32,
                r.destinations.iter().map(|d| &d.cluster).collect(),
            ),
            None => return NO_CELL,
        },
        Some(_) => return NO_CELL,
        None => match (&l.default_cluster, l.unmatched.cell()) {
            (Some(c), Some(cell)) => (cell, KIND_DEFAULT, 0, vec![c]),
            _ => return NO_CELL,
        },
    };
    let cell: &RouteCell = handle;
    let endpoints: usize = dests.iter().map(|c| c.endpoints.len()).sum();
    if endpoints > MAX_ENDPOINTS || !dests.iter().all(|c| coverable(c)) {
        return NO_CELL;
    }
    let mut slot = 0usize;
    let mut loads = [0u64; MAX_ENDPOINTS];
    for (d, c) in dests.iter().enumerate() {
        let policy = encode_policy(c.policy.load_balancer).expect("coverable");
        let meta = u64::from(id(c))
            | (c.endpoints.len() as u64) << 32
            | (slot as u64) << 40
            | policy << 48;
        cell.set(DEST + d, meta);
        for e in &c.endpoints {
            let EndpointAddr::Socket(SocketAddr::V4(a)) = e.address else {
                unreachable!("coverable: IPv4 endpoints only")
            };
            cell.set(
                ADDR + slot,
                u64::from(u32::from(*a.ip())) << 16 | u64::from(a.port()),
            );
            loads[slot] = u64::from(e.load.index());
            slot += 1;
        }
    }
    for (w, pair) in loads.chunks(2).enumerate() {
        cell.set(LOAD + w, pair[0] | pair[1] << 32);
    }
    cell.set(WEIGHTS, weights);
    cell.set(HEAD, kind | (dests.len() as u64) << 8);
    handle.index()
}

/// How a connection to an original destination is routed.
#[derive(Debug)]
pub enum Route<'a> {
    /// Decided in the table.
    Fast(Routed<'a>),
    /// A service owns the destination; [`Listener::route`] decides.
    Listener(&'a Arc<Listener>),
    /// No service owns the destination and the policy is ALLOW_ANY.
    Passthrough,
    /// No service owns the destination and the policy is REGISTRY_ONLY.
    Refused,
}

/// `ip` as the table keys it: IPv4, or an IPv4-mapped IPv6 address.
pub fn v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip.to_canonical() {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}
