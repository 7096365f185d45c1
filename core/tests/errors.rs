//! One test per validation error that untrusted input (header, metadata, receiver calls) can trigger,
//! each with crafted input and the exact error value expected.

mod common;

use common::*;
use pgt_core::codec;
use pgt_core::dtensor::Placement;
use pgt_core::dtype::DType;
use pgt_core::engine::ReceiveEngine;
use pgt_core::header::{Header, Limits, MAGIC, VERSION};
use pgt_core::layout::TensorLayout;
use pgt_core::plan::MessageKind;
use pgt_core::receiver::{InPlace, Receiver, ReceiverOptions, RecvPoll};
use pgt_core::schema::Metadata;
use pgt_core::schema::{FanOut, PlanParams};
use pgt_core::sender::{SendPoll, Sender};
use pgt_core::sharded::LocalShard;
use pgt_core::tree::{Key, Leaf, Node, Value};
use pgt_core::{Call, Error};

fn limits() -> Limits {
    Limits::default()
}

/// Encodes `meta` (unvalidated) and decodes it under the default limits, expecting `err`.
#[track_caller]
fn rejects(meta: Metadata, err: Error) {
    assert_eq!(round_trip(&meta, &limits()), Err(err));
}

/// Like [`rejects`] with tightened limits.
#[track_caller]
fn rejects_under(meta: Metadata, limits: Limits, err: Error) {
    assert_eq!(round_trip(&meta, &limits), Err(err));
}

fn tensor(dtype: DType, shape: &[u64], stride: &[u64], offset: u64, nbytes: u64) -> Leaf {
    Leaf::Tensor(TensorLayout {
        dtype,
        shape: shape.to_vec(),
        stride: stride.to_vec(),
        storage_offset: offset,
        nbytes,
    })
}

fn valid_header() -> [u8; Header::SIZE] {
    let (_, bytes) = encode_raw(&sample(), true);
    header_for(&bytes, true)
}

#[test]
fn the_sample_is_valid() {
    let m = round_trip(&sample(), &limits()).unwrap();
    let paths: Vec<String> = m.paths().iter().map(ToString::to_string).collect();
    assert_eq!(
        paths,
        [
            "['model']['layers'][0]['weight']",
            "['model']['layers'][0]['bias']",
            "['model']['emb']",
            "['model']['table']",
            "['step']",
            "['lr']",
            "['name']",
            "['extra'][0]",
            "['extra'][1]",
            "['extra'][2]",
            "[3]"
        ]
    );
    assert_eq!(m.storages().len(), 5);
}

// ---------------------------------------------------------------- header

#[test]
fn header_length() {
    let h = valid_header();
    assert_eq!(
        Header::parse(&h[..31], &limits()),
        Err(Error::HeaderLength { got: 31 })
    );
    let mut long = h.to_vec();
    long.push(0);
    assert_eq!(
        Header::parse(&long, &limits()),
        Err(Error::HeaderLength { got: 33 })
    );
    // Too short to hold magic and version.
    assert_eq!(
        Header::parse(&h[..5], &limits()),
        Err(Error::HeaderLength { got: 5 })
    );
    assert_eq!(
        Header::parse(&[], &limits()),
        Err(Error::HeaderLength { got: 0 })
    );
}

#[test]
fn bad_magic() {
    for i in 0..MAGIC.len() {
        let mut h = valid_header();
        h[i] ^= 0x20;
        assert_eq!(Header::parse(&h, &limits()), Err(Error::BadMagic));
    }
}

#[test]
fn unsupported_version() {
    for v in [0u16, 1, VERSION + 1, u16::MAX] {
        let mut h = valid_header();
        h[4..6].copy_from_slice(&v.to_le_bytes());
        assert_eq!(
            Header::parse(&h, &limits()),
            Err(Error::UnsupportedVersion { got: v })
        );
    }
    // A version-1 header (24 bytes, no transfer id) is named by its version, not its length.
    let mut v1 = valid_header()[..24].to_vec();
    v1[4..6].copy_from_slice(&1u16.to_le_bytes());
    assert_eq!(
        Header::parse(&v1, &limits()),
        Err(Error::UnsupportedVersion { got: 1 })
    );
}

#[test]
fn unknown_flags() {
    for flags in [2u16, 0x8001, u16::MAX] {
        let mut h = valid_header();
        h[6..8].copy_from_slice(&flags.to_le_bytes());
        assert_eq!(
            Header::parse(&h, &limits()),
            Err(Error::UnknownFlags { flags })
        );
    }
}

