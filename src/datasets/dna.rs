//! Great-ape DNA (docs/DESIGN.md §16.1): a multiple alignment of human
//! chromosome 22 with chimpanzee, gorilla and orangutan (Debian's
//! `maffilter-examples`, an Ensembl Compara EPO alignment in MAF), turned
//! into one DNA sequence per species and split by chromosome region.
//!
//! A MAF file is blocks of aligned rows:
//!
//! ```text
//! a
//! s Hsap.22 17443628 4489 + 51304566 CTTGGCGCC-CCTGG...
//! s Ptro.22 15821905 4491 + 50165558 CTTGGCGCCCCCTGG...
//! ```
//! (`s src start size strand srcSize text`: `size` is the number of
//! letters of `text` that are not gaps). A species' sequence is its rows,
//! block after block, with the gaps removed, upper-cased (lower case marks
//! repeats), every letter other than A, C, G, T read as N.
//!
//! The split is by the reference species' position: the chromosome is cut
//! into regions of `region_bp` bases and region r goes to validation if
//! r mod 10 = 8, to test if r mod 10 = 9, else to training. Every species
//! of a block goes where the block's reference row goes, so that the same
//! stretch of the genome is never in two splits. Blocks that follow each
//! other in one split and one region form a segment; windows for a task are
//! taken inside segments, never across the joint of two regions.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{invalid, Error, Result};
use crate::io::write_atomically;

/// The nucleotide alphabet; a letter's id is its index.
pub const NUCLEOTIDES: [u8; 5] = *b"ACGTN";

/// The id of a sequence letter (A 0, C 1, G 2, T 3, anything else N 4).
pub fn nucleotide_id(letter: u8) -> u8 {
    match letter.to_ascii_uppercase() {
        b'A' => 0,
        b'C' => 1,
        b'G' => 2,
        b'T' => 3,
        _ => 4,
    }
}

/// One `s` line of a block.
#[derive(Clone, Debug, PartialEq)]
pub struct MafRow {
    /// The part of `src` before the first dot ("Hsap" of "Hsap.22").
    pub species: String,
    pub src: String,
    pub start: u64,
    /// Letters of `text` that are not gaps.
    pub size: u64,
    pub strand: char,
    pub src_size: u64,
    pub text: Vec<u8>,
}

/// An alignment block and the line its `a` was on.
#[derive(Clone, Debug, PartialEq)]
pub struct MafBlock {
    pub line: usize,
    pub rows: Vec<MafRow>,
}

/// Reads every block of a MAF text; `file` names it in errors, which also
/// give the line.
pub fn read_maf(reader: impl BufRead, file: &str) -> Result<Vec<MafBlock>> {
    let bad = |line: usize, message: String| Error::Format {
        file: file.to_string(),
        message: format!("line {line}: {message}"),
    };
    let mut blocks: Vec<MafBlock> = Vec::new();
    let mut in_block = false;
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| bad(n, e.to_string()))?;
        let line = line.trim_end();
        if line.is_empty() {
            in_block = false;
            continue;
        }
        match line.as_bytes()[0] {
            b'#' => {}
            b'a' if line == "a" || line.starts_with("a ") => {
                blocks.push(MafBlock {
                    line: n,
                    rows: Vec::new(),
                });
                in_block = true;
            }
            b's' if line.starts_with("s ") => {
                if !in_block {
                    return Err(bad(n, "an `s` line outside a block".into()));
                }
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() != 7 {
                    return Err(bad(
                        n,
                        format!("an `s` line has 7 fields, this one {}", f.len()),
                    ));
                }
                let number = |s: &str, what: &str| {
                    s.parse::<u64>()
                        .map_err(|_| bad(n, format!("{what} {s:?} is not a number")))
                };
                let text = f[6].as_bytes().to_vec();
                let letters = text.iter().filter(|&&c| c != b'-').count() as u64;
                let size = number(f[3], "size")?;
                if letters != size {
                    return Err(bad(
                        n,
                        format!("size {size} but the text has {letters} letters that are not gaps"),
                    ));
                }
                let strand = match f[4] {
                    "+" => '+',
                    "-" => '-',
                    s => return Err(bad(n, format!("strand {s:?} is not + or -"))),
                };
                let block = blocks.last_mut().expect("in a block");
                if let Some(first) = block.rows.first() {
                    if first.text.len() != text.len() {
                        return Err(bad(
                            n,
                            format!(
                                "a row of {} columns in a block of {}",
                                text.len(),
                                first.text.len()
                            ),
                        ));
                    }
                }
                block.rows.push(MafRow {
                    species: f[1].split('.').next().unwrap_or(f[1]).to_string(),
                    src: f[1].to_string(),
                    start: number(f[2], "start")?,
                    size,
                    strand,
                    src_size: number(f[5], "srcSize")?,
                    text,
                });
            }
            // i, e, q lines (and anything else) carry nothing used here
            _ => {}
        }
    }
    Ok(blocks)
}

