//! Soak (issue 13, item 3): 1,000 consecutive transfers over one TCP group, every 10th failing on
//! purpose, with no growth in open file descriptors, threads or RSS in either process.
//!
//! `cargo test -p pgt-host --test soak` runs this file's `main` (no libtest harness: it runs the two
//! ranks as two processes of this same executable, told apart by `PGT_SOAK_RANK`). Rank 0 sends every
//! transfer, rank 1 receives it — in place into a state dict it keeps (every 5th), else into fresh
//! buffers — and checks every storage byte against a pattern salted with the transfer's index, so a
//! tensor left over from an earlier transfer cannot pass. Transfer n (1-based) with n % 10 == 0 fails,
//! rotating through:
//! - a corrupted byte: the sender's group flips the last byte of data message 0 → `DigestMismatch`;
//! - a wrong step: the receiver expects another step → `StepMismatch` (it drains the transfer);
//! - a peer timeout: the sender stalls before data message 0 until the receiver has given up → an
//!   `Error::Peer` naming rank 0 and data message 0 with `PgError::Timeout`, within timeout + 1 s; the
//!   stalled transfer's messages then arrive stale and the next transfer skips them.
//!
//! Each process measures itself after a warm-up of 20 transfers and at the end: open fds, threads and
//! RSS. `PGT_SOAK_LONG=1` runs the longer mode (more transfers, bigger sizes; figures in the README).

use std::process::{Child, Command, ExitCode};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgt_core::schema::{FanOut, PlanParams};
use pgt_core::tree::{key_paths, KeyPath, Leaf, Value};
use pgt_host::memory::Buffer;
use pgt_host::pg::{PgError, ProcessGroup, TcpOptions, TcpProcessGroup};
use pgt_host::state_dict::{Entry, StateDict, Storage};
use pgt_host::synthetic::{self, Shape};
use pgt_host::transport::{Transport, TransportOptions};
use pgt_host::{Error, PeerAction};

mod common;
use common::{OnSend, SendHook};

/// Transfers measured before the start figures are taken: every lazily built thing (the allocator's
/// arenas, the group's buffers, the first failures' paths) exists by then.
const WARM_UP: u64 = 20;
/// A tag no transfer uses (transfers use 1 … 3 + data messages): the receiver tells the sender on it
/// that it gave up on a stalled transfer, and that it is done.
const CONTROL_TAG: u64 = 1 << 40;
/// The receiver's timeout in a timeout transfer. Short, so that ~33 of them cost seconds, not minutes:
/// the sender's stall does not depend on it (it lasts until the receiver reports it gave up).
const SHORT_TIMEOUT: Duration = Duration::from_millis(100);
/// Every other wait: generous, a loaded 2-core machine must not fail a good transfer.
const LONG_TIMEOUT: Duration = Duration::from_secs(60);
/// How much later than its timeout a stalled receive may fail (PROTOCOL.md: "within this (plus ~1 s)").
const TIMEOUT_SLACK: Duration = Duration::from_secs(1);
/// How much RSS may grow from the start figure to the end one, on top of what a rank may rightly still
/// hold (the receiver: [`receiver`]). Nothing a transfer allocates is meant to outlive it, but glibc's
/// malloc keeps freed small blocks in its arenas (one per thread that allocated, up to 8 × cores)
/// instead of returning them, so the figure wanders with which thread served which transfer. Large
/// blocks would wander far more: glibc raises its mmap threshold to the largest mapped block freed (up
/// to 32 MiB), and blocks below it then come from the heap and stay resident once freed — in the long
/// mode that alone moved RSS by 6–17 MiB, with no slope. So the ranks run with the threshold fixed
/// ([`MALLOC_MMAP_THRESHOLD`]), blocks of 128 KiB and more always go back to the OS, and the figure
/// follows live memory: measured growth ≤ 1.3 MiB. 4 MiB over the 980 measured transfers catches a
/// leak of 4.2 KiB or more per transfer.
const ALLOCATOR_SLACK_KIB: u64 = 4 << 10;
/// glibc's mmap threshold for the ranks (environment variable `MALLOC_MMAP_THRESHOLD_`): its default
/// value, fixed, which turns its dynamic growth off (see [`ALLOCATOR_SLACK_KIB`]).
const MALLOC_MMAP_THRESHOLD: &str = "131072";

