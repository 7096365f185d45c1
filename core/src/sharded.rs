//! ShardedTensor: local shards, each with its shard metadata, plus the global metadata of all shards.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::layout::{checked_product, TensorLayout};
use crate::{Error, Result};

/// Where one shard sits in the global tensor, and on which rank/device.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardMetadata {
    /// Offset of the shard in each global dimension.
    pub offsets: Vec<u64>,
    /// Size of the shard in each global dimension.
    pub sizes: Vec<u64>,
    /// Placement in torch's form `"rank:N/device"`, e.g. `"rank:0/cuda:0"`.
    pub placement: String,
}

/// Metadata of the whole sharded tensor.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardedTensorMetadata {
    /// Every shard of the tensor, on every rank.
    pub shards: Vec<ShardMetadata>,
    /// Size of the global tensor.
    pub global_size: Vec<u64>,
    /// Element type of every shard.
    pub dtype: DType,
}

/// One shard held by the sending rank: its storage travels on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LocalShard {
    /// Layout of the shard's tensor.
    pub layout: TensorLayout,
    /// The shard's metadata.
    pub meta: ShardMetadata,
}

/// The device type of every received local shard's placement: pgt receivers land storages in host
/// memory, which torch's PGTransport names `cpu` (its placement takes the received tensor's
/// `device.type`, no index).
pub const RECEIVED_DEVICE_TYPE: &str = "cpu";

/// Splits a placement `"rank:N/device"` into `(N, device)`.
pub fn parse_placement(placement: &str) -> Option<(u64, &str)> {
    let rest = placement.strip_prefix("rank:")?;
    let (rank, device) = rest.split_once('/')?;
    if device.is_empty() || rank.is_empty() || !rank.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((rank.parse().ok()?, device))
}

impl ShardMetadata {
    /// Checks the shard against the global size.
    pub fn validate(&self, global_size: &[u64]) -> Result<()> {
        if self.offsets.len() != global_size.len() || self.sizes.len() != global_size.len() {
            return Err(Error::ShardRankMismatch);
        }
        for ((&off, &size), &global) in self.offsets.iter().zip(&self.sizes).zip(global_size) {
            let end = off.checked_add(size).ok_or(Error::LayoutOverflow)?;
            if end > global {
                return Err(Error::ShardOutOfBounds { end, global });
            }
        }
        if parse_placement(&self.placement).is_none() {
            return Err(Error::BadPlacement);
        }
        Ok(())
    }

    /// The same shard as a receiver holds it, as torch's PGTransport rebuilds a received local shard:
    /// offsets and sizes as sent, placed on the receiving `rank` and the device type its bytes landed
    /// on ([`RECEIVED_DEVICE_TYPE`]), whatever device the sender held it on.
    pub fn received_on(&self, rank: u64) -> ShardMetadata {
        ShardMetadata {
            offsets: self.offsets.clone(),
            sizes: self.sizes.clone(),
            placement: format!("rank:{rank}/{RECEIVED_DEVICE_TYPE}"),
        }
    }
}

impl ShardedTensorMetadata {
    /// Checks every shard, and each local shard against the global metadata.
    pub fn validate(&self, local_shards: &[LocalShard], max_ndim: u32) -> Result<()> {
        if self.global_size.len() > max_ndim as usize {
            return Err(Error::TooManyDims {
                ndim: self.global_size.len() as u64,
                max: max_ndim,
            });
        }
        for shard in &self.shards {
            shard.validate(&self.global_size)?;
        }
        self.check_tiling()?;
        let listed: BTreeSet<(&[u64], &[u64])> = self
            .shards
            .iter()
            .map(|s| (s.offsets.as_slice(), s.sizes.as_slice()))
            .collect();
        for local in local_shards {
            local.meta.validate(&self.global_size)?;
            if local.layout.shape != local.meta.sizes {
                return Err(Error::LocalShapeMismatch);
            }
            if local.layout.dtype != self.dtype {
                return Err(Error::DTypeMismatch {
                    local: local.layout.dtype,
                    global: self.dtype,
                });
            }
            if !listed.contains(&(local.meta.offsets.as_slice(), local.meta.sizes.as_slice())) {
                return Err(Error::ShardNotInGlobal);
            }
        }
        Ok(())
    }