/// Reads a MAF file, gzip-compressed if its name ends in `.gz`.
pub fn read_maf_file(path: &Path) -> Result<Vec<MafBlock>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let shown = path.display().to_string();
    if path.extension().is_some_and(|e| e == "gz") {
        let reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(file));
        read_maf(reader, &shown)
    } else {
        read_maf(std::io::BufReader::new(file), &shown)
    }
}

/// The three splits, in file order.
pub const SPLITS: [&str; 3] = ["train", "val", "test"];

/// The split of a region: 8 and 9 of every 10 are validation and test.
pub fn split_of_region(region: u64) -> usize {
    match region % 10 {
        8 => 1,
        9 => 2,
        _ => 0,
    }
}

/// The species' sequences of each split, as segments of letters ACGTN.
#[derive(Clone, Debug, PartialEq)]
pub struct ApeGenomes {
    /// Species in the order of the first block's rows.
    pub species: Vec<String>,
    pub reference: String,
    pub region_bp: u64,
    /// [split][species]: the segments, each a run of blocks of one region.
    pub segments: Vec<Vec<Vec<Vec<u8>>>>,
    /// Blocks in each split.
    pub blocks: [usize; 3],
}

impl ApeGenomes {
    /// Splits aligned blocks by the position of `reference`'s row. Every
    /// block must hold one row of each species of the first block.
    pub fn from_blocks(
        blocks: &[MafBlock],
        reference: &str,
        region_bp: u64,
        file: &str,
    ) -> Result<Self> {
        let bad = |line: usize, message: String| Error::Format {
            file: file.to_string(),
            message: format!("block at line {line}: {message}"),
        };
        if region_bp == 0 {
            return Err(invalid("ApeGenomes", "region_bp must be at least 1"));
        }
        let first = blocks
            .first()
            .ok_or_else(|| invalid("ApeGenomes", format!("{file}: no alignment blocks")))?;
        let species: Vec<String> = first.rows.iter().map(|r| r.species.clone()).collect();
        if let Some(s) = species
            .iter()
            .enumerate()
            .find_map(|(i, s)| species[..i].contains(s).then_some(s))
        {
            return Err(bad(first.line, format!("two rows of {s}")));
        }
        if !species.iter().any(|s| s == reference) {
            return Err(bad(
                first.line,
                format!("no row of the reference species {reference} (rows: {species:?})"),
            ));
        }
        let mut segments = vec![vec![Vec::<Vec<u8>>::new(); species.len()]; 3];
        let mut counts = [0usize; 3];
        // the (split, region) of the previous block: a new segment starts
        // whenever it changes
        let mut last: Option<u64> = None;
        for block in blocks {
            // the rows of each species of the first block, in that order
            // (blocks list them in any order)
            let rows: Vec<&MafRow> = species
                .iter()
                .filter_map(|s| block.rows.iter().find(|r| &r.species == s))
                .collect();
            if block.rows.len() != species.len() || rows.len() != species.len() {
                let found: Vec<&str> = block.rows.iter().map(|r| r.species.as_str()).collect();
                return Err(bad(
                    block.line,
                    format!(
                        "species {found:?}; every block must have one row of each of {species:?}"
                    ),
                ));
            }
            let reference_row = rows
                .iter()
                .find(|r| r.species == reference)
                .expect("checked above");
            let region = reference_row.start / region_bp;
            let split = split_of_region(region);
            counts[split] += 1;
            let new_segment = last != Some(region);
            last = Some(region);
            for (s, row) in rows.iter().enumerate() {
                let seqs = &mut segments[split][s];
                if new_segment {
                    seqs.push(Vec::new());
                }
                let seq = seqs.last_mut().expect("a segment was started");
                seq.extend(
                    row.text
                        .iter()
                        .filter(|&&c| c != b'-')
                        .map(|&c| NUCLEOTIDES[nucleotide_id(c) as usize]),
                );
            }
        }
        Ok(Self {
            species,
            reference: reference.to_string(),
            region_bp,
            segments,
            blocks: counts,
        })
    }

