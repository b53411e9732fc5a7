//! The server's engine and routes (src/serve/), in process: continuous
//! batching gives each request the tokens `generate` gives it alone, the
//! prefix cache changes no token and makes later turns cost only their new
//! tokens, a client that leaves cancels its sequence, a panic fails one
//! request and not the server, and the HTTP answers follow OpenAI's shapes.
//! (tests/serve_process.rs runs the binary: signals, the openai client.)

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body as HttpBody;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use selective::generate::{CharVocab, SamplingConfig, TextGenerator, Tokenizer};
use selective::kernels::{WeightFormat, Weights};
use selective::nn::{
    Decoder, DecodingState, InferenceModel, Mamba, Sequence, Transformer, TransformerInference,
};
use selective::serve::engine::{Events, Refused};
use selective::serve::{
    router, App, ChatTemplate, Engine, EngineOptions, Event, Finish, JobError, JobSpec, Limits,
    Loaded, Message,
};
use tower::ServiceExt;

fn shakespeare() -> (InferenceModel, Arc<Tokenizer>) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/shakespeare-char");
    let model = InferenceModel::from_mamba(Mamba::<f32>::from_dir(dir).unwrap(), WeightFormat::F32)
        .unwrap();
    let tokenizer = Tokenizer::for_model_dir(dir).unwrap().unwrap();
    (model, Arc::new(tokenizer))
}

/// A character vocabulary of `n` ids for the test models without a tokenizer.
fn chars(n: usize) -> Arc<Tokenizer> {
    let all: Vec<char> = "abcdefghijklmnopqrstuvwxyz .,;:!?'\nABCDEFGHIJKLMNOPQRSTUVWXYZ"
        .chars()
        .take(n)
        .collect();
    assert_eq!(all.len(), n);
    Arc::new(Tokenizer::Chars(CharVocab::new(all).unwrap()))
}

fn spec(index: usize, prompt: Vec<u32>, max_tokens: usize, sampling: SamplingConfig) -> JobSpec {
    JobSpec {
        index,
        prompt,
        max_tokens,
        sampling,
        stop: Vec::new(),
        ignore_eos: false,
        logprobs: None,
    }
}

fn sampled(temperature: f32, top_p: f32, top_k: usize, seed: u64) -> SamplingConfig {
    SamplingConfig {
        temperature,
        top_p,
        top_k,
        seed,
        ..SamplingConfig::default()
    }
}

/// What one job produced.
#[derive(Clone, Debug, Default, PartialEq)]
struct Outcome {
    ids: Vec<u32>,
    text: String,
    finish: Option<Finish>,
    cached: usize,
    error: Option<JobError>,
}

/// Reads a request's events until all its `n` jobs ended (bounded wait).
fn collect(events: &mut Events, n: usize) -> Vec<Outcome> {
    let mut out = vec![Outcome::default(); n];
    let mut ended = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while ended < n {
        assert!(
            Instant::now() < deadline,
            "the engine did not finish in time"
        );
        let (i, event) = match events.try_recv() {
            Ok(e) => e,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => panic!("the engine dropped the request: {e}"),
        };
        match event {
            Event::Prefilled { cached_tokens, .. } => out[i].cached = cached_tokens,
            Event::Token { id, text, .. } => {
                out[i].ids.push(id);
                out[i].text.push_str(&text);
            }
            Event::Finished {
                text,
                reason,
                completion_tokens,
            } => {
                assert_eq!(completion_tokens, out[i].ids.len());
                out[i].text.push_str(&text);
                out[i].finish = Some(reason);
                ended += 1;
            }
            Event::Failed(e) => {
                out[i].error = Some(e);
                ended += 1;
            }
        }
    }
    out
}

/// The tokens and text `TextGenerator` gives `spec` alone.
fn alone<M: Decoder>(model: &M, tokenizer: &Tokenizer, spec: &JobSpec) -> (Vec<u32>, String) {
    let generator = TextGenerator::new(
        model,
        tokenizer,
        spec.max_tokens,
        spec.sampling.clone(),
        spec.stop.clone(),
        spec.ignore_eos,
    )
    .unwrap();
    let mut seq = model.new_state();
    model.prefill(&mut seq, &spec.prompt).unwrap();
    let out = generator
        .generate(std::slice::from_mut(&mut seq), |_, _| Ok(()))
        .unwrap();
    (out.output.tokens[0].clone(), out.texts[0].clone())
}

