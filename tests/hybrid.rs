//! Hybrid decoding on candle's CPU backend: layers the host computes, among resident and
//! streamed ones, leave every result as the all-resident engine gives it, bit for bit (on the
//! CPU both compute in f32), for single sequences and for lanes decoded together; the
//! streamer copies only the streamed layers; impossible splits are refused.

mod common;

use common::tiny::{load, trace, values, write_model, LAYERS, PRECISIONS};
use vibeoffload::checkpoint::layout::Precision;
use vibeoffload::checkpoint::ModelInfo;
use vibeoffload::engine::{DeviceChoice, Engine, EngineOptions};
use vibeoffload::plan::Placement;

#[test]
fn host_computed_layers_change_no_bit_and_are_never_copied() {
    let dir = tempfile::tempdir().unwrap();
    for precision in PRECISIONS {
        let path = write_model(dir.path(), precision, false);
        let resident = EngineOptions {
            gpu_layers: LAYERS,
            ..EngineOptions::default()
        };
        let reference = trace(&mut load(&path, &resident));
        for gpu_layers in 0..LAYERS {
            for cpu_layers in 1..=LAYERS - gpu_layers {
                for (placement, slots) in [(Placement::Last, 1), (Placement::Spread, 2)] {
                    let options = EngineOptions {
                        device: DeviceChoice::Cpu,
                        gpu_layers,
                        cpu_layers,
                        placement,
                        slots,
                        prefetch_depth: slots - 1,
                        ..EngineOptions::default()
                    };
                    let mut engine = load(&path, &options);
                    let case = format!(
                        "{precision:?}: {gpu_layers} resident, {cpu_layers} on the host, {placement:?}"
                    );
                    assert!(trace(&mut engine) == reference, "{case} differs");
                    let stats = engine.transfer_stats().unwrap();
                    let streamed = LAYERS - gpu_layers - cpu_layers;
                    assert_eq!(
                        (stats.gpu_layers, stats.cpu_layers, stats.cpu_compute_layers),
                        (gpu_layers, streamed, cpu_layers),
                        "{case}"
                    );
                    // Only streamed layers are copied: four passes, each copying every
                    // streamed layer when they outnumber the slots.
                    let every_streamed_layer_copied =
                        stats.per_layer.iter().all(|row| row.transfers > 0);
                    assert!(every_streamed_layer_copied, "{case}: {stats:?}");
                    assert_eq!(stats.per_layer.len(), streamed, "{case}");
                    // The float8 products are timed, and within the host layers' time.
                    let float8 = !matches!(precision, Precision::BF16);
                    assert_eq!(stats.cpu_products_ms > 0.0, float8, "{case}: {stats:?}");
                    assert!(
                        stats.cpu_products_ms <= stats.cpu_compute_ms,
                        "{case}: {stats:?}"
                    );
                    if streamed == 0 {
                        assert_eq!(stats.total_transfers, 0, "{case}");
                    }
                }
            }
        }
    }
}

#[test]
fn lanes_through_host_layers_equal_each_sequence_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let long: &[u32] = &[5, 17, 99, 3, 150, 1, 2, 3, 4, 5, 6];
    let short: &[u32] = &[9, 8];
    let mut alone = load(
        &path,
        &EngineOptions {
            gpu_layers: LAYERS,
            ..EngineOptions::default()
        },
    );
    let mut run_alone = |prompt: &[u32], steps: &[u32]| {
        alone.reset();
        let mut out = vec![values(&alone.forward(prompt).unwrap())];
        for &s in steps {
            out.push(values(&alone.forward(&[s]).unwrap()));
        }
        out
    };
    let want_long = run_alone(long, &[7, 8]);
    let want_short = run_alone(short, &[42, 43]);
    let options = EngineOptions {
        gpu_layers: 1,
        cpu_layers: 2,
        placement: Placement::First,
        ..EngineOptions::default()
    };
    let mut engine = load(&path, &options);
    let other = engine.add_lane();
    let embed = |e: &Engine, ids: &[u32]| e.embed_ids(ids).unwrap();
    let (a, b) = (embed(&engine, long), embed(&engine, short));
    let out = engine.forward_lanes(&[(0, &a), (other, &b)]).unwrap();
    assert!(values(&out[0]) == want_long[0] && values(&out[1]) == want_short[0]);
    // Two steps of both lanes, batched through every layer, the host's included.
    for k in 1..3 {
        let (a, b) = (
            embed(&engine, &[[7, 8][k - 1]]),
            embed(&engine, &[[42, 43][k - 1]]),
        );
        let out = engine.forward_lanes(&[(other, &b), (0, &a)]).unwrap();
        assert!(values(&out[0]) == want_short[k], "short step {k}");
        assert!(values(&out[1]) == want_long[k], "long step {k}");
    }
}

#[test]
fn more_host_layers_than_offloaded_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let options = EngineOptions {
        gpu_layers: 2,
        cpu_layers: 3,
        ..EngineOptions::default()
    };
    let err = Engine::load(ModelInfo::open(&path).unwrap(), &options, |_| {})
        .err()
        .expect("refused");
    assert!(
        err.to_string()
            .contains("--cpu-layers 3 is more than the 2 layers"),
        "{err}"
    );
}
