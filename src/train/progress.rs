//! Progress of a training run: a progress bar (indicatif) on a terminal,
//! plain log lines otherwise (a file, a pipe, CI), or nothing.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// How a run reports its progress on stderr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, else a log line every `log_every` steps.
    #[default]
    Auto,
    /// Nothing (tests, library use).
    Silent,
}

pub(crate) struct Reporter {
    bar: Option<ProgressBar>,
    plain: bool,
    log_every: usize,
}

/// One step's numbers for the display.
pub(crate) struct StepLine {
    pub step: usize,
    pub total: usize,
    pub loss: f32,
    pub lr: f64,
    pub tokens_per_second: f64,
    pub seconds_left: f64,
}

impl Reporter {
    pub fn new(mode: ProgressMode, start: usize, total: usize, log_every: usize) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = (mode == ProgressMode::Auto && terminal).then(|| {
            let bar = ProgressBar::new(total as u64);
            let style = ProgressStyle::with_template("[{bar:30.cyan/blue}] step {pos}/{len} {msg}")
                .expect("a valid template")
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_position(start as u64);
            bar
        });
        Self {
            bar,
            plain: mode == ProgressMode::Auto && !terminal,
            log_every: log_every.max(1),
        }
    }

    pub fn step(&self, s: &StepLine) {
        let text = format!(
            "loss {:.4}  lr {:.2e}  {:.0} tok/s  {} left",
            s.loss,
            s.lr,
            s.tokens_per_second,
            duration(s.seconds_left)
        );
        if let Some(bar) = &self.bar {
            bar.set_position(s.step as u64);
            bar.set_message(text);
        } else if self.plain && (s.step.is_multiple_of(self.log_every) || s.step == s.total) {
            eprintln!("step {}/{}  {text}", s.step, s.total);
        }
    }

    /// A line that stays (evaluations, checkpoints).
    pub fn line(&self, text: &str) {
        if let Some(bar) = &self.bar {
            bar.println(text);
        } else if self.plain {
            eprintln!("{text}");
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// "1h02m", "3m05s", "12s"
fn duration(seconds: f64) -> String {
    if !seconds.is_finite() {
        return "?".into();
    }
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
