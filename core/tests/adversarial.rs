//! Resource safety against hostile metadata: announced lengths, depth, width and counts that would cost
//! memory or time out of proportion to the bytes received must be refused before that cost is paid.
//!
//! Memory is measured, not guessed: this test binary installs a counting global allocator, and each
//! check bounds the peak heap growth of one call on the current thread. No check measures time; the
//! inputs are sized so that a quadratic or per-chunk walk would not finish within the suite.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use common::*;
use pgt_core::codec;
use pgt_core::dtype::DType;
use pgt_core::header::Limits;
use pgt_core::layout::TensorLayout;
use pgt_core::manifest::Manifest;
use pgt_core::plan::{self, Plan};
use pgt_core::scan::decoded_size_budget;
use pgt_core::schema::Metadata;
use pgt_core::schema::{FanOut, PlanParams};
use pgt_core::sharded::{LocalShard, ShardMetadata, ShardedTensorMetadata};
use pgt_core::tree::{Key, Leaf, Node, Value};
use pgt_core::Error;

// ---------------------------------------------------------------- heap accounting

struct Counting;

thread_local! {
    static LIVE: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn track(delta: i64) {
    // `try_with`: the thread-locals may already be gone while a thread shuts down.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| peak.set(peak.get().max(now)));
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        track(layout.size() as i64);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        track(-(layout.size() as i64));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        track(new_size as i64 - layout.size() as i64);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Runs `f` and returns its result and the peak heap growth (bytes) on this thread while it ran.
fn peak_heap<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - base).max(0) as u64)
}

const MIB: u64 = 1 << 20;

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Decodes raw metadata bytes behind a matching header; returns the result and the peak heap.
fn decode_raw(bytes: &[u8], limits: &Limits) -> (Result<pgt_core::manifest::Manifest, Error>, u64) {
    let (header, message) = header_and_message(bytes, limits);
    peak_heap(|| codec::decode(&header, &message, limits))
}

/// The parsed header and the metadata message (prefix + `bytes`) of transfer `TRANSFER_ID`, built
/// before a measurement so that the copy is not counted as decoding's memory.
fn header_and_message(bytes: &[u8], limits: &Limits) -> (pgt_core::header::Header, Vec<u8>) {
    let header =
        pgt_core::header::Header::parse(&header_for(bytes, false), limits).expect("valid header");
    (header, message_for(bytes))
}

// ---------------------------------------------------------------- announced lengths

#[test]
fn huge_announced_lengths_in_small_buffers_are_refused_without_allocating() {
    let huge = 1u64 << 60;
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // destinations: 2^60 u32s.
    let mut b = vec![0, 0];
    varint(huge, &mut b);
    b.extend([1, 2, 3]);
    cases.push(("destinations", b));
    // tree: 2^60 nodes.
    let mut b = prefix();
    varint(huge, &mut b);
    b.extend([3, 3, 3]);
    cases.push(("tree", b));
    // leaves: a valid one-leaf tree, then 2^60 leaves.
    let mut b = prefix();
    b.extend([1, 3]);
    varint(huge, &mut b);
    b.extend([0, 0, 0, 0]);
    cases.push(("leaves", b));
    // A dict of 2^60 keys.
    let mut b = prefix();
    b.extend([1, 0]);
    varint(huge, &mut b);
    b.extend([0, 1, b'a']);
    cases.push(("dict keys", b));
    // A string key announcing 2^60 bytes.
    let mut b = prefix();
    b.extend([1, 0, 1, 0]);
    varint(huge, &mut b);
    b.extend(b"abc");
    cases.push(("key string", b));
    // A bytes value announcing 2^60 bytes.
    let mut b = prefix();
    b.extend([1, 3, 1, 0, 5]);
    varint(huge, &mut b);
    b.extend([1, 2, 3]);
    cases.push(("bytes value", b));
    // A tensor shape of 2^60 dims.
    let mut b = prefix();
    b.extend([1, 3, 1, 1, 0]);
    varint(huge, &mut b);
    b.extend([1, 1, 1]);
    cases.push(("tensor shape", b));
    for (what, bytes) in cases {
        assert!(bytes.len() < 64, "{what}");
        let (res, peak) = decode_raw(&bytes, &Limits::default());
        // The leaf count and a dims list's length are checked against their limits as soon as they
        // are read.
        let want = match what {
            "leaves" => Error::TooManyLeaves {
                count: huge,
                max: Limits::default().max_leaves,
            },
            "tensor shape" => Error::TooManyDims {
                ndim: huge,
                max: Limits::default().max_ndim,
            },
            // Any other length follows the u32 varint rules on every host (PROTOCOL.md §5): 2^60
            // takes 9 bytes, more than a u32's 5, so it is malformed as soon as it is read — on a
            // 64-bit host as in a wasm32 guest.
            _ => Error::MalformedMetadata,
        };
        assert_eq!(res.err(), Some(want), "{what}");
        // serde preallocates at most 1 MiB for an announced length; nothing proportional to 2^60.
        assert!(peak <= 2 * MIB, "{what}: {peak} bytes");
        let (res, peak) = peak_heap(|| codec::decode_metadata(&bytes));
        // Without limits, the leaf count and dims lengths are lengths like any other.
        assert_eq!(res.err(), Some(Error::MalformedMetadata), "{what}");
        assert!(peak <= 2 * MIB, "{what}: {peak} bytes");
    }
}

