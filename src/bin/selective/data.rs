//! `selective data dna-apes OUT` and `selective data speech-digits OUT`:
//! build the real data sets of the DNA and audio experiments
//! (docs/DESIGN.md §16) from Debian packages, deterministically, with a
//! manifest of SHA-256 checksums.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use clap::Subcommand;
use rayon::prelude::*;

use selective::datasets::dna::{read_maf_file, ApeGenomes, ManifestSource};
use selective::datasets::speech::{fit_clip, plan_utterances, write_speech_set, DIGITS};
use selective::io::Wav;

use crate::CliResult;

/// Where Debian's maffilter-examples puts the great-ape alignment.
const DEFAULT_MAF: &str = "/usr/share/doc/maffilter/examples/Gorilla/Compara.epo_5_catarrhini_hsap-projected.chr22.subset.nogap.cleaned_aln.maf.gz";

/// espeak-ng's English accents.
const DEFAULT_ACCENTS: &str =
    "en-gb,en-us,en-gb-scotland,en-gb-x-gbclan,en-gb-x-rp,en-gb-x-gbcwmd,en-029,en-us-nyc";

const SAMPLE_RATE: u32 = 16_000;

#[derive(clap::Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub set: DataSet,
}

#[derive(Subcommand)]
pub enum DataSet {
    /// Great-ape DNA: human, chimpanzee, gorilla and orangutan sequences of
    /// chromosome 22 from a multiple alignment (Debian: apt-get install
    /// maffilter-examples), split into training, validation and test
    /// regions: OUT/{train,val,test}/{species}.txt and OUT/manifest.json.
    DnaApes {
        out: PathBuf,
        /// The alignment (MAF, gzip-compressed if it ends in .gz).
        #[arg(long, default_value = DEFAULT_MAF)]
        maf: PathBuf,
        /// Bases per region of the reference's chromosome: regions are
        /// dealt to the splits 8 : 1 : 1.
        #[arg(long, default_value_t = 1_000_000)]
        region_bp: u64,
        /// The species whose coordinates define the regions.
        #[arg(long, default_value = "Hsap")]
        reference: String,
    },
    /// Spoken digits: one-second clips of "zero" ... "nine" from espeak-ng
    /// with many voices, speeds and pitches, resampled by sox to 16 kHz
    /// (Debian: apt-get install espeak-ng sox), split by voice variant:
    /// OUT/{train,val,test}/clips.mulaw (8-bit µ-law rows) and clips.jsonl,
    /// OUT/examples/*.wav, OUT/manifest.json.
    SpeechDigits {
        out: PathBuf,
        /// espeak-ng accents, comma separated.
        #[arg(long, value_delimiter = ',', default_value = DEFAULT_ACCENTS)]
        accents: Vec<String>,
        /// Voice variants, comma separated (default: every variant
        /// `espeak-ng --voices=variant` lists whose name is letters,
        /// digits, '-' and '_').
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
        /// Keep only the first N variants (sorted by name).
        #[arg(long)]
        max_variants: Option<usize>,
        /// Clips per voice and digit.
        #[arg(long, default_value_t = 1)]
        takes: usize,
        /// Words per minute, drawn uniformly from MIN..=MAX.
        #[arg(long, num_args = 2, value_names = ["MIN", "MAX"], default_values_t = [150, 210])]
        speed: Vec<u32>,
        /// Pitch (0-99), drawn uniformly from MIN..=MAX.
        #[arg(long, num_args = 2, value_names = ["MIN", "MAX"], default_values_t = [25, 75])]
        pitch: Vec<u32>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        threads: Option<usize>,
    },
}

pub fn run(args: DataArgs) -> CliResult {
    match args.set {
        DataSet::DnaApes {
            out,
            maf,
            region_bp,
            reference,
        } => dna_apes(&out, &maf, region_bp, &reference),
        DataSet::SpeechDigits {
            out,
            accents,
            variants,
            max_variants,
            takes,
            speed,
            pitch,
            seed,
            threads,
        } => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads.unwrap_or(0))
                .build()?;
            pool.install(|| {
                speech_digits(
                    &out,
                    &accents,
                    variants,
                    max_variants,
                    takes,
                    (speed[0], speed[1]),
                    (pitch[0], pitch[1]),
                    seed,
                )
            })
        }
    }
}

fn dna_apes(out: &Path, maf: &Path, region_bp: u64, reference: &str) -> CliResult {
    if !maf.exists() {
        return Err(format!(
            "{}: not found; it comes with Debian's maffilter-examples (apt-get install maffilter-examples), or give --maf",
            maf.display()
        )
        .into());
    }
    let t0 = Instant::now();
    let source = ManifestSource::of_file(maf)?;
    let blocks = read_maf_file(maf)?;
    let genomes = ApeGenomes::from_blocks(&blocks, reference, region_bp, &source.path)?;
    let manifest = genomes.write(out, &source)?;
    eprintln!(
        "{} blocks of {} in {:.1} s; species {:?}",
        blocks.len(),
        maf.display(),
        t0.elapsed().as_secs_f64(),
        manifest.species
    );
    for (split, counts) in &manifest.splits {
        let bases: Vec<String> = counts
            .species
            .iter()
            .map(|(s, c)| format!("{s} {} bases", c.bases))
            .collect();
        eprintln!("{split}: {} blocks; {}", counts.blocks, bases.join(", "));
    }
    eprintln!("wrote {}", out.join("manifest.json").display());
    Ok(())
}

