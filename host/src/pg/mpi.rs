//! [`MpiProcessGroup`]: a [`ProcessGroup`] over MPI (feature `mpi`), for jobs started by `mpirun`,
//! `srun` and the like, which already know every rank.
//!
//! # Messages
//! A pgt message is an *envelope* — one MPI message with tag [`ENVELOPE_TAG`] holding the pgt tag
//! and the payload length (two `u64`, little-endian) — then the payload as *pieces*: MPI messages
//! with tag [`PIECE_TAG`], one per part of the send, or per slice of at most
//! [`MpiProcessGroup::max_piece`] bytes of a larger part (MPI counts are `i32`; the default is
//! 1 GiB). MPI keeps messages of one tag between two ranks in order, so envelopes and pieces pair
//! up. pgt tags are matched here, with the bounded per-peer stash the TCP group uses, so every
//! `u64` tag works and the semantics are those of [the module docs](super#messages-and-tags):
//! order per peer, [`PgError::LengthMismatch`] and [`PgError::TooLarge`] without consuming,
//! [`PgError::UnexpectedBacklog`]. A piece lands straight in the receiver's part that holds it (in
//! pgt the sender's parts are the receiver's, so always); one straddling parts goes through a
//! temporary buffer.
//!
//! # Threads and timeouts
//! MPI is initialised with `MPI_THREAD_MULTIPLE` when the library offers it (Open MPI does);
//! with only `MPI_THREAD_SERIALIZED`, a lock serialises every MPI call, never held while waiting.
//! The group talks on its own duplicate of `MPI_COMM_WORLD`, so other MPI use in the process can't
//! match its messages. Waiting is polling against the deadline (MPI progresses inside MPI calls):
//! - a receive waits for its message's envelope, and then each piece, with non-blocking probes, so
//!   a receive that times out there has nothing posted: before the envelope or between it and the
//!   first piece it consumes nothing; between later pieces the message is left unfinished, and the
//!   next receive from that peer takes its remaining pieces first (into the stash, or dropped when
//!   the message was the timed-out receive's own: [`PgError::TimeoutMidMessage`]). A malformed
//!   piece poisons the peer ([`PgError::Poisoned`]).
//! - A posted request (a send, or the receive of a probed piece) is not cancelled: MPI cannot take
//!   back a send once a receiver may have matched it (Open MPI cancels no send at all), and then
//!   it still owns the caller's bytes. So if one has not completed by its deadline plus a second,
//!   the job is aborted (`MPI_Abort`) instead of returning with MPI holding the buffer. Under MPI a
//!   stalled receiver therefore ends the job — the MPI way — rather than failing one send.
//!
//! Receives from one peer are serialised: a thread that finds another thread's message first sets
//! it aside in the stash (one copy; counted against its limit) instead of handing it over as the
//! TCP group does. `Transport` receives from a peer on one thread, so it never pays this.
//!
//! One group per process: [`MpiProcessGroup::init`] initialises MPI and dropping the group
//! finalises it — on the thread that created it; dropped elsewhere, MPI is left unfinalised (the
//! standard forbids finalising from another thread).

use std::mem::ManuallyDrop;
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::point_to_point::{Destination, Source, Status};
use mpi::request::{Request, Scope};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;

use super::stash::Stash;
use super::{check_peer, total_len, Dest, PgError, ProcessGroup, DEFAULT_STASH_LIMIT};

/// MPI tag of envelopes.
pub const ENVELOPE_TAG: i32 = 1;
/// MPI tag of payload pieces.
pub const PIECE_TAG: i32 = 2;
/// Default largest MPI message: well below `i32::MAX` bytes.
pub const DEFAULT_MAX_PIECE: usize = 1 << 30;

/// How long past its deadline a posted request may take before the job is aborted.
const GRACE: Duration = Duration::from_secs(1);

