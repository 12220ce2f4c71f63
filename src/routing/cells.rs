//! Compact, process-wide homes for the state a route lookup reads and writes.
//!
//! At thousands of services a lookup in random order pays a trip to memory for every cache
//! line it touches, and what a trip costs grows with how far apart the lines lie: on the
//! project's VM about 25 ns within 3 MB, 110-150 ns across the 70 MB a 10 000-service
//! snapshot spreads over. So what a lookup needs (a rule's pick state and its destinations'
//! endpoints, an endpoint's active-connection count) is kept here, in dense arrays, rather
//! than in the snapshot's scattered allocations.
//!
//! A cell belongs to one [`Cell`] handle (held by a rule, a listener, an endpoint or a
//! round-robin cluster) and is zeroed and reused when that handle drops; meanwhile anyone
//! may read it by index. A snapshot's lookup table holds indexes of cells its own rules,
//! endpoints and clusters own, so they stay valid for as long as the snapshot does. The slabs live for the whole process and
//! never shrink: their size is the largest number of cells alive at once (two snapshots'
//! worth during a reload).
//!
//! Why not `sharded-slab`: its `get` takes a reference count per access, a locked
//! read-modify-write on the path this module exists to shorten.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// State that can live in a slab: made zeroed, cleared for reuse.
pub trait Zeroed: Sync + Send + 'static {
    fn zeroed() -> Self;
    fn clear(&self);
}

impl Zeroed for AtomicU64 {
    fn zeroed() -> Self {
        AtomicU64::new(0)
    }
    fn clear(&self) {
        self.store(0, Ordering::Relaxed);
    }
}

/// A rule's or a listener's hot state, two cache lines: word 0 is mutable (a rule's pick
/// state, a listener's unmatched-connection count), the rest is what a lookup needs to
/// finish without leaving the cell, written while the snapshot is built (see
/// `snapshot::Fast`). Aligned to the pair of lines the adjacent-line prefetcher fetches
/// together, so the second line comes with the first (glibc happens to align the chunks so
/// today; this makes it a guarantee rather than luck).
#[derive(Debug)]
#[repr(C, align(128))]
pub struct RouteCell {
    pub words: [AtomicU64; ROUTE_WORDS],
}

pub const ROUTE_WORDS: usize = 16;

impl Zeroed for RouteCell {
    fn zeroed() -> Self {
        RouteCell {
            words: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
    fn clear(&self) {
        for w in &self.words {
            w.store(0, Ordering::Relaxed);
        }
    }
}

impl RouteCell {
    pub fn get(&self, word: usize) -> u64 {
        self.words[word].load(Ordering::Relaxed)
    }

    /// Written before the snapshot is published; the swap that publishes it orders these
    /// stores before any lookup's loads.
    pub fn set(&self, word: usize, value: u64) {
        self.words[word].store(value, Ordering::Relaxed);
    }
}

/// Chunks per slab. A chunk holds `1 << BITS` cells, is allocated whole (and written, so
/// resident) the first time one of its cells is handed out, and is kept at 32 KiB: a
/// proxy with a small config pays that much per slab, not more. With 4096 chunks a slab
/// holds 1 M route cells or 16 M loads; a 10 000-service mesh uses about 20 000 route
/// cells and 200 000 loads per snapshot. Past that, cells come from the heap (see
/// [`Cell`]).
const MAX_CHUNKS: usize = 1 << 12;

/// A growable array of `T` whose cells never move, indexed by `u32`; `1 << BITS` cells a
/// chunk.
pub struct Slab<T: Zeroed, const BITS: u32> {
    chunks: [OnceLock<Box<[T]>>; MAX_CHUNKS],
    next: AtomicU32,
    free: Mutex<Vec<u32>>,
    /// Whether a full slab has been reported (once per process).
    warned: AtomicBool,
}

impl<T: Zeroed, const BITS: u32> Slab<T, BITS> {
    const CHUNK: usize = 1 << BITS;
    /// Cells the slab can index.
    const CAPACITY: u32 = {
        assert!(BITS <= 20, "MAX_CHUNKS << BITS must fit in u32");
        (MAX_CHUNKS << BITS) as u32
    };

    pub const fn new() -> Self {
        Slab {
            chunks: [const { OnceLock::new() }; MAX_CHUNKS],
            next: AtomicU32::new(0),
            free: Mutex::new(Vec::new()),
            warned: AtomicBool::new(false),
        }
    }

    /// The cell at `index`. Two loads from the (small, cached) chunk table, then the cell.
    #[inline]
    pub fn get(&self, index: u32) -> &T {
        let i = index as usize;
        let chunk = self.chunks[i >> BITS]
            .get()
            .expect("a cell index comes from alloc, which made its chunk");
        &chunk[i & (Self::CHUNK - 1)]
    }

    /// A zeroed cell, owned by the returned handle: in the slab while it has room, else on
    /// the heap, where it works the same but has no index (lookup tables then leave its
    /// owner to the slower path that follows pointers). A config too large for the slab
    /// is slower to route, never refused and never a panic.
    pub fn alloc(&'static self) -> Cell<T, BITS> {
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let index = match reused {
            Some(i) => i,
            None => match self
                .next
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    (n < Self::CAPACITY).then_some(n + 1)
                }) {
                Ok(i) => i,
                Err(_) => {
                    if !self.warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            cells = Self::CAPACITY,
                            "routing state slab full: further rules and endpoints are routed \
                             without the lookup table (slower per connection)"
                        );
                    }
                    return Cell(Home::Heap(Box::new(T::zeroed())));
                }
            },
        };
        let chunk = index as usize >> BITS;
        self.chunks[chunk].get_or_init(|| (0..Self::CHUNK).map(|_| T::zeroed()).collect());
        Cell(Home::Slab { slab: self, index })
    }

    /// Cells of the slab handed out and not yet freed (heap cells are not counted).
    pub fn live(&self) -> usize {
        let made = self.next.load(Ordering::Relaxed) as usize;
        made - self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl<T: Zeroed, const BITS: u32> Default for Slab<T, BITS> {
    fn default() -> Self {
        Self::new()
    }
}

/// Ownership of one cell: dereferences to it, frees it on drop. Same size as a slab
/// reference and an index (16 bytes), the heap case included.
pub struct Cell<T: Zeroed, const BITS: u32>(Home<T, BITS>);

enum Home<T: Zeroed, const BITS: u32> {
    Slab {
        slab: &'static Slab<T, BITS>,
        index: u32,
    },
    /// The slab was full.
    Heap(Box<T>),
}

impl<T: Zeroed, const BITS: u32> Cell<T, BITS> {
    /// Where a lookup table can find the cell; `None` for a heap cell.
    pub fn index(&self) -> Option<u32> {
        match self.0 {
            Home::Slab { index, .. } => Some(index),
            Home::Heap(_) => None,
        }
    }
}

impl<T: Zeroed, const BITS: u32> std::ops::Deref for Cell<T, BITS> {
    type Target = T;
    fn deref(&self) -> &T {
        match &self.0 {
            Home::Slab { slab, index } => slab.get(*index),
            Home::Heap(cell) => cell,
        }
    }
}

impl<T: Zeroed, const BITS: u32> Drop for Cell<T, BITS> {
    fn drop(&mut self) {
        if let Home::Slab { slab, index } = self.0 {
            slab.get(index).clear();
            slab.free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(index);
        }
    }
}

impl<T: Zeroed + std::fmt::Debug, const BITS: u32> std::fmt::Debug for Cell<T, BITS> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index() {
            Some(i) => write!(f, "Cell#{i}({:?})", &**self),
            None => write!(f, "Cell#heap({:?})", &**self),
        }
    }
}

