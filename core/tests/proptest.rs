//! Property tests: arbitrary valid state dicts survive encode → parse → decode unchanged (and a whole
//! in-memory transfer); arbitrary and mutated bytes never panic the header parser, the codec or the
//! receiver, and whatever decodes re-validates.

mod common;

#[path = "../../fuzz/harness.rs"]
mod harness;

use proptest::collection::{btree_map, btree_set, vec};
use proptest::prelude::*;

use common::*;
use pgt_core::codec;
use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement, ReduceOp};
use pgt_core::dtype::DType;
use pgt_core::header::{Header, Limits};
use pgt_core::layout::{contiguous_strides, TensorLayout};
use pgt_core::manifest::Manifest;
use pgt_core::receiver::InPlace;
use pgt_core::schema::Metadata;
use pgt_core::schema::{FanOut, PlanParams};
use pgt_core::sender::Sender;
use pgt_core::sharded::{LocalShard, ShardMetadata, ShardedTensorMetadata};
use pgt_core::tree::{Key, Leaf, Node, Value};

// ---------------------------------------------------------------- strategies

fn dtype() -> impl Strategy<Value = DType> {
    (0..DType::ALL.len()).prop_map(|i| DType::ALL[i])
}

/// A valid layout of `shape`: dims nested in a random order (a permuted view), each with a random step
/// (a strided slice), at a random storage offset, in a storage with random slack at the end.
fn layout_for(dtype: DType, shape: Vec<u64>) -> impl Strategy<Value = TensorLayout> {
    let n = shape.len();
    (
        Just((0..n).collect::<Vec<usize>>()).prop_shuffle(),
        vec(1u64..3, n),
        0u64..4,
        0u64..4,
        any::<bool>(),
    )
        .prop_map(move |(order, steps, offset, slack, plain)| {
            if plain {
                return TensorLayout::contiguous(dtype, &shape);
            }
            // order[0] is the outermost dim in memory.
            let mut stride = vec![0u64; n];
            let mut acc = 1u64;
            for &d in order.iter().rev() {
                stride[d] = acc * steps[d];
                acc = stride[d] * shape[d].max(1);
            }
            let extent = if shape.contains(&0) {
                0
            } else {
                offset
                    + shape
                        .iter()
                        .zip(&stride)
                        .map(|(s, st)| (s - 1) * st)
                        .sum::<u64>()
                    + 1
            };
            TensorLayout {
                dtype,
                shape: shape.clone(),
                stride,
                storage_offset: offset,
                nbytes: (extent + slack) * dtype.element_size(),
            }
        })
}

fn layout() -> impl Strategy<Value = TensorLayout> {
    (dtype(), vec(0u64..5, 0..=4)).prop_flat_map(|(d, shape)| layout_for(d, shape))
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::None),
        any::<bool>().prop_map(Value::Bool),
        any::<i128>().prop_map(Value::Int),
        // Every f64, NaNs included: metadata is compared by its encoding (bit for bit).
        any::<f64>().prop_map(Value::Float),
        ".{0,8}".prop_map(Value::Str),
        vec(any::<u8>(), 0..8).prop_map(Value::Bytes),
    ]
}

fn placement(ndim: usize) -> BoxedStrategy<Placement> {
    let op = prop_oneof![
        Just(ReduceOp::Sum),
        Just(ReduceOp::Avg),
        Just(ReduceOp::Product),
        Just(ReduceOp::Min),
        Just(ReduceOp::Max),
    ];
    if ndim == 0 {
        prop_oneof![Just(Placement::Replicate), op.prop_map(Placement::Partial)].boxed()
    } else {
        prop_oneof![
            (0..ndim as u32).prop_map(Placement::Shard),
            Just(Placement::Replicate),
            op.prop_map(Placement::Partial),
        ]
        .boxed()
    }
}

/// The size torch's chunking (`torch.chunk`) gives coordinate `c` of `n` along a dim of `size`.
fn chunk(size: u64, n: u64, c: u64) -> u64 {
    let full = size.div_ceil(n);
    let start = full * c;
    size.min(start + full).saturating_sub(start)
}

