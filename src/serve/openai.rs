//! OpenAI's request and response bodies for `/v1/completions` and
//! `/v1/chat/completions` (docs/DESIGN.md §19.1): reading a request into
//! [`JobSpec`]s, with an error that names the field at fault, and writing
//! the answers, whole or as the chunks of a stream.
//!
//! Fields are read one by one from the JSON object, so that a wrong type
//! or value is reported as `temperature: ...`, not as a position in the
//! body. Fields this server does not implement are refused when they ask
//! for something (`echo: true`, a `logit_bias`, a nonzero presence
//! penalty) and ignored when they ask for the default.

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use super::chat::Message;
use super::engine::{Finish, JobSpec, TokenLogprobs};
use crate::generate::SamplingConfig;

/// An answer other than 200: the HTTP status and OpenAI's error body.
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// OpenAI's `type`: invalid_request_error, server_error, ...
    pub kind: &'static str,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl std::fmt::Display) -> Self {
        Self {
            status: 400,
            message: format!("{param}: {message}"),
            param: Some(param.to_string()),
            kind: "invalid_request_error",
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            param: None,
            kind: "invalid_request_error",
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            param: None,
            kind: "server_error",
        }
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: 503,
            message: message.into(),
            param: None,
            kind: "unavailable_error",
        }
    }
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": Value::Null,
        }})
    }
}

/// The server's limits on what one request may ask.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Tokens in one prompt at most.
    pub max_prompt_tokens: usize,
    /// `max_tokens` at most (also the default of a chat request).
    pub max_tokens: usize,
    /// `n` (choices per request) at most.
    pub max_choices: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_tokens: 16384,
            max_tokens: 4096,
            max_choices: 16,
        }
    }
}

/// A request body as a JSON object whose fields are read by name.
#[derive(Debug)]
pub struct Body(Map<String, Value>);

