//! Transport over the in-process group: every leaf kind, both fan-out modes with 3–4 ranks, chunking and
//! bucketing boundaries, in-place receive and cast, mismatches, stalls and corruption.

mod common;
use common::{faulty, in_place_size_mismatch, transfer_with_a_corrupted_byte, Fault};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgt_core::dtype::DType;
use pgt_core::header::Limits;
use pgt_core::layout::TensorLayout;
use pgt_core::receiver::ReceiverOptions;
use pgt_core::schema::{FanOut, Metadata, PlanParams};
use pgt_core::tree::{Leaf, PathElem, Value};
use pgt_host::engine::{EngineError, EngineFactory, NativeEngine, ReceiverEngine, SenderEngine};
use pgt_host::memory::BufferPool;
use pgt_host::pg::InProcessGroup;
use pgt_host::state_dict::{Entry, StateDict, Storage, Tensor};
use pgt_host::synthetic::{self, Shape};
use pgt_host::transport::{Transport, TransportOptions};

fn options(fanout: FanOut, bucket: u64, chunk: u64) -> TransportOptions {
    TransportOptions {
        timeout: Duration::from_secs(20),
        plan: PlanParams {
            fanout,
            bucket_size: bucket,
            chunk_size: chunk,
        },
        ..TransportOptions::default()
    }
}

/// Sends `src` from rank 0 of an in-process pair and receives it into `dst` on rank 1: the receive's
/// result (the send's is checked only when the receive succeeded).
fn send_into(src: &StateDict, dst: &mut StateDict, opts: TransportOptions) -> pgt_host::Result<()> {
    let mut groups = InProcessGroup::new(2).into_iter();
    let a = Transport::new(groups.next().unwrap(), opts.clone());
    let b = Transport::new(groups.next().unwrap(), opts);
    std::thread::scope(|s| {
        let h = s.spawn(|| b.recv_checkpoint_into(0, dst));
        let sent = a.send_checkpoint(&[1], src);
        let received = h.join().unwrap().map(|_| ());
        if received.is_ok() {
            sent.unwrap();
        }
        received
    })
}

/// Sends `shape` from rank 0 to every other rank; returns each receiver's result.
fn run(
    world: u32,
    shape: &Shape,
    opts: TransportOptions,
) -> Vec<pgt_host::Result<StateDict<'static>>> {
    let sd = synthetic::materialize(shape).unwrap();
    let mut groups = InProcessGroup::new(world).into_iter();
    let sender = Transport::new(groups.next().unwrap(), opts.clone());
    let dsts: Vec<u32> = (1..world).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = groups
            .map(|pg| {
                let t = Transport::new(pg, opts.clone());
                s.spawn(move || t.recv_checkpoint(0))
            })
            .collect();
        sender.send_checkpoint(&dsts, &sd).unwrap();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn mixed_dict_every_mode_and_boundary() {
    let shape = synthetic::mixed(256 << 10);
    synthetic::validate(&shape).unwrap();
    for fanout in [FanOut::Direct, FanOut::Chain] {
        for world in [3, 4] {
            for (bucket, chunk) in [(0, 64), (4096, 8192), (64 << 10, 64 << 10)] {
                for r in run(world, &shape, options(fanout, bucket, chunk)) {
                    let sd = r.unwrap_or_else(|e| {
                        panic!("{fanout:?} world {world} {bucket}/{chunk}: {e:#}")
                    });
                    let checked = synthetic::verify(&sd, &shape).unwrap();
                    assert_eq!(checked, synthetic::total_bytes(&shape));
                }
            }
        }
    }
}

#[test]
fn empty_and_value_only_dicts() {
    let empty = Shape {
        nodes: vec![pgt_core::tree::Node::Dict(vec![])],
        leaves: vec![],
        step: None,
    };
    let values = Shape {
        nodes: vec![pgt_core::tree::Node::List(1), pgt_core::tree::Node::Leaf],
        leaves: vec![pgt_core::tree::Leaf::Value(pgt_core::tree::Value::Str(
            "x".into(),
        ))],
        step: Some(3),
    };
    for shape in [empty, values] {
        for r in run(3, &shape, options(FanOut::Chain, 1024, 4096)) {
            synthetic::verify(&r.unwrap(), &shape).unwrap();
        }
    }
}