/// A valid DTensor: a global shape, a 1- or 2-dim mesh of distinct ranks and placements; the local
/// tensor is what torch gives a random mesh coordinate (any layout of that shape).
fn dtensor() -> impl Strategy<Value = Leaf> {
    (dtype(), vec(0u64..7, 0..=3), vec(1u64..4, 1..=2)).prop_flat_map(
        |(dtype, global_shape, mesh_shape)| {
            let ndim = global_shape.len();
            let mesh_ndim = mesh_shape.len();
            let mesh_size: u64 = mesh_shape.iter().product();
            (
                Just(global_shape),
                Just(mesh_shape.clone()),
                Just((0..mesh_size).collect::<Vec<u64>>()).prop_shuffle(),
                0u64..1 << 40,
                proptest::option::of(vec("[a-z]{1,3}", mesh_ndim)),
                prop_oneof![Just("cpu".to_string()), Just("cuda".to_string())],
                vec(placement(ndim), mesh_ndim),
                mesh_shape.iter().map(|&n| 0..n).collect::<Vec<_>>(),
            )
                .prop_flat_map(
                    move |(
                        global_shape,
                        shape,
                        ranks,
                        base,
                        dim_names,
                        device_type,
                        placements,
                        coord,
                    )| {
                        let mut local_shape = global_shape.clone();
                        for ((p, &n), &c) in placements.iter().zip(&shape).zip(&coord) {
                            if let Placement::Shard(d) = *p {
                                let d = d as usize;
                                local_shape[d] = chunk(local_shape[d], n, c);
                            }
                        }
                        let spec = DTensorSpec {
                            mesh: DeviceMesh {
                                shape,
                                ranks: ranks.iter().map(|r| base + r).collect(),
                                dim_names,
                                device_type,
                            },
                            placements,
                            global_stride: contiguous_strides(&global_shape),
                            global_shape,
                            dtype,
                        };
                        layout_for(dtype, local_shape).prop_map(move |local| Leaf::DTensor {
                            local,
                            spec: spec.clone(),
                        })
                    },
                )
        },
    )
}

/// The ranges `[start, end)` that cutting `[0, size)` after the positions flagged in `cuts` gives.
fn pieces(size: u64, cuts: &[bool]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut start = 0;
    for (i, &cut) in cuts.iter().enumerate() {
        if cut {
            out.push((start, i as u64 + 1));
            start = i as u64 + 1;
        }
    }
    out.push((start, size));
    out
}

