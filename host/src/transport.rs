//! `Transport`: PGTransport's API over any [`ProcessGroup`]. It is a host of the one driver
//! ([`pgt_core::drive`]): it moves the bytes the protocol engine (pgt-core, native or sandboxed) asks
//! for — sends, receives into final buffers, forwards, hashing — and owns no protocol decision.
//!
//! Threads: the sender runs one thread per destination (`SendWorkers`), so destinations proceed
//! in parallel, and a destination that fails stops only its own stream ([`Error::Destinations`]). A
//! thread of its own hashes what is sent, beside the sends, when the machine has a core for it, and
//! always in Direct fan-out to several destinations, so that the others' trailer does not wait on a
//! stalled destination. It starts with the send and hashes the storages ahead, in wire order, while
//! the metadata is built and while the receivers decode it (`hash_storages`). Otherwise the first
//! destination's thread hashes each system call's bytes right before the call ([`SenderHash`],
//! [`ProcessGroup::send_observed`]). The receiver
//! (`Landing`) receives on the calling thread straight into the destination memory
//! ([`ReceiveMemory`]) and hashes each piece (at most [`crate::pg::OBSERVE_GRAIN`], which fits in
//! L2) right after the system call that wrote it, on the same core, while it is in cache
//! ([`ProcessGroup::recv_into_observed`]): hashing cold bytes after a whole message landed ran at
//! DRAM speed. A second thread casts what has landed, and a third forwards it in chain fan-out, so
//! neither delays the next receive; a forward that fails stops the forwarding, not the receive
//! ([`TransferStats::forward_failed`]).
//!
//! Isolation (PROTOCOL.md §12): every transfer has a random id, which every message after its header
//! starts with. A receive skips messages of other transfers (stale ones, left by an earlier transfer
//! that failed) instead of using them (`receive_current`); a receive that fails drains what its plan
//! still says is coming ([`ReceiveHost::discard`]); and a `Transport` runs one transfer at a time per
//! pair of ranks and direction, refusing a second at once ([`Error::ConcurrentTransfer`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::Scope;
use std::time::{Duration, Instant};

use crate::error::{with_sources, Error, PeerAction, Result};
use pgt_core::drive::{self, Event, ReceiveHost, ReceivedTree, SendHost};
use pgt_core::dtype::convert;
use pgt_core::header::{Limits, MAX_STALE_LEN, PREFIX_LEN};
use pgt_core::plan::{MessageKind, Segment};
use pgt_core::receiver::{
    Binding, Dest, ForwardOp, InPlace, InPlaceWritten, Incoming, KeptManifest, Received,
    ReceiverOptions, RecvOp,
};
use pgt_core::schema::{FanOut, Metadata, PlanParams};
use pgt_core::sender::{DestinationOutcome, KeptMetadata, Payload, SendOp};
use pgt_core::tree::{KeyPath, Node};
use tracing::{debug, info_span, warn};

use crate::engine::{EngineFactory, NativeEngine};
use crate::memory::{Buffer, BufferPool, ReceiveMemory, Target, MMAP_THRESHOLD};
use crate::pg::{PgError, ProcessGroup};
use crate::state_dict::{Entry, StateDict, Storage, Tensor};

/// Progress callback: `(bytes done, bytes total)`.
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Transfer settings.
#[derive(Clone)]
pub struct TransportOptions {
    /// Per-operation timeout: a stalled peer fails the transfer within this (plus ~1 s).
    pub timeout: Duration,
    /// Fan-out, bucket size and chunk size (sender side; receivers follow the metadata).
    pub plan: PlanParams,
    /// Send a digest trailer and verify it.
    pub digests: bool,
    /// Caps on untrusted metadata (receiver side).
    pub limits: Limits,
    /// If set, a received checkpoint must carry this step.
    pub expected_step: Option<u64>,
    /// The protocol engine: native pgt-core by default.
    pub engine: Arc<dyn EngineFactory>,
    /// Called as storage bytes move.
    pub progress: Option<Progress>,
    /// Receiver side: take fresh storages (and cast staging) from this pool when it keeps a buffer of
    /// the exact size — touched memory, so no page faults — and return staging to it afterwards.
    /// Give checkpoints you are done with back with [`BufferPool::recycle`] and
    /// [`StateDict::into_buffers`]. Without a pool, fresh buffers are new mappings, pre-faulted on
    /// another thread.
    pub pool: Option<Arc<BufferPool>>,
    /// Receiver side: the most memory one receive may take, in bytes — the metadata's decoded size
    /// (PROTOCOL.md §11) plus every fresh (or pooled) storage buffer and cast staging buffer; in-place
    /// buffers are the caller's and do not count (their staging does, when staged). Checked before anything is decoded or allocated
    /// ([`Error::MemoryBudget`]). Default: half of physical memory
    /// ([`crate::memory::default_memory_budget`]). What is allocated is then faulted in as the data
    /// arrives, at most a window ahead of it ([`crate::memory::PrefaultOptions::window`]).
    pub memory_budget: u64,
    /// Receiver side, in place: all or nothing ([`RecvOptions::staged`], the default of every
    /// receive of this transport).
    pub staged: bool,
    /// Sender side, with digests: which thread hashes the storage bytes.
    pub sender_hash: SenderHash,
}

/// Where a sender hashes the storage bytes it sends, for the digest trailer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum SenderHash {
    /// [`SenderHash::OwnThread`] when the machine has more than one core, else
    /// [`SenderHash::BeforeSend`].
    #[default]
    Auto,
    /// The thread that sends hashes each piece right before the system call that copies it, so the
    /// copy may read it from cache; the sends wait for the hash. (Direct fan-out to several
    /// destinations hashes on a thread of its own all the same: a destination that stalls must not
    /// hold up the others' digests.)
    BeforeSend,
    /// A thread of its own hashes beside the sends, starting with the send: it hashes the storages
    /// ahead while the metadata is built and decoded. The hash adds CPU, not time, when a core is
    /// free for it (`docs/perf.md`: 1 GiB in place over loopback, 0.498 s hashed before each send,
    /// 0.431 s beside, 0.438 s without digests).
    OwnThread,
}

impl Default for TransportOptions {
    fn default() -> Self {
        TransportOptions {
            timeout: Duration::from_secs(300),
            plan: PlanParams::default(),
            digests: true,
            limits: Limits::default(),
            expected_step: None,
            engine: Arc::new(NativeEngine),
            progress: None,
            pool: None,
            memory_budget: crate::memory::default_memory_budget(),
            staged: false,
            sender_hash: SenderHash::Auto,
        }
    }
}

impl std::fmt::Debug for TransportOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportOptions")
            .field("timeout", &self.timeout)
            .field("plan", &self.plan)
            .field("digests", &self.digests)
            .field("limits", &self.limits)
            .field("expected_step", &self.expected_step)
            .field("pool", &self.pool)
            .field("memory_budget", &self.memory_budget)
            .field("staged", &self.staged)
            .field("sender_hash", &self.sender_hash)
            .finish_non_exhaustive()
    }
}

/// Figures of one transfer.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TransferStats {
    /// Storage bytes moved.
    pub bytes: u64,
    /// Storages (tensors and shards) moved.
    pub tensors: u64,
    /// Wall time of the whole transfer.
    pub seconds: f64,
    /// Time until the metadata was handled.
    pub metadata_seconds: f64,
    /// Chain fan-out, a relay's receive: forwarding to the next rank failed. The relay's own
    /// checkpoint is complete and verified all the same (a forward failure fails no receive); the
    /// ranks downstream fail, naming this link (PROTOCOL.md §3, *When a destination fails*).
    pub forward_failed: Option<ForwardFailure>,
    /// A staged in-place receive ([`RecvOptions::staged`]): the time spent copying the staged bytes
    /// into the targets once the transfer verified (part of `seconds`); 0 otherwise.
    pub staged_copy_seconds: f64,
}

/// A chain relay's forward that failed ([`TransferStats::forward_failed`]): the messages from
/// `message` on were not forwarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ForwardFailure {
    /// The downstream rank.
    pub rank: u32,
    /// The first message not forwarded (its index in the plan).
    pub message: u32,
    /// Why, with its sources (e.g. `rank 2 closed the connection`).
    pub reason: String,
}

/// Moves state dicts between ranks of a process group.
///
/// One transfer at a time runs per pair of ranks and direction: a second receive from a rank, or a
/// second send (or chain forward) to a rank, while one is running on this `Transport` is refused at
/// once with [`Error::ConcurrentTransfer`] (transfers use the same tags, so two at once would take
/// each other's messages). Use one `Transport` per process group: two `Transport`s over one group do
/// not see each other's transfers.
pub struct Transport<P: ProcessGroup> {
    pg: P,
    options: TransportOptions,
    busy: Arc<Busy>,
    /// Torch's `state_dict` argument: what [`Transport::recv_checkpoint`] receives into in place.
    state_dict: Option<Arc<StateDictProvider>>,
    /// The last successful send's validated, encoded metadata: the next send of a state dict it
    /// still describes, to the same ranks, encodes only its step ([`Transport::send_checkpoint`]).
    kept: Mutex<Option<KeptMetadata>>,
    /// Each source's last complete receive's validated metadata: the next receive from it whose
    /// metadata differs at most in its step is not decoded again ([`Transport::recv_checkpoint`]).
    received: Mutex<HashMap<u32, KeptManifest>>,
}

/// A state dict to receive into in place, made at each receive ([`Transport::with_state_dict`]).
pub type StateDictProvider = dyn Fn() -> StateDict<'static> + Send + Sync;

/// Settings of one receive. [`Transport::recv_options`] gives the transport's defaults (from its
/// [`TransportOptions`]); change what this receive needs:
///
/// ```
/// # use pgt_host::{pg::InProcessGroup, transport::{Transport, TransportOptions}};
/// # let transport = Transport::new(InProcessGroup::new(1).remove(0), TransportOptions::default());
/// let options = transport.recv_options().expected_step(Some(100));
/// assert_eq!(options.expected_step, Some(100));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RecvOptions {
    /// If set, the checkpoint must carry this step, else the receive fails with
    /// `pgt_core::Error::StepMismatch` (after draining the transfer, PROTOCOL.md §12).
    pub expected_step: Option<u64>,
    /// In place, all or nothing: every in-place storage lands in a staging buffer of its own, copied
    /// into its target only once the transfer is verified (every digest matched the trailer's;
    /// without digests, once every byte landed: then staged means complete, not verified). A
    /// receive that fails leaves every target byte for byte as it was, and fails with the cause
    /// alone. The cost: staging memory equal to the in-place storages' total size (counted in the
    /// memory budget), held for the transfer, plus one copy of it into the targets at the end.
    ///
    /// Unstaged (the default), bytes land straight in the targets; a receive that fails after
    /// writing some fails with [`Error::InPlaceWritten`], which names the leaves fully written.
    pub staged: bool,
}

impl RecvOptions {
    /// These options with `expected_step` (`None`: any step, or none).
    pub fn expected_step(self, expected_step: Option<u64>) -> RecvOptions {
        RecvOptions {
            expected_step,
            ..self
        }
    }

    /// These options, staged or not ([`RecvOptions::staged`]).
    pub fn staged(self, staged: bool) -> RecvOptions {
        RecvOptions { staged, ..self }
    }
}