#[test]
fn a_metadata_length_over_the_limit_is_refused_from_the_header() {
    let (header, _) = encode_raw(&sample(), false);
    let mut h = header.clone();
    h[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let (res, peak) = peak_heap(|| pgt_core::header::Header::parse(&h, &Limits::default()));
    assert!(matches!(res, Err(Error::MetadataTooLarge { .. })));
    assert_eq!(peak, 0);
}

// ---------------------------------------------------------------- tree shape

#[test]
fn list_of_u64_max_children_is_a_truncated_tree() {
    for node in [Node::List(u64::MAX), Node::Tuple(u64::MAX)] {
        let m = metadata(vec![node, Node::Leaf], vec![Leaf::Value(Value::None)]);
        let (res, peak) = peak_heap(|| round_trip(&m, &Limits::default()));
        assert_eq!(res.err(), Some(Error::TruncatedTree));
        assert!(peak < MIB, "{peak}");
    }
}

#[test]
fn deep_tree_is_too_deep_without_recursion() {
    // 100,000 nested lists; decoding and validation are iterative (this runs on a test thread's
    // small stack).
    let m = nested_lists(100_000);
    assert_eq!(
        round_trip(&m, &Limits::default()).err(),
        Some(Error::TreeTooDeep { max: 64 })
    );
    // Dicts too.
    let mut m = nested_lists(100_000);
    for n in &mut m.tree[..100_000] {
        *n = Node::Dict(vec![Key::Int(0)]);
    }
    assert_eq!(
        round_trip(&m, &Limits::default()).err(),
        Some(Error::TreeTooDeep { max: 64 })
    );
    // With the depth limit lifted, the same tree is valid, still without recursion.
    let unlimited = Limits {
        max_depth: u32::MAX,
        ..Limits::default()
    };
    let manifest = round_trip(&nested_lists(100_000), &unlimited).unwrap();
    assert_eq!(manifest.paths()[0].0.len(), 100_000);
    drop(manifest);
    // And the receiver/sender path handles it (Drop of the metadata is flat too).
    let sender =
        pgt_core::sender::Sender::new(nested_lists(100_000), true, &unlimited, TRANSFER_ID)
            .unwrap();
    assert_eq!(sender.plan().messages().len(), 3);
}

#[test]
fn wide_dict_validates_in_n_log_n() {
    // 100,000 distinct keys, each a leaf: a quadratic duplicate check would take ~10^10 steps.
    let n = 100_000;
    let keys: Vec<Key> = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                Key::Str(format!("model.layers.{i}.weight"))
            } else {
                Key::Int(i as i64)
            }
        })
        .collect();
    let mut tree = vec![Node::Dict(keys)];
    tree.extend(std::iter::repeat_n(Node::Leaf, n));
    let m = metadata(tree, vec![Leaf::Value(Value::Bool(true)); n]);
    let manifest = round_trip(&m, &Limits::default()).unwrap();
    assert_eq!(manifest.paths().len(), n);
    assert_eq!(manifest.paths()[2].to_string(), "['model.layers.2.weight']");
    assert_eq!(manifest.paths()[3].to_string(), "[3]");
    // A duplicate at the very end is still found.
    let mut m = m;
    let Node::Dict(keys) = &mut m.tree[0] else {
        unreachable!()
    };
    keys[n - 1] = Key::Str("model.layers.0.weight".into());
    assert_eq!(
        round_trip(&m, &Limits::default()).err(),
        Some(Error::DuplicateKey)
    );
}