/// What one run does: how many transfers, of which sizes, with which plan.
#[derive(Clone, Copy, Debug)]
struct Mode {
    transfers: u64,
    /// Storage bytes of a transfer: log-uniform between these.
    min_bytes: u64,
    max_bytes: u64,
    /// Storage bytes of the state dict received in place.
    in_place_bytes: u64,
    /// Leaves of a many-leaf transfer: between these.
    min_leaves: u64,
    max_leaves: u64,
    plan: PlanParams,
    /// How long the whole run may take before the driver kills both ranks.
    deadline: Duration,
}

impl Mode {
    fn from_env() -> Mode {
        if std::env::var_os("PGT_SOAK_LONG").is_some_and(|v| v == "1") {
            Mode {
                transfers: 5_000,
                min_bytes: 4 << 10,
                // A stalled transfer's messages wait in the receiver's stash (64 MiB by default) until
                // a transfer with their tags skips them: kept well under it.
                max_bytes: 16 << 20,
                in_place_bytes: 8 << 20,
                min_leaves: 1_000,
                max_leaves: 10_000,
                plan: PlanParams::default(),
                deadline: Duration::from_secs(3_600),
            }
        } else {
            Mode {
                transfers: 1_000,
                min_bytes: 4 << 10,
                max_bytes: 2 << 20,
                in_place_bytes: 256 << 10,
                min_leaves: 200,
                max_leaves: 2_000,
                // Small chunks and buckets: a few-MiB transfer is several data messages.
                plan: PlanParams {
                    fanout: FanOut::Direct,
                    bucket_size: 64 << 10,
                    chunk_size: 256 << 10,
                },
                deadline: Duration::from_secs(600),
            }
        }
    }
}

/// How transfer `index` (0-based) is meant to end.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Outcome {
    Good,
    CorruptedByte,
    WrongStep,
    PeerTimeout,
}

fn outcome(index: u64) -> Outcome {
    let n = index + 1;
    if n % 10 != 0 {
        return Outcome::Good;
    }
    match (n / 10 - 1) % 3 {
        0 => Outcome::CorruptedByte,
        1 => Outcome::WrongStep,
        _ => Outcome::PeerTimeout,
    }
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Every 5th transfer is received in place, into the state dict the receiver keeps.
fn in_place(index: u64) -> bool {
    index % 5 == 2
}

/// The structure of transfer `index`: the in-place dict, a many-leaf dict (every 7th), a few float
/// tensors (small sizes) or `synthetic::mixed`, every leaf kind (from 128 KiB).
fn shape(mode: &Mode, index: u64) -> Shape {
    let r = splitmix(index);
    let mut shape = if in_place(index) {
        synthetic::mixed(mode.in_place_bytes)
    } else if index % 7 == 3 {
        let leaves = mode.min_leaves + r % (mode.max_leaves - mode.min_leaves + 1);
        synthetic::large(leaves * 64, leaves as usize)
    } else {
        // Log-uniform: as many transfers of a few KiB as of a few MiB.
        let (lo, hi) = (mode.min_bytes as f64, mode.max_bytes as f64);
        let unit = (r >> 11) as f64 / (1u64 << 53) as f64;
        let bytes = (lo * (hi / lo).powf(unit)) as u64;
        if bytes < 128 << 10 {
            synthetic::large(bytes, 1 + (r % 8) as usize)
        } else {
            synthetic::mixed(bytes)
        }
    };
    shape.step = Some(index);
    shape
}

/// The pattern seed of a storage of transfer `index`: `synthetic::seed` salted with the index, so no
/// two transfers of one structure carry the same bytes.
fn seed(path: &KeyPath, shard: usize, index: u64) -> u64 {
    synthetic::seed(path, shard) ^ splitmix(index ^ 0x50AC)
}

/// The state dict of `shape`, each storage filled by `write(path, shard, bytes)`.
fn build(shape: &Shape, mut write: impl FnMut(&KeyPath, usize, &mut [u8])) -> StateDict<'static> {
    let paths = key_paths(&shape.nodes, u32::MAX).unwrap();
    let entries = paths
        .iter()
        .zip(&shape.leaves)
        .map(|(path, leaf)| {
            let mut storages = leaf
                .storages()
                .enumerate()
                .map(|(shard, layout)| {
                    let mut buf = Buffer::zeroed(layout.nbytes as usize);
                    write(path, shard, &mut buf);
                    Storage::Owned(buf)
                })
                .collect::<Vec<_>>()
                .into_iter();
            Entry::from_leaf(leaf.clone(), &mut storages).unwrap()
        })
        .collect();
    StateDict::unflatten(&shape.nodes, entries, shape.step).unwrap()
}

