//! The HTTP side of `selective serve`: axum routes over the [`Engine`]
//! (docs/DESIGN.md §19).
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | the web page (prompt, parameters, streamed output) |
//! | `GET /health` | 200 `{"status":"ok"}`; 503 while the model loads or the server shuts down |
//! | `GET /v1/models` | the one model |
//! | `POST /v1/completions` | OpenAI's completions, whole or streamed (SSE) |
//! | `POST /v1/chat/completions` | OpenAI's chat completions, whole or streamed |
//! | `GET /metrics` | Prometheus text |
//!
//! A streamed answer is a series of `data: {chunk}` events in OpenAI's
//! chunk format, then a chunk with the `usage` and no choices, then
//! `data: [DONE]`. A client that goes away drops the stream, which drops
//! the request's event receiver, and the engine stops its sequences.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::chat::ChatTemplate;
use super::engine::{panic_message, Engine, Event, Events, Finish, JobError, JobSpec, Refused};
use super::openai::{
    read_messages, read_prompts, ApiError, Body, ChoiceResult, Endpoint, Header, Limits, Params,
    Prompt, TokenInfo, Usage,
};
use crate::generate::Tokenizer;

/// A loaded model behind the engine, and what the routes need of it.
pub struct Loaded {
    pub engine: Engine,
    pub tokenizer: Arc<Tokenizer>,
    pub chat: ChatTemplate,
    /// The id /v1/models lists and responses carry.
    pub model_name: String,
}

/// The server's state, shared by the routes.
pub struct App {
    loaded: OnceLock<Loaded>,
    limits: Limits,
    /// Requests by (route, status).
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    ttft: Histogram,
    next_id: AtomicU64,
}

impl App {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            loaded: OnceLock::new(),
            limits,
            requests: Mutex::new(BTreeMap::new()),
            ttft: Histogram::default(),
            next_id: AtomicU64::new(0),
        })
    }

    /// Makes the model available; the routes answer 503 until then.
    pub fn set_loaded(&self, loaded: Loaded) {
        let _ = self.loaded.set(loaded);
    }

    pub fn loaded(&self) -> Option<&Loaded> {
        self.loaded.get()
    }

    fn ready(&self) -> Result<&Loaded, ApiError> {
        match self.loaded.get() {
            None => Err(ApiError::unavailable("the model is loading")),
            Some(l) if !l.engine.is_accepting() => {
                Err(ApiError::unavailable("the server is shutting down"))
            }
            Some(l) => Ok(l),
        }
    }
}

/// The routes over `app`.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/favicon.ico", get(|| async { StatusCode::NO_CONTENT }))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{id}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|request: Request| async move {
            ApiError {
                status: 404,
                message: format!("no route {} {}", request.method(), request.uri().path()),
                param: None,
                kind: "invalid_request_error",
            }
        })
        .method_not_allowed_fallback(|request: Request| async move {
            ApiError {
                status: 405,
                message: format!(
                    "{} {}: method not allowed",
                    request.method(),
                    request.uri().path()
                ),
                param: None,
                kind: "invalid_request_error",
            }
        })
        .layer(middleware::from_fn_with_state(app.clone(), count_requests))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .with_state(app)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, Json(self.body())).into_response();
        if self.status == 503 {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic_message(&*panic);
    eprintln!("selective serve: a panic in a request handler was caught: {message}");
    ApiError::internal(format!("internal error: {message}")).into_response()
}

async fn count_requests(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    *app.requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry((path, status))
        .or_default() += 1;
    response
}

async fn page() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

