//! ShardedTensor: local shards, each with its shard metadata, plus the global metadata of all shards.

use alloc::collections::BTreeSet;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::layout::TensorLayout;
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

    /// The same shard, placed on `rank`, keeping its device.
    pub fn placed_on(&self, rank: u64) -> ShardMetadata {
        let device = parse_placement(&self.placement).map_or("cpu", |(_, d)| d);
        ShardMetadata {
            offsets: self.offsets.clone(),
            sizes: self.sizes.clone(),
            placement: format!("rank:{rank}/{device}"),
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

    /// Rewrites the placement of every shard whose `(offsets, sizes)` equal one of `local`'s to `rank`,
    /// each keeping its own device, as the receiver does for the shards it now holds. Shards are matched
    /// as validation matches local shards to global ones: by offsets and sizes, never by placement (a
    /// zero-size shard at the same offsets as a held one is another rank's, and keeps its placement).
    pub fn rewrite_placements(&mut self, local: &[ShardMetadata], rank: u64) {
        let held: BTreeSet<(&[u64], &[u64])> = local
            .iter()
            .map(|s| (s.offsets.as_slice(), s.sizes.as_slice()))
            .collect();
        for shard in &mut self.shards {
            if held.contains(&(shard.offsets.as_slice(), shard.sizes.as_slice())) {
                *shard = shard.placed_on(rank);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_parse_and_rewrite() {
        assert_eq!(parse_placement("rank:12/cuda:3"), Some((12, "cuda:3")));
        assert_eq!(parse_placement("rank:/cpu"), None);
        assert_eq!(parse_placement("rank:1"), None);
        assert_eq!(parse_placement("rank:-1/cpu"), None);
        let s = ShardMetadata {
            offsets: alloc::vec![0],
            sizes: alloc::vec![2],
            placement: "rank:0/cuda:1".into(),
        };
        assert_eq!(s.placed_on(5).placement, "rank:5/cuda:1");
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

    #[test]
    fn rewrite_matches_offsets_and_sizes_and_keeps_each_device() {
        let mut g = ShardedTensorMetadata {
            shards: alloc::vec![
                ShardMetadata {
                    offsets: alloc::vec![0],
                    sizes: alloc::vec![2],
                    placement: "rank:000/cpu".into(),
                },
                ShardMetadata {
                    offsets: alloc::vec![0],
                    sizes: alloc::vec![0],
                    placement: "rank:3/cuda:3".into(),
                },
                ShardMetadata {
                    offsets: alloc::vec![2],
                    sizes: alloc::vec![2],
                    placement: "rank:1/cuda:1".into(),
                },
            ],
            global_size: alloc::vec![4],
            dtype: DType::Float32,
        };
        // The sender's shard says cuda:0; the global entry's own device (cpu) is kept.
        let local = ShardMetadata {
            offsets: alloc::vec![0],
            sizes: alloc::vec![2],
            placement: "rank:0/cuda:0".into(),
        };
        g.rewrite_placements(&[local], 5);
        let placements: Vec<&str> = g.shards.iter().map(|s| s.placement.as_str()).collect();
        assert_eq!(placements, ["rank:5/cpu", "rank:3/cuda:3", "rank:1/cuda:1"]);
    }
}