/// Checks `got` is transfer `index` of `shape` byte for byte: structure, step, leaves (a
/// ShardedTensor's placements name the receiver, so only its layouts, offsets and sizes count) and
/// every storage byte. Returns the bytes checked.
fn verify(got: &StateDict<'_>, shape: &Shape, index: u64) -> Result<u64, String> {
    let (nodes, entries) = got.flatten();
    if nodes != shape.nodes {
        return Err("the tree differs".into());
    }
    if got.step != shape.step {
        return Err(format!("step {:?}, not {:?}", got.step, shape.step));
    }
    if entries.len() != shape.leaves.len() {
        return Err(format!(
            "{} leaves, not {}",
            entries.len(),
            shape.leaves.len()
        ));
    }
    let paths = key_paths(&nodes, u32::MAX).unwrap();
    let mut checked = 0;
    for ((path, entry), want) in paths.iter().zip(&entries).zip(&shape.leaves) {
        let leaf = entry.to_leaf();
        let same = match (&leaf, want) {
            (
                Leaf::Sharded {
                    local_shards: a,
                    global: ga,
                },
                Leaf::Sharded {
                    local_shards: b,
                    global: gb,
                },
            ) => {
                a.len() == b.len()
                    && a.iter().zip(b).all(|(x, y)| {
                        x.layout == y.layout
                            && x.meta.offsets == y.meta.offsets
                            && x.meta.sizes == y.meta.sizes
                    })
                    && ga.global_size == gb.global_size
                    && ga.shards.len() == gb.shards.len()
            }
            (Leaf::Value(Value::Float(a)), Leaf::Value(Value::Float(b))) => {
                a.to_bits() == b.to_bits()
            }
            _ => leaf == *want,
        };
        if !same {
            return Err(format!("{path}: leaf {leaf:?}, not {want:?}"));
        }
        for (shard, t) in entry.tensors().iter().enumerate() {
            let bytes = t.storage.bytes();
            if !synthetic::check(seed(path, shard, index), bytes) {
                return Err(format!("{path}: storage {shard}: bytes differ"));
            }
            checked += bytes.len() as u64;
        }
    }
    Ok(checked)
}

/// A process's open file descriptors, threads and resident memory.
#[derive(Clone, Copy, Debug)]
struct Figures {
    fds: usize,
    threads: u64,
    rss_kib: u64,
}

impl Figures {
    /// The figures once the threads of the last transfer are gone: a scoped thread has finished its
    /// work when the scope returns, but its OS thread may take a moment more to exit, so the count is
    /// read until it has held for 100 ms (at most 5 s). A leaked thread never goes, so it still counts.
    fn settled() -> Figures {
        let give_up = Instant::now() + Duration::from_secs(5);
        let mut figures = Figures::now();
        let mut held_since = Instant::now();
        while held_since.elapsed() < Duration::from_millis(100) && Instant::now() < give_up {
            std::thread::sleep(Duration::from_millis(5));
            let again = Figures::now();
            if again.threads != figures.threads {
                held_since = Instant::now();
            }
            figures = again;
        }
        figures
    }

    fn now() -> Figures {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| -> u64 {
            let line = status
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} in /proc/self/status"));
            line[name.len()..]
                .split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("cannot read {line:?}"))
        };
        Figures {
            // The directory handle read_dir holds is counted both times alike.
            fds: std::fs::read_dir("/proc/self/fd").unwrap().count(),
            threads: field("Threads:"),
            rss_kib: field("VmRSS:"),
        }
    }
}

/// Prints the start and end figures, then asserts: fds and threads equal, RSS within the tolerance.
/// `rss_along` (MiB, every tenth of the run) shows a leak's slope, or the allocator's plateau.
fn assert_no_growth(
    role: &str,
    (start, end): (Figures, Figures),
    rss_tolerance_kib: u64,
    rss_along: &[u64],
    transfers: u64,
    seconds: f64,
) {
    println!(
        "soak {role}: {transfers} transfers in {seconds:.1} s; fds {}→{}, threads {}→{}, RSS {}→{} KiB \
         (MiB every tenth: {rss_along:?})",
        start.fds, end.fds, start.threads, end.threads, start.rss_kib, end.rss_kib
    );
    assert_eq!(start.fds, end.fds, "{role}: open file descriptors grew");
    assert_eq!(start.threads, end.threads, "{role}: threads grew");
    assert!(
        end.rss_kib <= start.rss_kib + rss_tolerance_kib,
        "{role}: RSS grew from {} to {} KiB, more than {rss_tolerance_kib} KiB",
        start.rss_kib,
        end.rss_kib
    );
}