fn waits_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Jobs of different prompts, samplers, lengths and stops, more than the
/// engine's slots, so that sequences join and leave the batch mid-way.
fn mixed_jobs(tokenizer: &Tokenizer) -> Vec<JobSpec> {
    let prompts = ["a", "the ", "to be, or not", "b", "we ", "so,"];
    let samplers = [
        SamplingConfig::greedy(),
        sampled(0.8, 1.0, 0, 11),
        sampled(1.0, 0.9, 0, 12),
        sampled(0.7, 1.0, 5, 13),
        sampled(1.2, 0.95, 0, 14),
        SamplingConfig {
            repetition_penalty: 1.3,
            ..sampled(0.9, 1.0, 0, 15)
        },
    ];
    let lengths = [7, 30, 1, 19, 25, 12];
    prompts
        .iter()
        .zip(samplers)
        .zip(lengths)
        .enumerate()
        .map(|(i, ((p, s), n))| {
            let mut job = spec(i, tokenizer.encode(p).unwrap(), n, s);
            if i == 4 {
                job.stop = vec!["e".into()];
            }
            job
        })
        .collect()
}

fn check_batched_equals_alone<M>(name: &str, model: M, tokenizer: Arc<Tokenizer>)
where
    M: Decoder + Send + Sync + 'static,
    M::State: Clone,
{
    let jobs = mixed_jobs(&tokenizer);
    let expected: Vec<(Vec<u32>, String)> =
        jobs.iter().map(|j| alone(&model, &tokenizer, j)).collect();
    let engine = Engine::start(
        model,
        tokenizer.clone(),
        EngineOptions {
            parallel: 4,
            queue_capacity: 16,
            cache_bytes: 0,
            threads: 2,
        },
    )
    .unwrap();
    let mut events = engine.submit(jobs.clone()).unwrap();
    let outcomes = collect(&mut events, jobs.len());
    let mut total = 0;
    for ((job, want), got) in jobs.iter().zip(&expected).zip(&outcomes) {
        assert_eq!(got.error, None, "{name}: job {}", job.index);
        assert_eq!(got.ids, want.0, "{name}: job {} tokens", job.index);
        assert_eq!(got.text, want.1, "{name}: job {} text", job.index);
        total += got.ids.len();
    }
    // a stop string is never in the text; on Shakespeare it ends job 4 early
    assert!(!outcomes[4].text.contains('e'), "{name}");
    if name.starts_with("shakespeare") {
        assert_eq!(outcomes[4].finish, Some(Finish::Stop), "{name}");
        assert!(outcomes[4].ids.len() < jobs[4].max_tokens, "{name}");
    }
    assert_eq!(outcomes[1].finish, Some(Finish::Length), "{name}");
    // Batched: fewer steps than tokens (each step served several sequences).
    let steps = engine.counters.decode_steps.load(Ordering::Relaxed) as usize;
    assert!(
        steps < total,
        "{name}: {steps} steps for {total} tokens: no batching"
    );
    engine.stop();
}

#[test]
fn each_request_in_a_continuous_batch_gets_the_tokens_generate_gives_it_alone() {
    let (model, tokenizer) = shakespeare();
    check_batched_equals_alone("shakespeare-char f32", model, tokenizer);
    let (model, tokenizer) = shakespeare();
    let q8 = InferenceModel::from_mamba(
        Mamba::<f32>::from_dir(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/models/shakespeare-char"
        ))
        .unwrap(),
        WeightFormat::Q8,
    )
    .unwrap();
    drop(model);
    check_batched_equals_alone("shakespeare-char q8", q8, tokenizer);
    let dir = common::models_dir().join("mamba2-tiny-hf");
    let mamba2 =
        InferenceModel::from_mamba(Mamba::<f32>::from_dir(&dir).unwrap(), WeightFormat::F32)
            .unwrap();
    check_batched_equals_alone("mamba2-tiny-hf", mamba2, chars(40));
    let dir = common::models_dir().join("tiny-llama");
    let llama = TransformerInference::from_transformer(
        Transformer::<f32>::from_dir(&dir).unwrap(),
        WeightFormat::F32,
    )
    .unwrap();
    check_batched_equals_alone("tiny-llama (KV cache)", llama, chars(40));
}