impl Body {
    pub fn parse(bytes: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            ApiError::bad_request(format!("the request body is not valid JSON: {e}"))
        })?;
        match value {
            Value::Object(map) => Ok(Body(map)),
            other => Err(ApiError::bad_request(format!(
                "the request body must be a JSON object, got {}",
                kind_of(&other)
            ))),
        }
    }

    /// The field `name` as a T; None when absent or null.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, ApiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| ApiError::invalid(name, e)),
        }
    }

    fn raw(&self, name: &str) -> Option<&Value> {
        self.0.get(name).filter(|v| !v.is_null())
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// What both endpoints take besides the prompt.
#[derive(Clone, Debug)]
pub struct Params {
    pub model: Option<String>,
    pub max_tokens: usize,
    pub n: usize,
    pub stream: bool,
    /// `stream_options.include_usage`: the usage comes in a chunk of its
    /// own with no choices (OpenAI); otherwise it rides on the last
    /// choice's finishing chunk (llama-server), so every answer carries it.
    pub include_usage: bool,
    pub stop: Vec<String>,
    pub sampling: SamplingConfig,
    pub ignore_eos: bool,
    /// Top alternatives per token, when log-probabilities are asked for.
    pub logprobs: Option<usize>,
}

/// Most alternatives per token that `logprobs` / `top_logprobs` may ask.
const MAX_LOGPROBS: usize = 20;

impl Params {
    /// Reads the common fields; `default_max_tokens` applies when the
    /// request gives none; `seed_now` is the seed when it gives none.
    pub fn read(
        body: &Body,
        chat: bool,
        limits: &Limits,
        default_max_tokens: usize,
        seed_now: u64,
    ) -> Result<Self, ApiError> {
        refuse_unsupported(body, chat)?;
        let max_tokens = match chat {
            true => body
                .get::<usize>("max_completion_tokens")?
                .or(body.get::<usize>("max_tokens")?),
            false => body.get::<usize>("max_tokens")?,
        }
        .unwrap_or(default_max_tokens);
        if max_tokens > limits.max_tokens {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "{max_tokens} is more than this server's limit of {}",
                    limits.max_tokens
                ),
            ));
        }
        let n = body.get::<usize>("n")?.unwrap_or(1);
        if n == 0 || n > limits.max_choices {
            return Err(ApiError::invalid(
                "n",
                format!("must be in 1..={}, got {n}", limits.max_choices),
            ));
        }
        let stop = match body.raw("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(_) => body.get::<Vec<String>>("stop")?.unwrap_or_default(),
        };
        if stop.len() > 16 {
            return Err(ApiError::invalid("stop", "at most 16 stop strings"));
        }
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "a stop string is empty"));
        }
        let defaults = SamplingConfig::default();
        let sampling = SamplingConfig {
            temperature: body.get("temperature")?.unwrap_or(defaults.temperature),
            top_k: body.get("top_k")?.unwrap_or(defaults.top_k),
            top_p: body.get("top_p")?.unwrap_or(defaults.top_p),
            min_p: body.get("min_p")?.unwrap_or(defaults.min_p),
            repetition_penalty: body
                .get("repetition_penalty")?
                .unwrap_or(defaults.repetition_penalty),
            repetition_window: body
                .get("repetition_window")?
                .unwrap_or(defaults.repetition_window),
            seed: body.get("seed")?.unwrap_or(seed_now),
        };
        // SamplingConfig's messages begin with the field's name
        if let Err(e) = sampling.validate() {
            let message = e.to_string();
            let message = message
                .strip_prefix("SamplingConfig: ")
                .unwrap_or(&message)
                .to_string();
            let param = [
                "temperature",
                "top_k",
                "top_p",
                "min_p",
                "repetition_penalty",
                "repetition_window",
            ]
            .into_iter()
            .find(|p| message.contains(p))
            .unwrap_or("sampling");
            return Err(ApiError::invalid(param, message));
        }
        let logprobs = if chat {
            let top = body.get::<usize>("top_logprobs")?;
            match body.get::<bool>("logprobs")?.unwrap_or(false) {
                true => Some(top.unwrap_or(0)),
                false if top.is_some() => {
                    return Err(ApiError::invalid(
                        "top_logprobs",
                        "needs \"logprobs\": true",
                    ))
                }
                false => None,
            }
        } else {
            body.get::<usize>("logprobs")?
        };
        if let Some(top) = logprobs {
            if top > MAX_LOGPROBS {
                let field = if chat { "top_logprobs" } else { "logprobs" };
                return Err(ApiError::invalid(
                    field,
                    format!("at most {MAX_LOGPROBS}, got {top}"),
                ));
            }
        }
        Ok(Self {
            model: body.get("model")?,
            max_tokens,
            n,
            stream: body.get("stream")?.unwrap_or(false),
            include_usage: match body.raw("stream_options") {
                None => false,
                Some(options) => options
                    .get("include_usage")
                    .map(|v| {
                        v.as_bool().ok_or_else(|| {
                            ApiError::invalid("stream_options.include_usage", "must be a boolean")
                        })
                    })
                    .transpose()?
                    .unwrap_or(false),
            },
            stop,
            sampling,
            ignore_eos: body.get("ignore_eos")?.unwrap_or(false),
            logprobs,
        })
    }

    /// One job per choice: choice i samples with seed + i, as `selective
    /// generate` seeds its i-th sequence.
    pub fn jobs(&self, prompt: &[u32], first_index: usize) -> Vec<JobSpec> {
        (0..self.n)
            .map(|i| JobSpec {
                index: first_index + i,
                prompt: prompt.to_vec(),
                max_tokens: self.max_tokens,
                sampling: SamplingConfig {
                    seed: self.sampling.seed.wrapping_add(i as u64),
                    ..self.sampling.clone()
                },
                stop: self.stop.clone(),
                ignore_eos: self.ignore_eos,
                logprobs: self.logprobs,
            })
            .collect()
    }
}