const FAULT_NONE: u8 = 0;
const FAULT_CORRUPT: u8 = 1;
const FAULT_STALL: u8 = 2;

/// The sender's faults: on data message 0 (tag 3) of the current transfer its group flips the last byte
/// (`FAULT_CORRUPT`), or waits until the receiver says on [`CONTROL_TAG`] that it gave up on this
/// transfer (`FAULT_STALL`) — a stall exactly past the receiver's timeout, however loaded the machine.
#[derive(Default)]
struct SenderFaults {
    fault: AtomicU8,
    index: AtomicU64,
}

impl SenderFaults {
    /// `pg`, its sends of data message 0 faulted as `fault` says.
    fn on<'g>(
        &'g self,
        pg: &'g TcpProcessGroup,
    ) -> OnSend<&'g TcpProcessGroup, impl SendHook<&'g TcpProcessGroup> + 'g> {
        let hook = move |pg: &&TcpProcessGroup, dst, tag, parts: &[&[u8]], timeout| {
            if tag == 3 {
                match self.fault.load(Ordering::SeqCst) {
                    FAULT_CORRUPT => {
                        let mut bytes = parts.concat();
                        // The last byte is a storage byte (the first 8 are the transfer id).
                        *bytes.last_mut().unwrap() ^= 0x40;
                        return pg.send(dst, tag, &[&bytes], timeout);
                    }
                    FAULT_STALL => {
                        let gave_up = pg.recv_vec(dst, CONTROL_TAG, 8, LONG_TIMEOUT)?;
                        let index = self.index.load(Ordering::SeqCst);
                        assert_eq!(
                            gave_up,
                            index.to_le_bytes(),
                            "the receiver gave up on another transfer"
                        );
                    }
                    _ => {}
                }
            }
            pg.send(dst, tag, parts, timeout)
        };
        OnSend { inner: pg, hook }
    }
}

/// The receiver's group in a timeout transfer: the header and metadata (tags 1 and 2) get the long
/// timeout whatever the transport asks, and the time the metadata arrived is kept. The soak's subject
/// is a stall in the data; a header wait that timed out because the sender process was descheduled
/// would leave that header queued, to be taken as the next transfer's (PROTOCOL.md §12).
struct PatientHeader<'a> {
    inner: &'a TcpProcessGroup,
    metadata_at: Mutex<Option<Instant>>,
}

impl ProcessGroup for PatientHeader<'_> {
    fn rank(&self) -> u32 {
        self.inner.rank()
    }
    fn size(&self) -> u32 {
        self.inner.size()
    }
    fn send(&self, dst: u32, tag: u64, parts: &[&[u8]], timeout: Duration) -> Result<(), PgError> {
        self.inner.send(dst, tag, parts, timeout)
    }
    fn recv_into(
        &self,
        src: u32,
        tag: u64,
        parts: &mut [&mut [u8]],
        timeout: Duration,
    ) -> Result<(), PgError> {
        let timeout = if tag <= 2 { LONG_TIMEOUT } else { timeout };
        self.inner.recv_into(src, tag, parts, timeout)?;
        if tag == 2 {
            *self.metadata_at.lock().unwrap() = Some(Instant::now());
        }
        Ok(())
    }
    fn recv_vec(
        &self,
        src: u32,
        tag: u64,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<u8>, PgError> {
        let timeout = if tag <= 2 { LONG_TIMEOUT } else { timeout };
        let bytes = self.inner.recv_vec(src, tag, max, timeout)?;
        if tag == 2 {
            *self.metadata_at.lock().unwrap() = Some(Instant::now());
        }
        Ok(bytes)
    }
}

