//! Seeded generators of the paper's synthetic tasks (docs/DESIGN.md §12;
//! paper section 4.1 and appendix E.1).
//!
//! Every example is a row of input token ids plus the positions whose
//! output is scored: the model's output at an answer position must be the
//! answer token (no shift: the prediction is read at that position, as in
//! the `copying.py` data of state-spaces/s4, where the outputs at the M
//! marker positions are compared with the M data tokens).
//!
//! ```text
//! Copying (L blanks, M tokens, vocabulary A):
//!     [t_1 .. t_M] [0 × L] [A-1 × M]                      length L + 2M
//!     answers: position L + M + i  →  t_{i+1}             (constant lag L + M)
//! Selective copying: the M data tokens at positions randperm(L+M)[:M], sorted,
//!     0 elsewhere in the first L + M positions, then M markers A-1.
//!     answers: position L + M + i  →  the i-th data token in order
//!     data tokens t ∈ 1..=A-2, 0 = noise (blank), A-1 = marker
//! Induction heads (length L, vocabulary V, trigger V-1):
//!     filler uniform in 0..=V-2; ids[p] = trigger, ids[p+1] = r (the token
//!     to recall), p uniform in [0, L/2 - 1); ids[L-1] = trigger
//!     answer: position L-1  →  r                           (one per sequence)
//! ```
//! In the induction-heads layout the model reads L tokens and predicts the
//! token that follows the final trigger: with the answer appended, the
//! sequence is L + 1 tokens with the second trigger at (L + 1) - 2, the
//! recipe of state-spaces/mamba #62.

use serde::{Deserialize, Serialize};

use crate::error::{invalid, Result};
use crate::rng::Rng;

/// The three synthetic tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    Copying,
    SelectiveCopying,
    InductionHeads,
}

impl TaskKind {
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::Copying => "copying",
            TaskKind::SelectiveCopying => "selective-copying",
            TaskKind::InductionHeads => "induction-heads",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "copying" => Ok(TaskKind::Copying),
            "selective-copying" => Ok(TaskKind::SelectiveCopying),
            "induction-heads" => Ok(TaskKind::InductionHeads),
            other => Err(invalid(
                "TaskKind::parse",
                format!(
                    "unknown task `{other}` (expected copying, selective-copying or induction-heads)"
                ),
            )),
        }
    }
}

/// The size of a task instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub kind: TaskKind,
    /// Vocabulary size A (copying tasks) or V (induction heads), special
    /// tokens included.
    pub vocab: usize,
    /// Copying tasks: L, the number of blanks (inputs are L + 2M long).
    /// Induction heads: the input length.
    pub seq_len: usize,
    /// Copying tasks: M, the tokens to memorise. Unused by induction heads.
    pub memorize: usize,
}

/// One scored output: the model's output at `position` of row `row` should be `token`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Answer {
    pub row: usize,
    pub position: usize,
    pub token: u32,
}

/// A batch of examples: `ids` is (batch, len), row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskBatch {
    pub batch: usize,
    pub len: usize,
    pub ids: Vec<u32>,
    /// Ordered by row, then position.
    pub answers: Vec<Answer>,
}

