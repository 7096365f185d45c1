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
        Ok(())
    }
}