#[test]
fn metadata_too_large() {
    let mut h = valid_header();
    h[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_eq!(
        Header::parse(&h, &limits()),
        Err(Error::MetadataTooLarge {
            len: u64::MAX,
            max: 64 << 20
        })
    );
    // Tightened: the sample's real length is over a 16-byte cap.
    let (header, bytes) = encode_raw(&sample(), false);
    let tight = Limits {
        max_metadata_bytes: 16,
        ..limits()
    };
    assert_eq!(
        Header::parse(&header, &tight),
        Err(Error::MetadataTooLarge {
            len: bytes.len() as u64,
            max: 16
        })
    );
}

// ---------------------------------------------------------------- metadata message

#[test]
fn metadata_length() {
    // The metadata message is the 8-byte prefix and the postcard bytes.
    let (header, bytes) = encode_raw(&sample(), false);
    let n = bytes.len() as u64 + 8;
    assert_eq!(
        decode_bytes(&header, &bytes[..bytes.len() - 1], &limits()),
        Err(Error::MetadataLength {
            expected: n,
            got: n - 1
        })
    );
    let mut more = bytes.clone();
    more.push(0);
    assert_eq!(
        decode_bytes(&header, &more, &limits()),
        Err(Error::MetadataLength {
            expected: n,
            got: n + 1
        })
    );
    // Shorter than a prefix: a length error too.
    let h = Header::parse(&header, &limits()).unwrap();
    assert_eq!(
        codec::decode(&h, &message_for(&bytes)[..5], &limits()),
        Err(Error::MetadataLength {
            expected: n,
            got: 5
        })
    );
}

#[test]
fn metadata_of_another_transfer() {
    // The prefix is checked first: a stale or foreign metadata message is named as such, whatever
    // its length.
    let (header, bytes) = encode_raw(&sample(), false);
    let h = Header::parse(&header, &limits()).unwrap();
    let mut other = message_for(&bytes);
    other[0] ^= 1;
    other.push(0);
    assert_eq!(
        codec::decode(&h, &other, &limits()),
        Err(Error::TransferMismatch {
            message: 1,
            expected: TRANSFER_ID,
            got: TRANSFER_ID ^ 1
        })
    );
}

#[test]
fn metadata_digest() {
    let (header, mut bytes) = encode_raw(&sample(), false);
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    assert_eq!(
        decode_bytes(&header, &bytes, &limits()),
        Err(Error::MetadataDigest)
    );
    // The digest field itself altered.
    let (mut header, bytes) = encode_raw(&sample(), false);
    header[16] ^= 1;
    assert_eq!(
        decode_bytes(&header, &bytes, &limits()),
        Err(Error::MetadataDigest)
    );
}

/// Decodes raw metadata bytes behind a header that matches them (so only the codec can object).
fn decode_raw(bytes: &[u8]) -> Result<pgt_core::manifest::Manifest, Error> {
    decode_bytes(&header_for(bytes, false), bytes, &limits())
}

#[test]
fn truncated_metadata() {
    assert_eq!(decode_raw(&[]), Err(Error::TruncatedMetadata));
    let (_, bytes) = encode_raw(&sample(), false);
    for cut in [1, bytes.len() / 2, bytes.len() - 1] {
        assert_eq!(
            decode_raw(&bytes[..cut]),
            Err(Error::TruncatedMetadata),
            "cut {cut}"
        );
        assert_eq!(
            codec::decode_metadata(&bytes[..cut]),
            Err(Error::TruncatedMetadata)
        );
    }
}

#[test]
fn malformed_metadata() {
    // Option tag 2.
    assert_eq!(decode_raw(&[2]), Err(Error::MalformedMetadata));
    // Node enum tag 9 (there are 4 kinds).
    let mut b = prefix();
    b.extend([1, 9]);
    assert_eq!(decode_raw(&b), Err(Error::MalformedMetadata));
    // A dict key that is not UTF-8.
    let mut b = prefix();
    b.extend([1, 0, 1, 0, 2, 0xC3, 0x28]);
    assert_eq!(decode_raw(&b), Err(Error::MalformedMetadata));
    // A bool value of 2: tree [Leaf], leaves [Value(Bool(2))].
    let mut b = prefix();
    b.extend([1, 3, 1, 0, 1, 2]);
    assert_eq!(decode_raw(&b), Err(Error::MalformedMetadata));
    // A varint of 11 continuation bytes for the source.
    let mut b = vec![0];
    b.extend([0xFF; 11]);
    assert_eq!(decode_raw(&b), Err(Error::MalformedMetadata));
    // A u32 source that does not fit 32 bits.
    let b = [0, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F];
    assert_eq!(decode_raw(&b), Err(Error::MalformedMetadata));
    // The same checks without the header.
    assert_eq!(codec::decode_metadata(&[2]), Err(Error::MalformedMetadata));
}

#[test]
fn trailing_bytes() {
    let (_, mut bytes) = encode_raw(&sample(), false);
    bytes.extend([0, 0, 7]);
    assert_eq!(decode_raw(&bytes), Err(Error::TrailingBytes { count: 3 }));
    assert_eq!(
        codec::decode_metadata(&bytes),
        Err(Error::TrailingBytes { count: 3 })
    );
}

// ---------------------------------------------------------------- limits

#[test]
fn too_many_leaves() {
    let tight = Limits {
        max_leaves: 3,
        ..limits()
    };
    rejects_under(sample(), tight, Error::TooManyLeaves { count: 11, max: 3 });
    // The announced count is checked before any leaf is decoded: 2^40 leaves announced, none sent.
    let (_, mut bytes) = encode_raw(&metadata(vec![Node::List(0)], vec![]), false);
    assert_eq!(bytes.pop(), Some(0));
    bytes.extend([0x80, 0x80, 0x80, 0x80, 0x80, 0x20]);
    assert_eq!(
        decode_raw(&bytes),
        Err(Error::TooManyLeaves {
            count: 1 << 40,
            max: 4 << 20
        })
    );
    // Exactly at the limit passes.
    let at = Limits {
        max_leaves: 11,
        ..limits()
    };
    round_trip(&sample(), &at).unwrap();
}

#[test]
fn tree_too_deep() {
    let tight = Limits {
        max_depth: 4,
        ..limits()
    };
    round_trip(&nested_lists(4), &tight).unwrap();
    rejects_under(nested_lists(5), tight, Error::TreeTooDeep { max: 4 });
    rejects(nested_lists(65), Error::TreeTooDeep { max: 64 });
    // Empty containers count too: [{}] is two deep.
    let m = metadata(vec![Node::List(1), Node::Dict(vec![])], vec![]);
    let flat = Limits {
        max_depth: 1,
        ..limits()
    };
    rejects_under(m, flat, Error::TreeTooDeep { max: 1 });
}

#[test]
fn too_many_dims() {
    let tight = Limits {
        max_ndim: 2,
        ..limits()
    };
    let t = Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[1, 2, 3]));
    rejects_under(
        single("t", t),
        tight,
        Error::TooManyDims { ndim: 3, max: 2 },
    );
    // A DTensor whose mesh has too many dims.
    rejects_under(
        dtensor_with(|_, s| s.mesh.shape = vec![1, 1, 2]),
        tight,
        Error::TooManyDims { ndim: 3, max: 2 },
    );
    // A DTensor whose global shape has too many dims (local and mesh are fine).
    rejects_under(
        dtensor_with(|_, s| s.global_shape = vec![4, 4, 1]),
        tight,
        Error::TooManyDims { ndim: 3, max: 2 },
    );
    // A ShardedTensor whose global size has too many dims.
    rejects_under(
        sharded_with(|_, g| g.global_size = vec![4, 2, 1]),
        tight,
        Error::TooManyDims { ndim: 3, max: 2 },
    );
    // The default limit: 65 dims.
    let t = Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[1; 65]));
    rejects(single("t", t), Error::TooManyDims { ndim: 65, max: 64 });
}

#[test]
fn total_bytes_too_large() {
    // The sample's storages: 48 + 8 + 32 + 32 + 24 = 144 bytes.
    let at = Limits {
        max_total_bytes: 144,
        ..limits()
    };
    assert_eq!(round_trip(&sample(), &at).unwrap().total_bytes(), 144);
    let tight = Limits {
        max_total_bytes: 143,
        ..limits()
    };
    rejects_under(sample(), tight, Error::TotalBytesTooLarge { max: 143 });
    // Storages whose sum overflows u64 are rejected, not wrapped.
    let big = tensor(DType::UInt8, &[1], &[1], 0, u64::MAX);
    let m = metadata(
        vec![Node::List(2), Node::Leaf, Node::Leaf],
        vec![big.clone(), big],
    );
    let unlimited = Limits {
        max_total_bytes: u64::MAX,
        ..limits()
    };
    rejects_under(m, unlimited, Error::TotalBytesTooLarge { max: u64::MAX });
}

#[test]
fn too_many_messages() {
    // 1 KiB in chunks of 64 bytes: 16 data messages.
    let mut m = single(
        "t",
        Leaf::Tensor(TensorLayout::contiguous(DType::UInt8, &[1024])),
    );
    m.plan = PlanParams {
        fanout: FanOut::Direct,
        bucket_size: 64,
        chunk_size: 64,
    };
    let at = Limits {
        max_messages: 16,
        ..limits()
    };
    round_trip(&m, &at).unwrap();
    let tight = Limits {
        max_messages: 15,
        ..limits()
    };
    rejects_under(m, tight, Error::TooManyMessages { count: 16, max: 15 });
}

// ---------------------------------------------------------------- tree

#[test]
fn truncated_tree() {
    rejects(metadata(vec![], vec![]), Error::TruncatedTree);
    rejects(
        metadata(
            vec![Node::Dict(vec![key("a"), key("b")]), Node::Leaf],
            vec![Leaf::Value(Value::None)],
        ),
        Error::TruncatedTree,
    );
    rejects(
        metadata(
            vec![Node::Tuple(u64::MAX), Node::Leaf],
            vec![Leaf::Value(Value::None)],
        ),
        Error::TruncatedTree,
    );
}

#[test]
fn trailing_tree_nodes() {
    rejects(
        metadata(
            vec![Node::Leaf, Node::Leaf],
            vec![Leaf::Value(Value::None), Leaf::Value(Value::None)],
        ),
        Error::TrailingTreeNodes,
    );
    rejects(
        metadata(vec![Node::List(0), Node::List(0)], vec![]),
        Error::TrailingTreeNodes,
    );
}