/// Runs a program, feeding `input` to its standard input, and returns its
/// standard output; an error names the program, and the package to
/// install when it is missing.
fn run_program(program: &str, args: &[&str], input: &[u8], package: &str) -> CliResult<Vec<u8>> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                format!("{program} not found: apt-get install {package}")
            }
            _ => format!("{program}: {e}"),
        })?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_vec();
    // write on another thread so that a full stdout pipe cannot block us
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let output = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| format!("{program}: writing its input panicked"))?
        .map_err(|e| format!("{program}: writing its input: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "{program} {}: {}: {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )
        .into());
    }
    Ok(output.stdout)
}

/// The variants espeak-ng lists, as `-v accent+NAME` takes them.
fn espeak_variants() -> CliResult<Vec<String>> {
    let listing = run_program("espeak-ng", &["--voices=variant"], &[], "espeak-ng")?;
    let text = String::from_utf8_lossy(&listing);
    let mut names: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|line| line.split_whitespace().nth(4))
        .filter_map(|file| file.strip_prefix("!v/"))
        .filter(|name| {
            name.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        })
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    Ok(names)
}

/// "eSpeak NG text-to-speech: 1.51  Data at: ..." → "eSpeak NG text-to-speech: 1.51";
/// "sox:      SoX v14.4.2" → "SoX v14.4.2".
fn version_of(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let line = text.lines().next().unwrap_or("");
    let line = line.split("  Data at:").next().unwrap_or(line);
    line.trim_start_matches("sox:").trim().to_string()
}

#[allow(clippy::too_many_arguments)]
fn speech_digits(
    out: &Path,
    accents: &[String],
    variants: Vec<String>,
    max_variants: Option<usize>,
    takes: usize,
    speeds: (u32, u32),
    pitches: (u32, u32),
    seed: u64,
) -> CliResult {
    let t0 = Instant::now();
    let mut variants = if variants.is_empty() {
        espeak_variants()?
    } else {
        variants
    };
    variants.sort();
    variants.dedup();
    if let Some(n) = max_variants {
        variants.truncate(n);
    }
    let utterances = plan_utterances(accents, &variants, takes, speeds, pitches, seed)?;
    let synthesiser = format!(
        "{}; {}",
        version_of(&run_program("espeak-ng", &["--version"], &[], "espeak-ng")?),
        version_of(&run_program("sox", &["--version"], &[], "sox")?)
    );
    eprintln!(
        "{} clips: {} accents x {} variants x 10 digits x {takes} takes ({synthesiser})",
        utterances.len(),
        accents.len(),
        variants.len()
    );
    let clip_samples = SAMPLE_RATE as usize;
    let rate = SAMPLE_RATE.to_string();
    let clips = utterances
        .par_iter()
        .map(|u| -> CliResult<_> {
            let (speed, pitch) = (u.speed.to_string(), u.pitch.to_string());
            let word = DIGITS[u.digit as usize];
            let wav = run_program(
                "espeak-ng",
                &["-v", &u.voice, "-s", &speed, "-p", &pitch, "--stdout", word],
                &[],
                "espeak-ng",
            )?;
            // resample to 16 kHz, 16-bit mono, no dither: deterministic
            let raw = run_program(
                "sox",
                &[
                    "-t",
                    "wav",
                    "-",
                    "-D",
                    "-t",
                    "raw",
                    "-r",
                    &rate,
                    "-b",
                    "16",
                    "-e",
                    "signed-integer",
                    "-c",
                    "1",
                    "-",
                ],
                &wav,
                "sox",
            )?;
            let samples: Vec<i16> = raw
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]))
                .collect();
            if samples.is_empty() {
                return Err(format!("espeak-ng -v {} said nothing for {word:?}", u.voice).into());
            }
            Ok(fit_clip(&samples, clip_samples, 16))
        })
        .collect::<CliResult<Vec<_>>>()?;
    let manifest = write_speech_set(
        out,
        &utterances,
        &clips,
        SAMPLE_RATE,
        clip_samples,
        accents,
        &synthesiser,
        seed,
    )?;
    // one clip of each digit from the test voices, to listen to
    let examples = out.join("examples");
    std::fs::create_dir_all(&examples)?;
    for digit in 0..10u8 {
        if let Some((u, (clip, _))) = utterances
            .iter()
            .zip(&clips)
            .find(|(u, _)| u.split == 2 && u.digit == digit)
        {
            let name = format!(
                "{}-{}.wav",
                DIGITS[digit as usize],
                u.voice.replace('+', "_")
            );
            Wav {
                sample_rate: SAMPLE_RATE,
                samples: clip.clone(),
            }
            .write(&examples.join(name))?;
        }
    }
    eprintln!(
        "clips: {:?} ({} cropped); {:.1} s; wrote {}",
        manifest.clips,
        manifest.cropped_clips,
        t0.elapsed().as_secs_f64(),
        out.join("manifest.json").display()
    );
    Ok(())
}
