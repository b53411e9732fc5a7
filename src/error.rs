//! The library's error type. Every public entry point checks its inputs and
//! returns one of these rather than panicking.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// A tensor handed to a kernel does not have the size its shape implies.
    #[error("{op}: tensor `{tensor}` should have shape {expected} ({expected_len} elements) but has {found} elements")]
    Shape {
        op: &'static str,
        tensor: &'static str,
        expected: String,
        expected_len: usize,
        found: usize,
    },
    /// A dimension or option is not valid for the operation.
    #[error("{op}: {message}")]
    Invalid { op: &'static str, message: String },
    /// A file's contents are not what they should be.
    #[error("{file}: {message}")]
    Format { file: String, message: String },
    /// One tensor of a checkpoint is missing, or has the wrong shape or type.
    #[error("{file}: tensor `{tensor}`: {message}")]
    Tensor {
        file: String,
        tensor: String,
        message: String,
    },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Checks that `data` holds exactly the product of `dims` elements.
pub(crate) fn check_len<T>(
    op: &'static str,
    tensor: &'static str,
    data: &[T],
    dims: &[(&str, usize)],
) -> Result<()> {
    let expected_len: usize = dims.iter().map(|d| d.1).product();
    if data.len() != expected_len {
        let expected = format!(
            "({})",
            dims.iter()
                .map(|(name, n)| format!("{name}={n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        return Err(Error::Shape {
            op,
            tensor,
            expected,
            expected_len,
            found: data.len(),
        });
    }
    Ok(())
}

pub fn invalid(op: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        op,
        message: message.into(),
    }
}
