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
//! Up to six endpoints (over both destinations) are in the cell itself; a destination with
//! more has its endpoints in a dense array beside the table (one more trip, still into
//! compact memory).
//!
//! It covers what most listeners are: a first rule without conditions and one or two
//! destinations (or no rule and the service's own cluster), on a port without TLS rules.
//! It picks the endpoint too in clusters of IPv4 endpoints balanced by least request,
//! random, source-IP hash or round robin, without outlier detection; in other clusters
//! the cell names the cluster and the cluster picks ([`Routed::endpoint`] is `None`).
//! Other listeners (and IPv6, CIDR and gateway listeners, and rules whose cell found the
//! slab full) are routed by [`Listener::route`], on the same state.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::cells::{RouteCell, RouteHandle, LOADS, ROUTES};
use super::lb::{self, LbPolicy};
use super::snapshot::{Cluster, Endpoint, EndpointAddr, Listener, RouteRule};
use super::weighted::{pick_in_word, WordWeights};
use crate::addr::ClientAddr;

/// Endpoints a cell holds, over its one or two destinations.
const INLINE_ENDPOINTS: usize = 6;

// Cell layout, in words. Word 0 is the owner's: a rule's pick state, a listener's unmatched
// count. What the pick reads fills the rest of the first line; the addresses, read once it
// is made, the second (fetched beside the first by the adjacent-line prefetcher, or while
// the loads are).
/// What the cell routes by: [`KIND_SINGLE`], [`KIND_PAIR`] or [`KIND_DEFAULT`].
const HEAD: usize = 1;
/// A two-way split's reduced weights, 32 bits each.
const WEIGHTS: usize = 2;
/// Two words, one a destination: cluster id (32) | endpoints (8) | first endpoint (8) |
/// balancing policy (8) | [`SPILLED`] (8).
const DEST: usize = 3;
/// Three words: the [`LOADS`] indexes of two endpoints each (32 + 32).
const LOAD: usize = 5;
/// Six words, one an endpoint: IPv4 address (32) | port (16).
const ADDR: usize = 8;
/// Two words, one a destination: if its endpoints did not fit, offset (32) | count (32) in
/// [`Fast`]'s spilled endpoints; if they did and it balances by round robin, the
/// [`LOADS`] index of its cluster's cursor.
const SPILL: usize = 14;
/// In a destination's word: its endpoints are spilled.
const SPILLED: u64 = 1 << 56;
/// In a destination's word: the cell names only the cluster, which picks the endpoint
/// itself (see [`coverable`]).
const CLUSTER_ONLY: u64 = 1 << 57;

const KIND_SINGLE: u64 = 1;
const KIND_PAIR: u64 = 2;
const KIND_DEFAULT: u64 = 3;

/// No cell: the listener is routed by [`Listener::route`].
const NO_CELL: u32 = u32::MAX;

/// An endpoint that did not fit in its cell: address as in [`ADDR`], and its load's index.
#[derive(Debug, Clone, Copy)]
struct Spilled {
    addr: u64,
    load: u32,
}

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
    /// The endpoint, when the table picked it; `None` leaves the pick to the cluster
    /// ([`Cluster::pick_excluding`]), as for a listener the table does not decide.
    pub endpoint: Option<Picked>,
}

/// An endpoint the table picked.
#[derive(Debug, Clone, Copy)]
pub struct Picked {
    /// Index into the cluster's endpoints.
    pub index: usize,
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
    spilled: Box<[Spilled]>,
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
    spilled: Vec<Spilled>,
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
        let id = &mut |c: &Arc<Cluster>| {
            *ids.entry(Arc::as_ptr(c)).or_insert_with(|| {
                clusters.push(c.clone());
                u32::try_from(clusters.len() - 1).expect("under 4 G clusters")
            })
        };
        let cell = fill(l, id, &mut self.spilled);
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
            spilled: self.spilled.into_boxed_slice(),
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
        let (dest, rule) = match cell.get(HEAD) {
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
        if meta & CLUSTER_ONLY != 0 {
            return Some(Ok(Routed {
                listener,
                rule,
                cluster,
                endpoint: None,
            }));
        }
        let policy = decode_policy((meta >> 48) & 0xff);
        let ip = client.0.ip();
        // Only round robin reads a cursor, and only from a destination in the cell.
        static NO_CURSOR: AtomicU64 = AtomicU64::new(0);
        let (endpoint, addr) = if meta & SPILLED != 0 {
            let w = cell.get(SPILL + dest);
            let (offset, count) = ((w & 0xffff_ffff) as usize, (w >> 32) as usize);
            let eps = &self.spilled[offset..offset + count];
            let load = |i: usize| LOADS.get(eps[i].load).load(Ordering::Relaxed);
            let key = |i: usize| unpack(eps[i].addr).to_string();
            let i = lb::pick_by(policy, count, load, key, &NO_CURSOR, ip)?;
            (i, unpack(eps[i].addr))
        } else {
            let count = ((meta >> 32) & 0xff) as usize;
            let first = ((meta >> 40) & 0xff) as usize;
            let load = |k: usize| {
                let w = cell.get(LOAD + (first + k) / 2);
                let index = if (first + k) % 2 == 0 { w } else { w >> 32 } as u32;
                LOADS.get(index).load(Ordering::Relaxed)
            };
            let key = |k: usize| unpack(cell.get(ADDR + first + k)).to_string();
            let cursor = match policy {
                LbPolicy::RoundRobin => LOADS.get(cell.get(SPILL + dest) as u32),
                _ => &NO_CURSOR,
            };
            let i = lb::pick_by(policy, count, load, key, cursor, ip)?;
            (i, unpack(cell.get(ADDR + first + i)))
        };
        Some(Ok(Routed {
            listener,
            rule,
            cluster,
            endpoint: Some(Picked {
                index: endpoint,
                addr: SocketAddr::V4(addr),
            }),
        }))
    }
}

