//! Reading and writing named tensors: safetensors files (memory-mapped)
//! and, through [`super::torch`], PyTorch `pytorch_model.bin`
//! archives. The model asks a [`TensorSource`] for tensors by name and gets
//! them converted to its scalar type; every failure names the file and the
//! tensor.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;

use std::path::Path;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, TensorView as StView};
use safetensors::SafeTensors;

use super::atomic::write_atomically;
use crate::error::{Error, Result};
use crate::float::Float;

/// Storage types a checkpoint may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    BF16,
    F64,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 => 8,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;
    /// f32, f16, bf16 or f64 (any case; float32, float16, bfloat16, float64 too).
    fn from_str(s: &str) -> crate::error::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f64" | "float64" => Ok(DType::F64),
            _ => Err(crate::error::invalid(
                "DType",
                format!("unknown dtype {s:?} (expected f32, f16, bf16 or f64)"),
            )),
        }
    }
}

/// One tensor as stored: little-endian bytes, row-major.
#[derive(Clone, Debug)]
pub struct StoredTensor<'a> {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Cow<'a, [u8]>,
}

impl StoredTensor<'_> {
    /// Converts to `T`, checking that the byte count fits the shape.
    pub fn to_vec<T: Float>(&self, file: &str, name: &str) -> Result<Vec<T>> {
        let numel: usize = self.shape.iter().product();
        let want = numel * self.dtype.size();
        if self.bytes.len() != want {
            return Err(Error::Tensor {
                file: file.into(),
                tensor: name.into(),
                message: format!(
                    "holds {} bytes but shape {:?} of {} needs {want} (truncated or corrupt file)",
                    self.bytes.len(),
                    self.shape,
                    self.dtype.name()
                ),
            });
        }
        let b = &self.bytes;
        let out = match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| T::from_f64(f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64))
                .collect(),
            DType::F64 => b
                .chunks_exact(8)
                .map(|c| T::from_f64(f64::from_le_bytes(c.try_into().unwrap())))
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| T::from_f64(f16::from_le_bytes([c[0], c[1]]).to_f64()))
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| T::from_f64(bf16::from_le_bytes([c[0], c[1]]).to_f64()))
                .collect(),
        };
        Ok(out)
    }
}

/// Anything that hands out named tensors.
pub trait TensorSource {
    /// The file, for error messages.
    fn file(&self) -> &str;
    fn names(&self) -> Vec<String>;
    fn tensor(&self, name: &str) -> Result<Option<StoredTensor<'_>>>;
    /// Called once a tensor has been copied out, so that a memory-mapped
    /// source can drop its pages and the weights stay in memory once.
    fn release(&self, _name: &str) {}

    /// The tensor `name` converted to `T`; an error naming the file and
    /// the tensor if it is missing or its shape is not `shape`.
    fn tensor_of_shape<T: Float>(&self, name: &str, shape: &[usize]) -> Result<Vec<T>>
    where
        Self: Sized,
    {
        let file = self.file().to_string();
        let t = self.tensor(name)?.ok_or_else(|| Error::Tensor {
            file: file.clone(),
            tensor: name.to_string(),
            message: format!("missing (expected shape {shape:?})"),
        })?;
        if t.shape != shape {
            return Err(Error::Tensor {
                file,
                tensor: name.to_string(),
                message: format!("expected shape {shape:?}, found {:?}", t.shape),
            });
        }
        t.to_vec::<T>(&file, name)
    }
}

/// The bytes of a safetensors file: a read-only mapping of a file, or
/// bytes built into the program.
enum Bytes {
    Mapped(Mmap),
    Static(&'static [u8]),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Static(b) => b,
            Bytes::Owned(b) => b,
        }
    }
}