/// Ranked messaging over `MPI_COMM_WORLD`; see the [module docs](self).
pub struct MpiProcessGroup {
    world: ManuallyDrop<SimpleCommunicator>,
    rank: u32,
    size: u32,
    max_piece: usize,
    /// Held around every MPI call when the library is not thread-multiple.
    serialize: Option<Mutex<()>>,
    /// Per destination: one message's envelope and pieces go out together.
    sends: Vec<Mutex<()>>,
    /// Per source.
    recvs: Vec<Mutex<RecvState>>,
    /// Finalises MPI when dropped: see `Drop`.
    universe: ManuallyDrop<Universe>,
    init_thread: ThreadId,
}

impl Drop for MpiProcessGroup {
    fn drop(&mut self) {
        if std::thread::current().id() == self.init_thread {
            // SAFETY: each is dropped exactly once, here, and never used again; the communicator
            // goes first, as MPI must still be running to free it.
            unsafe {
                ManuallyDrop::drop(&mut self.world);
                ManuallyDrop::drop(&mut self.universe);
            }
        } else {
            eprintln!(
                "pgt: the MPI process group was dropped on another thread than the one that \
                 created it; MPI is left unfinalised"
            );
        }
    }
}

// SAFETY: the MPI handles inside are plain identifiers for library objects. The library was
// initialised thread-multiple, which allows MPI calls from any thread at once, or else every call
// is made under `serialize`; our own state is behind mutexes.
unsafe impl Send for MpiProcessGroup {}
// SAFETY: as above.
unsafe impl Sync for MpiProcessGroup {}

struct RecvState {
    /// An envelope read whose payload has not been (its receive failed without consuming it).
    head: Option<(u64, u64)>,
    /// A message some of whose pieces were received when its receive timed out.
    unfinished: Option<Unfinished>,
    stash: Stash,
    poisoned: bool,
}

/// The rest of a message whose receive timed out between its pieces.
enum Unfinished {
    /// The timed-out receive's own message: `left` bytes of pieces to receive and drop.
    Drop { tag: u64, left: u64 },
    /// Someone else's message for the stash, `filled` bytes of `buf` received.
    Stash {
        tag: u64,
        buf: Vec<u8>,
        filled: usize,
    },
}

impl std::fmt::Debug for MpiProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiProcessGroup")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .field("thread_multiple", &self.serialize.is_none())
            .finish_non_exhaustive()
    }
}

/// Ends the whole MPI job at once, with `code` (`MPI_Abort` on the world): for a program that fails
/// on one rank and should not leave the others waiting for their timeouts. Needs MPI initialised.
pub fn abort_job(code: i32) -> ! {
    SimpleCommunicator::world().abort(code)
}

