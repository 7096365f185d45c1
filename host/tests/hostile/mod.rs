//! What the `pgt recv` tests that play a hostile or careless sender share (`cli_budget`,
//! `cli_catalogue`, `cli_hostile`): ports, the output directory's files, tensors and metadata built
//! by hand. Each test binary uses part of it.
#![allow(
    dead_code,
    reason = "each test binary that includes this module uses a different part"
)]

use std::path::Path;

use pgt_core::codec;
use pgt_core::dtensor::{DTensorSpec, DeviceMesh, Placement};
use pgt_core::dtype::DType;
use pgt_core::header::{Limits, PREFIX_LEN};
use pgt_core::layout::TensorLayout;
use pgt_core::manifest::Manifest;
use pgt_core::schema::{Metadata, PlanParams};
use pgt_core::tree::{Leaf, Node};
use pgt_host::memory::Buffer;
use pgt_host::state_dict::{Storage, Tensor};

/// A loopback port outside the ephemeral range (32768–60999) that nothing listens on: a master port
/// inside it can be taken as a client's own source port (a connection to itself).
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos()) as u64;
    let mut x = (nanos ^ u64::from(std::process::id()) << 20)
        + NEXT.fetch_add(0x9E37_79B9, std::sync::atomic::Ordering::Relaxed);
    loop {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let port = 20_000 + (x % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The files in `dir`, sorted (temporary ones are hidden files there, `.<name>.tmp-…`).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A float32 tensor of `shape` holding 0, 1, 2, …
pub fn f32s(shape: &[u64]) -> Tensor<'static> {
    let n: u64 = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|i| i as f32).collect();
    Tensor::from_values(shape, &v).expect("tensor")
}

/// A float32 `shape` whose every element is the one element of a 4-byte storage (stride 0).
pub fn broadcast(shape: &[u64]) -> Tensor<'static> {
    let layout = TensorLayout {
        dtype: DType::Float32,
        shape: shape.to_vec(),
        stride: vec![0; shape.len()],
        storage_offset: 0,
        nbytes: 4,
    };
    Tensor::new(
        layout,
        Storage::Owned(Buffer::from_slice(&1.5f32.to_le_bytes())),
    )
    .expect("view")
}

/// The spec of a float32 DTensor `[4, 2]` sharded on rows over a 2-rank mesh of `ranks`.
pub fn row_sharded_spec(ranks: [u64; 2]) -> DTensorSpec {
    DTensorSpec {
        mesh: DeviceMesh {
            shape: vec![2],
            ranks: ranks.to_vec(),
            dim_names: None,
            device_type: "cpu".into(),
        },
        placements: vec![Placement::Shard(0)],
        global_shape: vec![4, 2],
        global_stride: vec![2, 1],
        dtype: DType::Float32,
    }
}

/// The postcard bytes of metadata from rank 0 to rank 1 with this tree, these leaves and `plan`
/// (pgt's encoder: valid metadata), without the transfer-id prefix.
pub fn encode(tree: Vec<Node>, leaves: Vec<Leaf>, plan: PlanParams) -> Vec<u8> {
    let m = Metadata {
        step: None,
        source: 0,
        destinations: vec![1],
        plan,
        tree,
        leaves,
    };
    let manifest = Manifest::new(m, true, &Limits::default()).expect("valid metadata");
    let (_, message) = codec::encode(&manifest, 7).expect("encodes");
    message[PREFIX_LEN as usize..].to_vec()
}

/// A postcard varint (for metadata written by hand).
pub fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Metadata from rank 0 to rank 1 written out by hand (PROTOCOL.md §6, the fields in order):
/// `depth - 1` nested one-element lists around a list of `leaves` value leaves, the i-th encoded by
/// `value(i)` (an encoded `Value`). By hand because pgt's own encoder refuses what these tests send,
/// and a million leaves built in memory would make the test process large, which its `pgt recv`
/// children would inherit as their peak memory (Linux carries a high-water mark across `execve`).
pub fn lists_of_values(
    depth: usize,
    leaves: usize,
    value: impl Fn(usize, &mut Vec<u8>),
) -> Vec<u8> {
    let mut b = vec![0, 0, 1, 1]; // step None, source 0, destinations [1]
    b.push(1); // Chain
    varint(PlanParams::default().bucket_size, &mut b);
    varint(PlanParams::default().chunk_size, &mut b);
    varint((depth + leaves) as u64, &mut b);
    for _ in 1..depth {
        b.extend([1, 1]); // List(1)
    }
    b.push(1); // List(leaves)
    varint(leaves as u64, &mut b);
    b.resize(b.len() + leaves, 3); // Leaf
    varint(leaves as u64, &mut b);
    for i in 0..leaves {
        b.push(0); // Leaf::Value
        value(i, &mut b);
    }
    b
}

/// `depth - 1` nested one-element lists around a list of `leaves` `None` values.
pub fn deep_nones(depth: usize, leaves: usize) -> Vec<u8> {
    lists_of_values(depth, leaves, |_, b| b.push(0))
}

/// Waits for `child` to exit (killing it and failing after `hang` from `start`): its wait status and
/// its own resource usage (`wait4`; std's `Child::wait` gives no rusage).
pub fn wait_with_rusage(
    child: &mut std::process::Child,
    start: std::time::Instant,
    hang: std::time::Duration,
) -> (i32, libc::rusage) {
    let pid = child.id() as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid value of this plain C struct.
        let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our child, not yet reaped (std's `Child` is never waited on); the
        // pointers are to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut rusage) };
        if r == pid {
            return (status, rusage);
        }
        assert_eq!(r, 0, "wait4: {}", std::io::Error::last_os_error());
        if start.elapsed() > hang {
            let _ = child.kill();
            panic!("pgt recv still running after {hang:?}: killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
