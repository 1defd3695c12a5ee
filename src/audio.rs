//! Audio in and out: voice samples read from WAV files (any common rate and bit depth),
//! mixed to mono, resampled to the model's 24 kHz and normalised to -25 dBFS as the
//! original's processor does.

use anyhow::{anyhow, bail, Context, Result};
use rubato::{FftFixedIn, Resampler};
use std::path::Path;

/// VibeVoice's sample rate.
pub const SAMPLE_RATE: u32 = 24_000;

/// The level voice prompts are scaled to (`AudioNormalizer(target_dB_FS=-25)`).
pub const TARGET_DBFS: f64 = -25.0;

/// Reads a WAV file as mono samples at [`SAMPLE_RATE`], normalised like the original's voice
/// prompts. Errors name the file and say what is wrong with it.
pub fn read_voice(path: &Path) -> Result<Vec<f32>> {
    let shown = path.display();
    let mut reader = hound::WavReader::open(path).map_err(|e| match e {
        hound::Error::IoError(io) => anyhow!("cannot read voice file {shown}: {io}"),
        other => anyhow!(
            "{shown} is not a WAV file this tool can read ({other}): convert it to 16-bit PCM WAV"
        ),
    })?;
    crate::output::record_input(path);
    let spec = reader.spec();
    let channels = spec.channels as usize;
    if channels == 0 || spec.sample_rate == 0 {
        bail!("{shown}: the WAV header gives no channels or no sample rate");
    }
    let interleaved: Vec<f32> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Float, 32) => reader.samples::<f32>().collect::<Result<_, _>>(),
        (hound::SampleFormat::Int, bits @ 1..=32) => {
            let full_scale = (1u64 << (bits - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|s| s as f32 / full_scale))
                .collect::<Result<_, _>>()
        }
        (format, bits) => bail!("{shown}: {bits}-bit {format:?} samples are not supported: convert it to 16-bit PCM WAV"),
    }
    .with_context(|| format!("{shown}: the audio data is cut short or damaged"))?;
    if interleaved.is_empty() {
        bail!("{shown} holds no audio: a voice sample needs a few seconds of speech");
    }
    // librosa's mono=True: the mean of the channels.
    let mono: Vec<f32> = interleaved
        .chunks(channels)
        .map(|frame| frame.iter().sum::<f32>() / channels as f32)
        .collect();
    let mut samples = resample(&mono, spec.sample_rate, SAMPLE_RATE).with_context(|| {
        format!(
            "{shown}: cannot resample {} Hz to {SAMPLE_RATE} Hz",
            spec.sample_rate
        )
    })?;
    if samples.iter().any(|s| !s.is_finite()) {
        bail!("{shown} holds NaN or infinite samples");
    }
    normalize(&mut samples);
    Ok(samples)
}

/// Resamples mono audio from `from` Hz to `to` Hz with an FFT resampler, giving
/// `ceil(len * to / from)` samples, as librosa does.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    if from == to {
        return Ok(samples.to_vec());
    }
    let wanted = (samples.len() as u64 * to as u64).div_ceil(from as u64) as usize;
    const CHUNK: usize = 1024;
    let mut resampler = FftFixedIn::<f32>::new(from as usize, to as usize, CHUNK, 2, 1)
        .map_err(|e| anyhow!("{e}"))?;
    let delay = resampler.output_delay();
    let mut out: Vec<f32> = Vec::with_capacity(wanted + delay + CHUNK);
    let mut rest = samples;
    while rest.len() >= resampler.input_frames_next() {
        let (chunk, tail) = rest.split_at(resampler.input_frames_next());
        out.extend_from_slice(&resampler.process(&[chunk], None)?[0]);
        rest = tail;
    }
    // The tail, then silence until the delayed output has caught up.
    out.extend_from_slice(&resampler.process_partial(Some(&[rest]), None)?[0]);
    while out.len() < wanted + delay {
        out.extend_from_slice(&resampler.process_partial::<&[f32]>(None, None)?[0]);
    }
    Ok(out[delay..delay + wanted].to_vec())
}

