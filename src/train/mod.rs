//! Training a language model (Mamba, or the Transformer++ baseline) from a
//! text file (docs/DESIGN.md §11):
//! AdamW with the official parameter groups, warm-up and cosine decay,
//! global-norm clipping, gradient accumulation, validation, checkpoints that
//! resume bit for bit, on one process or data-parallel over several
//! (`distributed`: MPI ranks or threads, bit-identical to one process).

pub mod data;
pub mod distributed;
pub mod model;
pub mod optimizer;
pub(crate) mod progress;
pub mod schedule;
pub mod trainer;

pub use data::{random_windows, DataFingerprint, TextData};
#[cfg(feature = "mpi")]
pub use distributed::MpiGroup;
pub use distributed::{tree_all_reduce_sum, ProcessGroup, SingleProcess, ThreadGroup};
pub use model::TrainableModel;
pub use optimizer::{
    add_into, clip_global_norm, clip_tensors_global_norm, decays, global_norm, AdamW, AdamWConfig,
    ParamTree,
};
pub use progress::ProgressMode;
pub use schedule::LrSchedule;
pub use trainer::{
    training_step, ResumeOptions, RunOptions, StepOutcome, TrainConfig, TrainReport, Trainer,
    TrainerState,
};
