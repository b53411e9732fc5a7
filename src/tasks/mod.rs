//! The paper's synthetic tasks (docs/DESIGN.md §12): seeded data generators
//! ([`data`]), small models whose sequence layer (S6 or S4D) and block
//! (gated Mamba or a single SSM) are switches ([`model`]), the attention
//! baseline beside them behind one interface ([`network`]), training and
//! evaluation on the answer positions, with induction heads evaluated at
//! lengths up to 2^20 in constant memory ([`train`]), and the `selective
//! task` command ([`cli`]).

pub mod classifier;
pub mod data;
pub mod fit;
pub mod model;
pub mod network;
pub mod train;

pub use classifier::{
    cross_entropy, ClassifierConfig, ClassifierInput, ClassifierParams, Pooling,
    SequenceClassifier, SequenceInput,
};
pub use data::{Answer, InductionSequence, TaskBatch, TaskKind, TaskSpec};
pub use fit::{fit, FitPoint, FitSettings};
pub use model::{
    BlockArch, BlockParams, BlockState, S6Params, SsmLayer, SsmParams, TaskCache, TaskModel,
    TaskModelConfig, TaskParams, TaskScalar, TaskState, TaskStepper, TensorInfo,
};
pub use network::{AttentionReader, ChunkReader, SsmReader, TaskNetConfig, TaskNetwork};
pub use train::{
    answer_loss_and_grads, answer_score, evaluate, evaluate_induction_lengths, train_task,
    AnswerScore, CurvePoint, EvalMode, LengthEvalOptions, LengthNotRun, LengthResult, LengthSweep,
    TrainOutcome, TrainSettings,
};
