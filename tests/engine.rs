//! The engine on candle's CPU backend: streamed layers give bit-identical results to resident
//! ones, and hidden states match an independent float64 Qwen2 written here from the file.

mod common;

use candle_core::Tensor;
use vibeoffload::checkpoint::layout::{Precision, ScaleConvention, ScaleGranularity};
use vibeoffload::engine::{DeviceChoice, EngineOptions};
use vibeoffload::plan::Placement;

use common::tiny::{config, load, trace, values, write_model, LAYERS, PRECISIONS};

#[test]
fn streamed_layers_are_bit_identical_to_resident_ones() {
    let dir = tempfile::tempdir().unwrap();
    for (precision, tied) in [
        (Precision::Float8Plain, false),
        (
            Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel),
            true,
        ),
        (Precision::BF16, false),
    ] {
        let path = write_model(dir.path(), precision, tied);
        let resident = EngineOptions {
            gpu_layers: LAYERS,
            ..EngineOptions::default()
        };
        let reference = trace(&mut load(&path, &resident));
        for gpu_layers in 0..LAYERS {
            for placement in [Placement::Last, Placement::First, Placement::Spread] {
                for (slots, depth) in [(1, 0), (2, 0), (2, 1), (3, 2)] {
                    let options = EngineOptions {
                        device: DeviceChoice::Cpu,
                        gpu_layers,
                        placement,
                        slots,
                        prefetch_depth: depth,
                        ..EngineOptions::default()
                    };
                    let mut engine = load(&path, &options);
                    let got = trace(&mut engine);
                    assert!(
                        got == reference,
                        "{precision:?}: {gpu_layers} resident, {placement:?}, {slots} slots, depth {depth} differs"
                    );
                    let stats = engine.transfer_stats().unwrap();
                    assert_eq!(stats.cpu_layers, LAYERS - gpu_layers);
                    // Four passes; each streamed layer copied at least once, and every pass
                    // when there are more streamed layers than slots.
                    let streamed = (LAYERS - gpu_layers) as u64;
                    if streamed > slots as u64 {
                        assert!(stats.total_transfers >= 4 * streamed, "{stats:?}");
                    } else {
                        assert_eq!(stats.total_transfers, streamed, "{stats:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_second_run_of_the_same_prompt_repeats_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let mut engine = load(
        &path,
        &EngineOptions {
            gpu_layers: 1,
            ..EngineOptions::default()
        },
    );
    assert_eq!(trace(&mut engine), trace(&mut engine));
}

#[test]
fn sequences_beyond_max_seq_len_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let mut engine = load(
        &path,
        &EngineOptions {
            max_seq_len: 4,
            ..EngineOptions::default()
        },
    );
    let e = engine.forward(&[1, 2, 3, 4, 5]).unwrap_err();
    assert!(format!("{e:#}").contains("beyond --max-seq-len 4"), "{e:#}");
    let e = engine.forward(&[1, 500]).unwrap_err();
    assert!(format!("{e:#}").contains("token id 500"), "{e:#}");
}

#[test]
fn hidden_states_match_a_float64_reference() {
    let dir = tempfile::tempdir().unwrap();
    for precision in PRECISIONS {
        let path = write_model(dir.path(), precision, false);
        let c = config(false);
        // 12 prompt tokens take the dequantise-and-multiply path, the 13th the fused decode path.
        let ids = [5u32, 17, 99, 3, 150, 7, 42, 8, 120, 61, 2, 77, 190];
        let (want, _) = common::reference(&path, &c, &ids);
        let mut engine = load(
            &path,
            &EngineOptions {
                gpu_layers: 2,
                ..EngineOptions::default()
            },
        );
        let prefill = engine
            .forward(&ids[..12])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let step = engine
            .forward(&ids[12..])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let got: Vec<&Vec<f32>> = prefill.iter().chain(step.iter()).collect();
        let mut worst = 0.0f64;
        for (g, w) in got.iter().zip(&want) {
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((*a as f64 - b).abs() / (1.0 + b.abs()));
            }
        }
        assert!(
            worst < 1e-4,
            "{precision:?}: worst relative error {worst:e}"
        );
        let norms: f64 = want.iter().flatten().map(|v| v.abs()).sum();
        assert!(norms > 1.0, "the reference is not trivially zero");
    }
}

/// Values as large as real Qwen2 checkpoints carry (see common::make_massive), on the prefill
/// path (12 tokens) and the fused decode path (1, 3 and 8 rows), resident and streamed.
#[test]
fn massive_activations_match_a_float64_reference() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(
        dir.path(),
        Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel),
        false,
    );
    let c = config(false);
    common::make_massive(&path, &c);
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 1) % 200).collect();
    let (want, peaks) = common::reference(&path, &c, &ids);
    assert!(peaks.mlp > 5e4, "{peaks:?}");
    assert!(peaks.residual > 1e4, "{peaks:?}");
    assert!(peaks.logit > 100.0, "{peaks:?}");
    for gpu_layers in [0, LAYERS] {
        let mut engine = load(
            &path,
            &EngineOptions {
                gpu_layers,
                ..EngineOptions::default()
            },
        );
        let mut got = Vec::new();
        for (a, b) in [(0, 12), (12, 13), (13, 16), (16, 24)] {
            got.extend(
                engine
                    .forward(&ids[a..b])
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap(),
            );
        }
        let worst = common::worst_row_error(&got, &want);
        assert!(worst < 1e-5, "{gpu_layers} resident: worst error {worst:e}");
    }
}