#[test]
fn the_prefix_cache_changes_no_token_and_later_turns_cost_only_their_new_tokens() {
    let start = |cache_bytes| {
        let (model, tokenizer) = shakespeare();
        let engine = Engine::start(
            model,
            tokenizer.clone(),
            EngineOptions {
                parallel: 4,
                queue_capacity: 16,
                cache_bytes,
                threads: 2,
            },
        )
        .unwrap();
        (engine, tokenizer)
    };
    let (cold, tokenizer) = start(0);
    let (warm, _) = start(64 << 20);
    let template = ChatTemplate::Plain;
    let mut messages = vec![Message {
        role: "system".into(),
        content: "A play in verse.".into(),
    }];
    let questions = ["Who goes there?", "Speak, what news?", "Then farewell."];
    // the cached prefix the next turn should find, and how many turns found
    // the state after the whole previous answer
    let mut expected_cached = 0;
    let mut whole_answer_hits = 0;
    for (turn, question) in questions.iter().enumerate() {
        messages.push(Message {
            role: "user".into(),
            content: question.to_string(),
        });
        let prompt = tokenizer
            .encode(&template.render(&messages).unwrap())
            .unwrap();
        let job = JobSpec {
            stop: template.stop_strings(),
            ..spec(
                0,
                prompt.clone(),
                40,
                sampled(0.8, 1.0, 0, 100 + turn as u64),
            )
        };
        let t0 = Instant::now();
        let without = collect(&mut cold.submit(vec![job.clone()]).unwrap(), 1).remove(0);
        let t_cold = t0.elapsed();
        let t0 = Instant::now();
        let with = collect(&mut warm.submit(vec![job]).unwrap(), 1).remove(0);
        let t_warm = t0.elapsed();
        println!(
            "turn {turn}: {} prompt tokens, {} from the cache; {:.1} ms without the cache, {:.1} ms with",
            prompt.len(),
            with.cached,
            t_cold.as_secs_f64() * 1e3,
            t_warm.as_secs_f64() * 1e3
        );
        assert_eq!(
            with.ids, without.ids,
            "turn {turn}: the cache changed the tokens"
        );
        assert_eq!(with.text, without.text, "turn {turn}");
        assert_eq!(without.cached, 0);
        assert_eq!(with.cached, expected_cached, "turn {turn}");
        whole_answer_hits +=
            usize::from(turn > 0 && expected_cached > 0 && with.cached > prompt.len() / 2);
        // The answer goes back as sent. A character tokenizer splits the
        // next prompt exactly where this answer's tokens end (a stop string
        // that ended the answer is the template's next "\n\nUser:"), so
        // the cache holds the state after prompt + answer tokens for it.
        messages.push(Message {
            role: "assistant".into(),
            content: with.text.clone(),
        });
        let next = tokenizer
            .encode(&template.render(&messages).unwrap())
            .unwrap();
        let whole: Vec<u32> = [&prompt[..], &with.ids[..]].concat();
        assert!(next.starts_with(&prompt));
        expected_cached = if next.starts_with(&whole) {
            whole.len()
        } else {
            prompt.len()
        };
    }
    assert!(
        whole_answer_hits > 0,
        "no turn started after the whole previous answer"
    );
    let stats = warm.counters.cache_hits.load(Ordering::Relaxed);
    assert_eq!(stats, 2, "turns 2 and 3 hit the cache");
    cold.stop();
    warm.stop();
}

#[test]
fn a_client_that_leaves_cancels_its_sequence_and_the_others_go_on() {
    let (model, tokenizer) = shakespeare();
    let prompt = tokenizer.encode("ROMEO:").unwrap();
    let engine = Engine::start(model, tokenizer, EngineOptions::default()).unwrap();
    let mut leaving = engine
        .submit(vec![spec(0, prompt.clone(), 4000, sampled(1.0, 1.0, 0, 1))])
        .unwrap();
    let mut staying = engine
        .submit(vec![spec(0, prompt.clone(), 50, sampled(1.0, 1.0, 0, 2))])
        .unwrap();
    // the first token arrives, then the client goes away
    waits_for("a first token", || {
        matches!(leaving.try_recv(), Ok((_, Event::Token { .. })))
    });
    drop(leaving);
    let done = collect(&mut staying, 1).remove(0);
    assert_eq!(done.ids.len(), 50);
    waits_for("the cancellation", || {
        engine.counters.jobs_cancelled.load(Ordering::Relaxed) == 1
    });
    let decoded = engine.counters.decoded_tokens.load(Ordering::Relaxed);
    assert!(
        decoded < 1000,
        "{decoded} tokens decoded: the leaving sequence went on"
    );
    engine.stop();
}

