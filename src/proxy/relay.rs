//! Moving bytes both ways until both sides are done.
//!
//! Each direction copies until EOF, then passes the FIN on with `shutdown(Write)` while the
//! other direction keeps flowing (half-close), so a client that sends a request and closes its
//! write side still gets the whole reply. An error in either direction ends both. Byte
//! counters are updated per write, so live views see a long connection's traffic before it
//! closes (cost: two relaxed atomic adds per write).
//!
//! How bytes move, per direction, chosen per read (like HAProxy's `splice-auto`):
//! - small reads (requests, interactive traffic) are copied through a per-thread scratch
//!   buffer and written at once: one read and one write, no pipe, no allocation;
//! - once a read fills `BULK_READ` (16 KiB), the direction is bulk and moves with splice(2) through a
//!   pooled pipe (zero-copy: measured about half the proxy CPU per byte of copying), until a
//!   splice moves less than that again;
//! - if no pipe can be had (out of descriptors) or the kernel refuses to splice these
//!   sockets, the direction keeps copying.
//!
//! Memory: the relay is one hand-written future (a few hundred bytes, see the size test)
//! rather than nested `async` blocks (which measured 2.5 KiB), and it holds no buffer while
//! waiting: bytes read but not yet writable (the destination is full) are kept in an
//! exact-size heap buffer or in the pipe, both released as soon as they are written. An idle
//! connection costs its two sockets and this struct.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, Read};
use std::net::Shutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{Instant as TInstant, Sleep};

use super::metrics::Meter;
use super::record::Transfer;
use crate::routing::ClusterPolicy;

/// Per-thread scratch buffer of the copying path: 64 KiB reads already amortise syscalls.
const SCRATCH: usize = 64 * 1024;
/// A read or splice of at least this much means bulk transfer: splice from then on.
const BULK_READ: usize = 16 * 1024;

/// How a relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// Both sides sent FIN.
    Closed,
    ClientError,
    UpstreamError,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// One side sent FIN and nothing moved for the half-close timeout.
    HalfCloseTimeout,
    /// `maxConnectionDuration` reached.
    MaxDuration,
}

/// Time limits of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// DestinationRule `idleTimeout` (Istio's default 1h; `None` for `0s`).
    pub idle: Option<Duration>,
    pub max_duration: Option<Duration>,
}

impl Default for Limits {
    /// Connections without a DestinationRule (passthrough, inbound): Istio's 1h idle timeout.
    fn default() -> Self {
        Limits {
            idle: Some(Duration::from_secs(3600)),
            max_duration: None,
        }
    }
}

impl From<&ClusterPolicy> for Limits {
    fn from(p: &ClusterPolicy) -> Self {
        Limits {
            idle: p.idle_timeout,
            max_duration: p.max_connection_duration,
        }
    }
}

/// Half-close timeout, process-wide (`--half-close-timeout`). After one side's FIN the other
/// direction keeps flowing, but a pair with nothing moving for this long is closed: past
/// conntrack's 60 s CLOSE_WAIT timeout the NAT entry of a captured connection is gone and
/// the connection is broken anyway, so lingering only leaks descriptors.
static HALF_CLOSE_TIMEOUT: OnceLock<Option<Duration>> = OnceLock::new();
pub const DEFAULT_HALF_CLOSE_TIMEOUT: Duration = Duration::from_secs(50);

/// Sets the half-close timeout once at start-up (`None` disables it).
pub fn set_half_close_timeout(t: Option<Duration>) {
    let _ = HALF_CLOSE_TIMEOUT.set(t);
}

fn half_close_timeout() -> Option<Duration> {
    *HALF_CLOSE_TIMEOUT.get_or_init(|| Some(DEFAULT_HALF_CLOSE_TIMEOUT))
}

pub async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    t: &Transfer,
    limits: Limits,
) -> (RelayEnd, Option<io::Error>) {
    Relay {
        watchdog: Watchdog::new(limits, t),
        client,
        upstream,
        t,
        up: Dir::default(),
        down: Dir::default(),
    }
    .await
}

/// Both directions of one connection and its time limits, as one future.
struct Relay<'a> {
    client: TcpStream,
    upstream: TcpStream,
    t: &'a Transfer,
    /// Client → upstream.
    up: Dir,
    /// Upstream → client.
    down: Dir,
    watchdog: Watchdog,
}

