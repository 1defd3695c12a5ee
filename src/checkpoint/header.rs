//! The safetensors header: parsed and checked without touching tensor data.

use crate::dtype::DType;
use anyhow::{anyhow, bail, Result};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap};

/// Headers larger than this are refused (the 7B checkpoint's is about 200 KB).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// One tensor as the header describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// Full tensor name, e.g. `model.language_model.layers.0.mlp.up_proj.weight`.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Dimensions; empty for a scalar.
    pub shape: Vec<u64>,
    /// Byte range within the data section (after the header).
    pub data_start: u64,
    /// End of the byte range (exclusive).
    pub data_end: u64,
}

impl TensorInfo {
    /// Bytes of data.
    pub fn size_bytes(&self) -> u64 {
        self.data_end - self.data_start
    }

    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// A parsed, validated header.
#[derive(Clone, Debug)]
pub struct Header {
    /// Tensors, sorted by data offset.
    pub tensors: Vec<TensorInfo>,
    /// The optional `__metadata__` string map.
    pub metadata: BTreeMap<String, String>,
    /// Length of the JSON header in bytes (excluding the 8-byte length prefix).
    pub header_bytes: u64,
}

impl Header {
    /// Absolute file offset where the data section starts.
    pub fn data_offset(&self) -> u64 {
        8 + self.header_bytes
    }
}

/// Parses and validates the header of a safetensors file whose first bytes are `prefix`
/// (at least 8 bytes plus the header) and whose total length is `file_len`. `path` only names
/// the file in errors.
pub fn parse(prefix: &[u8], file_len: u64, path: &str) -> Result<Header> {
    if file_len < 8 || prefix.len() < 8 {
        bail!(
            "{path} is not a safetensors file: {file_len} bytes, too short for the 8-byte header length"
        );
    }
    let header_bytes = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    if header_bytes > MAX_HEADER_BYTES || 8 + header_bytes > file_len {
        bail!(
            "{path} is not a safetensors file (or is truncated): its header length field says \
             {header_bytes} bytes but the file has {file_len}"
        );
    }
    let json = &prefix[8..(8 + header_bytes) as usize];
    // Each entry is kept as its raw text and parsed alone: a whole-header JSON tree costs about
    // 25 times the header's size (2 GB for a crafted 89 MB header).
    let entries: HashMap<String, Box<RawValue>> =
        serde_json::from_slice(json).map_err(|e| match e.is_data() {
            true => {
                anyhow!("{path} is not a safetensors file: its header is JSON but not an object")
            }
            false => {
                anyhow!("{path} is not a safetensors file: its header is not valid JSON ({e})")
            }
        })?;
    let data_len = file_len - 8 - header_bytes;
    let mut tensors = Vec::with_capacity(entries.len());
    let mut metadata = BTreeMap::new();
    for (name, raw) in entries {
        let entry: serde_json::Value = serde_json::from_str(raw.get())
            .map_err(|e| anyhow!("{path}: tensor {name}: invalid JSON ({e})"))?;
        if name == "__metadata__" {
            metadata = parse_metadata(&entry, path)?;
            continue;
        }
        tensors.push(parse_tensor(name, &entry, data_len, path)?);
    }
    tensors.sort_by_key(|t| (t.data_start, t.data_end));
    for pair in tensors.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if b.data_start < a.data_end {
            bail!(
                "{path}: tensors {} (bytes {}..{}) and {} (bytes {}..{}) overlap; the file is corrupt",
                a.name, a.data_start, a.data_end, b.name, b.data_start, b.data_end
            );
        }
    }
    Ok(Header {
        tensors,
        metadata,
        header_bytes,
    })
}

fn parse_metadata(entry: &serde_json::Value, path: &str) -> Result<BTreeMap<String, String>> {
    let Some(map) = entry.as_object() else {
        bail!("{path}: __metadata__ must be an object of strings");
    };
    map.iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) => Ok((k.clone(), s.to_string())),
            None => Err(anyhow!("{path}: __metadata__ entry {k} is not a string")),
        })
        .collect()
}

