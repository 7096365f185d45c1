//! Transfers cannot mix (issue 10, item 1): a receive that fails after the header leaves the link
//! clean, so the next transfer on it returns its own checkpoint byte for byte; a stale or foreign
//! message is skipped, never used; concurrent transfers between one pair are refused by name.
//!
//! Every scenario runs over the in-process group and over TCP (threads, one group handle per rank),
//! 8 ranks in a ring (rank r sends to r + 1 and receives from r − 1, as torch's ring tests do).

use std::time::{Duration, Instant};

use pgt_core::dtype::DType;
use pgt_core::header::Limits;
use pgt_core::schema::{FanOut, PlanParams};
use pgt_host::pg::{InProcessGroup, ProcessGroup};
use pgt_host::state_dict::{Entry, StateDict, Tensor};
use pgt_host::transport::{Transport, TransportOptions};
use pgt_host::PeerAction;

const TOKEN: &[u8] = b"isolation-test-token";

mod common;
use common::{tcp_groups, OnSend, SendHook};

const WORLD: u32 = 8;
const TIMEOUT: Duration = Duration::from_secs(10);

/// The checkpoint of `round` from rank `rank`: every byte depends on both, the step is the round.
/// `a` (4096 B) is one chunk of its own, `b` (800 B) a bucket, `c` and `d` (400 + 512 B) the next: 3 data
/// messages (tags 3–5) and a trailer (tag 6).
fn checkpoint(rank: u32, round: u64) -> StateDict<'static> {
    let seed = rank as f32 * 1000.0 + round as f32 * 100_000.0;
    let floats = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| seed + k + i as f32).collect() };
    let mut sd = StateDict::new();
    let f32s =
        |n: usize, k: f32| Entry::Tensor(Tensor::from_values(&[n as u64], &floats(n, k)).unwrap());
    sd.insert("a", f32s(1024, 0.5)).unwrap();
    sd.insert("b", f32s(200, 0.25)).unwrap();
    sd.insert("c", f32s(100, 0.75)).unwrap();
    let ints: Vec<i64> = (0..64)
        .map(|i| i64::from(rank) * 7 + round as i64 * 1_000_000 + i)
        .collect();
    sd.insert(
        "d",
        Entry::Tensor(Tensor::from_values(&[64], &ints).unwrap()),
    )
    .unwrap();
    sd.step = Some(round);
    sd
}

fn options() -> TransportOptions {
    TransportOptions {
        timeout: TIMEOUT,
        plan: PlanParams {
            fanout: FanOut::Chain,
            bucket_size: 1024,
            chunk_size: 4096,
        },
        ..TransportOptions::default()
    }
}

/// Byte for byte: the same entries, dtypes, shapes, storages and step.
fn assert_same(got: &StateDict<'_>, want: &StateDict<'_>, what: &str) {
    assert_eq!(got.step, want.step, "{what}: step");
    let (g, w) = (got.entries(), want.entries());
    assert_eq!(g.len(), w.len(), "{what}: leaves");
    for ((gp, ge), (wp, we)) in g.iter().zip(&w) {
        assert_eq!(gp, wp, "{what}");
        let (gt, wt) = (ge.tensors(), we.tensors());
        assert_eq!(gt.len(), wt.len(), "{what}: {gp}");
        for (x, y) in gt.iter().zip(&wt) {
            assert_eq!(x.dtype(), y.dtype(), "{what}: {gp}");
            assert_eq!(x.shape(), y.shape(), "{what}: {gp}");
            let (xb, yb) = (x.storage.bytes(), y.storage.bytes());
            if let Some(i) = (0..xb.len().min(yb.len())).find(|&i| xb[i] != yb[i]) {
                panic!(
                    "{what}: {gp}: byte {i} is {:#04x}, not {:#04x}",
                    xb[i], yb[i]
                );
            }
            assert_eq!(xb.len(), yb.len(), "{what}: {gp}: length");
        }
    }
}

