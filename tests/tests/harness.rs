//! Whole transfers through the in-memory harness: both fan-out modes, 1–3 receivers, every leaf kind,
//! bucketing and chunking boundaries, in-place and cast-on-receive bindings, digests and corruption.

use std::collections::HashMap;

use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement, ReduceOp};
use pgt_core::dtype::{convert, DType};
use pgt_core::layout::TensorLayout;
use pgt_core::receiver::Dest;
use pgt_core::schema::{FanOut, Metadata, PlanParams};
use pgt_core::sharded::{LocalShard, ShardMetadata, ShardedTensorMetadata};
use pgt_core::tree::{Key, Leaf, Node, Value};
use pgt_core::Error;
use pgt_tests::harness::{transfer, Corruption, InPlace, Run};

fn key(s: &str) -> Key {
    Key::Str(s.into())
}

fn pattern(seed: u64, n: u64) -> Vec<u8> {
    (0..n)
        .map(|i| (i.wrapping_mul(31).wrapping_add(seed * 17) % 251) as u8)
        .collect()
}

/// A state dict with every leaf kind; returns the metadata and each storage's bytes.
fn mixed(
    fanout: FanOut,
    bucket_size: u64,
    chunk_size: u64,
    dsts: Vec<u32>,
) -> (Metadata, Vec<Vec<u8>>) {
    let shard = |off: u64, rank: u64| ShardMetadata {
        offsets: vec![off, 0],
        sizes: vec![2, 3],
        placement: format!("rank:{rank}/cpu"),
    };
    let dtensor_local = TensorLayout::contiguous(DType::BFloat16, &[4, 8]);
    let leaves = vec![
        // model.weight: contiguous f32, spans several chunks.
        Leaf::Tensor(TensorLayout::contiguous(DType::Float32, &[10, 10])),
        // model.weight_t: a transposed (strided) view.
        Leaf::Tensor(TensorLayout {
            dtype: DType::Float32,
            shape: vec![5, 4],
            stride: vec![1, 5],
            storage_offset: 0,
            nbytes: 80,
        }),
        // model.tail: an offset view into a bigger storage.
        Leaf::Tensor(TensorLayout {
            dtype: DType::Int64,
            shape: vec![3],
            stride: vec![2],
            storage_offset: 4,
            nbytes: 88,
        }),
        // model.scalar: a 0-dim tensor.
        Leaf::Tensor(TensorLayout::contiguous(DType::Float64, &[])),
        // model.empty: a zero-size tensor.
        Leaf::Tensor(TensorLayout::contiguous(DType::Float16, &[0, 7])),
        // model.dt: a DTensor on a 2×2 mesh.
        Leaf::DTensor {
            local: dtensor_local,
            spec: DTensorSpec {
                mesh: DeviceMesh {
                    shape: vec![2, 2],
                    ranks: vec![0, 1, 2, 3],
                    dim_names: Some(vec!["dp".into(), "tp".into()]),
                    device_type: "cpu".into(),
                },
                placements: vec![Placement::Shard(0), Placement::Partial(ReduceOp::Sum)],
                global_shape: vec![8, 8],
                global_stride: vec![8, 1],
                dtype: DType::BFloat16,
            },
        },
        // model.st: a ShardedTensor with two local shards of four.
        Leaf::Sharded {
            local_shards: vec![
                LocalShard {
                    layout: TensorLayout::contiguous(DType::Float32, &[2, 3]),
                    meta: shard(0, 0),
                },
                LocalShard {
                    layout: TensorLayout::contiguous(DType::Float32, &[2, 3]),
                    meta: shard(4, 0),
                },
            ],
            global: ShardedTensorMetadata {
                shards: vec![shard(0, 0), shard(2, 1), shard(4, 0), shard(6, 1)],
                global_size: vec![8, 3],
                dtype: DType::Float32,
            },
        },
        Leaf::Value(Value::Int(-7)),
        Leaf::Value(Value::Str("adamw".into())),
        Leaf::Value(Value::None),
        Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[3])),
        Leaf::Value(Value::Bytes(vec![0, 255])),
    ];
    let tree = vec![
        Node::Dict(vec![key("model"), key("optim"), Key::Int(3)]),
        Node::Dict(vec![
            key("weight"),
            key("weight_t"),
            key("tail"),
            key("scalar"),
            key("empty"),
            key("dt"),
            key("st"),
        ]),
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Dict(vec![key("step"), key("name"), key("none")]),
        Node::Leaf,
        Node::Leaf,
        Node::Leaf,
        Node::Tuple(2),
        Node::Leaf,
        Node::Leaf,
    ];
    let metadata = Metadata {
        step: Some(42),
        source: 0,
        destinations: dsts,
        plan: PlanParams {
            fanout,
            bucket_size,
            chunk_size,
        },
        tree,
        leaves,
    };
    let storages: Vec<Vec<u8>> = metadata
        .leaves
        .iter()
        .flat_map(|l| l.storages().map(|s| s.nbytes).collect::<Vec<_>>())
        .enumerate()
        .map(|(i, n)| pattern(i as u64, n))
        .collect();
    (metadata, storages)
}

