//! Settings files read as JSON objects. serde reads a struct from a JSON
//! array too (its fields in order), and with `#[serde(default)]` an empty
//! array `[]` becomes every default: a file that is not an object is
//! refused here first, naming the file.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// `text` (from `file`) as a `T`, which must be written as a JSON object;
/// `what` names the kind of file in errors ("a training config").
pub fn from_object_str<T: DeserializeOwned>(text: &str, file: &str, what: &str) -> Result<T> {
    let bad = |message: String| Error::Format {
        file: file.to_string(),
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    if !value.is_object() {
        let found = match value {
            serde_json::Value::Array(_) => "an array",
            serde_json::Value::String(_) => "a string",
            serde_json::Value::Number(_) => "a number",
            serde_json::Value::Bool(_) => "a boolean",
            _ => "null",
        };
        return Err(bad(format!(
            "not {what}: expected a JSON object, found {found}"
        )));
    }
    serde_json::from_value(value).map_err(|e| bad(format!("not {what}: {e}")))
}

/// [`from_object_str`] of the file at `path`.
pub fn read_object<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    from_object_str(&text, &path.display().to_string(), what)
}