/// A model that panics in prefill when the prompt holds `poison`, and in a
/// decoding step when a sequence reaches position `fatal_position`.
struct Faulty {
    inner: InferenceModel,
    poison: u32,
    fatal_position: u64,
}

impl Decoder for Faulty {
    type State = Sequence;
    type Buffers = <InferenceModel as Decoder>::Buffers;
    fn vocab_rows(&self) -> usize {
        self.inner.vocab_rows()
    }
    fn n_params(&self) -> usize {
        self.inner.n_params()
    }
    fn format(&self) -> WeightFormat {
        Decoder::format(&self.inner)
    }
    fn bytes_per_token(&self) -> usize {
        Decoder::bytes_per_token(&self.inner)
    }
    fn new_state(&self) -> Sequence {
        self.inner.new_state()
    }
    fn new_buffers(&self, batch: usize) -> Self::Buffers {
        self.inner.new_buffers(batch)
    }
    fn prefill(&self, seq: &mut Sequence, ids: &[u32]) -> selective::Result<()> {
        assert!(!ids.contains(&self.poison), "poisoned prompt");
        Decoder::prefill(&self.inner, seq, ids)
    }
    fn decode_step(
        &self,
        seqs: &mut [&mut Sequence],
        tokens: &[u32],
        buffers: &mut Self::Buffers,
    ) -> selective::Result<()> {
        assert!(
            seqs.iter().all(|s| s.position() != self.fatal_position),
            "fatal position"
        );
        Decoder::decode_step(&self.inner, seqs, tokens, buffers)
    }
    fn prefill_hidden(
        &self,
        seq: &mut Sequence,
        ids: &[u32],
        on_chunk: &mut dyn FnMut(usize, &[f32]) -> selective::Result<()>,
    ) -> selective::Result<()> {
        self.inner.prefill_hidden(seq, ids, on_chunk)
    }
    fn head(&self) -> &Weights {
        self.inner.head()
    }
}

#[test]
fn a_panic_fails_the_requests_it_touched_and_the_engine_serves_on() {
    let (inner, tokenizer) = shakespeare();
    let poison = tokenizer.encode("Z").unwrap()[0];
    let model = Faulty {
        inner,
        poison,
        fatal_position: 60,
    };
    let engine = Engine::start(model, tokenizer.clone(), EngineOptions::default()).unwrap();
    // one greedy job of `max_tokens` on `prompt`, alone
    let run_one = |prompt: Vec<u32>, max_tokens: usize| -> Outcome {
        let request = vec![spec(0, prompt, max_tokens, SamplingConfig::greedy())];
        collect(&mut engine.submit(request).unwrap(), 1).remove(0)
    };
    let internal_error = |o: &Outcome| match &o.error {
        Some(JobError::Internal(m)) => m.clone(),
        other => panic!("expected an internal error, got {other:?}"),
    };
    let ok_prompt = tokenizer.encode("KING:").unwrap();
    let bad = run_one(tokenizer.encode("Zounds").unwrap(), 5);
    let m = internal_error(&bad);
    assert!(m.contains("poisoned prompt"), "{m}");
    // a step that panics fails the sequences in it, not the engine
    let long = run_one(ok_prompt.clone(), 100);
    let m = internal_error(&long);
    assert!(m.contains("fatal position"), "{m}");
    assert_eq!(long.ids.len(), 60 - ok_prompt.len() + 1);
    let fine = run_one(ok_prompt.clone(), 10);
    assert_eq!((fine.error.clone(), fine.ids.len()), (None, 10));
    assert_eq!(engine.counters.jobs_failed.load(Ordering::Relaxed), 2);
    engine.stop();
}

