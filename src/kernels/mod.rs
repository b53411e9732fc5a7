//! Numerical kernels. Each fast kernel has a plain reference next to it
//! (the `*_reference` modules) that the tests compare it with.

pub mod activation;
pub mod attention;
pub mod conv1d;
pub mod embedding;
pub mod huge_pages;
pub mod linear;
pub mod matmul;
pub mod norm;
pub mod rope;
pub mod s4d;
pub mod selective_scan;
pub mod selective_scan_reference;
pub mod selective_scan_step;
pub(crate) mod shared;
pub mod ssd;
pub mod ssd_reference;

/// Gradient sums over rows (norm weights, conv kernels) are split into at
/// most this many fixed ranges, whose partial sums are added in order: the
/// bits of a gradient do not depend on the thread count or scheduling, so a
/// resumed training run repeats an uninterrupted one exactly.
pub const REDUCTION_PARTS: usize = 64;

pub use activation::{
    silu_backward, silu_forward, softplus_backward, softplus_forward, swiglu_backward,
    swiglu_forward,
};
pub use attention::{
    causal_attention_backward, causal_attention_backward_reference, causal_attention_forward,
    causal_attention_reference, AttentionGrads, AttentionShape,
};
pub use conv1d::{
    causal_conv1d_backward, causal_conv1d_forward, causal_conv1d_forward_continuing,
    causal_conv1d_reference, causal_conv1d_state, causal_conv1d_step, ConvGrads, ConvShape,
};
pub use embedding::{embedding_backward, embedding_forward};
pub use linear::{linear_reference, WeightFormat, Weights, Q8_BLOCK};
pub use matmul::{matmul_xtw, matmul_xw, matmul_xwt, MatmulScalar};
pub use norm::{
    layer_norm_backward, layer_norm_forward, rms_norm_backward, rms_norm_forward, NormGrads,
};
pub use rope::Rotary;
pub use s4d::{
    s4d_backward_conv, s4d_backward_recurrent, s4d_forward_conv, s4d_forward_recurrent, s4d_kernel,
    s4d_step, FftFloat, S4dDiscrete, S4dGrads, S4dInit, S4dParams, S4dRecurrentOutput,
};
pub use selective_scan::{
    selective_scan, selective_scan_backward, selective_scan_forward, Discretization, ScanGrads,
    ScanInputs, ScanOptions, ScanOutput, ScanParallelism, ScanShape,
};
pub use selective_scan_reference::{selective_scan_backward_reference, selective_scan_reference};
pub use selective_scan_step::{selective_scan_step, ScanStepInputs};
pub use ssd::{
    ssd, ssd_backward, ssd_forward, ssd_step, ssd_step_batch, SsdGrads, SsdInputs, SsdOptions,
    SsdOutput, SsdShape, SsdStepInputs, SsdStepShape,
};
pub use ssd_reference::{ssd_backward_reference, ssd_reference};