/// A `.safetensors` file, memory-mapped (or built into the program).
pub struct SafetensorsFile {
    path: String,
    mmap: Bytes,
    /// Byte range of each tensor's data within the mapping, with its
    /// dtype and shape, parsed once.
    index: BTreeMap<String, (DType, Vec<usize>, std::ops::Range<usize>)>,
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path_ref = path.as_ref();
        let shown = path_ref.display().to_string();
        let file = File::open(path_ref).map_err(|e| Error::io(path_ref, e))?;
        // SAFETY: the mapping is read-only; a file changed underneath us by
        // another process could give wrong numbers, as with any reader.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path_ref, e))?;
        Self::parse(shown, Bytes::Mapped(mmap))
    }

    /// A safetensors file whose bytes are built into the program
    /// (`include_bytes!`); `name` stands for its path in error messages.
    pub fn from_static(name: &str, bytes: &'static [u8]) -> Result<Self> {
        Self::parse(name.to_string(), Bytes::Static(bytes))
    }

    /// A safetensors file's bytes held in memory; `name` stands for its
    /// path in error messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self> {
        Self::parse(name.to_string(), Bytes::Owned(bytes))
    }

    fn parse(shown: String, mmap: Bytes) -> Result<Self> {
        let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::Format {
            file: shown.clone(),
            message: format!("not a valid safetensors file: {e}"),
        })?;
        let base = mmap.as_ptr() as usize;
        let mut index = BTreeMap::new();
        for (name, view) in st.tensors() {
            let dtype = match view.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                Dtype::F64 => DType::F64,
                other => {
                    return Err(Error::Tensor {
                        file: shown,
                        tensor: name,
                        message: format!("dtype {other:?} is not a float type this library reads (F32, F16, BF16, F64)"),
                    })
                }
            };
            let data = view.data();
            let start = data.as_ptr() as usize - base;
            index.insert(
                name,
                (dtype, view.shape().to_vec(), start..start + data.len()),
            );
        }
        Ok(Self {
            path: shown,
            mmap,
            index,
        })
    }
}

impl TensorSource for SafetensorsFile {
    fn file(&self) -> &str {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }
    fn release(&self, name: &str) {
        let Bytes::Mapped(mmap) = &self.mmap else {
            return;
        };
        if let Some((_, _, range)) = self.index.get(name) {
            // Page-aligned interior of the tensor's bytes.
            let page = 4096;
            let start = range.start.div_ceil(page) * page;
            let end = range.end / page * page;
            if end > start {
                // SAFETY: a read-only private file mapping: dropped pages are
                // read again from the file if touched; no references into
                // this range are alive (the caller copied the tensor out).
                let _ = unsafe {
                    mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
    }
    fn tensor(&self, name: &str) -> Result<Option<StoredTensor<'_>>> {
        Ok(self
            .index
            .get(name)
            .map(|(dtype, shape, range)| StoredTensor {
                dtype: *dtype,
                shape: shape.clone(),
                bytes: Cow::Borrowed(&self.mmap[range.clone()]),
            }))
    }
}

/// Writes tensors as a safetensors file atomically: to a temporary file in
/// the same directory, flushed, then renamed over `path`.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, DType, Vec<usize>, Vec<u8>)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<()> {
    let bytes = safetensors_bytes(&path.display().to_string(), tensors, metadata)?;
    write_atomically(path, &bytes)
}

/// The bytes of a safetensors file of `tensors` (name, dtype, shape,
/// little-endian data); `file` names it in errors.
pub fn safetensors_bytes(
    file: &str,
    tensors: &[(String, DType, Vec<usize>, Vec<u8>)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let views: Vec<(String, StView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let dt = match dtype {
                DType::F32 => Dtype::F32,
                DType::F16 => Dtype::F16,
                DType::BF16 => Dtype::BF16,
                DType::F64 => Dtype::F64,
            };
            StView::new(dt, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Tensor {
                    file: file.to_string(),
                    tensor: name.clone(),
                    message: format!("cannot be written: {e}"),
                })
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, metadata).map_err(|e| Error::Format {
        file: file.to_string(),
        message: format!("serialising: {e}"),
    })
}

/// Little-endian bytes of `data` converted to `dtype`.
pub fn encode<T: Float>(data: &[T], dtype: DType) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * dtype.size());
    for &v in data {
        let x = v.to_f64();
        match dtype {
            DType::F32 => out.extend_from_slice(&(x as f32).to_le_bytes()),
            DType::F64 => out.extend_from_slice(&x.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f64(x).to_le_bytes()),
            DType::BF16 => out.extend_from_slice(&bf16::from_f64(x).to_le_bytes()),
        }
    }
    out
}
