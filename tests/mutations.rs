//! A bounded, seeded mutation run over the checkpoint reader (the fuzz target CI can afford):
//! a small valid checkpoint has bytes of its header and data flipped, its length field
//! changed, or its tail cut, or the config.json beside it has bytes flipped, a number changed,
//! a key removed or its tail cut; each result goes through opening, planning and a CPU forward
//! pass. Every one must end in a result or one clear error, within [`ROUND_LIMIT`]: no panic,
//! no hang, no NaN passed off as a result.

use serde_json::Value;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;
use vibeoffload::arch::config::ModelConfig;
use vibeoffload::arch::speech::SpeechConfig;
use vibeoffload::checkpoint::layout::Precision;
use vibeoffload::checkpoint::synth::{self, SynthSpec};
use vibeoffload::checkpoint::ModelInfo;
use vibeoffload::engine::{Engine, EngineOptions};
use vibeoffload::plan::{self, PlanOptions};

/// SplitMix64: the same seed gives the same mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A round takes milliseconds; one that takes this long has hung, and fails the test rather
/// than stall CI.
const ROUND_LIMIT: Duration = Duration::from_secs(10);

fn small_model(dir: &Path) -> Vec<u8> {
    let config = ModelConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        num_hidden_layers: 2,
        vocab_size: 64,
        rope_theta: 1e4,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
        max_position_embeddings: 32768,
    };
    let spec = SynthSpec {
        speech: SpeechConfig::small(config.hidden_size),
        config,
        precision: Precision::Float8Plain,
        seed: 3,
    };
    let path = dir.join("m.safetensors");
    synth::write(&spec, &path, true, |_, _| {}).unwrap();
    // Its config.json stays beside it and describes the mutants too.
    std::fs::read(&path).unwrap()
}

/// Opens, plans and runs `path`; an error is a fine outcome, a NaN result is not.
fn exercise(path: &Path) -> Result<(), String> {
    let info = ModelInfo::open(path).map_err(|e| format!("{e:#}"))?;
    let layers = info.inventory.num_layers();
    for n in 0..=layers {
        plan::estimate(&info, &PlanOptions::default(), n).map_err(|e| format!("{e:#}"))?;
    }
    let options = EngineOptions {
        gpu_layers: layers / 2,
        max_seq_len: 8,
        ..EngineOptions::default()
    };
    let mut engine = Engine::load(info, &options, |_| {}).map_err(|e| format!("{e:#}"))?;
    let hidden = engine.forward(&[1, 2, 3]).map_err(|e| format!("{e:#}"))?;
    let values: Vec<f32> = hidden.flatten_all().unwrap().to_vec1().unwrap();
    assert!(
        values.iter().all(|v| v.is_finite()),
        "a forward pass returned NaN or infinity without an error"
    );
    Ok(())
}

/// [`exercise`] on a thread of its own: its outcome (a panic caught), or a failed test after
/// [`ROUND_LIMIT`] (the hung thread is left behind; the test process ends with the test).
fn exercise_within_limit(
    round: u64,
    what: &str,
    path: &Path,
) -> std::thread::Result<Result<(), String>> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(catch_unwind(AssertUnwindSafe(|| exercise(&path))));
    });
    match rx.recv_timeout(ROUND_LIMIT) {
        Ok(outcome) => outcome,
        Err(_) => panic!("round {round} ({what}) took over {ROUND_LIMIT:?}: a hang"),
    }
}