/// The transfers running on a [`Transport`]: (direction, rank), direction `Sending` for sends and
/// forwards, `Receiving` for receives.
#[derive(Default)]
struct Busy(Mutex<HashSet<(PeerAction, u32)>>);

impl Busy {
    /// Takes the slots of `action` with every rank of `ranks`, or none of them.
    fn claim(self: &Arc<Self>, action: PeerAction, ranks: &[u32]) -> Result<Slots> {
        let direction = match action {
            PeerAction::Receiving => PeerAction::Receiving,
            PeerAction::Sending | PeerAction::Forwarding => PeerAction::Sending,
        };
        let mut busy = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(&rank) = ranks.iter().find(|&&r| busy.contains(&(direction, r))) {
            return Err(Error::ConcurrentTransfer { action, rank });
        }
        let held: Vec<_> = ranks.iter().map(|&r| (direction, r)).collect();
        busy.extend(held.iter().copied());
        Ok(Slots {
            busy: Arc::clone(self),
            held,
        })
    }
}

/// Slots of a running transfer; given back when dropped.
struct Slots {
    busy: Arc<Busy>,
    held: Vec<(PeerAction, u32)>,
}

impl Drop for Slots {
    fn drop(&mut self) {
        let mut busy = self.busy.0.lock().unwrap_or_else(|p| p.into_inner());
        for h in &self.held {
            busy.remove(h);
        }
    }
}

/// A fresh random transfer id (PROTOCOL.md §2): distinct transfers between a pair of ranks must not
/// share one, which 64 random bits make all but certain.
fn random_transfer_id() -> Result<u64> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| {
        Error::io(
            "drawing a transfer id from the OS",
            std::io::Error::other(e.to_string()),
        )
    })?;
    Ok(u64::from_le_bytes(id))
}

/// Why one attempt at receiving a message did not give it.
enum Failed {
    /// The process group failed (a length mismatch is looked at again: the message may be stale).
    Pg(PgError),
    /// Anything else: ends the receive.
    Host(Error),
}

/// Receives message `op` from the process group, skipping stale messages (PROTOCOL.md §12): `attempt`
/// receives the next message with `op.tag` into the caller's buffers, within the time it is given, and
/// returns `None` when it started with another transfer's id. A message of another length than
/// `op.len` is refused by the process group unread; when it could be stale (not the header, 8 bytes or
/// more, and at most [`MAX_STALE_LEN`] or `op.len`), it is read whole and looked at: stale, it is
/// skipped; this transfer's, the length error stands (`wrap` turns it into the transfer's error). At most
/// [`pgt_core::header::MAX_STALE`] messages are skipped ([`pgt_core::Error::TooManyStale`]), all of it
/// within `timeout`.
fn receive_current<P: ProcessGroup + ?Sized, T>(
    pg: &P,
    op: &RecvOp,
    timeout: Duration,
    wrap: &dyn Fn(PgError) -> Error,
    mut attempt: impl FnMut(Duration) -> Result<Option<T>, Failed>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut skipped = 0u64;
    let mut skip = |why: &str, len: usize| -> Result<()> {
        debug!(
            message = op.message,
            tag = op.tag,
            from = op.from,
            len,
            "skipped a {why} message of another transfer"
        );
        Ok(op.skip_stale(&mut skipped)?)
    };
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(wrap(PgError::Timeout {
                peer: op.from,
                tag: op.tag,
                after: timeout,
            }));
        }
        match attempt(left) {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => skip("stale", op.len as usize)?,
            Err(Failed::Host(e)) => return Err(e),
            Err(Failed::Pg(e)) => {
                let got = match e {
                    PgError::LengthMismatch { got, .. } | PgError::TooLarge { got, .. } => got,
                    // The wait was given what was left of the operation's timeout: the operation
                    // timed out after all of it (not "after 1.999999909s").
                    PgError::Timeout { peer, tag, .. } => {
                        return Err(wrap(PgError::Timeout {
                            peer,
                            tag,
                            after: timeout,
                        }))
                    }
                    PgError::TimeoutMidMessage {
                        peer,
                        tag,
                        received,
                        len,
                        ..
                    } => {
                        return Err(wrap(PgError::TimeoutMidMessage {
                            peer,
                            tag,
                            after: timeout,
                            received,
                            len,
                        }))
                    }
                    e => return Err(wrap(e)),
                };
                // The header is never stale (it announces the id), and a message too short for a
                // prefix or longer than any message is not read: it stays queued.
                if op.prefix.is_none() || got < PREFIX_LEN || got > MAX_STALE_LEN.max(op.len) {
                    return Err(wrap(e));
                }
                let whole = pg
                    .recv_vec(op.from, op.tag, got as usize, left)
                    .map_err(wrap)?;
                if !op.is_stale(&whole) {
                    // This transfer's message, of the wrong length: the transfer fails (the message
                    // is consumed, so the link stays in step).
                    return Err(wrap(e));
                }
                skip("stale", whole.len())?;
            }
        }
    }
}

impl<P: ProcessGroup> std::fmt::Debug for Transport<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("rank", &self.pg.rank())
            .field("options", &self.options)
            .field("state_dict", &self.state_dict.as_ref().map(|_| "provider"))
            .finish()
    }
}

/// First error wins; everyone else stops.
#[derive(Default)]
struct Abort {
    flag: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl Abort {
    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(e);
        }
        self.flag.store(true, Ordering::SeqCst);
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn take(&self) -> Option<Error> {
        self.error.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The first error, or a stand-in when it was taken already.
    fn error(&self) -> Error {
        self.take()
            .unwrap_or_else(|| Error::internal("the transfer was aborted without an error"))
    }
}

/// XXH3-64 of a storage's bytes, streamed: the same digest as [`pgt_core::digest`], computed with
/// the SIMD path the CPU has (chosen at run time; pgt-core's own hasher, no_std, runs the target's
/// baseline path, about half as fast on AVX2 machines). The transport hashes with it, and so does
/// `pgt bench`'s digest floor, so that the floor hashes as fast as pgt can.
#[derive(Default)]
pub struct StorageHasher(twox_hash::XxHash3_64);

impl StorageHasher {
    /// Feeds the next bytes, in order.
    pub fn update(&mut self, bytes: &[u8]) {
        std::hash::Hasher::write(&mut self.0, bytes);
    }

    /// The digest of everything fed so far.
    pub fn finish(&self) -> u64 {
        std::hash::Hasher::finish(&self.0)
    }
}

impl std::fmt::Debug for StorageHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageHasher")
    }
}

/// The transport's XXH3-64 speed on this machine in GB/s, through `StorageHasher`: `hot` over one
/// 256 KiB piece again and again (a receiver hashing what just landed), `cold` over 256 MiB that
/// left the caches (a sender hashing its source); the best of 5 and one pass. Timed by a budget,
/// not by bytes, so that an unoptimized build takes as long as a release one. For benchmarks
/// (feature `testing`: not part of the stable API).
#[cfg(feature = "testing")]
pub fn digest_gbps() -> (f64, f64) {
    const PIECE: usize = 256 << 10;
    const BUDGET: Duration = Duration::from_millis(40);
    fn rate<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> f64 {
        let (start, mut bytes) = (Instant::now(), 0);
        for piece in pieces.take_while(|_| start.elapsed() < BUDGET) {
            let mut hasher = StorageHasher::default();
            hasher.update(std::hint::black_box(piece));
            std::hint::black_box(hasher.finish());
            bytes += piece.len();
        }
        bytes as f64 / start.elapsed().as_secs_f64() / 1e9
    }
    let piece = vec![7u8; PIECE];
    let hot = (0..5)
        .map(|_| rate(std::iter::repeat(&piece[..])))
        .fold(0.0, f64::max);
    // Written whole before it is hashed, so only its last few MiB can still be in cache.
    let cold = vec![9u8; 256 << 20];
    (hot, rate(cold.chunks(PIECE)))
}

/// Running hashes of the storages whose bytes are arriving, segment by segment; a storage's hasher
/// exists only while its bytes are in flight.
#[derive(Default)]
struct StorageHashers(HashMap<u32, StorageHasher>);

/// The hashes of one data message's segments while its bytes move, fed piece by piece by a process
/// group's observer ([`ProcessGroup::send_observed`], [`ProcessGroup::recv_into_observed`]) — each
/// piece right after (receive) or before (send) the system call that copies it, while it is in
/// cache. The storage a message continues brings its running hash from `StorageHashers`; the
/// storages it does not complete go back there ([`MessageHasher::finish`]).
struct MessageHasher(Vec<StorageHasher>);

impl MessageHasher {
    fn start(running: &mut StorageHashers, segments: &[Segment]) -> MessageHasher {
        MessageHasher(
            segments
                .iter()
                .map(|s| running.0.remove(&s.storage).unwrap_or_default())
                .collect(),
        )
    }

    /// Feeds bytes of segment `segment` (in order).
    fn feed(&mut self, segment: usize, bytes: &[u8]) {
        if let Some(h) = self.0.get_mut(segment) {
            h.update(bytes);
        }
    }

    /// The digests of the storages the message completes, in segment order.
    fn finish(self, running: &mut StorageHashers, segments: &[Segment]) -> Vec<u64> {
        let mut digests = Vec::new();
        for (s, h) in segments.iter().zip(self.0) {
            if s.completes {
                digests.push(h.finish());
            } else {
                running.0.insert(s.storage, h);
            }
        }
        digests
    }
}

/// Messages queued for the hashing, post and forward workers: small descriptors, so memory stays
/// flat whatever the transfer size. (The send workers' queues are unbounded: [`SendWorkers`].)
const QUEUE_DEPTH: usize = 256;
/// How often a wait for workers looks at the abort flag.
const ABORT_POLL: Duration = Duration::from_millis(20);
/// How long a wait for workers outlasts the timeout: a worker stalled on the same peer reports that
/// peer's own timeout a little later (socket timers are coarse), and that error is the one to report.
const TIMEOUT_GRACE: Duration = Duration::from_millis(500);

/// Waits for the next event from workers, in short slices so that a worker's failure (in `abort`)
/// ends the wait at once; fails after `timeout`.
fn wait_event(
    events: &mpsc::Receiver<Event>,
    abort: &Abort,
    timeout: Duration,
    what: &str,
) -> Result<Event> {
    let deadline = Instant::now() + timeout;
    loop {
        if abort.is_set() {
            return Err(abort.error());
        }
        match events.recv_timeout(ABORT_POLL) {
            Ok(event) => return Ok(event),
            Err(RecvTimeoutError::Timeout) if Instant::now() >= deadline + TIMEOUT_GRACE => {
                return Err(Error::Timeout {
                    waiting_for: what.into(),
                    after: timeout,
                })
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                if abort.is_set() {
                    return Err(abort.error());
                }
                return Err(Error::internal(format!(
                    "the threads for {what} stopped before the transfer completed"
                )));
            }
        }
    }
}

impl<P: ProcessGroup> Transport<P> {
    /// A transport over `pg`.
    pub fn new(pg: P, options: TransportOptions) -> Self {
        Transport {
            pg,
            options,
            busy: Arc::default(),
            state_dict: None,
            kept: Mutex::default(),
            received: Mutex::default(),
        }
    }