impl Future for Relay<'_> {
    type Output = (RelayEnd, Option<io::Error>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let t = this.t;
        let up = this.up.poll(
            cx,
            &this.client,
            &this.upstream,
            &t.to_upstream,
            &t.client_fin,
            this.down.done,
        );
        if let Poll::Ready(Err((read, e))) = up {
            let end = if read {
                RelayEnd::ClientError
            } else {
                RelayEnd::UpstreamError
            };
            return Poll::Ready((end, Some(e)));
        }
        let down = this.down.poll(
            cx,
            &this.upstream,
            &this.client,
            &t.to_client,
            &t.upstream_fin,
            this.up.done,
        );
        if let Poll::Ready(Err((read, e))) = down {
            let end = if read {
                RelayEnd::UpstreamError
            } else {
                RelayEnd::ClientError
            };
            return Poll::Ready((end, Some(e)));
        }
        if this.up.done && this.down.done {
            return Poll::Ready((RelayEnd::Closed, None));
        }
        this.watchdog.poll(cx, t).map(|end| (end, None))
    }
}

/// Ends the relay when a time limit passes: one timer per connection, set to the next
/// deadline (an hour, by default). Activity is read from the byte meters when the timer
/// fires, so moving bytes costs it nothing; a FIN (seen when the relay is polled) may
/// shorten the idle limit to the half-close timeout.
struct Watchdog {
    limits: Limits,
    start: TInstant,
    last_bytes: u64,
    last_change: TInstant,
    fin: bool,
    /// `None`: no deadline at all (no idle limit, no maximum duration).
    timer: Option<Pin<Box<Sleep>>>,
}

impl Watchdog {
    fn new(limits: Limits, t: &Transfer) -> Self {
        let now = TInstant::now();
        let mut w = Watchdog {
            limits,
            start: now,
            last_bytes: moved(t),
            last_change: now,
            fin: false,
            timer: None,
        };
        w.arm(now);
        w
    }

    /// The idle limit now: the configured one, shortened by the half-close timeout after a FIN.
    fn idle(&self) -> Option<Duration> {
        let half = if self.fin { half_close_timeout() } else { None };
        match (self.limits.idle, half) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn max_end(&self) -> Option<TInstant> {
        self.limits.max_duration.map(|m| self.start + m)
    }

    /// Sets the timer to the next moment worth looking. After activity that is a quarter of
    /// the idle limit away: the last byte moved somewhere since the previous look, so a
    /// timeout fires at most 25% late while an active connection costs one timer wake-up
    /// per quarter period.
    fn arm(&mut self, now: TInstant) {
        let next_look = self.idle().map(|i| (self.last_change + i).min(now + i / 4));
        match [next_look, self.max_end()].into_iter().flatten().min() {
            Some(d) => match &mut self.timer {
                Some(timer) => timer.as_mut().reset(d),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(d))),
            },
            None => self.timer = None,
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>, t: &Transfer) -> Poll<RelayEnd> {
        let fin = t.client_fin.load(Ordering::Relaxed) || t.upstream_fin.load(Ordering::Relaxed);
        if fin != self.fin {
            self.fin = fin;
            self.arm(TInstant::now());
        }
        loop {
            let Some(timer) = &mut self.timer else {
                return Poll::Pending;
            };
            ready!(timer.as_mut().poll(cx));
            let now = TInstant::now();
            if self.max_end().is_some_and(|m| now >= m) {
                return Poll::Ready(RelayEnd::MaxDuration);
            }
            let b = moved(t);
            if b != self.last_bytes {
                (self.last_bytes, self.last_change) = (b, now);
            } else if self.idle().is_some_and(|i| now >= self.last_change + i) {
                let half_close_hit = self.fin
                    && half_close_timeout().is_some_and(|h| self.limits.idle.is_none_or(|i| h < i));
                return Poll::Ready(if half_close_hit {
                    RelayEnd::HalfCloseTimeout
                } else {
                    RelayEnd::IdleTimeout
                });
            }
            self.arm(now);
        }
    }
}

fn moved(t: &Transfer) -> u64 {
    t.to_upstream.get() + t.to_client.get()
}

/// One direction's state.
#[derive(Default)]
struct Dir {
    /// EOF seen and passed on.
    done: bool,
    /// The last read was large: splice the next one.
    bulk: bool,
    /// Splicing failed for lack of a pipe or kernel support: copy from now on.
    no_splice: bool,
    /// The last write was sent with `MSG_MORE` (held back for the FIN that should follow).
    corked: bool,
    /// Read but not yet written.
    pending: Pending,
}

