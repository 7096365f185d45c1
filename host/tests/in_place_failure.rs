//! All or nothing in place (issue 13, item 2): an in-place receive that fails part way, unstaged
//! (the default) and staged (`RecvOptions::staged`), with the failure injected at several points of
//! the stream — a corrupted byte in the first or the last data message (all data lands; the digest
//! check at the trailer fails), a trailer whose metadata digest is wrong, a sender that stalls after
//! some data messages (the receiver times out), and an in-place size mismatch found before any data.
//!
//! A hostile sender (rank 0) is pgt-core's own `Sender` over an in-memory host, whose recorded
//! messages are replayed over the in-process group with the fault applied. What the receive must have
//! written is derived from the plan and the messages the fault lets through, never hard-coded.
//!
//! Unstaged: the error names exactly the leaves whose bytes all landed (and those a message was being
//! received for), those hold the bytes that arrived, and every other leaf is untouched. Staged: every
//! target byte is as it was, and the error is the cause alone. Either way the next transfer over the
//! same group then succeeds byte for byte.

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pgt_core::drive;
use pgt_core::dtype::DType;
use pgt_core::header::{Limits, PREFIX_LEN};
use pgt_core::layout::TensorLayout;
use pgt_core::memory::MemorySender;
use pgt_core::plan::{MessageKind, Plan};
use pgt_core::schema::{FanOut, Metadata, PlanParams};
use pgt_core::sender::{SendOp, Sender};
use pgt_host::engine::{EngineFactory, NativeEngine};
use pgt_host::pg::{InProcessGroup, ProcessGroup};
use pgt_host::state_dict::{Entry, StateDict, Storage, Tensor};
use pgt_host::transport::{Transport, TransportOptions};
use pgt_host::wasm_engine::WasmEngine;
use pgt_host::Error;

/// Leaves and their element counts: with 256-byte chunks and 64-byte buckets, `a` and `d` are
/// chunked (2 and 5 messages), `b` and `c` share a bucket, `e` fills one.
const LEAVES: [(&str, u64); 5] = [("a", 100), ("b", 8), ("c", 8), ("d", 300), ("e", 16)];

fn plan_params() -> PlanParams {
    PlanParams {
        fanout: FanOut::Direct,
        bucket_size: 64,
        chunk_size: 256,
    }
}

/// Round `round`'s checkpoint: every value depends on the round, the leaf and the index.
fn checkpoint(round: u32) -> StateDict<'static> {
    let mut sd = StateDict::new();
    for (l, (name, n)) in LEAVES.iter().enumerate() {
        let v: Vec<f32> = (0..*n)
            .map(|i| (round * 1000 + l as u32 * 100) as f32 + i as f32 * 0.5)
            .collect();
        sd.insert(
            *name,
            Entry::Tensor(Tensor::from_values(&[*n], &v).unwrap()),
        )
        .unwrap();
    }
    sd.step = Some(u64::from(round));
    sd
}

/// Every leaf's key path (displayed) and storage bytes, in leaf order.
fn leaf_bytes(sd: &StateDict<'_>) -> Vec<(String, Vec<u8>)> {
    sd.entries()
        .into_iter()
        .map(|(path, e)| (path.to_string(), e.tensors()[0].storage.bytes().to_vec()))
        .collect()
}

/// Where the injected fault is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    /// One byte of the first data message's payload flipped.
    CorruptFirstData,
    /// The last byte of the last data message flipped: every byte lands, the trailer's digest
    /// check fails.
    CorruptLastData,
    /// The trailer's copy of the metadata digest is wrong.
    WrongTrailer,
    /// The sender stops after `n` data messages: the receiver times out waiting for the next.
    StallAfter(usize),
    /// The in-place target of `d` is one element short: refused at binding, before any data.
    InPlaceSize,
}

/// The messages of round `round`'s transfer from rank 0 to rank 1, as pgt-core's sender makes them,
/// and the plan.
fn recorded(round: u32) -> (Vec<(SendOp, Vec<u8>)>, Plan) {
    let sd = checkpoint(round);
    let (nodes, entries) = sd.flatten();
    let storages: Vec<Vec<u8>> = entries
        .iter()
        .flat_map(|e| e.tensors())
        .map(|t| t.storage.bytes().to_vec())
        .collect();
    let metadata = Metadata {
        step: sd.step,
        source: 0,
        destinations: vec![1],
        plan: plan_params(),
        tree: nodes,
        leaves: entries.iter().map(|e| e.to_leaf()).collect(),
    };
    let mut sender = Sender::new(
        metadata,
        true,
        &Limits::default(),
        0x5eed_0000 + u64::from(round),
    )
    .unwrap();
    let mut net = MemorySender::new(&storages);
    drive::send(&mut sender, &mut net).unwrap();
    (net.sent, sender.plan().clone())
}