    /// This transport receiving in place, as torch's `PGTransport(..., state_dict=fn)`: every
    /// [`Transport::recv_checkpoint`] first calls `state_dict` and receives into what it returns
    /// (as [`Transport::recv_checkpoint_into`] does), so its owned buffers are written instead of
    /// fresh ones. For a state dict that borrows a model's memory (`Storage::BorrowedMut`), use
    /// [`Transport::recv_checkpoint_with`], which takes a provider per receive.
    pub fn with_state_dict(
        mut self,
        state_dict: impl Fn() -> StateDict<'static> + Send + Sync + 'static,
    ) -> Self {
        self.state_dict = Some(Arc::new(state_dict));
        self
    }

    /// The last send's kept metadata when it describes this send: the same source, destinations,
    /// plan, digests, tree and leaves (anything but the step). Taken, so that a concurrent send
    /// builds its own; a send that fails keeps nothing.
    fn take_kept(
        &self,
        dst_ranks: &[u32],
        nodes: &[Node],
        entries: &[&Entry<'_>],
    ) -> Option<KeptMetadata> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner()).take()?;
        let describes = kept.describes(
            (self.pg.rank(), dst_ranks),
            self.options.plan,
            self.options.digests,
            nodes,
            |leaves| {
                leaves.len() == entries.len()
                    && entries
                        .iter()
                        .zip(leaves)
                        .all(|(e, l)| e.is_described_by(l))
            },
        );
        describes.then_some(kept)
    }

    /// The settings a receive takes by default: [`TransportOptions::expected_step`] and
    /// [`TransportOptions::staged`].
    pub fn recv_options(&self) -> RecvOptions {
        RecvOptions {
            expected_step: self.options.expected_step,
            staged: self.options.staged,
        }
    }

    /// The process group.
    pub fn process_group(&self) -> &P {
        &self.pg
    }

    /// The options.
    pub fn options(&self) -> &TransportOptions {
        &self.options
    }

    /// Whether a thread of its own hashes what a send to `dst_ranks` sends ([`hash_storages`]), or
    /// the sending thread right before each send. Direct fan-out to several destinations hashes
    /// apart, so that a destination that stalls does not hold up the digests, so the trailer, of
    /// every destination. With one stream of data (one destination, or Chain) the option decides.
    fn hashes_apart(&self, dst_ranks: &[u32]) -> bool {
        let several_direct = dst_ranks.len() > 1 && self.options.plan.fanout == FanOut::Direct;
        several_direct
            || match self.options.sender_hash {
                SenderHash::OwnThread => true,
                SenderHash::BeforeSend => false,
                SenderHash::Auto => std::thread::available_parallelism().is_ok_and(|n| n.get() > 1),
            }
    }

    /// Sends `state_dict` to `dst_ranks`: metadata first, then every storage's bytes, per the plan.
    /// Refused with [`Error::ConcurrentTransfer`] while a send or forward to one of them runs.
    ///
    /// A send that succeeded keeps its validated, encoded metadata (natively linked core only). When
    /// the next send's dict has the same structure, leaves and destinations (its step and its bytes
    /// may change), only the step is encoded again: a trainer pushing its weights every step skips
    /// most of the metadata work after the first push. The bytes on the wire are the same either way.
    pub fn send_checkpoint(
        &self,
        dst_ranks: &[u32],
        state_dict: &StateDict<'_>,
    ) -> Result<TransferStats> {
        let span = info_span!("send_checkpoint", rank = self.pg.rank(), dsts = ?dst_ranks);
        let _enter = span.enter();
        let start = Instant::now();
        let flatten_span = info_span!("flatten").entered();
        let (nodes, entries) = state_dict.flatten();
        let storages: Vec<&[u8]> = entries
            .iter()
            .flat_map(|e| e.tensors())
            .map(|t| t.storage.bytes())
            .collect();
        drop(flatten_span);
        let total: u64 = storages.iter().map(|s| s.len() as u64).sum();
        let abort = Abort::default();
        let outcomes = SendOutcomes {
            destinations: dst_ranks.to_vec(),
            chain: self.options.plan.fanout == FanOut::Chain,
            failed: Mutex::default(),
        };
        let sent = AtomicU64::new(0);
        let (event_tx, events) = mpsc::channel::<Event>();
        // The destinations' slots are held until the scope has joined the workers, which may still
        // be sending when the driver is done.
        let mut slots = None;
        let mut kept = None;
        std::thread::scope(|scope| -> Result<()> {
            // The hashing thread starts now, before the metadata is built: it hashes ahead while the
            // metadata is encoded and while the receivers decode it, when a core is otherwise idle.
            let hasher = (self.options.digests && self.hashes_apart(dst_ranks)).then(|| {
                let (tx, rx) = mpsc::sync_channel::<(u32, Vec<Segment>)>(QUEUE_DEPTH);
                let (storages, event_tx, abort) = (&storages, event_tx.clone(), &abort);
                scope.spawn(move || hash_storages(storages, rx, event_tx, abort));
                tx
            });
            let leaves_span = info_span!("leaves").entered();
            let (factory, limits) = (&self.options.engine, &self.options.limits);
            let mut engine = match self.take_kept(dst_ranks, &nodes, &entries) {
                Some(kept) => {
                    drop(leaves_span);
                    let _encode = info_span!("encode", again = true).entered();
                    factory.sender_again(kept, state_dict.step, limits, random_transfer_id()?)?
                }
                None => {
                    let metadata = Metadata {
                        step: state_dict.step,
                        source: self.pg.rank(),
                        destinations: dst_ranks.to_vec(),
                        plan: self.options.plan,
                        tree: nodes,
                        leaves: entries.iter().map(|e| e.to_leaf()).collect(),
                    };
                    drop(leaves_span);
                    let _encode = info_span!("encode", again = false).entered();
                    factory.sender(
                        metadata,
                        self.options.digests,
                        limits,
                        random_transfer_id()?,
                    )?
                }
            };
            slots = Some(self.busy.claim(PeerAction::Sending, dst_ranks)?);
            let _data_span = info_span!("data", bytes = total).entered();
            let mut host = SendWorkers::start(
                self,
                scope,
                dst_ranks,
                &storages,
                (hasher, event_tx, events),
                (&sent, total),
                (&abort, &outcomes),
            );
            match drive::send(&mut engine, &mut host) {
                Ok(()) => kept = engine.into_kept(),
                Err(e) => abort.fail(e),
            }
            // Closing the queues ends the workers; the scope joins them.
            Ok(())
        })?;
        drop(slots);
        if let Some(e) = abort.take() {
            return Err(e);
        }
        if let Some(e) = outcomes.into_error() {
            return Err(e);
        }
        // Kept only once every destination has the whole transfer.
        *self.kept.lock().unwrap_or_else(|e| e.into_inner()) = kept;
        Ok(TransferStats {
            bytes: total,
            tensors: storages.len() as u64,
            seconds: start.elapsed().as_secs_f64(),
            metadata_seconds: 0.0,
            forward_failed: None,
            staged_copy_seconds: 0.0,
        })
    }

    /// Receives a checkpoint from `src`: into fresh buffers, or in place into what the transport's
    /// [`Transport::with_state_dict`] provider returns when it has one. Messages of other transfers
    /// from `src` (left by a receive that failed) are skipped; when this receive fails after the
    /// metadata, it first drains what the transfer's plan still says is coming (each message within
    /// the timeout), so that the next receive from `src` starts clean. Refused with
    /// [`Error::ConcurrentTransfer`] while another receive from `src` runs.
    pub fn recv_checkpoint(&self, src: u32) -> Result<StateDict<'static>> {
        let options = self.recv_options();
        match &self.state_dict {
            Some(provider) => self.recv_checkpoint_with(src, || provider(), options),
            None => self.recv_checkpoint_with(src, StateDict::new, options),
        }
    }

    /// Receives a checkpoint from `src` in place: every tensor whose key path exists in `state_dict`
    /// is written straight into its storage, which must be writable (`Storage::Owned` or
    /// `Storage::BorrowedMut`; a read-only one at a received key path is [`Error::InPlaceReadOnly`])
    /// and of the incoming size (float dtypes are cast on receive). Afterwards `state_dict` holds
    /// exactly the received tree, its in-place tensors over the same storages. On error its
    /// structure is unchanged; its in-place buffers are untouched when the receive is staged
    /// ([`RecvOptions::staged`]), else they may hold received bytes, and the error says which
    /// leaves ([`Error::InPlaceWritten`]).
    pub fn recv_checkpoint_into<'d>(
        &self,
        src: u32,
        state_dict: &mut StateDict<'d>,
    ) -> Result<TransferStats> {
        self.receive(src, state_dict, self.recv_options())
    }

    /// Receives a checkpoint from `src` with this receive's own `options` (its expected step), in
    /// place into the state dict `state_dict` returns — called once, before anything is received,
    /// as torch's `PGTransport` calls its `state_dict` argument — and returns the received tree.
    /// Give a fresh receive `StateDict::new`. A provider that borrows a model's memory
    /// (`Storage::BorrowedMut`) gets it written, and the returned tree borrows it in turn:
    ///
    /// ```
    /// # use pgt_host::{pg::InProcessGroup, state_dict::*, transport::*};
    /// # fn main() -> pgt_host::Result<()> {
    /// # let mut ranks = InProcessGroup::new(2).into_iter();
    /// # let (tx, rx) = (ranks.next().unwrap(), ranks.next().unwrap());
    /// # let (sender, receiver) = (Transport::new(tx, TransportOptions::default()), Transport::new(rx, TransportOptions::default()));
    /// # let mut sd = StateDict::new();
    /// # sd.insert("w", Entry::Tensor(Tensor::from_values(&[2], &[1.0f32, 2.0])?))?;
    /// # sd.step = Some(7);
    /// let mut weights = [0u8; 8]; // a model's parameter memory
    /// let received = std::thread::scope(|s| {
    ///     s.spawn(|| sender.send_checkpoint(&[1], &sd));
    ///     receiver.recv_checkpoint_with(
    ///         0,
    ///         || {
    ///             let mut target = StateDict::new();
    ///             let layout = pgt_core::layout::TensorLayout::contiguous(pgt_core::dtype::DType::Float32, &[2]);
    ///             let w = Tensor::new(layout, Storage::BorrowedMut(&mut weights)).unwrap();
    ///             target.insert("w", Entry::Tensor(w)).unwrap();
    ///             target
    ///         },
    ///         receiver.recv_options().expected_step(Some(7)),
    ///     )
    /// })?;
    /// assert!(matches!(received.tensor("w").unwrap().storage, Storage::BorrowedMut(_)));
    /// drop(received);
    /// assert_eq!(weights, bytemuck::cast::<[f32; 2], [u8; 8]>([1.0, 2.0]));
    /// # Ok(())
    /// # }
    /// ```
    pub fn recv_checkpoint_with<'d>(
        &self,
        src: u32,
        state_dict: impl FnOnce() -> StateDict<'d>,
        options: RecvOptions,
    ) -> Result<StateDict<'d>> {
        let mut target = state_dict();
        self.receive(src, &mut target, options)?;
        Ok(target)
    }

    fn receive<'d>(
        &self,
        src: u32,
        target: &mut StateDict<'d>,
        options: RecvOptions,
    ) -> Result<TransferStats> {
        let span = info_span!("recv_checkpoint", rank = self.pg.rank(), src);
        let _enter = span.enter();
        let start = Instant::now();
        let _slots = self.busy.claim(PeerAction::Receiving, &[src])?;
        // The chain forward's slot, taken at the first forward; given back once the workers stopped.
        let forward_slot = Mutex::new(None);
        let kept = self.lock_received().remove(&src);
        let engine = self.options.engine.receiver_keeping(
            ReceiverOptions {
                rank: self.pg.rank(),
                source: src,
                expected_step: options.expected_step,
                limits: self.options.limits,
            },
            kept,
        )?;
        let abort = Abort::default();
        let (received, landed, transfer) = std::thread::scope(|scope| {
            let mut host = Landing::new(self, scope, &mut *target, &abort, &forward_slot);
            host.staged = options.staged;
            let received = drive::receive_keeping(engine, &mut host);
            if received.is_err() {
                // Stops the workers at once; the error itself is returned below.
                abort.fail(Error::internal("the receive failed"));
            }
            let transfer = host.transfer.take();
            // Closing the queues ends the workers; the scope joins them.
            (received, host.into_landed(), transfer)
        });
        if received.is_err() {
            self.forget_failed(transfer);
        }
        let (received, kept) = received?;
        // A worker that failed after the engine was done (a cast, with digests off) fails the receive.
        if let Some(e) = abort.take() {
            return Err(e);
        }
        let Landed {
            memory,
            cast_dest,
            in_place_origin,
            by_position,
            total_bytes,
            metadata_seconds,
            forward_failed,
            staged,
        } = landed.ok_or_else(|| Error::internal("a transfer completed without bindings"))?;
        let _assemble_span = info_span!("assemble").entered();
        let stats = TransferStats {
            bytes: total_bytes,
            tensors: received.bindings.len() as u64,
            seconds: 0.0,
            metadata_seconds,
            forward_failed: forward_failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
            staged_copy_seconds: 0.0,
        };
        // The workers have stopped: the memory is ours alone, and the borrow of `target`'s in-place
        // buffers ends here.
        let mut buffers = Arc::try_unwrap(memory)
            .map_err(|_| Error::internal("receive memory still shared after the workers stopped"))?
            .finish();
        let copy_start = Instant::now();
        copy_in_staged(
            &mut buffers,
            &cast_dest,
            staged,
            self.options.pool.as_deref(),
        )?;
        let staged_copy_seconds = copy_start.elapsed().as_secs_f64();
        assemble(
            received,
            buffers,
            &cast_dest,
            &in_place_origin,
            by_position,
            target,
            self.options.pool.as_deref(),
        )?;
        // Kept only once the checkpoint is complete and assembled.
        if let Some(kept) = kept {
            self.lock_received().insert(src, kept);
        }
        Ok(TransferStats {
            seconds: start.elapsed().as_secs_f64(),
            staged_copy_seconds: match options.staged {
                true => staged_copy_seconds,
                false => 0.0,
            },
            ..stats
        })
    }
}