#[test]
fn many_small_dicts_validate_linearly() {
    // 50,000 one-key dicts in a list: per-dict work must not depend on the number of dicts.
    let n = 50_000u64;
    let mut tree = vec![Node::List(n)];
    for _ in 0..n {
        tree.push(Node::Dict(vec![Key::Str("w".into())]));
        tree.push(Node::Leaf);
    }
    let m = metadata(tree, vec![Leaf::Value(Value::Int(1)); n as usize]);
    let manifest = round_trip(&m, &Limits::default()).unwrap();
    assert_eq!(manifest.paths()[49_999].to_string(), "[49999]['w']");
}

// ---------------------------------------------------------------- key-path amplification

/// `{<key of key_len bytes>: [None; leaves]}`: each leaf's key path repeats the long key.
fn long_key_over_many_leaves(key_len: usize, leaves: u64) -> Metadata {
    let mut tree = vec![
        Node::Dict(vec![Key::Str("k".repeat(key_len))]),
        Node::List(leaves),
    ];
    tree.extend(std::iter::repeat_n(Node::Leaf, leaves as usize));
    metadata(tree, vec![Leaf::Value(Value::None); leaves as usize])
}

#[test]
fn key_paths_cannot_amplify_one_long_key() {
    // 64 KiB of key + 20,000 three-byte leaves ≈ 125 KB of metadata would materialize 1.3 GB of key
    // paths. Their text counts in the decoded size, refused from the bytes before anything is decoded.
    let m = long_key_over_many_leaves(64 << 10, 20_000);
    let limits = Limits {
        max_metadata_bytes: MIB,
        ..Limits::default()
    };
    let (_, bytes) = encode_raw(&m, false);
    let (res, peak) = decode_raw(&bytes, &limits);
    assert_eq!(
        res.err(),
        Some(Error::DecodedTooLarge {
            max: decoded_size_budget(bytes.len() as u64)
        })
    );
    assert!(peak < 64 << 10, "{peak}");
    // Metadata built in memory (a sender's) is bounded by the key text cap, 4 × max_metadata_bytes,
    // before its paths are built; the sender could not encode it either.
    let (res, peak) = peak_heap(|| Manifest::new(m, false, &limits));
    assert_eq!(res.err(), Some(Error::KeyPathsTooLarge { max: 4 * MIB }));
    assert!(peak < 64 << 10, "{peak}");
    // The bound scales with the metadata cap: 256 KiB of metadata allow 1 MiB of key text.
    let small = Limits {
        max_metadata_bytes: 256 << 10,
        ..Limits::default()
    };
    let at = long_key_over_many_leaves(1 << 10, 1 << 10);
    round_trip(&at, &small).unwrap();
    let over = long_key_over_many_leaves(1 << 10, (1 << 10) + 1);
    assert_eq!(
        round_trip(&over, &small).err(),
        Some(Error::KeyPathsTooLarge { max: MIB })
    );
    // Ordinary paths are far below the bound: a 1 KiB key over 1,000 leaves is fine.
    let m = long_key_over_many_leaves(1 << 10, 1_000);
    let manifest = round_trip(&m, &limits).unwrap();
    assert_eq!(manifest.paths().len(), 1_000);
}