    /// Checks that the global shards tile the global tensor, as torch's
    /// `validate_non_overlapping_shards_metadata` and `check_tensor` do: no two share an element and
    /// together they hold every element. With every shard inside the global size (checked before):
    /// 1. the global element count overflows u64 → [`Error::LayoutOverflow`] (a 0 dim makes it 0);
    /// 2. the shards' element counts add up to more → [`Error::ShardsOverlap`], to less →
    ///    [`Error::ShardsDoNotCover`];
    /// 3. they add up to exactly the global count, so they tile it unless two shards intersect. Only the
    ///    shards of non-zero volume matter, and only the dims along which they differ: none → two or
    ///    more shards are the same box ([`Error::ShardsOverlap`]); one → sorted by offset, each must
    ///    end where the next starts or before; two or more → every pair is compared when there are at
    ///    most [`MAX_PAIRWISE_SHARDS`]; more must lie on a grid (along each of those dims their
    ///    distinct ranges are pairwise disjoint, so each shard is one cell), where two overlap iff they
    ///    are the same cell; shards on no grid are [`Error::ShardingTooComplex`].
    pub fn check_tiling(&self) -> Result<()> {
        let volume = checked_product(&self.global_size).ok_or(Error::LayoutOverflow)?;
        let mut covered = 0u128;
        let mut solid: Vec<&ShardMetadata> = Vec::new();
        for shard in &self.shards {
            // Inside the global size, so at most `volume`.
            let v = checked_product(&shard.sizes).ok_or(Error::LayoutOverflow)?;
            covered += u128::from(v);
            if v > 0 {
                solid.push(shard);
            }
        }
        match covered.cmp(&u128::from(volume)) {
            core::cmp::Ordering::Greater => return Err(Error::ShardsOverlap),
            core::cmp::Ordering::Less => {
                return Err(Error::ShardsDoNotCover {
                    covered: covered as u64,
                    volume,
                })
            }
            core::cmp::Ordering::Equal => {}
        }
        let Some(&first) = solid.first() else {
            return Ok(());
        };
        let range = |s: &ShardMetadata, d: usize| (s.offsets[d], s.offsets[d] + s.sizes[d]);
        let varying: Vec<usize> = (0..self.global_size.len())
            .filter(|&d| solid.iter().any(|s| range(s, d) != range(first, d)))
            .collect();
        let disjoint = match varying.as_slice() {
            [] => solid.len() == 1,
            &[d] => {
                let mut ranges: Vec<(u64, u64)> = solid.iter().map(|s| range(s, d)).collect();
                heapsort(&mut ranges);
                ranges.windows(2).all(|w| w[0].1 <= w[1].0)
            }
            _ if solid.len() <= MAX_PAIRWISE_SHARDS => {
                let apart = |a: &ShardMetadata, b: &ShardMetadata| {
                    varying.iter().any(|&d| {
                        let ((a0, a1), (b0, b1)) = (range(a, d), range(b, d));
                        a1 <= b0 || b1 <= a0
                    })
                };
                solid
                    .iter()
                    .enumerate()
                    .all(|(i, a)| solid[i + 1..].iter().all(|b| apart(a, b)))
            }
            _ => match grid_has_twins(&solid, &varying) {
                Some(twins) => !twins,
                None => {
                    return Err(Error::ShardingTooComplex {
                        shards: solid.len() as u64,
                    })
                }
            },
        };
        if disjoint {
            Ok(())
        } else {
            Err(Error::ShardsOverlap)
        }
    }

    /// Checks that every global shard's placement names a rank of a process group of `world_size`
    /// ranks, as torch does when it builds a ShardedTensor. [`ShardedTensorMetadata::validate`] cannot:
    /// the receiver's metadata does not say how large the group is. A host that knows calls this
    /// ([`Error::PlacementRankOutOfRange`] for the first such shard, in order; [`Error::BadPlacement`]
    /// for a placement that does not parse). Local shards are among the global ones.
    pub fn check_world_size(&self, world_size: u64) -> Result<()> {
        for meta in &self.shards {
            let (rank, _) = parse_placement(&meta.placement).ok_or(Error::BadPlacement)?;
            if rank >= world_size {
                return Err(Error::PlacementRankOutOfRange { rank, world_size });
            }
        }
        Ok(())
    }
}

/// Shards of non-zero volume that [`ShardedTensorMetadata::check_tiling`] compares pairwise when they
/// differ along two or more dims; more must lie on a grid.
pub const MAX_PAIRWISE_SHARDS: usize = 64;

