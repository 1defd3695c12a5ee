//! The prompt VibeVoice's processor builds from a script and voice samples, piece by piece
//! (each piece tokenized on its own, ids concatenated), with the mask of the positions the
//! voice latents fill. Mirrors `VibeVoiceProcessor` (`_convert_text_to_script`,
//! `_parse_script`, `_create_voice_prompt`, `_process_single`).

use super::TextTokenizer;
use anyhow::{bail, Result};

/// The system prompt every VibeVoice prompt starts with.
pub const SYSTEM_PROMPT: &str = " Transform the text provided by various speakers into speech output, utilizing the distinct voice of each respective speaker.\n";

/// One line of a script: who speaks and what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScriptLine {
    /// Speaker number after normalisation (0-based when every number in the script was
    /// positive, as written otherwise).
    pub speaker: u64,
    /// The text, stripped, with the one leading space the original adds.
    pub text: String,
}

/// Matches `^Speaker\s+(\d+)\s*:\s*(.*)$` (case-insensitive) on a stripped line: the speaker
/// number and the stripped text.
fn speaker_line(line: &str) -> Option<(&str, &str)> {
    let head = line.get(..7)?;
    if !head.eq_ignore_ascii_case("speaker") {
        return None;
    }
    let rest = &line[7..];
    let after_space = rest.trim_start();
    if after_space.len() == rest.len() {
        return None;
    }
    let digits_end = after_space
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(after_space.len());
    if digits_end == 0 {
        return None;
    }
    let (digits, rest) = after_space.split_at(digits_end);
    let text = rest.trim_start().strip_prefix(':')?;
    Some((digits, text.trim()))
}

/// A script file's text as the original reads a `.txt` script: blank lines skipped,
/// `Speaker N: text` lines kept (those with empty text dropped), any other line given to
/// speaker 1. Fails when no line has content.
pub fn script_from_text_file(content: &str) -> Result<String> {
    let mut lines = Vec::new();
    for line in content.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match speaker_line(line) {
            Some((_, "")) => {}
            Some((number, text)) => lines.push(format!("Speaker {number}: {text}")),
            None => lines.push(format!("Speaker 1: {line}")),
        }
    }
    if lines.is_empty() {
        bail!("the script has no text: write one line per turn, as \"Speaker 1: Hello.\"");
    }
    Ok(lines.join("\n"))
}

/// Parses a script into lines; speaker numbers are shifted down by one when all are positive
/// (so "Speaker 1..4" become 0..3). Lines that are not `Speaker N: text` are skipped, as the
/// original does (it logs a warning); a script with none fails.
pub fn parse_script(script: &str) -> Result<Vec<ScriptLine>> {
    let mut lines = Vec::new();
    for line in script.trim().split('\n') {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some((number, text)) = speaker_line(line) {
            let Ok(speaker) = number.parse::<u64>() else {
                bail!("speaker number {number} is too large: number speakers from 1");
            };
            lines.push(ScriptLine {
                speaker,
                text: format!(" {text}"),
            });
        }
    }
    if lines.is_empty() {
        bail!("no speaker lines in the script: write one line per turn, as \"Speaker 1: Hello.\"");
    }
    if lines.iter().all(|l| l.speaker > 0) {
        for line in &mut lines {
            line.speaker -= 1;
        }
    }
    Ok(lines)
}

/// Distinct speakers of a script: how many voice samples the prompt uses.
pub fn speaker_count(lines: &[ScriptLine]) -> usize {
    let mut speakers: Vec<u64> = lines.iter().map(|l| l.speaker).collect();
    speakers.sort_unstable();
    speakers.dedup();
    speakers.len()
}

/// A tokenized prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prompt {
    /// Token ids, ending with speech_start.
    pub ids: Vec<u32>,
    /// True at the placeholder positions that the voice latents replace, in voice order.
    pub speech_input: Vec<bool>,
}