/// Fields that ask for what this server does not do.
fn refuse_unsupported(body: &Body, chat: bool) -> Result<(), ApiError> {
    let not_supported = |field: &str, what: &str| {
        ApiError::invalid(field, format!("{what} is not supported by this server"))
    };
    for penalty in ["presence_penalty", "frequency_penalty"] {
        if body.get::<f32>(penalty)?.is_some_and(|p| p != 0.0) {
            return Err(not_supported(
                penalty,
                "a nonzero value (use repetition_penalty)",
            ));
        }
    }
    if body
        .raw("logit_bias")
        .is_some_and(|v| v.as_object().is_none_or(|m| !m.is_empty()))
    {
        return Err(not_supported("logit_bias", "a logit bias"));
    }
    if chat {
        for field in ["tools", "functions", "tool_choice", "function_call"] {
            if body.raw(field).is_some() {
                return Err(not_supported(field, "tool calling"));
            }
        }
        if let Some(format) = body.raw("response_format") {
            if format.get("type").and_then(Value::as_str) != Some("text") {
                return Err(not_supported(
                    "response_format",
                    "a structured output format",
                ));
            }
        }
    } else {
        if body.get::<bool>("echo")?.unwrap_or(false) {
            return Err(not_supported("echo", "echoing the prompt"));
        }
        if body.raw("suffix").is_some() {
            return Err(not_supported("suffix", "a suffix (insertion)"));
        }
        if body.get::<usize>("best_of")?.is_some_and(|b| b > 1) {
            return Err(not_supported("best_of", "best_of above 1"));
        }
    }
    Ok(())
}

/// A completion request's prompts: text to encode, or token ids.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt`: a string, an array of strings, an array of token ids, or an
/// array of arrays of token ids (several prompts: their choices follow one
/// another).
pub fn read_prompts(body: &Body) -> Result<Vec<Prompt>, ApiError> {
    let shape = "must be a string, an array of strings, an array of token ids or an array of arrays of token ids";
    let prompts = match body.raw("prompt") {
        None => return Err(ApiError::invalid("prompt", "is required")),
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(items)) if items.is_empty() => {
            return Err(ApiError::invalid("prompt", "is an empty array"))
        }
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => body
                .get::<Vec<String>>("prompt")?
                .unwrap_or_default()
                .into_iter()
                .map(Prompt::Text)
                .collect(),
            Value::Number(_) => vec![Prompt::Ids(
                body.get::<Vec<u32>>("prompt")?.unwrap_or_default(),
            )],
            Value::Array(_) => body
                .get::<Vec<Vec<u32>>>("prompt")?
                .unwrap_or_default()
                .into_iter()
                .map(Prompt::Ids)
                .collect(),
            _ => return Err(ApiError::invalid("prompt", shape)),
        },
        Some(_) => return Err(ApiError::invalid("prompt", shape)),
    };
    Ok(prompts)
}