fn assert_all_bytes(metadata: &Metadata, sent: &[Vec<u8>], got: &[Vec<u8>]) {
    assert_eq!(sent.len(), got.len());
    for (i, (s, g)) in sent.iter().zip(got).enumerate() {
        assert_eq!(s, g, "storage {i} differs");
    }
    // Every view reads the same elements as the sender's view, strided and offset ones included.
    let mut storage = 0;
    for leaf in &metadata.leaves {
        for layout in leaf.storages() {
            assert_eq!(
                layout
                    .gather(&sent[storage], u64::MAX)
                    .expect("view in storage"),
                layout
                    .gather(&got[storage], u64::MAX)
                    .expect("view in storage")
            );
            storage += 1;
        }
    }
}

#[test]
fn every_mode_and_boundary_delivers_every_byte() {
    for fanout in [FanOut::Direct, FanOut::Chain] {
        for dsts in [vec![1], vec![1, 2], vec![3, 1, 2]] {
            // bucket/chunk sizes around the tensor sizes: 64-byte chunks split the 400-byte weight; a
            // 96-byte bucket packs small tensors but not the 88-byte one after another.
            for (bucket, chunk) in [(0, 64), (64, 64), (96, 128), (4096, 4096)] {
                for digests in [false, true] {
                    for lookahead in [1, 4] {
                        let (metadata, storages) = mixed(fanout, bucket, chunk, dsts.clone());
                        let run = Run {
                            digests,
                            lookahead,
                            ..Run::default()
                        };
                        let outcomes = transfer(metadata.clone(), &storages, &run);
                        assert_eq!(outcomes.len(), dsts.len());
                        for (i, rank) in dsts.iter().enumerate() {
                            let o = &outcomes[rank];
                            let received = o.result.as_ref().unwrap_or_else(|e| {
                                panic!("{fanout:?} {dsts:?} {bucket}/{chunk}: rank {rank}: {e}")
                            });
                            assert_eq!(received.step, Some(42));
                            assert_all_bytes(&metadata, &storages, &o.storages);
                            let expect_forwards = fanout == FanOut::Chain && i + 1 < dsts.len();
                            assert_eq!(o.forwarded > 0, expect_forwards, "rank {rank} forwarding");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn sharded_shards_are_placed_as_torch_places_them() {
    let (metadata, storages) = mixed(FanOut::Chain, 64, 64, vec![2, 5]);
    let Leaf::Sharded { global: sent, .. } = &metadata.leaves[6] else {
        panic!("leaf 6 is the sharded tensor");
    };
    let sent = sent.clone();
    let outcomes = transfer(metadata, &storages, &Run::default());
    for rank in [2u32, 5] {
        let received = outcomes[&rank].result.as_ref().unwrap();
        let Leaf::Sharded {
            local_shards,
            global,
        } = &received.leaves[6]
        else {
            panic!("leaf 6 is the sharded tensor");
        };
        for s in local_shards {
            assert_eq!(s.meta.placement, format!("rank:{rank}/cpu"));
        }
        // The global metadata as sent, on every receiver of the chain.
        assert_eq!(global, &sent);
    }
}

#[test]
fn in_place_destinations_receive_and_cast() {
    let (metadata, storages) = mixed(FanOut::Direct, 64, 64, vec![1]);
    // Storage 0 (model.weight, f32 [10,10]) in place, same dtype; storage 5 (dt, bf16 [4,8]) cast to f32.
    let mut targets = HashMap::new();
    targets.insert(
        0,
        InPlace {
            id: 100,
            dtype: DType::Float32,
            bytes: vec![0xAA; 400],
        },
    );
    targets.insert(
        5,
        InPlace {
            id: 105,
            dtype: DType::Float32,
            bytes: vec![0xAA; 128],
        },
    );
    let run = Run {
        digests: true,
        lookahead: 2,
        in_place: HashMap::from([(1, targets)]),
        ..Run::default()
    };
    let outcomes = transfer(metadata, &storages, &run);
    let o = &outcomes[&1];
    let received = o.result.as_ref().expect("transfer succeeds");
    assert_eq!(received.bindings[0].dest, Dest::InPlace(100));
    assert_eq!(received.bindings[5].dest, Dest::InPlace(105));
    assert_eq!(received.bindings[5].cast_from, Some(DType::BFloat16));
    assert_eq!(received.bindings[1].dest, Dest::Fresh);
    assert_eq!(o.storages[0], storages[0]);
    let mut expected = vec![0u8; 128];
    convert(DType::BFloat16, &storages[5], DType::Float32, &mut expected).unwrap();
    assert_eq!(o.storages[5], expected);
    // The received DTensor now describes the f32 local tensor.
    let Leaf::DTensor { local, spec } = &received.leaves[5] else {
        panic!()
    };
    assert_eq!(
        (local.dtype, local.nbytes, spec.dtype),
        (DType::Float32, 128, DType::Float32)
    );
}

#[test]
fn in_place_size_mismatch_names_the_key_path() {
    let (metadata, storages) = mixed(FanOut::Direct, 64, 64, vec![1]);
    let targets = HashMap::from([(
        1,
        InPlace {
            id: 7,
            dtype: DType::Float32,
            bytes: vec![0; 76],
        },
    )]);
    let run = Run {
        in_place: HashMap::from([(1, targets)]),
        ..Run::default()
    };
    let outcomes = transfer(metadata, &storages, &run);
    assert_eq!(
        outcomes[&1].result.as_ref().unwrap_err(),
        &Error::InPlaceSizeMismatch {
            path: "['model']['weight_t']".into(),
            expected: 80,
            got: 76
        }
    );
}

#[test]
fn in_place_int_destination_for_float_is_refused() {
    let (metadata, storages) = mixed(FanOut::Direct, 64, 64, vec![1]);
    let targets = HashMap::from([(
        0,
        InPlace {
            id: 7,
            dtype: DType::Int32,
            bytes: vec![0; 400],
        },
    )]);
    let run = Run {
        in_place: HashMap::from([(1, targets)]),
        ..Run::default()
    };
    let outcomes = transfer(metadata, &storages, &run);
    assert_eq!(
        outcomes[&1].result.as_ref().unwrap_err(),
        &Error::InPlaceDTypeMismatch {
            path: "['model']['weight']".into(),
            incoming: DType::Float32,
            destination: DType::Int32
        }
    );
}

#[test]
fn a_byte_corrupted_in_flight_is_caught_by_the_digest() {
    for fanout in [FanOut::Direct, FanOut::Chain] {
        let (metadata, storages) = mixed(fanout, 64, 64, vec![1, 2]);
        // Message 2 is the first data message: the first 64-byte chunk of model.weight.
        let run = Run {
            digests: true,
            lookahead: 1,
            corrupt: Some(Corruption {
                to: 1,
                message: 2,
                byte: 10,
            }),
            ..Run::default()
        };
        let outcomes = transfer(metadata, &storages, &run);
        let expected = Error::DigestMismatch {
            path: "['model']['weight']".into(),
            storage: 0,
        };
        assert_eq!(outcomes[&1].result.as_ref().unwrap_err(), &expected);
        match fanout {
            // Rank 2 got its own clean copy from the source.
            FanOut::Direct => assert!(outcomes[&2].result.is_ok()),
            // Rank 1 forwarded what it received (forwarding happens before verification), so rank 2
            // catches the corruption too.
            FanOut::Chain => assert_eq!(outcomes[&2].result.as_ref().unwrap_err(), &expected),
        }
    }
}

#[test]
fn without_digests_corruption_goes_unnoticed_but_with_them_never() {
    // The control for the test above: the digest is what catches it.
    let (metadata, storages) = mixed(FanOut::Direct, 64, 64, vec![1]);
    let run = Run {
        digests: false,
        corrupt: Some(Corruption {
            to: 1,
            message: 2,
            byte: 10,
        }),
        ..Run::default()
    };
    let outcomes = transfer(metadata, &storages, &run);
    let o = &outcomes[&1];
    assert!(o.result.is_ok());
    assert_ne!(o.storages[0], storages[0]);
}

#[test]
fn empty_and_values_only_dicts() {
    for leaves in [
        vec![],
        vec![
            Leaf::Value(Value::Float(1.5)),
            Leaf::Value(Value::Bool(true)),
        ],
    ] {
        let tree = if leaves.is_empty() {
            vec![Node::Dict(vec![])]
        } else {
            vec![Node::List(2), Node::Leaf, Node::Leaf]
        };
        let metadata = Metadata {
            step: None,
            source: 0,
            destinations: vec![1, 2],
            plan: PlanParams::default(),
            tree,
            leaves: leaves.clone(),
        };
        let outcomes = transfer(
            metadata,
            &[],
            &Run {
                digests: true,
                ..Run::default()
            },
        );
        for rank in [1, 2] {
            let received = outcomes[&rank].result.as_ref().unwrap();
            assert_eq!(received.leaves, leaves);
        }
    }
}
