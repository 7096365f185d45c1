//! Element types: every torch dtype, its size, its torch and safetensors names, and float conversion.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A tensor element type. The discriminant is the wire value (postcard varint of the variant index).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum DType {
    Float64,
    Float32,
    Float16,
    BFloat16,
    Float8E4M3Fn,
    Float8E5M2,
    Float8E4M3Fnuz,
    Float8E5M2Fnuz,
    Complex128,
    Complex64,
    Complex32,
    Int64,
    Int32,
    Int16,
    Int8,
    UInt64,
    UInt32,
    UInt16,
    UInt8,
    Bool,
}

impl DType {
    /// Every dtype, in wire order.
    pub const ALL: [DType; 20] = [
        DType::Float64,
        DType::Float32,
        DType::Float16,
        DType::BFloat16,
        DType::Float8E4M3Fn,
        DType::Float8E5M2,
        DType::Float8E4M3Fnuz,
        DType::Float8E5M2Fnuz,
        DType::Complex128,
        DType::Complex64,
        DType::Complex32,
        DType::Int64,
        DType::Int32,
        DType::Int16,
        DType::Int8,
        DType::UInt64,
        DType::UInt32,
        DType::UInt16,
        DType::UInt8,
        DType::Bool,
    ];

    /// Bytes per element.
    pub const fn element_size(self) -> u64 {
        match self {
            DType::Complex128 => 16,
            DType::Float64 | DType::Complex64 | DType::Int64 | DType::UInt64 => 8,
            DType::Float32 | DType::Complex32 | DType::Int32 | DType::UInt32 => 4,
            DType::Float16 | DType::BFloat16 | DType::Int16 | DType::UInt16 => 2,
            DType::Float8E4M3Fn
            | DType::Float8E5M2
            | DType::Float8E4M3Fnuz
            | DType::Float8E5M2Fnuz
            | DType::Int8
            | DType::UInt8
            | DType::Bool => 1,
        }
    }

    /// The torch name, as in `torch.float32` → `"float32"`.
    pub const fn torch_name(self) -> &'static str {
        match self {
            DType::Float64 => "float64",
            DType::Float32 => "float32",
            DType::Float16 => "float16",
            DType::BFloat16 => "bfloat16",
            DType::Float8E4M3Fn => "float8_e4m3fn",
            DType::Float8E5M2 => "float8_e5m2",
            DType::Float8E4M3Fnuz => "float8_e4m3fnuz",
            DType::Float8E5M2Fnuz => "float8_e5m2fnuz",
            DType::Complex128 => "complex128",
            DType::Complex64 => "complex64",
            DType::Complex32 => "complex32",
            DType::Int64 => "int64",
            DType::Int32 => "int32",
            DType::Int16 => "int16",
            DType::Int8 => "int8",
            DType::UInt64 => "uint64",
            DType::UInt32 => "uint32",
            DType::UInt16 => "uint16",
            DType::UInt8 => "uint8",
            DType::Bool => "bool",
        }
    }

    /// The safetensors header name (`"F32"`, `"BF16"`, …), or `None` where safetensors has no such dtype
    /// (complex types and the `fnuz` float8 variants).
    pub const fn safetensors_name(self) -> Option<&'static str> {
        Some(match self {
            DType::Float64 => "F64",
            DType::Float32 => "F32",
            DType::Float16 => "F16",
            DType::BFloat16 => "BF16",
            DType::Float8E4M3Fn => "F8_E4M3",
            DType::Float8E5M2 => "F8_E5M2",
            DType::Int64 => "I64",
            DType::Int32 => "I32",
            DType::Int16 => "I16",
            DType::Int8 => "I8",
            DType::UInt64 => "U64",
            DType::UInt32 => "U32",
            DType::UInt16 => "U16",
            DType::UInt8 => "U8",
            DType::Bool => "BOOL",
            DType::Float8E4M3Fnuz
            | DType::Float8E5M2Fnuz
            | DType::Complex128
            | DType::Complex64
            | DType::Complex32 => return None,
        })
    }

    /// Parses a torch name (with or without the `torch.` prefix).
    pub fn from_torch_name(name: &str) -> Option<DType> {
        let name = name.strip_prefix("torch.").unwrap_or(name);
        DType::ALL.into_iter().find(|d| d.torch_name() == name)
    }

    /// Parses a safetensors dtype name.
    pub fn from_safetensors_name(name: &str) -> Option<DType> {
        DType::ALL
            .into_iter()
            .find(|d| d.safetensors_name() == Some(name))
    }

    /// True for the dtypes [`convert`] can convert between: float64, float32, float16, bfloat16.
    pub const fn is_castable_float(self) -> bool {
        matches!(
            self,
            DType::Float64 | DType::Float32 | DType::Float16 | DType::BFloat16
        )
    }
}

