//! `generate --benchmark`: the same script spoken at each preset's layer count, one report per
//! configuration, as the fork's `--benchmark` table does.

use super::session::{run_generation, GenerateReport, Request};
use crate::engine::replay::release_cached_memory;
use crate::measure::{GpuProbe, ModelFile};
use crate::UsageError;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// One configuration's generation.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BenchmarkRow {
    /// The preset (or `N layers`).
    pub configuration: String,
    /// Its generation report.
    pub report: GenerateReport,
}

/// Every configuration's generation, in order.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GenerateBenchmark {
    /// `vibeoffload.generate-benchmark/1`.
    pub schema: String,
    /// The tool that wrote it: version and commit.
    pub tool: String,
    /// One row per configuration.
    pub rows: Vec<BenchmarkRow>,
}

/// Generates `request` once per `(name, gpu_layers)` configuration, after a two-frame warm-up
/// of the first (the first configuration in a process runs slow); each writes `request.out`
/// over the previous one. `progress` hears which configuration runs; after each configuration,
/// `row_done` gets the rows so far (an error from it stops the benchmark there).
pub fn run_benchmark(
    model: &ModelFile,
    request: &Request,
    configurations: &[(String, usize)],
    mut progress: impl FnMut(&str),
    mut row_done: impl FnMut(&GenerateBenchmark) -> Result<()>,
) -> Result<GenerateBenchmark> {
    // The rows replace each other's file, never one that was there before without --force.
    if !request.force && request.out.exists() {
        bail!(UsageError::new(format!(
            "{} exists: pass --force to replace it",
            request.out.display()
        )));
    }
    // Read before the warm-up opens the device: every row then counts the CUDA context.
    let vram_baseline = request
        .vram_baseline
        .or_else(|| GpuProbe::of(request.engine.device).used_bytes());
    let num_layers = model.open()?.inventory.num_layers();
    let with_layers = |layers: usize| {
        let mut r = request.clone();
        r.vram_baseline = vram_baseline;
        r.engine.gpu_layers = layers;
        // The CPU computes at most the layers a configuration leaves offloaded.
        r.engine.cpu_layers = request
            .engine
            .cpu_layers
            .min(num_layers.saturating_sub(layers));
        r.force = true;
        r
    };
    if let Some((name, layers)) = configurations.first() {
        progress(&format!("warm-up ({name})"));
        let mut warm_up = with_layers(*layers);
        warm_up.max_frames = Some(2);
        warm_up.dump_latents = None;
        run_generation(model, &warm_up, |_| {}, |_| {})?;
        release_cached_memory(request.engine.device)?;
    }
    let mut benchmark = GenerateBenchmark {
        schema: "vibeoffload.generate-benchmark/1".into(),
        tool: crate::TOOL.to_string(),
        rows: Vec::with_capacity(configurations.len()),
    };
    for (name, layers) in configurations {
        progress(&format!("{name}: {layers} layers on the GPU"));
        benchmark.rows.push(BenchmarkRow {
            configuration: name.clone(),
            report: run_generation(model, &with_layers(*layers), |_| {}, |_| {})?,
        });
        // What the graphs and the allocator kept is not the next row's.
        release_cached_memory(request.engine.device)?;
        row_done(&benchmark)?;
    }
    Ok(benchmark)
}