/// The recorded messages with `fault` applied: what the hostile sender sends.
fn faulty(mut sent: Vec<(SendOp, Vec<u8>)>, fault: Fault) -> Vec<(SendOp, Vec<u8>)> {
    let data: Vec<usize> = (0..sent.len())
        .filter(|&i| sent[i].0.kind == MessageKind::Data)
        .collect();
    let at = PREFIX_LEN as usize;
    match fault {
        Fault::CorruptFirstData => sent[data[0]].1[at + 3] ^= 0x40,
        Fault::CorruptLastData => {
            let last = sent[*data.last().unwrap()].1.last_mut().unwrap();
            *last ^= 0x01;
        }
        Fault::WrongTrailer => {
            let trailer = &mut sent.last_mut().unwrap().1;
            // After the prefix: the trailer's copy of the metadata digest.
            trailer[at] ^= 0xff;
        }
        Fault::StallAfter(n) => sent.truncate(data[0] + n),
        Fault::InPlaceSize => {}
    }
    sent
}

/// What each leaf (by index) should hold after the faulty stream, from the plan and the messages
/// that arrived whole: (fully written leaves, partly written leaves, the bytes each storage got).
fn expectation(
    plan: &Plan,
    sent: &[(SendOp, Vec<u8>)],
    fault: Fault,
    before: &[(String, Vec<u8>)],
) -> (Vec<String>, Vec<String>, Vec<Vec<u8>>) {
    if fault == Fault::InPlaceSize {
        return (
            Vec::new(),
            Vec::new(),
            before.iter().map(|b| b.1.clone()).collect(),
        );
    }
    let mut bytes: Vec<Vec<u8>> = before.iter().map(|b| b.1.clone()).collect();
    let mut landed = BTreeSet::new();
    for (op, msg) in sent.iter().filter(|(op, _)| op.kind == MessageKind::Data) {
        let m = op.message as usize;
        landed.insert(m);
        let mut at = PREFIX_LEN as usize;
        for seg in plan.segments(&plan.messages()[m]) {
            let (off, len) = (seg.offset as usize, seg.len as usize);
            bytes[seg.storage as usize][off..off + len].copy_from_slice(&msg[at..at + len]);
            at += len;
        }
    }
    // A stalled sender: the receiver was waiting for the next data message.
    let waited = match fault {
        Fault::StallAfter(_) => plan
            .data_messages()
            .find(|m| !landed.contains(m))
            .into_iter()
            .collect(),
        _ => BTreeSet::new(),
    };
    let (mut written, mut partly) = (Vec::new(), Vec::new());
    // One storage per leaf here: storage s is leaf s.
    for (s, (path, _)) in before.iter().enumerate() {
        let carried: Vec<usize> = plan
            .data_messages()
            .filter(|&m| {
                plan.segments(&plan.messages()[m])
                    .iter()
                    .any(|seg| seg.storage as usize == s)
            })
            .collect();
        if carried.iter().all(|m| landed.contains(m)) {
            written.push(path.clone());
        } else if carried
            .iter()
            .any(|m| landed.contains(m) || waited.contains(m))
        {
            partly.push(path.clone());
        }
    }
    (written, partly, bytes)
}

fn engine(wasm: bool) -> Arc<dyn EngineFactory> {
    static ENGINE: OnceLock<WasmEngine> = OnceLock::new();
    if wasm {
        Arc::new(
            ENGINE
                .get_or_init(|| WasmEngine::new().unwrap_or_else(|e| panic!("{e:#}")))
                .clone(),
        )
    } else {
        Arc::new(NativeEngine)
    }
}

/// Checks that `err` is the fault's own error (through an `InPlaceWritten` or not).
fn assert_cause(err: &Error, fault: Fault) {
    let cause = err.cause();
    let ok = match fault {
        Fault::CorruptFirstData | Fault::CorruptLastData => matches!(
            cause,
            Error::Protocol(pgt_core::Error::DigestMismatch { .. })
        ),
        Fault::WrongTrailer => matches!(
            cause,
            Error::Protocol(pgt_core::Error::TrailerMetadataDigest)
        ),
        Fault::StallAfter(_) => cause.is_timeout(),
        Fault::InPlaceSize => matches!(
            cause,
            Error::Protocol(pgt_core::Error::InPlaceSizeMismatch { .. })
        ),
    };
    assert!(ok, "{fault:?}: unexpected cause {cause:?} (error: {err})");
}