#[test]
fn duplicate_key() {
    let none = || Leaf::Value(Value::None);
    rejects(
        metadata(
            vec![
                Node::Dict(vec![key("a"), key("b"), key("a")]),
                Node::Leaf,
                Node::Leaf,
                Node::Leaf,
            ],
            vec![none(), none(), none()],
        ),
        Error::DuplicateKey,
    );
    rejects(
        metadata(
            vec![
                Node::Dict(vec![Key::Int(-1), Key::Int(-1)]),
                Node::Leaf,
                Node::Leaf,
            ],
            vec![none(), none()],
        ),
        Error::DuplicateKey,
    );
    // "1" and 1 are different keys; the same key in two different dicts is fine.
    round_trip(
        &metadata(
            vec![
                Node::Dict(vec![key("1"), Key::Int(1)]),
                Node::Dict(vec![key("x")]),
                Node::Leaf,
                Node::Dict(vec![key("x")]),
                Node::Leaf,
            ],
            vec![none(), none()],
        ),
        &limits(),
    )
    .unwrap();
}

#[test]
fn key_paths_too_large() {
    // {<100-byte key>: [None; 11]}: 1,100 bytes of key text over the paths, from ~150 bytes of metadata.
    let leaves = 11;
    let mut tree = vec![Node::Dict(vec![key(&"k".repeat(100))]), Node::List(leaves)];
    tree.extend(std::iter::repeat_n(Node::Leaf, leaves as usize));
    let m = metadata(tree, vec![Leaf::Value(Value::None); leaves as usize]);
    let at = Limits {
        max_metadata_bytes: 275,
        ..limits()
    };
    round_trip(&m, &at).unwrap();
    let tight = Limits {
        max_metadata_bytes: 274,
        ..limits()
    };
    rejects_under(m, tight, Error::KeyPathsTooLarge { max: 1096 });
}

#[test]
fn leaf_count_mismatch() {
    let none = || Leaf::Value(Value::None);
    rejects(
        metadata(vec![Node::List(2), Node::Leaf, Node::Leaf], vec![none()]),
        Error::LeafCountMismatch { tree: 2, leaves: 1 },
    );
    rejects(
        metadata(vec![Node::Dict(vec![])], vec![none()]),
        Error::LeafCountMismatch { tree: 0, leaves: 1 },
    );
}

// ---------------------------------------------------------------- layouts

#[test]
fn stride_rank_mismatch() {
    rejects(
        single("t", tensor(DType::Float32, &[2, 2], &[2], 0, 16)),
        Error::StrideRankMismatch {
            shape: 2,
            stride: 1,
        },
    );
    // A DTensor's global stride.
    rejects(
        dtensor_with(|_, s| s.global_stride = vec![1]),
        Error::StrideRankMismatch {
            shape: 2,
            stride: 1,
        },
    );
}

#[test]
fn storage_not_whole_elements() {
    rejects(
        single("t", tensor(DType::Float32, &[1], &[1], 0, 6)),
        Error::StorageNotWholeElements {
            nbytes: 6,
            element_size: 4,
        },
    );
    rejects(
        single("t", tensor(DType::Complex128, &[0], &[1], 0, 8)),
        Error::StorageNotWholeElements {
            nbytes: 8,
            element_size: 16,
        },
    );
}

#[test]
fn view_out_of_bounds() {
    rejects(
        single("t", tensor(DType::Float32, &[4], &[1], 1, 16)),
        Error::ViewOutOfBounds {
            needed: 20,
            nbytes: 16,
        },
    );
    // A transposed view whose stride reaches past the storage.
    rejects(
        single("t", tensor(DType::Int16, &[3, 2], &[1, 4], 0, 8)),
        Error::ViewOutOfBounds {
            needed: 14,
            nbytes: 8,
        },
    );
    // A scalar with no storage at all.
    rejects(
        single("t", tensor(DType::Bool, &[], &[], 0, 0)),
        Error::ViewOutOfBounds {
            needed: 1,
            nbytes: 0,
        },
    );
}

#[test]
fn layout_overflow() {
    rejects(
        single("t", tensor(DType::UInt8, &[1 << 63, 3], &[2, 1], 0, 16)),
        Error::LayoutOverflow,
    );
    rejects(
        single("t", tensor(DType::Float64, &[2], &[1], u64::MAX / 4, 16)),
        Error::LayoutOverflow,
    );
    // numel overflows even though the stride arithmetic alone would not.
    rejects(
        single(
            "t",
            tensor(DType::UInt8, &[u64::MAX, u64::MAX], &[0, 0], 0, 1),
        ),
        Error::LayoutOverflow,
    );
    // A device mesh whose size overflows.
    rejects(
        dtensor_with(|_, s| s.mesh.shape = vec![u64::MAX, 2]),
        Error::LayoutOverflow,
    );
    // A shard whose offset + size overflows.
    rejects(
        sharded_with(|_, g| g.shards[0].offsets = vec![u64::MAX, 0]),
        Error::LayoutOverflow,
    );
    // A ShardedTensor whose global element count overflows (its shards fit inside it).
    rejects(
        sharded_with(|_, g| g.global_size = vec![1 << 32, 1 << 32]),
        Error::LayoutOverflow,
    );
}

#[test]
fn a_zero_dim_is_not_an_overflow() {
    // The true product counts: [2^32, 2^32, 0] has 0 elements, although multiplying in order overflows
    // before the 0 is reached.
    round_trip(
        &single(
            "t",
            tensor(
                DType::Float32,
                &[1 << 32, 1 << 32, 0],
                &[1 << 32, 1, 1],
                0,
                0,
            ),
        ),
        &limits(),
    )
    .unwrap();
    // Likewise a mesh: its size is 0, so the sample mesh's 2 ranks are too many (not LayoutOverflow).
    rejects(
        dtensor_with(|_, s| s.mesh.shape = vec![1 << 32, 1 << 32, 0]),
        Error::MeshRankCount {
            ranks: 2,
            mesh_size: 0,
        },
    );
}

// ---------------------------------------------------------------- DTensor

fn dtensor_with(
    f: impl FnOnce(&mut TensorLayout, &mut pgt_core::dtensor::DTensorSpec),
) -> Metadata {
    let Leaf::DTensor {
        mut local,
        mut spec,
    } = dtensor_leaf()
    else {
        unreachable!()
    };
    f(&mut local, &mut spec);
    single("d", Leaf::DTensor { local, spec })
}

#[test]
fn mesh_rank_count() {
    rejects(
        dtensor_with(|_, s| s.mesh.ranks = vec![0, 1, 2]),
        Error::MeshRankCount {
            ranks: 3,
            mesh_size: 2,
        },
    );
    rejects(
        dtensor_with(|_, s| s.mesh.shape = vec![2, 0]),
        Error::MeshRankCount {
            ranks: 2,
            mesh_size: 0,
        },
    );
    // The 2-dim sample mesh is valid.
    round_trip(&single("d", dtensor_leaf_2d()), &limits()).unwrap();
}

#[test]
fn mesh_dim_names() {
    rejects(
        dtensor_with(|_, s| s.mesh.dim_names = Some(vec!["dp".into(), "tp".into()])),
        Error::MeshDimNames {
            names: 2,
            mesh_ndim: 1,
        },
    );
    rejects(
        dtensor_with(|_, s| s.mesh.dim_names = Some(vec![])),
        Error::MeshDimNames {
            names: 0,
            mesh_ndim: 1,
        },
    );
}

