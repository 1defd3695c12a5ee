//! `vibeoffload convert`: what was read and written, and the values float8 could not hold.

use super::Render;
use crate::checkpoint::convert::ConvertReport;

impl Render for ConvertReport {
    fn render(&self) -> String {
        let shards = match self.shards {
            0 => String::new(),
            n => format!(", {n} shards"),
        };
        let scales = match (&self.scale_convention, &self.scale_granularity) {
            (Some(c), Some(g)) => format!(
                ", {} {} scales named {}",
                self.scale_tensors,
                super::snake(g),
                super::snake(c)
            ),
            _ => String::new(),
        };
        let config = match self.config_written {
            true => format!("wrote {}", self.config_path.display()),
            false => format!(
                "kept {} (it describes this model)",
                self.config_path.display()
            ),
        };
        let mut text = format!(
            "converted {} ({} tensor bytes{shards}) to {} ({} bytes, {}: {} tensors, {} float8{scales}) in {:.1} s\n{config}\n",
            self.source,
            self.bytes_in,
            self.path.display(),
            self.file_bytes,
            self.precision,
            self.tensors,
            self.float8_tensors,
            self.seconds
        );
        if self.clamped_values > 0 {
            text += &format!(
                "{} values beyond ±464 written as ±448 (PyTorch's float8 cast makes them NaN)\n",
                self.clamped_values
            );
        }
        if self.nan_values > 0 {
            text += &format!("{} NaN values in the source, kept NaN\n", self.nan_values);
        }
        text
    }
}
