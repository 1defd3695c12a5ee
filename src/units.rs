//! Byte counts as people read them.

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// Bytes as GiB with two decimals.
pub fn gib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / GIB)
}
