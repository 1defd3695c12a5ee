//! A bounded, seeded mutation run over the checkpoint reader (the fuzz target CI can afford):
//! a small valid checkpoint has bytes of its header and data flipped, its length field
//! changed, or its tail cut, and each result goes through opening, planning and a CPU forward
//! pass. Every one must end in a result or one clear error: no panic, no NaN passed off as a
//! result.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
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

#[test]
fn mutated_checkpoints_never_panic_or_pass_off_nan() {
    let dir = tempfile::tempdir().unwrap();
    let original = small_model(dir.path());
    let header_end = 8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let path = dir.path().join("mutant.safetensors");
    std::fs::write(&path, &original).unwrap();
    exercise(&path).expect("the unmutated checkpoint runs");
    // CI runs 2,000 rounds; a longer run: VIBEOFFLOAD_MUTATIONS=ROUNDS[,SEED].
    let setting = std::env::var("VIBEOFFLOAD_MUTATIONS").unwrap_or_default();
    let mut parts = setting.split(',').map(|p| p.trim().parse::<u64>().ok());
    let rounds = parts.next().flatten().unwrap_or(2000);
    let mut rng = Rng(parts.next().flatten().unwrap_or(0x5eed));
    let (mut opened, mut refused) = (0, 0);
    for round in 0..rounds {
        let mut bytes = original.clone();
        match rng.below(4) {
            // A few bytes of the JSON header.
            0 | 1 => {
                for _ in 0..1 + rng.below(3) {
                    let at = 8 + rng.below(header_end - 8);
                    bytes[at] = rng.next() as u8;
                }
            }
            // The header's length field.
            2 => {
                let at = rng.below(8);
                bytes[at] = rng.next() as u8;
            }
            // The tail cut off, or data bytes changed.
            _ => match rng.below(2) {
                0 => bytes.truncate(rng.below(bytes.len())),
                _ => {
                    for _ in 0..16 {
                        let at = header_end + rng.below(bytes.len() - header_end);
                        bytes[at] = rng.next() as u8;
                    }
                }
            },
        }
        std::fs::write(&path, &bytes).unwrap();
        match catch_unwind(AssertUnwindSafe(|| exercise(&path))) {
            Ok(Ok(())) => opened += 1,
            Ok(Err(e)) => {
                assert!(!e.is_empty() && !e.contains('\n'), "round {round}: {e:?}");
                refused += 1;
            }
            Err(_) => panic!("round {round} panicked"),
        }
    }
    // Both outcomes occur, so the run explores beyond the first check.
    assert!(
        opened > 10 && refused > 10,
        "{opened} opened, {refused} refused"
    );
}
