//! Tensor layout: how a view (shape, stride, storage offset — element units, as torch) sits in its
//! storage of `nbytes` bytes, and the checks that make a layout from untrusted bytes safe to use.

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::{Error, Result};

/// The layout of one tensor: a strided view into a storage whose raw bytes travel on the wire.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TensorLayout {
    /// Element type of the view and of the storage.
    pub dtype: DType,
    /// Size of each dimension; empty for a 0-dim scalar.
    pub shape: Vec<u64>,
    /// Stride of each dimension in elements (never negative, as torch).
    pub stride: Vec<u64>,
    /// Offset of element `[0, …, 0]` from the start of the storage, in elements.
    pub storage_offset: u64,
    /// Byte size of the whole underlying storage; this many bytes travel on the wire.
    pub nbytes: u64,
}

impl TensorLayout {
    /// A contiguous tensor that owns exactly its storage.
    pub fn contiguous(dtype: DType, shape: &[u64]) -> TensorLayout {
        let stride = contiguous_strides(shape);
        let numel: u64 = shape.iter().product();
        TensorLayout {
            dtype,
            shape: shape.to_vec(),
            stride,
            storage_offset: 0,
            nbytes: numel * dtype.element_size(),
        }
    }

    /// Number of elements of the view (1 for a 0-dim scalar), or `None` on overflow.
    pub fn numel(&self) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |n, &s| n.checked_mul(s))
    }

    /// True when the view is row-major contiguous (dims of size 1 may have any stride, as torch).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1u64;
        for (&size, &stride) in self.shape.iter().zip(&self.stride).rev() {
            if size == 0 {
                return true;
            }
            if size != 1 {
                if stride != expected {
                    return false;
                }
                expected = match expected.checked_mul(size) {
                    Some(e) => e,
                    None => return false,
                };
            }
        }
        true
    }

    /// True when the view is contiguous, starts at offset 0 and covers its whole storage, so the storage
    /// bytes are exactly the view's elements in order.
    pub fn is_dense(&self) -> bool {
        self.storage_offset == 0
            && self.is_contiguous()
            && self
                .numel()
                .and_then(|n| n.checked_mul(self.dtype.element_size()))
                == Some(self.nbytes)
    }

    /// The byte range `[start, end)` of the storage the view reads; empty (`0..0`) when the view has no
    /// elements. Errors on overflow.
    pub fn byte_range(&self) -> Result<core::ops::Range<u64>> {
        if self.shape.contains(&0) {
            return Ok(0..0);
        }
        let overflow = || Error::LayoutOverflow;
        let mut last = self.storage_offset;
        for (&size, &stride) in self.shape.iter().zip(&self.stride) {
            let span = (size - 1).checked_mul(stride).ok_or_else(overflow)?;
            last = last.checked_add(span).ok_or_else(overflow)?;
        }
        let es = self.dtype.element_size();
        let start = self.storage_offset.checked_mul(es).ok_or_else(overflow)?;
        let end = last
            .checked_add(1)
            .and_then(|e| e.checked_mul(es))
            .ok_or_else(overflow)?;
        Ok(start..end)
    }

    /// Checks the layout: as many strides as dims, at most `max_ndim` dims, `nbytes` a multiple of the
    /// element size, and the view inside the storage.
    pub fn validate(&self, max_ndim: u32) -> Result<()> {
        if self.shape.len() > max_ndim as usize {
            return Err(Error::TooManyDims {
                ndim: self.shape.len() as u64,
                max: max_ndim,
            });
        }
        if self.shape.len() != self.stride.len() {
            return Err(Error::StrideRankMismatch {
                shape: self.shape.len() as u64,
                stride: self.stride.len() as u64,
            });
        }
        if self.nbytes % self.dtype.element_size() != 0 {
            return Err(Error::StorageNotWholeElements {
                nbytes: self.nbytes,
                element_size: self.dtype.element_size(),
            });
        }
        self.numel().ok_or(Error::LayoutOverflow)?;
        let range = self.byte_range()?;
        if range.end > self.nbytes {
            return Err(Error::ViewOutOfBounds {
                needed: range.end,
                nbytes: self.nbytes,
            });
        }
        Ok(())
    }
}

/// Row-major contiguous strides for `shape`, in elements (torch's convention: a dim of size 0 or 1 still
/// gets the product of the later sizes).
pub fn contiguous_strides(shape: &[u64]) -> Vec<u64> {
    let mut stride = alloc::vec![0u64; shape.len()];
    let mut acc = 1u64;
    for (s, &size) in stride.iter_mut().zip(shape).rev() {
        *s = acc;
        acc = acc.saturating_mul(size.max(1));
    }
    stride
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn layout(shape: &[u64], stride: &[u64], offset: u64, nbytes: u64) -> TensorLayout {
        TensorLayout {
            dtype: DType::Float32,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
            storage_offset: offset,
            nbytes,
        }
    }

    #[test]
    fn contiguous_layout_is_dense_and_valid() {
        let l = TensorLayout::contiguous(DType::BFloat16, &[3, 4]);
        assert_eq!(l.stride, vec![4, 1]);
        assert_eq!(l.nbytes, 24);
        assert!(l.is_dense());
        l.validate(8).unwrap();
    }

    #[test]
    fn transposed_view_is_not_contiguous_but_valid() {
        let l = layout(&[4, 3], &[1, 4], 0, 48);
        assert!(!l.is_contiguous());
        assert_eq!(l.byte_range().unwrap(), 0..48);
        l.validate(8).unwrap();
    }

    #[test]
    fn offset_view_range() {
        let l = layout(&[2], &[1], 5, 40);
        assert_eq!(l.byte_range().unwrap(), 20..28);
        assert!(!l.is_dense());
        l.validate(8).unwrap();
    }

    #[test]
    fn scalar_and_zero_size() {
        let scalar = layout(&[], &[], 3, 16);
        assert_eq!(scalar.numel(), Some(1));
        assert_eq!(scalar.byte_range().unwrap(), 12..16);
        scalar.validate(8).unwrap();
        // A zero-size view touches nothing, whatever its offset.
        let empty = layout(&[0, 5], &[5, 1], 1000, 0);
        assert_eq!(empty.byte_range().unwrap(), 0..0);
        empty.validate(8).unwrap();
    }

    #[test]
    fn view_past_storage_is_rejected() {
        let l = layout(&[2, 2], &[2, 1], 1, 16);
        assert_eq!(
            l.validate(8),
            Err(Error::ViewOutOfBounds {
                needed: 20,
                nbytes: 16
            })
        );
    }

    #[test]
    fn overflow_is_an_error_not_a_panic() {
        let l = layout(&[u64::MAX, 2], &[u64::MAX, 1], 0, 16);
        assert_eq!(l.validate(8), Err(Error::LayoutOverflow));
    }

    #[test]
    fn shape_stride_mismatch_and_partial_elements() {
        assert_eq!(
            layout(&[2], &[], 0, 8).validate(8),
            Err(Error::StrideRankMismatch {
                shape: 1,
                stride: 0
            })
        );
        assert_eq!(
            layout(&[1], &[1], 0, 6).validate(8),
            Err(Error::StorageNotWholeElements {
                nbytes: 6,
                element_size: 4
            })
        );
        assert_eq!(
            layout(&[1; 9], &[1; 9], 0, 4).validate(8),
            Err(Error::TooManyDims { ndim: 9, max: 8 })
        );
    }
}