/// A float8 embedding with a per-row scale (which the float64 reference applies too).
#[test]
fn a_scaled_float8_embedding_is_read_with_its_scale() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let c = config(false);
    let mut w = common::Weights::read(&path);
    let scales: Vec<u8> = (0..c.vocab_size)
        .flat_map(|row| (1.0f32 + (row % 3) as f32 * 0.5).to_le_bytes())
        .collect();
    w.add(
        "model.language_model.embed_tokens.scale_weight",
        "F32",
        &[c.vocab_size, 1],
        &scales,
    );
    w.save(&path);
    let ids = [5u32, 17, 99, 4];
    let (want, _) = common::reference(&path, &c, &ids);
    let mut engine = load(&path, &EngineOptions::default());
    let got = engine.forward(&ids).unwrap().to_vec2::<f32>().unwrap();
    let worst = common::worst_row_error(&got, &want);
    assert!(worst < 1e-5, "worst error {worst:e}");
}

#[test]
fn a_layer_that_makes_nan_is_named_and_fails_the_pass() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(
        dir.path(),
        Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel),
        false,
    );
    // A NaN scale in layer 2's down projection poisons that layer's output and all after it.
    common::poison(
        &path,
        "model.language_model.layers.2.mlp.down_proj.scale_weight",
        5,
    );
    for (gpu_layers, ids) in [(LAYERS, &[1u32, 2, 3][..]), (0, &[1u32; 12][..])] {
        let mut engine = load(
            &path,
            &EngineOptions {
                gpu_layers,
                ..EngineOptions::default()
            },
        );
        let e = engine.forward(ids).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("decoder layer 2 produced NaN or infinite values"),
            "{e:#}"
        );
        // A greedy step reports it when its tokens are read, once.
        engine.reset();
        let queued = engine.queue_greedy(&[ids]).unwrap();
        let e = engine.read_greedy(&queued).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("decoder layer 2 produced"),
            "{e:#}"
        );
    }
}

#[test]
fn a_nan_embedding_row_is_caught_in_the_first_layer() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    // One element of token 1's row.
    let hidden = config(false).hidden_size;
    common::poison(
        &path,
        "model.language_model.embed_tokens.weight",
        hidden + 3,
    );
    let mut engine = load(&path, &EngineOptions::default());
    engine.forward(&[2, 3]).expect("other rows are fine");
    engine.reset();
    let e = engine.forward(&[2, 1]).unwrap_err();
    assert!(
        format!("{e:#}").starts_with("decoder layer 0 produced NaN or infinite values"),
        "{e:#}"
    );
}

#[test]
fn a_nan_final_norm_is_named_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(
        dir.path(),
        Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel),
        false,
    );
    common::poison(&path, "model.language_model.norm.weight", 3);
    let mut engine = load(&path, &EngineOptions::default());
    let e = engine.forward(&[1, 2, 3]).unwrap_err();
    assert!(
        format!("{e:#}").starts_with("the final norm produced NaN"),
        "{e:#}"
    );
}