/// `messages`: [{"role", "content"}], content a string or an array of
/// text parts [{"type": "text", "text"}].
pub fn read_messages(body: &Body) -> Result<Vec<Message>, ApiError> {
    let Some(Value::Array(items)) = body.raw("messages") else {
        return Err(ApiError::invalid(
            "messages",
            "is required: an array of {role, content}",
        ));
    };
    if items.is_empty() {
        return Err(ApiError::invalid("messages", "is empty"));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let field = |name: &str| format!("messages[{i}].{name}");
            let role = item
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::invalid(&field("role"), "is required: a string"))?;
            let content = match item.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, part) in parts.iter().enumerate() {
                        match (part.get("type").and_then(Value::as_str), part.get("text")) {
                            (Some("text"), Some(Value::String(t))) => text.push_str(t),
                            _ => return Err(ApiError::invalid(
                                &field(&format!("content[{j}]")),
                                "only text parts {\"type\": \"text\", \"text\": ...} are supported",
                            )),
                        }
                    }
                    text
                }
                None | Some(Value::Null) => String::new(),
                Some(other) => {
                    return Err(ApiError::invalid(
                        &field("content"),
                        format!(
                            "must be a string or an array of text parts, got {}",
                            kind_of(other)
                        ),
                    ))
                }
            };
            Ok(Message {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

/// Token counts of a whole request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

impl Usage {
    pub fn json(&self) -> Value {
        json!({
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        })
    }
}

/// One generated token as the logprobs fields show it.
#[derive(Clone, Debug)]
pub struct TokenInfo {
    pub text: String,
    pub logprobs: TokenLogprobs,
    /// The texts of the alternatives, in `logprobs.top`'s order.
    pub top_texts: Vec<String>,
}

/// The two response shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    Chat,
}

/// The fields every response and chunk begins with.
#[derive(Clone, Debug)]
pub struct Header {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl Header {
    fn object(&self, stream: bool) -> &'static str {
        match (self.endpoint, stream) {
            (Endpoint::Completions, _) => "text_completion",
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
        }
    }

    fn wrap(&self, stream: bool, choices: Vec<Value>, usage: Option<Value>) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(stream),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if let Some(usage) = usage {
            v["usage"] = usage;
        }
        v
    }

    /// A stream chunk carrying `text` (and its tokens' log-probabilities)
    /// for choice `index`, or its end when `finish` is given.
    pub fn chunk(
        &self,
        index: usize,
        text: &str,
        tokens: &[TokenInfo],
        finish: Option<Finish>,
    ) -> Value {
        let logprobs = (!tokens.is_empty()).then(|| self.logprobs(tokens, 0));
        let finish = finish.map(Finish::as_str);
        let choice = match self.endpoint {
            Endpoint::Completions => json!({
                "index": index, "text": text, "logprobs": logprobs, "finish_reason": finish,
            }),
            Endpoint::Chat => {
                let delta = if finish.is_some() && text.is_empty() {
                    json!({})
                } else {
                    json!({"content": text})
                };
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        self.wrap(true, vec![choice], None)
    }

    /// The first chunk of a chat stream: the assistant's role.
    pub fn role_chunk(&self, index: usize) -> Value {
        let choice = json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
        self.wrap(true, vec![choice], None)
    }

    /// The last chunk of a stream: no choices, the usage.
    pub fn usage_chunk(&self, usage: Usage) -> Value {
        self.wrap(true, Vec::new(), Some(usage.json()))
    }

    /// `chunk` with the usage added (the last finishing chunk when the
    /// client did not ask for a usage chunk of its own).
    pub fn with_usage(mut chunk: Value, usage: Usage) -> Value {
        chunk["usage"] = usage.json();
        chunk
    }

    /// The whole answer.
    pub fn response(&self, choices: &[ChoiceResult], usage: Usage) -> Value {
        let choices = choices
            .iter()
            .enumerate()
            .map(|(index, c)| {
                let logprobs = c.logprobs.then(|| self.logprobs(&c.tokens, 0));
                let finish = c.finish.map(Finish::as_str);
                match self.endpoint {
                    Endpoint::Completions => json!({
                        "index": index, "text": c.text, "logprobs": logprobs, "finish_reason": finish,
                    }),
                    Endpoint::Chat => json!({
                        "index": index,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": logprobs,
                        "finish_reason": finish,
                    }),
                }
            })
            .collect();
        self.wrap(false, choices, Some(usage.json()))
    }

    /// The logprobs object: the legacy completions shape (parallel arrays)
    /// or the chat shape (one entry per token).
    fn logprobs(&self, tokens: &[TokenInfo], text_offset: usize) -> Value {
        match self.endpoint {
            Endpoint::Completions => {
                let mut offset = text_offset;
                let offsets: Vec<usize> = tokens
                    .iter()
                    .map(|t| {
                        let at = offset;
                        offset += t.text.len();
                        at
                    })
                    .collect();
                json!({
                    "tokens": tokens.iter().map(|t| &t.text).collect::<Vec<_>>(),
                    "token_logprobs": tokens.iter().map(|t| t.logprobs.logprob).collect::<Vec<_>>(),
                    "top_logprobs": tokens.iter().map(|t| {
                        t.top_texts.iter().zip(&t.logprobs.top)
                            .map(|(text, &(_, lp))| (text.clone(), json!(lp)))
                            .collect::<Map<String, Value>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
            Endpoint::Chat => json!({
                "content": tokens.iter().map(|t| json!({
                    "token": t.text,
                    "logprob": t.logprobs.logprob,
                    "bytes": t.text.as_bytes(),
                    "top_logprobs": t.top_texts.iter().zip(&t.logprobs.top).map(|(text, &(_, lp))| json!({
                        "token": text, "logprob": lp, "bytes": text.as_bytes(),
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            }),
        }
    }
}

/// One choice of a finished request.
#[derive(Clone, Debug, Default)]
pub struct ChoiceResult {
    pub text: String,
    pub finish: Option<Finish>,
    pub tokens: Vec<TokenInfo>,
    /// Whether log-probabilities were asked for.
    pub logprobs: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(body: &str) -> Result<Params, ApiError> {
        Params::read(
            &Body::parse(body.as_bytes())?,
            false,
            &Limits::default(),
            16,
            7,
        )
    }

    #[test]
    fn errors_name_the_field_at_fault() {
        let cases = [
            (r#"{"prompt": "x", "temperature": "hot"}"#, "temperature"),
            (r#"{"prompt": "x", "temperature": -1}"#, "temperature"),
            (r#"{"prompt": "x", "top_p": 0}"#, "top_p"),
            (r#"{"prompt": "x", "max_tokens": 999999}"#, "max_tokens"),
            (r#"{"prompt": "x", "max_tokens": -3}"#, "max_tokens"),
            (r#"{"prompt": "x", "n": 0}"#, "n"),
            (r#"{"prompt": "x", "stop": [""]}"#, "stop"),
            (r#"{"prompt": "x", "stop": 5}"#, "stop"),
            (r#"{"prompt": "x", "logprobs": 50}"#, "logprobs"),
            (r#"{"prompt": "x", "echo": true}"#, "echo"),
            (
                r#"{"prompt": "x", "presence_penalty": 0.5}"#,
                "presence_penalty",
            ),
            (r#"{"prompt": "x", "logit_bias": {"5": 10}}"#, "logit_bias"),
            (r#"{"prompt": "x", "seed": "abc"}"#, "seed"),
        ];
        for (body, field) in cases {
            let e = params(body).unwrap_err();
            assert_eq!(
                (e.status, e.param.as_deref()),
                (400, Some(field)),
                "{body}: {e:?}"
            );
            assert!(e.message.starts_with(field), "{body}: {}", e.message);
        }
        assert!(Body::parse(b"{not json")
            .unwrap_err()
            .message
            .contains("not valid JSON"));
        assert!(Body::parse(b"[1]")
            .unwrap_err()
            .message
            .contains("JSON object"));
    }

    #[test]
    fn defaults_and_choices_follow_openai_and_the_cli() {
        let p = params(r#"{"prompt": "x", "n": 3, "seed": 10, "stop": "\n", "logit_bias": {}}"#)
            .unwrap();
        assert_eq!(p.max_tokens, 16);
        assert_eq!(p.stop, vec!["\n".to_string()]);
        assert_eq!(p.sampling.temperature, 1.0);
        let jobs = p.jobs(&[1, 2], 0);
        let seeds: Vec<u64> = jobs.iter().map(|j| j.sampling.seed).collect();
        assert_eq!(seeds, vec![10, 11, 12]);
        assert_eq!(params(r#"{"prompt": "x"}"#).unwrap().sampling.seed, 7);
    }

    #[test]
    fn prompts_and_messages_take_every_openai_shape() {
        let read = |s: &str| read_prompts(&Body::parse(s.as_bytes()).unwrap());
        assert!(matches!(
            read(r#"{"prompt": "hi"}"#).unwrap()[..],
            [Prompt::Text(_)]
        ));
        assert!(matches!(
            read(r#"{"prompt": ["a", "b"]}"#).unwrap()[..],
            [Prompt::Text(_), Prompt::Text(_)]
        ));
        assert!(
            matches!(&read(r#"{"prompt": [1, 2]}"#).unwrap()[..], [Prompt::Ids(ids)] if ids == &[1, 2])
        );
        assert!(matches!(
            read(r#"{"prompt": [[1], [2, 3]]}"#).unwrap()[..],
            [Prompt::Ids(_), Prompt::Ids(_)]
        ));
        assert_eq!(
            read(r#"{"prompt": [1, "a"]}"#)
                .err()
                .unwrap()
                .param
                .as_deref(),
            Some("prompt")
        );
        assert_eq!(
            read(r#"{"prompt": 5}"#).err().unwrap().param.as_deref(),
            Some("prompt")
        );
        assert_eq!(
            read(r#"{}"#).err().unwrap().param.as_deref(),
            Some("prompt")
        );
        let msgs = |s: &str| read_messages(&Body::parse(s.as_bytes()).unwrap());
        let m = msgs(r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#).unwrap();
        assert_eq!(m[0].content, "ab");
        let e = msgs(r#"{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[1].role"));
        let e = msgs(r#"{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#)
            .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].content[0]"));
    }
}