/// A valid ShardedTensor: the global tensor cut into a grid of shards (a random partition per dim),
/// maybe with an empty shard at the end of dim 0 (as torch places the empty chunks of an uneven split),
/// listed in a random order, each on some rank and device; the sender holds a random subset.
fn sharded() -> impl Strategy<Value = Leaf> {
    (dtype(), vec(1u64..6, 1..=3))
        .prop_flat_map(|(dtype, global)| {
            let cuts: Vec<_> = global
                .iter()
                .map(|&g| vec(any::<bool>(), g as usize - 1))
                .collect();
            (Just(dtype), Just(global), cuts, any::<bool>())
        })
        .prop_flat_map(|(dtype, global, cuts, empty)| {
            let mut shards: Vec<(Vec<u64>, Vec<u64>)> = vec![(vec![], vec![])];
            for (&g, c) in global.iter().zip(&cuts) {
                shards = shards
                    .into_iter()
                    .flat_map(|(o, s)| {
                        pieces(g, c).into_iter().map(move |(a, b)| {
                            let (mut o, mut s) = (o.clone(), s.clone());
                            o.push(a);
                            s.push(b - a);
                            (o, s)
                        })
                    })
                    .collect();
            }
            if empty {
                let mut o = vec![0; global.len()];
                o[0] = global[0];
                let mut s = global.clone();
                s[0] = 0;
                shards.push((o, s));
            }
            let n = shards.len();
            (
                Just(dtype),
                Just(global),
                Just(shards).prop_shuffle(),
                vec(
                    (
                        0u32..8,
                        prop_oneof![Just("cpu"), Just("cuda:0"), Just("cuda:1")],
                    ),
                    n,
                ),
            )
        })
        .prop_flat_map(|(dtype, global_size, shards, places)| {
            let shards: Vec<ShardMetadata> = shards
                .into_iter()
                .zip(places)
                .map(|((offsets, sizes), (rank, dev))| ShardMetadata {
                    offsets,
                    sizes,
                    placement: format!("rank:{rank}/{dev}"),
                })
                .collect();
            let n = shards.len();
            let layouts: Vec<_> = shards
                .iter()
                .map(|s| layout_for(dtype, s.sizes.clone()))
                .collect();
            (
                Just(dtype),
                Just(global_size),
                Just(shards),
                vec(any::<bool>(), n),
                layouts,
            )
        })
        .prop_map(|(dtype, global_size, shards, held, layouts)| {
            let local_shards = shards
                .iter()
                .zip(held)
                .zip(layouts)
                .filter(|((_, h), _)| *h)
                .map(|((meta, _), layout)| LocalShard {
                    layout,
                    meta: meta.clone(),
                })
                .collect();
            Leaf::Sharded {
                local_shards,
                global: ShardedTensorMetadata {
                    shards,
                    global_size,
                    dtype,
                },
            }
        })
}

fn leaf() -> impl Strategy<Value = Leaf> {
    prop_oneof![
        3 => value().prop_map(Leaf::Value),
        3 => layout().prop_map(Leaf::Tensor),
        1 => dtensor(),
        1 => sharded(),
    ]
}

fn key() -> impl Strategy<Value = Key> {
    prop_oneof![
        "[a-z_.]{0,6}".prop_map(Key::Str),
        ".{0,3}".prop_map(Key::Str),
        any::<i64>().prop_map(Key::Int),
        (0i64..4).prop_map(Key::Int),
    ]
}

/// A state-dict subtree.
#[derive(Clone, Debug)]
enum Tree {
    Leaf(Box<Leaf>),
    Dict(Vec<(Key, Tree)>),
    List(Vec<Tree>),
    Tuple(Vec<Tree>),
}

fn tree() -> impl Strategy<Value = Tree> {
    leaf()
        .prop_map(|l| Tree::Leaf(Box::new(l)))
        .prop_recursive(5, 64, 5, |inner| {
            prop_oneof![
                btree_map(key(), inner.clone(), 0..7)
                    .prop_map(|m| m.into_iter().collect::<Vec<_>>())
                    .prop_shuffle()
                    .prop_map(Tree::Dict),
                vec(inner.clone(), 0..7).prop_map(Tree::List),
                vec(inner, 0..5).prop_map(Tree::Tuple),
            ]
        })
}

/// Pre-order nodes and depth-first leaves.
fn flatten(t: Tree, nodes: &mut Vec<Node>, leaves: &mut Vec<Leaf>) {
    match t {
        Tree::Leaf(l) => {
            nodes.push(Node::Leaf);
            leaves.push(*l);
        }
        Tree::Dict(entries) => {
            nodes.push(Node::Dict(entries.iter().map(|(k, _)| k.clone()).collect()));
            for (_, c) in entries {
                flatten(c, nodes, leaves);
            }
        }
        Tree::List(children) => {
            nodes.push(Node::List(children.len() as u64));
            for c in children {
                flatten(c, nodes, leaves);
            }
        }
        Tree::Tuple(children) => {
            nodes.push(Node::Tuple(children.len() as u64));
            for c in children {
                flatten(c, nodes, leaves);
            }
        }
    }
}

fn plan_params() -> impl Strategy<Value = PlanParams> {
    (any::<bool>(), 1u64..=1024).prop_flat_map(|(chain, k)| {
        let chunk_size = 64 * k;
        (0..=chunk_size).prop_map(move |bucket_size| PlanParams {
            fanout: if chain { FanOut::Chain } else { FanOut::Direct },
            bucket_size,
            chunk_size,
        })
    })
}