#[test]
fn placement_count() {
    rejects(
        dtensor_with(|_, s| s.placements = vec![Placement::Replicate, Placement::Shard(0)]),
        Error::PlacementCount {
            placements: 2,
            mesh_ndim: 1,
        },
    );
    rejects(
        dtensor_with(|_, s| s.placements.clear()),
        Error::PlacementCount {
            placements: 0,
            mesh_ndim: 1,
        },
    );
}

#[test]
fn shard_dim_out_of_range() {
    rejects(
        dtensor_with(|_, s| s.placements = vec![Placement::Shard(2)]),
        Error::ShardDimOutOfRange { dim: 2, ndim: 2 },
    );
    rejects(
        dtensor_with(|_, s| s.placements = vec![Placement::Shard(u32::MAX)]),
        Error::ShardDimOutOfRange {
            dim: u32::MAX as u64,
            ndim: 2,
        },
    );
}

#[test]
fn local_shape_mismatch() {
    // DTensor: local rank differs from the global rank.
    rejects(
        dtensor_with(|l, _| *l = TensorLayout::contiguous(DType::Float32, &[2, 4, 1])),
        Error::LocalShapeMismatch,
    );
    // DTensor: local larger than global along a dim.
    rejects(
        dtensor_with(|l, _| *l = TensorLayout::contiguous(DType::Float32, &[8, 4])),
        Error::LocalShapeMismatch,
    );
    // ShardedTensor: the local layout's shape is not the shard's sizes.
    rejects(
        sharded_with(|l, _| l[0].layout = TensorLayout::contiguous(DType::Int64, &[2, 1])),
        Error::LocalShapeMismatch,
    );
}

#[test]
fn dtype_mismatch() {
    rejects(
        dtensor_with(|_, s| s.dtype = DType::Float16),
        Error::DTypeMismatch {
            local: DType::Float32,
            global: DType::Float16,
        },
    );
    rejects(
        sharded_with(|l, _| l[0].layout = TensorLayout::contiguous(DType::Int32, &[2, 2])),
        Error::DTypeMismatch {
            local: DType::Int32,
            global: DType::Int64,
        },
    );
}

// ---------------------------------------------------------------- ShardedTensor

fn sharded_with(
    f: impl FnOnce(&mut Vec<LocalShard>, &mut pgt_core::sharded::ShardedTensorMetadata),
) -> Metadata {
    let Leaf::Sharded {
        mut local_shards,
        mut global,
    } = sharded_leaf()
    else {
        unreachable!()
    };
    f(&mut local_shards, &mut global);
    single(
        "s",
        Leaf::Sharded {
            local_shards,
            global,
        },
    )
}

#[test]
fn shard_rank_mismatch() {
    rejects(
        sharded_with(|_, g| g.shards[0].offsets = vec![0]),
        Error::ShardRankMismatch,
    );
    rejects(
        sharded_with(|_, g| g.shards[1].sizes = vec![2, 2, 1]),
        Error::ShardRankMismatch,
    );
    rejects(
        sharded_with(|l, _| l[0].meta.offsets = vec![2]),
        Error::ShardRankMismatch,
    );
}

#[test]
fn shard_out_of_bounds() {
    rejects(
        sharded_with(|_, g| g.shards[0].offsets = vec![3, 0]),
        Error::ShardOutOfBounds { end: 5, global: 4 },
    );
    rejects(
        sharded_with(|l, _| l[0].meta.sizes = vec![2, 3]),
        Error::ShardOutOfBounds { end: 3, global: 2 },
    );
}

#[test]
fn bad_placement() {
    for p in [
        "cpu",
        "rank:/cpu",
        "rank:1",
        "rank:1/",
        "rank:x/cpu",
        "rank:-1/cpu",
        "rank:99999999999999999999/cpu",
    ] {
        rejects(
            sharded_with(|_, g| g.shards[0].placement = p.into()),
            Error::BadPlacement,
        );
        rejects(
            sharded_with(|l, _| l[0].meta.placement = p.into()),
            Error::BadPlacement,
        );
    }
}

#[test]
fn shard_not_in_global() {
    // A valid shard at offsets [1, 0] that the global metadata does not list.
    rejects(
        sharded_with(|l, _| l[0].meta.offsets = vec![1, 0]),
        Error::ShardNotInGlobal,
    );
}

// ---------------------------------------------------------------- plan parameters and destinations

#[test]
fn bad_chunk_size() {
    for chunk_size in [0, 32, 100, (1 << 30) + 64, u64::MAX] {
        let mut m = sample();
        m.plan = PlanParams {
            fanout: FanOut::Chain,
            bucket_size: 0,
            chunk_size,
        };
        rejects(m, Error::BadChunkSize { chunk_size });
    }
}

#[test]
fn bad_bucket_size() {
    let mut m = sample();
    m.plan = PlanParams {
        fanout: FanOut::Direct,
        bucket_size: (1 << 20) + 1,
        chunk_size: 1 << 20,
    };
    rejects(
        m,
        Error::BadBucketSize {
            bucket_size: (1 << 20) + 1,
            chunk_size: 1 << 20,
        },
    );
}

#[test]
fn no_destinations() {
    let mut m = sample();
    m.destinations.clear();
    rejects(m, Error::NoDestinations);
}

#[test]
fn duplicate_destination() {
    let mut m = sample();
    m.destinations = vec![1, 2, 3, 2];
    rejects(m, Error::DuplicateDestination { rank: 2 });
}

#[test]
fn source_is_destination() {
    let mut m = sample();
    m.destinations = vec![1, SOURCE];
    rejects(m, Error::SourceIsDestination { rank: SOURCE });
}

#[test]
fn the_sender_rejects_what_the_receiver_would() {
    let mut m = sample();
    m.destinations = vec![];
    assert_eq!(
        Sender::new(m, true, &limits(), TRANSFER_ID).err(),
        Some(Error::NoDestinations)
    );
}

// ---------------------------------------------------------------- receiver

fn receiver_with(options: ReceiverOptions, meta: &Metadata) -> Result<Receiver, Error> {
    let (header, bytes) = encode_raw(meta, true);
    let mut r = Receiver::new(options);
    r.handle_header(&header)?;
    r.handle_metadata(&message_for(&bytes))?;
    Ok(r)
}

#[test]
fn receiver_passes_header_and_codec_errors_through() {
    let mut r = Receiver::new(options(1));
    let mut h = valid_header();
    h[0] = b'X';
    assert_eq!(r.handle_header(&h), Err(Error::BadMagic));
    let (header, mut bytes) = encode_raw(&sample(), true);
    r.handle_header(&header).unwrap();
    bytes[3] ^= 0xFF;
    assert_eq!(
        r.handle_metadata(&message_for(&bytes)),
        Err(Error::MetadataDigest)
    );
}

#[test]
fn not_a_destination() {
    assert_eq!(
        receiver_with(options(5), &sample()).err(),
        Some(Error::NotADestination { rank: 5 })
    );
    // The source itself is not a destination either.
    assert_eq!(
        receiver_with(options(SOURCE), &sample()).err(),
        Some(Error::NotADestination { rank: SOURCE })
    );
}

#[test]
fn unexpected_source() {
    let opts = ReceiverOptions {
        source: 9,
        ..options(1)
    };
    assert_eq!(
        receiver_with(opts, &sample()).err(),
        Some(Error::UnexpectedSource {
            expected: 9,
            got: SOURCE
        })
    );
}