#[test]
fn leaf_count_is_checked_before_the_leaves_are_decoded() {
    // 2^19 leaves of 2 wire bytes each decode to ~250 bytes each: 130 MB from 1.5 MB of leaves. With
    // max_leaves = 10 they are refused from the announced count, without decoding one.
    let n = 1usize << 19;
    let mut tree = vec![Node::List(n as u64)];
    tree.extend(std::iter::repeat_n(Node::Leaf, n));
    let m = metadata(tree, vec![Leaf::Value(Value::None); n]);
    let (_, bytes) = encode_raw(&m, false);
    drop(m);
    let tight = Limits {
        max_leaves: 10,
        ..Limits::default()
    };
    let (res, peak) = decode_raw(&bytes, &tight);
    assert_eq!(
        res.err(),
        Some(Error::TooManyLeaves {
            count: n as u64,
            max: 10
        })
    );
    // The tree's 2^19 nodes (24 bytes each) are decoded; the leaves are not.
    assert!(peak < 40 * MIB, "{peak}");
}

// ---------------------------------------------------------------- decoded size (issue 10 #4)

/// Generous for a loaded debug build; the work is one pass over the bytes.
fn quick() -> Duration {
    Duration::from_secs(if cfg!(debug_assertions) { 5 } else { 1 })
}

/// `depth - 1` nested one-element lists around a list of `leaves` `None` values: every leaf's key path
/// has `depth` elements (list indices).
fn deep_lists(depth: usize, leaves: usize) -> Metadata {
    let mut tree = vec![Node::List(1); depth - 1];
    tree.push(Node::List(leaves as u64));
    tree.extend(std::iter::repeat_n(Node::Leaf, leaves));
    metadata(tree, vec![Leaf::Value(Value::None); leaves])
}

/// `[None] * n`.
fn nones(n: usize) -> Metadata {
    let mut tree = vec![Node::List(n as u64)];
    tree.extend(std::iter::repeat_n(Node::Leaf, n));
    metadata(tree, vec![Leaf::Value(Value::None); n])
}

/// Decodes, validates and builds the key paths of `bytes`; the peak heap of all that.
fn decode_with_paths(bytes: &[u8], limits: &Limits) -> (Result<usize, Error>, u64) {
    let (header, message) = header_and_message(bytes, limits);
    peak_heap(|| codec::decode(&header, &message, limits).map(|m| m.paths().len()))
}

#[test]
fn deep_lists_over_many_leaves_are_refused_from_their_decoded_size() {
    // 600 KB: 200,000 None leaves under 64 lists. Each leaf's path holds 64 list indices: building them
    // took 390 MB (pgt recv: 687 MB, 10 s of CPU), and indices did not count toward any cap. Now they
    // count in the decoded size, which is over 64 × 600 KB + 16 MiB: refused before decoding anything.
    let (_, bytes) = encode_raw(&deep_lists(64, 200_000), false);
    assert!((590_000..610_000).contains(&bytes.len()), "{}", bytes.len());
    let t = Instant::now();
    let (res, peak) = decode_with_paths(&bytes, &Limits::default());
    assert_eq!(
        res,
        Err(Error::DecodedTooLarge {
            max: decoded_size_budget(bytes.len() as u64)
        })
    );
    assert!(peak < 16 << 10, "{peak}");
    eprintln!(
        "{} bytes refused in {:?}, peak heap {peak}",
        bytes.len(),
        t.elapsed()
    );
    assert!(t.elapsed() < quick(), "{:?}", t.elapsed());
    // Fewer leaves fit: built on demand, the paths and everything decoded take what the decoded size
    // says, within its budget.
    let (_, bytes) = encode_raw(&deep_lists(64, 10_000), false);
    let size = codec::decoded_size(&bytes).unwrap();
    assert!(size <= decoded_size_budget(bytes.len() as u64));
    let (res, peak) = decode_with_paths(&bytes, &Limits::default());
    assert_eq!(res, Ok(10_000));
    assert!(peak <= size + (4 << 10), "{peak} > {size}");
}

