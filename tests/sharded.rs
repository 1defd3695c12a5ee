//! The Hugging Face sharded layout: a synthesized checkpoint split into
//! `model-0000N-of-0000M.safetensors` shards and `model.safetensors.index.json` reads as the
//! single file does (inspect, table, a forward pass), and a broken index or shard is one line
//! naming the tensor and the file.

mod common;

use common::cli::{ok, vibeoffload};
use common::shard;
use std::path::Path;
use vibeoffload::measure::RunReport;
use vibeoffload::report::InspectReport;

/// Fails with exit 1 and one line containing each of `words`.
fn fails(dir: &Path, args: &[&str], words: &[&str]) {
    let o = vibeoffload(dir, args);
    let stderr = o.stderr;
    assert_eq!(
        (o.code, stderr.lines().count()),
        (1, 1),
        "{args:?}: {stderr}"
    );
    for w in words {
        assert!(stderr.contains(w), "{w:?} not in {stderr}");
    }
}

fn synth(dir: &Path) {
    ok(
        dir,
        &[
            "synth",
            "m.safetensors",
            "--size",
            "custom",
            "--layers",
            "3",
            "--hidden",
            "256",
            "--heads",
            "2",
            "--kv-heads",
            "1",
        ],
    );
}

#[test]
fn a_sharded_checkpoint_reads_as_the_single_file_does() {
    let single = tempfile::tempdir().unwrap();
    synth(single.path());
    let sharded = tempfile::tempdir().unwrap();
    synth(sharded.path());
    shard(sharded.path(), 3);
    let inspect = |dir: &Path, path: &str| -> InspectReport {
        serde_json::from_str(&ok(dir, &["inspect", path, "--json"])).unwrap()
    };
    let a = inspect(single.path(), "m.safetensors");
    // Found in the directory without a flag, and through the index itself.
    let b = inspect(sharded.path(), ".");
    let mut by_index = inspect(sharded.path(), "model.safetensors.index.json");
    assert_eq!(by_index.model.source, "model.safetensors.index.json");
    by_index.model.source = b.model.source.clone();
    by_index.shards = b.shards.clone();
    assert_eq!(b, by_index);
    assert_eq!(b.shards.len(), 3);
    assert!(
        b.shards[2].ends_with("model-00003-of-00003.safetensors"),
        "{:?}",
        b.shards
    );
    assert_eq!(
        (a.params, a.model.total_bytes, &a.groups),
        (b.params, b.model.total_bytes, &b.groups)
    );
    assert_eq!(a.model.config, b.model.config);
    assert_eq!(a.model.speech, b.model.speech);
    let text = ok(sharded.path(), &["inspect", "."]);
    assert!(text.contains("sharded: 3 files"), "{text}");

    // A forward pass reads every tensor from its shard: the same hidden states.
    let run = |dir: &Path, path: &str| -> f64 {
        let args = [
            "run",
            "--model-path",
            path,
            "--num-gpu-layers",
            "1",
            "--input-ids",
            "1,2,3",
            "--json",
        ];
        let r: RunReport = serde_json::from_str(&ok(dir, &args)).unwrap();
        r.forward.expect("forward mode").hidden_sum
    };
    assert_eq!(
        run(single.path(), "m.safetensors"),
        run(sharded.path(), ".")
    );
}

#[test]
fn a_broken_index_or_shard_names_the_tensor_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synth(d);
    shard(d, 2);
    let index_path = d.join("model.safetensors.index.json");
    let original = std::fs::read_to_string(&index_path).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Map<String, serde_json::Value>)| {
        let mut index: serde_json::Value = serde_json::from_str(&original).unwrap();
        f(index["weight_map"].as_object_mut().unwrap());
        std::fs::write(&index_path, index.to_string()).unwrap();
    };
    let norm = "model.language_model.norm.weight";
    edit(&|m| {
        m.insert(norm.into(), "model-00003-of-00002.safetensors".into());
    });
    fails(
        d,
        &["inspect", "."],
        &["model-00003-of-00002.safetensors", norm, "index.json"],
    );
    edit(&|m| {
        m.insert(
            "model.extra.weight".into(),
            "model-00001-of-00002.safetensors".into(),
        );
    });
    fails(
        d,
        &["inspect", "."],
        &[
            "model.extra.weight",
            "model-00001-of-00002.safetensors",
            "does not hold it",
        ],
    );
    edit(&|m| {
        m.remove(norm);
    });
    fails(d, &["inspect", "."], &[norm, "does not list"]);
    edit(&|m| {
        m.insert(norm.into(), "../elsewhere.safetensors".into());
    });
    fails(d, &["inspect", "."], &[norm, "not a file name"]);
    std::fs::write(&index_path, &original).unwrap();
    std::fs::remove_file(d.join("model-00002-of-00002.safetensors")).unwrap();
    fails(
        d,
        &["--print-table", "--model-path", "."],
        &["model-00002-of-00002.safetensors", "is missing"],
    );
}