impl TaskSpec {
    /// Checks that the sizes make a well-defined task.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "TaskSpec";
        match self.kind {
            TaskKind::Copying | TaskKind::SelectiveCopying => {
                if self.vocab < 3 {
                    return Err(invalid(
                        OP,
                        format!(
                            "{} needs a vocabulary of at least 3 (noise 0, data 1..=A-2, marker A-1), got {}",
                            self.kind.name(),
                            self.vocab
                        ),
                    ));
                }
                if self.memorize == 0 {
                    return Err(invalid(
                        OP,
                        "the number of tokens to memorise M must be at least 1",
                    ));
                }
                if self.seq_len == 0 {
                    return Err(invalid(
                        OP,
                        format!(
                            "{} needs at least one blank between the data and the markers \
                             (seq_len L >= 1), got 0",
                            self.kind.name()
                        ),
                    ));
                }
                if self.kind == TaskKind::SelectiveCopying && self.memorize > self.seq_len {
                    return Err(invalid(
                        OP,
                        format!(
                            "selective copying scatters M = {} data tokens among L + M positions, \
                             so at most as many as the L = {} noise tokens: lower memorize or \
                             raise seq_len",
                            self.memorize, self.seq_len
                        ),
                    ));
                }
            }
            TaskKind::InductionHeads => {
                if self.vocab < 3 {
                    return Err(invalid(
                        OP,
                        format!(
                            "induction heads needs a vocabulary of at least 3 (two filler tokens and the trigger), got {}",
                            self.vocab
                        ),
                    ));
                }
                if self.seq_len < 4 {
                    return Err(invalid(
                        OP,
                        format!(
                            "induction heads needs a length of at least 4 (trigger, token, filler, trigger), got {}",
                            self.seq_len
                        ),
                    ));
                }
            }
        }
        if self.vocab > u32::MAX as usize {
            return Err(invalid(OP, "vocabulary too large for u32 token ids"));
        }
        // L + 2M is formed in usize by input_len: a row of at most 2^40
        // tokens (the memory check of a run refuses far shorter ones)
        let row = self.seq_len as u128 + 2 * self.memorize as u128;
        if row > 1 << 40 {
            return Err(invalid(
                OP,
                format!(
                    "a row of seq_len {} + 2 x memorize {} tokens is longer than any run",
                    self.seq_len, self.memorize
                ),
            ));
        }
        Ok(())
    }

    /// Length of one input row.
    pub fn input_len(&self) -> usize {
        match self.kind {
            TaskKind::Copying | TaskKind::SelectiveCopying => self.seq_len + 2 * self.memorize,
            TaskKind::InductionHeads => self.seq_len,
        }
    }

    /// Answers per row: M for the copying tasks, 1 for induction heads.
    pub fn answers_per_row(&self) -> usize {
        match self.kind {
            TaskKind::Copying | TaskKind::SelectiveCopying => self.memorize,
            TaskKind::InductionHeads => 1,
        }
    }

    /// Accuracy of guessing uniformly among the possible answers.
    pub fn chance_accuracy(&self) -> f64 {
        match self.kind {
            TaskKind::Copying | TaskKind::SelectiveCopying => 1.0 / (self.vocab - 2) as f64,
            TaskKind::InductionHeads => 1.0 / (self.vocab - 1) as f64,
        }
    }

    /// `batch` examples drawn from `rng`.
    pub fn sample(&self, batch: usize, rng: &mut Rng) -> Result<TaskBatch> {
        self.validate()?;
        if batch == 0 {
            return Err(invalid("TaskSpec::sample", "batch must be at least 1"));
        }
        let len = self.input_len();
        let mut ids = Vec::with_capacity(batch * len);
        let mut answers = Vec::with_capacity(batch * self.answers_per_row());
        for row in 0..batch {
            match self.kind {
                TaskKind::Copying | TaskKind::SelectiveCopying => {
                    let (row_ids, tokens) = self.copying_row(rng);
                    let first_marker = self.seq_len + self.memorize;
                    for (i, &token) in tokens.iter().enumerate() {
                        answers.push(Answer {
                            row,
                            position: first_marker + i,
                            token,
                        });
                    }
                    ids.extend(row_ids);
                }
                TaskKind::InductionHeads => {
                    let mut seq = InductionSequence::new(self.vocab, len, rng)?;
                    ids.extend(seq.next_chunk(len));
                    answers.push(Answer {
                        row,
                        position: len - 1,
                        token: seq.answer(),
                    });
                }
            }
        }
        Ok(TaskBatch {
            batch,
            len,
            ids,
            answers,
        })
    }

    /// One copying or selective-copying row and its M data tokens in order.
    fn copying_row(&self, rng: &mut Rng) -> (Vec<u32>, Vec<u32>) {
        let (l, m, a) = (self.seq_len, self.memorize, self.vocab);
        let marker = (a - 1) as u32;
        // data tokens uniform in 1..=A-2 (torch.randint(1, A-1))
        let tokens: Vec<u32> = (0..m).map(|_| 1 + rng.below(a - 2) as u32).collect();
        let positions: Vec<usize> = match self.kind {
            TaskKind::Copying => (0..m).collect(),
            _ => {
                // randperm(L+M)[:M], sorted: a partial Fisher-Yates shuffle.
                let mut perm: Vec<usize> = (0..l + m).collect();
                for i in 0..m {
                    let j = i + rng.below(l + m - i);
                    perm.swap(i, j);
                }
                let mut chosen = perm[..m].to_vec();
                chosen.sort_unstable();
                chosen
            }
        };
        let mut row = vec![0u32; l + 2 * m];
        for (&p, &t) in positions.iter().zip(&tokens) {
            row[p] = t;
        }
        row[l + m..].fill(marker);
        (row, tokens)
    }
}