/// JSON pointers to every number in `v`.
fn numbers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Number(_) => out.push(at),
        Value::Object(map) => {
            for (k, x) in map {
                numbers(x, format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) => {
            for (i, x) in items.iter().enumerate() {
                numbers(x, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

/// config.json mutated one way, and what was done.
fn mutate_config(original: &str, rng: &mut Rng) -> (Vec<u8>, String) {
    let mut bytes = original.as_bytes().to_vec();
    match rng.below(4) {
        // A few bytes of the text.
        0 => {
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(bytes.len());
                bytes[at] = rng.next() as u8;
            }
            (bytes, "config.json bytes".into())
        }
        // One number replaced by one a reader might not expect (or by another type).
        1 => {
            let mut v: Value = serde_json::from_str(original).unwrap();
            let mut found = Vec::new();
            numbers(&v, String::new(), &mut found);
            let at = &found[rng.below(found.len())];
            let odd = [
                serde_json::json!(0),
                serde_json::json!(-1),
                serde_json::json!(1),
                serde_json::json!(3),
                serde_json::json!(1u64 << 31),
                serde_json::json!(u64::MAX),
                serde_json::json!(1e308),
                serde_json::json!(-0.5),
                serde_json::json!(1e-300),
                serde_json::json!("64"),
                Value::Null,
            ];
            let new = odd[rng.below(odd.len())].clone();
            let what = format!("config.json {at} = {new}");
            *v.pointer_mut(at).unwrap() = new;
            (serde_json::to_vec(&v).unwrap(), what)
        }
        // One key of the decoder's configuration gone.
        2 => {
            let mut v: Value = serde_json::from_str(original).unwrap();
            let decoder = v["decoder_config"].as_object_mut().unwrap();
            let keys: Vec<String> = decoder.keys().cloned().collect();
            let key = &keys[rng.below(keys.len())];
            decoder.remove(key);
            (
                serde_json::to_vec(&v).unwrap(),
                format!("config.json without {key}"),
            )
        }
        // The tail cut off.
        _ => {
            bytes.truncate(rng.below(bytes.len()));
            (bytes, "config.json cut".into())
        }
    }
}

#[test]
fn mutated_checkpoints_never_panic_hang_or_pass_off_nan() {
    let dir = tempfile::tempdir().unwrap();
    let original = small_model(dir.path());
    let header_end = 8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let path = dir.path().join("mutant.safetensors");
    let config: PathBuf = dir.path().join("config.json");
    let original_config = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&path, &original).unwrap();
    exercise(&path).expect("the unmutated checkpoint runs");
    // CI runs 2,000 rounds; a longer run: VIBEOFFLOAD_MUTATIONS=ROUNDS[,SEED].
    let setting = std::env::var("VIBEOFFLOAD_MUTATIONS").unwrap_or_default();
    let mut parts = setting.split(',').map(|p| p.trim().parse::<u64>().ok());
    let rounds = parts.next().flatten().unwrap_or(2000);
    let mut rng = Rng(parts.next().flatten().unwrap_or(0x5eed));
    let (mut opened, mut refused) = (0, 0);
    let (mut config_opened, mut config_refused) = (0, 0);
    let mut config_changed = false;
    for round in 0..rounds {
        let mut bytes = original.clone();
        let mut new_config = None;
        let what = match rng.below(5) {
            // The config.json beside an intact checkpoint.
            4 => {
                let (text, what) = mutate_config(&original_config, &mut rng);
                new_config = Some(text);
                what
            }
            // A few bytes of the JSON header.
            0 | 1 => {
                for _ in 0..1 + rng.below(3) {
                    let at = 8 + rng.below(header_end - 8);
                    bytes[at] = rng.next() as u8;
                }
                "header bytes".into()
            }
            // The header's length field.
            2 => {
                let at = rng.below(8);
                bytes[at] = rng.next() as u8;
                "header length".into()
            }
            // The tail cut off, or data bytes changed.
            _ => match rng.below(2) {
                0 => {
                    bytes.truncate(rng.below(bytes.len()));
                    "checkpoint cut".into()
                }
                _ => {
                    for _ in 0..16 {
                        let at = header_end + rng.below(bytes.len() - header_end);
                        bytes[at] = rng.next() as u8;
                    }
                    "data bytes".into()
                }
            },
        };
        std::fs::write(&path, &bytes).unwrap();
        match &new_config {
            Some(text) => std::fs::write(&config, text).unwrap(),
            None if config_changed => std::fs::write(&config, &original_config).unwrap(),
            None => {}
        }
        config_changed = new_config.is_some();
        match exercise_within_limit(round, &what, &path) {
            Ok(Ok(())) => {
                opened += 1;
                config_opened += usize::from(config_changed);
            }
            Ok(Err(e)) => {
                assert!(
                    !e.is_empty() && !e.contains('\n'),
                    "round {round} ({what}): {e:?}"
                );
                refused += 1;
                config_refused += usize::from(config_changed);
            }
            Err(_) => panic!("round {round} ({what}) panicked"),
        }
    }
    // Both outcomes occur, so the run explores beyond the first check, for the checkpoint and
    // for its configuration alike.
    assert!(
        opened > 10 && refused > 10,
        "{opened} opened, {refused} refused"
    );
    assert!(
        config_opened > 5 && config_refused > 5,
        "config.json: {config_opened} opened, {config_refused} refused"
    );
}
