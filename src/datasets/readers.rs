//! Reading a prepared set back for training (docs/DESIGN.md §16.3): the
//! nucleotide ids of one DNA split, windows drawn from it, and the µ-law
//! clips of one speech split with their digits.

use std::path::Path;

use super::dna::{nucleotide_id, ApeManifest, SPLITS};
use super::speech::{ClipRecord, SpeechManifest};
use crate::error::{invalid, Error, Result};
use crate::io::read_object;
use crate::rng::Rng;

/// Which data set a directory made by `selective data` holds, from its
/// manifest.
pub enum PreparedSet {
    DnaApes(ApeManifest),
    SpeechDigits(SpeechManifest),
}

impl PreparedSet {
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("manifest.json");
        let value: serde_json::Value = read_object(&path, "a data set manifest")?;
        let shown = path.display().to_string();
        let parse = |what: &str| Error::Format {
            file: shown.clone(),
            message: format!("not a {what} manifest"),
        };
        if value.get("reference").is_some() {
            Ok(PreparedSet::DnaApes(
                serde_json::from_value(value).map_err(|_| parse("dna-apes"))?,
            ))
        } else if value.get("clip_samples").is_some() {
            Ok(PreparedSet::SpeechDigits(
                serde_json::from_value(value).map_err(|_| parse("speech-digits"))?,
            ))
        } else {
            Err(Error::Format {
                file: shown,
                message:
                    "neither a dna-apes nor a speech-digits manifest (make one with selective data)"
                        .into(),
            })
        }
    }
}

fn split_index(op: &'static str, split: &str) -> Result<usize> {
    SPLITS.iter().position(|s| *s == split).ok_or_else(|| {
        invalid(
            op,
            format!("unknown split {split:?} (expected train, val or test)"),
        )
    })
}

/// One split of the great-ape set as nucleotide ids (A C G T N = 0..4),
/// per species its segments (each a run of 1 Mb regions of one split).
pub struct ApeSplit {
    pub species: Vec<String>,
    /// [species][segment]: ids.
    pub segments: Vec<Vec<Vec<u8>>>,
}

impl ApeSplit {
    /// Reads `dir/{split}/{species}.txt` of every species of the manifest.
    pub fn read(dir: &Path, manifest: &ApeManifest, split: &str) -> Result<Self> {
        const OP: &str = "ApeSplit::read";
        split_index(OP, split)?;
        let mut segments = Vec::new();
        for species in &manifest.species {
            let path = dir.join(split).join(format!("{species}.txt"));
            let text = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let mut per = Vec::new();
            for (line_no, line) in text.split(|&b| b == b'\n').enumerate() {
                if line.is_empty() {
                    continue;
                }
                if let Some(&bad) = line.iter().find(|&&b| !b"ACGTN".contains(&b)) {
                    return Err(Error::Format {
                        file: path.display().to_string(),
                        message: format!(
                            "line {}: {:?} is not one of A C G T N",
                            line_no + 1,
                            bad as char
                        ),
                    });
                }
                per.push(line.iter().map(|&b| nucleotide_id(b)).collect());
            }
            segments.push(per);
        }
        Ok(ApeSplit {
            species: manifest.species.clone(),
            segments,
        })
    }

    /// Bases of `species` in windows of `len` that fit in its segments.
    pub fn window_starts(&self, species: usize, len: usize) -> usize {
        self.segments[species]
            .iter()
            .map(|s| (s.len() + 1).saturating_sub(len))
            .sum()
    }

    /// The length of the longest segment of `species`.
    pub fn longest_segment(&self, species: usize) -> usize {
        self.segments[species]
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(0)
    }

    /// A window of `len` ids of `species`, uniform over every start at
    /// which a window fits inside one segment; None when none fits.
    pub fn sample_window(&self, species: usize, len: usize, rng: &mut Rng) -> Option<&[u8]> {
        let total = self.window_starts(species, len);
        if total == 0 || len == 0 {
            return None;
        }
        self.window_at(species, len, rng.below(total))
    }

    /// The `index`-th window of `len` ids of `species`, counting every
    /// start at which a window fits inside one segment, segment by segment
    /// (index < [`Self::window_starts`]); None past the last.
    pub fn window_at(&self, species: usize, len: usize, index: usize) -> Option<&[u8]> {
        let mut k = index;
        for seg in &self.segments[species] {
            let starts = (seg.len() + 1).saturating_sub(len);
            if k < starts {
                return Some(&seg[k..k + len]);
            }
            k -= starts;
        }
        None
    }

    /// `n` windows of `len` ids of `species` at evenly spaced starts (the
    /// k-th at start index ⌊(k + ½) · starts / n⌋): the same held-out
    /// stretches on every run.
    pub fn spaced_windows(&self, species: usize, len: usize, n: usize) -> Option<Vec<&[u8]>> {
        let total = self.window_starts(species, len);
        if total == 0 || len == 0 {
            return None;
        }
        (0..n)
            .map(|k| self.window_at(species, len, ((2 * k + 1) * total) / (2 * n)))
            .collect()
    }
}

/// One split of the spoken-digit set: 8-bit µ-law clips and their digits.
pub struct SpeechSplit {
    pub clip_samples: usize,
    /// (clips, clip_samples) µ-law codes.
    pub codes: Vec<u8>,
    pub digits: Vec<u8>,
    pub records: Vec<ClipRecord>,
}

impl SpeechSplit {
    pub fn read(dir: &Path, manifest: &SpeechManifest, split: &str) -> Result<Self> {
        const OP: &str = "SpeechSplit::read";
        split_index(OP, split)?;
        let path = dir.join(split).join("clips.mulaw");
        let codes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let jsonl = dir.join(split).join("clips.jsonl");
        let text = std::fs::read_to_string(&jsonl).map_err(|e| Error::io(&jsonl, e))?;
        let mut records = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let r: ClipRecord = serde_json::from_str(line).map_err(|e| Error::Format {
                file: jsonl.display().to_string(),
                message: format!("line {}: {e}", i + 1),
            })?;
            if r.index != records.len() || r.utterance.digit > 9 {
                return Err(Error::Format {
                    file: jsonl.display().to_string(),
                    message: format!(
                        "line {}: clip {} out of order or not a digit",
                        i + 1,
                        r.index
                    ),
                });
            }
            records.push(r);
        }
        let n = manifest.clip_samples;
        if n == 0 || codes.len() != records.len() * n {
            return Err(Error::Format {
                file: path.display().to_string(),
                message: format!(
                    "{} bytes for {} clips of {n} samples",
                    codes.len(),
                    records.len()
                ),
            });
        }
        Ok(SpeechSplit {
            clip_samples: n,
            digits: records.iter().map(|r| r.utterance.digit).collect(),
            codes,
            records,
        })
    }

    pub fn len(&self) -> usize {
        self.digits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digits.is_empty()
    }

    /// The µ-law codes of clip `i`.
    pub fn clip(&self, i: usize) -> &[u8] {
        &self.codes[i * self.clip_samples..(i + 1) * self.clip_samples]
    }
}