impl MpiProcessGroup {
    /// Initialises MPI and forms the group of `MPI_COMM_WORLD`.
    pub fn init() -> Result<MpiProcessGroup, PgError> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or_else(|| PgError::Config("MPI is already initialised in this process".into()))?;
        let serialize = match threading {
            Threading::Multiple => None,
            Threading::Serialized => Some(Mutex::new(())),
            other => {
                return Err(PgError::Config(format!(
                    "the MPI library offers only {other:?} threading; pgt needs Serialized or \
                     Multiple"
                )))
            }
        };
        let world = universe.world().duplicate();
        let (rank, size) = (world.rank() as u32, world.size() as u32);
        Ok(MpiProcessGroup {
            world: ManuallyDrop::new(world),
            rank,
            size,
            max_piece: DEFAULT_MAX_PIECE,
            serialize,
            sends: (0..size).map(|_| Mutex::default()).collect(),
            recvs: (0..size)
                .map(|_| {
                    Mutex::new(RecvState {
                        head: None,
                        unfinished: None,
                        stash: Stash::new(DEFAULT_STASH_LIMIT),
                        poisoned: false,
                    })
                })
                .collect(),
            universe: ManuallyDrop::new(universe),
            init_thread: std::thread::current().id(),
        })
    }

    /// Sets the largest MPI message a payload is cut into (at least 1, at most
    /// [`DEFAULT_MAX_PIECE`]); small values exercise the cutting. Every rank must agree only in
    /// that each stays within MPI's `i32` counts: receivers follow the pieces as they come.
    pub fn with_max_piece(mut self, bytes: usize) -> MpiProcessGroup {
        self.max_piece = bytes.clamp(1, DEFAULT_MAX_PIECE);
        self
    }

    /// Largest MPI message a payload is cut into.
    pub fn max_piece(&self) -> usize {
        self.max_piece
    }

    /// Whether the MPI library runs thread-multiple (else calls are serialised).
    pub fn is_thread_multiple(&self) -> bool {
        self.serialize.is_none()
    }

    /// Runs one MPI call, under the serialising lock if there is one.
    fn call<R>(&self, f: impl FnOnce() -> R) -> R {
        let _guard = self
            .serialize
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner));
        f()
    }

    /// Polls `req` until it completes or `deadline` passes (then it is still pending).
    fn poll<'a, D: ?Sized, S: Scope<'a>>(
        &self,
        mut req: Request<'a, D, S>,
        deadline: Instant,
    ) -> Result<Status, Request<'a, D, S>> {
        let mut idle = Backoff::default();
        loop {
            req = match self.call(move || req.test()) {
                Ok(status) => return Ok(status),
                Err(pending) => pending,
            };
            if Instant::now() >= deadline {
                return Err(req);
            }
            idle.wait();
        }
    }

    /// Waits for posted `req` to complete. MPI can't be made to give its buffer back, so if it
    /// hasn't completed a second past `deadline`, the job is aborted (see the module docs).
    fn complete<'a, D: ?Sized, S: Scope<'a>>(
        &self,
        req: Request<'a, D, S>,
        deadline: Instant,
        what: impl FnOnce() -> String,
    ) {
        if let Err(stuck) = self.poll(req, deadline + GRACE) {
            eprintln!(
                "pgt: {} did not complete in time, and MPI still owns its buffer: aborting the job",
                what()
            );
            // MPI keeps using the request's buffer; the process ends right here.
            std::mem::forget(stuck);
            self.world.abort(70)
        }
    }

    fn process(&self, rank: u32) -> mpi::topology::Process<'_> {
        self.call(|| self.world.process_at_rank(rank as i32))
    }

    /// Reads the next envelope from `src` if one has arrived.
    fn try_envelope(&self, src: u32, deadline: Instant) -> Option<(u64, u64)> {
        let process = self.process(src);
        self.call(|| process.immediate_probe_with_tag(ENVELOPE_TAG))?;
        let mut raw = [0u8; 16];
        mpi::request::scope(|scope| {
            let req = self
                .call(|| process.immediate_receive_into_with_tag(scope, &mut raw, ENVELOPE_TAG));
            // Probed, so it has arrived: this completes at once.
            self.complete(req, deadline.max(Instant::now()), || {
                format!("receiving an envelope from rank {src}")
            });
        });
        let tag = u64::from_le_bytes(raw[..8].try_into().expect("8 bytes"));
        let len = u64::from_le_bytes(raw[8..].try_into().expect("8 bytes"));
        Some((tag, len))
    }

    /// Receives the payload of the envelope just taken into `parts`, piece by piece. On failure, says
    /// whether any of it was consumed (if not, the message is still whole in MPI's queue).
    fn recv_pieces(
        &self,
        src: u32,
        tag: u64,
        parts: &mut [&mut [u8]],
        deadline: Instant,
        timeout: Duration,
        got: &mut u64,
    ) -> Result<(), PgError> {
        let process = self.process(src);
        let total = total_len(parts);
        let (mut part, mut offset) = (0usize, 0usize);
        while *got < total {
            let n = self.probe_piece(src, tag, total - *got, deadline, timeout)?;
            while offset == parts[part].len() {
                part += 1;
                offset = 0;
            }
            let what = || format!("receiving {n} bytes of tag {tag} from rank {src}");
            if offset + n <= parts[part].len() {
                let dest = &mut parts[part][offset..offset + n];
                mpi::request::scope(|scope| {
                    let req = self
                        .call(|| process.immediate_receive_into_with_tag(scope, dest, PIECE_TAG));
                    self.complete(req, deadline, what);
                });
                offset += n;
            } else {
                // The piece straddles parts: through a temporary buffer.
                let mut tmp = vec![0u8; n];
                mpi::request::scope(|scope| {
                    let req = self.call(|| {
                        process.immediate_receive_into_with_tag(scope, &mut tmp[..], PIECE_TAG)
                    });
                    self.complete(req, deadline, what);
                });
                let mut rest = &tmp[..];
                while !rest.is_empty() {
                    while offset == parts[part].len() {
                        part += 1;
                        offset = 0;
                    }
                    let k = rest.len().min(parts[part].len() - offset);
                    parts[part][offset..offset + k].copy_from_slice(&rest[..k]);
                    rest = &rest[k..];
                    offset += k;
                }
            }
            *got += n as u64;
        }
        Ok(())
    }

    /// Waits for the next payload piece from `src` (of a message of `tag` with `left` bytes still
    /// to come) and returns its length, the piece still unreceived.
    fn probe_piece(
        &self,
        src: u32,
        tag: u64,
        left: u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<usize, PgError> {
        let process = self.process(src);
        let mut idle = Backoff::default();
        let status = loop {
            if let Some(s) = self.call(|| process.immediate_probe_with_tag(PIECE_TAG)) {
                break s;
            }
            if Instant::now() >= deadline {
                return Err(PgError::Timeout {
                    peer: src,
                    tag,
                    after: timeout,
                });
            }
            idle.wait();
        };
        let n = self.call(|| status.count(u8::equivalent_datatype())).max(0) as usize;
        if n == 0 || n as u64 > left {
            return Err(PgError::Io {
                peer: Some(src),
                kind: std::io::ErrorKind::InvalidData,
                message: format!(
                    "a payload piece of {n} bytes does not fit the {left} bytes left of tag {tag}"
                ),
            });
        }
        Ok(n)
    }

    /// Receives and drops the pieces of `left` payload bytes of tag `tag` from `src`, counting
    /// `left` down as they come.
    fn drop_pieces(
        &self,
        src: u32,
        tag: u64,
        left: &mut u64,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), PgError> {
        let process = self.process(src);
        let mut scratch = Vec::new();
        while *left > 0 {
            let n = self.probe_piece(src, tag, *left, deadline, timeout)?;
            // At most one piece, which MPI already holds or is delivering.
            scratch.resize(n, 0);
            mpi::request::scope(|scope| {
                let req = self.call(|| {
                    process.immediate_receive_into_with_tag(scope, &mut scratch[..], PIECE_TAG)
                });
                self.complete(req, deadline, || {
                    format!("receiving {n} bytes of tag {tag} from rank {src} to drop them")
                });
            });
            *left -= n as u64;
        }
        Ok(())
    }

    /// Receives the rest of `unfinished` into the stash or drops it; at a timeout it is kept, with
    /// its progress, for the next receive.
    fn finish(
        &self,
        peer: &mut RecvState,
        src: u32,
        unfinished: Unfinished,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), PgError> {
        let (result, rest) = match unfinished {
            Unfinished::Drop { tag, mut left } => {
                let r = self.drop_pieces(src, tag, &mut left, deadline, timeout);
                (r, Unfinished::Drop { tag, left })
            }
            Unfinished::Stash {
                tag,
                mut buf,
                filled,
            } => {
                let mut got = 0;
                let r = self.recv_pieces(
                    src,
                    tag,
                    &mut [&mut buf[filled..]],
                    deadline,
                    timeout,
                    &mut got,
                );
                let filled = filled + got as usize;
                if r.is_ok() && !peer.stash.is_forgotten(&buf) {
                    peer.stash.push(tag, buf);
                    return Ok(());
                }
                (r, Unfinished::Stash { tag, buf, filled })
            }
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                if e.is_timeout() {
                    peer.unfinished = Some(rest);
                } else {
                    peer.poisoned = true;
                }
                Err(e)
            }
        }
    }

    fn receive(
        &self,
        src: u32,
        tag: u64,
        dest: &mut Dest<'_, '_>,
        timeout: Duration,
    ) -> Result<Option<Vec<u8>>, PgError> {
        check_peer(src, self.rank, self.size)?;
        let deadline = Instant::now() + timeout;
        let timed_out = || PgError::Timeout {
            peer: src,
            tag,
            after: timeout,
        };
        let mut idle = Backoff::default();
        loop {
            let mut peer = lock_until(&self.recvs[src as usize], deadline).ok_or_else(timed_out)?;
            if let Some(len) = peer.stash.peek_len(tag) {
                dest.check(src, tag, len as u64)?;
                let bytes = peer.stash.take(tag).expect("peeked");
                return Ok(dest.deliver(bytes));
            }
            if peer.poisoned {
                return Err(PgError::Poisoned { peer: src });
            }
            if let Some(unfinished) = peer.unfinished.take() {
                self.finish(&mut peer, src, unfinished, deadline, timeout)
                    .map_err(|e| if e.is_timeout() { timed_out() } else { e })?;
                continue; // it may have been stashed: look there again
            }
            if peer.head.is_none() {
                peer.head = self.try_envelope(src, deadline);
            }
            let Some((next_tag, len)) = peer.head else {
                drop(peer);
                if Instant::now() >= deadline {
                    return Err(timed_out());
                }
                idle.wait();
                continue;
            };
            // Ours, or someone else's to set aside (then look again).
            let mine = next_tag == tag;
            // A `Dest::Vec` receive, and someone else's message, land in `whole`.
            let mut whole = Vec::new();
            let mut got = 0;
            let received = if mine {
                dest.check(src, tag, len)?;
                let mut parts: Vec<&mut [u8]> = match dest {
                    Dest::Parts(parts) => parts.iter_mut().map(|p| &mut **p).collect(),
                    Dest::Vec { .. } => {
                        whole = vec![0u8; len as usize];
                        vec![&mut whole[..]]
                    }
                };
                self.recv_pieces(src, tag, &mut parts, deadline, timeout, &mut got)
            } else {
                if !peer.stash.fits(len) {
                    return Err(PgError::UnexpectedBacklog {
                        peer: src,
                        wanted: tag,
                        blocking_tag: next_tag,
                        len,
                        stashed: peer.stash.bytes() as u64,
                        limit: peer.stash.limit() as u64,
                    });
                }
                whole = vec![0u8; len as usize];
                self.recv_pieces(
                    src,
                    next_tag,
                    &mut [&mut whole[..]],
                    deadline,
                    timeout,
                    &mut got,
                )
            };
            match received {
                Ok(()) => {
                    peer.head = None;
                    if mine {
                        return Ok(matches!(dest, Dest::Vec { .. }).then_some(whole));
                    }
                    // A forgotten prefix (`forget_prefix`) is dropped, not stashed. MPI cannot
                    // receive part of a message, so it was received whole first: only a frame that
                    // fits the stash's room is (see `forget_prefix` below).
                    if !peer.stash.is_forgotten(&whole) {
                        peer.stash.push(next_tag, whole);
                    }
                }
                // Nothing consumed: the message stays first in line, envelope and all.
                Err(e) if got == 0 => {
                    return Err(if e.is_timeout() { timed_out() } else { e });
                }
                // Part way, at a timeout: the next receive takes the rest of the pieces.
                Err(e) if e.is_timeout() => {
                    peer.head = None;
                    if mine {
                        peer.unfinished = Some(Unfinished::Drop {
                            tag,
                            left: len - got,
                        });
                        return Err(PgError::TimeoutMidMessage {
                            peer: src,
                            tag,
                            after: timeout,
                            received: got,
                            len,
                        });
                    }
                    peer.unfinished = Some(Unfinished::Stash {
                        tag: next_tag,
                        buf: whole,
                        filled: got as usize,
                    });
                    return Err(timed_out());
                }
                Err(e) => {
                    peer.head = None;
                    peer.poisoned = true;
                    return Err(e);
                }
            }
        }
    }
}