/// Rank 0: sends every transfer with one `Transport`, injecting the sender-side faults. Every send must
/// succeed: the receiver drains a refused transfer, and reads a stalled one's late messages.
fn sender(pg: &TcpProcessGroup, mode: &Mode) {
    let group = SenderFaults::default();
    let transport = Transport::new(
        group.on(pg),
        TransportOptions {
            timeout: LONG_TIMEOUT,
            plan: mode.plan,
            ..TransportOptions::default()
        },
    );
    let mut start = None;
    let mut rss_along = Vec::new();
    for index in 0..mode.transfers {
        if index == WARM_UP {
            start = Some((Figures::settled(), Instant::now()));
        }
        if index % (mode.transfers / 10) == 0 {
            rss_along.push(Figures::now().rss_kib >> 10);
        }
        let shape = shape(mode, index);
        let sd = build(&shape, |path, shard, buf| {
            synthetic::fill(seed(path, shard, index), buf)
        });
        let fault = match outcome(index) {
            Outcome::CorruptedByte => FAULT_CORRUPT,
            Outcome::PeerTimeout => FAULT_STALL,
            Outcome::Good | Outcome::WrongStep => FAULT_NONE,
        };
        group.index.store(index, Ordering::SeqCst);
        group.fault.store(fault, Ordering::SeqCst);
        transport
            .send_checkpoint(&[1], &sd)
            .unwrap_or_else(|e| panic!("sender: transfer {index}: {e}"));
    }
    let end = Figures::settled();
    let (start, at) = start.expect("more transfers than the warm-up");
    // Stay connected until the receiver is done with the last transfer.
    let done = pg.recv_vec(1, CONTROL_TAG, 8, LONG_TIMEOUT).unwrap();
    assert_eq!(
        done,
        u64::MAX.to_le_bytes(),
        "sender: the receiver's last word"
    );
    assert_no_growth(
        "rank 0 (sender)",
        (start, end),
        ALLOCATOR_SLACK_KIB,
        &rss_along,
        mode.transfers - WARM_UP,
        at.elapsed().as_secs_f64(),
    );
}

/// Receives transfer `index` from rank 0: in place into `model`, or (`Some`) into fresh buffers.
fn receive<P: ProcessGroup>(
    t: &Transport<P>,
    index: u64,
    model: &mut StateDict<'static>,
) -> pgt_host::Result<Option<StateDict<'static>>> {
    if in_place(index) {
        t.recv_checkpoint_into(0, model).map(|_| None)
    } else {
        t.recv_checkpoint(0).map(Some)
    }
}

/// Rank 1: receives every transfer, checking each good one byte for byte and each failing one's
/// error.
fn receiver(pg: &TcpProcessGroup, mode: &Mode) {
    let in_place_shape = {
        let mut s = synthetic::mixed(mode.in_place_bytes);
        s.step = None;
        s
    };
    // What a serving process keeps: received into again and again (0x5A until the first).
    let mut model = build(&in_place_shape, |_, _, buf| buf.fill(0x5A));
    let options = |expected_step: u64| TransportOptions {
        timeout: LONG_TIMEOUT,
        expected_step: Some(expected_step),
        ..TransportOptions::default()
    };
    let mut start = None;
    let mut rss_along = Vec::new();
    let mut checked = 0u64;
    for index in 0..mode.transfers {
        if index == WARM_UP {
            start = Some((Figures::settled(), Instant::now()));
        }
        if index % (mode.transfers / 10) == 0 {
            rss_along.push(Figures::now().rss_kib >> 10);
        }
        let shape = shape(mode, index);
        let what = format!("receiver: transfer {index} ({:?})", outcome(index));
        match outcome(index) {
            Outcome::Good => {
                let t = Transport::new(pg, options(index));
                let got = receive(&t, index, &mut model).unwrap_or_else(|e| panic!("{what}: {e}"));
                let got = got.as_ref().unwrap_or(&model);
                checked += verify(got, &shape, index).unwrap_or_else(|e| panic!("{what}: {e}"));
            }
            Outcome::CorruptedByte => {
                let t = Transport::new(pg, options(index));
                let err = receive(&t, index, &mut model).expect_err(&what);
                match &err {
                    Error::Protocol(pgt_core::Error::DigestMismatch { .. }) => {}
                    other => panic!("{what}: {other}, not a DigestMismatch"),
                }
            }
            Outcome::WrongStep => {
                let wrong = index + 1_000_000;
                let t = Transport::new(pg, options(wrong));
                let err = receive(&t, index, &mut model).expect_err(&what);
                match &err {
                    Error::Protocol(pgt_core::Error::StepMismatch { expected, got })
                        if *expected == Some(wrong) && *got == Some(index) => {}
                    other => panic!("{what}: {other}, not a StepMismatch {wrong} / {index}"),
                }
            }
            Outcome::PeerTimeout => {
                let group = PatientHeader {
                    inner: pg,
                    metadata_at: Mutex::new(None),
                };
                let t = Transport::new(
                    &group,
                    TransportOptions {
                        timeout: SHORT_TIMEOUT,
                        ..options(index)
                    },
                );
                let err = receive(&t, index, &mut model).expect_err(&what);
                let failed_at = Instant::now();
                match &err {
                    Error::Peer {
                        action: PeerAction::Receiving,
                        message: 2,
                        rank: 0,
                        source:
                            PgError::Timeout {
                                peer: 0,
                                tag: 3,
                                after,
                            },
                    } if *after == SHORT_TIMEOUT => {}
                    other => {
                        panic!("{what}: {other:?}, not a timeout on data message 0 (message 2, tag 3) from rank 0")
                    }
                }
                let waited =
                    failed_at - group.metadata_at.lock().unwrap().expect("metadata arrived");
                assert!(
                    waited >= SHORT_TIMEOUT && waited <= SHORT_TIMEOUT + TIMEOUT_SLACK,
                    "{what}: failed {waited:?} after the metadata, timeout {SHORT_TIMEOUT:?}"
                );
                // Now the sender may go on: its late messages are stale for the next transfer.
                pg.send(0, CONTROL_TAG, &[&index.to_le_bytes()], LONG_TIMEOUT)
                    .unwrap();
            }
        }
    }
    let end = Figures::settled();
    let (start, at) = start.expect("more transfers than the warm-up");
    pg.send(0, CONTROL_TAG, &[&u64::MAX.to_le_bytes()], LONG_TIMEOUT)
        .unwrap();
    println!(
        "soak rank 1 (receiver): {} MiB checked byte for byte",
        checked >> 20
    );
    assert_no_growth(
        "rank 1 (receiver)",
        (start, end),
        // After a peer timeout the stalled transfer's late messages wait in the group's stash until a
        // transfer with their tags skips them (PROTOCOL.md §12): up to one transfer's worth.
        ALLOCATOR_SLACK_KIB + (mode.max_bytes >> 10),
        &rss_along,
        mode.transfers - WARM_UP,
        at.elapsed().as_secs_f64(),
    );
}