#[test]
fn a_million_none_values_are_refused_from_their_decoded_size() {
    // 3 MB of valid metadata: 1M `None` values, 3 bytes each on the wire and 332 bytes decoded (a
    // leaf, its tree node, its key path). It used to decode to 355 MB (pgt recv: 1.2 GB, 11 s of CPU
    // in a debug build); now the decoded size, 111 × the bytes, is refused before decoding.
    let (_, bytes) = encode_raw(&nones(1_000_000), false);
    assert_eq!(bytes.len(), 3_000_024);
    let t = Instant::now();
    let (res, peak) = decode_with_paths(&bytes, &Limits::default());
    assert_eq!(
        res,
        Err(Error::DecodedTooLarge {
            max: decoded_size_budget(bytes.len() as u64)
        })
    );
    assert!(peak < 16 << 10, "{peak}");
    eprintln!(
        "{} bytes refused in {:?}, peak heap {peak}",
        bytes.len(),
        t.elapsed()
    );
    assert!(t.elapsed() < quick(), "{:?}", t.elapsed());
    // 50,000 of them (150 KB, 16.6 MB decoded) fit in the 16 MiB every metadata may take beyond 64 × its
    // length.
    let (_, bytes) = encode_raw(&nones(50_000), false);
    let size = codec::decoded_size(&bytes).unwrap();
    assert_eq!(size, 50_000 * 332 + 24 + 8); // and the list's node, the two destinations
    let (res, peak) = decode_with_paths(&bytes, &Limits::default());
    assert_eq!(res, Ok(50_000));
    assert!(peak <= size + (4 << 10), "{peak} > {size}");
    // A sender refuses what receivers would.
    let limits = Limits::default();
    let manifest = Manifest::new(nones(1_000_000), false, &limits).unwrap();
    assert!(matches!(
        codec::encode(&manifest, TRANSFER_ID),
        Err(Error::DecodedTooLarge { .. })
    ));
}

/// Raw metadata bytes: `prefix()`, a one-leaf tree, a float64 tensor leaf of one element whose shape
/// has `ndim` dims of 1 (and its stride at most 64).
fn tensor_of_ndim(ndim: u64) -> Vec<u8> {
    let mut b = prefix();
    b.extend([1, 3, 1, 1, 0]);
    varint(ndim, &mut b);
    b.resize(b.len() + ndim as usize, 1);
    varint(ndim.min(64), &mut b);
    b.resize(b.len() + ndim.min(64) as usize, 1);
    b.extend([0, 8]);
    b
}

#[test]
fn thirty_million_dims_are_refused_before_they_are_decoded() {
    // 30 MB: one shape of 30M dims, decoded (263 MB) before the 64-dims check. Its length is checked
    // as soon as it is read.
    let bytes = tensor_of_ndim(30_000_000);
    let t = Instant::now();
    let (res, peak) = decode_raw(&bytes, &Limits::default());
    assert_eq!(
        res.err(),
        Some(Error::TooManyDims {
            ndim: 30_000_000,
            max: 64
        })
    );
    assert!(peak < 16 << 10, "{peak}");
    eprintln!(
        "{} bytes refused in {:?}, peak heap {peak}",
        bytes.len(),
        t.elapsed()
    );
    assert!(t.elapsed() < quick(), "{:?}", t.elapsed());
    // 64 dims are fine, 65 are not; the tools' raw decode has no limit.
    assert!(decode_raw(&tensor_of_ndim(64), &Limits::default())
        .0
        .is_ok());
    let bytes = tensor_of_ndim(65);
    assert_eq!(
        decode_raw(&bytes, &Limits::default()).0.err(),
        Some(Error::TooManyDims { ndim: 65, max: 64 })
    );
    assert!(codec::decode_metadata(&bytes).is_ok());
}

