//! Text in: the Qwen2.5 tokenizer VibeVoice uses (byte-level BPE with Qwen2's split pattern
//! and its added special tokens), built from the vocabulary and merges embedded in the
//! binary or found in a directory, and the prompt the original assembles from a script
//! ([`prompt`]).

pub mod prompt;

use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Qwen2's pre-tokenizer pattern (the `Split` of its `tokenizer.json`): contractions,
/// letter runs with one leading non-letter, single digits, punctuation runs, newlines,
/// whitespace.
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The Qwen2.5 files shipped in the binary (Apache-2.0, from the VibeVoice fork's
/// `tokenizer/` folder).
const EMBEDDED_VOCAB: &str = include_str!("qwen2.5/vocab.json");
const EMBEDDED_MERGES: &str = include_str!("qwen2.5/merges.txt");
const EMBEDDED_CONFIG: &str = include_str!("qwen2.5/tokenizer_config.json");

/// The token ids that steer VibeVoice's generation loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpecialTokens {
    /// Opens a speech segment (`<|vision_start|>`).
    pub speech_start: u32,
    /// Closes a speech segment (`<|vision_end|>`).
    pub speech_end: u32,
    /// One latent frame (`<|vision_pad|>`): voice placeholders and generated frames.
    pub speech_diffusion: u32,
    /// Ends generation (`<|endoftext|>`).
    pub eos: u32,
}

impl SpecialTokens {
    /// The Qwen2.5 ids every real VibeVoice checkpoint uses.
    pub const QWEN2_5: SpecialTokens = SpecialTokens {
        speech_start: 151652,
        speech_end: 151653,
        speech_diffusion: 151654,
        eos: 151643,
    };

    /// The ids in the order the loop's logit mask lists them.
    pub fn all(&self) -> [u32; 4] {
        [
            self.speech_start,
            self.speech_end,
            self.speech_diffusion,
            self.eos,
        ]
    }
}

/// A byte-level BPE text tokenizer with VibeVoice's special tokens.
pub struct TextTokenizer {
    inner: Tokenizer,
    special: SpecialTokens,
}

impl TextTokenizer {
    /// The Qwen2.5 tokenizer embedded in the binary.
    pub fn embedded() -> Result<TextTokenizer> {
        let vocab: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(EMBEDDED_VOCAB).context("the embedded vocab.json")?;
        TextTokenizer::build(
            vocab,
            EMBEDDED_MERGES,
            EMBEDDED_CONFIG,
            "the embedded tokenizer",
        )
    }

