//! The original's presets and aliases, and a list of common GPU sizes, read from
//! `presets/presets.json`, which the binary embeds.

use crate::UsageError;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

/// A named configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Preset {
    /// Name as typed (`consumer`).
    pub name: String,
    /// Layers kept on the GPU; `None` means all of them (no offloading).
    pub gpu_layers: Option<usize>,
    /// The VRAM class it is meant for.
    pub target_vram: String,
    /// One line about it.
    pub description: String,
    /// Copy offloaded layers from pinned (page-locked) host memory.
    pub pin_memory: bool,
    /// Load the next offloaded layer while the current one computes.
    pub prefetch: bool,
}

/// An alternative name for a layer count (`aggressive` = 8).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    /// Name as typed.
    pub name: String,
    /// Layers kept on the GPU.
    pub gpu_layers: usize,
}

/// A common card size, for the "which setting fits my GPU" table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuClass {
    /// Memory in GiB.
    pub vram_gib: u64,
    /// Cards of that size.
    pub examples: String,
}

/// Everything in `presets/presets.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresetFile {
    /// Presets.
    pub presets: Vec<Preset>,
    /// Aliases.
    pub aliases: Vec<Alias>,
    /// Common GPU sizes.
    pub gpus: Vec<GpuClass>,
}

/// The embedded preset file.
pub fn presets() -> &'static PresetFile {
    static FILE: OnceLock<PresetFile> = OnceLock::new();
    FILE.get_or_init(|| {
        serde_json::from_str(include_str!("../../presets/presets.json"))
            .expect("presets/presets.json is checked by a unit test")
    })
}

/// Looks up a preset or alias (case-insensitive, `-` and `_` alike) and returns its layer
/// count for a model of `num_layers` layers.
pub fn resolve(name: &str, num_layers: usize) -> Result<(String, usize)> {
    let wanted = name.to_ascii_lowercase().replace('-', "_");
    let file = presets();
    let found = file
        .presets
        .iter()
        .find(|p| p.name == wanted)
        .map(|p| (p.name.clone(), p.gpu_layers.unwrap_or(num_layers)))
        .or_else(|| {
            file.aliases
                .iter()
                .find(|a| a.name == wanted)
                .map(|a| (a.name.clone(), a.gpu_layers))
        });
    let Some((name, layers)) = found else {
        bail!(UsageError::new(format!(
            "unknown preset '{name}'; valid presets: {}; aliases: {}",
            file.presets
                .iter()
                .map(|p| p.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            file.aliases
                .iter()
                .map(|a| format!("{} ({})", a.name, a.gpu_layers))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    if layers > num_layers {
        bail!(UsageError::new(format!(
            "preset {name} keeps {layers} layers on the GPU but the model has {num_layers}; \
             use --num-gpu-layers {num_layers} or less"
        )));
    }
    Ok((name, layers))
}

/// The preset or alias names that mean exactly `layers` GPU layers (for labelling rows).
pub fn names_for(layers: usize, num_layers: usize) -> Vec<String> {
    let file = presets();
    file.presets
        .iter()
        .filter(|p| p.gpu_layers.unwrap_or(num_layers) == layers)
        .map(|p| p.name.clone())
        .chain(
            file.aliases
                .iter()
                .filter(|a| a.gpu_layers == layers)
                .map(|a| a.name.clone()),
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_file_has_the_originals_presets() {
        let f = presets();
        let layers: Vec<_> = f
            .presets
            .iter()
            .map(|p| (p.name.as_str(), p.gpu_layers))
            .collect();
        assert_eq!(
            layers,
            [
                ("high_end", None),
                ("mid_range", Some(20)),
                ("consumer", Some(12)),
                ("budget", Some(8)),
                ("minimal", Some(4))
            ]
        );
        assert_eq!(f.aliases.len(), 5);
        let sizes: Vec<u64> = f.gpus.iter().map(|g| g.vram_gib).collect();
        assert_eq!(sizes, [8, 12, 16, 24, 48, 80]);
    }

    #[test]
    fn resolves_names_and_aliases() {
        assert_eq!(resolve("consumer", 28).unwrap(), ("consumer".into(), 12));
        assert_eq!(resolve("High-End", 28).unwrap(), ("high_end".into(), 28));
        assert_eq!(resolve("moderate", 28).unwrap(), ("moderate".into(), 16));
        let e = resolve("turbo", 28).unwrap_err().to_string();
        assert!(
            e.contains("unknown preset 'turbo'") && e.contains("budget"),
            "{e}"
        );
        assert!(resolve("mid_range", 4).is_err());
    }
}