#[test]
fn a_nan_lm_head_is_named_on_both_of_its_paths() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(
        dir.path(),
        Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel),
        false,
    );
    common::poison(&path, "lm_head.scale_weight", 3);
    let mut engine = load(&path, &EngineOptions::default());
    // One row takes the fused path, twelve the chunked one.
    for ids in [&[1u32][..], &[1u32; 12][..]] {
        engine.reset();
        let hidden = engine.forward(ids).unwrap();
        let e = engine.logits(&hidden).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("the LM head produced NaN"),
            "{e:#}"
        );
        // The few tokens' logits are watched too (row 3's scale is poisoned).
        let e = engine.token_logits(&hidden, &[7, 3]).unwrap_err();
        assert!(
            format!("{e:#}").starts_with("the LM head produced NaN"),
            "{e:#}"
        );
    }
}

#[test]
fn a_greedy_step_picks_the_argmax_of_each_sequences_logits() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let mut engine = load(&path, &EngineOptions::default());
    let prompts: [&[u32]; 2] = [&[5, 17, 99, 3], &[9, 8, 7, 6]];
    let queued = engine.queue_greedy(&prompts).unwrap();
    let next = engine.read_greedy(&queued).unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        engine.reset();
        let hidden = engine.forward(prompt).unwrap();
        let logits = engine
            .logits(&hidden.get(prompt.len() - 1).unwrap())
            .unwrap();
        let want = logits.argmax(0).unwrap().to_scalar::<u32>().unwrap();
        assert_eq!(next[i], want, "sequence {i}");
    }
}

#[test]
fn long_prompts_are_prefilled_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let options = EngineOptions {
        gpu_layers: 2,
        ..EngineOptions::default()
    };
    let ids: Vec<u32> = (0..520).map(|i| (i * 7 % 200) as u32).collect();
    let mut engine = load(&path, &options);
    let whole = values(&engine.forward(&ids).unwrap());
    engine.reset();
    let mut split = values(&engine.forward(&ids[..512]).unwrap());
    split.extend(values(&engine.forward(&ids[512..]).unwrap()));
    assert_eq!(whole.len(), 520 * 64);
    assert!(whole == split, "one call must equal 512 + 8 tokens");
}

#[test]
fn a_batch_decodes_each_sequence_as_if_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let options = EngineOptions {
        gpu_layers: 1,
        ..EngineOptions::default()
    };
    let prompts: [&[u32]; 3] = [
        &[5, 17, 99, 3, 150, 1, 2, 3, 4, 5],
        &[9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
        &[1; 10],
    ];
    let mut engine = load(&path, &options);
    let batched = engine.forward_batch(&prompts).unwrap();
    let step = engine.forward_batch(&[&[7], &[8], &[9]]).unwrap();
    assert_eq!(batched.dims(), [3, 10, 64]);
    for (i, prompt) in prompts.iter().enumerate() {
        engine.reset();
        let alone = values(&engine.forward(prompt).unwrap());
        let alone_step = values(&engine.forward(&[7 + i as u32]).unwrap());
        let worst = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };
        assert!(
            worst(&alone, &values(&batched.get(i).unwrap())) < 1e-5,
            "prefill row {i}"
        );
        assert!(
            worst(&alone_step, &values(&step.get(i).unwrap())) < 1e-5,
            "decode row {i}"
        );
    }
    let e = engine.forward_batch(&[&[1, 2], &[3]]).unwrap_err();
    assert!(format!("{e:#}").contains("same length"));
}