#[test]
fn step_mismatch() {
    let opts = ReceiverOptions {
        expected_step: Some(8),
        ..options(1)
    };
    assert_eq!(
        receiver_with(opts, &sample()).err(),
        Some(Error::StepMismatch {
            expected: Some(8),
            got: Some(7)
        })
    );
    let mut m = sample();
    m.step = None;
    assert_eq!(
        receiver_with(opts, &m).err(),
        Some(Error::StepMismatch {
            expected: Some(8),
            got: None
        })
    );
    // No expectation accepts any step.
    receiver_with(options(1), &m).unwrap();
}

/// Binds storage `storage` in place (and every other storage fresh).
fn bind(r: &mut Receiver, storage: u32, id: u64, dtype: DType, nbytes: u64) -> Result<(), Error> {
    r.finish_bindings(&[InPlace {
        storage,
        id,
        dtype,
        nbytes,
    }])
    .map(|_| ())
}

#[test]
fn in_place_size_mismatch() {
    let mut r = receiver_at_bindings(sample(), true, 1);
    // Storage 0 is model.layers.0.weight, float32 [3, 4]: 48 bytes.
    assert_eq!(
        bind(&mut r, 0, 10, DType::Float32, 44),
        Err(Error::InPlaceSizeMismatch {
            path: "['model']['layers'][0]['weight']".into(),
            expected: 48,
            got: 44
        })
    );
    // Cast on receive to bfloat16: 24 bytes.
    assert_eq!(
        bind(&mut r, 0, 10, DType::BFloat16, 48),
        Err(Error::InPlaceSizeMismatch {
            path: "['model']['layers'][0]['weight']".into(),
            expected: 24,
            got: 48
        })
    );
    // Storage 4 is the int-keyed transposed float16 view: path "3".
    assert_eq!(
        bind(&mut r, 4, 11, DType::Float16, 0),
        Err(Error::InPlaceSizeMismatch {
            path: "[3]".into(),
            expected: 24,
            got: 0
        })
    );
    // A refused binding leaves the receiver binding: the right one still works.
    bind(&mut r, 0, 10, DType::BFloat16, 24).unwrap();
    assert_eq!(r.bindings()[0].cast_from, Some(DType::Float32));
}

#[test]
fn in_place_dtype_mismatch() {
    let mut r = receiver_at_bindings(sample(), true, 2);
    assert_eq!(
        bind(&mut r, 0, 1, DType::Int32, 48),
        Err(Error::InPlaceDTypeMismatch {
            path: "['model']['layers'][0]['weight']".into(),
            incoming: DType::Float32,
            destination: DType::Int32
        })
    );
    // Storage 3 is the sharded int64 table: never cast, even to float64 of the same size.
    assert_eq!(
        bind(&mut r, 3, 1, DType::Float64, 32),
        Err(Error::InPlaceDTypeMismatch {
            path: "['model']['table']".into(),
            incoming: DType::Int64,
            destination: DType::Float64
        })
    );
}

