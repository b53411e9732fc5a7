//! Spoken digits (docs/DESIGN.md §16.2): an SC09-like set of one-second
//! clips of the words "zero" ... "nine", synthesised by espeak-ng with
//! many voices, speeds and pitches, at 16 kHz, and the 8-bit µ-law coding
//! the paper's audio models predict.
//!
//! A voice is an espeak-ng accent (a language such as `en-us`) with a voice
//! variant (`+Annie`, `+m3`, ...). The split is by variant, so that test
//! voices are never heard in training in any accent: the variants sorted by
//! name, the i-th goes to validation if i mod 10 = 8, to test if
//! i mod 10 = 9, else to training.
//!
//! This module plans the utterances and turns synthesised samples into
//! clips; running the synthesiser is the caller's (`selective data
//! speech-digits`).

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::dna::{sha256_hex, SPLITS};
use crate::error::{invalid, Error, Result};
use crate::io::write_atomically;
use crate::rng::Rng;

/// The words, by digit.
pub const DIGITS: [&str; 10] = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
];

/// µ of the µ-law companding (8 bits: 256 levels).
pub const MU: f64 = 255.0;

/// The µ-law code (0..=255) of a sample x in [-1, 1] (clamped):
/// F(x) = sign(x) ln(1 + µ|x|) / ln(1 + µ), then F's range [-1, 1] cut
/// into 256 equal steps, the code the nearest step (WaveNet; SampleRNN).
pub fn mulaw_encode(x: f64) -> u8 {
    let x = x.clamp(-1.0, 1.0);
    let f = x.signum() * (1.0 + MU * x.abs()).ln() / (1.0 + MU).ln();
    ((f + 1.0) / 2.0 * MU).round() as u8
}

/// The sample in [-1, 1] of a µ-law code: F⁻¹(y) = sign(y) ((1 + µ)^|y| − 1) / µ
/// with y = 2 code / 255 − 1.
pub fn mulaw_decode(code: u8) -> f64 {
    let y = 2.0 * code as f64 / MU - 1.0;
    y.signum() * ((1.0 + MU).powf(y.abs()) - 1.0) / MU
}

/// One clip to synthesise.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Utterance {
    /// espeak-ng's `-v`: accent `+` variant.
    pub voice: String,
    pub accent: String,
    pub variant: String,
    pub digit: u8,
    pub take: usize,
    /// Words per minute (`-s`).
    pub speed: u32,
    /// Pitch 0-99 (`-p`).
    pub pitch: u32,
    /// 0 train, 1 val, 2 test.
    pub split: usize,
}

/// The split of the i-th variant (sorted by name).
pub fn split_of_variant(index: usize) -> usize {
    match index % 10 {
        8 => 1,
        9 => 2,
        _ => 0,
    }
}