/// One induction-heads sequence generated chunk by chunk, so that a
/// sequence of a million tokens never needs to exist in memory at once.
#[derive(Clone, Debug)]
pub struct InductionSequence {
    vocab: usize,
    len: usize,
    /// Position of the first trigger; the token to recall is at p + 1.
    trigger_position: usize,
    recall: u32,
    /// Tokens handed out so far.
    produced: usize,
    filler: Rng,
}

impl InductionSequence {
    /// Draws the trigger position, the token to recall and a seed for the
    /// filler from `rng`.
    pub fn new(vocab: usize, len: usize, rng: &mut Rng) -> Result<Self> {
        TaskSpec {
            kind: TaskKind::InductionHeads,
            vocab,
            seq_len: len,
            memorize: 0,
        }
        .validate()?;
        // p uniform in [0, L/2 - 1): "early", and p + 1 < L - 1.
        let trigger_position = rng.below((len / 2 - 1).max(1));
        let recall = rng.below(vocab - 1) as u32;
        let filler = Rng::new(rng.next_u64());
        Ok(Self {
            vocab,
            len,
            trigger_position,
            recall,
            produced: 0,
            filler,
        })
    }

    pub fn trigger(&self) -> u32 {
        (self.vocab - 1) as u32
    }

    pub fn trigger_position(&self) -> usize {
        self.trigger_position
    }

    /// The token that follows the first trigger: the answer at position L-1.
    pub fn answer(&self) -> u32 {
        self.recall
    }

    /// Tokens not yet handed out.
    pub fn remaining(&self) -> usize {
        self.len - self.produced
    }

    /// The next min(n, remaining) tokens.
    pub fn next_chunk(&mut self, n: usize) -> Vec<u32> {
        let n = n.min(self.remaining());
        let trigger = self.trigger();
        let out = (self.produced..self.produced + n)
            .map(|t| {
                if t == self.trigger_position || t == self.len - 1 {
                    trigger
                } else if t == self.trigger_position + 1 {
                    self.recall
                } else {
                    self.filler.below(self.vocab - 1) as u32
                }
            })
            .collect();
        self.produced += n;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: TaskKind, vocab: usize, seq_len: usize, memorize: usize) -> TaskSpec {
        TaskSpec {
            kind,
            vocab,
            seq_len,
            memorize,
        }
    }

    #[test]
    fn copying_rows_have_tokens_first_then_blanks_then_markers() {
        let s = spec(TaskKind::Copying, 10, 20, 5);
        let b = s.sample(7, &mut Rng::new(1)).unwrap();
        assert_eq!((b.batch, b.len), (7, 30));
        assert_eq!(b.answers.len(), 35);
        for r in 0..7 {
            let row = &b.ids[r * 30..(r + 1) * 30];
            let answers: Vec<_> = b.answers.iter().filter(|a| a.row == r).collect();
            for (i, a) in answers.iter().enumerate() {
                assert_eq!(a.position, 25 + i);
                assert_eq!(a.token, row[i], "constant lag L + M");
                assert!((1..=8).contains(&a.token));
            }
            assert!(row[5..25].iter().all(|&t| t == 0));
            assert!(row[25..].iter().all(|&t| t == 9));
        }
    }

