//! DTensor: a local tensor plus the spec that places it in a global tensor over a device mesh.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::layout::{checked_product, TensorLayout};
use crate::{Error, Result};

/// A device mesh: an n-dimensional arrangement of ranks.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceMesh {
    /// Size of each mesh dimension.
    pub shape: Vec<u64>,
    /// Global ranks in row-major mesh order; `product(shape)` of them.
    pub ranks: Vec<u64>,
    /// Optional names of the mesh dimensions (e.g. `["dp", "tp"]`); one per dimension when present.
    pub dim_names: Option<Vec<String>>,
    /// The device type, e.g. `"cpu"` or `"cuda"`.
    pub device_type: String,
}

/// How a DTensor is laid out along one mesh dimension.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Placement {
    /// Sharded along tensor dimension `dim`.
    Shard(u32),
    /// Every rank of the mesh dimension holds the whole tensor.
    Replicate,
    /// Every rank holds a partial value; the global tensor is the reduction.
    Partial(ReduceOp),
}

/// The reduction of a [`Placement::Partial`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum ReduceOp {
    Sum,
    Avg,
    Product,
    Min,
    Max,
}

/// The DTensor spec: mesh, placements and the global tensor's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DTensorSpec {
    /// The device mesh.
    pub mesh: DeviceMesh,
    /// One placement per mesh dimension.
    pub placements: Vec<Placement>,
    /// Shape of the global (logical) tensor.
    pub global_shape: Vec<u64>,
    /// Stride of the global tensor, in elements.
    pub global_stride: Vec<u64>,
    /// Element type; equals the local tensor's.
    pub dtype: DType,
}

impl DTensorSpec {
    /// Checks the spec against itself and its local tensor's layout.
    pub fn validate(&self, local: &TensorLayout, max_ndim: u32) -> Result<()> {
        let mesh_ndim = self.mesh.shape.len();
        if mesh_ndim > max_ndim as usize || self.global_shape.len() > max_ndim as usize {
            return Err(Error::TooManyDims {
                ndim: mesh_ndim.max(self.global_shape.len()) as u64,
                max: max_ndim,
            });
        }
        let mesh_size = checked_product(&self.mesh.shape).ok_or(Error::LayoutOverflow)?;
        if self.mesh.ranks.len() as u64 != mesh_size {
            return Err(Error::MeshRankCount {
                ranks: self.mesh.ranks.len() as u64,
                mesh_size,
            });
        }
        if let Some(names) = &self.mesh.dim_names {
            if names.len() != mesh_ndim {
                return Err(Error::MeshDimNames {
                    names: names.len() as u64,
                    mesh_ndim: mesh_ndim as u64,
                });
            }
        }
        if self.placements.len() != mesh_ndim {
            return Err(Error::PlacementCount {
                placements: self.placements.len() as u64,
                mesh_ndim: mesh_ndim as u64,
            });
        }
        let ndim = self.global_shape.len();
        for p in &self.placements {
            if let Placement::Shard(dim) = *p {
                if dim as usize >= ndim {
                    return Err(Error::ShardDimOutOfRange {
                        dim: dim as u64,
                        ndim: ndim as u64,
                    });
                }
            }
        }
        if self.global_stride.len() != ndim {
            return Err(Error::StrideRankMismatch {
                shape: ndim as u64,
                stride: self.global_stride.len() as u64,
            });
        }
        if local.shape.len() != ndim {
            return Err(Error::LocalShapeMismatch);
        }
        // A local shard can never be larger than the global tensor along any dimension.
        if local
            .shape
            .iter()
            .zip(&self.global_shape)
            .any(|(l, g)| l > g)
        {
            return Err(Error::LocalShapeMismatch);
        }
        if local.dtype != self.dtype {
            return Err(Error::DTypeMismatch {
                local: local.dtype,
                global: self.dtype,
            });
        }
        // As torch's DeviceMesh: a rank has at most one coordinate. Sorted (rank, position) pairs: the
        // first repeat in list order is the smallest position that follows an equal rank.
        let mut ranks: Vec<(u64, u64)> = (self.mesh.ranks.iter().copied()).zip(0u64..).collect();
        crate::sharded::heapsort(&mut ranks);
        let repeat = ranks
            .windows(2)
            .filter(|w| w[0].0 == w[1].0)
            .min_by_key(|w| w[1].1);
        if let Some(w) = repeat {
            return Err(Error::DuplicateMeshRank { rank: w[1].0 });
        }
        // As torch's `compute_local_shape_and_global_offset`: the local size along each dim is what
        // the placements give some mesh coordinate. The mesh dims that shard a tensor dim are disjoint
        // from those that shard another, so each dim is checked on its own.
        for (dim, (&l, &g)) in local.shape.iter().zip(&self.global_shape).enumerate() {
            let splits = self
                .placements
                .iter()
                .zip(&self.mesh.shape)
                .filter(|(p, _)| **p == Placement::Shard(dim as u32))
                .map(|(_, &n)| n);
            if !is_local_size(g, l, splits) {
                return Err(Error::DTensorLocalSize {
                    dim: dim as u64,
                    local: l,
                    global: g,
                });
            }
        }
        Ok(())
    }
}