impl<P: ProcessGroup> Transport<P> {
    fn lock_received(&self) -> std::sync::MutexGuard<'_, HashMap<u32, KeptManifest>> {
        self.received.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a failed receive: no receive will want what the failed transfer still sends (its id is
    /// random, and this was its one receive here), so the process group drops its messages instead
    /// of stashing them — from the source and from a chain upstream (PROTOCOL.md §12, *Transfers
    /// cannot mix*). Without this, late data of a transfer that stalled would fill the stash while
    /// the next receive waits for its header, and fail every later receive from that rank.
    fn forget_failed(&self, transfer: Option<(u64, Vec<u32>)>) {
        let Some((id, from)) = transfer else { return };
        for rank in from {
            if let Err(e) = self.pg.forget_prefix(rank, pgt_core::header::prefix(id)) {
                debug!(rank, "forgetting a failed transfer's id: {e}");
            }
        }
    }
}

// ---- sending ----

/// What a destination's thread sends.
enum SendJob {
    Bytes(SendOp, Vec<u8>),
    /// A data message: the prefix, then the segments' bytes.
    Storages(SendOp, [u8; PREFIX_LEN as usize], Vec<Segment>),
}

/// Which destinations of a send failed. A destination whose send fails stops only its own stream:
/// the others run to the end (PROTOCOL.md §3, *When a destination fails*). In chain fan-out the
/// destinations downstream of a failed one are cut off with it (their data would come through it).
/// Once every destination is failed or cut off, the send stops at once.
struct SendOutcomes {
    destinations: Vec<u32>,
    chain: bool,
    failed: Mutex<Vec<(u32, Error)>>,
}

impl SendOutcomes {
    /// Records `dst`'s failure; when no destination is left to reach, stops the send with the first
    /// failure's error.
    fn fail(&self, dst: u32, e: Error, abort: &Abort) {
        warn!(
            rank = dst,
            "destination failed; the others go on: {}",
            with_sources(&e)
        );
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.push((dst, e));
        if self.outcome(&failed).live.is_empty() {
            let (_, first) = failed.remove(0);
            failed.clear();
            abort.fail(first);
        }
    }

    /// Where the send stands after `failed` (the policy is pgt-core's,
    /// [`pgt_core::sender::destination_outcome`]).
    fn outcome(&self, failed: &[(u32, Error)]) -> DestinationOutcome {
        let fanout = if self.chain {
            FanOut::Chain
        } else {
            FanOut::Direct
        };
        let failed: Vec<u32> = failed.iter().map(|(r, _)| *r).collect();
        pgt_core::sender::destination_outcome(fanout, &self.destinations, &failed)
    }

    /// The send's error when some destinations failed and the rest completed.
    fn into_error(self) -> Option<Error> {
        let failed = std::mem::take(&mut *self.failed.lock().unwrap_or_else(|p| p.into_inner()));
        if failed.is_empty() {
            return None;
        }
        let DestinationOutcome { live, cut_off } = self.outcome(&failed);
        Some(Error::Destinations {
            completed: live,
            failed,
            cut_off,
        })
    }
}

/// The sending host: one thread per destination, each sending its messages in order. Data is hashed
/// by a thread of its own, started with the send (`hash_storages`), or by the first destination's
/// thread right before sending it (`Transport::hashes_apart`, [`SenderHash`]).
struct SendWorkers<'a> {
    /// Unbounded: a destination that stalls must not hold up the main thread, so the others' messages.
    /// A job is a descriptor (its segments) or a small control message, one per message of the plan
    /// per destination, so the queues never hold more than the plan itself describes.
    workers: HashMap<u32, mpsc::Sender<SendJob>>,
    /// The hashing thread's requests, when hashing is apart from the sends (`hash_storages`).
    hasher: Option<SyncSender<(u32, Vec<Segment>)>>,
    events: mpsc::Receiver<Event>,
    abort: &'a Abort,
    timeout: Duration,
}

impl<'a> SendWorkers<'a> {
    fn start<'scope, P: ProcessGroup>(
        transport: &'a Transport<P>,
        scope: &'scope Scope<'scope, '_>,
        dst_ranks: &[u32],
        storages: &'a [&'a [u8]],
        (hasher, event_tx, events): HashingAndEvents,
        (sent, total): (&'a AtomicU64, u64),
        (abort, outcomes): (&'a Abort, &'a SendOutcomes),
    ) -> SendWorkers<'a>
    where
        'a: 'scope,
    {
        let timeout = transport.options.timeout;
        let hash_apart = hasher.is_some();

        let mut workers = HashMap::new();
        for (i, &dst) in dst_ranks.iter().enumerate() {
            let (tx, rx) = mpsc::channel::<SendJob>();
            workers.insert(dst, tx);
            let pg = &transport.pg;
            let progress = transport.options.progress.clone();
            let event_tx = event_tx.clone();
            // Progress counts the first destination's bytes: one copy of the checkpoint.
            let counts = i == 0;
            scope.spawn(move || {
                // The core asks for every storage byte to be hashed exactly once, on the sends to one
                // destination, in order (so one thread sees all of a storage).
                let mut hashers = StorageHashers::default();
                // This destination's send failed: the rest of its messages are not sent.
                let mut failed = false;
                for job in rx {
                    if abort.is_set() {
                        break;
                    }
                    // The queue is drained all the same, so that the main thread never waits on it.
                    if failed {
                        continue;
                    }
                    let (op, result) = match &job {
                        SendJob::Bytes(op, b) => (op, pg.send(op.to, op.tag, &[b], timeout)),
                        SendJob::Storages(op, prefix, segs) => {
                            let mut parts = storage_parts(storages, segs);
                            parts.insert(0, prefix);
                            let r = if op.hash && !hash_apart {
                                // Each piece is hashed right before the system call that copies
                                // it: the kernel reads it from cache.
                                let mut message = MessageHasher::start(&mut hashers, segs);
                                let mut observe = |part: usize, piece: &[u8]| {
                                    // Part 0 is the prefix, part i + 1 segment i.
                                    if let Some(segment) = part.checked_sub(1) {
                                        message.feed(segment, piece);
                                    }
                                };
                                let r =
                                    pg.send_observed(op.to, op.tag, &parts, timeout, &mut observe);
                                if r.is_ok() {
                                    let digests = message.finish(&mut hashers, segs);
                                    let _ = event_tx.send(Event::Digests(op.message, digests));
                                }
                                r
                            } else {
                                pg.send(op.to, op.tag, &parts, timeout)
                            };
                            if counts && r.is_ok() {
                                let bytes = op.len - PREFIX_LEN;
                                let done = sent.fetch_add(bytes, Ordering::Relaxed) + bytes;
                                if let Some(p) = &progress {
                                    p(done, total);
                                }
                            }
                            (op, r)
                        }
                    };
                    if let Err(e) = result {
                        failed = true;
                        let e = Error::Peer {
                            action: PeerAction::Sending,
                            message: op.message,
                            rank: op.to,
                            source: e,
                        };
                        outcomes.fail(dst, e, abort);
                    }
                }
            });
        }
        SendWorkers {
            workers,
            hasher,
            events,
            abort,
            timeout,
        }
    }
}