/// Arbitrary valid metadata.
fn metadata() -> impl Strategy<Value = Metadata> {
    (
        proptest::option::of(any::<u64>()),
        0u32..6,
        btree_set(0u32..6, 1..4),
        plan_params(),
        tree(),
        any::<bool>(),
    )
        .prop_map(|(step, source, dests, plan, tree, shuffle)| {
            let mut destinations: Vec<u32> = dests.into_iter().filter(|&d| d != source).collect();
            if destinations.is_empty() {
                destinations.push(source + 1);
            }
            if shuffle {
                destinations.reverse();
            }
            let mut nodes = Vec::new();
            let mut leaves = Vec::new();
            flatten(tree, &mut nodes, &mut leaves);
            Metadata {
                step,
                source,
                destinations,
                plan,
                tree: nodes,
                leaves,
            }
        })
}

/// Metadata compared by its encoding: bit for bit, NaNs included.
fn bits(m: &Metadata) -> Vec<u8> {
    postcard::to_allocvec(m).unwrap()
}

fn has_nan(m: &Metadata) -> bool {
    m.leaves
        .iter()
        .any(|l| matches!(l, Leaf::Value(Value::Float(f)) if f.is_nan()))
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match *m {
        Mutation::Flip(i, b) if n > 0 => bytes[i % n] ^= 1 << b,
        Mutation::Set(i, b) if n > 0 => bytes[i % n] = b,
        Mutation::Insert(i, b) => bytes.insert(i % (n + 1), b),
        Mutation::Delete(i) if n > 0 => {
            bytes.remove(i % n);
        }
        Mutation::Truncate(i) => bytes.truncate(i % (n + 1)),
        _ => {}
    }
}

/// Whatever decodes is valid: it re-validates and round-trips through the codec.
fn revalidates(m: &Manifest, limits: &Limits) {
    let again = Manifest::new(m.metadata().clone(), m.digests(), limits).expect("re-validates");
    let (h, b) = codec::encode(&again, TRANSFER_ID).unwrap();
    let back = codec::decode(&h, &b, limits).expect("round-trips");
    assert_eq!(bits(back.metadata()), bits(m.metadata()));
}