/// How the first receive of a link fails, after the header.
#[derive(Clone, Copy, Debug)]
enum Failure {
    /// The receiver expects another step: refused after the metadata (the plan is known).
    Step,
    /// In place into a tensor of the wrong size: refused at binding (the plan is known).
    InPlaceSize,
    /// The metadata is over the receiver's `max_metadata_bytes`: refused from the header alone (the
    /// metadata and everything after it are left on the link).
    MetadataTooLarge,
    /// More leaves than the receiver's `max_leaves`: refused while decoding the metadata (no plan).
    TooManyLeaves,
}

impl Failure {
    /// Receives from `src` on `pg` the way that fails; returns the error.
    fn receive<P: ProcessGroup>(self, pg: &P, src: u32) -> pgt_host::Error {
        let mut opts = options();
        match self {
            Failure::Step => opts.expected_step = Some(99),
            Failure::MetadataTooLarge => {
                opts.limits = Limits {
                    max_metadata_bytes: 16,
                    ..Limits::default()
                }
            }
            Failure::TooManyLeaves => {
                opts.limits = Limits {
                    max_leaves: 2,
                    ..Limits::default()
                }
            }
            Failure::InPlaceSize => {}
        }
        let t = Transport::new(pg, opts);
        let result = match self {
            Failure::InPlaceSize => {
                let mut dst = checkpoint(pg.rank(), 0);
                let short = Tensor::from_bytes(DType::Float32, &[1000], &[0u8; 4000]).unwrap();
                dst.insert("a", Entry::Tensor(short)).unwrap();
                t.recv_checkpoint_into(src, &mut dst).map(|_| ())
            }
            _ => t.recv_checkpoint(src).map(|_| ()),
        };
        let err = result.expect_err("the first receive must fail");
        let name = match &err {
            pgt_host::Error::Protocol(e) => e.name(),
            other => panic!("{self:?}: not a protocol error: {other}"),
        };
        let expected = match self {
            Failure::Step => "StepMismatch",
            Failure::InPlaceSize => "InPlaceSizeMismatch",
            Failure::MetadataTooLarge => "MetadataTooLarge",
            Failure::TooManyLeaves => "TooManyLeaves",
        };
        assert_eq!(name, expected, "{self:?}: {err}");
        err
    }
}

/// Every rank of `groups` sends round 1 then round 2 to the next rank, and receives from the previous
/// one: round 1 the way `failure` says (it must fail), round 2 normally, expecting step 2. Round 2
/// must be the previous rank's round-2 checkpoint, byte for byte.
fn failed_then_good<P: ProcessGroup>(groups: &[P], failure: Failure) {
    let n = groups.len() as u32;
    std::thread::scope(|s| {
        for pg in groups {
            let rank = pg.rank();
            let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
            s.spawn(move || {
                let t = Transport::new(pg, options());
                // Round 1's send may end before or after its receiver gave up; either is fine.
                let _ = t.send_checkpoint(&[next], &checkpoint(rank, 1));
                t.send_checkpoint(&[next], &checkpoint(rank, 2))
                    .unwrap_or_else(|e| panic!("{failure:?}: rank {rank} sending round 2: {e}"));
            });
            s.spawn(move || {
                failure.receive(pg, prev);
                let t = Transport::new(
                    pg,
                    TransportOptions {
                        expected_step: Some(2),
                        ..options()
                    },
                );
                let got = t.recv_checkpoint(prev).unwrap_or_else(|e| {
                    panic!("{failure:?}: rank {rank}, round 2 from rank {prev}: {e}")
                });
                assert_same(
                    &got,
                    &checkpoint(prev, 2),
                    &format!("{failure:?}: rank {rank}, round 2"),
                );
            });
        }
    });
}

macro_rules! failed_then_good_tests {
    ($($name:ident: $failure:expr;)*) => {$(
        mod $name {
            use super::*;

            #[test]
            fn in_process_ring() {
                failed_then_good(&InProcessGroup::new(WORLD), $failure);
            }

            #[test]
            fn tcp_ring() {
                failed_then_good(&tcp_groups(WORLD, TOKEN), $failure);
            }
        }
    )*};
}