/// Binds fresh destinations and receives every data message, until the trailer is polled. Returns
/// the data messages (to report their digests) and the trailer's message index.
fn stream_to_trailer(r: &mut Receiver) -> (Vec<u32>, u32) {
    r.finish_bindings(&[]).unwrap();
    let mut data = Vec::new();
    loop {
        let (m, kind) = match r.poll() {
            RecvPoll::Recv(op) => (op.message, op.kind),
            RecvPoll::Forward(f) => {
                let m = f.message;
                r.handle_forwarded(m).unwrap();
                continue;
            }
            other => panic!("unexpected {other:?}"),
        };
        match kind {
            MessageKind::Data => {
                r.handle_data(m).unwrap();
                data.push(m);
            }
            MessageKind::Trailer => return (data, m),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The fake digests data message `m` completes, in segment order.
fn fake_digests(r: &Receiver, m: u32) -> Vec<u64> {
    let plan = r.plan().unwrap();
    plan.segments(&plan.messages()[m as usize])
        .iter()
        .filter(|s| s.completes)
        .map(|s| fake_digest(s.storage))
        .collect()
}

/// Reports the fake digests of every data message except the one holding storage `skip`'s last byte,
/// and returns the matching trailer (every storage's fake digest).
fn report_digests_except(r: &mut Receiver, data: &[u32], skip: Option<u32>) -> Vec<u8> {
    for &m in data {
        let plan = r.plan().unwrap();
        let completes = plan.segments(&plan.messages()[m as usize]);
        if skip.is_some_and(|k| completes.iter().any(|s| s.completes && s.storage == k)) {
            continue;
        }
        let d = fake_digests(r, m);
        r.handle_digests(m, &d).unwrap();
    }
    let manifest = r.manifest().unwrap();
    let digests: Vec<u64> = manifest
        .storages()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            if s.nbytes > 0 {
                fake_digest(i as u32)
            } else {
                pgt_core::digest::digest(&[])
            }
        })
        .collect();
    trailer_for(manifest.metadata(), &digests)
}

#[test]
fn trailer_length() {
    let mut r = receiver_at_bindings(sample(), true, 2);
    let (data, _) = stream_to_trailer(&mut r);
    let trailer = report_digests_except(&mut r, &data, None);
    // The prefix, the metadata digest, 5 storage digests.
    assert_eq!(trailer.len(), 56);
    assert_eq!(
        r.handle_trailer(&trailer[..55]),
        Err(Error::TrailerLength {
            expected: 56,
            got: 55
        })
    );
    assert_eq!(
        r.handle_trailer(&[]),
        Err(Error::TrailerLength {
            expected: 56,
            got: 0
        })
    );
    // Another transfer's trailer (whatever its length), or one for other metadata.
    let mut other = trailer.clone();
    other[7] ^= 0x80;
    other.truncate(20);
    assert_eq!(
        r.handle_trailer(&other),
        Err(Error::TransferMismatch {
            message: r.plan().unwrap().messages().len() as u64 - 1,
            expected: TRANSFER_ID,
            got: TRANSFER_ID ^ (0x80 << 56)
        })
    );
    let mut other = trailer.clone();
    other[8] ^= 1;
    assert_eq!(r.handle_trailer(&other), Err(Error::TrailerMetadataDigest));
    // The right one still completes the transfer.
    r.handle_trailer(&trailer).unwrap();
    assert_eq!(r.poll(), RecvPoll::Done);
    // What a driver asks before finishing: nothing for `finish` to refuse.
    assert_eq!(ReceiveEngine::has_digest_mismatch(&mut r), Ok(false));
    r.finish().unwrap();
}

#[test]
fn digest_mismatch_from_the_trailer() {
    let mut r = receiver_at_bindings(sample(), true, 1);
    let (data, _) = stream_to_trailer(&mut r);
    let mut trailer = report_digests_except(&mut r, &data, None);
    // Storage 2 is model.emb (the DTensor), after the prefix and the metadata digest.
    trailer[16 + 2 * 8] ^= 1;
    let want = Error::DigestMismatch {
        path: "['model']['emb']".into(),
        storage: 2,
    };
    // The mismatch is kept, not returned at once, so that a chain receiver still forwards everything;
    // the result is never yielded.
    r.handle_trailer(&trailer).unwrap();
    assert_eq!(r.digest_mismatch(), Some(&want));
    assert_eq!(ReceiveEngine::has_digest_mismatch(&mut r), Ok(true));
    while let RecvPoll::Forward(f) = r.poll() {
        let m = f.message;
        r.handle_forwarded(m).unwrap();
    }
    assert_eq!(r.poll(), RecvPoll::Done);
    assert_eq!(r.finish().err(), Some(want));
}

#[test]
fn digest_mismatch_reports_the_first_wrong_storage_in_storage_order() {
    let mut r = receiver_at_bindings(sample(), true, 1);
    let (data, _) = stream_to_trailer(&mut r);
    let mut trailer = report_digests_except(&mut r, &data, None);
    // Storages 3 (model.table) and 1 are both wrong: storage 1 is reported, whatever the order of
    // arrival.
    trailer[16 + 3 * 8] ^= 1;
    trailer[16 + 8] ^= 1;
    r.handle_trailer(&trailer).unwrap();
    assert_eq!(r.digest_mismatch().map(Error::name), Some("DigestMismatch"));
    assert!(matches!(
        r.digest_mismatch(),
        Some(Error::DigestMismatch { storage: 1, .. })
    ));
}

#[test]
fn digest_mismatch_from_a_late_storage_digest() {
    let mut r = receiver_at_bindings(with_fanout(sample(), FanOut::Direct), true, 2);
    let (data, _) = stream_to_trailer(&mut r);
    // The trailer arrives before the host reports storage 3's digest (model.table).
    let trailer = report_digests_except(&mut r, &data, Some(3));
    r.handle_trailer(&trailer).unwrap();
    assert_eq!(r.digest_mismatch(), None);
    let late = *data
        .iter()
        .find(|&&m| {
            let plan = r.plan().unwrap();
            plan.segments(&plan.messages()[m as usize])
                .iter()
                .any(|s| s.completes && s.storage == 3)
        })
        .unwrap();
    let mut digests = fake_digests(&r, late);
    let plan = r.plan().unwrap();
    let at = plan
        .segments(&plan.messages()[late as usize])
        .iter()
        .filter(|s| s.completes)
        .position(|s| s.storage == 3)
        .unwrap();
    digests[at] = 12345;
    r.handle_digests(late, &digests).unwrap();
    let want = Error::DigestMismatch {
        path: "['model']['table']".into(),
        storage: 3,
    };
    assert_eq!(r.digest_mismatch(), Some(&want));
    assert_eq!(r.poll(), RecvPoll::Done);
    assert_eq!(r.finish().err(), Some(want));
}

#[test]
fn digest_mismatch_names_the_lowest_storage_whatever_the_order() {
    let mut r = receiver_at_bindings(with_fanout(sample(), FanOut::Direct), true, 2);
    let (data, _) = stream_to_trailer(&mut r);
    let storages = r.manifest().unwrap().storages().len();
    assert_eq!(storages, 5);
    let all: Vec<u64> = (0..storages as u32).map(fake_digest).collect();
    let trailer = trailer_for(r.manifest().unwrap().metadata(), &all);
    // Storages 1, 3 and 4 mismatch. The message completing storage 3 is reported before the trailer;
    // the others after it, latest first (a host may finish hashing late, in any order).
    let completes = |r: &Receiver, m: u32| -> Vec<u32> {
        let plan = r.plan().unwrap();
        plan.segments(&plan.messages()[m as usize])
            .iter()
            .filter(|s| s.completes)
            .map(|s| s.storage)
            .collect()
    };
    let wrong = |r: &Receiver, m: u32| -> Vec<u64> {
        completes(r, m)
            .into_iter()
            .map(|s| {
                if [1, 3, 4].contains(&s) {
                    12345
                } else {
                    fake_digest(s)
                }
            })
            .collect()
    };
    let (with3, rest): (Vec<u32>, Vec<u32>) =
        data.iter().partition(|&&m| completes(&r, m).contains(&3));
    for &m in &with3 {
        let d = wrong(&r, m);
        r.handle_digests(m, &d).unwrap();
    }
    r.handle_trailer(&trailer).unwrap();
    for &m in rest.iter().rev() {
        let d = wrong(&r, m);
        r.handle_digests(m, &d).unwrap();
    }
    let want = Error::DigestMismatch {
        path: "['model']['layers'][0]['bias']".into(),
        storage: 1,
    };
    assert_eq!(r.digest_mismatch(), Some(&want));
    assert_eq!(r.poll(), RecvPoll::Done);
    assert_eq!(r.finish().err(), Some(want));
}

#[test]
fn unexpected_calls() {
    let call = |call| Err(Error::UnexpectedCall { call });
    let (header, bytes) = encode_raw(&sample(), true);
    let mut r = Receiver::new(options(1));
    // Wrong order before the metadata.
    let bytes = message_for(&bytes);
    assert_eq!(r.handle_metadata(&bytes), call(Call::Metadata));
    assert_eq!(r.finish_bindings(&[]).map(|_| ()), call(Call::Bindings));
    assert_eq!(r.handle_data(2), call(Call::Data));
    assert_eq!(r.handle_trailer(&[]), call(Call::Trailer));
    assert_eq!(r.handle_digests(2, &[]), call(Call::Digests));
    assert_eq!(r.handle_forwarded(2), call(Call::Forwarded));
    assert_eq!(r.incoming().map(|_| ()), call(Call::Incoming));
    assert_eq!(r.paths().map(|_| ()), call(Call::Incoming));
    r.handle_header(&header).unwrap();
    assert_eq!(r.handle_header(&header), call(Call::Header));
    r.handle_metadata(&bytes).unwrap();
    assert_eq!(r.handle_metadata(&bytes), call(Call::Metadata));
    assert_eq!(r.handle_header(&header), call(Call::Header));
    // Binding: no such storage; data before bindings end.
    assert_eq!(
        bind(&mut r, 5, 0, DType::Float32, 48),
        Err(Error::NoSuchStorage { storage: 5 })
    );
    assert_eq!(r.handle_data(2), call(Call::Data));
    r.finish_bindings(&[]).unwrap();
    assert_eq!(r.finish_bindings(&[]).map(|_| ()), call(Call::Bindings));
    // Streaming: data not yet polled, header/metadata indices, out of range.
    for m in [0, 1, 2, 3, 1000, u32::MAX] {
        assert_eq!(
            r.handle_data(m),
            Err(Error::MessageNotOutstanding { message: m.into() }),
            "message {m}"
        );
        assert_eq!(
            r.handle_digests(m, &[]),
            Err(Error::MessageNotOutstanding { message: m.into() }),
            "message {m}"
        );
    }
    assert_eq!(r.handle_trailer(&[0; 40]), call(Call::Trailer));
    // Rank 1 is first in the chain: it forwards to rank 2, but nothing was forwarded yet.
    assert_eq!(
        r.handle_forwarded(2),
        Err(Error::ForwardNotIssued { message: 2 })
    );
    assert_eq!(
        r.handle_forwarded(0),
        Err(Error::ForwardNotIssued { message: 0 })
    );
    let RecvPoll::Recv(op) = r.poll() else {
        panic!("a data receive")
    };
    let m = op.message;
    assert_eq!(op.kind, MessageKind::Data);
    // Digests: one per completed storage, once.
    let d = fake_digests(&r, m);
    assert_eq!(
        r.handle_digests(m, &[]),
        Err(Error::DigestCount {
            message: m.into(),
            expected: d.len() as u64,
            got: 0
        })
    );
    r.handle_digests(m, &d).unwrap();
    assert_eq!(
        r.handle_digests(m, &d),
        Err(Error::DigestsNotExpected { message: m.into() })
    );
    r.handle_data(m).unwrap();
    assert_eq!(
        r.handle_data(m),
        Err(Error::MessageNotOutstanding { message: m.into() })
    );
    // The trailer's index is not a data message.
    let last = r.plan().unwrap().messages().len() as u32 - 1;
    assert_eq!(
        r.handle_data(last),
        Err(Error::MessageNotOutstanding {
            message: last.into()
        })
    );
    let RecvPoll::Forward(f) = r.poll() else {
        panic!("a forward")
    };
    let fm = f.message;
    r.handle_forwarded(fm).unwrap();
    assert_eq!(
        r.handle_forwarded(fm),
        Err(Error::ForwardReportedTwice { message: fm.into() })
    );
}

#[test]
fn unexpected_calls_without_digests() {
    let mut r = receiver_at_bindings(sample(), false, 2);
    r.finish_bindings(&[]).unwrap();
    assert_eq!(r.handle_digests(2, &[0]), Err(Error::DigestsOff));
    assert_eq!(
        r.handle_trailer(&[]),
        Err(Error::UnexpectedCall {
            call: Call::Trailer
        })
    );
    // The sender refuses the same way.
    let mut s = Sender::new(sample(), false, &limits(), TRANSFER_ID).unwrap();
    assert_eq!(s.handle_digests(2, &[0]), Err(Error::DigestsOff));
    let mut s = Sender::new(sample(), true, &limits(), TRANSFER_ID).unwrap();
    // Not polled yet: no bytes to hand out, no digests to take.
    assert_eq!(
        s.payload(0).err(),
        Some(Error::MessageNotOutstanding { message: 0 })
    );
    assert_eq!(
        s.payload(u32::MAX).err(),
        Some(Error::MessageNotOutstanding {
            message: u32::MAX.into()
        })
    );
    assert_eq!(
        s.handle_digests(2, &[0]),
        Err(Error::MessageNotOutstanding { message: 2 })
    );
    let op = loop {
        match s.poll() {
            SendPoll::Send(op) if op.kind == MessageKind::Data => break op,
            SendPoll::Send(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    let plan = s.plan();
    let completed = plan
        .segments(&plan.messages()[op.message as usize])
        .iter()
        .filter(|s| s.completes)
        .count();
    assert_eq!(
        s.handle_digests(op.message, &[]),
        Err(Error::DigestCount {
            message: op.message.into(),
            expected: completed as u64,
            got: 0
        })
    );
    s.handle_digests(op.message, &vec![0; completed]).unwrap();
    assert_eq!(
        s.handle_digests(op.message, &vec![0; completed]),
        Err(Error::DigestsNotExpected {
            message: op.message.into()
        })
    );
}

#[test]
fn direct_fan_out_never_forwards() {
    let mut r = receiver_at_bindings(with_fanout(sample(), FanOut::Direct), false, 1);
    r.finish_bindings(&[]).unwrap();
    let RecvPoll::Recv(op) = r.poll() else {
        panic!("a receive")
    };
    let m = op.message;
    r.handle_data(m).unwrap();
    assert_eq!(
        r.handle_forwarded(m),
        Err(Error::ForwardNotIssued { message: m.into() })
    );
}

#[test]
fn incomplete() {
    assert_eq!(
        Receiver::new(options(1)).finish().err(),
        Some(Error::Incomplete)
    );
    let r = receiver_at_bindings(sample(), true, 1);
    assert_eq!(r.finish().err(), Some(Error::Incomplete));
    // Everything received but one digest missing.
    let mut r = receiver_at_bindings(sample(), true, 2);
    let (data, _) = stream_to_trailer(&mut r);
    let trailer = report_digests_except(&mut r, &data, Some(1));
    r.handle_trailer(&trailer).unwrap();
    assert_eq!(r.poll(), RecvPoll::Wait);
    assert_eq!(r.finish().err(), Some(Error::Incomplete));
    // Rank 1 (chain head) has received everything but not forwarded.
    let mut r = receiver_at_bindings(sample(), false, 1);
    r.finish_bindings(&[]).unwrap();
    while let RecvPoll::Recv(op) = r.poll() {
        let m = op.message;
        r.handle_data(m).unwrap();
    }
    assert_eq!(r.finish().err(), Some(Error::Incomplete));
}

// ---------------------------------------------------------------- messages

#[test]
fn display_is_one_clear_line() {
    let cases = [
        (
            Error::HeaderLength { got: 3 },
            "header must be 32 bytes, got 3",
        ),
        (Error::BadMagic, "not a pgt transfer (bad magic)"),
        (
            Error::MetadataTooLarge { len: 10, max: 5 },
            "metadata of 10 bytes exceeds the limit of 5",
        ),
        (
            Error::TrailingBytes { count: 2 },
            "2 bytes after the metadata",
        ),
        (
            Error::TreeTooDeep { max: 64 },
            "tree nesting exceeds the limit of 64",
        ),
        (
            Error::DTypeMismatch {
                local: DType::Int32,
                global: DType::BFloat16,
            },
            "local dtype int32 differs from the spec's bfloat16",
        ),
        (
            Error::InPlaceSizeMismatch {
                path: "['model']['layers'][0]['weight']".into(),
                expected: 48,
                got: 44,
            },
            "['model']['layers'][0]['weight']: in-place destination has 44 bytes, incoming tensor needs 48",
        ),
        (
            Error::InPlaceDTypeMismatch {
                path: "['opt'][0]".into(),
                incoming: DType::Int64,
                destination: DType::Float32,
            },
            "['opt'][0]: cannot receive int64 into an in-place float32 tensor",
        ),
        (
            Error::DigestMismatch {
                path: "['model']['emb']".into(),
                storage: 2,
            },
            "['model']['emb']: storage 2 does not match the sender's digest",
        ),
        (
            Error::StepMismatch {
                expected: Some(8),
                got: None,
            },
            "expected step Some(8), checkpoint is step None",
        ),
        (
            Error::UnexpectedCall { call: Call::Header },
            "the header was not expected in this state",
        ),
        (Error::Incomplete, "transfer is not complete"),
        (
            Error::DTensorLocalSize {
                dim: 0,
                local: 4,
                global: 4,
            },
            "DTensor local size 4 along dim 0 is no shard of the global size 4 under its placements",
        ),
        (
            Error::ShardsDoNotCover {
                covered: 4,
                volume: 8,
            },
            "ShardedTensor shards hold 4 of the global tensor's 8 elements",
        ),
        (
            Error::ViewTooLarge {
                path: "model.bias".into(),
                bytes: 1 << 42,
                max: 67108868,
            },
            "model.bias: writing the view out takes 4398046511104 bytes, more than the 67108868 allowed (a stride-0 or overlapping view repeats its storage)",
        ),
        (
            Error::ViewTooLarge {
                path: String::new(),
                bytes: 1 << 40,
                max: 0,
            },
            "writing the view out takes 1099511627776 bytes, which could not be allocated",
        ),
    ];
    for (err, want) in cases {
        let s = err.to_string();
        assert_eq!(s, want);
        assert!(
            !s.contains('\n') && !s.ends_with('.') && !s.is_empty(),
            "{s:?}"
        );
        // std's Error trait is implemented (for `?` into Box<dyn Error>).
        let _: &dyn std::error::Error = &err;
    }
}

#[test]
fn every_error_displays_as_one_line() {
    // Every error this file provokes, through a real path, prints as one non-empty line.
    let mut errs = vec![
        Header::parse(&[], &limits()).unwrap_err(),
        round_trip(&nested_lists(65), &limits()).unwrap_err(),
        round_trip(&metadata(vec![], vec![]), &limits()).unwrap_err(),
        decode_raw(&[2]).unwrap_err(),
    ];
    let mut m = sample();
    m.destinations = vec![1, 1];
    errs.push(round_trip(&m, &limits()).unwrap_err());
    let mut r = receiver_at_bindings(sample(), true, 1);
    errs.push(bind(&mut r, 0, 0, DType::UInt8, 1).unwrap_err());
    for e in errs {
        let s = e.to_string();
        assert!(!s.is_empty() && !s.contains('\n'), "{s:?}");
    }
}

// ---------------------------------------------------------------- added by the hostile branch

#[test]
fn dtensor_local_size() {
    // Shard(0) on a 2-rank mesh whose local tensor is the whole global one along dim 0.
    rejects(
        dtensor_with(|l, _| *l = TensorLayout::contiguous(DType::Float32, &[4, 4])),
        Error::DTensorLocalSize {
            dim: 0,
            local: 4,
            global: 4,
        },
    );
    // A dim no placement shards must be whole: dim 1 holds 3 of 4.
    rejects(
        dtensor_with(|l, _| *l = TensorLayout::contiguous(DType::Float32, &[2, 3])),
        Error::DTensorLocalSize {
            dim: 1,
            local: 3,
            global: 4,
        },
    );
    // An uneven split: 5 rows over 2 ranks are chunks of 3 and 2, never 1.
    let uneven = |rows: u64| {
        dtensor_with(|l, s| {
            *l = TensorLayout::contiguous(DType::Float32, &[rows, 4]);
            s.global_shape = vec![5, 4];
        })
    };
    round_trip(&uneven(3), &limits()).unwrap();
    round_trip(&uneven(2), &limits()).unwrap();
    rejects(
        uneven(1),
        Error::DTensorLocalSize {
            dim: 0,
            local: 1,
            global: 5,
        },
    );
    // A rank that gets nothing: 1 row over 2 ranks.
    let one_row = |rows: u64| {
        dtensor_with(|l, s| {
            *l = TensorLayout::contiguous(DType::Float32, &[rows, 4]);
            s.global_shape = vec![1, 4];
        })
    };
    round_trip(&one_row(0), &limits()).unwrap();
    round_trip(&one_row(1), &limits()).unwrap();
    // Partial and Replicate leave the size alone: the 2-dim sample stays valid, a smaller local
    // tensor does not.
    round_trip(&single("d", dtensor_leaf_2d()), &limits()).unwrap();
    let Leaf::DTensor { spec, .. } = dtensor_leaf_2d() else {
        unreachable!()
    };
    rejects(
        single(
            "d",
            Leaf::DTensor {
                local: TensorLayout::contiguous(DType::BFloat16, &[2, 4]),
                spec,
            },
        ),
        Error::DTensorLocalSize {
            dim: 0,
            local: 2,
            global: 4,
        },
    );
}

#[test]
fn duplicate_mesh_rank() {
    rejects(
        dtensor_with(|_, s| s.mesh.ranks = vec![1, 1]),
        Error::DuplicateMeshRank { rank: 1 },
    );
}

#[test]
fn mesh_rank_out_of_range() {
    // Not part of validation (the metadata does not say how large the group is): a host that knows
    // checks it.
    let Leaf::DTensor { spec, .. } = dtensor_leaf() else {
        unreachable!()
    };
    assert_eq!(spec.mesh.check_world_size(2), Ok(()));
    let mut mesh = spec.mesh;
    mesh.ranks = vec![0, 1 << 40];
    assert_eq!(
        mesh.check_world_size(4),
        Err(Error::MeshRankOutOfRange {
            rank: 1 << 40,
            world_size: 4
        })
    );
}

#[test]
fn shards_overlap() {
    // Shard 0 grows into shard 1: 12 elements of shards in an 8-element tensor.
    rejects(
        sharded_with(|_, g| g.shards[0].sizes = vec![4, 2]),
        Error::ShardsOverlap,
    );
    // Shard 1 moves up a row: the volumes add up to 8, but rows 1 is held twice and row 3 never.
    rejects(
        sharded_with(|_, g| g.shards[1].offsets = vec![1, 0]),
        Error::ShardsOverlap,
    );
    // The same shard listed twice, and a zero-size shard that overlaps nothing.
    rejects(
        sharded_with(|_, g| g.shards.push(g.shards[0].clone())),
        Error::ShardsOverlap,
    );
    round_trip(
        &sharded_with(|_, g| g.shards.push(shard_meta(&[1, 1], &[0, 1], "rank:0/cpu"))),
        &limits(),
    )
    .unwrap();
}

#[test]
fn shards_do_not_cover() {
    rejects(
        sharded_with(|_, g| {
            g.shards.remove(0);
        }),
        Error::ShardsDoNotCover {
            covered: 4,
            volume: 8,
        },
    );
    // No global shards at all.
    rejects(
        sharded_with(|_, g| g.shards.clear()),
        Error::ShardsDoNotCover {
            covered: 0,
            volume: 8,
        },
    );
}

#[test]
fn sharding_too_complex() {
    // Two rows of 130 laid like bricks: row 0 in 65 shards of 2, row 1 in 64 shards of 2 between two
    // of 1. A tiling, but split along both dims into more than 64 shards that lie on no grid.
    let mut shards = Vec::new();
    for i in 0..65 {
        shards.push(shard_meta(&[0, 2 * i], &[1, 2], "rank:0/cpu"));
    }
    shards.push(shard_meta(&[1, 0], &[1, 1], "rank:0/cpu"));
    for i in 0..64 {
        shards.push(shard_meta(&[1, 1 + 2 * i], &[1, 2], "rank:0/cpu"));
    }
    shards.push(shard_meta(&[1, 129], &[1, 1], "rank:0/cpu"));
    let local = LocalShard {
        layout: TensorLayout::contiguous(DType::Int64, &[1, 2]),
        meta: shards[0].clone(),
    };
    let leaf = |shards: Vec<_>| {
        single(
            "s",
            Leaf::Sharded {
                local_shards: vec![local.clone()],
                global: pgt_core::sharded::ShardedTensorMetadata {
                    shards,
                    global_size: vec![2, 130],
                    dtype: DType::Int64,
                },
            },
        )
    };
    rejects(
        leaf(shards.clone()),
        Error::ShardingTooComplex { shards: 131 },
    );
    // The same tensor in a 2 × 65 grid is checked in n log n.
    let grid: Vec<_> = (0..2)
        .flat_map(|r| (0..65).map(move |c| shard_meta(&[r, 2 * c], &[1, 2], "rank:0/cpu")))
        .collect();
    round_trip(&leaf(grid), &limits()).unwrap();
}

#[test]
fn placement_rank_out_of_range() {
    // Not part of validation, as mesh ranks: the sample's shards are on ranks 0 and 3.
    let Leaf::Sharded { global, .. } = sharded_leaf() else {
        unreachable!()
    };
    assert_eq!(global.check_world_size(4), Ok(()));
    assert_eq!(
        global.check_world_size(2),
        Err(Error::PlacementRankOutOfRange {
            rank: 3,
            world_size: 2
        })
    );
}

#[test]
fn view_too_large() {
    // 4 bytes broadcast to [2^20, 2^20] (stride 0) are a valid view: 4 TiB when written out.
    let huge = TensorLayout {
        dtype: DType::Float32,
        shape: vec![1 << 20, 1 << 20],
        stride: vec![0, 0],
        storage_offset: 0,
        nbytes: 4,
    };
    round_trip(&single("t", Leaf::Tensor(huge.clone())), &limits()).unwrap();
    let max = 4 + pgt_core::layout::MAX_VIEW_EXPANSION;
    assert_eq!(
        huge.gather(&[0; 4], max),
        Err(Error::ViewTooLarge {
            path: String::new(),
            bytes: 1 << 42,
            max,
        })
    );
}
