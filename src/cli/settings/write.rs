//! The settings of the commands that write checkpoints: `synth` and `convert`.

use super::*;

/// What `synth` writes.
pub fn synth_spec(a: &SynthArgs) -> Result<SynthSpec> {
    let custom_flags = [
        a.layers,
        a.hidden,
        a.intermediate,
        a.heads,
        a.kv_heads,
        a.head_dim,
        a.vocab,
    ];
    let (config, speech) = match a.size {
        SizeArg::Builtin(_) if custom_flags.iter().any(Option::is_some) || a.tie_embeddings => {
            bail!(UsageError::new(
                "--layers, --hidden, --intermediate, --heads, --kv-heads, --head-dim, --vocab and --tie-embeddings need --size custom"
            ))
        }
        SizeArg::Builtin(size) => {
            let config = BuiltinModel::from(size).config();
            let speech = SpeechConfig::real(config.hidden_size);
            (config, speech)
        }
        SizeArg::Custom => {
            let hidden = a.hidden.unwrap_or(64);
            let heads = a.heads.unwrap_or(4);
            let config = ModelConfig {
                hidden_size: hidden,
                intermediate_size: a.intermediate.unwrap_or(128),
                num_attention_heads: heads,
                num_key_value_heads: a.kv_heads.unwrap_or(2),
                head_dim: a.head_dim.unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
                num_hidden_layers: a.layers.unwrap_or(2),
                vocab_size: a.vocab.unwrap_or(256),
                rope_theta: 1e6,
                rms_norm_eps: 1e-6,
                tie_word_embeddings: a.tie_embeddings,
                max_position_embeddings: 32768,
            };
            config
                .validate()
                .map_err(|e| UsageError::new(format!("synth --size custom: {e:#}")))?;
            let speech = SpeechConfig::small(config.hidden_size);
            (config, speech)
        }
    };
    let precision = match (a.dtype, a.scale) {
        (DtypeArg::Bf16, ScaleArg::None) => Precision::BF16,
        (DtypeArg::Bf16, _) => bail!(UsageError::new(
            "--scale applies to float8 checkpoints; drop it or use --dtype float8"
        )),
        (DtypeArg::Float8, ScaleArg::None) => Precision::Float8Plain,
        (DtypeArg::Float8, scale) => Precision::Float8Scaled(
            match a.scale_convention {
                ConventionArg::ScaleWeight => ScaleConvention::ScaleWeight,
                ConventionArg::WeightScale => ScaleConvention::WeightScale,
            },
            if scale == ScaleArg::Scalar {
                ScaleGranularity::Scalar
            } else {
                ScaleGranularity::PerChannel
            },
        ),
    };
    Ok(SynthSpec {
        config,
        speech,
        precision,
        seed: a.seed,
    })
}

/// The precision `convert` writes; a scale convention needs scales.
pub fn convert_precision(a: &ConvertArgs) -> Result<Precision> {
    let convention = match a.scale_convention.unwrap_or(ConventionArg::ScaleWeight) {
        ConventionArg::ScaleWeight => ScaleConvention::ScaleWeight,
        ConventionArg::WeightScale => ScaleConvention::WeightScale,
    };
    match (a.precision, a.scale_convention) {
        (ConvertPrecisionArg::Float8, Some(_)) => bail!(UsageError::new(
            "--scale-convention names scale tensors, which only --precision float8-scaled writes"
        )),
        (ConvertPrecisionArg::Float8, None) => Ok(Precision::Float8Plain),
        (ConvertPrecisionArg::Float8Scaled, _) => Ok(Precision::Float8Scaled(
            convention,
            ScaleGranularity::PerChannel,
        )),
    }
}
