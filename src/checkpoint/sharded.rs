//! The Hugging Face sharded layout: `model-0000N-of-0000M.safetensors` files and the
//! `model.safetensors.index.json` whose `weight_map` says which file holds each tensor. Every
//! shard is mapped; the index and the shards' headers must agree tensor for tensor.

use super::header::{Header, TensorInfo, MAX_HEADER_BYTES};
use super::{Checkpoint, MappedFile};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The index's file name in a Hugging Face model directory.
pub const INDEX_NAME: &str = "model.safetensors.index.json";

/// Whether `path` names an index (`*.index.json`) rather than a safetensors file.
pub fn is_index(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(".index.json"))
}

/// The index's `weight_map`: tensor name to shard file name, each a plain file name in the
/// index's directory.
fn weight_map(index: &Path) -> Result<BTreeMap<String, String>> {
    let shown = index.display();
    let size = std::fs::metadata(index)
        .map_err(|e| anyhow!("cannot open checkpoint index {shown}: {e}"))?
        .len();
    if size > MAX_HEADER_BYTES {
        bail!("{shown} is {size} bytes, beyond any checkpoint index; is it one?");
    }
    let text = std::fs::read_to_string(index).with_context(|| format!("cannot read {shown}"))?;
    crate::output::record_input(index);
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| anyhow!("{shown} is not valid JSON: {e}"))?;
    let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else {
        bail!("{shown} has no \"weight_map\" object; it is not a safetensors index");
    };
    let mut out = BTreeMap::new();
    for (tensor, file) in map {
        let Some(file) = file.as_str() else {
            bail!("{shown}: the shard of tensor {tensor} must be a file name, not {file}");
        };
        let plain = Path::new(file).file_name().is_some_and(|n| n == file);
        if !plain || file == ".." {
            bail!(
                "{shown}: tensor {tensor} is in {file:?}, which is not a file name in the \
                 index's directory"
            );
        }
        out.insert(tensor.clone(), file.to_string());
    }
    if out.is_empty() {
        bail!("{shown} lists no tensors");
    }
    Ok(out)
}

/// Opens the shards `index` names and checks that each holds exactly the tensors the index
/// gives it.
pub(super) fn open(index: &Path) -> Result<Checkpoint> {
    let shown = index.display();
    let map = weight_map(index)?;
    // Shards in name order, each with the first tensor the index puts in it (for messages).
    let mut first: BTreeMap<&str, &str> = BTreeMap::new();
    for (tensor, file) in &map {
        first.entry(file.as_str()).or_insert(tensor.as_str());
    }
    let dir = crate::output::parent_dir(index);
    let (mut files, mut tensors) = (Vec::new(), Vec::<TensorInfo>::new());
    let (mut file_of, mut header_bytes, mut file_bytes) = (HashMap::new(), 0, 0);
    for (i, (&name, &tensor)) in first.iter().enumerate() {
        let path = dir.join(name);
        if path.symlink_metadata().is_err() {
            bail!(
                "{shown} puts tensor {tensor} in shard {name}, which is missing ({}): restore the \
                 shard or fix the index",
                path.display()
            );
        }
        let (file, header) = MappedFile::open(&path)
            .with_context(|| format!("{shown} puts tensor {tensor} in shard {name}"))?;
        for t in &header.tensors {
            match map.get(&t.name) {
                Some(listed) if listed == name => {}
                Some(listed) => bail!(
                    "shard {name} holds tensor {}, which {shown} puts in {listed}",
                    t.name
                ),
                None => bail!(
                    "shard {name} holds tensor {}, which {shown} does not list",
                    t.name
                ),
            }
            file_of.insert(t.name.clone(), i);
        }
        header_bytes += header.header_bytes;
        file_bytes += file.file_bytes;
        tensors.extend(header.tensors);
        files.push(file);
    }
    if let Some((tensor, file)) = map.iter().find(|(t, _)| !file_of.contains_key(*t)) {
        bail!("{shown} puts tensor {tensor} in shard {file}, which does not hold it");
    }
    Ok(Checkpoint {
        path: index.to_path_buf(),
        header: Header {
            tensors,
            metadata: BTreeMap::new(),
            header_bytes,
        },
        file_bytes,
        files,
        file_of,
    })
}