impl SendHost for SendWorkers<'_> {
    type Error = Error;

    fn send(&mut self, op: &SendOp, payload: Payload<'_>) -> Result<()> {
        if self.abort.is_set() {
            return Err(self.abort.error());
        }
        let job = match payload {
            Payload::Bytes(b) => SendJob::Bytes(*op, b.to_vec()),
            Payload::Storages { prefix, segments } => {
                if let (true, Some(hasher)) = (op.hash, &self.hasher) {
                    if hasher.send((op.message, segments.to_vec())).is_err() {
                        return Err(self.abort.error());
                    }
                }
                SendJob::Storages(*op, prefix, segments.to_vec())
            }
        };
        let worker = self.workers.get(&op.to).ok_or_else(|| {
            Error::internal(format!(
                "the engine named rank {}, not a destination",
                op.to
            ))
        })?;
        if worker.send(job).is_err() {
            // The worker stopped: its error is in `abort`.
            return Err(self.abort.error());
        }
        Ok(())
    }

    fn next_event(&mut self, wait: bool) -> Result<Option<Event>> {
        if !wait {
            return Ok(self.events.try_recv().ok());
        }
        wait_event(&self.events, self.abort, self.timeout, "storage digests").map(Some)
    }

    fn flush(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The sending side's hashing thread (when it hashes apart), its request queue and the events it
/// reports to, made before the send's workers start.
type HashingAndEvents = (
    Option<SyncSender<(u32, Vec<Segment>)>>,
    mpsc::Sender<Event>,
    mpsc::Receiver<Event>,
);

/// Bytes the sender's hashing thread hashes ahead between two looks at its queue.
const HASH_AHEAD_PIECE: usize = 1 << 20;

/// The sender's hashing thread: answers each data message's request with the digests of the
/// storages the message completes, and between requests hashes the storages ahead, in wire order
/// (the plan's), from the start of the send — while the metadata is built and encoded and while the
/// receivers decode it, when the sender's other core would be idle. Ends when the queue closes or
/// the send aborts.
fn hash_storages(
    storages: &[&[u8]],
    requests: mpsc::Receiver<(u32, Vec<Segment>)>,
    events: mpsc::Sender<Event>,
    abort: &Abort,
) {
    let mut ahead = HashAhead::new(storages);
    loop {
        if abort.is_set() {
            return;
        }
        let request = if ahead.done() {
            requests.recv().ok()
        } else {
            match requests.try_recv() {
                Ok(request) => Some(request),
                Err(mpsc::TryRecvError::Empty) => {
                    ahead.step();
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => None,
            }
        };
        let Some((message, segments)) = request else {
            return;
        };
        let digests: Option<Vec<u64>> = segments
            .iter()
            .filter(|s| s.completes)
            .map(|s| ahead.digest(s.storage as usize))
            .collect();
        match digests {
            Some(digests) => {
                let _ = events.send(Event::Digests(message, digests));
            }
            None => {
                abort.fail(Error::internal(format!(
                    "data message {message} names a storage the send does not have"
                )));
                return;
            }
        }
    }
}

/// Whole-storage digests, computed ahead in storage order or on demand.
struct HashAhead<'a> {
    storages: &'a [&'a [u8]],
    digests: Vec<Option<u64>>,
    /// The storage being hashed ahead, how far, and its running hash.
    next: usize,
    offset: usize,
    running: StorageHasher,
}

impl<'a> HashAhead<'a> {
    fn new(storages: &'a [&'a [u8]]) -> HashAhead<'a> {
        HashAhead {
            storages,
            digests: vec![None; storages.len()],
            next: 0,
            offset: 0,
            running: StorageHasher::default(),
        }
    }

    fn done(&self) -> bool {
        self.next >= self.storages.len()
    }

    /// Hashes the next piece (at most [`HASH_AHEAD_PIECE`]) of the first storage not yet hashed.
    fn step(&mut self) {
        let Some(bytes) = self.storages.get(self.next) else {
            return;
        };
        let end = bytes.len().min(self.offset + HASH_AHEAD_PIECE);
        self.running.update(&bytes[self.offset..end]);
        self.offset = end;
        if end == bytes.len() {
            self.digests[self.next] = Some(std::mem::take(&mut self.running).finish());
            self.offset = 0;
            self.skip_hashed();
        }
    }

    fn skip_hashed(&mut self) {
        while self.digests.get(self.next).is_some_and(Option::is_some) {
            self.next += 1;
        }
    }

    /// Storage `s`'s digest, hashing what is left of it now; `None` when there is no such storage.
    fn digest(&mut self, s: usize) -> Option<u64> {
        let bytes = *self.storages.get(s)?;
        if let Some(d) = self.digests[s] {
            return Some(d);
        }
        if s == self.next {
            while self.digests[s].is_none() {
                self.step();
            }
            return self.digests[s];
        }
        let mut hasher = StorageHasher::default();
        hasher.update(bytes);
        let d = hasher.finish();
        self.digests[s] = Some(d);
        Some(d)
    }
}

fn storage_parts<'a>(storages: &[&'a [u8]], segs: &[Segment]) -> Vec<&'a [u8]> {
    segs.iter()
        .map(|s| &storages[s.storage as usize][s.offset as usize..(s.offset + s.len) as usize])
        .collect()
}

// ---- receiving ----

/// Where each storage of a receive lands: region `s` of the [`ReceiveMemory`] is storage `s`'s wire
/// target (its destination, or staging when it is cast on receive); a cast storage's destination is
/// region `cast_dest[s]`.
struct Layout {
    bindings: Vec<Binding>,
    cast_dest: Vec<Option<usize>>,
    /// Per storage: cast into its destination ([`ReceiveHost::not_in_target`] until then).
    cast_done: Vec<AtomicBool>,
}

/// A cast job: a landed data message's segments, and its digests (hashed as it landed), reported
/// once the storages it completes are cast.
struct PostJob {
    message: u32,
    segments: Vec<Segment>,
    digests: Option<Vec<u64>>,
}

/// A forward job.
enum ForwardJob {
    Bytes(ForwardOp, Vec<u8>),
    /// A data message: the prefix, then the segments' bytes as received.
    Storages(ForwardOp, [u8; PREFIX_LEN as usize], Vec<Segment>),
}

/// What a receive leaves for assembly.
struct Landed<'t> {
    memory: Arc<ReceiveMemory<'t>>,
    cast_dest: Vec<Option<usize>>,
    /// The (target leaf, shard) each in-place storage was found at.
    in_place_origin: Vec<Option<(usize, usize)>>,
    /// Bound leaf by leaf: the target has the received tree's shape.
    by_position: bool,
    total_bytes: u64,
    metadata_seconds: f64,
    forward_failed: Arc<Mutex<Option<ForwardFailure>>>,
    /// A staged receive's in-place targets, by storage (see [`copy_in_staged`]).
    staged: Vec<Option<&'t mut [u8]>>,
}

/// The receiving host: receives on the calling thread straight into [`ReceiveMemory`], hashing each
/// piece as it lands; a post thread casts what has landed, a forward thread relays it (chain
/// fan-out), each started only when the receive has such work.
struct Landing<'a, 'scope, 'env, 't, 'd, P: ProcessGroup> {
    transport: &'a Transport<P>,
    scope: &'scope Scope<'scope, 'env>,
    /// The in-place target, until binding takes its buffers.
    target: Option<&'t mut StateDict<'d>>,
    /// In-place buffers found by binding, by storage, and where they were found.
    in_place: Vec<Option<&'t mut [u8]>>,
    in_place_origin: Vec<Option<(usize, usize)>>,
    /// The target has the received tree's shape: bound leaf by leaf, assembled in its own tree.
    by_position: bool,
    memory: Option<Arc<ReceiveMemory<'t>>>,
    layout: Option<Arc<Layout>>,
    post: Option<SyncSender<PostJob>>,
    forward: Option<SyncSender<ForwardJob>>,
    /// Running hashes of the storages that have started to land but not finished.
    hashers: StorageHashers,
    /// Completions of this thread (data landed), reported before the workers'.
    local: VecDeque<Event>,
    events: Option<mpsc::Receiver<Event>>,
    /// The workers' side of `events`, until the forward thread (started at the first forward) takes
    /// it.
    event_tx: Option<mpsc::Sender<Event>>,
    abort: &'a Abort,
    /// The slot of the rank this receive forwards to (chain fan-out), taken at the first forward.
    forward_slot: &'a Mutex<Option<Slots>>,
    /// Set by the forward thread when a forward fails: it forwards nothing more, and the receive
    /// goes on.
    forward_failed: Arc<Mutex<Option<ForwardFailure>>>,
    /// A receive from the upstream failed at the process group: the link is not drained.
    link_failed: bool,
    received: u64,
    total_bytes: u64,
    started: Instant,
    metadata_seconds: f64,
    /// The received metadata's decoded size: memory of this receive's budget.
    metadata_memory: u64,
    /// In place, all or nothing ([`RecvOptions::staged`]).
    staged: bool,
    /// A staged receive's in-place targets, by storage, written once the transfer verified.
    staged_targets: Vec<Option<&'t mut [u8]>>,
    /// The post (hash and cast) thread, joined when the receive fails ([`ReceiveHost::stop`]).
    post_thread: Option<std::thread::ScopedJoinHandle<'scope, ()>>,
    /// The transfer's id, once its header announced it, and the ranks its messages come from:
    /// what [`Transport::receive`] tells the process group to forget should the receive fail.
    transfer: Option<(u64, Vec<u32>)>,
}

