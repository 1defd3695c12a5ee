//! Which calibration the predictions use: the file `--calibration` names, else the one
//! `bench --calibrate` stored for this machine in the user's cache directory.

use super::progress;
use anyhow::{anyhow, bail, Result};
use std::path::{Path, PathBuf};
use vibeoffload::engine::DeviceChoice;
use vibeoffload::measure::calibrate;
use vibeoffload::plan::calibration::{Calibration, Machine};
use vibeoffload::plan::{PlanOptions, Scope};
use vibeoffload::report::Predicted;

/// The calibration at `given`, which must be readable (measured on another machine, it is
/// used as asked, with a note); else the stored one if it was measured on `here` (another
/// machine's, or an unreadable file, is passed over with a note); else none.
pub fn find(given: Option<&Path>, here: &Machine) -> Result<Option<Calibration>> {
    if let Some(path) = given {
        let c = calibrate::read(path)?;
        vibeoffload::output::record_input(path);
        if !c.machine.describes(here) {
            progress::note(format!(
                "{} was measured on {}, not on this machine ({here}): its predictions are that machine's",
                path.display(),
                c.machine
            ));
        }
        return Ok(Some(c));
    }
    let Some(path) = calibrate::default_path().filter(|p| p.exists()) else {
        return Ok(None);
    };
    match calibrate::read(&path) {
        Ok(c) if c.machine.describes(here) => Ok(Some(c)),
        Ok(c) => {
            progress::note(format!(
                "the calibration at {} is of {}, not of this machine ({here}), so it is not used; \
                 `vibeoffload bench --calibrate` measures this one",
                path.display(),
                c.machine
            ));
            Ok(None)
        }
        Err(e) => {
            progress::note(format!("{e:#}; not used"));
            Ok(None)
        }
    }
}

/// Where `bench --calibrate` writes: `given`, else the user's cache directory.
pub fn target(given: Option<&Path>) -> Result<PathBuf> {
    let path = match given {
        Some(p) => p.to_path_buf(),
        None => calibrate::default_path().ok_or_else(|| {
            anyhow!("this system names no cache directory to keep the calibration in: give --calibration FILE")
        })?,
    };
    vibeoffload::output::check_target(&path)?;
    Ok(path)
}

/// `table`'s predicted speeds: the calibration `given`, else the one stored for this machine
/// (its GPU named `gpu` where NVML reads it), at the plan's batch (2 for full VibeVoice, whose
/// language model steps the CFG pair). `--cpu-layers auto` (`auto`) needs one; without it the
/// table has no predicted column.
pub fn table_prediction(
    given: Option<&Path>,
    gpu: Option<String>,
    options: &PlanOptions,
    auto: bool,
) -> Result<Option<Predicted>> {
    let here = Machine {
        gpu,
        ..calibrate::this_machine(DeviceChoice::Cpu)
    };
    let batch = match options.scope {
        Scope::Full => 2,
        Scope::LanguageModel => options.batch as usize,
    };
    let Some(c) = find(given, &here)? else {
        if auto {
            bail!(
                "--cpu-layers auto in table predicts from this machine's calibration, and none was found: \
                 run `vibeoffload bench --calibrate` first (or pass --calibration FILE), or give a count"
            );
        }
        return Ok(None);
    };
    let Some(rates) = c.rates(batch) else {
        let missing = format!(
            "the calibration has batches {} only, not batch {batch}",
            c.batch_list()
        );
        if auto {
            bail!("--cpu-layers auto in table: {missing}; give a count");
        }
        progress::note(format!("{missing}: no predicted ms/token"));
        return Ok(None);
    };
    Ok(Some(Predicted {
        machine: c.machine,
        measured_unix_s: c.measured_unix_s,
        rates,
        batch,
        prefetch_depth: options.stream_slots.saturating_sub(1),
        auto_cpu_layers: auto,
    }))
}
