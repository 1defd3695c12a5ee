//! Element types of safetensors checkpoints and the float8 E4M3 ("fn") number format.
//!
//! The float8 helpers are the reference the synthesizer encodes with and the engine's decoders
//! are tested against; they cover every one of the 256 codes.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A tensor element type as a safetensors header spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DType {
    /// Boolean (one byte).
    #[serde(rename = "BOOL")]
    Bool,
    /// Unsigned 8-bit integer.
    #[serde(rename = "U8")]
    U8,
    /// Signed 8-bit integer.
    #[serde(rename = "I8")]
    I8,
    /// Signed 16-bit integer.
    #[serde(rename = "I16")]
    I16,
    /// Unsigned 16-bit integer.
    #[serde(rename = "U16")]
    U16,
    /// Signed 32-bit integer.
    #[serde(rename = "I32")]
    I32,
    /// Unsigned 32-bit integer.
    #[serde(rename = "U32")]
    U32,
    /// Signed 64-bit integer.
    #[serde(rename = "I64")]
    I64,
    /// Unsigned 64-bit integer.
    #[serde(rename = "U64")]
    U64,
    /// Float8 E4M3 ("fn" variant: no infinities).
    #[serde(rename = "F8_E4M3")]
    F8E4M3,
    /// Float8 E5M2.
    #[serde(rename = "F8_E5M2")]
    F8E5M2,
    /// IEEE half precision.
    #[serde(rename = "F16")]
    F16,
    /// bfloat16.
    #[serde(rename = "BF16")]
    BF16,
    /// IEEE single precision.
    #[serde(rename = "F32")]
    F32,
    /// IEEE double precision.
    #[serde(rename = "F64")]
    F64,
}

impl DType {
    /// Every type, in the order listed to users.
    pub const ALL: [DType; 15] = [
        DType::F8E4M3,
        DType::F8E5M2,
        DType::BF16,
        DType::F16,
        DType::F32,
        DType::F64,
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::U16,
        DType::I32,
        DType::U32,
        DType::I64,
        DType::U64,
    ];

    /// The header's spelling (`F8_E4M3`, `BF16`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::I64 => "I64",
            DType::U64 => "U64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
        }
    }

    /// Parses the header's spelling; `None` for anything else.
    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.as_str() == s)
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> u64 {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 => 1,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
            DType::I32 | DType::U32 | DType::F32 => 4,
            DType::I64 | DType::U64 | DType::F64 => 8,
        }
    }

    /// Whether the engine can hold model weights of this type.
    pub fn is_weight_type(self) -> bool {
        matches!(self, DType::F8E4M3 | DType::BF16 | DType::F16 | DType::F32)
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Largest finite float8 E4M3 value.
pub const F8E4M3_MAX: f32 = 448.0;

/// Decodes one float8 E4M3 ("fn": no infinities, 0x7f/0xff are NaN) code.
pub fn f8e4m3_to_f32(code: u8) -> f32 {
    float8::F8E4M3::from_bits(code).to_f32()
}

/// Encodes an f32 as float8 E4M3, rounding to nearest (ties to even) and saturating at ±448,
/// as the fork's cast does (PyTorch's own cast makes NaN there); NaN stays NaN. The `float8`
/// crate converts; the saturation is ours.
pub fn f32_to_f8e4m3(value: f32) -> u8 {
    float8::F8E4M3::from_f32(value.clamp(-F8E4M3_MAX, F8E4M3_MAX)).to_bits()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format's definition, written out: sign, 4 exponent bits (bias 7), 3 mantissa bits,
    /// subnormals at exponent 0, NaN at all ones (no infinities).
    fn defined(code: u8) -> f32 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let (exponent, mantissa) = (i32::from((code >> 3) & 0x0f), f32::from(code & 0x07));
        if exponent == 0x0f && mantissa == 7.0 {
            return f32::NAN;
        }
        sign * match exponent {
            0 => mantissa / 8.0 * 2f32.powi(-6),
            e => (1.0 + mantissa / 8.0) * 2f32.powi(e - 7),
        }
    }

    #[test]
    fn f8_decodes_every_code_as_the_format_defines() {
        for code in 0u8..=255 {
            let (got, want) = (f8e4m3_to_f32(code), defined(code));
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "code {code:#04x}: {got} against {want}"
            );
        }
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
    }

    #[test]
    fn f8_round_trips_every_finite_code() {
        for code in 0u8..=255 {
            let value = f8e4m3_to_f32(code);
            if value.is_nan() {
                continue;
            }
            // -0.0 and +0.0 keep their sign.
            assert_eq!(f32_to_f8e4m3(value), code, "code {code:#04x} value {value}");
        }
    }

    #[test]
    fn f8_rounds_to_nearest_even_and_saturates() {
        // Between 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even code.
        assert_eq!(f32_to_f8e4m3(1.0625), 0x38);
        assert_eq!(f32_to_f8e4m3(1.07), 0x39);
        assert_eq!(f32_to_f8e4m3(1000.0), 0x7e);
        assert_eq!(f32_to_f8e4m3(-1000.0), 0xfe);
        assert_eq!(f32_to_f8e4m3(f32::INFINITY), 0x7e);
        assert_eq!(f32_to_f8e4m3(1e-9), 0x00);
        assert!(f8e4m3_to_f32(f32_to_f8e4m3(f32::NAN)).is_nan());
        // Every bf16 value encodes to its nearest code (ties to the even one).
        for bits in 0..=u16::MAX {
            let x = half::bf16::from_bits(bits).to_f32();
            if x.is_nan() {
                continue;
            }
            let code = f32_to_f8e4m3(x);
            let clamped = x.clamp(-448.0, 448.0);
            let error = (f8e4m3_to_f32(code) - clamped).abs();
            let best = (0u8..=255)
                .map(f8e4m3_to_f32)
                .filter(|v| !v.is_nan())
                .map(|v| (v - clamped).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!(error, best, "{x:e} -> {code:#04x}");
        }
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DType::parse("F8_E4M3FN"), None);
    }
}
