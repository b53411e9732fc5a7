//! Real data sets of the paper's DNA and audio experiments, made from
//! public packages (docs/DESIGN.md §16): great-ape DNA from a multiple
//! alignment of chromosome 22 ([`dna`]), and spoken digits synthesised by
//! espeak-ng ([`speech`]). Each is built deterministically into a directory
//! with a `manifest.json` holding the SHA-256 of every file.

pub mod dna;
pub mod readers;
pub mod speech;

pub use dna::{
    nucleotide_id, read_maf, read_maf_file, ApeGenomes, ApeManifest, MafBlock, NUCLEOTIDES,
};
pub use readers::{ApeSplit, PreparedSet, SpeechSplit};
pub use speech::{
    fit_clip, mulaw_decode, mulaw_encode, plan_utterances, write_speech_set, ClipFit,
    SpeechManifest, Utterance, DIGITS,
};
