//! Numerical kernels. Each fast kernel has a plain reference next to it
//! (the `*_reference` modules) that the tests compare it with.

pub mod selective_scan;
pub mod selective_scan_reference;
mod shared;

pub use selective_scan::{
    selective_scan, selective_scan_backward, selective_scan_forward, Discretization, ScanGrads,
    ScanInputs, ScanOptions, ScanOutput, ScanParallelism, ScanShape,
};
pub use selective_scan_reference::{selective_scan_backward_reference, selective_scan_reference};