/// An in-place target over `buffers` (a model's memory: `Storage::BorrowedMut`), one float32 leaf
/// per buffer, named as `LEAVES`.
fn target_over(buffers: &mut [Vec<u8>]) -> StateDict<'_> {
    let mut sd = StateDict::new();
    for ((name, _), buf) in LEAVES.iter().zip(buffers.iter_mut()) {
        let layout = TensorLayout::contiguous(DType::Float32, &[buf.len() as u64 / 4]);
        let t = Tensor::new(layout, Storage::BorrowedMut(&mut buf[..])).unwrap();
        sd.insert(*name, Entry::Tensor(t)).unwrap();
    }
    sd
}

/// One faulty receive then a good one over the same in-process group, in place into the same
/// memory.
fn fail_then_recover(fault: Fault, staged: bool, wasm: bool) {
    let what = format!("{fault:?}, staged {staged}, wasm engine {wasm}");
    let mut ranks = InProcessGroup::new(2).into_iter();
    let (tx, rx) = (ranks.next().unwrap(), ranks.next().unwrap());
    let stall = matches!(fault, Fault::StallAfter(_));
    let receiver = Transport::new(
        rx,
        TransportOptions {
            timeout: Duration::from_millis(if stall { 300 } else { 20_000 }),
            engine: engine(wasm),
            ..TransportOptions::default()
        },
    );
    let mut memory: Vec<Vec<u8>> = leaf_bytes(&checkpoint(0))
        .into_iter()
        .map(|(_, b)| b)
        .collect();
    if fault == Fault::InPlaceSize {
        let short = memory[3].len() - 4;
        memory[3].truncate(short);
    }
    let before: Vec<(String, Vec<u8>)> = leaf_bytes(&checkpoint(0))
        .into_iter()
        .zip(&memory)
        .map(|((path, _), b)| (path, b.clone()))
        .collect();
    let (sent, plan) = recorded(1);
    let sent = faulty(sent, fault);
    let (written, partly, bytes) = expectation(&plan, &sent, fault, &before);

    let options = receiver.recv_options().staged(staged);
    let err = std::thread::scope(|s| {
        s.spawn(|| {
            for (op, msg) in &sent {
                tx.send(op.to, op.tag, &[msg], Duration::from_secs(20))
                    .unwrap_or_else(|e| panic!("{what}: the hostile sender: {e}"));
            }
        });
        receiver
            .recv_checkpoint_with(0, || target_over(&mut memory), options)
            .map(|_| ())
            .expect_err(&what)
    });
    assert_cause(&err, fault);
    let paths: Vec<&String> = before.iter().map(|(p, _)| p).collect();
    if staged || fault == Fault::InPlaceSize {
        // Nothing written: the cause alone, and every byte as it was.
        assert!(
            !matches!(err, Error::InPlaceWritten { .. }),
            "{what}: {err}"
        );
        for ((path, old), now) in before.iter().zip(&memory) {
            assert!(old == now, "{what}: {path} changed");
        }
    } else {
        assert!(
            matches!(err, Error::InPlaceWritten { .. }),
            "{what}: not InPlaceWritten: {err}"
        );
        assert_eq!(
            err.written_leaves(),
            written,
            "{what}: fully written leaves"
        );
        assert_eq!(
            err.partly_written_leaves(),
            partly,
            "{what}: partly written"
        );
        let message = err.to_string();
        for path in &written {
            assert!(message.contains(path.as_str()), "{what}: {message}");
        }
        for (s, path) in paths.iter().enumerate() {
            if written.contains(path) {
                assert!(
                    memory[s] == bytes[s],
                    "{what}: {path} does not hold what landed"
                );
                assert!(memory[s] != before[s].1, "{what}: {path} was not written");
            } else if !partly.contains(path) {
                assert!(memory[s] == before[s].1, "{what}: {path} is not untouched");
            }
        }
    }
    if fault == Fault::InPlaceSize {
        memory[3].extend_from_slice(&[0; 4]);
    }

    // The next transfer over the same group, in place into the same memory, is whole.
    let sender = Transport::new(
        tx,
        TransportOptions {
            plan: plan_params(),
            ..TransportOptions::default()
        },
    );
    let receiver = Transport::new(
        receiver.process_group(),
        TransportOptions {
            timeout: Duration::from_secs(20),
            engine: engine(wasm),
            ..TransportOptions::default()
        },
    );
    let good = checkpoint(2);
    std::thread::scope(|s| {
        s.spawn(|| sender.send_checkpoint(&[1], &good).unwrap());
        receiver
            .recv_checkpoint_with(
                0,
                || target_over(&mut memory),
                options.expected_step(Some(2)),
            )
            .unwrap_or_else(|e| panic!("{what}: the next transfer: {e}"));
    });
    for ((path, want), got) in leaf_bytes(&good).iter().zip(&memory) {
        assert!(want == got, "{what}: {path} after the next transfer");
    }
}