impl<'a, 'scope, 'env, 't, 'd, P> Landing<'a, 'scope, 'env, 't, 'd, P>
where
    P: ProcessGroup,
    'a: 'scope,
    't: 'scope,
    'd: 't,
{
    fn new(
        transport: &'a Transport<P>,
        scope: &'scope Scope<'scope, 'env>,
        target: &'t mut StateDict<'d>,
        abort: &'a Abort,
        forward_slot: &'a Mutex<Option<Slots>>,
    ) -> Self {
        Landing {
            transport,
            scope,
            target: Some(target),
            in_place: Vec::new(),
            in_place_origin: Vec::new(),
            by_position: false,
            memory: None,
            layout: None,
            post: None,
            forward: None,
            hashers: StorageHashers::default(),
            local: VecDeque::new(),
            events: None,
            event_tx: None,
            abort,
            forward_slot,
            forward_failed: Arc::default(),
            link_failed: false,
            received: 0,
            total_bytes: 0,
            started: Instant::now(),
            metadata_seconds: 0.0,
            metadata_memory: 0,
            staged: false,
            staged_targets: Vec::new(),
            post_thread: None,
            transfer: None,
        }
    }

    /// Notes the transfer id `op` waits for and the rank it comes from ([`Landing::transfer`]).
    fn note_sender(&mut self, op: &RecvOp) {
        let Some(id) = op.prefix else { return };
        let (_, from) = self.transfer.get_or_insert_with(|| (id, Vec::new()));
        if !from.contains(&op.from) {
            from.push(op.from);
        }
    }

    fn timeout(&self) -> Duration {
        self.transport.options.timeout
    }

    /// What assembly needs, once the workers are told to stop (their queues close).
    fn into_landed(self) -> Option<Landed<'t>> {
        Some(Landed {
            memory: self.memory?,
            cast_dest: self.layout.map(|l| l.cast_dest.clone()).unwrap_or_default(),
            in_place_origin: self.in_place_origin,
            by_position: self.by_position,
            total_bytes: self.total_bytes,
            metadata_seconds: self.metadata_seconds,
            forward_failed: self.forward_failed,
            staged: self.staged_targets,
        })
    }

    /// Matches the target's tensors to the incoming storages by key path. The target usually has the
    /// received tree's shape (`paths` is `None`): then received leaf i is the target's leaf i, and no
    /// key path is built. Else received leaf i goes to the target leaf at `paths[i]`, if there is one.
    /// Writable storages become in-place destinations; a read-only one (borrowed or shared) fails the
    /// binding ([`Error::InPlaceReadOnly`]), never silently replaced by a fresh buffer.
    fn bind_in_place(
        &mut self,
        target: &'t mut StateDict<'d>,
        incoming: &Incoming,
        paths: Option<&[KeyPath]>,
    ) -> std::result::Result<Vec<InPlace>, ReadOnly> {
        let n = incoming.storages.len();
        self.in_place = (0..n).map(|_| None).collect();
        self.in_place_origin = vec![None; n];
        // Received leaf -> target leaf, by key path, for a target of another shape.
        let by_path: Option<Vec<Option<usize>>> = paths.map(|paths| {
            let target_paths = target.key_paths();
            let index: HashMap<&KeyPath, usize> = target_paths.iter().zip(0..).collect();
            paths.iter().map(|p| index.get(p).copied()).collect()
        });
        let mut target_tensors: Vec<Vec<Option<&'t mut Tensor<'d>>>> = target
            .leaves_mut()
            .into_iter()
            .map(|entry| {
                StateDict::entry_tensors_mut(entry)
                    .into_iter()
                    .map(Some)
                    .collect()
            })
            .collect();
        let mut targets = Vec::new();
        for (s, r) in incoming.storages.iter().enumerate() {
            let found = match &by_path {
                None => Some(r.leaf as usize),
                Some(by_path) => by_path.get(r.leaf as usize).copied().flatten(),
            };
            let Some(leaf) = found else {
                continue;
            };
            let shard = r.shard as usize;
            let Some(tensor) = target_tensors
                .get_mut(leaf)
                .and_then(|tensors| tensors.get_mut(shard)?.take())
            else {
                continue;
            };
            let Tensor { layout, storage } = tensor;
            let kind = match storage {
                Storage::Borrowed(_) => "Borrowed",
                Storage::Shared(..) => "Shared",
                Storage::Owned(_) | Storage::BorrowedMut(_) => "",
            };
            let Some(buf) = storage.bytes_mut() else {
                return Err(ReadOnly {
                    leaf: r.leaf,
                    storage: kind,
                });
            };
            targets.push(InPlace {
                storage: s as u32,
                id: s as u64,
                dtype: layout.dtype,
                nbytes: buf.len() as u64,
            });
            self.in_place[s] = Some(buf);
            self.in_place_origin[s] = Some((leaf, shard));
        }
        Ok(targets)
    }

    /// The memory of the receive: in-place buffers as they are, the rest fresh or from the pool, if
    /// it fits in the memory budget with the metadata.
    fn allocate(&mut self, incoming: &Incoming, bindings: &[Binding]) -> Result<Layout> {
        let budget = self.transport.options.memory_budget;
        let needed =
            bindings
                .iter()
                .zip(&incoming.storages)
                .fold(self.metadata_memory, |sum, (b, r)| {
                    // Staged, an in-place storage lands in staging of its size.
                    let fresh = if matches!(b.dest, Dest::InPlace(_)) && !self.staged {
                        0
                    } else {
                        b.nbytes
                    };
                    let staging = if b.cast_from.is_some() { r.nbytes } else { 0 };
                    sum.saturating_add(fresh).saturating_add(staging)
                });
        if needed > budget {
            return Err(Error::MemoryBudget { needed, budget });
        }
        let n = bindings.len();
        let pool = self.transport.options.pool.as_deref();
        let mut wire: Vec<Option<Target<'t>>> = (0..n).map(|_| None).collect();
        let mut cast: Vec<(usize, Target<'t>)> = Vec::new();
        // Small fresh destinations, as (storage, length): carved from one mapping.
        let mut to_carve: Vec<(usize, usize)> = Vec::new();
        self.staged_targets = (0..n).map(|_| None).collect();
        for (s, (b, r)) in bindings.iter().zip(&incoming.storages).enumerate() {
            let dest = match b.dest {
                Dest::InPlace(id) => {
                    let buf = self
                        .in_place
                        .get_mut(id as usize)
                        .and_then(Option::take)
                        .ok_or_else(|| {
                            Error::internal(format!("in-place buffer {id} was never bound"))
                        })?;
                    if self.staged {
                        // Kept aside until the transfer verified; the bytes land in staging,
                        // allocated below as a fresh destination is.
                        self.staged_targets[s] = Some(buf);
                        None
                    } else {
                        Some(Target::Borrowed(buf))
                    }
                }
                Dest::Fresh => None,
            };
            // A fresh destination: from the pool (touched memory), carved, or its own mapping.
            let fresh = |len: usize, staging: bool, carve: &mut Vec<(usize, usize)>| {
                match pool.and_then(|p| p.take(len)) {
                    Some(buf) => Ok(Some(Target::Touched(buf))),
                    // Staging is temporary (and may go to the pool): carving it would keep the
                    // destinations' shared mapping alive with it.
                    None if len < MMAP_THRESHOLD && !staging => {
                        carve.push((s, len));
                        Ok(None)
                    }
                    None => Buffer::try_zeroed(len)
                        .map(|b| Some(Target::Fresh(b)))
                        .map_err(|e| {
                            Error::io(format!("allocating {len} bytes for storage {s}"), e)
                        }),
                }
            };
            if b.cast_from.is_some() {
                let dest =
                    match dest {
                        Some(d) => d,
                        None => match fresh(b.nbytes as usize, false, &mut Vec::new())? {
                            Some(d) => d,
                            None => Target::Fresh(Buffer::try_zeroed(b.nbytes as usize).map_err(
                                |e| Error::io(format!("allocating storage {s}'s destination"), e),
                            )?),
                        },
                    };
                cast.push((s, dest));
                wire[s] = fresh(r.nbytes as usize, true, &mut to_carve)?;
            } else {
                let staging = self.staged && matches!(b.dest, Dest::InPlace(_));
                wire[s] = match dest {
                    Some(d) => Some(d),
                    None => fresh(b.nbytes as usize, staging, &mut to_carve)?,
                };
            }
        }
        let carve_lens: Vec<usize> = to_carve.iter().map(|&(_, len)| len).collect();
        let carved = Buffer::zeroed_many(&carve_lens).map_err(|e| {
            let total: usize = carve_lens.iter().sum();
            Error::io(format!("allocating {total} bytes for small storages"), e)
        })?;
        for ((s, _), buf) in to_carve.into_iter().zip(carved) {
            wire[s] = Some(Target::Fresh(buf));
        }
        let mut cast_dest = vec![None; n];
        let mut targets: Vec<Target<'t>> = wire
            .into_iter()
            .map(|t| t.unwrap_or(Target::Fresh(Buffer::zeroed(0))))
            .collect();
        for (s, dest) in cast {
            cast_dest[s] = Some(targets.len());
            targets.push(dest);
        }
        self.memory = Some(Arc::new(ReceiveMemory::new(targets)));
        Ok(Layout {
            bindings: bindings.to_vec(),
            cast_dest,
            cast_done: (0..n).map(|_| AtomicBool::new(false)).collect(),
        })
    }

    /// Starts the post (cast) thread when some storage is cast; the forward thread waits for the first
    /// forward ([`Landing::start_forward`]). A thread started here is on the receive's critical path
    /// (between the metadata and the first data byte), and most receives need neither.
    fn start_workers(&mut self, layout: Arc<Layout>) -> Result<()> {
        let (event_tx, events) = mpsc::channel::<Event>();
        self.events = Some(events);
        let abort = self.abort;
        if layout.bindings.iter().any(|b| b.cast_from.is_some()) {
            let memory = self.allocated()?;
            let (post_tx, post_rx) = mpsc::sync_channel::<PostJob>(QUEUE_DEPTH);
            self.post = Some(post_tx);
            let event_tx = event_tx.clone();
            self.post_thread = Some(self.scope.spawn(move || {
                for job in post_rx {
                    if abort.is_set() {
                        break;
                    }
                    match cast_landed(&memory, &layout, &job.segments) {
                        Ok(()) => {
                            if let Some(digests) = job.digests {
                                let _ = event_tx.send(Event::Digests(job.message, digests));
                            }
                        }
                        Err(e) => {
                            abort.fail(e);
                            break;
                        }
                    }
                }
            }));
        }
        self.event_tx = Some(event_tx);
        Ok(())
    }

    /// The receive's memory, for a worker: allocated once the metadata is bound.
    fn allocated(&self) -> Result<Arc<ReceiveMemory<'t>>> {
        self.memory
            .clone()
            .ok_or_else(|| Error::internal("a worker before the receive memory was allocated"))
    }

    /// Starts the forward thread (chain fan-out), at this receive's first forward.
    fn start_forward(&mut self) -> Result<()> {
        let memory = self.allocated()?;
        let event_tx = self
            .event_tx
            .take()
            .ok_or_else(|| Error::internal("a forward before the workers' events"))?;
        let abort = self.abort;
        let (fwd_tx, fwd_rx) = mpsc::sync_channel::<ForwardJob>(QUEUE_DEPTH);
        self.forward = Some(fwd_tx);
        let pg = &self.transport.pg;
        let timeout = self.timeout();
        let forward_failed = Arc::clone(&self.forward_failed);
        self.scope.spawn(move || {
            // A failed forward breaks the chain below this rank, not this rank's receive: the rest
            // is not forwarded but reported forwarded, so that the receive completes.
            let mut failed = false;
            for job in fwd_rx {
                if abort.is_set() {
                    break;
                }
                if failed {
                    let (ForwardJob::Bytes(op, _) | ForwardJob::Storages(op, _, _)) = &job;
                    let _ = event_tx.send(Event::Forwarded(op.message));
                    continue;
                }
                let (op, result) = match &job {
                    ForwardJob::Bytes(op, b) => (
                        op,
                        pg.send(op.to, op.tag, &[b], timeout)
                            .map_err(|source| Error::Peer {
                                action: PeerAction::Forwarding,
                                message: op.message,
                                rank: op.to,
                                source,
                            }),
                    ),
                    ForwardJob::Storages(op, prefix, segs) => {
                        let parts: Option<Vec<&[u8]>> = std::iter::once(Some(&prefix[..]))
                            .chain(segs.iter().map(|s| {
                                memory.read(
                                    s.storage as usize,
                                    s.offset as usize..(s.offset + s.len) as usize,
                                )
                            }))
                            .collect();
                        let result = match parts {
                            Some(parts) => {
                                pg.send(op.to, op.tag, &parts, timeout).map_err(|source| {
                                    Error::Peer {
                                        action: PeerAction::Forwarding,
                                        message: op.message,
                                        rank: op.to,
                                        source,
                                    }
                                })
                            }
                            None => Err(Error::internal(format!(
                                "message {} was forwarded before it landed",
                                op.message
                            ))),
                        };
                        (op, result)
                    }
                };
                match result {
                    Ok(()) => {}
                    // Not the peer's fault but ours: the receive fails.
                    Err(e @ Error::Internal { .. }) => {
                        abort.fail(e);
                        break;
                    }
                    Err(e) => {
                        let reason = with_sources(&e);
                        warn!(
                            rank = op.to,
                            message = op.message,
                            "forwarding failed; this rank's receive goes on, the ranks downstream fail: {reason}"
                        );
                        *forward_failed.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(ForwardFailure {
                                rank: op.to,
                                message: op.message,
                                reason,
                            });
                        failed = true;
                    }
                }
                let _ = event_tx.send(Event::Forwarded(op.message));
            }
        });
        Ok(())
    }
}

/// Casts every storage a landed message completes that is cast on receive (its wire bytes were
/// hashed as they landed).
fn cast_landed(memory: &ReceiveMemory<'_>, layout: &Layout, segments: &[Segment]) -> Result<()> {
    for s in segments {
        let storage = s.storage as usize;
        let binding = &layout.bindings[storage];
        if let (true, Some(from), Some(dest)) =
            (s.completes, binding.cast_from, layout.cast_dest[storage])
        {
            let wire = memory
                .read(storage, 0..memory.region_len(storage))
                .ok_or_else(|| {
                    Error::internal(format!("storage {storage} was cast before it landed"))
                })?;
            memory.try_write(&[(dest, 0..memory.region_len(dest))], |d| {
                convert(from, wire, binding.dtype, d[0])
            })??;
            layout.cast_done[storage].store(true, Ordering::Release);
        }
    }
    Ok(())
}