/// One rank of the soak, in a process of its own.
fn run_rank(rank: u32, port: u16, mode: &Mode) {
    let pg = TcpProcessGroup::connect(TcpOptions {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rank,
        world_size: 2,
        token: b"soak-test-token".to_vec(),
        timeout: LONG_TIMEOUT,
        listen_host: None,
    })
    .unwrap_or_else(|e| panic!("rank {rank}: forming the group: {e}"));
    match rank {
        0 => sender(&pg, mode),
        _ => receiver(&pg, mode),
    }
}

/// Starts both ranks as processes of this executable and waits for them (killing both at the
/// deadline); succeeds when both did.
fn drive(mode: &Mode) -> bool {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exe = std::env::current_exe().unwrap();
    println!("soak: {mode:?}, port {port}");
    let begun = Instant::now();
    let mut ranks: Vec<(u32, Child)> = (0..2)
        .map(|rank| {
            let child = Command::new(&exe)
                .env("PGT_SOAK_RANK", rank.to_string())
                .env("PGT_SOAK_PORT", port.to_string())
                .env("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD)
                .spawn()
                .unwrap_or_else(|e| panic!("starting rank {rank}: {e}"));
            (rank, child)
        })
        .collect();
    // Stops every rank still running: after a failure the other one would only wait for its peer
    // until its timeout.
    let stop_all = |ranks: &mut Vec<(u32, Child)>| {
        for (_, child) in ranks.iter_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    };
    while !ranks.is_empty() {
        if begun.elapsed() > mode.deadline {
            eprintln!(
                "soak: ranks still running after {:?}: killed",
                mode.deadline
            );
            stop_all(&mut ranks);
            return false;
        }
        let mut failed = false;
        ranks.retain_mut(|(rank, child)| match child.try_wait().unwrap() {
            None => true,
            Some(status) => {
                if !status.success() {
                    eprintln!("soak: rank {rank} failed: {status}");
                    failed = true;
                }
                false
            }
        });
        if failed {
            stop_all(&mut ranks);
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "soak: both ranks done in {:.1} s",
        begun.elapsed().as_secs_f64()
    );
    true
}

fn main() -> ExitCode {
    let mode = Mode::from_env();
    match std::env::var("PGT_SOAK_RANK") {
        Ok(rank) => {
            let port = std::env::var("PGT_SOAK_PORT").unwrap().parse().unwrap();
            run_rank(rank.parse().unwrap(), port, &mode);
            ExitCode::SUCCESS
        }
        Err(_) => {
            if drive(&mode) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