/// For `shards` (non-zero volume, each inside the global size, their volumes adding up to the global
/// tensor's) that lie on a grid along `dims` — the distinct ranges along each dim are pairwise
/// disjoint, so every shard is one cell of the grid of their combinations — whether two of them are the
/// same cell (the only way such shards can intersect); `None` when they lie on no grid. Without twins
/// the shards fill every cell (their volumes add up to the whole), so there are as many shards as
/// cells; with as many, a twin leaves a cell empty. `O(n log n)` per dim.
fn grid_has_twins(shards: &[&ShardMetadata], dims: &[usize]) -> Option<bool> {
    let mut ranges: Vec<Vec<(u64, u64)>> = Vec::with_capacity(dims.len());
    let mut cells = 1u64;
    for &d in dims {
        let mut r: Vec<(u64, u64)> = shards
            .iter()
            .map(|s| (s.offsets[d], s.offsets[d] + s.sizes[d]))
            .collect();
        heapsort(&mut r);
        r.dedup();
        if r.windows(2).any(|w| w[0].1 > w[1].0) {
            return None;
        }
        cells = cells.saturating_mul(r.len() as u64);
        ranges.push(r);
    }
    if cells != shards.len() as u64 {
        return Some(true);
    }
    let mut seen = alloc::vec![false; shards.len()];
    for s in shards {
        // The cell's row-major index among the `cells` (< shards.len()).
        let mut cell = 0usize;
        for (&d, r) in dims.iter().zip(&ranges) {
            let i = r
                .binary_search(&(s.offsets[d], s.offsets[d] + s.sizes[d]))
                .unwrap_or(0);
            cell = cell * r.len() + i;
        }
        if core::mem::replace(&mut seen[cell], true) {
            return Some(true);
        }
    }
    Some(false)
}

