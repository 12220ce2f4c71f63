//! The async runtime the proxy runs on, and opt-in busy polling.
//!
//! A worker with nothing to do sleeps in `epoll_wait`, and waking it when a packet arrives
//! costs a few microseconds on bare metal and more in a virtual machine (an interrupt to a
//! halted virtual CPU). A proxy pays that twice per round trip, once each way. With busy
//! polling (`--busy-poll 50us`) the worker keeps checking its epoll for that long after its
//! last piece of work before it sleeps, as Seastar, netty's `EpollBusyWait` and glommio can:
//! a request that arrives meanwhile is picked up at once. The cost is CPU: up to the budget
//! after every burst of work, all of a core under steady back-to-back traffic, and messages
//! further apart than the budget gain nothing (README, Performance: on a 2-vCPU VM shared
//! with client and server, ping-pong gained in most runs, 10 000 msg/s did not). It is off by
//! default (a sidecar shares its pod's CPU with the application); the time spent spinning is
//! counted (`/stats`: `busy_poll_seconds`) so the CPU it took can be told apart from work.
//!
//! Only with one worker (a current-thread runtime): in tokio's multi-thread runtime only the
//! worker holding the I/O driver waits in `epoll_wait`, so another worker spinning would see
//! events it cannot take.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};

/// Nanoseconds spent spinning, process-wide.
static SPUN_NANOS: AtomicU64 = AtomicU64::new(0);

/// Seconds the runtime has spent busy polling (0 unless `--busy-poll` is on).
pub fn busy_poll_seconds() -> f64 {
    SPUN_NANOS.load(Ordering::Relaxed) as f64 / 1e9
}

/// What became of a request for busy polling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusyPoll {
    Off,
    /// Spinning on this many epoll descriptors (the driver's and tokio's clone of it).
    On {
        descriptors: usize,
    },
    /// Asked for but not possible here; the runtime sleeps as usual.
    Unavailable(String),
}

/// Builds the runtime: `workers` threads (1: a current-thread runtime, no cross-thread
/// wake-ups), busy polling for `busy_poll` after each burst of work when set, which needs
/// `workers == 1`.
pub fn build(
    workers: usize,
    busy_poll: Option<Duration>,
) -> io::Result<(tokio::runtime::Runtime, BusyPoll)> {
    let Some(budget) = busy_poll.filter(|d| !d.is_zero()) else {
        return Ok((builder(workers).build()?, BusyPoll::Off));
    };
    if workers > 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "busy polling needs a single worker (concurrency 1), not {workers}: with \
                 several, only the one holding the I/O driver waits on its events"
            ),
        ));
    }
    let (rt, fds) = busy_runtime(budget)?;
    if fds.is_empty() {
        return Ok((
            rt,
            BusyPoll::Unavailable("the runtime's epoll descriptor was not found".into()),
        ));
    }
    Ok((
        rt,
        BusyPoll::On {
            descriptors: fds.len(),
        },
    ))
}

fn builder(workers: usize) -> tokio::runtime::Builder {
    let mut b = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    b.enable_all();
    b
}

/// A current-thread runtime whose park hook spins on the epoll descriptors returned with it
/// (none found: the hook does nothing).
fn busy_runtime(budget: Duration) -> io::Result<(tokio::runtime::Runtime, Arc<[OwnedFd]>)> {
    // The park hook exists before the descriptors are known: it finds them here once the
    // runtime is built, and does nothing until then.
    let epolls: Arc<OnceLock<Arc<[OwnedFd]>>> = Arc::default();
    let hook = epolls.clone();
    let (rt, fds) = crate::sys::epolls_created_by(|| {
        builder(1)
            .on_thread_park(move || {
                if let Some(fds) = hook.get() {
                    spin(fds, budget, &SPUN_NANOS);
                }
            })
            .build()
    })?;
    let fds: Arc<[OwnedFd]> = fds.into();
    let _ = epolls.set(fds.clone());
    Ok((rt?, fds))
}

/// Why a spin ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpinEnd {
    /// Something is readable: the runtime's `epoll_wait` will return at once.
    Ready,
    /// Nothing came within the budget: the runtime goes to sleep.
    Budget,
}

/// Polls `fds` until one is readable or `budget` has passed, adding the time to `spun`
/// (nanoseconds). Each round is one `poll(2)` with a zero timeout and one clock read (vDSO),
/// ~0.3 µs.
pub fn spin(fds: &[OwnedFd], budget: Duration, spun: &AtomicU64) -> SpinEnd {
    let start = Instant::now();
    // Built per park (one small allocation), not kept: a PollFd borrows its descriptor.
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
        .collect();
    let end = loop {
        if crate::sys::any_readable(&mut polled) {
            break SpinEnd::Ready;
        }
        if start.elapsed() >= budget {
            break SpinEnd::Budget;
        }
        std::hint::spin_loop();
    };
    let took = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    spun.fetch_add(took, Ordering::Relaxed);
    end
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    #[test]
    fn a_spin_ends_when_a_descriptor_is_readable_and_only_then() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let fds = [OwnedFd::from(b)];
        let spun = AtomicU64::new(0);
        assert_eq!(spin(&fds, Duration::from_millis(2), &spun), SpinEnd::Budget);
        assert!(
            spun.load(Ordering::Relaxed) >= 2_000_000,
            "the time spun is counted"
        );
        a.write_all(b"x").unwrap();
        assert_eq!(spin(&fds, Duration::from_secs(60), &spun), SpinEnd::Ready);
    }

    #[test]
    fn busy_polling_needs_a_single_worker() {
        let err = build(2, Some(Duration::from_micros(50))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let (_rt, state) = build(2, None).unwrap();
        assert_eq!(state, BusyPoll::Off);
        let (_rt, state) = build(1, Some(Duration::ZERO)).unwrap();
        assert_eq!(state, BusyPoll::Off);
    }

    /// The descriptors the hook spins on are the runtime's own epoll: quiet while nothing
    /// happens, readable once a connection reaches a listener the runtime registered (while
    /// the runtime is not running). Then the runtime serves with its hook spinning.
    #[test]
    fn busy_polling_watches_the_runtimes_own_epoll() {
        let budget = Duration::from_micros(200);
        let (rt, fds) = busy_runtime(budget).unwrap();
        assert!(!fds.is_empty(), "found the runtime's epoll");
        let listener = rt
            .block_on(async { tokio::net::TcpListener::bind("127.0.0.1:0").await })
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let probe = AtomicU64::new(0);
        assert_eq!(
            spin(&fds, Duration::from_millis(5), &probe),
            SpinEnd::Budget
        );
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        assert_eq!(
            spin(&fds, Duration::from_secs(10), &probe),
            SpinEnd::Ready,
            "the connection shows on the descriptors the hook watches"
        );
        let before = busy_poll_seconds();
        let echoed = std::thread::scope(|s| {
            s.spawn(|| {
                rt.block_on(async {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let (mut conn, _) = listener.accept().await.unwrap();
                    let mut buf = [0u8; 5];
                    conn.read_exact(&mut buf).await.unwrap();
                    conn.write_all(&buf).await.unwrap();
                })
            });
            // The runtime waits for the request meanwhile: it parks, so the hook spins.
            std::thread::sleep(Duration::from_millis(20));
            client.write_all(b"hello").unwrap();
            let mut buf = [0u8; 5];
            client.read_exact(&mut buf).unwrap();
            buf
        });
        assert_eq!(&echoed, b"hello");
        // Only this test's runtime spins with the process-wide counter.
        assert!(
            busy_poll_seconds() > before,
            "the hook spun while the runtime waited"
        );
    }
}