    /// Writes `dir/{split}/{species}.txt` (one segment per line) and
    /// `dir/manifest.json` (sizes and SHA-256 of every file, and of
    /// `source`, the alignment they came from), each atomically.
    pub fn write(&self, dir: &Path, source: &ManifestSource) -> Result<ApeManifest> {
        let mut files = BTreeMap::new();
        let mut splits = BTreeMap::new();
        for (split, name) in SPLITS.iter().enumerate() {
            let split_dir = dir.join(name);
            std::fs::create_dir_all(&split_dir).map_err(|e| Error::io(&split_dir, e))?;
            let mut per_species = BTreeMap::new();
            for (s, species) in self.species.iter().enumerate() {
                let segments = &self.segments[split][s];
                let mut text = Vec::with_capacity(segments.iter().map(|g| g.len() + 1).sum());
                for seg in segments {
                    text.extend_from_slice(seg);
                    text.push(b'\n');
                }
                let rel = format!("{name}/{species}.txt");
                write_atomically(&dir.join(&rel), &text)?;
                files.insert(rel, sha256_hex(&text));
                per_species.insert(
                    species.clone(),
                    SpeciesCount {
                        bases: segments.iter().map(|g| g.len() as u64).sum(),
                        segments: segments.len(),
                        n_bases: segments.iter().flatten().filter(|&&c| c == b'N').count() as u64,
                    },
                );
            }
            splits.insert(
                name.to_string(),
                SplitCount {
                    blocks: self.blocks[split],
                    species: per_species,
                },
            );
        }
        let manifest = ApeManifest {
            source: source.clone(),
            reference: self.reference.clone(),
            region_bp: self.region_bp,
            rule:
                "region = reference start / region_bp; region mod 10 = 8: val, 9: test, else train"
                    .into(),
            species: self.species.clone(),
            splits,
            files,
        };
        let text = serde_json::to_string_pretty(&manifest).expect("a manifest serialises");
        write_atomically(&dir.join("manifest.json"), text.as_bytes())?;
        Ok(manifest)
    }
}

/// Where a data set came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestSource {
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

impl ManifestSource {
    /// Names `path` and hashes its bytes.
    pub fn of_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok(Self {
            path: path.display().to_string(),
            sha256: sha256_hex(&bytes),
            bytes: bytes.len() as u64,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SpeciesCount {
    pub bases: u64,
    pub segments: usize,
    /// Bases that are N (not A, C, G or T).
    pub n_bases: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitCount {
    pub blocks: usize,
    pub species: BTreeMap<String, SpeciesCount>,
}

/// `manifest.json` of a great-ape data set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApeManifest {
    pub source: ManifestSource,
    pub reference: String,
    pub region_bp: u64,
    pub rule: String,
    pub species: Vec<String>,
    pub splits: BTreeMap<String, SplitCount>,
    /// Relative path to the SHA-256 of its bytes.
    pub files: BTreeMap<String, String>,
}

/// Lower-case hexadecimal SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
