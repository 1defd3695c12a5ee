//! How much VRAM a plan may use, and how its layer count was chosen.

use crate::checkpoint::ModelInfo;
use crate::gpu::GpuInfo;
use crate::plan::{self, PlanOptions, VramEstimate};
use crate::units::gib;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// How much VRAM the plan may use: free VRAM (read or given) times the target utilization.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// The GPU, when NVML could read it.
    pub gpu: Option<GpuInfo>,
    /// Free VRAM planned against (`--vram`, else NVML's free memory).
    pub free_bytes: u64,
    /// Fraction of free VRAM the plan may use.
    pub target_utilization: f64,
    /// `free_bytes x target_utilization`.
    pub budget_bytes: u64,
}

impl Budget {
    /// A budget of `target_utilization` of `free_bytes`.
    pub fn new(gpu: Option<GpuInfo>, free_bytes: u64, target_utilization: f64) -> Budget {
        Budget {
            gpu,
            free_bytes,
            target_utilization,
            budget_bytes: (free_bytes as f64 * target_utilization) as u64,
        }
    }

    /// Whether `estimate` fits within the budget.
    pub fn fits(&self, estimate: &VramEstimate) -> bool {
        estimate.total_bytes <= self.budget_bytes
    }

    /// The estimate of the largest layer count that fits, or an error that says by how much
    /// even none misses.
    pub fn largest_fit(&self, model: &ModelInfo, options: &PlanOptions) -> Result<VramEstimate> {
        if let Some(fit) = plan::fit(model, options, self.budget_bytes)? {
            return Ok(fit);
        }
        let floor = plan::estimate(model, options, 0)?;
        bail!(
            "nothing fits: even with all {} layers streamed the estimate is {} GiB, over the budget of {} GiB ({:.0}% of {} GiB free); free VRAM, or lower --max-seq-len / --batch",
            model.inventory.num_layers(),
            gib(floor.total_bytes),
            gib(self.budget_bytes),
            self.target_utilization * 100.0,
            gib(self.free_bytes)
        )
    }
}

/// How the layer count was chosen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "by")]
pub enum Choice {
    /// The largest count whose estimate fits the budget.
    Auto,
    /// A preset or alias.
    Preset {
        /// Its name.
        name: String,
    },
    /// `--num-gpu-layers`.
    NumGpuLayers,
    /// `--no-offload`.
    NoOffload,
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Choice::Auto => f.write_str("auto, the largest count that fits"),
            Choice::Preset { name } => write!(f, "preset {name}"),
            Choice::NumGpuLayers => f.write_str("--num-gpu-layers"),
            Choice::NoOffload => f.write_str("--no-offload"),
        }
    }
}
