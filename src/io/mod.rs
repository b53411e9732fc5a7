//! Files: safetensors (single and sharded), PyTorch `pytorch_model.bin`
//! archives, model directories, saved decoding states, `.npy` arrays, and
//! the atomic write every saved file goes through. The formats are
//! described in docs/DESIGN.md §7 and §9.

pub mod atomic;
pub mod config_dir;
pub mod json;
pub mod model_files;
pub mod npy;
pub mod safetensors;
pub mod state_file;
pub mod torch;
pub mod wav;

pub use atomic::write_atomically;
pub use config_dir::{load_config_dir, save_config_dir};
pub use json::{from_object_str, read_object};
pub use npy::NpyWriter;
pub use safetensors::{
    encode, safetensors_bytes, write_safetensors, DType, SafetensorsFile, StoredTensor,
    TensorSource,
};
pub use state_file::{load_sequence, save_sequence, sequence_from_bytes};
pub use torch::TorchCheckpoint;
pub use wav::Wav;