#[test]
fn a_full_queue_refuses_and_a_stopped_engine_ends_every_request() {
    let (model, tokenizer) = shakespeare();
    let prompt = tokenizer.encode("ROMEO:").unwrap();
    let engine = Engine::start(
        model,
        tokenizer,
        EngineOptions {
            parallel: 1,
            queue_capacity: 1,
            cache_bytes: 0,
            threads: 2,
        },
    )
    .unwrap();
    let long = |i| spec(i, prompt.clone(), 4000, sampled(1.0, 1.0, 0, 3));
    let mut first = engine.submit(vec![long(0), long(1)]).unwrap();
    waits_for("one running and one waiting", || {
        engine.counters.running.load(Ordering::SeqCst) == 1
            && engine.counters.queued.load(Ordering::SeqCst) == 1
    });
    assert_eq!(engine.submit(vec![long(0)]).err(), Some(Refused::Busy));
    engine.stop();
    let ended = collect(&mut first, 2);
    assert!(
        ended.iter().all(|o| o.error == Some(JobError::Shutdown)),
        "{ended:?}"
    );
    assert_eq!(
        engine.submit(vec![long(0)]).err(),
        Some(Refused::ShuttingDown)
    );
}

// ---- HTTP -------------------------------------------------------------

fn app_with(options: EngineOptions) -> (Arc<App>, axum::Router) {
    let (model, tokenizer) = shakespeare();
    let engine = Engine::start(model, tokenizer.clone(), options).unwrap();
    let app = App::new(Limits {
        max_prompt_tokens: 200,
        max_tokens: 500,
        max_choices: 4,
    });
    app.set_loaded(Loaded {
        engine,
        tokenizer,
        chat: ChatTemplate::Plain,
        model_name: "shakespeare-char".into(),
    });
    (app.clone(), router(app))
}