#[test]
fn every_dims_list_is_checked_when_its_length_is_read() {
    // Each list that holds one entry per tensor or mesh dim, 65 long (valid metadata has at most
    // max_ndim): refused from its length, before any other check (even NoDestinations).
    let long = vec![1u64; 65];
    let mut cases: Vec<(&str, Leaf)> = Vec::new();
    let mut layout = TensorLayout::contiguous(DType::Float32, &[2]);
    layout.stride = long.clone();
    cases.push(("stride", Leaf::Tensor(layout)));
    let Leaf::DTensor { local, spec } = dtensor_leaf() else {
        unreachable!()
    };
    type Edit = fn(&mut pgt_core::dtensor::DTensorSpec, &[u64]);
    let edits: [(&str, Edit); 6] = [
        ("mesh shape", |s, l| s.mesh.shape = l.to_vec()),
        ("dim names", |s, l| {
            s.mesh.dim_names = Some(l.iter().map(|_| String::new()).collect())
        }),
        ("placements", |s, l| {
            s.placements = l
                .iter()
                .map(|_| pgt_core::dtensor::Placement::Replicate)
                .collect()
        }),
        ("global shape", |s, l| s.global_shape = l.to_vec()),
        ("global stride", |s, l| s.global_stride = l.to_vec()),
        ("local shape", |_, _| ()),
    ];
    for (what, edit) in edits {
        let (mut local, mut spec) = (local.clone(), spec.clone());
        edit(&mut spec, &long);
        if what == "local shape" {
            local.shape = long.clone();
        }
        cases.push((what, Leaf::DTensor { local, spec }));
    }
    let Leaf::Sharded {
        local_shards,
        global,
    } = sharded_leaf()
    else {
        unreachable!()
    };
    for what in [
        "local offsets",
        "local sizes",
        "global offsets",
        "global size",
    ] {
        let (mut local_shards, mut global) = (local_shards.clone(), global.clone());
        match what {
            "local offsets" => local_shards[0].meta.offsets = long.clone(),
            "local sizes" => local_shards[0].meta.sizes = long.clone(),
            "global offsets" => global.shards[1].offsets = long.clone(),
            _ => global.global_size = long.clone(),
        }
        cases.push((
            what,
            Leaf::Sharded {
                local_shards,
                global,
            },
        ));
    }
    for (what, leaf) in cases {
        let mut m = single("t", leaf);
        m.destinations.clear();
        assert_eq!(
            round_trip(&m, &Limits::default()).err(),
            Some(Error::TooManyDims { ndim: 65, max: 64 }),
            "{what}"
        );
        let (_, bytes) = encode_raw(&m, false);
        assert!(codec::decode_metadata(&bytes).is_ok(), "{what}");
    }
}

#[test]
fn the_decoded_size_is_what_decoding_takes() {
    // For accepted metadata of every shape, decoding, validating and building the key paths take what
    // the decoded size says (the cost model is pgt-core's 64-bit memory layout), within 4 KiB: so the
    // budget, 64 × the length + 16 MiB, bounds the peak heap.
    let wide = {
        let n = 100_000;
        let mut tree = vec![Node::Dict(
            (0..n).map(|i| Key::Str(format!("layer.{i}.w"))).collect(),
        )];
        tree.extend(std::iter::repeat_n(Node::Leaf, n));
        let leaves = (0..n)
            .map(|i| Leaf::Tensor(TensorLayout::contiguous(DType::Float16, &[i as u64 % 7, 3])))
            .collect();
        metadata(tree, leaves)
    };
    let ints = {
        let n = 100_000;
        let mut tree = vec![
            Node::Dict(vec![Key::Str("param_groups".into())]),
            Node::List(1),
            Node::Dict(vec![Key::Str("params".into()), Key::Int(-1)]),
            Node::List(n as u64),
        ];
        tree.extend(std::iter::repeat_n(Node::Leaf, n + 1));
        let mut leaves: Vec<Leaf> = (0..n)
            .map(|i| Leaf::Value(Value::Int(i as i128 * 977)))
            .collect();
        leaves.push(Leaf::Value(Value::Bytes(vec![7; 1000])));
        metadata(tree, leaves)
    };
    let mut two_d = vec![dtensor_leaf(), dtensor_leaf_2d(), sharded_leaf()];
    two_d.extend((0..1000).map(|i| Leaf::Value(Value::Str(format!("v{i}")))));
    let mut tree = vec![Node::Tuple(two_d.len() as u64)];
    tree.extend(std::iter::repeat_n(Node::Leaf, two_d.len()));
    let cases = [
        ("sample", sample()),
        (
            "reference",
            pgt_core::reference::reference_metadata(0, vec![1], PlanParams::default()),
        ),
        ("wide dict", wide),
        ("ints", ints),
        ("distributed", metadata(tree, two_d)),
        ("deep", deep_lists(64, 1000)),
        (
            "bytes",
            single("b", Leaf::Value(Value::Bytes(vec![9; 3_000_000]))),
        ),
    ];
    for (what, m) in cases {
        let (_, bytes) = encode_raw(&m, false);
        let size = codec::decoded_size(&bytes).unwrap();
        assert!(size <= decoded_size_budget(bytes.len() as u64), "{what}");
        let (res, peak) = decode_with_paths(&bytes, &Limits::default());
        assert_eq!(res, Ok(m.leaves.len()), "{what}");
        // serde grows a list of more than 1 MiB by doubling: while the 3 MB value is decoded it takes
        // 4 MiB (then gives the rest back).
        let growing = if what == "bytes" {
            (4 << 20) - 3_000_000
        } else {
            0
        };
        assert!(
            peak <= size + growing + (4 << 10) && peak + (peak >> 3) >= size,
            "{what}: peak heap {peak}, decoded size {size}"
        );
        eprintln!(
            "{what}: {} bytes, decoded size {size} ({:.1} ×), peak heap {peak}",
            bytes.len(),
            size as f64 / bytes.len() as f64
        );
    }
}

