//! WAV files of 16-bit PCM, mono: what the speech data is made of and what
//! generated audio is written as (docs/DESIGN.md §16.2).
//!
//! ```text
//! "RIFF" size "WAVE"
//! "fmt " 16  format 1 (PCM)  channels 1  rate  rate·2  block 2  bits 16
//! "data" n·2  samples (i16, little-endian)
//! ```
//! The reader takes any chunk order and skips chunks it does not need
//! (LIST, fact, ...); it refuses every other encoding by name.

use std::path::Path;

use super::atomic::write_atomically;
use crate::error::{Error, Result};

/// Mono 16-bit samples and their rate.
#[derive(Clone, Debug, PartialEq)]
pub struct Wav {
    pub sample_rate: u32,
    pub samples: Vec<i16>,
}

impl Wav {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let data_len = self.samples.len() as u32 * 2;
        let mut b = Vec::with_capacity(44 + data_len as usize);
        b.extend_from_slice(b"RIFF");
        b.extend_from_slice(&(36 + data_len).to_le_bytes());
        b.extend_from_slice(b"WAVE");
        b.extend_from_slice(b"fmt ");
        b.extend_from_slice(&16u32.to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes()); // PCM
        b.extend_from_slice(&1u16.to_le_bytes()); // mono
        b.extend_from_slice(&self.sample_rate.to_le_bytes());
        b.extend_from_slice(&(self.sample_rate * 2).to_le_bytes()); // bytes per second
        b.extend_from_slice(&2u16.to_le_bytes()); // block align
        b.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
        b.extend_from_slice(b"data");
        b.extend_from_slice(&data_len.to_le_bytes());
        for s in &self.samples {
            b.extend_from_slice(&s.to_le_bytes());
        }
        b
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomically(path, &self.to_bytes())
    }

    /// Parses a file's bytes; `file` names it in errors.
    pub fn from_bytes(bytes: &[u8], file: &str) -> Result<Self> {
        let bad = |message: String| Error::Format {
            file: file.to_string(),
            message,
        };
        if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
            return Err(bad("not a RIFF/WAVE file".into()));
        }
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let mut at = 12;
        let mut rate = None;
        let mut data = None;
        while at + 8 <= bytes.len() {
            let id = &bytes[at..at + 4];
            let len = u32_at(at + 4) as usize;
            let body = at + 8;
            // a streamed file may give 0xFFFFFFFF: the data runs to the end
            let end = body.saturating_add(len).min(bytes.len());
            match id {
                b"fmt " => {
                    if end - body < 16 {
                        return Err(bad(format!("fmt chunk of {} bytes", end - body)));
                    }
                    let (format, channels, bits) =
                        (u16_at(body), u16_at(body + 2), u16_at(body + 14));
                    if format != 1 || channels != 1 || bits != 16 {
                        return Err(bad(format!(
                            "format {format}, {channels} channels, {bits} bits: only 16-bit PCM mono (format 1) is read"
                        )));
                    }
                    rate = Some(u32_at(body + 4));
                }
                b"data" => data = Some(&bytes[body..end]),
                _ => {}
            }
            // chunks are padded to an even length
            at = end + (end - body) % 2;
        }
        let sample_rate = rate.ok_or_else(|| bad("no fmt chunk".into()))?;
        let data = data.ok_or_else(|| bad("no data chunk".into()))?;
        if sample_rate == 0 {
            return Err(bad("sample rate 0".into()));
        }
        Ok(Self {
            sample_rate,
            samples: data
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]))
                .collect(),
        })
    }

    /// Reads a file.
    pub fn read(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }
}
