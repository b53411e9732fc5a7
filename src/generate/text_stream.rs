//! Printing generated text as it comes, one token at a time.
//!
//! [`TextStream`] turns token ids into text that is safe to print: a
//! character whose UTF-8 bytes are spread over several tokens (byte-level
//! BPE splits "é", CJK and emoji this way; byte tokenizers always do) is
//! held back until it is complete. It uses the prefix-offset / read-offset
//! technique of text-generation-inference: decode `ids[prefix..read]` (text
//! already printed, kept as context so that decoders which look at
//! neighbouring tokens agree) and `ids[prefix..]`; when the second is longer
//! and does not end in U+FFFD (an incomplete character), print the
//! difference and move both offsets on. Each token costs a decode of a few
//! tokens, however long the text already is.
//!
//! [`StopStrings`] then watches the printable text for stop strings: it
//! holds back any tail that might be the start of one, reports when one
//! appears, and gives out only the text before it.

use crate::error::{invalid, Result};
use crate::generate::tokenizer::Tokenizer;

/// Token ids to text: a [`Tokenizer`] or any function (see [`DecodeFn`]).
pub trait Decode {
    fn decode(&self, ids: &[u32]) -> Result<String>;
}

impl Decode for Tokenizer {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Tokenizer::decode(self, ids)
    }
}

impl<D: Decode + ?Sized> Decode for &D {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        (**self).decode(ids)
    }
}

/// A decode function as a [`Decode`].
pub struct DecodeFn<F>(pub F);

impl<F: Fn(&[u32]) -> Result<String>> Decode for DecodeFn<F> {
    fn decode(&self, ids: &[u32]) -> Result<String> {
        (self.0)(ids)
    }
}

const REPLACEMENT: char = '\u{FFFD}';

pub struct TextStream<D> {
    decoder: D,
    /// The ids from the prefix offset on; earlier ones are no longer needed.
    ids: Vec<u32>,
    /// `ids[..read]` are printed; `ids[read..]` wait for a complete character.
    read: usize,
}

impl<D: Decode> TextStream<D> {
    pub fn new(decoder: D) -> Self {
        Self {
            decoder,
            ids: Vec::new(),
            read: 0,
        }
    }

    /// Adds one generated token; returns the text it completes (often
    /// empty while a character is split across tokens).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        self.emit(false)
    }

    /// Returns whatever is still held back (an incomplete character comes
    /// out as U+FFFD); call once generation ends.
    pub fn finish(&mut self) -> Result<String> {
        if self.read == self.ids.len() {
            return Ok(String::new());
        }
        self.emit(true)
    }

    fn emit(&mut self, force: bool) -> Result<String> {
        let printed = self.decoder.decode(&self.ids[..self.read])?;
        let all = self.decoder.decode(&self.ids)?;
        if all.len() <= printed.len() || (!force && all.ends_with(REPLACEMENT)) {
            return Ok(String::new());
        }
        // The printed text is normally a prefix of the longer decode; should
        // a decoder rewrite it, print from the same byte offset (moved on to
        // a character boundary) rather than repeat text.
        let mut start = printed.len();
        while !all.is_char_boundary(start) {
            start += 1;
        }
        let new_text = all[start..].to_string();
        // The just-printed ids become the context of the next decode.
        self.ids.drain(..self.read);
        self.read = self.ids.len();
        Ok(new_text)
    }
}

/// What [`StopStrings::push`] lets through.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Text safe to print (never any part of a stop string).
    pub text: String,
    /// A stop string appeared: `text` is what came before it, and
    /// generation should end.
    pub stopped: bool,
}

pub struct StopStrings {
    stops: Vec<String>,
    /// Text that could still be the beginning of a stop string.
    held: String,
    stopped: bool,
}

impl StopStrings {
    /// Stop strings must not be empty.
    pub fn new<S: Into<String>>(stops: impl IntoIterator<Item = S>) -> Result<Self> {
        let stops: Vec<String> = stops.into_iter().map(Into::into).collect();
        if stops.iter().any(String::is_empty) {
            return Err(invalid("StopStrings", "a stop string is empty"));
        }
        Ok(Self {
            stops,
            held: String::new(),
            stopped: false,
        })
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds newly decoded text; returns what can be printed now. After a
    /// stop string has appeared everything is ignored.
    pub fn push(&mut self, text: &str) -> Released {
        if self.stopped {
            return Released {
                text: String::new(),
                stopped: true,
            };
        }
        self.held.push_str(text);
        // The earliest stop string wins (the longest among those starting
        // at the same place).
        let first = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s.len())))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        if let Some((at, _)) = first {
            self.held.truncate(at);
            self.stopped = true;
            return Released {
                text: std::mem::take(&mut self.held),
                stopped: true,
            };
        }
        // Hold the longest tail that is a proper beginning of some stop
        // string; since no stop string is in `held`, anything before that
        // tail can start none.
        let keep = self
            .held
            .char_indices()
            .map(|(at, _)| at)
            .find(|&at| {
                let tail = &self.held[at..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .map_or(0, |at| self.held.len() - at);
        let release_to = self.held.len() - keep;
        let text = self.held[..release_to].to_string();
        self.held.drain(..release_to);
        Released {
            text,
            stopped: false,
        }
    }

    /// At the end of generation: the held-back text, which turned out not to
    /// begin a stop string (empty after a stop).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}