#[derive(Default)]
enum Pending {
    #[default]
    Nothing,
    /// `left` bytes in the pipe, still to be spliced out.
    Pipe { pipe: pipes::Pipe, left: usize },
    /// Bytes the destination could not take yet, from `off` on.
    Bytes { data: Vec<u8>, off: usize },
}

/// An error and whether reading (`true`) or writing failed, so the close reason blames the
/// right side.
type DirError = (bool, io::Error);

fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

const SPLICE_FLAGS: nix::fcntl::SpliceFFlags =
    nix::fcntl::SpliceFFlags::SPLICE_F_MOVE.union(nix::fcntl::SpliceFFlags::SPLICE_F_NONBLOCK);

thread_local! {
    /// The copying path's buffer: bytes pass through it within one poll and never wait in
    /// it, so one per thread serves every connection (no per-connection buffer memory).
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

impl Dir {
    /// Moves bytes from `src` to `dst` until neither can go on without waiting (`Pending`),
    /// EOF has been passed on (`Ready(Ok)`), or a side failed. `last`: the other direction
    /// is done, so this EOF ends the relay.
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        meter: &Meter,
        eof: &AtomicBool,
        last: bool,
    ) -> Poll<Result<(), DirError>> {
        loop {
            if !matches!(self.pending, Pending::Nothing) {
                ready!(self.flush(cx, dst, meter))?;
                continue;
            }
            if self.done {
                return Poll::Ready(Ok(()));
            }
            ready!(src.poll_read_ready(cx)).map_err(|e| (true, e))?;
            let got = if self.bulk && !self.no_splice {
                self.splice_in(src)?
            } else {
                self.copy(cx, src, dst, meter)?
            };
            if got.is_none() && self.corked {
                // The FIN the cork waited for was not there after all: send what is held
                // now (setting TCP_NODELAY pushes pending output).
                self.corked = false;
                socket2::SockRef::from(dst)
                    .set_tcp_nodelay(true)
                    .map_err(|e| (false, e))?;
            }
            if got == Some(0) {
                eof.store(true, Ordering::Relaxed);
                // The last EOF ends the relay and both sockets are closed right after, and
                // close(2) sends the FIN itself (nothing is left unread: both sides said EOF):
                // one syscall less per connection. Otherwise the FIN goes on now; the peer may
                // already be gone, and a failed FIN is not worth failing the relay.
                if !last {
                    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                }
                self.done = true;
            }
        }
    }

    /// Writes out what is pending; `Ready(Ok)` once a write made progress or finished it.
    fn flush(
        &mut self,
        cx: &mut Context<'_>,
        dst: &TcpStream,
        meter: &Meter,
    ) -> Poll<Result<(), DirError>> {
        ready!(dst.poll_write_ready(cx)).map_err(|e| (false, e))?;
        let wrote = match &mut self.pending {
            Pending::Nothing => return Poll::Ready(Ok(())),
            Pending::Pipe { pipe, left } => dst.try_io(Interest::WRITABLE, || {
                nix::fcntl::splice(&pipe.read, None, dst, None, *left, SPLICE_FLAGS)
                    .map_err(io::Error::from)
            }),
            Pending::Bytes { data, off } => dst.try_write(&data[*off..]),
        };
        // A write without MSG_MORE sends what an earlier one held back.
        self.corked = false;
        match wrote {
            Ok(0) => Poll::Ready(Err((false, io::ErrorKind::WriteZero.into()))),
            Ok(m) => {
                meter.add(m as u64);
                let finished = match &mut self.pending {
                    Pending::Pipe { left, .. } => {
                        *left -= m;
                        *left == 0
                    }
                    Pending::Bytes { data, off } => {
                        *off += m;
                        *off == data.len()
                    }
                    Pending::Nothing => true,
                };
                if finished {
                    if let Pending::Pipe { pipe, .. } = std::mem::take(&mut self.pending) {
                        pipes::put(pipe);
                    }
                }
                Poll::Ready(Ok(()))
            }
            // Readiness was cleared: the next poll_write_ready waits for it.
            Err(e) if retry(&e) => Poll::Ready(Ok(())),
            // A pipe still holding bytes is dropped (closed), never returned to the pool.
            Err(e) => Poll::Ready(Err((false, e))),
        }
    }

    /// Splices what `src` has into a pipe (left pending). `Some(0)` is EOF, `None` nothing
    /// to read (or splicing is off from now on).
    fn splice_in(&mut self, src: &TcpStream) -> Result<Option<usize>, DirError> {
        let pipe = match pipes::get() {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "no pipe for splice; copying instead");
                self.no_splice = true;
                return Ok(None);
            }
        };
        let read = src.try_io(Interest::READABLE, || {
            nix::fcntl::splice(src, None, &pipe.write, None, pipe.capacity, SPLICE_FLAGS)
                .map_err(io::Error::from)
        });
        match read {
            Ok(n) => {
                if n == 0 {
                    pipes::put(pipe);
                } else {
                    self.bulk = n >= BULK_READ;
                    self.pending = Pending::Pipe { pipe, left: n };
                }
                Ok(Some(n))
            }
            Err(e) if retry(&e) => {
                pipes::put(pipe);
                Ok(None)
            }
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EINVAL) | Some(nix::libc::ENOSYS)
                ) =>
            {
                tracing::debug!(error = %e, "splice unavailable; copying instead");
                pipes::put(pipe);
                self.no_splice = true;
                Ok(None)
            }
            Err(e) => Err((true, e)),
        }
    }

    /// Reads what `src` has into the scratch buffer and writes it to `dst` at once; what
    /// `dst` cannot take now is kept pending. `Some(0)` is EOF, `None` nothing to read.
    ///
    /// When the short read that drained `src` leaves it still readable, its FIN has most
    /// likely arrived behind the data (a response followed by close: the common end of a
    /// short connection). The data is then written with `MSG_MORE`, so the FIN that the
    /// next read finds leaves in the same segment instead of a packet of its own: HAProxy
    /// does the same, and the extra FIN-only packet was 0.6 packets and a share of the
    /// kernel time per connection that veer spent over HAProxy (see `corked`).
    fn copy(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        meter: &Meter,
    ) -> Result<Option<usize>, DirError> {
        SCRATCH_BUF.with(|scratch| {
            let mut buf = scratch.borrow_mut();
            let mut n = 0;
            let read = src.try_io(Interest::READABLE, || {
                n = (&*socket2::SockRef::from(src)).read(&mut buf)?;
                if n > 0 && n < buf.len() {
                    // A short read drained the socket: report it as such so the readiness
                    // is cleared now, saving the read that would find it empty (tokio's
                    // own poll_read does the same; a FIN already seen stays visible).
                    return Err(io::ErrorKind::WouldBlock.into());
                }
                Ok(())
            });
            let drained = match read {
                Ok(()) => false,
                Err(e) if retry(&e) && n > 0 => true,
                Err(e) if retry(&e) => return Ok(None),
                Err(e) => return Err((true, e)),
            };
            self.bulk = n >= BULK_READ;
            // No syscall: readiness was just cleared, so only a FIN (or bytes that came in
            // since) makes it ready again. Pending registers the waker the caller's next
            // poll_read_ready would register anyway.
            let fin_next = drained && src.poll_read_ready(cx).is_ready();
            let flags = if fin_next { nix::libc::MSG_MORE } else { 0 };
            self.corked = false;
            let mut off = 0;
            while off < n {
                let sent = dst.try_io(Interest::WRITABLE, || {
                    socket2::SockRef::from(dst).send_with_flags(&buf[off..n], flags)
                });
                match sent {
                    Ok(0) => return Err((false, io::ErrorKind::WriteZero.into())),
                    Ok(m) => {
                        off += m;
                        meter.add(m as u64);
                        self.corked = fin_next;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err((false, e)),
                }
            }
            if off < n {
                self.pending = Pending::Bytes {
                    data: buf[off..n].to_vec(),
                    off: 0,
                };
            }
            Ok(Some(n))
        })
    }
}