async fn call(
    router: &axum::Router,
    method: &str,
    path: &str,
    body: &str,
) -> (StatusCode, axum::http::HeaderMap, String) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(HttpBody::from(body.to_string()))
        .unwrap();
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(bytes.to_vec()).unwrap())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routes_answer_in_openai_shapes() {
    let (app, router) = app_with(EngineOptions::default());
    let (status, _, body) = call(&router, "GET", "/health", "").await;
    assert_eq!(
        (status, json(&body)["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (_, _, body) = call(&router, "GET", "/v1/models", "").await;
    assert_eq!(json(&body)["data"][0]["id"], "shakespeare-char");
    let (status, headers, body) = call(&router, "GET", "/", "").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(body.contains("id=\"prompt\""));

    // whole and streamed answers of a greedy request are the same text
    let request = r#"{"prompt": "ROMEO:", "max_tokens": 24, "temperature": 0}"#;
    let (status, _, body) = call(&router, "POST", "/v1/completions", request).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let whole = json(&body);
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 24);
    assert_eq!(whole["usage"]["prompt_tokens"], 6);
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    let streamed = request.replace("}", r#", "stream": true}"#);
    let (status, headers, body) = call(&router, "POST", "/v1/completions", &streamed).await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let events: Vec<&str> = body
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not a data event: {e:?}"))
        })
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"));
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| json(e)).collect();
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0).and_then(|ch| ch["text"].as_str()))
        .collect();
    assert_eq!(joined, text);
    assert!(chunks.len() > 3, "the text came in one piece: not streamed");
    // without stream_options the usage rides on the finishing chunk ...
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 24);
    // the prompt's state was cached by the first request
    assert_eq!(last["usage"]["prompt_tokens_details"]["cached_tokens"], 6);
    // ... with include_usage it comes in a chunk of its own, with no choices
    let with_usage = request.replace(
        "}",
        r#", "stream": true, "stream_options": {"include_usage": true}}"#,
    );
    let (_, _, body) = call(&router, "POST", "/v1/completions", &with_usage).await;
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    let usage = json(events[events.len() - 2].strip_prefix("data: ").unwrap());
    assert_eq!(usage["choices"].as_array().unwrap().len(), 0, "{body}");
    assert_eq!(usage["usage"]["completion_tokens"], 24);
    let finishing = json(events[events.len() - 3].strip_prefix("data: ").unwrap());
    assert_eq!(finishing["choices"][0]["finish_reason"], "length");
    assert!(finishing.get("usage").is_none());

    // chat, two choices, log-probabilities
    let chat = r#"{"messages": [{"role": "user", "content": "Speak."}], "max_tokens": 8, "n": 2, "seed": 4, "logprobs": true, "top_logprobs": 3}"#;
    let (status, _, body) = call(&router, "POST", "/v1/chat/completions", chat).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v = json(&body);
    assert_eq!(v["object"], "chat.completion");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"]["role"], "assistant");
        let content = c["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 8);
        for t in content {
            let lp = t["logprob"].as_f64().unwrap();
            assert!(lp <= 0.0);
            let top = t["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 3);
            // the most likely alternative is at least as likely as the pick
            assert!(top[0]["logprob"].as_f64().unwrap() >= lp - 1e-6);
        }
    }
    assert_eq!(v["usage"]["completion_tokens"], 16);

    // metrics count what happened
    let (_, _, body) = call(&router, "GET", "/metrics", "").await;
    assert!(
        body.contains("selective_http_requests_total{path=\"/v1/completions\",status=\"200\"} 3"),
        "{body}"
    );
    assert!(body.contains("selective_prefix_cache_hits_total"), "{body}");
    assert!(
        body.contains("selective_time_to_first_token_seconds_count 4"),
        "{body}"
    );

    // unknown routes, wrong methods and other models get OpenAI's error body
    for (method, path, status) in [
        ("POST", "/v1/embeddings", 404),
        ("GET", "/v1/completions", 405),
        ("GET", "/v1/models/gpt-4", 404),
    ] {
        let (got, _, body) = call(&router, method, path, "").await;
        assert_eq!(got.as_u16(), status, "{method} {path}: {body}");
        assert!(!json(&body)["error"]["message"].as_str().unwrap().is_empty());
    }
    let (status, _, body) = call(&router, "GET", "/v1/models/shakespeare-char", "").await;
    assert_eq!(
        (status, json(&body)["id"].as_str()),
        (StatusCode::OK, Some("shakespeare-char"))
    );
    app.loaded().unwrap().engine.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_400_naming_the_field_and_a_full_queue_503() {
    let (app, router) = app_with(EngineOptions {
        parallel: 1,
        queue_capacity: 1,
        cache_bytes: 0,
        threads: 2,
    });
    let cases = [
        ("/v1/completions", "{\"prompt\": ", None),
        (
            "/v1/completions",
            r#"{"prompt": "a", "temperature": "hot"}"#,
            Some("temperature"),
        ),
        (
            "/v1/completions",
            r#"{"prompt": "a", "max_tokens": 501}"#,
            Some("max_tokens"),
        ),
        ("/v1/completions", r#"{"prompt": "a", "n": 5}"#, Some("n")),
        (
            "/v1/completions",
            r#"{"prompt": [1, 2, 999]}"#,
            Some("prompt"),
        ),
        (
            "/v1/completions",
            &format!(r#"{{"prompt": "{}"}}"#, "a".repeat(201)),
            Some("prompt"),
        ),
        ("/v1/completions", r#"{"prompt": ""}"#, Some("prompt")),
        (
            "/v1/completions",
            r#"{"prompt": "a", "echo": true}"#,
            Some("echo"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "robot", "content": "a"}]}"#,
            Some("messages[0].role"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": "hi"}"#,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "a"}], "tools": []}"#,
            Some("tools"),
        ),
    ];
    for (path, body, field) in cases {
        let (status, _, answer) = call(&router, "POST", path, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}: {answer}");
        let error = &json(&answer)["error"];
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"].as_str(), field, "{body}: {answer}");
        assert!(!error["message"].as_str().unwrap().is_empty());
    }
    // Fill the one slot and the one place in the queue, then ask again.
    let loaded = app.loaded().unwrap();
    let prompt = loaded.tokenizer.encode("ROMEO:").unwrap();
    let long = |i| spec(i, prompt.clone(), 4000, sampled(1.0, 1.0, 0, 3));
    let _busy = loaded.engine.submit(vec![long(0), long(1)]).unwrap();
    let counters = loaded.engine.counters.clone();
    tokio::task::spawn_blocking(move || {
        waits_for("a full queue", || {
            counters.running.load(Ordering::SeqCst) == 1
                && counters.queued.load(Ordering::SeqCst) == 1
        })
    })
    .await
    .unwrap();
    let (status, headers, answer) =
        call(&router, "POST", "/v1/completions", r#"{"prompt": "a"}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
    assert_eq!(headers["retry-after"], "1");
    assert!(answer.contains("queue is full"), "{answer}");
    loaded.engine.stop();
    let (status, _, _) = call(&router, "GET", "/health", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn health_says_503_while_the_model_loads() {
    let app = App::new(Limits::default());
    let router = router(app);
    let (status, headers, body) = call(&router, "GET", "/health", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(headers["retry-after"], "1");
    assert!(body.contains("loading"), "{body}");
    let (status, _, _) = call(&router, "POST", "/v1/completions", r#"{"prompt": "a"}"#).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}