async fn health(State(app): State<Arc<App>>) -> Response {
    match app.ready() {
        Ok(_) => Json(json!({"status": "ok"})).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn models(State(app): State<Arc<App>>) -> Response {
    match app.ready() {
        Ok(l) => Json(json!({
            "object": "list",
            "data": [{"id": l.model_name, "object": "model", "created": 0, "owned_by": "selective"}],
        }))
        .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn model(State(app): State<Arc<App>>, Path(id): Path<String>) -> Response {
    match app.ready() {
        Ok(l) if l.model_name == id => Json(
            json!({"id": l.model_name, "object": "model", "created": 0, "owned_by": "selective"}),
        )
        .into_response(),
        Ok(l) => ApiError {
            status: 404,
            message: format!(
                "model {id:?} is not served here; this server serves {:?}",
                l.model_name
            ),
            param: Some("model".into()),
            kind: "invalid_request_error",
        }
        .into_response(),
        Err(e) => e.into_response(),
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

/// What a request asks, ready for the engine.
struct Prepared {
    header: Header,
    params: Params,
    jobs: Vec<JobSpec>,
    /// When the request arrived.
    started: Instant,
}

async fn completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    answer(app, |app, loaded| {
        let body = Body::parse(&body)?;
        let params = Params::read(&body, false, &app.limits, 16, unix_now().as_nanos() as u64)?;
        let mut jobs = Vec::new();
        for prompt in read_prompts(&body)? {
            let ids = match prompt {
                Prompt::Text(text) => encode(loaded, &text)?,
                Prompt::Ids(ids) => ids,
            };
            check_prompt(&app.limits, loaded, &ids)?;
            jobs.extend(params.jobs(&ids, jobs.len()));
        }
        let header = header_for(app, loaded, Endpoint::Completions, "cmpl");
        Ok((header, params, jobs))
    })
    .await
}

async fn chat_completions(State(app): State<Arc<App>>, body: Bytes) -> Response {
    answer(app, |app, loaded| {
        let body = Body::parse(&body)?;
        let mut params = Params::read(
            &body,
            true,
            &app.limits,
            app.limits.max_tokens,
            unix_now().as_nanos() as u64,
        )?;
        let messages = read_messages(&body)?;
        let text = loaded.chat.render(&messages).map_err(|message| {
            let param = message
                .split(':')
                .next()
                .filter(|p| p.starts_with("messages"));
            ApiError {
                param: Some(param.unwrap_or("messages").to_string()),
                ..ApiError::bad_request(message.clone())
            }
        })?;
        params.stop.extend(loaded.chat.stop_strings());
        let ids = encode(loaded, &text)?;
        check_prompt(&app.limits, loaded, &ids)?;
        let jobs = params.jobs(&ids, 0);
        let header = header_for(app, loaded, Endpoint::Chat, "chatcmpl");
        Ok((header, params, jobs))
    })
    .await
}

/// Reads a request into jobs with `prepare`, then answers: an error, or
/// the jobs' results whole or streamed.
async fn answer(
    app: Arc<App>,
    prepare: impl FnOnce(&App, &Loaded) -> Result<(Header, Params, Vec<JobSpec>), ApiError>,
) -> Response {
    let started = Instant::now();
    let prepared = app.ready().and_then(|loaded| prepare(&app, loaded));
    match prepared {
        Ok((header, params, jobs)) => {
            let prepared = Prepared {
                header,
                params,
                jobs,
                started,
            };
            run(app, prepared).await
        }
        Err(e) => e.into_response(),
    }
}

fn header_for(app: &App, loaded: &Loaded, endpoint: Endpoint, prefix: &str) -> Header {
    let now = unix_now();
    let n = app.next_id.fetch_add(1, Ordering::Relaxed);
    Header {
        id: format!("{prefix}-{:x}{n:04x}", now.as_millis()),
        created: now.as_secs(),
        model: loaded.model_name.clone(),
        endpoint,
    }
}

fn encode(loaded: &Loaded, text: &str) -> Result<Vec<u32>, ApiError> {
    loaded
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::invalid("prompt", e))
}

fn check_prompt(limits: &Limits, loaded: &Loaded, ids: &[u32]) -> Result<(), ApiError> {
    if ids.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "is empty: give at least one token",
        ));
    }
    if ids.len() > limits.max_prompt_tokens {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "{} tokens, more than this server's limit of {}",
                ids.len(),
                limits.max_prompt_tokens
            ),
        ));
    }
    let vocab = loaded.engine.vocab_size();
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(ApiError::invalid(
            "prompt",
            format!("token id {bad} is not below the vocabulary size {vocab}"),
        ));
    }
    Ok(())
}

fn from_job_error(e: JobError) -> ApiError {
    match e {
        JobError::Invalid(m) => ApiError::bad_request(m),
        JobError::Internal(m) => ApiError::internal(m),
        JobError::Shutdown => ApiError::unavailable("the server is shutting down"),
    }
}

/// Submits the jobs and answers, whole or streamed.
async fn run(app: Arc<App>, p: Prepared) -> Response {
    let Some(loaded) = app.loaded() else {
        return ApiError::unavailable("the model is loading").into_response();
    };
    let mut events = match loaded.engine.submit(p.jobs.clone()) {
        Ok(events) => events,
        Err(Refused::Busy) => {
            return ApiError::unavailable("the queue is full: try again shortly").into_response()
        }
        Err(Refused::ShuttingDown) => {
            return ApiError::unavailable("the server is shutting down").into_response()
        }
    };
    // Wait for the first event, so that a prompt the model refuses is
    // answered with an error status rather than inside a stream.
    let first = match events.recv().await {
        Some((index, Event::Failed(e))) => return error_with_index(e, index, p.jobs.len()),
        Some(first) => first,
        None => return ApiError::internal("the engine stopped").into_response(),
    };
    let collector = Collector::new(app.clone(), &p);
    if p.params.stream {
        stream(collector, first, events, p.header, p.params.include_usage).await
    } else {
        whole(collector, first, events, p.header).await
    }
}