    /// Reads `vocab.json`, `merges.txt` and `tokenizer_config.json` from `dir` (the files of a
    /// Hugging Face Qwen2 tokenizer folder).
    pub fn from_dir(dir: &Path) -> Result<TextTokenizer> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "cannot read {}: a tokenizer folder needs vocab.json, merges.txt and tokenizer_config.json",
                    path.display()
                )
            })
        };
        let vocab_path = dir.join("vocab.json");
        let vocab: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(&read("vocab.json")?)
                .map_err(|e| anyhow!("{} is not a JSON object: {e}", vocab_path.display()))?;
        let merges = read("merges.txt")?;
        let config = read("tokenizer_config.json")?;
        TextTokenizer::build(vocab, &merges, &config, &dir.display().to_string())
    }

    fn build(
        vocab_json: serde_json::Map<String, serde_json::Value>,
        merges_txt: &str,
        config_json: &str,
        source: &str,
    ) -> Result<TextTokenizer> {
        let mut vocab = Vocab::default();
        for (token, id) in vocab_json {
            let id = id
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .ok_or_else(|| {
                    anyhow!("{source}: vocab.json maps {token:?} to {id}, not a token id")
                })?;
            vocab.insert(token, id);
        }
        let mut merges: Merges = Vec::new();
        for (i, line) in merges_txt.lines().enumerate() {
            // The first line may be a `#version` header.
            if line.is_empty() || (i == 0 && line.starts_with("#version")) {
                continue;
            }
            let (a, b) = line
                .split_once(' ')
                .ok_or_else(|| anyhow!("{source}: merges.txt line {} is not two tokens", i + 1))?;
            merges.push((a.to_string(), b.to_string()));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| anyhow!("{source}: the BPE model cannot be built: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_normalizer(Some(NFC));
        let split = Split::new(
            SplitPattern::Regex(QWEN2_PATTERN.into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| anyhow!("the Qwen2 split pattern: {e}"))?;
        inner.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ])));
        inner.with_decoder(Some(ByteLevel::default()));

        let config: serde_json::Value = serde_json::from_str(config_json)
            .map_err(|e| anyhow!("{source}: tokenizer_config.json is not valid JSON: {e}"))?;
        let mut added: Vec<(u32, String)> = Vec::new();
        if let Some(map) = config
            .get("added_tokens_decoder")
            .and_then(|v| v.as_object())
        {
            for (id, entry) in map {
                let content = entry.get("content").and_then(|c| c.as_str());
                match (id.parse::<u32>(), content) {
                    (Ok(id), Some(content)) => added.push((id, content.to_string())),
                    _ => {
                        bail!("{source}: tokenizer_config.json has a malformed added token {id:?}")
                    }
                }
            }
        }
        // Added ids follow the vocabulary; adding them in id order gives each its own id.
        added.sort();
        let tokens: Vec<AddedToken> = added
            .iter()
            .map(|(_, content)| AddedToken::from(content.clone(), true))
            .collect();
        inner.add_special_tokens(&tokens);
        for (id, content) in &added {
            if inner.token_to_id(content) != Some(*id) {
                bail!("{source}: added token {content:?} should have id {id}, the vocabulary gives it another");
            }
        }

        let id = |content: &str| {
            inner.token_to_id(content).ok_or_else(|| {
                anyhow!("{source}: no {content} token (VibeVoice needs it to mark speech)")
            })
        };
        let special = SpecialTokens {
            speech_start: id("<|vision_start|>")?,
            speech_end: id("<|vision_end|>")?,
            speech_diffusion: id("<|vision_pad|>")?,
            eos: id("<|endoftext|>")?,
        };
        Ok(TextTokenizer { inner, special })
    }

    /// Token ids of `text`, with no special tokens added (special-token text in `text` is
    /// still recognised, as in the original).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The special ids of this vocabulary.
    pub fn special(&self) -> SpecialTokens {
        self.special
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's test vectors (vibevoice-speech.md §3), computed with the original's
    /// tokenizer.
    #[test]
    fn embedded_tokenizer_reproduces_the_reference_ids() {
        let t = TextTokenizer::embedded().unwrap();
        let cases: [(&str, &[u32]); 7] = [
            (
                " Transform the text provided by various speakers into speech output, utilizing the distinct voice of each respective speaker.\n",
                &[
                    15226, 279, 1467, 3897, 553, 5257, 21326, 1119, 8806, 2550, 11, 34888, 279,
                    12460, 7743, 315, 1817, 19511, 18601, 624,
                ],
            ),
            (" Voice input:\n", &[27930, 1946, 510]),
            (" Speaker 0:", &[29073, 220, 15, 25]),
            ("\n", &[198]),
            (" Text input:\n", &[2918, 1946, 510]),
            (" Speech output:\n", &[38741, 2550, 510]),
            (" Speaker 0: Hello world.\n", &[29073, 220, 15, 25, 21927, 1879, 624]),
        ];
        for (text, ids) in cases {
            assert_eq!(t.encode(text).unwrap(), ids, "{text:?}");
        }
        assert_eq!(t.special(), SpecialTokens::QWEN2_5);
        assert_eq!(
            t.encode("<|vision_pad|><|vision_pad|>").unwrap(),
            [151654, 151654]
        );
    }

    #[test]
    fn a_folder_without_the_files_is_one_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextTokenizer::from_dir(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("vocab.json") && err.contains("merges.txt"),
            "{err}"
        );
    }
}