/// Sorts `v` in place (heapsort: `O(n log n)`, no allocation). Used instead of `sort_unstable`,
/// whose generic code adds about 10 KB to the wasm module, for the few sorts validation needs.
pub(crate) fn heapsort(v: &mut [(u64, u64)]) {
    fn sift_down(v: &mut [(u64, u64)], mut root: usize, end: usize) {
        loop {
            let mut child = 2 * root + 1;
            if child >= end {
                return;
            }
            if child + 1 < end && v[child] < v[child + 1] {
                child += 1;
            }
            if v[root] >= v[child] {
                return;
            }
            v.swap(root, child);
            root = child;
        }
    }
    for start in (0..v.len() / 2).rev() {
        sift_down(v, start, v.len());
    }
    for end in (1..v.len()).rev() {
        v.swap(0, end);
        sift_down(v, 0, end);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_parse_and_receive() {
        assert_eq!(parse_placement("rank:12/cuda:3"), Some((12, "cuda:3")));
        assert_eq!(parse_placement("rank:/cpu"), None);
        assert_eq!(parse_placement("rank:1"), None);
        assert_eq!(parse_placement("rank:-1/cpu"), None);
        let s = ShardMetadata {
            offsets: alloc::vec![0],
            sizes: alloc::vec![2],
            placement: "rank:0/cuda:1".into(),
        };
        // As torch's PGTransport: the receiver's rank and the device type the bytes landed on.
        let got = s.received_on(5);
        assert_eq!(got.placement, "rank:5/cpu");
        assert_eq!((got.offsets, got.sizes), (s.offsets, s.sizes));
    }

    #[test]
    fn heapsort_sorts() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        for n in [0usize, 1, 2, 3, 10, 100, 1000] {
            let mut v: Vec<(u64, u64)> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    (state % 17, state % 5)
                })
                .collect();
            let mut want = v.clone();
            want.sort();
            heapsort(&mut v);
            assert_eq!(v, want);
        }
    }

    fn meta(shards: &[(&[u64], &[u64])], global_size: &[u64]) -> ShardedTensorMetadata {
        ShardedTensorMetadata {
            shards: shards
                .iter()
                .map(|(o, s)| ShardMetadata {
                    offsets: o.to_vec(),
                    sizes: s.to_vec(),
                    placement: "rank:0/cpu".into(),
                })
                .collect(),
            global_size: global_size.to_vec(),
            dtype: DType::Float32,
        }
    }

    /// An `r × c` grid of `h × w` shards.
    fn grid(r: u64, c: u64, h: u64, w: u64) -> ShardedTensorMetadata {
        let mut m = meta(&[], &[r * h, c * w]);
        for i in 0..r {
            for j in 0..c {
                m.shards.push(ShardMetadata {
                    offsets: alloc::vec![i * h, j * w],
                    sizes: alloc::vec![h, w],
                    placement: format!("rank:{}/cpu", i * c + j),
                });
            }
        }
        m
    }

    #[test]
    fn tilings() {
        // Row shards, an uneven split with an empty shard at the end (torch puts it at offset = size).
        let rows = meta(
            &[(&[0, 0], &[3, 4]), (&[3, 0], &[1, 4]), (&[4, 0], &[0, 4])],
            &[4, 4],
        );
        assert_eq!(rows.check_tiling(), Ok(()));
        // A 2-D tiling that is no grid (an L of three shards), compared pairwise.
        let l = meta(
            &[(&[0, 0], &[2, 1]), (&[0, 1], &[1, 1]), (&[1, 1], &[1, 1])],
            &[2, 2],
        );
        assert_eq!(l.check_tiling(), Ok(()));
        // Grids of any size are checked in n log n, zero-size tensors and 0-dim ones too.
        assert_eq!(grid(100, 100, 2, 3).check_tiling(), Ok(()));
        assert_eq!(meta(&[], &[0, 5]).check_tiling(), Ok(()));
        assert_eq!(meta(&[(&[], &[])], &[]).check_tiling(), Ok(()));
        // One shard twice (the same box): no dim varies.
        let twice = meta(&[(&[0], &[2]), (&[0], &[2])], &[4]);
        assert_eq!(twice.check_tiling(), Err(Error::ShardsOverlap));
        // 1-D: two shards cross, and the volumes still add up (a gap elsewhere).
        let crossed = meta(&[(&[0], &[3]), (&[2], &[2]), (&[5], &[1])], &[6]);
        assert_eq!(crossed.check_tiling(), Err(Error::ShardsOverlap));
        // 2-D cross: volumes add up to 9 of 9, the bars intersect in the middle.
        let cross = meta(
            &[
                (&[1, 0], &[1, 3]),
                (&[0, 1], &[3, 1]),
                (&[0, 0], &[1, 1]),
                (&[0, 2], &[1, 1]),
                (&[2, 0], &[1, 1]),
            ],
            &[3, 3],
        );
        assert_eq!(cross.check_tiling(), Err(Error::ShardsOverlap));
        // More shards than the pairwise limit that are no grid: one grid cell split in two.
        let mut split = grid(10, 10, 2, 2);
        split.shards[0].sizes = alloc::vec![1, 2];
        split.shards.push(ShardMetadata {
            offsets: alloc::vec![1, 0],
            sizes: alloc::vec![1, 2],
            placement: "rank:0/cpu".into(),
        });
        assert_eq!(
            split.check_tiling(),
            Err(Error::ShardingTooComplex { shards: 101 })
        );
        // A grid with one cell twice and one missing: the volumes add up, two shards are one cell.
        let mut dup = grid(10, 10, 2, 2);
        dup.shards[1] = dup.shards[0].clone();
        assert_eq!(dup.check_tiling(), Err(Error::ShardsOverlap));
        // The last row of a 33 × 2 grid replaced by copies of the first: fewer cells than shards.
        let mut rows = grid(33, 2, 2, 2);
        rows.shards[64] = rows.shards[0].clone();
        rows.shards[65] = rows.shards[1].clone();
        assert_eq!(rows.check_tiling(), Err(Error::ShardsOverlap));
        // Volumes.
        let short = grid(2, 2, 2, 2);
        let mut gap = short.clone();
        gap.shards.pop();
        assert_eq!(
            gap.check_tiling(),
            Err(Error::ShardsDoNotCover {
                covered: 12,
                volume: 16
            })
        );
        let mut extra = short;
        extra.shards.push(extra.shards[0].clone());
        assert_eq!(extra.check_tiling(), Err(Error::ShardsOverlap));
        let huge = meta(&[], &[1 << 32, 1 << 32]);
        assert_eq!(huge.check_tiling(), Err(Error::LayoutOverflow));
    }

    #[test]
    fn world_size_checks() {
        let g = grid(1, 3, 1, 1);
        assert_eq!(g.check_world_size(3), Ok(()));
        assert_eq!(
            g.check_world_size(2),
            Err(Error::PlacementRankOutOfRange {
                rank: 2,
                world_size: 2
            })
        );
    }

    #[test]
    fn placement_syntax_is_exact() {
        // Leading zeros are fine, the device is everything after the first '/', the rank is any u64.
        assert_eq!(parse_placement("rank:007/cpu"), Some((7, "cpu")));
        assert_eq!(
            parse_placement("rank:1/node-a/cuda:1"),
            Some((1, "node-a/cuda:1"))
        );
        assert_eq!(
            parse_placement("rank:18446744073709551615/cpu"),
            Some((u64::MAX, "cpu"))
        );
        // What lenient integer parsers (Rust's `+`, Python's `int`) would take is not a rank.
        for bad in [
            "RANK:1/cpu",
            "Rank:1/cpu",
            "rank:+1/cpu",
            "rank: 1/cpu",
            "rank:1 /cpu",
            "rank:1_0/cpu",
            "rank:\u{661}/cpu",
            "rank:18446744073709551616/cpu",
            "rank:1/",
            "rank:/cpu",
            "rank:1",
        ] {
            assert_eq!(parse_placement(bad), None, "{bad}");
        }
    }
}
