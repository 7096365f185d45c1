//! Validation: [`Metadata`] decoded from untrusted bytes becomes a [`Manifest`] (a separate type, so
//! unvalidated metadata is never used), with the tables both sides derive from it: key paths and the
//! storage list.

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::header::{Limits, FLAG_DIGESTS};
use crate::plan::{count_data_messages, Plan};
use crate::schema::Metadata;
use crate::tree::{check_structure, key_paths_for, KeyPath, Leaf};
use crate::{Error, Result};

/// Where one storage (one wire byte stream) comes from: leaf `leaf`, local shard `shard` (0 for plain
/// tensors and DTensors).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageRef {
    /// Index of the leaf in [`Metadata::leaves`].
    pub leaf: u32,
    /// Index of the local shard for a ShardedTensor, else 0.
    pub shard: u32,
    /// Bytes of the storage.
    pub nbytes: u64,
    /// Element type of the storage.
    pub dtype: crate::dtype::DType,
}

/// Validated metadata plus the tables derived from it: key paths and the storage list.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    metadata: Metadata,
    digests: bool,
    paths: LazyPaths,
    storages: Vec<StorageRef>,
    leaf_storages: Vec<u32>,
    total_bytes: u64,
}

impl Manifest {
    /// Validates `metadata` under `limits`. `digests`: whether the transfer carries a digest trailer.
    pub fn new(metadata: Metadata, digests: bool, limits: &Limits) -> Result<Manifest> {
        if metadata.leaves.len() as u64 > limits.max_leaves {
            return Err(Error::TooManyLeaves {
                count: metadata.leaves.len() as u64,
                max: limits.max_leaves,
            });
        }
        if metadata.destinations.is_empty() {
            return Err(Error::NoDestinations);
        }
        let mut seen = alloc::collections::BTreeSet::new();
        for &d in &metadata.destinations {
            if d == metadata.source {
                return Err(Error::SourceIsDestination { rank: d });
            }
            if !seen.insert(d) {
                return Err(Error::DuplicateDestination { rank: d });
            }
        }
        metadata.plan.validate()?;
        // The paths themselves are built only when asked for (`paths`): a receiver into fresh memory
        // never needs them.
        let tree_leaves = check_structure(
            &metadata.tree,
            limits.max_depth,
            limits.max_metadata_bytes.saturating_mul(4),
        )?;
        if tree_leaves != metadata.leaves.len() as u64 {
            return Err(Error::LeafCountMismatch {
                tree: tree_leaves,
                leaves: metadata.leaves.len() as u64,
            });
        }
        let count: usize = metadata.leaves.iter().map(|l| l.storages().count()).sum();
        let mut storages = Vec::with_capacity(count);
        let mut leaf_storages = Vec::with_capacity(metadata.leaves.len() + 1);
        let mut total_bytes = 0u64;
        for (i, leaf) in metadata.leaves.iter().enumerate() {
            validate_leaf(leaf, limits.max_ndim)?;
            leaf_storages.push(storages.len() as u32);
            for (shard, layout) in leaf.storages().enumerate() {
                total_bytes = total_bytes
                    .checked_add(layout.nbytes)
                    .filter(|&t| t <= limits.max_total_bytes)
                    .ok_or(Error::TotalBytesTooLarge {
                        max: limits.max_total_bytes,
                    })?;
                storages.push(StorageRef {
                    leaf: i as u32,
                    shard: shard as u32,
                    nbytes: layout.nbytes,
                    dtype: layout.dtype,
                });
            }
        }
        leaf_storages.push(storages.len() as u32);
        let manifest = Manifest {
            metadata,
            digests,
            paths: LazyPaths::default(),
            storages,
            leaf_storages,
            total_bytes,
        };
        // The plan's size is checked here so that a manifest always has a plan within the limits.
        let messages = count_data_messages(
            manifest.storages.iter().map(|s| s.nbytes),
            manifest.metadata.plan,
        );
        if messages > limits.max_messages {
            return Err(Error::TooManyMessages {
                count: messages,
                max: limits.max_messages,
            });
        }
        Ok(manifest)
    }

    /// The validated metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    /// Changes the step: it is not validated and no derived table depends on it.
    pub(crate) fn set_step(&mut self, step: Option<u64>) {
        self.metadata.step = step;
    }

    /// Takes the metadata back.
    pub fn into_metadata(self) -> Metadata {
        self.metadata
    }

    /// Whether a digest trailer follows the data.
    pub fn digests(&self) -> bool {
        self.digests
    }

    /// The key path of every leaf, in leaf order: built on the first call (validation checked the
    /// structure; a received manifest's paths are bounded by its decoded size, PROTOCOL.md §11).
    pub fn paths(&self) -> &[KeyPath] {
        self.paths.0.get_or_init(|| {
            key_paths_for(&self.metadata.tree, u32::MAX, self.metadata.leaves.len())
                .unwrap_or_default()
        })
    }

    /// Every storage that travels, in wire order.
    pub fn storages(&self) -> &[StorageRef] {
        &self.storages
    }

    /// The storages of leaf `leaf`, as a range of indices into [`Manifest::storages`].
    pub fn leaf_storages(&self, leaf: usize) -> core::ops::Range<usize> {
        match (
            self.leaf_storages.get(leaf),
            self.leaf_storages.get(leaf + 1),
        ) {
            (Some(&a), Some(&b)) => a as usize..b as usize,
            _ => 0..0,
        }
    }

    /// Sum of all storage bytes.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes
    }

    /// The plan of this transfer, whose postcard metadata is `metadata_len` bytes (the header's).
    pub fn plan(&self, metadata_len: u64) -> Plan {
        let sizes: Vec<u64> = self.storages.iter().map(|s| s.nbytes).collect();
        Plan::new(&sizes, self.metadata.plan, self.digests, metadata_len)
    }

    /// The header flags this transfer uses.
    pub fn flags(&self) -> u16 {
        if self.digests {
            FLAG_DIGESTS
        } else {
            0
        }
    }
}

/// A manifest's key paths, built on first use. Derived from the tree, so it never makes two manifests
/// differ.
#[derive(Clone, Debug, Default)]
struct LazyPaths(core::cell::OnceCell<Vec<KeyPath>>);

impl PartialEq for LazyPaths {
    fn eq(&self, _: &LazyPaths) -> bool {
        true
    }
}

fn validate_leaf(leaf: &Leaf, max_ndim: u32) -> Result<()> {
    match leaf {
        Leaf::Value(_) => Ok(()),
        Leaf::Tensor(layout) => layout.validate(max_ndim),
        Leaf::DTensor { local, spec } => {
            local.validate(max_ndim)?;
            spec.validate(local, max_ndim)
        }
        Leaf::Sharded {
            local_shards,
            global,
        } => {
            for shard in local_shards {
                shard.layout.validate(max_ndim)?;
            }
            global.validate(local_shards, max_ndim)
        }
    }
}