fn error_with_index(e: JobError, index: usize, n: usize) -> Response {
    let mut error = from_job_error(e);
    if n > 1 {
        error.message = format!("choice {index}: {}", error.message);
    }
    error.into_response()
}

/// What one event adds to its choice.
struct Piece {
    text: String,
    tokens: Vec<TokenInfo>,
    finish: Option<Finish>,
}

/// Gathers a request's events into choices and usage.
struct Collector {
    app: Arc<App>,
    started: Instant,
    first_token_seen: bool,
    choices: Vec<ChoiceResult>,
    usage: Usage,
    finished: usize,
}

impl Collector {
    fn new(app: Arc<App>, p: &Prepared) -> Self {
        Self {
            app,
            started: p.started,
            first_token_seen: false,
            choices: vec![
                ChoiceResult {
                    logprobs: p.params.logprobs.is_some(),
                    ..Default::default()
                };
                p.jobs.len()
            ],
            usage: Usage::default(),
            finished: 0,
        }
    }

    fn done(&self) -> bool {
        self.finished == self.choices.len()
    }

    /// Takes one event of choice `index`; returns what it adds.
    fn take(&mut self, index: usize, event: Event) -> Result<Option<Piece>, JobError> {
        match event {
            Event::Prefilled {
                prompt_tokens,
                cached_tokens,
            } => {
                self.usage.prompt_tokens += prompt_tokens;
                self.usage.cached_tokens += cached_tokens;
                Ok(None)
            }
            Event::Token { id, text, logprobs } => {
                if !self.first_token_seen {
                    self.first_token_seen = true;
                    self.app.ttft.observe(self.started.elapsed().as_secs_f64());
                }
                self.usage.completion_tokens += 1;
                let mut tokens = Vec::new();
                if let (Some(lp), Some(loaded)) = (logprobs, self.app.loaded()) {
                    let piece = |id: u32| loaded.tokenizer.decode(&[id]).unwrap_or_default();
                    tokens.push(TokenInfo {
                        text: piece(id),
                        top_texts: lp.top.iter().map(|&(t, _)| piece(t)).collect(),
                        logprobs: lp,
                    });
                }
                let choice = &mut self.choices[index];
                choice.text.push_str(&text);
                choice.tokens.extend(tokens.iter().cloned());
                Ok(Some(Piece {
                    text,
                    tokens,
                    finish: None,
                }))
            }
            Event::Finished { text, reason, .. } => {
                self.finished += 1;
                let choice = &mut self.choices[index];
                choice.text.push_str(&text);
                choice.finish = Some(reason);
                Ok(Some(Piece {
                    text,
                    tokens: Vec::new(),
                    finish: Some(reason),
                }))
            }
            Event::Failed(e) => Err(e),
        }
    }
}

async fn whole(
    mut c: Collector,
    first: (usize, Event),
    mut events: Events,
    header: Header,
) -> Response {
    let mut next = Some(first);
    loop {
        let Some((index, event)) = next.take() else {
            return ApiError::internal("the engine stopped").into_response();
        };
        if let Err(e) = c.take(index, event) {
            return error_with_index(e, index, c.choices.len());
        }
        if c.done() {
            return Json(header.response(&c.choices, c.usage)).into_response();
        }
        next = events.recv().await;
    }
}

/// Answers as server-sent events. A task pumps the engine's events into
/// the response body; it owns the request's event receiver, so when the
/// client leaves (the body and its channel are dropped) the task ends and
/// the engine stops the request's sequences.
async fn stream(
    mut c: Collector,
    first: (usize, Event),
    mut events: Events,
    header: Header,
    include_usage: bool,
) -> Response {
    let (tx, rx) = mpsc::channel::<String>(64);
    tokio::spawn(async move {
        let n = c.choices.len();
        if header.endpoint == Endpoint::Chat {
            for index in 0..n {
                if tx.send(header.role_chunk(index).to_string()).await.is_err() {
                    return;
                }
            }
        }
        let mut next = Some(first);
        loop {
            let Some((index, event)) = next.take() else {
                let _ = tx
                    .send(ApiError::internal("the engine stopped").body().to_string())
                    .await;
                return;
            };
            let chunk = match c.take(index, event) {
                Err(e) => {
                    // the status is sent already: the error goes in the stream
                    let error = from_job_error(e);
                    let _ = tx.send(error.body().to_string()).await;
                    return;
                }
                Ok(Some(piece))
                    if !piece.text.is_empty()
                        || !piece.tokens.is_empty()
                        || piece.finish.is_some() =>
                {
                    Some(header.chunk(index, &piece.text, &piece.tokens, piece.finish))
                }
                Ok(_) => None,
            };
            let mut chunks = Vec::new();
            match chunk {
                Some(chunk) if c.done() && !include_usage => {
                    chunks.push(Header::with_usage(chunk, c.usage))
                }
                Some(chunk) => chunks.push(chunk),
                None => {}
            }
            if c.done() && include_usage {
                chunks.push(header.usage_chunk(c.usage));
            }
            for chunk in chunks {
                if tx.send(chunk.to_string()).await.is_err() {
                    return;
                }
            }
            if c.done() {
                let _ = tx.send("[DONE]".to_string()).await;
                return;
            }
            next = tokio::select! {
                event = events.recv() => event,
                _ = tx.closed() => return,
            };
        }
    });
    let body =
        ReceiverStream::new(rx).map(|data| Ok::<_, Infallible>(SseEvent::default().data(data)));
    Sse::new(body).into_response()
}