impl core::fmt::Display for DType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.torch_name())
    }
}

/// Converts a contiguous run of little-endian elements from `from` to `to` (float64/32/16 and bfloat16;
/// rounding to nearest even, as torch's `.to()`). `src.len()` must be a multiple of `from`'s element size
/// and `dst` must hold exactly as many elements of `to`.
pub fn convert(from: DType, src: &[u8], to: DType, dst: &mut [u8]) -> Result<()> {
    if !from.is_castable_float() || !to.is_castable_float() {
        return Err(Error::UnsupportedCast { from, to });
    }
    let (fs, ts) = (from.element_size() as usize, to.element_size() as usize);
    if src.len() % fs != 0 || dst.len() % ts != 0 || src.len() / fs != dst.len() / ts {
        return Err(Error::CastLength {
            src_bytes: src.len() as u64,
            dst_bytes: dst.len() as u64,
        });
    }
    if from == to {
        dst.copy_from_slice(src);
        return Ok(());
    }
    for (s, d) in src.chunks_exact(fs).zip(dst.chunks_exact_mut(ts)) {
        write_float(to, read_float(from, s), d);
    }
    Ok(())
}

// f64 is exact for every castable source type, so every conversion goes through it; half's
// `from_f64` rounds to nearest even directly (no double rounding through f32).
fn read_float(dtype: DType, b: &[u8]) -> f64 {
    match dtype {
        DType::Float64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
        DType::Float32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
        DType::Float16 => half::f16::from_le_bytes([b[0], b[1]]).to_f64(),
        _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f64(),
    }
}

fn write_float(dtype: DType, v: f64, out: &mut [u8]) {
    match dtype {
        DType::Float64 => out.copy_from_slice(&v.to_le_bytes()),
        DType::Float32 => out.copy_from_slice(&(v as f32).to_le_bytes()),
        DType::Float16 => out.copy_from_slice(&half::f16::from_f64(v).to_le_bytes()),
        _ => out.copy_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_torch_name(d.torch_name()), Some(d));
            if let Some(n) = d.safetensors_name() {
                assert_eq!(DType::from_safetensors_name(n), Some(d));
            }
        }
        assert_eq!(
            DType::from_torch_name("torch.bfloat16"),
            Some(DType::BFloat16)
        );
        assert_eq!(DType::from_torch_name("float128"), None);
    }

    #[test]
    fn convert_f32_to_bf16_and_back() {
        let vals = [1.0f32, -2.5, 3.140625, 65504.0, 0.0];
        let src: alloc::vec::Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut mid = [0u8; 10];
        convert(DType::Float32, &src, DType::BFloat16, &mut mid).unwrap();
        let mut back = [0u8; 20];
        convert(DType::BFloat16, &mid, DType::Float32, &mut back).unwrap();
        let got: alloc::vec::Vec<f32> = back
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(got, [1.0, -2.5, 3.140625, 65536.0, 0.0]);
    }

    #[test]
    fn convert_f64_to_f16_rounds_to_nearest() {
        let src = 1.0009765625f64.to_le_bytes(); // exactly 1 + 2^-10, representable in f16
        let mut dst = [0u8; 2];
        convert(DType::Float64, &src, DType::Float16, &mut dst).unwrap();
        assert_eq!(half::f16::from_le_bytes(dst).to_f64(), 1.0009765625);
    }

    #[test]
    fn convert_rejects_ints_and_bad_lengths() {
        let mut dst = [0u8; 4];
        assert_eq!(
            convert(DType::Int32, &[0; 4], DType::Float32, &mut dst),
            Err(Error::UnsupportedCast {
                from: DType::Int32,
                to: DType::Float32
            })
        );
        assert_eq!(
            convert(DType::Float32, &[0; 8], DType::Float32, &mut dst),
            Err(Error::CastLength {
                src_bytes: 8,
                dst_bytes: 4
            })
        );
    }
}