impl<'a, 'scope, 'env, 't, 'd, P> ReceiveHost for Landing<'a, 'scope, 'env, 't, 'd, P>
where
    P: ProcessGroup,
    'a: 'scope,
    't: 'scope,
    'd: 't,
{
    type Error = Error;

    fn recv_bytes(&mut self, op: &RecvOp) -> Result<Vec<u8>> {
        self.note_sender(op);
        let pg = &self.transport.pg;
        let result = receive_current(pg, op, self.timeout(), &Error::ProcessGroup, |t| {
            let bytes = pg
                .recv_vec(op.from, op.tag, op.len as usize, t)
                .map_err(Failed::Pg)?;
            Ok((!op.is_stale(&bytes)).then_some(bytes))
        });
        self.link_failed |= matches!(result, Err(Error::ProcessGroup(_)));
        let bytes = result?;
        if op.kind == MessageKind::Metadata {
            // What decoding it will take, from a pass over the bytes that allocates nothing; the
            // budget is checked before pgt-core decodes it (bytes it refuses are its to name).
            let body = bytes.get(PREFIX_LEN as usize..).unwrap_or_default();
            if let Ok(size) = pgt_core::codec::decoded_size(body) {
                let budget = self.transport.options.memory_budget;
                if size > budget {
                    return Err(Error::MemoryBudget {
                        needed: size,
                        budget,
                    });
                }
                self.metadata_memory = size;
            }
        }
        Ok(bytes)
    }

    fn bind(
        &mut self,
        incoming: &Incoming,
        tree: &mut dyn ReceivedTree<Error>,
    ) -> Result<Vec<InPlace>> {
        self.metadata_seconds = self.started.elapsed().as_secs_f64();
        self.total_bytes = incoming.total_bytes;
        debug!(
            storages = incoming.storages.len(),
            bytes = incoming.total_bytes,
            "metadata received"
        );
        let _bind_span = info_span!("bind").entered();
        match self.target.take() {
            // A target without tensors (`pgt recv`'s empty dict) has nothing to bind in place: the
            // key paths, which take memory, are not built.
            Some(target) if holds_tensors(target) => {
                self.by_position = target.has_shape(&tree.nodes()?);
                let bound = if self.by_position {
                    self.bind_in_place(target, incoming, None)
                } else {
                    self.bind_in_place(target, incoming, Some(&tree.paths()?))
                };
                bound.or_else(|ReadOnly { leaf, storage }| {
                    // The key path is built for the error only.
                    let paths = tree.paths()?;
                    Err(Error::InPlaceReadOnly {
                        path: paths
                            .get(leaf as usize)
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                        storage,
                    })
                })
            }
            _ => Ok(Vec::new()),
        }
    }

    fn bound(&mut self, incoming: &Incoming, bindings: &[Binding]) -> Result<()> {
        let layout = Arc::new(self.allocate(incoming, bindings)?);
        self.start_workers(Arc::clone(&layout))?;
        self.layout = Some(layout);
        Ok(())
    }

    fn recv_data(&mut self, op: &RecvOp, segments: &[Segment]) -> Result<()> {
        self.note_sender(op);
        if self.abort.is_set() {
            return Err(self.abort.error());
        }
        let (Some(memory), Some(layout)) = (&self.memory, &self.layout) else {
            return Err(Error::internal("data before bindings"));
        };
        let parts: Vec<(usize, std::ops::Range<usize>)> = segments
            .iter()
            .map(|s| {
                (
                    s.storage as usize,
                    s.offset as usize..(s.offset + s.len) as usize,
                )
            })
            .collect();
        let pg = &self.transport.pg;
        let wrap = |source| Error::Peer {
            action: PeerAction::Receiving,
            message: op.message,
            rank: op.from,
            source,
        };
        // Each piece is hashed as it lands, on this thread, while it is in cache. A stale message
        // is not hashed: its prefix comes first, so the observer knows before its first data byte.
        let mut message = op
            .hash
            .then(|| MessageHasher::start(&mut self.hashers, segments));
        // The prefix into its own 8 bytes, the rest straight into the storages; a stale message's
        // bytes never land (`try_write`), and the next message with the tag is received into the
        // same ranges.
        let result = receive_current(pg, op, self.timeout(), &wrap, |t| {
            let mut prefix = [0u8; PREFIX_LEN as usize];
            let landed = memory.try_write(&parts, |slices| {
                let mut all: Vec<&mut [u8]> = Vec::with_capacity(slices.len() + 1);
                all.push(&mut prefix);
                all.extend(slices.iter_mut().map(|s| &mut **s));
                match message.as_mut() {
                    Some(message) => {
                        let mut seen_prefix = Vec::with_capacity(PREFIX_LEN as usize);
                        let mut stale = None;
                        let mut observe = |part: usize, piece: &[u8]| match part.checked_sub(1) {
                            None => seen_prefix.extend_from_slice(piece),
                            Some(segment) => {
                                if !*stale.get_or_insert_with(|| op.is_stale(&seen_prefix)) {
                                    message.feed(segment, piece);
                                }
                            }
                        };
                        pg.recv_into_observed(op.from, op.tag, &mut all, t, &mut observe)
                    }
                    None => pg.recv_into(op.from, op.tag, &mut all, t),
                }
                .map_err(Some)?;
                if op.is_stale(&prefix) {
                    return Err(None);
                }
                Ok(())
            });
            match landed {
                Ok(Ok(())) => Ok(Some(())),
                Ok(Err(None)) => Ok(None),
                Ok(Err(Some(e))) => Err(Failed::Pg(e)),
                Err(claim) => Err(Failed::Host(claim.into())),
            }
        });
        self.link_failed |= matches!(result, Err(Error::Peer { .. }));
        result?;
        self.received += op.len - PREFIX_LEN;
        if let Some(p) = &self.transport.options.progress {
            p(self.received, self.total_bytes);
        }
        let digests = message.map(|m| m.finish(&mut self.hashers, segments));
        let casts = segments
            .iter()
            .any(|s| s.completes && layout.bindings[s.storage as usize].cast_from.is_some());
        self.local.push_back(Event::Landed(op.message));
        if casts {
            // The digests are reported once the cast is done: a storage whose digest is in is final.
            let job = PostJob {
                message: op.message,
                segments: segments.to_vec(),
                digests,
            };
            let post = self
                .post
                .as_ref()
                .ok_or_else(|| Error::internal("data before the post worker started"))?;
            if post.send(job).is_err() {
                return Err(self.abort.error());
            }
        } else if let Some(digests) = digests {
            self.local.push_back(Event::Digests(op.message, digests));
        }
        Ok(())
    }

    fn forward(&mut self, op: &ForwardOp, payload: Payload<'_>) -> Result<()> {
        {
            let mut slot = self.forward_slot.lock().unwrap_or_else(|p| p.into_inner());
            if slot.is_none() {
                *slot = Some(
                    self.transport
                        .busy
                        .claim(PeerAction::Forwarding, &[op.to])?,
                );
            }
        }
        let job = match payload {
            Payload::Bytes(b) => ForwardJob::Bytes(*op, b.to_vec()),
            Payload::Storages { prefix, segments } => {
                ForwardJob::Storages(*op, prefix, segments.to_vec())
            }
        };
        if self.forward.is_none() {
            self.start_forward()?;
        }
        let forward = self
            .forward
            .as_ref()
            .ok_or_else(|| Error::internal("a forward before the forward worker started"))?;
        if forward.send(job).is_err() {
            return Err(self.abort.error());
        }
        Ok(())
    }

    fn next_event(&mut self, wait: bool) -> Result<Option<Event>> {
        if let Some(e) = self.local.pop_front() {
            return Ok(Some(e));
        }
        let Some(events) = &self.events else {
            return Ok(None);
        };
        if !wait {
            return Ok(events.try_recv().ok());
        }
        wait_event(events, self.abort, self.timeout(), "hashing/forwarding").map(Some)
    }

    fn stop(&mut self) {
        // The post thread casts into in-place targets: once it is joined, what was cast is final.
        self.abort.fail(Error::internal("the receive failed"));
        self.post = None;
        if let Some(thread) = self.post_thread.take() {
            let _ = thread.join();
        }
    }

    fn not_in_target(&mut self) -> Vec<u32> {
        let Some(layout) = &self.layout else {
            return Vec::new();
        };
        (0..layout.bindings.len())
            .filter(|&s| {
                let staged = self.staged_targets.get(s).is_some_and(Option::is_some);
                let uncast = layout.bindings[s].cast_from.is_some()
                    && !layout.cast_done[s].load(Ordering::Acquire);
                staged || uncast
            })
            .map(|s| s as u32)
            .collect()
    }

    fn written_in_place(&mut self, error: Error, written: InPlaceWritten) -> Error {
        Error::InPlaceWritten {
            written: written.written,
            partly: written.partly,
            source: Box::new(error),
        }
    }

    fn discard(&mut self, op: &RecvOp) -> bool {
        // A broken link (a timeout, a closed peer, a message of the wrong length) is not drained: the
        // next receive skips what is left by its prefix instead.
        if self.link_failed || op.len > MAX_STALE_LEN {
            return false;
        }
        // Each message into a buffer of its own, freed once it is drained: a fresh mapping (from
        // 1 MiB on), faulted in only as its bytes arrive. Draining costs the memory of what is
        // actually sent, one message at a time — not of what the refused plan announced (a scratch
        // zeroed to a 1 GiB chunk's length cost 1 GiB before a byte came).
        let Ok(mut scratch) = Buffer::try_zeroed(op.len as usize) else {
            return false;
        };
        let pg = &self.transport.pg;
        let timeout = self.timeout();
        let drained = receive_current(pg, op, timeout, &Error::ProcessGroup, |t| {
            pg.recv_into(op.from, op.tag, &mut [&mut scratch[..]], t)
                .map_err(Failed::Pg)?;
            Ok((!op.is_stale(&scratch)).then_some(()))
        });
        match drained {
            Ok(()) => {
                debug!(
                    message = op.message,
                    tag = op.tag,
                    from = op.from,
                    "drained"
                );
                true
            }
            Err(e) => {
                debug!(
                    message = op.message,
                    tag = op.tag,
                    from = op.from,
                    "draining stopped: {e}"
                );
                self.link_failed = true;
                false
            }
        }
    }
}

/// A staged receive, verified: copies each in-place storage's staged bytes into its target (the
/// wire region, or the cast destination's), then gives the staging back to the pool.
fn copy_in_staged(
    buffers: &mut [Option<Buffer>],
    cast_dest: &[Option<usize>],
    staged: Vec<Option<&mut [u8]>>,
    pool: Option<&BufferPool>,
) -> Result<()> {
    let mut staging = Vec::new();
    for (s, target) in staged.into_iter().enumerate() {
        let Some(target) = target else {
            continue;
        };
        let region = cast_dest.get(s).copied().flatten().unwrap_or(s);
        let bytes = buffers
            .get_mut(region)
            .and_then(Option::take)
            .ok_or_else(|| Error::internal(format!("no staging for storage {s}")))?;
        if bytes.len() != target.len() {
            return Err(Error::internal(format!(
                "storage {s}: {} staged bytes for a target of {}",
                bytes.len(),
                target.len()
            )));
        }
        target.copy_from_slice(&bytes);
        staging.push(bytes);
    }
    if let Some(pool) = pool {
        pool.recycle(staging);
    }
    Ok(())
}