/// Scales audio to [`TARGET_DBFS`] RMS, then down to a peak of 1 if it would clip
/// (`AudioNormalizer.__call__`, with its epsilon of 1e-6).
pub fn normalize(samples: &mut [f32]) {
    const EPS: f64 = 1e-6;
    let mean_square =
        samples.iter().map(|&s| s as f64 * s as f64).sum::<f64>() / samples.len().max(1) as f64;
    let scalar = 10f64.powf(TARGET_DBFS / 20.0) / (mean_square.sqrt() + EPS);
    let mut peak = 0f64;
    for s in samples.iter_mut() {
        *s = (*s as f64 * scalar) as f32;
        peak = peak.max(s.abs() as f64);
    }
    if peak > 1.0 {
        let down = peak + EPS;
        for s in samples.iter_mut() {
            *s = (*s as f64 / down) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_wav(path: &Path, rate: u32, channels: u16, samples: &[i16]) {
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(path, spec).unwrap();
        for &s in samples {
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
    }

    fn rms_dbfs(x: &[f32]) -> f64 {
        let ms = x.iter().map(|&s| (s as f64).powi(2)).sum::<f64>() / x.len() as f64;
        20.0 * ms.sqrt().log10()
    }

    #[test]
    fn a_16_khz_stereo_voice_becomes_24_khz_mono_at_minus_25_dbfs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.wav");
        // 0.5 s of a 440 Hz tone, left loud and right silent (the mean halves it).
        let tone: Vec<i16> = (0..8000)
            .flat_map(|i| {
                let s = (i as f64 * 440.0 * std::f64::consts::TAU / 16000.0).sin() * 20000.0;
                [s as i16, 0]
            })
            .collect();
        write_wav(&path, 16000, 2, &tone);
        let x = read_voice(&path).unwrap();
        assert_eq!(x.len(), 12000);
        assert!(
            (rms_dbfs(&x) - TARGET_DBFS).abs() < 0.05,
            "{}",
            rms_dbfs(&x)
        );
        // Still a 440 Hz tone: the correlation with a clean 24 kHz tone is near 1 away from
        // the edges.
        let (mut dot, mut norm_a, mut norm_b) = (0f64, 0f64, 0f64);
        for (i, &s) in x.iter().enumerate().skip(500).take(11000) {
            let r = (i as f64 * 440.0 * std::f64::consts::TAU / 24000.0).sin();
            dot += s as f64 * r;
            norm_a += (s as f64).powi(2);
            norm_b += r * r;
        }
        assert!(dot / (norm_a * norm_b).sqrt() > 0.999);
    }

    #[test]
    fn loud_audio_is_scaled_below_clipping() {
        let mut x = vec![0f32; 1000];
        x[0] = 1.0;
        normalize(&mut x);
        let peak = x.iter().fold(0f32, |m, &s| m.max(s.abs()));
        assert!(peak <= 1.0 && peak > 0.99, "{peak}");
    }

    #[test]
    fn unreadable_or_empty_files_are_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("none.wav");
        let err = read_voice(&missing).unwrap_err().to_string();
        assert!(
            err.contains("cannot read voice file") && err.contains("none.wav"),
            "{err}"
        );
        let text = dir.path().join("text.wav");
        std::fs::write(&text, "not audio").unwrap();
        let err = read_voice(&text).unwrap_err().to_string();
        assert!(err.contains("is not a WAV file"), "{err}");
        let empty = dir.path().join("empty.wav");
        write_wav(&empty, 24000, 1, &[]);
        let err = read_voice(&empty).unwrap_err().to_string();
        assert!(err.contains("holds no audio"), "{err}");
    }

    #[test]
    fn the_demo_voices_read_at_24_khz() {
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/vibevoice-demo");
        if !demo.exists() {
            eprintln!("skipped: {} is absent", demo.display());
            return;
        }
        let alice = read_voice(&demo.join("en-Alice_woman.wav")).unwrap();
        // 9.3 s at 16 kHz becomes the same duration at 24 kHz.
        assert!(
            (alice.len() as f64 / 24000.0 - 9.3).abs() < 0.1,
            "{}",
            alice.len()
        );
        assert!((rms_dbfs(&alice) - TARGET_DBFS).abs() < 0.1);
    }
}