impl DeviceMesh {
    /// Checks that every rank of the mesh is in a process group of `world_size` ranks, as torch does
    /// when it builds the mesh. [`DTensorSpec::validate`] cannot: the receiver's metadata does not
    /// say how large the group is. A host that knows calls this ([`Error::MeshRankOutOfRange`] for
    /// the first rank, in list order, that is not below `world_size`).
    pub fn check_world_size(&self, world_size: u64) -> Result<()> {
        match self.ranks.iter().find(|&&r| r >= world_size) {
            Some(&rank) => Err(Error::MeshRankOutOfRange { rank, world_size }),
            None => Ok(()),
        }
    }
}

/// The sizes torch gives the coordinates `0..n` of a mesh dim of size `n` that shards a tensor dim of
/// size `size` (`torch.chunk`: chunks of `ceil(size / n)`, the last ones shorter or empty), without
/// repeats: the full chunk, the remainder, and 0 when some coordinate gets nothing. Empty when `n` is 0
/// (no coordinate).
fn chunk_sizes(size: u64, n: u64) -> impl Iterator<Item = u64> {
    let (full, rest, empty) = match (size, n) {
        (_, 0) => (None, None, None),
        (0, _) => (Some(0), None, None),
        _ => {
            let chunk = size.div_ceil(n); // >= 1
            let whole = size / chunk; // chunks of full size: 1..=n
            let rest = size - whole * chunk;
            (
                Some(chunk),
                (whole < n).then_some(rest),
                (whole + 1 < n && rest != 0).then_some(0),
            )
        }
    };
    full.into_iter().chain(rest).chain(empty)
}

/// Whether splitting a dim of `global` elements by the mesh dims of sizes `splits`, in order, leaves
/// `local` elements on some coordinate. The candidate sizes are kept without repeats (and never below
/// `local`: a split never grows a size); successive `ceil` divisions keep them to a few values.
fn is_local_size(global: u64, local: u64, splits: impl Iterator<Item = u64>) -> bool {
    let mut sizes = alloc::vec![global];
    for n in splits {
        if n == 1 {
            continue;
        }
        let mut next = Vec::with_capacity(sizes.len() * 3);
        for s in sizes.iter().flat_map(|&s| chunk_sizes(s, n)) {
            if s >= local && !next.contains(&s) {
                next.push(s);
            }
        }
        if next.is_empty() {
            return false;
        }
        sizes = next;
    }
    sizes.contains(&local)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn chunk_sizes_follow_torch_chunk() {
        let sizes = |size, n| chunk_sizes(size, n).collect::<Vec<_>>();
        // torch.chunk(arange(10), 4) → 3, 3, 3, 1; (7, 4) → 2, 2, 2, 1; (3, 4) → 1, 1, 1, 0.
        assert_eq!(sizes(10, 4), vec![3, 1]);
        assert_eq!(sizes(7, 4), vec![2, 1]);
        assert_eq!(sizes(3, 4), vec![1, 0]);
        // (4, 3) → 2, 2, 0; (8, 2) → 4, 4; (1, 8) → 1 then 0s; (0, 3) → 0s.
        assert_eq!(sizes(4, 3), vec![2, 0]);
        assert_eq!(sizes(8, 2), vec![4]);
        assert_eq!(sizes(1, 8), vec![1, 0]);
        assert_eq!(sizes(0, 3), vec![0]);
        assert_eq!(sizes(5, 0), Vec::<u64>::new());
    }

    #[test]
    fn local_sizes_through_successive_splits() {
        let ok = |g, l, splits: &[u64]| is_local_size(g, l, splits.iter().copied());
        assert!(ok(8, 8, &[]));
        assert!(!ok(8, 4, &[]));
        assert!(ok(8, 4, &[2]));
        assert!(!ok(8, 8, &[2]));
        assert!(ok(1, 1, &[2]) && ok(1, 0, &[2]));
        // [Shard(0), Shard(0)] on a 2×3 mesh over 10: 5 then 2, 2, 1.
        assert!(ok(10, 2, &[2, 3]) && ok(10, 1, &[2, 3]));
        assert!(!ok(10, 5, &[2, 3]) && !ok(10, 3, &[2, 3]));
        // A mesh dim of size 1 leaves the size alone.
        assert!(ok(6, 6, &[1, 1]));
        // Large sizes and many splits stay cheap.
        assert!(ok(u64::MAX, u64::MAX.div_ceil(3).div_ceil(3), &[3, 3]));
        let splits = [2u64; 63];
        assert!(ok(u64::MAX, 1, &splits));
        assert!(!ok(u64::MAX, 3, &splits));
    }
}