/// Every utterance of the set, in a fixed order: the variants sorted and
/// deduplicated, then for each variant, accent, digit and take one clip,
/// its speed drawn from `speeds` and its pitch from `pitches` (inclusive
/// ranges) by a generator seeded with `seed`.
pub fn plan_utterances(
    accents: &[String],
    variants: &[String],
    takes: usize,
    speeds: (u32, u32),
    pitches: (u32, u32),
    seed: u64,
) -> Result<Vec<Utterance>> {
    const OP: &str = "plan_utterances";
    if accents.is_empty() || variants.is_empty() || takes == 0 {
        return Err(invalid(OP, "at least one accent, one variant and one take"));
    }
    if speeds.0 > speeds.1 || pitches.0 > pitches.1 || pitches.1 > 99 {
        return Err(invalid(
            OP,
            format!("speeds {speeds:?} and pitches {pitches:?} must be ranges lo..=hi, pitch at most 99"),
        ));
    }
    for name in accents.iter().chain(variants) {
        if name.is_empty()
            || !name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(invalid(
                OP,
                format!("voice name {name:?}: only letters, digits, '-' and '_'"),
            ));
        }
    }
    let mut variants: Vec<String> = variants.to_vec();
    variants.sort();
    variants.dedup();
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    for (vi, variant) in variants.iter().enumerate() {
        for accent in accents {
            for digit in 0..10u8 {
                for take in 0..takes {
                    let speed = speeds.0 + rng.below((speeds.1 - speeds.0 + 1) as usize) as u32;
                    let pitch = pitches.0 + rng.below((pitches.1 - pitches.0 + 1) as usize) as u32;
                    out.push(Utterance {
                        voice: format!("{accent}+{variant}"),
                        accent: accent.clone(),
                        variant: variant.clone(),
                        digit,
                        take,
                        speed,
                        pitch,
                        split: split_of_variant(vi),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// How a synthesised utterance became a clip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClipFit {
    /// Samples of speech kept (after trimming the silence at both ends).
    pub speech_samples: usize,
    /// Samples cut off because the speech was longer than the clip.
    pub cropped: usize,
}

/// Trims the silence at both ends of `samples` (|x| at most `threshold`),
/// then centres what is left in a clip of `len` samples padded with zeros
/// (cropping both ends evenly if it is longer).
pub fn fit_clip(samples: &[i16], len: usize, threshold: i16) -> (Vec<i16>, ClipFit) {
    let loud = |x: &i16| x.unsigned_abs() > threshold.unsigned_abs();
    let first = samples.iter().position(loud);
    let last = samples.iter().rposition(loud);
    let speech = match (first, last) {
        (Some(a), Some(b)) => &samples[a..=b],
        _ => &samples[..0],
    };
    let mut clip = vec![0i16; len];
    let cropped = speech.len().saturating_sub(len);
    let kept = &speech[cropped / 2..speech.len() - (cropped - cropped / 2)];
    let offset = (len - kept.len()) / 2;
    clip[offset..offset + kept.len()].copy_from_slice(kept);
    (
        clip,
        ClipFit {
            speech_samples: speech.len(),
            cropped,
        },
    )
}

/// One clip's entry in `{split}/clips.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipRecord {
    /// Row of the clip in `{split}/clips.mulaw`.
    pub index: usize,
    #[serde(flatten)]
    pub utterance: Utterance,
    #[serde(flatten)]
    pub fit: ClipFit,
}

/// `manifest.json` of a spoken-digit set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpeechManifest {
    pub sample_rate: u32,
    pub clip_samples: usize,
    pub encoding: String,
    pub synthesiser: String,
    pub seed: u64,
    pub accents: Vec<String>,
    /// Variants by split.
    pub variants: std::collections::BTreeMap<String, Vec<String>>,
    /// Clips by split.
    pub clips: std::collections::BTreeMap<String, usize>,
    /// Clips whose speech was longer than a clip and was cropped.
    pub cropped_clips: usize,
    /// Relative path to the SHA-256 of its bytes.
    pub files: std::collections::BTreeMap<String, String>,
}

/// Writes a set: for each split, `{split}/clips.mulaw` (one row of
/// `clip_samples` µ-law bytes per clip) and `{split}/clips.jsonl` (what
/// each row is), then `manifest.json`; every file atomically.
/// `clips[i]` is the 16-bit clip of `utterances[i]`.
#[allow(clippy::too_many_arguments)]
pub fn write_speech_set(
    dir: &Path,
    utterances: &[Utterance],
    clips: &[(Vec<i16>, ClipFit)],
    sample_rate: u32,
    clip_samples: usize,
    accents: &[String],
    synthesiser: &str,
    seed: u64,
) -> Result<SpeechManifest> {
    if utterances.len() != clips.len() {
        return Err(invalid(
            "write_speech_set",
            format!("{} clips for {} utterances", clips.len(), utterances.len()),
        ));
    }
    let mut files = std::collections::BTreeMap::new();
    let mut counts = std::collections::BTreeMap::new();
    let mut variants = std::collections::BTreeMap::new();
    for (split, name) in SPLITS.iter().enumerate() {
        let split_dir = dir.join(name);
        std::fs::create_dir_all(&split_dir).map_err(|e| Error::io(&split_dir, e))?;
        let mut bytes = Vec::new();
        let mut records = String::new();
        let mut names: Vec<String> = Vec::new();
        for (u, (clip, fit)) in utterances
            .iter()
            .zip(clips)
            .filter(|(u, _)| u.split == split)
        {
            if clip.len() != clip_samples {
                return Err(invalid(
                    "write_speech_set",
                    format!("a clip of {} samples, expected {clip_samples}", clip.len()),
                ));
            }
            let index = bytes.len() / clip_samples;
            bytes.extend(clip.iter().map(|&s| mulaw_encode(s as f64 / 32768.0)));
            let record = ClipRecord {
                index,
                utterance: u.clone(),
                fit: *fit,
            };
            records.push_str(&serde_json::to_string(&record).expect("a record serialises"));
            records.push('\n');
            if names.last() != Some(&u.variant) {
                names.push(u.variant.clone());
            }
        }
        for (file, data) in [
            ("clips.mulaw", bytes.as_slice()),
            ("clips.jsonl", records.as_bytes()),
        ] {
            let rel = format!("{name}/{file}");
            write_atomically(&dir.join(&rel), data)?;
            files.insert(rel, sha256_hex(data));
        }
        counts.insert(name.to_string(), bytes.len() / clip_samples.max(1));
        variants.insert(name.to_string(), names);
    }
    let manifest = SpeechManifest {
        sample_rate,
        clip_samples,
        encoding: "8-bit mu-law (mu = 255), one row of clip_samples bytes per clip".into(),
        synthesiser: synthesiser.to_string(),
        seed,
        accents: accents.to_vec(),
        variants,
        clips: counts,
        cropped_clips: clips.iter().filter(|(_, f)| f.cropped > 0).count(),
        files,
    };
    let text = serde_json::to_string_pretty(&manifest).expect("a manifest serialises");
    write_atomically(&dir.join("manifest.json"), text.as_bytes())?;
    Ok(manifest)
}