#[test]
fn the_scan_fails_where_postcard_fails() {
    // Every truncation and many one-byte edits of metadata with every kind of value: the scan (which
    // applies the caps before decoding) reports exactly what postcard's decoder of the schema reports.
    let mut m = sample();
    m.leaves[2] = dtensor_leaf_2d();
    let (_, bytes) = encode_raw(&m, false);
    let reference = |b: &[u8]| match postcard::take_from_bytes::<Metadata>(b) {
        Ok((m, [])) => Ok(m),
        Ok((_, rest)) => Err(Error::TrailingBytes {
            count: rest.len() as u64,
        }),
        Err(postcard::Error::DeserializeUnexpectedEnd) => Err(Error::TruncatedMetadata),
        Err(_) => Err(Error::MalformedMetadata),
    };
    let mut checked = 0;
    let mut check = |b: &[u8]| {
        assert_eq!(codec::decode_metadata(b), reference(b), "{b:02x?}");
        checked += 1;
    };
    for n in 0..=bytes.len() {
        check(&bytes[..n]);
    }
    let mut b = bytes.clone();
    b.push(0);
    check(&b);
    for i in 0..bytes.len() {
        for v in [
            0x00, 0x01, 0x02, 0x05, 0x0F, 0x10, 0x13, 0x14, 0x7F, 0x80, 0xC0, 0xFF,
        ] {
            let mut b = bytes.clone();
            b[i] = v;
            check(&b);
            // An inserted continuation byte makes a varint non-minimal, or too long.
            let mut b = bytes.clone();
            b.insert(i, v | 0x80);
            check(&b);
        }
    }
    assert!(checked > 5000);
}

// ---------------------------------------------------------------- ShardedTensor width

#[test]
fn sharded_tensor_with_many_shards_validates_in_n_log_n() {
    // A 1-D global tensor of 40,000 elements in 20,000 shards of 2; the sender holds every other one.
    let n = 20_000u64;
    let shards: Vec<ShardMetadata> = (0..n)
        .map(|i| ShardMetadata {
            offsets: vec![2 * i],
            sizes: vec![2],
            placement: format!("rank:{}/cuda:{}", i % 8, i % 8),
        })
        .collect();
    let local_shards: Vec<LocalShard> = shards
        .iter()
        .step_by(2)
        .map(|meta| LocalShard {
            layout: TensorLayout::contiguous(DType::Float32, &[2]),
            meta: meta.clone(),
        })
        .collect();
    let leaf = Leaf::Sharded {
        local_shards,
        global: ShardedTensorMetadata {
            shards,
            global_size: vec![2 * n],
            dtype: DType::Float32,
        },
    };
    let m = single("table", leaf);
    let manifest = round_trip(&m, &Limits::default()).unwrap();
    assert_eq!(manifest.storages().len(), (n / 2) as usize);
    // The whole transfer, including the receiver's placement rewrite at finish.
    for received in transfer(m, true) {
        let Leaf::Sharded {
            local_shards,
            global,
        } = &received.leaves[0]
        else {
            panic!("a sharded leaf")
        };
        assert_eq!(local_shards.len(), (n / 2) as usize);
        let rank = received.bindings.len();
        assert_eq!(rank, (n / 2) as usize);
        assert!(global.shards[1].placement.starts_with("rank:1/"));
        assert!(local_shards[0].meta.placement.starts_with("rank:"));
    }
}