// ---------------------------------------------------------------- properties

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn valid_metadata_round_trips(meta in metadata(), digests in any::<bool>()) {
        let limits = Limits::default();
        let sender = Sender::new(meta.clone(), digests, &limits, TRANSFER_ID).expect("generated metadata is valid");
        let header = Header::parse(sender.header_bytes(), &limits).unwrap();
        prop_assert_eq!(header.has_digests(), digests);
        let manifest = codec::decode(&header, sender.metadata_bytes(), &limits).unwrap();
        prop_assert_eq!(bits(manifest.metadata()), bits(&meta));
        if !has_nan(&meta) {
            prop_assert_eq!(manifest.metadata(), &meta);
        }
        prop_assert_eq!(manifest.paths().len(), meta.leaves.len());
        prop_assert_eq!(manifest.storages(), sender.manifest().storages());
        prop_assert_eq!(&manifest.plan(header.metadata_len), sender.plan());
        // The same through Manifest::new + codec::encode, and decode_metadata.
        let direct = Manifest::new(meta.clone(), digests, &limits).unwrap();
        let (h2, b2) = codec::encode(&direct, TRANSFER_ID).unwrap();
        prop_assert_eq!(&h2.to_bytes()[..], sender.header_bytes());
        prop_assert_eq!(&b2[..], sender.metadata_bytes());
        prop_assert_eq!(bits(&codec::decode_metadata(&b2[8..]).unwrap()), bits(&meta));
        harness::check_manifest(&manifest, &limits);
    }

    #[test]
    fn mutated_encodings_never_panic_and_what_decodes_is_valid(
        meta in metadata(),
        mutations in vec(mutation(), 1..4),
        digests in any::<bool>(),
    ) {
        let limits = Limits::default();
        let (header, mut bytes) = encode_raw(&meta, digests);
        let original = bytes.clone();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        let _ = codec::decode_metadata(&bytes);
        // Behind the original header: only an unchanged message passes the length and digest checks.
        let r = decode_bytes(&header, &bytes, &limits);
        if bytes != original {
            prop_assert!(r.is_err());
        }
        // Behind a header that matches the mutated bytes, the codec and validation see them.
        let h = header_for(&bytes, digests);
        if let Ok(m) = decode_bytes(&h, &bytes, &limits) {
            revalidates(&m, &limits);
        }
        // The same bytes through the fuzz harness's invariants (decode and a receiver that drives the
        // transfer to the end).
        let mut input = vec![1 | if digests { 2 } else { 0 }];
        input.extend(h);
        input.extend(&bytes);
        harness::decode(&input);
        if bytes.len() <= u16::MAX as usize {
            let mut program = vec![16 | if digests { 32 } else { 0 }];
            program.extend((bytes.len() as u16).to_le_bytes());
            program.extend(h);
            program.extend(&bytes);
            program.extend([11, 13]);
            harness::receiver(&program);
        }
    }

    #[test]
    fn mutated_headers_never_panic(
        meta in metadata(),
        mutations in vec(mutation(), 1..4),
    ) {
        let limits = Limits::default();
        let (mut header, bytes) = encode_raw(&meta, true);
        for m in &mutations {
            mutate(&mut header, m);
        }
        match Header::parse(&header, &limits) {
            Ok(h) => {
                if let Ok(m) = codec::decode(&h, &message_for(&bytes), &limits) {
                    revalidates(&m, &limits);
                }
            }
            Err(e) => prop_assert!(!e.to_string().contains('\n')),
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..300), split in 0usize..40) {
        let limits = Limits::default();
        let _ = Header::parse(&data, &limits);
        let (h, m) = data.split_at(split.min(data.len()));
        let _ = Header::parse(h, &limits);
        let _ = codec::decode_metadata(&data);
        let _ = codec::decode_metadata(m);
        // Behind a matching header.
        if let Ok(manifest) = decode_bytes(&header_for(&data, false), &data, &limits) {
            revalidates(&manifest, &limits);
        }
        if let Ok(header) = Header::parse(&data[..data.len().min(Header::SIZE)], &limits) {
            let _ = codec::decode(&header, &data[data.len().min(Header::SIZE)..], &limits);
        }
        harness::decode(&data);
        harness::receiver(&data);
    }

    #[test]
    fn arbitrary_receiver_programs_never_panic(
        meta in metadata(),
        digests in any::<bool>(),
        mode in any::<u8>(),
        program in vec(any::<u8>(), 0..64),
    ) {
        let (_, bytes) = encode_raw(&meta, digests);
        let mut input = vec![mode | 16];
        input.extend((bytes.len() as u16).to_le_bytes());
        input.extend(header_for(&bytes, digests));
        input.extend(&bytes);
        input.extend(program);
        harness::receiver(&input);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn valid_metadata_transfers_completely(meta in metadata(), digests in any::<bool>()) {
        let received = transfer(meta.clone(), digests);
        prop_assert_eq!(received.len(), meta.destinations.len());
        for (r, &rank) in received.iter().zip(&meta.destinations) {
            prop_assert_eq!(r.step, meta.step);
            prop_assert_eq!(&r.tree, &meta.tree);
            prop_assert_eq!(r.leaves.len(), meta.leaves.len());
            let storages: usize = meta.leaves.iter().map(|l| l.storages().count()).sum();
            prop_assert_eq!(r.bindings.len(), storages);
            for (got, sent) in r.leaves.iter().zip(&meta.leaves) {
                match (got, sent) {
                    (Leaf::Sharded { local_shards, .. }, Leaf::Sharded { local_shards: s, .. }) => {
                        prop_assert_eq!(local_shards.len(), s.len());
                        for (g, s) in local_shards.iter().zip(s) {
                            prop_assert_eq!(&g.layout, &s.layout);
                            prop_assert_eq!(&g.meta.offsets, &s.meta.offsets);
                            let want = format!("rank:{rank}/");
                            prop_assert!(g.meta.placement.starts_with(&want));
                        }
                    }
                    // Fresh bindings keep every other leaf as sent.
                    (got, sent) => prop_assert_eq!(
                        postcard::to_allocvec(got).unwrap(),
                        postcard::to_allocvec(sent).unwrap()
                    ),
                }
            }
        }
    }

    #[test]
    fn valid_metadata_with_in_place_casts(meta in metadata()) {
        // Bind every float storage in place as bfloat16 (or float32 when it is bfloat16): the sizes the
        // receiver asks for are exact, and the result reports the cast.
        let rank = meta.destinations[0];
        let mut r = receiver_at_bindings(meta.clone(), false, rank);
        let storages = r.manifest().unwrap().storages().to_vec();
        let mut cast = Vec::new();
        let mut targets = Vec::new();
        for (i, s) in storages.iter().enumerate() {
            let storage = i as u32;
            if s.dtype.is_castable_float() {
                let to = if s.dtype == DType::BFloat16 { DType::Float32 } else { DType::BFloat16 };
                let nbytes = s.nbytes / s.dtype.element_size() * to.element_size();
                targets.push(InPlace { storage, id: i as u64, dtype: to, nbytes });
                cast.push((i, to, nbytes));
            } else if s.dtype != DType::Bool {
                let bool_target = InPlace { storage, id: 0, dtype: DType::Bool, nbytes: s.nbytes };
                prop_assert!(r.finish_bindings(&[bool_target]).is_err());
            }
        }
        r.finish_bindings(&targets).unwrap();
        for (i, to, nbytes) in cast {
            let b = r.bindings()[i];
            prop_assert_eq!((b.dtype, b.nbytes, b.cast_from), (to, nbytes, Some(storages[i].dtype)));
        }
    }
}

