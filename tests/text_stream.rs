//! Streaming detokenisation with the GPT-NeoX tokenizer and with bytes:
//! characters split across tokens come out whole and once, the work per
//! token does not grow with the text, and stop strings never leak.

use std::cell::Cell;

use selective::generate::text_stream::{DecodeFn, Released, StopStrings, TextStream};
use selective::generate::tokenizer::Tokenizer;
use selective::rng::Rng;

fn gpt_neox() -> Tokenizer {
    Tokenizer::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/gpt-neox-20b-tokenizer.json"
    ))
    .unwrap()
}

/// Streams `ids` through a [`TextStream`]; returns the chunks, the last one
/// from `finish`.
fn stream(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut s = TextStream::new(tokenizer);
    let mut chunks: Vec<String> = ids.iter().map(|&id| s.push(id).unwrap()).collect();
    chunks.push(s.finish().unwrap());
    chunks
}

const TEXTS: [&str; 6] = [
    "Hello, world! This is plain ASCII.",
    "café, résumé, naïve é",
    "日本語のテキストです。",
    "emoji 🦀🎉👩‍👩‍👧 done",
    "mixed: Grüße aus 東京 🚀 and back",
    "  leading spaces\nand\ttabs  ",
];

#[test]
fn gpt_neox_characters_split_across_tokens_come_out_whole() {
    let tokenizer = gpt_neox();
    // The cases do split characters: a single emoji is several tokens.
    assert!(tokenizer.encode("🦀").unwrap().len() > 1);
    let mut held_back_somewhere = false;
    for text in TEXTS {
        let ids = tokenizer.encode(text).unwrap();
        let chunks = stream(&tokenizer, &ids);
        assert_eq!(chunks.concat(), text, "chunks {chunks:?}");
        assert_eq!(chunks.concat(), tokenizer.decode(&ids).unwrap());
        for chunk in &chunks {
            assert!(!chunk.contains('\u{FFFD}'), "{text:?}: chunk {chunk:?}");
        }
        held_back_somewhere |= chunks[..ids.len()].iter().any(String::is_empty);
    }
    assert!(held_back_somewhere, "no token was held back");
}

#[test]
fn bytes_come_out_one_complete_character_at_a_time() {
    let bytes = Tokenizer::Bytes;
    let text = "aé日🦀";
    let ids = bytes.encode(text).unwrap();
    assert_eq!(ids.len(), 1 + 2 + 3 + 4);
    let chunks = stream(&bytes, &ids);
    let expected = [
        "a", "", "é", "", "", "日", "", "", "", "🦀", // then finish:
        "",
    ];
    assert_eq!(chunks, expected);
    for text in TEXTS {
        let chunks = stream(&bytes, &bytes.encode(text).unwrap());
        assert_eq!(chunks.concat(), text);
    }
}

#[test]
fn an_incomplete_character_at_the_end_is_flushed_lossily() {
    let bytes = Tokenizer::Bytes;
    // The first two of the three bytes of "日".
    let mut s = TextStream::new(&bytes);
    assert_eq!(s.push(0xE6).unwrap(), "");
    assert_eq!(s.push(0x97).unwrap(), "");
    assert_eq!(s.finish().unwrap(), "\u{FFFD}");
    assert_eq!(s.finish().unwrap(), "");
    // An invalid byte in the middle does not block what follows.
    let mut s = TextStream::new(&bytes);
    let out: String = [b'x', 0xFF, b'y']
        .iter()
        .map(|&b| s.push(b as u32).unwrap())
        .collect();
    assert_eq!(out + &s.finish().unwrap(), "x\u{FFFD}y");
}

#[test]
fn decode_work_per_token_does_not_grow_with_the_text() {
    let bytes = Tokenizer::Bytes;
    let longest = Cell::new(0usize);
    let decoder = DecodeFn(|ids: &[u32]| {
        longest.set(longest.get().max(ids.len()));
        bytes.decode(ids)
    });
    let text = "Ünïcödé text, 日本語, 🦀 and more. ".repeat(200);
    let mut s = TextStream::new(decoder);
    let mut out = String::new();
    for id in bytes.encode(&text).unwrap() {
        out += &s.push(id).unwrap();
    }
    out += &s.finish().unwrap();
    assert_eq!(out, text);
    // A 4-byte character plus the previous one as context.
    assert!(longest.get() <= 8, "decoded {} ids at once", longest.get());
}

fn released(text: &str, stopped: bool) -> Released {
    Released {
        text: text.to_string(),
        stopped,
    }
}

#[test]
fn stop_string_across_pushes() {
    let mut stops = StopStrings::new(["\n\n"]).unwrap();
    assert_eq!(stops.push("Hello\n"), released("Hello", false));
    assert_eq!(stops.push("\nWorld"), released("", true));
    assert!(stops.stopped());
    assert_eq!(stops.push("more"), released("", true));
    assert_eq!(stops.flush(), "");
}

