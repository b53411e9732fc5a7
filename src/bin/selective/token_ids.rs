//! Token ids on the command line, one form for every command: a list
//! `5,6,7` after `--ids` / `--prompt-ids`, or a file after `--ids-file` /
//! `--prompt-ids-file` holding the same list, a JSON array `[5, 6, 7]`, or
//! ids separated by whitespace.

use std::path::Path;

/// Parses `text` (from `source`, for messages): ids separated by commas
/// and/or whitespace, optionally inside `[` `]`.
pub fn parse(text: &str, source: &str) -> Result<Vec<u32>, String> {
    let body = text.trim();
    let body = match (body.strip_prefix('['), body.strip_suffix(']')) {
        (Some(_), Some(_)) => &body[1..body.len() - 1],
        (None, None) => body,
        _ => return Err(format!("{source}: an unclosed [ ... ] list of token ids")),
    };
    let ids = body
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|item| !item.is_empty())
        .enumerate()
        .map(|(i, item)| {
            item.parse::<u32>().map_err(|_| {
                format!("{source}: item {i} ({item}) is not a token id (a whole number below 2^32)")
            })
        })
        .collect::<Result<Vec<u32>, String>>()?;
    if ids.is_empty() {
        return Err(format!("{source}: no token ids"));
    }
    Ok(ids)
}

/// The ids in the file at `path`, in any form [`parse`] reads.
pub fn read(path: &Path) -> Result<Vec<u32>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text, &path.display().to_string())
}

/// The ids of a list flag or of a file flag (at most one is given; clap
/// keeps them apart).
pub fn from_flags(
    list: Option<&str>,
    list_flag: &str,
    file: Option<&Path>,
) -> Result<Option<Vec<u32>>, String> {
    match (list, file) {
        (Some(list), _) => parse(list, list_flag).map(Some),
        (None, Some(path)) => read(path).map(Some),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn every_form_gives_the_same_ids() {
        for text in ["5,6,7", "[5, 6, 7]", "5 6\n7\n", " [5,6 ,7] "] {
            assert_eq!(parse(text, "t").unwrap(), [5, 6, 7], "{text:?}");
        }
        for (text, names) in [
            ("5,x,7", "item 1"),
            ("[5,6", "unclosed"),
            ("", "no token ids"),
            ("-1", "item 0"),
            ("4294967296", "item 0"),
        ] {
            let e = parse(text, "t").unwrap_err();
            assert!(e.contains(names), "{text:?}: {e}");
        }
    }
}