#[test]
fn the_strategies_cover_every_kind() {
    // The generator is worth what it generates: over 200 samples, every leaf kind, nested trees, both
    // fan-outs, non-contiguous and offset views, dicts with int keys, and shards held and not.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strategy = metadata();
    let (mut kinds, mut max_leaves, mut max_depth) = ([0usize; 4], 0, 0);
    let (mut strided, mut offset, mut int_keys, mut chain, mut unheld) = (0, 0, 0, 0, 0);
    for _ in 0..200 {
        let m = strategy.new_tree(&mut runner).unwrap().current();
        max_leaves = max_leaves.max(m.leaves.len());
        let paths = pgt_core::tree::key_paths(&m.tree, 64).unwrap();
        max_depth = max_depth.max(paths.iter().map(|p| p.0.len()).max().unwrap_or(0));
        chain += usize::from(m.plan.fanout == FanOut::Chain);
        int_keys += usize::from(
            m.tree
                .iter()
                .any(|n| matches!(n, Node::Dict(k) if k.iter().any(|k| matches!(k, Key::Int(_))))),
        );
        for l in &m.leaves {
            let i = match l {
                Leaf::Value(_) => 0,
                Leaf::Tensor(_) => 1,
                Leaf::DTensor { .. } => 2,
                Leaf::Sharded {
                    local_shards,
                    global,
                } => {
                    unheld += usize::from(local_shards.len() < global.shards.len());
                    3
                }
            };
            kinds[i] += 1;
            for s in l.storages() {
                strided += usize::from(!s.is_contiguous());
                offset += usize::from(s.storage_offset > 0);
            }
        }
    }
    assert!(kinds.iter().all(|&k| k >= 10), "{kinds:?}");
    assert!(
        max_leaves >= 10 && max_depth >= 3,
        "{max_leaves} {max_depth}"
    );
    assert!(strided >= 10 && offset >= 10, "{strided} {offset}");
    assert!(int_keys >= 10 && chain >= 50 && unheld >= 5);
}