failed_then_good_tests! {
    wrong_step_then_good: Failure::Step;
    in_place_size_mismatch_then_good: Failure::InPlaceSize;
    metadata_too_large_then_good: Failure::MetadataTooLarge;
    too_many_leaves_then_good: Failure::TooManyLeaves;
}

/// Sends `parts` under `tag` from `pg` to `dst`: a message no transfer of this link's sender sent.
fn inject<P: ProcessGroup>(pg: &P, dst: u32, tag: u64, bytes: &[u8]) {
    pg.send(dst, tag, &[bytes], TIMEOUT).unwrap();
}

/// Stale messages wait for the receiver under the metadata's, a data message's and the trailer's tags
/// — some of the right length, some not, none of this transfer — then a good transfer comes: the
/// receiver skips them and returns the good checkpoint, byte for byte.
fn stale_messages_are_skipped<P: ProcessGroup>(groups: &[P]) {
    let (a, b) = (&groups[0], &groups[1]);
    let sd = checkpoint(0, 2);
    // The plan of `checkpoint`: data message 0 (tag 3) is `a`'s 4096 bytes (plus the transfer's
    // prefix); 3 data messages (tags 3–5), the trailer has tag 6 (4 storages).
    let foreign = |len: usize, fill: u8| vec![fill; len];
    inject(a, 1, 2, &foreign(60, 0x11));
    inject(a, 1, 3, &foreign(4096, 0xEE));
    inject(a, 1, 3, &foreign(4096 + 8, 0xDD));
    inject(a, 1, 3, &foreign(4096 + 16, 0xCC));
    inject(a, 1, 6, &foreign(56, 0xBB));
    let receiver = Transport::new(b, options());
    let sender = Transport::new(a, options());
    std::thread::scope(|s| {
        let h = s.spawn(|| receiver.recv_checkpoint(0));
        sender.send_checkpoint(&[1], &sd).unwrap();
        let got = h.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert_same(&got, &sd, "after stale messages");
    });
}

#[test]
fn stale_messages_are_skipped_in_process() {
    stale_messages_are_skipped(&InProcessGroup::new(2));
}

#[test]
fn stale_messages_are_skipped_tcp() {
    stale_messages_are_skipped(&tcp_groups(2, TOKEN));
}

/// Two receives from one source at the same time on one Transport: the second is refused at once,
/// by name; the first gets the checkpoint.
#[test]
fn concurrent_receives_from_one_source_are_refused() {
    let groups = InProcessGroup::new(2);
    let sender = Transport::new(&groups[0], options());
    let receiver = Transport::new(&groups[1], options());
    let sd = checkpoint(0, 1);
    std::thread::scope(|s| {
        let first = s.spawn(|| receiver.recv_checkpoint(0));
        // Let the first receive start waiting for the header.
        std::thread::sleep(Duration::from_millis(200));
        let start = Instant::now();
        let second = receiver.recv_checkpoint(0);
        let took = start.elapsed();
        let err = second.expect_err("a second receive from rank 0 must be refused");
        assert!(
            took < Duration::from_secs(1),
            "refused after {took:?}: {err}"
        );
        assert!(
            matches!(
                err,
                pgt_host::Error::ConcurrentTransfer {
                    action: PeerAction::Receiving,
                    rank: 0
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "a transfer from rank 0 is already running on this Transport: transfers between two ranks run one at a time"
        );
        sender.send_checkpoint(&[1], &sd).unwrap();
        let got = first.join().unwrap().unwrap();
        assert_same(&got, &sd, "the first receive");
    });
}

/// A gate that sends of data messages (tags 3 and up) wait at until it opens.
#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn open(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }

    /// `pg`, its data sends held at this gate.
    fn on<'g, P: ProcessGroup>(&'g self, pg: &'g P) -> OnSend<&'g P, impl SendHook<&'g P> + 'g> {
        let hook = move |pg: &&P, dst: u32, tag: u64, parts: &[&[u8]], timeout: Duration| {
            if tag >= 3 {
                let mut open = self.open.lock().unwrap();
                while !*open {
                    open = self.opened.wait(open).unwrap();
                }
            }
            pg.send(dst, tag, parts, timeout)
        };
        OnSend { inner: pg, hook }
    }
}

/// Two sends to one destination at the same time on one Transport: the second is refused at once, by
/// name, while the first is still sending; the first completes.
#[test]
fn concurrent_sends_to_one_destination_are_refused() {
    let groups = InProcessGroup::new(2);
    let gate = Gate::default();
    let sender = Transport::new(gate.on(&groups[0]), options());
    let receiver = Transport::new(&groups[1], options());
    let (first, second) = (checkpoint(0, 1), checkpoint(0, 2));
    std::thread::scope(|s| {
        let recv = s.spawn(|| receiver.recv_checkpoint(0));
        let send = s.spawn(|| sender.send_checkpoint(&[1], &first));
        // The first send is stuck at its first data message; a transport that let the second one run
        // would be stuck there too, until this opens the gate.
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            gate.open();
        });
        std::thread::sleep(Duration::from_millis(200));
        let start = Instant::now();
        let err = sender
            .send_checkpoint(&[1], &second)
            .expect_err("the second send must be refused while the first runs");
        assert!(start.elapsed() < Duration::from_secs(1), "{err}");
        assert!(
            matches!(
                err,
                pgt_host::Error::ConcurrentTransfer {
                    action: PeerAction::Sending,
                    rank: 1
                }
            ),
            "{err:?}"
        );
        gate.open();
        send.join().unwrap().unwrap();
        assert_same(&recv.join().unwrap().unwrap(), &first, "the first send");
    });
}