/// Cumulative histogram of seconds, Prometheus style.
#[derive(Default)]
struct Histogram {
    /// (count per bucket, sum, count)
    inner: Mutex<([u64; TTFT_BUCKETS.len()], f64, u64)>,
}

const TTFT_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

impl Histogram {
    fn observe(&self, seconds: f64) {
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (count, &le) in h.0.iter_mut().zip(&TTFT_BUCKETS) {
            if seconds <= le {
                *count += 1;
            }
        }
        h.1 += seconds;
        h.2 += 1;
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    use std::fmt::Write;
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let one = |v: String| vec![(String::new(), v)];
    let requests: Vec<(String, String)> = app
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|((path, status), n)| {
            (
                format!("{{path=\"{path}\",status=\"{status}\"}}"),
                n.to_string(),
            )
        })
        .collect();
    metric(
        "selective_http_requests_total",
        "counter",
        "HTTP requests by path and status.",
        &requests,
    );
    if let Some(loaded) = app.loaded() {
        let c = &loaded.engine.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed).to_string();
        let load_usize = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed).to_string();
        metric(
            "selective_requests_queued",
            "gauge",
            "Sequences waiting for a slot.",
            &one(load_usize(&c.queued)),
        );
        metric(
            "selective_sequences_running",
            "gauge",
            "Sequences being decoded together.",
            &one(load_usize(&c.running)),
        );
        metric(
            "selective_prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted sequences.",
            &one(load(&c.prompt_tokens)),
        );
        metric(
            "selective_prompt_tokens_cached_total",
            "counter",
            "Prompt tokens served from the prefix cache instead of being computed.",
            &one(load(&c.cached_prompt_tokens)),
        );
        metric(
            "selective_generated_tokens_total",
            "counter",
            "Tokens fed through decoding steps (one per sequence per step).",
            &one(load(&c.decoded_tokens)),
        );
        metric(
            "selective_decode_steps_total",
            "counter",
            "Batched decoding steps.",
            &one(load(&c.decode_steps)),
        );
        metric(
            "selective_prefill_seconds_total",
            "counter",
            "Seconds the engine spent on prompts.",
            &one(c.prefill_seconds().to_string()),
        );
        metric(
            "selective_decode_seconds_total",
            "counter",
            "Seconds the engine spent in decoding steps.",
            &one(c.decode_seconds().to_string()),
        );
        metric(
            "selective_sequences_finished_total",
            "counter",
            "Sequences that ended normally.",
            &one(load(&c.jobs_finished)),
        );
        metric(
            "selective_sequences_cancelled_total",
            "counter",
            "Sequences whose client went away.",
            &one(load(&c.jobs_cancelled)),
        );
        metric(
            "selective_sequences_failed_total",
            "counter",
            "Sequences that ended with an error.",
            &one(load(&c.jobs_failed)),
        );
        metric(
            "selective_prefix_cache_entries",
            "gauge",
            "States in the prefix cache.",
            &one(load_usize(&c.cache_entries)),
        );
        metric(
            "selective_prefix_cache_bytes",
            "gauge",
            "Bytes of states in the prefix cache.",
            &one(load_usize(&c.cache_bytes)),
        );
        metric(
            "selective_prefix_cache_hits_total",
            "counter",
            "Prompts that started from a cached state.",
            &one(load(&c.cache_hits)),
        );
        metric(
            "selective_prefix_cache_misses_total",
            "counter",
            "Prompts that found no cached prefix.",
            &one(load(&c.cache_misses)),
        );
    }
    let (buckets, sum, count) = *app.ttft.inner.lock().unwrap_or_else(|e| e.into_inner());
    let mut samples: Vec<(String, String)> = TTFT_BUCKETS
        .iter()
        .zip(buckets)
        .map(|(le, n)| (format!("_bucket{{le=\"{le}\"}}"), n.to_string()))
        .collect();
    samples.push(("_bucket{le=\"+Inf\"}".into(), count.to_string()));
    samples.push(("_sum".into(), sum.to_string()));
    samples.push(("_count".into(), count.to_string()));
    metric(
        "selective_time_to_first_token_seconds",
        "histogram",
        "Seconds from a request's arrival to its first token.",
        &samples,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