/// 256 route cells (128 B) or 4096 loads (8 B) a chunk: 32 KiB.
const ROUTE_BITS: u32 = 8;
const LOAD_BITS: u32 = 12;

/// A rule's or listener's cell.
pub type RouteHandle = Cell<RouteCell, ROUTE_BITS>;
/// An endpoint's active-connection count.
pub type LoadHandle = Cell<AtomicU64, LOAD_BITS>;

/// Rules' and listeners' hot state.
pub static ROUTES: Slab<RouteCell, ROUTE_BITS> = Slab::new();
/// Endpoints' active-connection counts (a least-request pick reads two), and round-robin
/// clusters' cursors.
pub static LOADS: Slab<AtomicU64, LOAD_BITS> = Slab::new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_are_zeroed_freed_and_reused() {
        static S: Slab<AtomicU64, 4> = Slab::new();
        let a = S.alloc();
        let b = S.alloc();
        assert_ne!(a.index(), b.index());
        a.fetch_add(5, Ordering::Relaxed);
        assert_eq!(S.get(a.index().unwrap()).load(Ordering::Relaxed), 5);
        assert_eq!(S.live(), 2);
        let freed = a.index();
        drop(a);
        assert_eq!(S.live(), 1);
        let c = S.alloc();
        assert_eq!(c.index(), freed, "a freed cell is reused");
        assert_eq!(c.load(Ordering::Relaxed), 0, "and comes back zeroed");
        drop((b, c));
        assert_eq!(S.live(), 0);
    }

    #[test]
    fn cells_beyond_one_chunk_stay_put() {
        static S: Slab<AtomicU64, 4> = Slab::new();
        let cells: Vec<_> = (0..40).map(|_| S.alloc()).collect();
        for (i, c) in cells.iter().enumerate() {
            c.store(i as u64, Ordering::Relaxed);
        }
        for (i, c) in cells.iter().enumerate() {
            assert_eq!(S.get(c.index().unwrap()).load(Ordering::Relaxed), i as u64);
        }
    }

    #[test]
    fn a_full_slab_hands_out_heap_cells_and_takes_freed_ones_back() {
        // One cell a chunk: the slab holds MAX_CHUNKS cells.
        static S: Slab<AtomicU64, 0> = Slab::new();
        let full: Vec<_> = (0..MAX_CHUNKS).map(|_| S.alloc()).collect();
        assert!(full.iter().all(|c| c.index().is_some()));
        let heap = S.alloc();
        assert_eq!(heap.index(), None, "past capacity a cell has no index");
        heap.fetch_add(3, Ordering::Relaxed);
        assert_eq!(heap.load(Ordering::Relaxed), 3, "and works all the same");
        assert_eq!(S.live(), MAX_CHUNKS);
        drop(heap); // nothing to give back to the slab
        assert_eq!(S.live(), MAX_CHUNKS);
        let mut full = full;
        let freed = full.pop().unwrap().index();
        let again = S.alloc();
        assert_eq!(
            again.index(),
            freed,
            "a freed slab cell is handed out before the heap"
        );
        assert_eq!(std::mem::size_of::<LoadHandle>(), 16);
    }

    #[test]
    fn a_route_cell_is_two_cache_lines() {
        assert_eq!(std::mem::size_of::<RouteCell>(), 128);
        assert_eq!(std::mem::align_of::<RouteCell>(), 128);
    }
}