/// VibeVoice's positive and negative passes: two lanes of different lengths in one pass over
/// the layers, each bit-identical to its sequence run alone, resident and streamed; their
/// one-token steps go through every layer as one batch (float8) or lane by lane (bf16, which
/// the fused path does not take); a lane reset starts that lane over and leaves the other
/// alone.
#[test]
fn lanes_in_one_pass_equal_each_sequence_alone() {
    let dir = tempfile::tempdir().unwrap();
    let long: &[u32] = &[5, 17, 99, 3, 150, 1, 2, 3, 4, 5, 6];
    let short: &[u32] = &[9, 8];
    for (precision, gpu_layers) in PRECISIONS.into_iter().flat_map(|p| [(p, LAYERS), (p, 1)]) {
        let path = write_model(dir.path(), precision, false);
        let options = EngineOptions {
            gpu_layers,
            ..EngineOptions::default()
        };
        let mut alone = load(&path, &options);
        let mut run_alone = |prompt: &[u32], step: u32| {
            alone.reset();
            let h = values(&alone.forward(prompt).unwrap());
            (h, values(&alone.forward(&[step]).unwrap()))
        };
        let (long_h, long_step) = run_alone(long, 7);
        let (short_h, short_step) = run_alone(short, 42);

        let mut engine = load(&path, &options);
        let other = engine.add_lane();
        let (e_long, e_short) = (
            engine.embed_ids(long).unwrap(),
            engine.embed_ids(short).unwrap(),
        );
        let out = engine
            .forward_lanes(&[(0, &e_long), (other, &e_short)])
            .unwrap();
        let case = format!("{precision:?}, {gpu_layers} resident");
        assert!(values(&out[0]) == long_h, "long prefill, {case}");
        assert!(values(&out[1]) == short_h, "short prefill, {case}");
        let (a, b) = (
            engine.embed_ids(&[7]).unwrap(),
            engine.embed_ids(&[42]).unwrap(),
        );
        let out = engine.forward_lanes(&[(other, &b), (0, &a)]).unwrap();
        assert!(values(&out[0]) == short_step, "short step, {case}");
        assert!(values(&out[1]) == long_step, "long step, {case}");
        assert_eq!(
            (
                engine.lane_position(0).unwrap(),
                engine.lane_position(other).unwrap()
            ),
            (12, 3)
        );

        engine.reset_lane(other).unwrap();
        let out = engine.forward_lanes(&[(other, &e_short)]).unwrap();
        assert!(values(&out[0]) == short_h, "short prefill after its reset");
        assert_eq!(engine.lane_position(0).unwrap(), 12);
    }
}

/// The logits of a few tokens, from the LM head's rows of those tokens alone, are bit for bit
/// the full logits' columns of them: float8 heads without a scale, with one scale and with
/// one per row, tied or not (the gathered rows, zero-padded past one tile for 17 ids), and
/// a bf16 head (every logit, then selected); for one row and for several.
#[test]
fn token_logits_equal_the_full_logits_columns() {
    let dir = tempfile::tempdir().unwrap();
    let scaled = |g| Precision::Float8Scaled(ScaleConvention::ScaleWeight, g);
    let few: &[u32] = &[199, 3, 0, 150];
    let many: Vec<u32> = (0..17).map(|i| (i * 37 + 5) % 200).collect();
    for (precision, tied) in [
        (Precision::Float8Plain, false),
        (scaled(ScaleGranularity::Scalar), false),
        (scaled(ScaleGranularity::PerChannel), false),
        (scaled(ScaleGranularity::PerChannel), true),
        (Precision::BF16, false),
    ] {
        let path = write_model(dir.path(), precision, tied);
        let mut engine = load(&path, &EngineOptions::default());
        let hidden = engine.forward(&[5, 17, 99, 3]).unwrap();
        for rows in [hidden.get(3).unwrap(), hidden.narrow(0, 1, 3).unwrap()] {
            let all = engine.logits(&rows).unwrap();
            // Twice the same ids (the gathered rows reused), then others.
            for ids in [few, few, &many[..]] {
                let index = Tensor::new(ids, all.device()).unwrap();
                let want = all.index_select(&index, all.rank() - 1).unwrap();
                let got = engine.token_logits(&rows, ids).unwrap();
                assert_eq!(got.dims(), want.dims());
                assert!(
                    values(&got) == values(&want),
                    "{precision:?}, tied {tied}, {:?} rows, {} ids",
                    rows.dims(),
                    ids.len()
                );
            }
        }
        let e = engine.token_logits(&hidden.get(0).unwrap(), &[200]);
        assert!(format!("{:#}", e.unwrap_err()).contains("outside the LM head's 200 rows"));
    }
}

#[test]
fn bad_lane_inputs_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let mut engine = load(&path, &EngineOptions::default());
    let x = engine.embed_ids(&[1, 2]).unwrap();
    let err = |r: anyhow::Result<Vec<Tensor>>| format!("{:#}", r.unwrap_err());
    assert!(err(engine.forward_lanes(&[(3, &x)])).contains("no sequence lane 3"));
    assert!(err(engine.forward_lanes(&[(0, &x), (0, &x)])).contains("appears twice"));
    let wrong = Tensor::zeros((2, 5), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(err(engine.forward_lanes(&[(0, &wrong)])).contains("not [tokens, 64]"));
    assert!(engine.embed_ids(&[]).is_err());
}