// ---------------------------------------------------------------- plan size

#[test]
fn too_many_messages_is_counted_not_walked() {
    // One 16 TiB storage (the default max_total_bytes) in 64-byte chunks is 2^38 messages: counting
    // them one by one would never finish; the count must be arithmetic.
    let mut m = single(
        "huge",
        Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[1 << 44])),
    );
    m.plan = PlanParams {
        fanout: FanOut::Chain,
        bucket_size: 64,
        chunk_size: 64,
    };
    let (res, peak) = peak_heap(|| round_trip(&m, &Limits::default()));
    assert_eq!(
        res.err(),
        Some(Error::TooManyMessages {
            count: 1 << 38,
            max: 1 << 20
        })
    );
    assert!(peak < MIB, "{peak}");
    // Many buckets: 2^20 one-byte-over-half storages, each in its own bucket.
    let n = 1u64 << 16;
    let mut tree = vec![Node::List(n)];
    tree.extend(std::iter::repeat_n(Node::Leaf, n as usize));
    let leaf = Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[33]));
    let mut m = metadata(tree, vec![leaf; n as usize]);
    m.plan = PlanParams {
        fanout: FanOut::Direct,
        bucket_size: 64,
        chunk_size: 64,
    };
    let tight = Limits {
        max_messages: n - 1,
        ..Limits::default()
    };
    assert_eq!(
        round_trip(&m, &tight).err(),
        Some(Error::TooManyMessages {
            count: n,
            max: n - 1
        })
    );
}

#[test]
fn count_data_messages_agrees_with_the_plan() {
    // Mixed bucketed, chunked and empty storages; the arithmetic count equals the built plan.
    let sizes = [0u64, 10, 64, 65, 200, 1, 63, 0, 1000, 64, 129];
    let mut tree = vec![Node::List(sizes.len() as u64)];
    tree.extend(std::iter::repeat_n(Node::Leaf, sizes.len()));
    let leaves: Vec<Leaf> = sizes
        .iter()
        .map(|&s| Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[s])))
        .collect();
    for (bucket_size, chunk_size) in [(0, 64), (64, 64), (100, 128), (128, 128), (0, 1 << 30)] {
        let mut m = metadata(tree.clone(), leaves.clone());
        m.plan = PlanParams {
            fanout: FanOut::Chain,
            bucket_size,
            chunk_size,
        };
        let manifest = round_trip(&m, &Limits::default()).unwrap();
        let p = manifest.plan(1);
        assert_eq!(p, Plan::new(&sizes, m.plan, false, 1));
        assert_eq!(
            plan::count_data_messages(sizes.iter().copied(), m.plan),
            p.data_messages().len() as u64
        );
        // Every storage's bytes are covered once, in order.
        let mut covered = vec![0u64; sizes.len()];
        for msg in &p.messages()[p.data_messages()] {
            let segs = p.segments(msg);
            // The 8-byte prefix, then the segments' bytes.
            assert_eq!(8 + segs.iter().map(|s| s.len).sum::<u64>(), msg.len);
            assert!(msg.len <= 8 + chunk_size.max(bucket_size));
            for s in segs {
                assert_eq!(covered[s.storage as usize], s.offset);
                covered[s.storage as usize] += s.len;
                // The segment that ends its storage, and only that one, says so.
                assert_eq!(
                    s.completes,
                    covered[s.storage as usize] == sizes[s.storage as usize]
                );
            }
        }
        assert_eq!(covered, sizes);
    }
}

#[test]
fn many_leaves_over_the_limit_are_refused() {
    let n = 1000;
    let mut tree = vec![Node::List(n)];
    tree.extend(std::iter::repeat_n(Node::Leaf, n as usize));
    let m = metadata(tree, vec![Leaf::Value(Value::None); n as usize]);
    let tight = Limits {
        max_leaves: n - 1,
        ..Limits::default()
    };
    assert_eq!(
        round_trip(&m, &tight).err(),
        Some(Error::TooManyLeaves {
            count: n,
            max: n - 1
        })
    );
}