#[test]
fn received_tensors_have_typed_views() {
    let mut sd = StateDict::new();
    sd.insert(
        "w",
        Entry::Tensor(Tensor::from_values(&[2, 2], &[1.0f32, 2.0, 3.0, 4.0]).unwrap()),
    )
    .unwrap();
    let mut groups = InProcessGroup::new(2).into_iter();
    let a = Transport::new(groups.next().unwrap(), TransportOptions::default());
    let b = Transport::new(groups.next().unwrap(), TransportOptions::default());
    let got = std::thread::scope(|s| {
        let h = s.spawn(|| b.recv_checkpoint(0));
        a.send_checkpoint(&[1], &sd).unwrap();
        h.join().unwrap().unwrap()
    });
    let w = got.tensor("w").unwrap();
    assert_eq!(w.storage_as::<f32>().unwrap(), &[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(w.shape(), &[2, 2]);
}

#[test]
fn in_place_receive_writes_existing_buffers_and_casts() {
    let shape = synthetic::mixed(64 << 10);
    let src = synthetic::materialize(&shape).unwrap();
    // The destination: the same dict, zeroed, with model.t00_float32 as bf16 (cast on receive).
    let mut dst = src.clone();
    let mut cast_path = None;
    for (path, entry) in dst.entries() {
        if let Entry::Tensor(t) = entry {
            if t.dtype() == DType::Float32
                && cast_path.is_none()
                && path.0.first() == Some(&PathElem::Key("model".into()))
            {
                cast_path = Some(path.clone());
            }
        }
    }
    let cast_path = cast_path.unwrap();
    {
        let Some(Entry::Tensor(t)) = dst.get(&cast_path).cloned() else {
            panic!()
        };
        let numel = t.layout.nbytes / 4;
        let bf = Tensor::from_bytes(DType::BFloat16, &[numel], &vec![0u8; (numel * 2) as usize])
            .unwrap();
        dst.insert_path(&cast_path, Entry::Tensor(bf)).unwrap();
    }
    let ptr_before = dst.tensor(&cast_path).unwrap().storage.bytes().as_ptr();
    send_into(&src, &mut dst, TransportOptions::default()).unwrap();
    let t = dst.tensor(&cast_path).unwrap();
    assert_eq!(t.dtype(), DType::BFloat16);
    assert_eq!(t.storage.bytes().as_ptr(), ptr_before, "received in place");
    let sent = src.tensor(&cast_path).unwrap().to_vec::<f32>().unwrap();
    let got = t.to_vec::<half::bf16>().unwrap();
    for (s, g) in sent.iter().zip(&got) {
        assert_eq!(half::bf16::from_f32(*s), *g);
    }
    // Every other tensor landed byte for byte.
    for (path, entry) in dst.entries() {
        if path == cast_path {
            continue;
        }
        let expected = src.get(&path).unwrap();
        for (x, y) in entry.tensors().iter().zip(expected.tensors()) {
            assert_eq!(x.storage.bytes(), y.storage.bytes(), "{path}");
        }
    }
}

#[test]
fn in_place_cast_without_digests() {
    // Many cast storages in many messages, so casts finish while data is still streaming.
    let n = 1000usize;
    let values = |k: usize| -> Vec<f32> { (0..n).map(|i| (i + k) as f32 * 0.5).collect() };
    let mut src = StateDict::new();
    let mut dst = StateDict::new();
    for k in 0..64 {
        let key = format!("w{k}");
        src.insert(
            &key,
            Entry::Tensor(Tensor::from_values(&[n as u64], &values(k)).unwrap()),
        )
        .unwrap();
        let zeros = vec![0u8; n * 2];
        dst.insert(
            &key,
            Entry::Tensor(Tensor::from_bytes(DType::Float16, &[n as u64], &zeros).unwrap()),
        )
        .unwrap();
    }
    let opts = TransportOptions {
        digests: false,
        ..options(FanOut::Direct, 4096, 4096)
    };
    send_into(&src, &mut dst, opts).unwrap();
    for k in 0..64 {
        let got = dst
            .tensor(&format!("w{k}"))
            .unwrap()
            .to_vec::<half::f16>()
            .unwrap();
        let expected: Vec<half::f16> = values(k).into_iter().map(half::f16::from_f32).collect();
        assert_eq!(got, expected, "w{k}");
    }
}

#[test]
fn in_place_matches_by_key_path_when_the_trees_differ() {
    let tensor = |v: f32| Entry::Tensor(Tensor::from_values(&[3], &[v; 3]).unwrap());
    let mut src = StateDict::new();
    for (k, v) in [("a", 1.0), ("b", 2.0), ("c", 3.0)] {
        src.insert(k, tensor(v)).unwrap();
    }
    let ptr = |sd: &StateDict, k: &str| sd.tensor(k).unwrap().storage.bytes().as_ptr();
    // Targets: leaves in another order with one missing and one extra (no leaf where the sender has
    // it); and one matching by position up to a missing leaf.
    for (target, in_place) in [(["x", "c", "b"], ["b", "c"]), (["a", "b", "x"], ["a", "b"])] {
        let mut dst = StateDict::new();
        for k in target {
            dst.insert(k, tensor(0.0)).unwrap();
        }
        let before: Vec<_> = in_place.iter().map(|k| ptr(&dst, k)).collect();
        send_into(&src, &mut dst, TransportOptions::default()).unwrap();
        let keys: Vec<String> = dst.entries().iter().map(|(p, _)| p.to_string()).collect();
        assert_eq!(
            keys,
            ["['a']", "['b']", "['c']"],
            "the received tree replaces the target's"
        );
        let after: Vec<_> = in_place.iter().map(|k| ptr(&dst, k)).collect();
        assert_eq!(after, before, "{target:?}: received in place");
        for (k, v) in [("a", 1.0f32), ("b", 2.0), ("c", 3.0)] {
            assert_eq!(
                dst.tensor(k).unwrap().to_vec::<f32>().unwrap(),
                [v; 3],
                "{k}"
            );
        }
    }
}

#[test]
fn in_place_into_a_dict_of_the_received_shape_keeps_its_buffers_and_takes_what_changed() {
    // The target has the sender's keys in the sender's order, so it is bound leaf by leaf; its "a"
    // has another shape of the same size, its "v" another value: those two entries are the sender's
    // afterwards, "a" still in its own buffer.
    let f32s = |shape: &[u64], v: f32| {
        let n = shape.iter().product::<u64>() as usize;
        Entry::Tensor(Tensor::from_values(shape, &vec![v; n]).unwrap())
    };
    let mut src = StateDict::new();
    src.insert("a", f32s(&[2, 3], 1.0)).unwrap();
    src.insert("v", Value::Int(7)).unwrap();
    src.insert("b", f32s(&[4], 2.0)).unwrap();
    src.step = Some(3);
    let mut dst = StateDict::new();
    dst.insert("a", f32s(&[3, 2], 0.0)).unwrap();
    dst.insert("v", Value::Int(0)).unwrap();
    dst.insert("b", f32s(&[4], 0.0)).unwrap();
    let ptr = |sd: &StateDict, k: &str| sd.tensor(k).unwrap().storage.bytes().as_ptr();
    let before = [ptr(&dst, "a"), ptr(&dst, "b")];
    send_into(&src, &mut dst, TransportOptions::default()).unwrap();
    assert_eq!(
        [ptr(&dst, "a"), ptr(&dst, "b")],
        before,
        "received in place"
    );
    assert_eq!(dst.tensor("a").unwrap().shape(), &[2, 3]);
    assert_eq!(dst.tensor("a").unwrap().to_vec::<f32>().unwrap(), [1.0; 6]);
    assert_eq!(dst.tensor("b").unwrap().to_vec::<f32>().unwrap(), [2.0; 4]);
    assert_eq!(dst.get("v"), Some(&Entry::Value(Value::Int(7))));
    assert_eq!(dst.step, Some(3));

    // A read-only storage in such a target is refused by its key path, as in a target of another
    // shape.
    let zeros = [0u8; 16];
    let mut dst = StateDict::new();
    dst.insert("a", f32s(&[6], 0.0)).unwrap();
    dst.insert("v", Value::Int(0)).unwrap();
    let borrowed = Tensor::new(
        TensorLayout::contiguous(DType::Float32, &[4]),
        Storage::Borrowed(&zeros),
    )
    .unwrap();
    dst.insert("b", Entry::Tensor(borrowed)).unwrap();
    match send_into(&src, &mut dst, TransportOptions::default()).unwrap_err() {
        pgt_host::Error::InPlaceReadOnly { path, storage } => {
            assert_eq!((path.as_str(), storage), ("['b']", "Borrowed"));
        }
        other => panic!("expected InPlaceReadOnly, got {other:?}"),
    }
}

#[test]
fn a_pool_recycles_received_buffers_into_the_next_receive() {
    let dict = |fill: f32| {
        let mut sd = StateDict::new();
        for (k, n) in [("a", 3usize), ("b", 70_000), ("c", 300_000)] {
            let values: Vec<f32> = (0..n).map(|i| fill + i as f32).collect();
            sd.insert(
                k,
                Entry::Tensor(Tensor::from_values(&[n as u64], &values).unwrap()),
            )
            .unwrap();
        }
        sd
    };
    let pool = Arc::new(BufferPool::new(64 << 20));
    let opts = TransportOptions {
        pool: Some(pool.clone()),
        ..TransportOptions::default()
    };
    let mut groups = InProcessGroup::new(2).into_iter();
    let a = Transport::new(groups.next().unwrap(), opts.clone());
    let b = Transport::new(groups.next().unwrap(), opts);
    let transfer = |sd: &StateDict| {
        std::thread::scope(|s| {
            let h = s.spawn(|| b.recv_checkpoint(0));
            a.send_checkpoint(&[1], sd).unwrap();
            h.join().unwrap().unwrap()
        })
    };
    let ptrs = |sd: &StateDict| -> Vec<*const u8> {
        ["a", "b", "c"]
            .iter()
            .map(|k| sd.tensor(k).unwrap().storage.bytes().as_ptr())
            .collect()
    };
    let first = transfer(&dict(1.0));
    let first_ptrs = ptrs(&first);
    let kept = pool.recycle(first.into_buffers());
    assert_eq!(kept, (3 + 70_000 + 300_000) * 4);
    // The second checkpoint lands in the first one's buffers, every stale byte overwritten.
    let second = transfer(&dict(-5.0));
    assert_eq!(ptrs(&second), first_ptrs);
    assert_eq!(pool.bytes(), 0);
    let expected = dict(-5.0);
    for k in ["a", "b", "c"] {
        assert_eq!(
            second.tensor(k).unwrap().storage.bytes(),
            expected.tensor(k).unwrap().storage.bytes(),
            "{k}"
        );
    }
}

#[test]
fn a_pool_gets_cast_staging_back() {
    let n = 100_000usize;
    let mut dst = StateDict::new();
    let zeros = vec![0u8; n * 2];
    dst.insert(
        "w",
        Entry::Tensor(Tensor::from_bytes(DType::BFloat16, &[n as u64], &zeros).unwrap()),
    )
    .unwrap();
    let pool = Arc::new(BufferPool::new(64 << 20));
    let opts = TransportOptions {
        pool: Some(pool.clone()),
        ..TransportOptions::default()
    };
    let mut groups = InProcessGroup::new(2).into_iter();
    let a = Transport::new(groups.next().unwrap(), opts.clone());
    let b = Transport::new(groups.next().unwrap(), opts);
    // Twice: the second receive stages into the first one's (stale) staging buffer.
    for round in 0..2 {
        let values: Vec<f32> = (0..n).map(|i| i as f32 + round as f32 * 1000.0).collect();
        let mut src = StateDict::new();
        src.insert(
            "w",
            Entry::Tensor(Tensor::from_values(&[n as u64], &values).unwrap()),
        )
        .unwrap();
        std::thread::scope(|s| {
            let h = s.spawn(|| b.recv_checkpoint_into(0, &mut dst));
            a.send_checkpoint(&[1], &src).unwrap();
            h.join().unwrap().unwrap();
        });
        assert_eq!(
            pool.bytes(),
            n * 4,
            "the f32 staging buffer is kept for next time"
        );
        let got = dst.tensor("w").unwrap().to_vec::<half::bf16>().unwrap();
        for i in [0, 12_345, n - 1] {
            assert_eq!(
                got[i],
                half::bf16::from_f32(values[i]),
                "round {round}, {i}"
            );
        }
    }
}

#[test]
fn in_place_size_mismatch_names_the_key_path() {
    let (err, dst) = in_place_size_mismatch(options(FanOut::Direct, 1024, 4096));
    let pgt_host::Error::Protocol(core) = &err else {
        panic!("not a protocol error: {err}")
    };
    assert_eq!(
        core,
        &pgt_core::Error::InPlaceSizeMismatch {
            path: "['model.layers.0.weight']".into(),
            expected: 16,
            got: 12
        }
    );
    // The destination dict is untouched.
    assert_eq!(
        dst.tensor("model.layers.0.weight").unwrap().layout.nbytes,
        12
    );
}

#[test]
fn stalled_sender_times_out() {
    let mut groups = InProcessGroup::new(2).into_iter();
    let _silent = groups.next().unwrap();
    let timeout = Duration::from_millis(300);
    let b = Transport::new(
        groups.next().unwrap(),
        TransportOptions {
            timeout,
            ..TransportOptions::default()
        },
    );
    let t = Instant::now();
    let err = b.recv_checkpoint(0).unwrap_err();
    assert!(t.elapsed() < timeout + Duration::from_secs(1));
    let pgt_host::Error::ProcessGroup(pg) = &err else {
        panic!("not a process-group error: {err}")
    };
    assert!(pg.is_timeout(), "{pg}");
}

#[test]
fn a_byte_corrupted_in_flight_is_caught_by_the_digest() {
    // Rank 1 gets clean bytes; data message 5 to rank 2 gets a flipped byte.
    let (shape, results) = transfer_with_a_corrupted_byte(options(FanOut::Direct, 1024, 4096));
    synthetic::verify(results[0].as_ref().unwrap(), &shape).unwrap();
    let err = results[1].as_ref().unwrap_err();
    match err {
        pgt_host::Error::Protocol(pgt_core::Error::DigestMismatch { path, .. }) => {
            assert_eq!(path, "['w01']")
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
}

#[test]
fn the_group_is_shared_across_transfers() {
    // Two transfers back to back on the same groups (tags restart per transfer).
    let shape = synthetic::mixed(32 << 10);
    let sd = synthetic::materialize(&shape).unwrap();
    let mut groups = InProcessGroup::new(2).into_iter();
    let a = Arc::new(Transport::new(
        groups.next().unwrap(),
        TransportOptions::default(),
    ));
    let b = Transport::new(groups.next().unwrap(), TransportOptions::default());
    std::thread::scope(|s| {
        let h = s.spawn(|| (b.recv_checkpoint(0).unwrap(), b.recv_checkpoint(0).unwrap()));
        a.send_checkpoint(&[1], &sd).unwrap();
        a.send_checkpoint(&[1], &sd).unwrap();
        let (x, y) = h.join().unwrap();
        synthetic::verify(&x, &shape).unwrap();
        synthetic::verify(&y, &shape).unwrap();
    });
}

#[test]
fn a_failed_destination_fails_the_send_at_once_not_at_the_timeout() {
    // Direct fan-out with digests: destination 0's thread (the one that hashes) fails its very first
    // send, after the main loop has queued everything (a small checkpoint) and waits for digests,
    // while destination 1's thread idles; the sender must report it promptly.
    let shape = synthetic::large(64 << 10, 2);
    let sd = synthetic::materialize(&shape).unwrap();
    let opts = options(FanOut::Direct, 64 << 10, 256 << 10);
    let opts = TransportOptions {
        timeout: Duration::from_secs(20),
        ..opts
    };
    let mut groups = InProcessGroup::new(3).into_iter();
    let sender = Transport::new(
        faulty(groups.next().unwrap(), 1, Fault::CloseFrom { tag: 0 }),
        opts.clone(),
    );
    let receivers: Vec<_> = groups
        .map(|pg| {
            Transport::new(
                pg,
                TransportOptions {
                    timeout: Duration::from_secs(3),
                    ..opts.clone()
                },
            )
        })
        .collect();
    std::thread::scope(|s| {
        for r in &receivers {
            s.spawn(move || {
                let _ = r.recv_checkpoint(0);
            });
        }
        let start = Instant::now();
        let err = sender.send_checkpoint(&[1, 2], &sd).unwrap_err();
        let took = start.elapsed();
        assert!(format!("{err:#}").contains("rank 1"), "{err:#}");
        assert!(
            took < Duration::from_secs(5),
            "the failure took {took:?} to surface"
        );
    });
}

#[test]
fn a_receive_over_the_memory_budget_is_refused_before_allocating() {
    // A 4 MiB tensor: what receiving it takes is its fresh buffer plus the metadata's decoded size (a
    // few hundred bytes). One byte of budget short of 4 MiB refuses it; in place, the buffer is the
    // caller's and does not count.
    let mut sd = StateDict::new();
    let w = Tensor::from_values(&[1 << 20], &vec![1.5f32; 1 << 20]).unwrap();
    sd.insert("w", Entry::Tensor(w)).unwrap();
    let recv = |budget: u64, into: Option<StateDict<'static>>| {
        let mut groups = InProcessGroup::new(2).into_iter();
        let opts = TransportOptions {
            timeout: Duration::from_secs(5),
            memory_budget: budget,
            ..TransportOptions::default()
        };
        let a = Transport::new(groups.next().unwrap(), opts.clone());
        let b = Transport::new(groups.next().unwrap(), opts);
        std::thread::scope(|s| {
            let h = s.spawn(move || match into {
                Some(mut target) => b.recv_checkpoint_into(0, &mut target).map(|_| target),
                None => b.recv_checkpoint(0),
            });
            // The sender's data may find nobody receiving it: its result is not the point.
            let _ = a.send_checkpoint(&[1], &sd);
            h.join().unwrap()
        })
    };
    let budget = (4 << 20) - 1;
    match recv(budget, None) {
        Err(pgt_host::Error::MemoryBudget { needed, budget: b }) => {
            assert_eq!(b, budget);
            assert!(needed > 4 << 20 && needed < (4 << 20) + 4096, "{needed}");
        }
        other => panic!("expected MemoryBudget, got {other:?}"),
    }
    let target = recv(u64::MAX, None).unwrap();
    let got = recv(budget, Some(target)).unwrap();
    assert_eq!(
        got.tensor("w").unwrap().storage_as::<f32>().unwrap()[12345],
        1.5
    );
}

#[test]
fn ints_beyond_i64_travel_exactly() {
    // Python ints such as torch.initial_seed() (up to 2^64 − 1): Value::Int is an i128.
    use pgt_core::tree::Value;
    let ints = [i128::from(u64::MAX), 1 << 63, i128::MIN, i128::MAX, -1];
    let mut sd = StateDict::new();
    for (i, &v) in ints.iter().enumerate() {
        sd.insert(format!("v{i}"), Entry::Value(Value::Int(v)))
            .unwrap();
    }
    let mut groups = InProcessGroup::new(2).into_iter();
    let a = Transport::new(groups.next().unwrap(), TransportOptions::default());
    let b = Transport::new(groups.next().unwrap(), TransportOptions::default());
    let got = std::thread::scope(|s| {
        let h = s.spawn(|| b.recv_checkpoint(0));
        a.send_checkpoint(&[1], &sd).unwrap();
        h.join().unwrap().unwrap()
    });
    for (i, &v) in ints.iter().enumerate() {
        match got.get(format!("v{i}").as_str()) {
            Some(Entry::Value(Value::Int(x))) => assert_eq!(*x, v),
            other => panic!("v{i}: {other:?}"),
        }
    }
}

#[test]
fn a_sender_and_receivers_that_kept_the_last_metadata_carry_what_changed() {
    // After a send, the next send of a dict the kept metadata still describes encodes only its
    // step, and a receiver given the same metadata but for the step does not decode it again. Every
    // change to what the metadata says must reach the receiver: the step, a value, a dtype, a
    // shape, the destinations; in place too, and a refused step must not be kept.
    let shape = synthetic::mixed(32 << 10);
    let base = synthetic::materialize(&shape).unwrap();
    let with_value = |v: f64| {
        let mut sd = base.clone();
        sd.insert("lr", Entry::Value(Value::Float(v))).unwrap();
        sd
    };
    let with_tensor = |dtype: DType, shape: &[u64]| {
        let mut sd = with_value(0.5);
        let nbytes = (shape.iter().product::<u64>() * dtype.element_size()) as usize;
        let bytes: Vec<u8> = (0..nbytes).map(|i| i as u8).collect();
        let t = Tensor::from_bytes(dtype, shape, &bytes).unwrap();
        sd.insert("extra", Entry::Tensor(t)).unwrap();
        sd
    };
    let at = |mut sd: StateDict<'static>, step| {
        sd.step = step;
        sd
    };
    let sends = [
        (vec![1], at(base.clone(), Some(1))),
        (vec![1], at(base.clone(), Some(2))),
        (vec![1], at(base.clone(), Some(300))),
        (vec![1], at(base.clone(), None)),
        (vec![1], at(with_value(0.5), Some(4))),
        (vec![1], at(with_value(0.25), Some(5))),
        (vec![1], at(with_value(0.25), Some(50))),
        (vec![1], at(with_tensor(DType::Float32, &[2, 3]), Some(6))),
        (vec![1], at(with_tensor(DType::Float32, &[3, 2]), Some(7))),
        (vec![1], at(with_tensor(DType::Int32, &[3, 2]), Some(8))),
        (vec![2], at(with_tensor(DType::Int32, &[3, 2]), Some(9))),
        (vec![2], at(with_tensor(DType::Int32, &[3, 2]), Some(90))),
        (vec![1, 2], at(with_tensor(DType::Int32, &[3, 2]), Some(10))),
        (vec![2, 1], at(with_tensor(DType::Int32, &[3, 2]), Some(11))),
        (vec![1], at(base.clone(), Some(12))),
    ];
    let mut groups = InProcessGroup::new(3).into_iter();
    let a = Transport::new(groups.next().unwrap(), TransportOptions::default());
    let b: Vec<_> = groups
        .map(|pg| Transport::new(pg, TransportOptions::default()))
        .collect();
    for (i, (dsts, sd)) in sends.iter().enumerate() {
        std::thread::scope(|s| {
            let handles: Vec<_> = dsts
                .iter()
                .map(|&d| {
                    let t = &b[d as usize - 1];
                    s.spawn(move || t.recv_checkpoint(0).unwrap())
                })
                .collect();
            a.send_checkpoint(dsts, sd).unwrap();
            for (h, d) in handles.into_iter().zip(dsts) {
                let got = h.join().unwrap();
                assert_same_but_placements(&got, sd, &format!("send {i}, rank {d}"));
            }
        });
    }
    // In place, and a step the receiver refuses, then the one it expects.
    let mut dst = base.clone();
    let sent = |step| at(base.clone(), step);
    for (step, expected) in [(20, 20), (21, 21), (22, 23), (23, 23), (24, 24)] {
        let options = b[0].recv_options().expected_step(Some(expected));
        let got = std::thread::scope(|s| {
            let h = s.spawn(|| b[0].recv_checkpoint_with(0, || dst.clone(), options));
            a.send_checkpoint(&[1], &sent(Some(step))).unwrap();
            h.join().unwrap()
        });
        match got {
            Ok(got) if step == expected => {
                assert_same_but_placements(&got, &sent(Some(step)), &format!("step {step}"));
                dst = got;
            }
            Err(pgt_host::Error::Protocol(pgt_core::Error::StepMismatch { got, .. }))
                if step != expected =>
            {
                assert_eq!(got, Some(step));
            }
            other => panic!("step {step}, expected {expected}: {other:?}"),
        }
    }
}

#[test]
fn a_factory_without_a_way_of_its_own_to_send_again_builds_a_sender_from_the_kept_metadata() {
    // `EngineFactory::sender_again`'s default, for a factory that does not override it: the kept
    // metadata, at the new step, through the factory's own `sender`. (The sends after the first
    // come through it: with its step assignment removed, this test fails.)
    #[derive(Debug, Default)]
    struct Counted(AtomicUsize);
    impl EngineFactory for Counted {
        fn sender(
            &self,
            metadata: Metadata,
            digests: bool,
            limits: &Limits,
            transfer_id: u64,
        ) -> Result<SenderEngine, EngineError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            NativeEngine.sender(metadata, digests, limits, transfer_id)
        }
        fn receiver(&self, options: ReceiverOptions) -> Result<ReceiverEngine, EngineError> {
            NativeEngine.receiver(options)
        }
    }
    let factory = Arc::new(Counted::default());
    let options = TransportOptions {
        engine: factory.clone(),
        ..TransportOptions::default()
    };
    let mut groups = InProcessGroup::new(2).into_iter();
    let a = Transport::new(groups.next().unwrap(), options);
    let b = Transport::new(groups.next().unwrap(), TransportOptions::default());
    let mut sd = synthetic::materialize(&synthetic::mixed(32 << 10)).unwrap();
    for (i, step) in [Some(1), Some(2), None, Some(1 << 40)]
        .into_iter()
        .enumerate()
    {
        sd.step = step;
        let got = std::thread::scope(|s| {
            let h = s.spawn(|| b.recv_checkpoint(0).unwrap());
            a.send_checkpoint(&[1], &sd).unwrap();
            h.join().unwrap()
        });
        assert_same_but_placements(&got, &sd, &format!("send {i}"));
        assert_eq!(factory.0.load(Ordering::SeqCst), i + 1, "send {i}");
    }
}

/// `got` is what `sent` describes, byte for byte, but for the shard placements (a receiver names
/// its own rank in its local shards').
fn assert_same_but_placements(got: &StateDict, sent: &StateDict, what: &str) {
    let leaf = |e: &Entry| match e.to_leaf() {
        Leaf::Sharded {
            mut local_shards,
            mut global,
        } => {
            local_shards
                .iter_mut()
                .for_each(|s| s.meta.placement.clear());
            global.shards.iter_mut().for_each(|s| s.placement.clear());
            Leaf::Sharded {
                local_shards,
                global,
            }
        }
        leaf => leaf,
    };
    assert_eq!(got.step, sent.step, "{what}");
    let ((got_nodes, got), (nodes, sent)) = (got.flatten(), sent.flatten());
    assert_eq!(got_nodes, nodes, "{what}");
    assert_eq!(got.len(), sent.len(), "{what}");
    for (g, s) in got.iter().zip(&sent) {
        assert_eq!(leaf(g), leaf(s), "{what}");
        for (x, y) in g.tensors().iter().zip(s.tensors()) {
            assert_eq!(x.storage.bytes(), y.storage.bytes(), "{what}");
        }
    }
}