/// A chain receiver forwarding to rank 2 refuses a send of its own to rank 2 while it forwards: the
/// two would share tags on that link.
#[test]
fn a_send_to_the_rank_a_chain_receiver_forwards_to_is_refused() {
    let groups = InProcessGroup::new(3);
    let gate = Gate::default();
    let sender = Transport::new(&groups[0], options());
    let head = Transport::new(gate.on(&groups[1]), options());
    let tail = Transport::new(&groups[2], options());
    let sd = checkpoint(0, 1);
    std::thread::scope(|s| {
        let h = s.spawn(|| head.recv_checkpoint(0));
        let t = s.spawn(|| tail.recv_checkpoint(0));
        s.spawn(|| {
            std::thread::sleep(Duration::from_secs(2));
            gate.open();
        });
        sender.send_checkpoint(&[1, 2], &sd).unwrap();
        // The head has received and is stuck forwarding data to rank 2.
        std::thread::sleep(Duration::from_millis(300));
        let err = head
            .send_checkpoint(&[2], &checkpoint(1, 9))
            .expect_err("rank 1 is forwarding to rank 2");
        assert!(
            matches!(
                err,
                pgt_host::Error::ConcurrentTransfer {
                    action: PeerAction::Sending,
                    rank: 2
                }
            ),
            "{err:?}"
        );
        gate.open();
        assert_same(&h.join().unwrap().unwrap(), &sd, "the chain's head");
        assert_same(&t.join().unwrap().unwrap(), &sd, "the chain's tail");
    });
}

/// What a failed receive leaves on the link: nothing when the plan was known (a refused step, an
/// in-place mismatch: drained), the rest of the transfer when it was not (refused from the header: the
/// next transfer skips it by its prefix).
#[test]
fn a_failed_receive_drains_what_its_plan_says_is_coming() {
    for (failure, drained) in [
        (Failure::Step, true),
        (Failure::InPlaceSize, true),
        (Failure::MetadataTooLarge, false),
    ] {
        let groups = InProcessGroup::new(2);
        let sender = Transport::new(&groups[0], options());
        std::thread::scope(|s| {
            let h = s.spawn(|| failure.receive(&groups[1], 0));
            sender.send_checkpoint(&[1], &checkpoint(0, 1)).unwrap();
            h.join().unwrap();
        });
        // Data message 0 (tag 3) and the trailer (tag 6): still queued only if nothing was drained.
        for tag in [3, 6] {
            let left = groups[1].recv_vec(0, tag, 1 << 20, Duration::from_millis(100));
            assert_eq!(left.is_ok(), !drained, "{failure:?}: tag {tag}: {left:?}");
        }
    }
}