    #[test]
    fn selective_copying_scatters_data_in_order_among_noise() {
        let s = spec(TaskKind::SelectiveCopying, 6, 40, 8);
        let b = s.sample(50, &mut Rng::new(2)).unwrap();
        let len = 40 + 16;
        let mut first_positions = std::collections::BTreeSet::new();
        for r in 0..50 {
            let row = &b.ids[r * len..(r + 1) * len];
            let data: Vec<(usize, u32)> = row[..48]
                .iter()
                .enumerate()
                .filter(|(_, &t)| t != 0)
                .map(|(p, &t)| (p, t))
                .collect();
            assert_eq!(data.len(), 8, "M data tokens among L + M positions");
            assert!(data.iter().all(|&(_, t)| (1..=4).contains(&t)));
            assert!(row[48..].iter().all(|&t| t == 5), "M markers A-1");
            let answers: Vec<_> = b.answers.iter().filter(|a| a.row == r).collect();
            assert_eq!(answers.len(), 8);
            for (i, a) in answers.iter().enumerate() {
                assert_eq!(a.position, 48 + i);
                assert_eq!(a.token, data[i].1, "answers are the data tokens in order");
            }
            first_positions.insert(data[0].0);
        }
        assert!(
            first_positions.len() > 5,
            "positions are random: {first_positions:?}"
        );
    }

    #[test]
    fn induction_heads_trigger_recall_and_answer() {
        let s = spec(TaskKind::InductionHeads, 16, 64, 0);
        let b = s.sample(100, &mut Rng::new(3)).unwrap();
        assert_eq!(b.answers.len(), 100);
        let mut trigger_positions = std::collections::BTreeSet::new();
        for r in 0..100 {
            let row = &b.ids[r * 64..(r + 1) * 64];
            let triggers: Vec<usize> = (0..64).filter(|&t| row[t] == 15).collect();
            assert_eq!(triggers.len(), 2, "the trigger occurs exactly twice");
            assert_eq!(triggers[1], 63, "the second trigger is the last input");
            assert!(triggers[0] < 31, "the first trigger is early");
            let a = b.answers[r];
            assert_eq!((a.row, a.position), (r, 63));
            assert_eq!(a.token, row[triggers[0] + 1]);
            assert!(a.token < 15);
            trigger_positions.insert(triggers[0]);
        }
        assert!(trigger_positions.len() > 10);
    }

    #[test]
    fn induction_chunks_concatenate_to_the_whole_sequence() {
        let whole = InductionSequence::new(8, 1000, &mut Rng::new(9))
            .unwrap()
            .next_chunk(1000);
        let mut seq = InductionSequence::new(8, 1000, &mut Rng::new(9)).unwrap();
        let mut chunks = Vec::new();
        for n in [1, 7, 300, 500, 1000] {
            chunks.extend(seq.next_chunk(n));
        }
        assert_eq!(seq.remaining(), 0);
        assert_eq!(chunks, whole);
    }

    #[test]
    fn generators_are_deterministic_given_the_seed() {
        for kind in [
            TaskKind::Copying,
            TaskKind::SelectiveCopying,
            TaskKind::InductionHeads,
        ] {
            let s = spec(kind, 8, 16, 4);
            assert_eq!(
                s.sample(4, &mut Rng::new(5)).unwrap(),
                s.sample(4, &mut Rng::new(5)).unwrap()
            );
            assert_ne!(
                s.sample(4, &mut Rng::new(5)).unwrap().ids,
                s.sample(4, &mut Rng::new(6)).unwrap().ids
            );
        }
    }

    #[test]
    fn bad_sizes_are_errors_that_say_why() {
        let e = spec(TaskKind::SelectiveCopying, 2, 10, 3)
            .sample(1, &mut Rng::new(0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocabulary of at least 3"), "{e}");
        let e = spec(TaskKind::Copying, 8, 10, 0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("M must be at least 1"), "{e}");
        let e = spec(TaskKind::InductionHeads, 8, 3, 0)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("length of at least 4"), "{e}");
        assert!(TaskKind::parse("copy").is_err());
        assert_eq!(
            TaskKind::parse("induction-heads").unwrap(),
            TaskKind::InductionHeads
        );
    }
}