#[test]
fn overlapping_prefix_ab_in_aab() {
    // After "aa" the first "a" can no longer start "ab" but the second can.
    let mut stops = StopStrings::new(["ab"]).unwrap();
    assert_eq!(stops.push("a"), released("", false));
    assert_eq!(stops.push("a"), released("a", false));
    assert_eq!(stops.push("b"), released("", true));
    let mut stops = StopStrings::new(["ab"]).unwrap();
    assert_eq!(stops.push("aab"), released("a", true));
    // "abab" in "ababab..." needs the held "aba" to shift by two.
    let mut stops = StopStrings::new(["abac"]).unwrap();
    let mut out = String::new();
    for piece in ["ab", "ab", "ab", "ac", "x"] {
        let r = stops.push(piece);
        out += &r.text;
        if r.stopped {
            break;
        }
    }
    assert!(stops.stopped());
    assert_eq!(out, "abab");
}

#[test]
fn no_stop_flush_returns_the_held_text() {
    let mut stops = StopStrings::new(["END", "STOP"]).unwrap();
    assert_eq!(stops.push("the ES"), released("the E", false));
    assert_eq!(stops.push("T"), released("", false));
    assert_eq!(stops.push("O"), released("", false));
    assert_eq!(stops.flush(), "STO");
    assert!(!stops.stopped());
}

#[test]
fn earliest_stop_string_wins_and_multibyte_stops_work() {
    let mut stops = StopStrings::new(["world", "lo"]).unwrap();
    assert_eq!(stops.push("hello world"), released("hel", true));
    let mut stops = StopStrings::new(["本語"]).unwrap();
    assert_eq!(stops.push("日本"), released("日", false));
    assert_eq!(stops.push("人"), released("本人", false));
    assert_eq!(stops.push("日本語"), released("日", true));
    assert!(StopStrings::new([""]).is_err());
    // No stop strings: everything passes straight through.
    let mut none = StopStrings::new(Vec::<String>::new()).unwrap();
    assert_eq!(none.push("abc"), released("abc", false));
}

#[test]
fn stop_string_spanning_gpt_neox_tokens() {
    let tokenizer = gpt_neox();
    let stop = "\nUser:";
    let text = "The answer is 42.\nUser: what next?";
    let ids = tokenizer.encode(text).unwrap();
    // The stop string is not inside any one token.
    for &id in &ids {
        assert!(!tokenizer.decode(&[id]).unwrap().contains(stop));
    }
    let mut s = TextStream::new(&tokenizer);
    let mut stops = StopStrings::new([stop]).unwrap();
    let mut printed = String::new();
    let mut stopped_after = None;
    for (n, &id) in ids.iter().enumerate() {
        let r = stops.push(&s.push(id).unwrap());
        printed += &r.text;
        // Nothing of the stop string is ever printed.
        assert!(
            !printed.ends_with('\n'),
            "printed the newline early: {printed:?}"
        );
        if r.stopped {
            stopped_after = Some(n + 1);
            break;
        }
    }
    assert_eq!(printed, "The answer is 42.");
    // It stops at the token that completes ":", not before.
    let upto = stopped_after.unwrap();
    assert!(tokenizer.decode(&ids[..upto]).unwrap().ends_with(stop));
    assert!(!tokenizer.decode(&ids[..upto - 1]).unwrap().contains(stop));
}

/// Random texts over a small alphabet, cut into random pieces, against the
/// obvious answer: everything before the first occurrence of any stop.
#[test]
fn random_pieces_match_the_whole_text_answer() {
    let stops_list = ["aab", "ab", "abab", "cé", "éé"];
    let alphabet = ['a', 'b', 'c', 'é'];
    let mut rng = Rng::new(7);
    for case in 0..2000 {
        let len = rng.below(20);
        let text: String = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        let stops_used: Vec<&str> = stops_list
            .iter()
            .filter(|_| rng.below(2) == 0)
            .copied()
            .collect();
        let expected = stops_used
            .iter()
            .filter_map(|s| text.find(s))
            .min()
            .map_or(text.as_str(), |at| &text[..at]);
        let chars: Vec<char> = text.chars().collect();
        let mut stops = StopStrings::new(stops_used.iter().copied()).unwrap();
        let mut printed = String::new();
        let mut i = 0;
        let mut stopped = false;
        while i < chars.len() {
            let n = 1 + rng.below(3);
            let piece: String = chars[i..(i + n).min(chars.len())].iter().collect();
            i += n;
            let r = stops.push(&piece);
            printed += &r.text;
            assert!(
                expected.starts_with(printed.as_str()),
                "case {case}: {text:?} with {stops_used:?}: printed {printed:?}"
            );
            if r.stopped {
                stopped = true;
                break;
            }
        }
        if !stopped {
            printed += &stops.flush();
        }
        assert_eq!(
            printed, expected,
            "case {case}: {text:?} with {stops_used:?}"
        );
        assert_eq!(stopped, expected.len() < text.len());
    }
}
