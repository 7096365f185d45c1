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
        // A size that overflows saturates; `validate` rejects such a layout.
        let numel = checked_product(shape).unwrap_or(u64::MAX);
        TensorLayout {
            dtype,
            shape: shape.to_vec(),
            stride,
            storage_offset: 0,
            nbytes: numel.saturating_mul(dtype.element_size()),
        }
    }

    /// Number of elements of the view (1 for a 0-dim scalar), or `None` when it does not fit in a u64
    /// (see [`checked_product`]: a view with a dim of size 0 has 0 elements, whatever its other dims).
    pub fn numel(&self) -> Option<u64> {
        checked_product(&self.shape)
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

    /// The view's elements in row-major order, gathered from `storage` (the whole storage's bytes);
    /// `None` when the layout is inconsistent or the view does not lie inside `storage`. Rows whose
    /// elements are adjacent are copied whole.
    pub fn gather(&self, storage: &[u8]) -> Option<Vec<u8>> {
        if self.stride.len() != self.shape.len() {
            return None;
        }
        let range = self.byte_range().ok()?;
        if range.end > storage.len() as u64 {
            return None;
        }
        if self.is_contiguous() {
            return Some(storage[range.start as usize..range.end as usize].to_vec());
        }
        let es = self.dtype.element_size() as usize;
        let numel = self.numel()? as usize;
        let ndim = self.shape.len();
        // The innermost dimension is copied as one run when its elements are adjacent (the
        // view is not contiguous, so there is at least one dimension and no zero-size one).
        let (run, outer) = match self.stride.last() {
            Some(1) => (self.shape[ndim - 1] as usize, ndim - 1),
            _ => (1, ndim),
        };
        let mut out = Vec::with_capacity(numel * es);
        let mut index = alloc::vec![0u64; outer];
        for _ in 0..numel / run {
            let elem = self.storage_offset
                + index
                    .iter()
                    .zip(&self.stride)
                    .map(|(i, s)| i * s)
                    .sum::<u64>();
            let at = elem as usize * es;
            out.extend_from_slice(&storage[at..at + run * es]);
            for d in (0..outer).rev() {
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Some(out)
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

/// The product of `dims` (1 for none), or `None` when it exceeds `u64::MAX`. This is the true product:
/// a 0 among the dims makes it 0 even when the dims before it multiply past `u64::MAX` (`[2^32, 2^32, 0]`
/// is 0, not an overflow). Without a 0, checked multiplication in any order overflows exactly when the
/// true product does.
pub fn checked_product(dims: &[u64]) -> Option<u64> {
    if dims.contains(&0) {
        return Some(0);
    }
    dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
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

    #[test]
    fn gather_reads_views_in_row_major_order() {
        // A 3x4 float32 storage holding the element numbers 0..12 (one byte each, padded to 4).
        let storage: Vec<u8> = (0..12u8).flat_map(|i| [i, 0, 0, 0]).collect();
        let elems = |bytes: Vec<u8>| bytes.chunks(4).map(|c| c[0]).collect::<Vec<_>>();
        let g = |shape: &[u64], stride: &[u64], offset: u64| {
            layout(shape, stride, offset, 48)
                .gather(&storage)
                .map(elems)
        };
        assert_eq!(g(&[3, 4], &[4, 1], 0), Some((0..12).collect()));
        // Transposed, an offset row slice, a column, every other element of a row, 0-dim, empty.
        assert_eq!(
            g(&[4, 3], &[1, 4], 0),
            Some(vec![0, 4, 8, 1, 5, 9, 2, 6, 10, 3, 7, 11])
        );
        assert_eq!(g(&[2, 2], &[4, 1], 5), Some(vec![5, 6, 9, 10]));
        assert_eq!(g(&[3], &[4], 2), Some(vec![2, 6, 10]));
        assert_eq!(g(&[2], &[2], 1), Some(vec![1, 3]));
        assert_eq!(g(&[], &[], 7), Some(vec![7]));
        assert_eq!(g(&[0, 4], &[4, 1], 0), Some(vec![]));
        // Outside the storage, or strides that don't match the shape: no view.
        assert_eq!(g(&[3, 4], &[4, 1], 1), None);
        assert_eq!(g(&[3, 4], &[4], 0), None);
    }

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
    fn a_zero_dim_makes_the_product_zero_even_after_an_overflow() {
        assert_eq!(checked_product(&[]), Some(1));
        assert_eq!(checked_product(&[1 << 32, 1 << 32]), None);
        assert_eq!(checked_product(&[1 << 32, 1 << 32, 0]), Some(0));
        assert_eq!(checked_product(&[0, 1 << 32, 1 << 32]), Some(0));
        assert_eq!(
            checked_product(&[1 << 32, (1 << 32) - 1]),
            Some(u64::MAX - (1 << 32) + 1)
        );
        // A zero-size view with huge other dims is valid (it touches no bytes) and constructible.
        let l = layout(&[1 << 32, 1 << 32, 0], &[1 << 32, 1, 1], 0, 0);
        assert_eq!(l.numel(), Some(0));
        l.validate(8).unwrap();
        let c = TensorLayout::contiguous(DType::Float32, &[1 << 32, 1 << 32, 0]);
        assert_eq!(c.nbytes, 0);
        c.validate(8).unwrap();
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