/// Builds the prompt for `lines` with one voice sample per entry of `voice_frames` (the
/// number of latent frames of each sample: `ceil(samples / hop)`); voice `i` is introduced as
/// "Speaker i". The caller passes as many voices as the script has speakers.
pub fn build(
    tokenizer: &TextTokenizer,
    lines: &[ScriptLine],
    voice_frames: &[usize],
) -> Result<Prompt> {
    let special = tokenizer.special();
    let mut prompt = Prompt {
        ids: Vec::new(),
        speech_input: Vec::new(),
    };
    let text = |prompt: &mut Prompt, piece: &str| -> Result<()> {
        let ids = tokenizer.encode(piece)?;
        prompt
            .speech_input
            .extend(std::iter::repeat_n(false, ids.len()));
        prompt.ids.extend(ids);
        Ok(())
    };
    let token = |prompt: &mut Prompt, id: u32, voice: bool, count: usize| {
        prompt.ids.extend(std::iter::repeat_n(id, count));
        prompt
            .speech_input
            .extend(std::iter::repeat_n(voice, count));
    };

    text(&mut prompt, SYSTEM_PROMPT)?;
    if !voice_frames.is_empty() {
        text(&mut prompt, " Voice input:\n")?;
        for (i, &frames) in voice_frames.iter().enumerate() {
            text(&mut prompt, &format!(" Speaker {i}:"))?;
            token(&mut prompt, special.speech_start, false, 1);
            token(&mut prompt, special.speech_diffusion, true, frames);
            token(&mut prompt, special.speech_end, false, 1);
            text(&mut prompt, "\n")?;
        }
    }
    text(&mut prompt, " Text input:\n")?;
    for line in lines {
        text(
            &mut prompt,
            &format!(" Speaker {}:{}\n", line.speaker, line.text),
        )?;
    }
    text(&mut prompt, " Speech output:\n")?;
    token(&mut prompt, special.speech_start, false, 1);
    Ok(prompt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn speaker_numbers_shift_to_zero_only_when_all_are_positive() {
        let lines = parse_script("Speaker 1: Hi.\nnoise\n  speaker  2 :  Yes  \n").unwrap();
        assert_eq!(
            lines,
            [
                ScriptLine {
                    speaker: 0,
                    text: " Hi.".into()
                },
                ScriptLine {
                    speaker: 1,
                    text: " Yes".into()
                }
            ]
        );
        let lines = parse_script("Speaker 0: a\nSpeaker 2: b").unwrap();
        assert_eq!((lines[0].speaker, lines[1].speaker), (0, 2));
        assert_eq!(speaker_count(&lines), 2);
        assert!(parse_script("hello\n\n").is_err());
        assert!(parse_script("Speaker: x").is_err());
        assert!(parse_script("Speaker99999999999999999999999: x").is_err());
    }

    #[test]
    fn text_files_give_plain_lines_to_speaker_one() {
        let script =
            script_from_text_file("Intro line\n\nSpeaker 2: Reply\nSpeaker 3:   \n").unwrap();
        assert_eq!(script, "Speaker 1: Intro line\nSpeaker 2: Reply");
        assert!(script_from_text_file(" \n\n").is_err());
    }

    #[test]
    fn prompt_is_assembled_piece_by_piece_as_the_original() {
        let t = TextTokenizer::embedded().unwrap();
        let lines = parse_script("Speaker 1: Hello world.").unwrap();
        let prompt = build(&t, &lines, &[2]).unwrap();
        let mut expected: Vec<u32> = t.encode(SYSTEM_PROMPT).unwrap();
        expected.extend([27930, 1946, 510]); // " Voice input:\n"
        expected.extend([29073, 220, 15, 25]); // " Speaker 0:"
        expected.extend([151652, 151654, 151654, 151653, 198]);
        expected.extend([2918, 1946, 510]); // " Text input:\n"
        expected.extend([29073, 220, 15, 25, 21927, 1879, 624]);
        expected.extend([38741, 2550, 510, 151652]);
        assert_eq!(prompt.ids, expected);
        let voice: Vec<usize> = (0..prompt.ids.len())
            .filter(|&i| prompt.speech_input[i])
            .collect();
        assert_eq!(voice, [28, 29]);
        assert!(voice.iter().all(|&i| prompt.ids[i] == 151654));
    }
}