/// The pipe pool behind the splice path.
mod pipes {
    use std::os::fd::OwnedFd;
    use std::sync::Mutex;

    use nix::fcntl::{fcntl, FcntlArg, OFlag};

    /// Idle pipes kept for reuse (each is two descriptors). Small: pipes are only held while
    /// bytes are in flight, so a few dozen serve many concurrent transfers.
    const POOL_MAX: usize = 32;
    /// Asked-for pipe capacity: 1 MiB (the unprivileged maximum by default) moves a bulk
    /// transfer in fewer splice pairs than the 64 KiB default; measured ~20-35% less proxy
    /// CPU per byte. The kernel may grant less; the granted size is what is used.
    const WANTED_CAPACITY: i32 = 1 << 20;

    pub struct Pipe {
        pub read: OwnedFd,
        pub write: OwnedFd,
        pub capacity: usize,
    }

    static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

    /// An empty pipe from the pool, or a new one.
    pub fn get() -> std::io::Result<Pipe> {
        if let Some(p) = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(p);
        }
        let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        let capacity = fcntl(&write, FcntlArg::F_SETPIPE_SZ(WANTED_CAPACITY))
            .or_else(|_| fcntl(&write, FcntlArg::F_GETPIPE_SZ))
            .map_or(64 * 1024, |n| usize::try_from(n).unwrap_or(64 * 1024));
        Ok(Pipe {
            read,
            write,
            capacity,
        })
    }

    /// Returns an empty pipe to the pool (closed if the pool is full).
    pub fn put(p: Pipe) {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < POOL_MAX {
            pool.push(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// Two connected socket pairs: (client, proxy's client side), (proxy's upstream side,
    /// server).
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let a = TcpStream::connect(addr).await.unwrap();
        let (a2, _) = l.accept().await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        let (b2, _) = l.accept().await.unwrap();
        ((a, a2), (b, b2))
    }

    /// Relays `p1` ↔ `p2` with the default limits in a task; returns its byte counters.
    fn spawn_relay(
        p1: TcpStream,
        p2: TcpStream,
    ) -> (
        std::sync::Arc<Transfer>,
        tokio::task::JoinHandle<(RelayEnd, Option<io::Error>)>,
    ) {
        let t = std::sync::Arc::new(Transfer::default());
        let t2 = t.clone();
        let task = tokio::spawn(async move { relay(p1, p2, &t2, Limits::default()).await });
        (t, task)
    }

    /// Bytes whose position is recoverable, so a reordering or loss shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    #[tokio::test]
    async fn relay_future_stays_small() {
        // What an idle connection's task holds for the relay; it was 2.5 KiB as nested
        // async blocks. Guarding it keeps per-connection memory from creeping back.
        let ((_c, p1), (p2, _s)) = pairs().await;
        let t = Transfer::default();
        let f = relay(p1, p2, &t, Limits::default());
        let size = std::mem::size_of_val(&f);
        eprintln!("relay future: {size} bytes");
        assert!(size <= 512, "relay future is {size} bytes");
    }

    /// Small messages one at a time, then a bulk transfer (the splice path), then a
    /// half-close from the client while the reply still flows; the server reads slowly, so
    /// the proxy has to hold bytes back (backpressure) without losing any.
    #[tokio::test]
    async fn small_then_bulk_with_half_close_and_slow_reader() {
        let ((mut client, p1), (p2, mut server)) = pairs().await;
        let (t, relay) = spawn_relay(p1, p2);

        // Interactive: each message arrives whole before the next is sent.
        for i in 0..20u8 {
            let msg = pattern(64 + usize::from(i), i);
            client.write_all(&msg).await.unwrap();
            let mut got = vec![0; msg.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg);
            server.write_all(&got).await.unwrap();
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, msg);
        }

        // Bulk one way with a slow reader, then FIN.
        let bulk = pattern(8 << 20, 7);
        let sent = bulk.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            client
        });
        let mut got = Vec::with_capacity(bulk.len());
        let mut chunk = vec![0; 4096];
        loop {
            let n = server.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
            if got.len() < (1 << 20) {
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
        }
        assert!(
            got == bulk,
            "bulk bytes differ ({} of {})",
            got.len(),
            bulk.len()
        );
        let mut client = writer.await.unwrap();

        // Half-closed: the reply still flows back, then the server closes too.
        let reply = pattern(3 << 20, 9);
        server.write_all(&reply).await.unwrap();
        drop(server);
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert!(
            back == reply,
            "reply differs ({} of {})",
            back.len(),
            reply.len()
        );

        let (end, err) = relay.await.unwrap();
        assert_eq!(end, RelayEnd::Closed, "{err:?}");
        let small: u64 = (0..20u64).map(|i| 64 + i).sum();
        assert_eq!(t.to_upstream.get(), small + bulk.len() as u64);
        assert_eq!(t.to_client.get(), small + reply.len() as u64);
        assert!(t.client_fin.load(Ordering::Relaxed));
        assert!(t.upstream_fin.load(Ordering::Relaxed));
    }

    /// Small messages back and forth with no FIN behind them: each must go out at once.
    /// (A reply written with `MSG_MORE`, waiting for a FIN that is not coming, would stall
    /// here until the timeout.)
    #[tokio::test]
    async fn replies_without_a_fin_behind_them_are_not_held_back() {
        let ((mut client, p1), (p2, mut server)) = pairs().await;
        let (_t, _relay) = spawn_relay(p1, p2);
        // Nagle would hold the server's second write for the first's (delayed) ACK.
        server.set_nodelay(true).unwrap();
        // 50 round trips take milliseconds; a reply held back waits for the kernel's
        // timer (hundreds of ms each, over 20 s in all when every reply is held).
        let rounds = async {
            for i in 0..50u8 {
                client.write_all(&[i; 3]).await.unwrap();
                let mut got = [0u8; 3];
                server.read_exact(&mut got).await.unwrap();
                // Two writes back to back: the second can make the first read look
                // followed by more (the case that writes with MSG_MORE), with no FIN.
                server.write_all(&[i; 2]).await.unwrap();
                server.write_all(&[i; 2]).await.unwrap();
                let mut back = [0u8; 4];
                client.read_exact(&mut back).await.unwrap();
                assert_eq!(back, [i; 4]);
            }
        };
        tokio::time::timeout(Duration::from_secs(5), rounds)
            .await
            .expect("replies are not held back");
    }

    /// The server closes first (its FIN is passed on with shutdown), then the client: that
    /// last FIN is passed on by closing the upstream socket, no shutdown first, and the
    /// server must still see an orderly end (EOF, not a reset).
    #[tokio::test]
    async fn the_last_fin_is_passed_on_by_close() {
        let ((mut client, p1), (p2, mut server)) = pairs().await;
        let (t, relay) = spawn_relay(p1, p2);
        client.write_all(b"GET /").await.unwrap();
        let mut req = [0u8; 5];
        server.read_exact(&mut req).await.unwrap();
        server.write_all(b"reply").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"reply");
        assert!(
            !relay.is_finished(),
            "the client can still send after the server's FIN"
        );
        client.write_all(b"late").await.unwrap();
        drop(client);
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut rest))
            .await
            .expect("the server sees the client's FIN")
            .expect("an orderly close, not a reset");
        assert_eq!(rest, b"late");
        let (end, err) = relay.await.unwrap();
        assert_eq!(end, RelayEnd::Closed, "{err:?}");
        assert!(t.client_fin.load(Ordering::Relaxed));
        assert!(t.upstream_fin.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn reset_by_upstream_ends_the_relay_and_blames_it() {
        let ((mut client, p1), (p2, server)) = pairs().await;
        let (_t, relay) = spawn_relay(p1, p2);
        client.write_all(b"hello").await.unwrap();
        // SO_LINGER 0: close sends RST.
        socket2::SockRef::from(&server)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(server);
        let (end, err) = tokio::time::timeout(Duration::from_secs(5), relay)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(end, RelayEnd::UpstreamError, "{err:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_half_close_and_max_duration_limits() {
        // Paused time: the clock jumps to each timer, so the limits are checked exactly.
        let within = |start: TInstant, lo: u64, hi: u64| {
            let e = start.elapsed();
            assert!(
                e >= Duration::from_secs(lo) && e <= Duration::from_secs(hi),
                "{e:?}"
            );
        };
        let ((_client, p1), (p2, _server)) = pairs().await;
        let t = Transfer::default();
        let limits = Limits {
            idle: Some(Duration::from_secs(30)),
            max_duration: None,
        };
        let start = TInstant::now();
        let (end, _) = relay(p1, p2, &t, limits).await;
        assert_eq!(end, RelayEnd::IdleTimeout);
        within(start, 30, 31);

        // A FIN with nothing moving after it: the half-close timeout (50 s), not the hour.
        let ((client, p1), (p2, _server)) = pairs().await;
        socket2::SockRef::from(&client)
            .shutdown(Shutdown::Write)
            .unwrap();
        let t = Transfer::default();
        let start = TInstant::now();
        let (end, _) = relay(p1, p2, &t, Limits::default()).await;
        assert_eq!(end, RelayEnd::HalfCloseTimeout);
        within(start, 50, 51);

        let ((_client, p1), (p2, _server)) = pairs().await;
        let t = Transfer::default();
        let limits = Limits {
            idle: None,
            max_duration: Some(Duration::from_secs(90)),
        };
        let start = TInstant::now();
        let (end, _) = relay(p1, p2, &t, limits).await;
        assert_eq!(end, RelayEnd::MaxDuration);
        within(start, 90, 91);
    }
}