fn parse_tensor(
    name: String,
    entry: &serde_json::Value,
    data_len: u64,
    path: &str,
) -> Result<TensorInfo> {
    let bad = |what: String| -> anyhow::Error { anyhow!("{path}: tensor {name}: {what}") };
    let dtype_str = entry
        .get("dtype")
        .and_then(|d| d.as_str())
        .ok_or_else(|| bad("no \"dtype\" string".into()))?;
    let dtype = DType::parse(dtype_str).ok_or_else(|| {
        let known: Vec<&str> = DType::ALL.iter().map(|d| d.as_str()).collect();
        bad(format!(
            "unknown dtype \"{dtype_str}\" (known: {})",
            known.join(", ")
        ))
    })?;
    let shape = entry
        .get("shape")
        .and_then(|s| s.as_array())
        .ok_or_else(|| bad("no \"shape\" array".into()))?
        .iter()
        .map(|d| d.as_u64())
        .collect::<Option<Vec<u64>>>()
        .ok_or_else(|| bad("shape has a dimension that is not a non-negative integer".into()))?;
    let offsets = entry
        .get("data_offsets")
        .and_then(|o| o.as_array())
        .filter(|o| o.len() == 2)
        .and_then(|o| Some((o[0].as_u64()?, o[1].as_u64()?)))
        .ok_or_else(|| bad("\"data_offsets\" must be two non-negative integers".into()))?;
    let (data_start, data_end) = offsets;
    if data_end < data_start {
        return Err(bad(format!(
            "data_offsets [{data_start}, {data_end}] end before they start"
        )));
    }
    if data_end > data_len {
        return Err(bad(format!(
            "data_offsets [{data_start}, {data_end}] run past the end of the data section \
             ({data_len} bytes); the file is truncated or corrupt"
        )));
    }
    let expected = shape
        .iter()
        .try_fold(dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows")))?;
    if expected != data_end - data_start {
        return Err(bad(format!(
            "data_offsets hold {} bytes but {dtype} {shape:?} needs {expected}",
            data_end - data_start
        )));
    }
    Ok(TensorInfo {
        name,
        dtype,
        shape,
        data_start,
        data_end,
    })
}

/// Serializes a header for the given tensors, laid out back to back in the given order, padded
/// with spaces to a multiple of 8 bytes as the reference writer does. Returns the full prefix
/// (length field + JSON).
pub fn encode(
    tensors: &[(String, DType, Vec<u64>)],
    metadata: &BTreeMap<String, String>,
) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert(
            "__metadata__".into(),
            serde_json::to_value(metadata).expect("string map"),
        );
    }
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let bytes = shape.iter().product::<u64>() * dtype.size_bytes();
        map.insert(
            name.clone(),
            serde_json::json!({
                "dtype": dtype.as_str(),
                "shape": shape,
                "data_offsets": [offset, offset + bytes],
            }),
        );
        offset += bytes;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(map)).expect("json");
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(json: &str, data_len: usize) -> Vec<u8> {
        let mut v = (json.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(json.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn err(bytes: &[u8]) -> String {
        format!("{:#}", parse(bytes, bytes.len() as u64, "f").unwrap_err())
    }

    #[test]
    fn encode_then_parse() {
        let tensors = vec![
            ("a".to_string(), DType::F8E4M3, vec![2, 3]),
            ("b".to_string(), DType::BF16, vec![4]),
            ("c".to_string(), DType::F32, vec![]),
        ];
        let mut bytes = encode(&tensors, &BTreeMap::from([("k".into(), "v".into())]));
        assert_eq!(bytes.len() % 8, 0);
        bytes.extend(std::iter::repeat_n(0u8, 6 + 8 + 4));
        let h = parse(&bytes, bytes.len() as u64, "f").unwrap();
        assert_eq!(h.tensors.len(), 3);
        assert_eq!(h.tensors[1].name, "b");
        assert_eq!((h.tensors[1].data_start, h.tensors[1].data_end), (6, 14));
        assert_eq!(h.tensors[2].shape, Vec::<u64>::new());
        assert_eq!(h.metadata["k"], "v");
    }

    #[test]
    fn rejects_overlap() {
        let json = r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#;
        assert!(err(&file_with(json, 6)).contains("overlap"));
    }

    #[test]
    fn rejects_size_mismatch_and_unknown_dtype() {
        let json = r#"{"a":{"dtype":"BF16","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(err(&file_with(json, 8)).contains("needs 8"));
        let json = r#"{"a":{"dtype":"Q4","shape":[4],"data_offsets":[0,4]}}"#;
        assert!(err(&file_with(json, 8)).contains("unknown dtype \"Q4\""));
    }
}
