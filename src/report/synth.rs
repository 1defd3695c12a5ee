//! `vibeoffload synth`: one line on what was written.

use super::Render;
use crate::checkpoint::synth::SynthReport;

impl Render for SynthReport {
    fn render(&self) -> String {
        format!(
            "wrote {} ({} bytes, {} tensors, {} layers) and {} in {:.1} s\n",
            self.path.display(),
            self.file_bytes,
            self.tensors,
            self.layers,
            self.config_path.display(),
            self.seconds
        )
    }
}