const FAULTS: [Fault; 7] = [
    Fault::CorruptFirstData,
    Fault::CorruptLastData,
    Fault::WrongTrailer,
    Fault::StallAfter(3),
    Fault::StallAfter(1),
    Fault::StallAfter(8),
    Fault::InPlaceSize,
];

#[test]
fn unstaged_failures_name_the_leaves_fully_written() {
    for fault in FAULTS {
        fail_then_recover(fault, false, false);
    }
}

#[test]
fn staged_failures_leave_every_target_byte_untouched() {
    for fault in FAULTS {
        fail_then_recover(fault, true, false);
    }
}

/// The same answers from pgt-core inside wasmtime (the raw ABI's `pgt_receiver_in_place_written`).
#[test]
fn the_wasm_engine_names_the_same_leaves() {
    for fault in [Fault::CorruptLastData, Fault::StallAfter(3)] {
        fail_then_recover(fault, false, true);
        fail_then_recover(fault, true, true);
    }
}

/// `{"a": float64 [100]}` over `memory`.
fn f64_target(memory: &mut [u8]) -> StateDict<'_> {
    let mut sd = StateDict::new();
    let layout = TensorLayout::contiguous(DType::Float64, &[100]);
    let t = Tensor::new(layout, Storage::BorrowedMut(memory)).unwrap();
    sd.insert("a", Entry::Tensor(t)).unwrap();
    sd
}

/// A leaf cast on receive (float32 on the wire, float64 in place) is written only when the post
/// thread casts it whole: unstaged, it is named written exactly when its target holds the cast
/// values, else untouched; staged, untouched.
#[test]
fn a_leaf_cast_on_receive_counts_once_cast() {
    for (fault, staged) in [
        (Fault::CorruptLastData, false),
        (Fault::StallAfter(8), false),
        (Fault::CorruptLastData, true),
    ] {
        let what = format!("{fault:?}, staged {staged}, `a` cast to float64");
        let mut ranks = InProcessGroup::new(2).into_iter();
        let (tx, rx) = (ranks.next().unwrap(), ranks.next().unwrap());
        let receiver = Transport::new(
            rx,
            TransportOptions {
                timeout: Duration::from_millis(300),
                ..TransportOptions::default()
            },
        );
        let mut a = vec![0u8; 100 * 8];
        let (sent, _) = recorded(1);
        let sent = faulty(sent, fault);
        let options = receiver.recv_options().staged(staged);
        let err = std::thread::scope(|s| {
            s.spawn(|| {
                for (op, msg) in &sent {
                    tx.send(op.to, op.tag, &[msg], Duration::from_secs(20))
                        .unwrap();
                }
            });
            receiver
                .recv_checkpoint_with(0, || f64_target(&mut a), options)
                .map(|_| ())
                .expect_err(&what)
        });
        assert_cause(&err, fault);
        let cast: Vec<u8> = checkpoint(1)
            .tensor("a")
            .unwrap()
            .storage
            .bytes()
            .chunks(4)
            .flat_map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
            .collect();
        let named = err.written_leaves().iter().any(|p| p == "['a']");
        if staged {
            assert!(!named && a.iter().all(|&b| b == 0), "{what}: {err}");
        } else if named {
            assert!(
                a == cast,
                "{what}: named written, but not holding the cast values"
            );
        } else {
            assert!(
                a.iter().all(|&b| b == 0),
                "{what}: not named, but written: {err}"
            );
        }
        if fault == Fault::CorruptLastData && !staged {
            // Every digest was reported, so every cast was done before the trailer's check.
            assert!(named, "{what}: {err}");
        }
    }
}