/// A received leaf bound to a read-only storage of the target ([`Error::InPlaceReadOnly`]).
struct ReadOnly {
    leaf: u32,
    storage: &'static str,
}

/// Whether `sd` has a tensor (that a receive may write in place, or must refuse to).
fn holds_tensors(sd: &StateDict<'_>) -> bool {
    sd.leaves().iter().any(|e| !e.tensors().is_empty())
}

/// Builds the received tree: fresh buffers move in; in-place ones move out of the old tree, from where
/// binding found them; staging goes back to the pool. A target of the received shape, bound leaf by
/// leaf, keeps its tree, and each of its entries that the received leaf describes stays as it is (its
/// buffers were written in place): only the entries that differ are rebuilt, and freed.
fn assemble<'d>(
    received: Received,
    buffers: Vec<Option<Buffer>>,
    cast_dest: &[Option<usize>],
    in_place_origin: &[Option<(usize, usize)>],
    by_position: bool,
    target: &mut StateDict<'d>,
    pool: Option<&BufferPool>,
) -> Result<()> {
    let mut buffers = buffers;
    let mut staging = Vec::new();
    // Each storage's destination: a fresh buffer, or where binding found it in the target.
    let mut dests = Vec::with_capacity(received.bindings.len());
    for (s, b) in received.bindings.iter().enumerate() {
        let dest_region = cast_dest.get(s).copied().flatten();
        if dest_region.is_some() {
            // Region `s` held the wire bytes of a cast storage.
            staging.extend(buffers.get_mut(s).and_then(Option::take));
        }
        dests.push(match b.dest {
            Dest::Fresh => StorageAt::Fresh(
                buffers
                    .get_mut(dest_region.unwrap_or(s))
                    .and_then(Option::take)
                    .ok_or_else(|| Error::internal(format!("no fresh buffer for storage {s}")))?,
            ),
            Dest::InPlace(id) => StorageAt::InPlace(
                in_place_origin
                    .get(id as usize)
                    .copied()
                    .flatten()
                    .ok_or_else(|| {
                        Error::internal(format!("in-place buffer {id} was never bound"))
                    })?,
            ),
        });
    }
    if by_position {
        // Bound leaf by leaf: an in-place storage of received leaf i is in the target's leaf i.
        let mut dests = dests.into_iter();
        for (i, (slot, leaf)) in target
            .leaves_mut()
            .into_iter()
            .zip(received.leaves)
            .enumerate()
        {
            let mine: Vec<StorageAt> = dests.by_ref().take(leaf.storages().count()).collect();
            let in_place = mine.iter().all(|d| matches!(d, StorageAt::InPlace(_)));
            if in_place && slot.is_described_by(&leaf) {
                continue;
            }
            let mut tensors = StateDict::entry_tensors_mut(slot);
            let storages = mine
                .into_iter()
                .map(|d| {
                    d.into_storage(|at, shard| {
                        Some(&mut **tensors.get_mut(shard).filter(|_| at == i)?)
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            *slot = Entry::from_leaf(leaf, &mut storages.into_iter())?;
        }
        target.step = received.step;
    } else {
        let mut old_entries = target.take_entries();
        let storages = dests
            .into_iter()
            .map(|d| {
                d.into_storage(|leaf, shard| {
                    StateDict::entry_tensors_mut(old_entries.get_mut(leaf)?)
                        .into_iter()
                        .nth(shard)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut storages = storages.into_iter();
        let entries = received
            .leaves
            .into_iter()
            .map(|leaf| Entry::from_leaf(leaf, &mut storages));
        *target = StateDict::unflatten_from(received.tree.into_iter(), entries, received.step)?;
    }
    if let Some(pool) = pool {
        // Staging held wire bytes only until the cast; the next receive can reuse it.
        pool.recycle(staging);
    }
    Ok(())
}

/// Where a storage of the result is: a fresh buffer, or the target's (leaf, tensor) it was written in.
enum StorageAt {
    Fresh(Buffer),
    InPlace((usize, usize)),
}

impl StorageAt {
    /// The result's storage: the fresh buffer, or the in-place one taken out of the target's tensor
    /// `find(leaf, shard)` (which keeps an empty one).
    fn into_storage<'t, 'd: 't>(
        self,
        find: impl FnOnce(usize, usize) -> Option<&'t mut Tensor<'d>>,
    ) -> Result<Storage<'d>> {
        let vanished = || Error::internal("an in-place buffer vanished");
        match self {
            StorageAt::Fresh(buffer) => Ok(Storage::Owned(buffer)),
            StorageAt::InPlace((leaf, shard)) => {
                let tensor = find(leaf, shard).ok_or_else(vanished)?;
                match std::mem::replace(&mut tensor.storage, Storage::Borrowed(&[])) {
                    s @ (Storage::Owned(_) | Storage::BorrowedMut(_)) => Ok(s),
                    _ => Err(vanished()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        hash_storages, Abort, HashAhead, MessageHasher, StorageHasher, StorageHashers,
        HASH_AHEAD_PIECE, QUEUE_DEPTH,
    };
    use pgt_core::drive::Event;
    use pgt_core::plan::Segment;
    use std::sync::mpsc;

    /// Splits storages of `sizes` into messages of at most `message_len` bytes, as a plan does: a
    /// message packs the storages in order, a storage that does not fit continues in the next.
    fn segments(sizes: &[usize], message_len: usize) -> Vec<Vec<Segment>> {
        let mut messages = vec![Vec::new()];
        let mut room = message_len;
        for (storage, &size) in sizes.iter().enumerate() {
            let mut offset = 0;
            loop {
                if room == 0 {
                    messages.push(Vec::new());
                    room = message_len;
                }
                let len = (size - offset).min(room);
                messages.last_mut().unwrap().push(Segment {
                    storage: storage as u32,
                    offset: offset as u64,
                    len: len as u64,
                    completes: offset + len == size,
                });
                offset += len;
                room -= len;
                if offset == size {
                    break;
                }
            }
        }
        messages
    }

    #[test]
    fn storages_hashed_ahead_give_the_one_shot_digests_whatever_the_order() {
        // Sizes around the piece hashed ahead at a time, and empty ones.
        let sizes = [
            0usize,
            7,
            HASH_AHEAD_PIECE,
            HASH_AHEAD_PIECE + 1,
            0,
            2 * HASH_AHEAD_PIECE + 333,
            5,
        ];
        let storages: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(s, &n)| (0..n).map(|i| (i * 131 + s * 7 + i / 251) as u8).collect())
            .collect();
        let views: Vec<&[u8]> = storages.iter().map(Vec::as_slice).collect();
        let want: Vec<u64> = views.iter().map(|b| pgt_core::digest::digest(b)).collect();
        // Requests after k steps ahead, in wire order and in reverse (storages ahead of, at and
        // behind the one being hashed, some of it hashed already).
        for steps in [0usize, 1, 3, 4, 100] {
            for reverse in [false, true] {
                let mut ahead = HashAhead::new(&views);
                for _ in 0..steps {
                    ahead.step();
                }
                let mut order: Vec<usize> = (0..sizes.len()).collect();
                if reverse {
                    order.reverse();
                }
                for s in order {
                    assert_eq!(ahead.digest(s), Some(want[s]), "storage {s}, {steps} steps");
                }
                assert_eq!(ahead.digest(sizes.len()), None);
            }
        }
        // The thread: requests for the plan's messages while it hashes ahead, in any timing.
        for message_len in [1usize, 4096, 3 << 20] {
            let (tx, rx) = mpsc::sync_channel(QUEUE_DEPTH);
            let (event_tx, events) = mpsc::channel();
            let abort = Abort::default();
            let got: Vec<(u32, u64)> = std::thread::scope(|scope| {
                scope.spawn(|| hash_storages(&views, rx, event_tx, &abort));
                let messages = segments(&sizes, message_len);
                for (m, segs) in messages.iter().enumerate() {
                    tx.send((m as u32, segs.clone())).unwrap();
                }
                drop(tx);
                let mut got = Vec::new();
                for event in events {
                    let Event::Digests(m, digests) = event else {
                        panic!("not a digests event");
                    };
                    let completed = messages[m as usize].iter().filter(|s| s.completes);
                    got.extend(completed.map(|s| s.storage).zip(digests));
                }
                got
            });
            assert!(abort.take().is_none());
            let want: Vec<(u32, u64)> = (0..sizes.len() as u32).zip(want.clone()).collect();
            assert_eq!(got, want, "messages of {message_len}");
        }
    }

    #[test]
    fn piecewise_hashes_equal_the_one_shot_digests() {
        // Odd sizes (empty, below and above XXH3's 240-byte and 1 KiB stripes), messages that cut
        // storages anywhere, pieces that cross segment ends as a process group's reads do.
        let sizes = [
            0usize,
            1,
            239,
            241,
            1023,
            70_001,
            5,
            300_017,
            0,
            64 << 10,
            3,
        ];
        let storages: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(s, &n)| (0..n).map(|i| (i * 131 + s * 7 + i / 251) as u8).collect())
            .collect();
        let want: Vec<u64> = storages
            .iter()
            .map(|b| pgt_core::digest::digest(b))
            .collect();
        for message_len in [1usize, 97, 4096, 65_537, 1 << 20] {
            for piece in [1usize, 13, 4096, 100_003] {
                let mut running = StorageHashers::default();
                let mut got = Vec::new();
                for segs in segments(&sizes, message_len) {
                    // The message's bytes, one stream cut into `piece`s whatever the segments.
                    let bytes: Vec<(usize, &[u8])> = segs
                        .iter()
                        .enumerate()
                        .map(|(i, s)| {
                            let b = &storages[s.storage as usize];
                            (i, &b[s.offset as usize..(s.offset + s.len) as usize])
                        })
                        .collect();
                    let mut message = MessageHasher::start(&mut running, &segs);
                    let mut budget = piece;
                    for (segment, mut rest) in bytes {
                        while !rest.is_empty() {
                            let n = rest.len().min(budget);
                            message.feed(segment, &rest[..n]);
                            rest = &rest[n..];
                            budget -= n;
                            if budget == 0 {
                                budget = piece;
                            }
                        }
                    }
                    let digests = message.finish(&mut running, &segs);
                    let completed = segs.iter().filter(|s| s.completes);
                    got.extend(completed.map(|s| s.storage).zip(digests));
                }
                let want: Vec<(u32, u64)> = (0..sizes.len() as u32).zip(want.clone()).collect();
                assert_eq!(got, want, "messages of {message_len}, pieces of {piece}");
                assert!(running.0.is_empty(), "every storage completed");
            }
        }
    }

    #[test]
    fn host_hasher_equals_the_core_digest() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 + i / 977) as u8).collect();
        for len in [0, 1, 16, 17, 128, 129, 240, 241, 1024, 100_000, 300_000] {
            for split in [1, 7, 4096, 65_536] {
                let mut h = StorageHasher::default();
                for part in data[..len].chunks(split) {
                    h.update(part);
                }
                assert_eq!(
                    h.finish(),
                    pgt_core::digest::digest(&data[..len]),
                    "len {len} split {split}"
                );
            }
        }
    }
}
