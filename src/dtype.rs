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
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exponent = i32::from((code >> 3) & 0x0f);
    let mantissa = f32::from(code & 0x07);
    if exponent == 0x0f && mantissa == 7.0 {
        return f32::NAN;
    }
    let magnitude = if exponent == 0 {
        mantissa / 8.0 * 2f32.powi(-6)
    } else {
        (1.0 + mantissa / 8.0) * 2f32.powi(exponent - 7)
    };
    sign * magnitude
}

/// Encodes a finite f32 as float8 E4M3, rounding to nearest (ties to even) and saturating at
/// ±448. NaN encodes as 0x7f.
pub fn f32_to_f8e4m3(value: f32) -> u8 {
    if value.is_nan() {
        return 0x7f;
    }
    let sign = if value.is_sign_negative() { 0x80 } else { 0 };
    let magnitude = value.abs();
    if magnitude >= F8E4M3_MAX {
        return sign | 0x7e;
    }
    // Codes 0x00..=0x7e are the non-negative values in increasing order.
    let above = (0u8..=0x7e)
        .find(|&c| f8e4m3_to_f32(c) >= magnitude)
        .unwrap_or(0x7e);
    if above == 0 {
        return sign;
    }
    let below = above - 1;
    let (lo, hi) = (f8e4m3_to_f32(below), f8e4m3_to_f32(above));
    let code = if magnitude - lo < hi - magnitude {
        below
    } else if magnitude - lo > hi - magnitude {
        above
    } else if below % 2 == 0 {
        below
    } else {
        above
    };
    sign | code
}

/// [`f32_to_f8e4m3`] by bit arithmetic instead of a search over the codes: the same code for
/// every input (tested on every bf16 and f16 value and a sweep of f32), without branches, fast
/// enough to convert billions of weights.
pub fn f32_to_f8e4m3_fast(value: f32) -> u8 {
    let bits = value.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let m = bits & 0x7fff_ffff;
    let magnitude = f32::from_bits(m);
    // Subnormal codes are multiples of 2^-9. Adding 2^14, whose f32 ulp is 2^-9, rounds to the
    // nearest multiple (ties to even) in the addition itself and leaves the multiple in the low
    // mantissa bits; 8 * 2^-9 is code 8, the smallest normal value.
    const ULP_2_POW_MINUS_9: f32 = 16384.0;
    let subnormal = (magnitude + ULP_2_POW_MINUS_9)
        .to_bits()
        .wrapping_sub(ULP_2_POW_MINUS_9.to_bits()) as u8;
    // Normal: f32's exponent rebiased from 127 to 7 and the top 3 of its 23 mantissa bits,
    // rounded to nearest even on the 20 dropped; a carry out of the mantissa moves to the next
    // exponent, and below 448 never reaches the NaN code 0x7f.
    let rounded = m.wrapping_add(0x7_ffff + ((m >> 20) & 1));
    let normal = (rounded >> 20).wrapping_sub((127 - 7) << 3) as u8;
    // Chosen by masks rather than branches: whether a weight is subnormal in float8 is a coin
    // toss a branch predictor loses.
    let mask = |condition: bool| 0u8.wrapping_sub(u8::from(condition));
    let (saturated, is_normal) = (
        mask(magnitude >= F8E4M3_MAX),
        mask(magnitude >= MIN_NORMAL_F8E4M3),
    );
    let code = (normal & is_normal) | (subnormal & !is_normal);
    let code = (0x7e & saturated) | (code & !saturated);
    let nan = mask(value.is_nan());
    (0x7f & nan) | ((sign | code) & !nan)
}

/// Smallest normal float8 E4M3 value, 2^-6.
const MIN_NORMAL_F8E4M3: f32 = 1.0 / 64.0;

/// Encodes an f32 as bf16 bits, rounding to nearest even.
pub fn f32_to_bf16_bits(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return 0x7fc0;
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

/// Decodes bf16 bits.
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f8_known_codes() {
        assert_eq!(f8e4m3_to_f32(0x00), 0.0);
        assert!(f8e4m3_to_f32(0x80).is_sign_negative());
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3_to_f32(0xfe), -448.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(f8e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(f8e4m3_to_f32(0x08), 2f32.powi(-6));
        assert!(f8e4m3_to_f32(0x7f).is_nan());
        assert!(f8e4m3_to_f32(0xff).is_nan());
    }

    #[test]
    fn f8_round_trips_every_finite_code() {
        for code in 0u8..=255 {
            let value = f8e4m3_to_f32(code);
            if value.is_nan() {
                continue;
            }
            let back = f32_to_f8e4m3(value);
            // -0.0 and +0.0 keep their sign.
            assert_eq!(back, code, "code {code:#04x} value {value}");
        }
    }

    #[test]
    fn f8_rounds_to_nearest_even_and_saturates() {
        // Between 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even code.
        assert_eq!(f32_to_f8e4m3(1.0625), 0x38);
        assert_eq!(f32_to_f8e4m3(1.07), 0x39);
        assert_eq!(f32_to_f8e4m3(1000.0), 0x7e);
        assert_eq!(f32_to_f8e4m3(-1000.0), 0xfe);
        assert_eq!(f32_to_f8e4m3(1e-9), 0x00);
    }

    #[test]
    fn the_fast_f8_encoder_agrees_with_the_reference() {
        let check = |x: f32| {
            let (fast, reference) = (f32_to_f8e4m3_fast(x), f32_to_f8e4m3(x));
            assert_eq!(fast, reference, "{x:e} ({:#010x})", x.to_bits());
        };
        // Every bf16 and every f16 value (infinities and NaN included).
        for bits in 0..=u16::MAX {
            check(bf16_bits_to_f32(bits));
            check(half::f16::from_bits(bits).to_f32());
        }
        // f32 values with every exponent of the range and mantissas around the rounding
        // points, from 2^-12 to 2^10.
        for bits in (0x3980_0000u32..0x4480_0000).step_by(1021) {
            check(f32::from_bits(bits));
            check(-f32::from_bits(bits));
        }
    }

    #[test]
    fn bf16_round_trip() {
        assert_eq!(bf16_bits_to_f32(f32_to_bf16_bits(1.0)), 1.0);
        assert_eq!(bf16_bits_to_f32(f32_to_bf16_bits(-0.015625)), -0.015625);
        // 1 + 2^-8 is the midpoint between 1.0 and the next bf16 value: rounds to even (1.0).
        assert_eq!(bf16_bits_to_f32(f32_to_bf16_bits(1.0 + 2f32.powi(-8))), 1.0);
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::parse(d.as_str()), Some(d));
        }
        assert_eq!(DType::parse("F8_E4M3FN"), None);
    }
}