/// Locks `m`, retrying until `deadline`.
fn lock_until<T>(m: &Mutex<T>, deadline: Instant) -> Option<MutexGuard<'_, T>> {
    let mut idle = Backoff::default();
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => {}
        }
        if Instant::now() >= deadline {
            return None;
        }
        idle.wait();
    }
}

/// Spin, then yield (about a millisecond), then sleep up to 1 ms: MPI progresses only inside MPI
/// calls, so waiting is polling, and the waits between a transfer's messages should not pay a sleep
/// (at least the timer slack, 50 µs): yielding 1,024 times before the first sleep instead of 64
/// took 1 GiB in place from 0.41 to 0.35 s (`docs/perf.md`).
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn wait(&mut self) {
        self.0 = self.0.saturating_add(1);
        match self.0 {
            0..=16 => std::hint::spin_loop(),
            17..=1024 => std::thread::yield_now(),
            n => std::thread::sleep(Duration::from_micros(u64::from((n - 1024).min(1000)))),
        }
    }
}

impl ProcessGroup for MpiProcessGroup {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn size(&self) -> u32 {
        self.size
    }

    fn send(&self, dst: u32, tag: u64, parts: &[&[u8]], timeout: Duration) -> Result<(), PgError> {
        check_peer(dst, self.rank, self.size)?;
        let deadline = Instant::now() + timeout;
        let timed_out = || PgError::Timeout {
            peer: dst,
            tag,
            after: timeout,
        };
        // One message at a time to a peer: its envelope and pieces go out together.
        let _order = lock_until(&self.sends[dst as usize], deadline).ok_or_else(timed_out)?;
        let mut envelope = [0u8; 16];
        envelope[..8].copy_from_slice(&tag.to_le_bytes());
        envelope[8..].copy_from_slice(&total_len(parts).to_le_bytes());
        let process = self.process(dst);
        let pieces = std::iter::once((&envelope[..], ENVELOPE_TAG)).chain(
            parts
                .iter()
                .flat_map(|p| p.chunks(self.max_piece))
                .map(|piece| (piece, PIECE_TAG)),
        );
        for (bytes, mpi_tag) in pieces {
            mpi::request::scope(|scope| {
                let req = self.call(|| process.immediate_send_with_tag(scope, bytes, mpi_tag));
                self.complete(req, deadline, || {
                    format!("sending {} bytes of tag {tag} to rank {dst}", bytes.len())
                });
            });
        }
        Ok(())
    }

    fn recv_into(
        &self,
        src: u32,
        tag: u64,
        parts: &mut [&mut [u8]],
        timeout: Duration,
    ) -> Result<(), PgError> {
        self.receive(src, tag, &mut Dest::Parts(parts), timeout)
            .map(|_| ())
    }

    fn recv_vec(
        &self,
        src: u32,
        tag: u64,
        max_len: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, PgError> {
        self.receive(src, tag, &mut Dest::Vec { max: max_len }, timeout)
            .map(|v| v.expect("Dest::Vec yields a Vec"))
    }

    /// Drops the stashed frames of `prefix` now, and later ones as they arrive. Unlike the TCP
    /// group, MPI delivers only whole messages: a later frame is received whole before it is
    /// dropped, so only one that fits the stash's free room can be; a larger one still fails the
    /// receive with [`PgError::UnexpectedBacklog`] (pgt's data messages are at most its chunk
    /// size, 4 MiB by default, far below the 64 MiB stash limit).
    fn forget_prefix(&self, src: u32, prefix: [u8; 8]) -> Result<(), PgError> {
        check_peer(src, self.rank, self.size)?;
        let mut peer = self.recvs[src as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        peer.stash.forget(prefix);
        Ok(())
    }
}