/// An IPv4 endpoint as a cell or the spilled array keeps it: address (32) | port (16).
fn pack(a: SocketAddrV4) -> u64 {
    u64::from(u32::from(*a.ip())) << 16 | u64::from(a.port())
}

fn unpack(w: u64) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::from((w >> 16) as u32), w as u16)
}

fn v4_endpoint(e: &Endpoint) -> Option<SocketAddrV4> {
    match e.address {
        EndpointAddr::Socket(SocketAddr::V4(a)) => Some(a),
        _ => None,
    }
}

fn encode_policy(p: LbPolicy) -> Option<u64> {
    match p {
        LbPolicy::LeastRequest => Some(0),
        LbPolicy::Random => Some(1),
        LbPolicy::SourceIpHash => Some(2),
        LbPolicy::RoundRobin => Some(3),
        // Connects to the original destination, not to an endpoint.
        LbPolicy::Passthrough => None,
    }
}

fn decode_policy(code: u64) -> LbPolicy {
    match code {
        1 => LbPolicy::Random,
        2 => LbPolicy::SourceIpHash,
        3 => LbPolicy::RoundRobin,
        _ => LbPolicy::LeastRequest,
    }
}

/// Whether a lookup can pick among `c`'s endpoints in a cell: the same choice
/// [`Cluster::pick_excluding`] makes when nothing is excluded. Other clusters (outlier
/// detection, which needs the clock and the ejections; DNS or IPv6 endpoints; the original
/// destination; a problem to report; round robin over more endpoints than fit) are named
/// by the cell and pick for themselves.
fn coverable(c: &Cluster) -> bool {
    c.problem.is_none()
        && !c.original_destination
        && c.policy.outlier_detection.is_none()
        && encode_policy(c.policy.load_balancer).is_some()
        && (c.policy.load_balancer != LbPolicy::RoundRobin || c.cursor_index().is_some())
        && !c.endpoints.is_empty()
        && c.endpoints
            .iter()
            .all(|e| v4_endpoint(e).is_some() && e.load.index().is_some())
}

/// Fills the cell that routes `l` (its first rule's, or its own), if the table covers it;
/// returns the cell's index or [`NO_CELL`]. `id` numbers clusters for the table;
/// endpoints that do not fit in the cell go to `spilled`.
fn fill(
    l: &Listener,
    id: &mut impl FnMut(&Arc<Cluster>) -> u32,
    spilled: &mut Vec<Spilled>,
) -> u32 {
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
    // A cell from the heap (the slab was full) has no index to put in a slot.
    let Some(index) = handle.index() else {
        return NO_CELL;
    };
    let cell: &RouteCell = handle;
    // A round-robin destination keeps its cursor's index in its spill word, so it must fit
    // in the cell (as the loop below places them: in order, while there is room); one that
    // does not picks for itself.
    let mut room = INLINE_ENDPOINTS;
    let mut picks = [false; 2];
    for (d, c) in dests.iter().enumerate() {
        let n = c.endpoints.len();
        let fits = n <= room;
        let coverable = coverable(c);
        if fits && coverable {
            room -= n;
        }
        picks[d] = coverable && (fits || c.policy.load_balancer != LbPolicy::RoundRobin);
    }
    let mut slot = 0usize;
    let mut loads = [0u64; INLINE_ENDPOINTS];
    for (d, c) in dests.iter().enumerate() {
        if !picks[d] {
            cell.set(DEST + d, u64::from(id(c)) | CLUSTER_ONLY);
            continue;
        }
        let policy = encode_policy(c.policy.load_balancer).expect("coverable");
        let n = c.endpoints.len();
        let mut meta = u64::from(id(c)) | policy << 48;
        let endpoints = c.endpoints.iter().map(|e| {
            let load = e.load.index().expect("coverable: in the slab");
            (pack(v4_endpoint(e).expect("coverable")), load)
        });
        if slot + n <= INLINE_ENDPOINTS {
            meta |= (n as u64) << 32 | (slot as u64) << 40;
            if let Some(cursor) = c.cursor_index() {
                cell.set(SPILL + d, u64::from(cursor));
            }
            for (addr, load) in endpoints {
                cell.set(ADDR + slot, addr);
                loads[slot] = u64::from(load);
                slot += 1;
            }
        } else {
            let offset = u32::try_from(spilled.len()).expect("under 4 G endpoints");
            spilled.extend(endpoints.map(|(addr, load)| Spilled { addr, load }));
            cell.set(SPILL + d, u64::from(offset) | (n as u64) << 32);
            meta |= SPILLED;
        }
        cell.set(DEST + d, meta);
    }
    for (w, pair) in loads.chunks(2).enumerate() {
        cell.set(LOAD + w, pair[0] | pair[1] << 32);
    }
    cell.set(WEIGHTS, weights);
    cell.set(HEAD, kind);
    index
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
