//! Writing f32 arrays as NumPy `.npy` files (format version 1.0), row block
//! by row block, so that large outputs need not be held in memory.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

pub struct NpyWriter {
    out: BufWriter<File>,
    path: PathBuf,
    expected: usize,
    written: usize,
}

impl NpyWriter {
    /// Starts a little-endian f32 array of `shape`, C order.
    pub fn create(path: impl AsRef<Path>, shape: &[usize]) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        let shape_text = if dims.len() == 1 {
            format!("({},)", dims[0])
        } else {
            format!("({})", dims.join(", "))
        };
        let mut header =
            format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
        // magic (6) + version (2) + length (2) + header + '\n', padded to 64 bytes.
        let unpadded = 10 + header.len() + 1;
        header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
        header.push('\n');
        let file = File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut out = BufWriter::new(file);
        let mut head = Vec::with_capacity(10 + header.len());
        head.extend_from_slice(b"\x93NUMPY\x01\x00");
        head.extend_from_slice(&(header.len() as u16).to_le_bytes());
        head.extend_from_slice(header.as_bytes());
        out.write_all(&head).map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            out,
            path,
            expected: shape.iter().product(),
            written: 0,
        })
    }

    pub fn write(&mut self, values: impl IntoIterator<Item = f32>) -> Result<()> {
        for v in values {
            self.out
                .write_all(&v.to_le_bytes())
                .map_err(|e| Error::io(&self.path, e))?;
            self.written += 1;
        }
        Ok(())
    }

    /// Flushes, checking that exactly the announced number of values came.
    pub fn finish(mut self) -> Result<()> {
        if self.written != self.expected {
            return Err(Error::Format {
                file: self.path.display().to_string(),
                message: format!(
                    "wrote {} values for a shape of {}",
                    self.written, self.expected
                ),
            });
        }
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }
}
