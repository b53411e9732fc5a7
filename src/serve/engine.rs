//! The server's engine: one thread that owns the model and decodes every
//! active request together, a token per step (continuous batching,
//! docs/DESIGN.md §19.2).
//!
//! Each turn of its loop:
//! ```text
//! 1. take new jobs from the queue (block while there is nothing to do);
//!    drop the jobs whose client has gone (its event receiver is closed)
//! 2. admit waiting jobs while fewer than `parallel` run: the longest cached
//!    prefix of the prompt gives the starting state (PrefixCache), the rest
//!    of the prompt is prefilled, and the state after the prompt is cached
//! 3. sample each running job's next token from its logits, with its own
//!    Sampler (seed as `selective generate` uses it), and send the text it
//!    makes final (SequenceText: UTF-8 held back until whole, stop strings)
//! 4. one decode_step feeds every running job its token: one pass over the
//!    weights for all of them (a job that finished this step is fed too,
//!    so that its state covers its whole text, as `generate` leaves it)
//! 5. jobs that finished leave: their state is cached under prompt +
//!    generated tokens, and the finish event (with the last held-back text)
//!    is sent
//! ```
//! Per job this is the sequence of samples and steps that
//! [`crate::generate::generate`] runs for one sequence, so a request's
//! tokens are those `selective generate` gives alone with the same seed
//! (up to the last bits of the batched products, which a sampled token
//! does not notice; tests/serve.rs).
//!
//! A panic inside the model or the sampler is caught: the jobs it touched
//! get an internal error and the engine goes on with the others.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::state_cache::{CacheStats, PrefixCache};
use crate::generate::{
    options_for, FinishReason, GenerateOptions, Sampler, SamplingConfig, SequenceText, Tokenizer,
};
use crate::nn::{Decoder, DecodingState};

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    /// Sequences decoded together at most (llama-server's `--parallel`).
    pub parallel: usize,
    /// Jobs that may wait for a slot; beyond it [`Engine::submit`] says busy.
    pub queue_capacity: usize,
    /// Bytes of decoder states the prefix cache keeps (0: no cache).
    pub cache_bytes: usize,
    /// Compute threads (0: one per core). The engine's loop runs on one of
    /// them, so that each of the ~100 parallel products of a step starts
    /// from inside the pool instead of waking it from outside.
    pub threads: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            parallel: 16,
            queue_capacity: 256,
            cache_bytes: 512 << 20,
            threads: 0,
        }
    }
}

/// One sequence to generate.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// Which of a request's choices this is; events carry it back.
    pub index: usize,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    /// Stop strings (not part of the text).
    pub stop: Vec<String>,
    /// Go on after the end-of-text token.
    pub ignore_eos: bool,
    /// Report each token's log-probability under the model and the `n`
    /// most likely alternatives (Some(0): the chosen token's alone).
    pub logprobs: Option<usize>,
}

/// Why a job ended, in OpenAI's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// max_tokens reached ("length").
    Length,
    /// The end-of-text token or a stop string ("stop").
    Stop,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Length => "length",
            Finish::Stop => "stop",
        }
    }
}

/// A token's log-probability under the model (log-softmax of the raw
/// logits, before temperature and the other filters) and the most likely
/// alternatives, most likely first.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What went wrong with a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobError {
    /// The request cannot be served as given (an id outside the
    /// vocabulary, a prompt too long for the model, ...).
    Invalid(String),
    /// A fault in the engine (a panic, an error from the model).
    Internal(String),
    /// The server is shutting down.
    Shutdown,
}

impl std::fmt::Display for JobError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobError::Invalid(m) | JobError::Internal(m) => f.write_str(m),
            JobError::Shutdown => f.write_str("the server is shutting down"),
        }
    }
}

/// What a job reports, in order: `Prefilled`, then `Token`s, then
/// `Finished`; or `Failed` at any point, after which nothing comes.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The prompt has been processed; `cached_tokens` of its tokens came
    /// from the prefix cache instead of being computed.
    Prefilled {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    /// A sampled token and the text it makes final (possibly empty: part of
    /// a character, or text that might begin a stop string).
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The job is done; `text` is what was still held back.
    Finished {
        text: String,
        reason: Finish,
        completion_tokens: usize,
    },
    Failed(JobError),
}

/// Events of a request's jobs, each tagged with its job's `index`.
pub type Events = UnboundedReceiver<(usize, Event)>;

/// Why [`Engine::submit`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// The queue is full: try again later.
    Busy,
    /// The engine is shutting down or stopped.
    ShuttingDown,
}

/// Counts the engine keeps for /metrics, updated as it goes.
#[derive(Default, Debug)]
pub struct EngineCounters {
    pub queued: AtomicUsize,
    pub running: AtomicUsize,
    pub decode_steps: AtomicU64,
    /// Sequence-steps: the sum over steps of the sequences in each.
    pub decoded_tokens: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub cached_prompt_tokens: AtomicU64,
    pub jobs_finished: AtomicU64,
    pub jobs_cancelled: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub cache_entries: AtomicUsize,
    pub cache_bytes: AtomicUsize,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    /// Seconds spent in prefill and in decoding steps, as f64 bits.
    prefill_seconds: AtomicU64,
    decode_seconds: AtomicU64,
}

impl EngineCounters {
    pub fn prefill_seconds(&self) -> f64 {
        f64::from_bits(self.prefill_seconds.load(Ordering::Relaxed))
    }
    pub fn decode_seconds(&self) -> f64 {
        f64::from_bits(self.decode_seconds.load(Ordering::Relaxed))
    }
    /// Adds the time since `started` (only the engine thread writes).
    fn add_seconds_since(cell: &AtomicU64, started: Instant) {
        let now = f64::from_bits(cell.load(Ordering::Relaxed)) + started.elapsed().as_secs_f64();
        cell.store(now.to_bits(), Ordering::Relaxed);
    }
    fn publish_cache(&self, stats: CacheStats) {
        self.cache_entries.store(stats.entries, Ordering::Relaxed);
        self.cache_bytes.store(stats.bytes, Ordering::Relaxed);
        self.cache_hits.store(stats.hits, Ordering::Relaxed);
        self.cache_misses.store(stats.misses, Ordering::Relaxed);
    }
}

struct Job {
    spec: JobSpec,
    events: UnboundedSender<(usize, Event)>,
}

impl Job {
    fn send(&self, event: Event) {
        // A closed receiver means the client left; the engine notices it
        // at the top of its next turn.
        let _ = self.events.send((self.spec.index, event));
    }
}

enum Command {
    Submit(Vec<Job>),
    /// Ends every job with [`JobError::Shutdown`] and stops the thread.
    Stop,
}

/// A handle on the engine thread; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    commands: mpsc::Sender<Command>,
    accepting: Arc<AtomicBool>,
    queue_capacity: usize,
    pub counters: Arc<EngineCounters>,
    /// The tokenizer's vocabulary size, for checking ids in requests.
    vocab_size: usize,
}

impl Engine {
    /// Starts the engine thread over `model` and `tokenizer`.
    pub fn start<M>(
        model: M,
        tokenizer: Arc<Tokenizer>,
        options: EngineOptions,
    ) -> crate::Result<Self>
    where
        M: Decoder + Send + 'static,
        M::State: Clone,
    {
        if options.parallel == 0 {
            return Err(crate::error::invalid(
                "Engine",
                "parallel must be at least 1",
            ));
        }
        tokenizer.check_fits(model.vocab_rows())?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads)
            .thread_name(|i| format!("selective-compute-{i}"))
            .build()
            .map_err(|e| {
                crate::error::invalid("Engine", format!("cannot start its threads: {e}"))
            })?;
        let (commands, receiver) = mpsc::channel();
        let counters = Arc::new(EngineCounters::default());
        let accepting = Arc::new(AtomicBool::new(true));
        let engine = Self {
            commands,
            accepting: accepting.clone(),
            queue_capacity: options.queue_capacity,
            counters: counters.clone(),
            vocab_size: tokenizer.vocab_size(),
        };
        std::thread::Builder::new()
            .name("selective-engine".into())
            .spawn(move || {
                pool.install(|| {
                    let mut worker = Worker::new(&model, &tokenizer, options, counters);
                    worker.run(receiver);
                });
                accepting.store(false, Ordering::SeqCst);
            })
            .map_err(|e| {
                crate::error::invalid("Engine", format!("cannot start its thread: {e}"))
            })?;
        Ok(engine)
    }

    /// Queues a request's jobs (one per choice, sharing one event channel).
    pub fn submit(&self, specs: Vec<JobSpec>) -> Result<Events, Refused> {
        if !self.accepting.load(Ordering::SeqCst) {
            return Err(Refused::ShuttingDown);
        }
        let n = specs.len();
        let queued = self.counters.queued.fetch_add(n, Ordering::SeqCst);
        if queued + n > self.queue_capacity.max(n) {
            self.counters.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(Refused::Busy);
        }
        let (events, receiver) = unbounded_channel();
        let jobs = specs
            .into_iter()
            .map(|spec| Job {
                spec,
                events: events.clone(),
            })
            .collect();
        if self.commands.send(Command::Submit(jobs)).is_err() {
            self.counters.queued.fetch_sub(n, Ordering::SeqCst);
            return Err(Refused::ShuttingDown);
        }
        Ok(receiver)
    }

    /// Refuses new jobs from now on; running and queued jobs go on.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::SeqCst);
    }

    pub fn is_accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    /// Ends every job with [`JobError::Shutdown`] and stops the engine.
    pub fn stop(&self) {
        self.stop_accepting();
        let _ = self.commands.send(Command::Stop);
    }

    /// The vocabulary size of the tokenizer (ids in prompts must be below it).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// A job being decoded.
struct Running<'t, S> {
    job: Job,
    state: S,
    sampler: Sampler,
    text: SequenceText<&'t Tokenizer>,
    generate: GenerateOptions,
    generated: Vec<u32>,
    /// Set when the token sampled this turn ends the job.
    finish: Option<FinishReason>,
}

/// A job's prompt taken in: its state after the prompt, how many prompt
/// tokens came from the cache, and what samples and writes its tokens.
struct Started<'t, S> {
    state: S,
    cached_tokens: usize,
    sampler: Sampler,
    text: SequenceText<&'t Tokenizer>,
    generate: GenerateOptions,
}

impl<'t, S> Started<'t, S> {
    fn into_running(self, job: Job) -> Running<'t, S> {
        Running {
            job,
            state: self.state,
            sampler: self.sampler,
            text: self.text,
            generate: self.generate,
            generated: Vec::new(),
            finish: None,
        }
    }
}

struct Worker<'a, M: Decoder> {
    model: &'a M,
    tokenizer: &'a Tokenizer,
    options: EngineOptions,
    counters: Arc<EngineCounters>,
    cache: PrefixCache<M::State>,
    waiting: VecDeque<Job>,
    running: Vec<Running<'a, M::State>>,
    buffers: M::Buffers,
}

impl<'a, M> Worker<'a, M>
where
    M: Decoder,
    M::State: Clone,
{
    fn new(
        model: &'a M,
        tokenizer: &'a Tokenizer,
        options: EngineOptions,
        counters: Arc<EngineCounters>,
    ) -> Self {
        Self {
            model,
            tokenizer,
            cache: PrefixCache::new(options.cache_bytes),
            buffers: model.new_buffers(options.parallel),
            options,
            counters,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    fn run(&mut self, commands: mpsc::Receiver<Command>) {
        loop {
            // 1. new jobs; block while idle
            if self.running.is_empty() && self.waiting.is_empty() {
                match commands.recv() {
                    Ok(command) => {
                        if !self.take(command) {
                            return self.fail_all(JobError::Shutdown);
                        }
                    }
                    Err(_) => return,
                }
            }
            while let Ok(command) = commands.try_recv() {
                if !self.take(command) {
                    return self.fail_all(JobError::Shutdown);
                }
            }
            self.drop_cancelled();
            // 2. admit
            while self.running.len() < self.options.parallel {
                let Some(job) = self.waiting.pop_front() else {
                    break;
                };
                self.counters.queued.fetch_sub(1, Ordering::SeqCst);
                self.admit(job);
            }
            self.counters
                .running
                .store(self.running.len(), Ordering::Relaxed);
            if self.running.is_empty() {
                continue;
            }
            // 3. sample; 4. feed; 5. retire
            self.sample_all();
            self.decode_step();
            self.retire_finished();
            self.counters.publish_cache(self.cache.stats());
        }
    }

    /// Takes a command; false when it is the order to stop.
    fn take(&mut self, command: Command) -> bool {
        match command {
            Command::Submit(jobs) => {
                self.waiting.extend(jobs);
                true
            }
            Command::Stop => false,
        }
    }

    fn drop_cancelled(&mut self) {
        let before = self.running.len() + self.waiting.len();
        let waiting_before = self.waiting.len();
        self.waiting.retain(|job| !job.events.is_closed());
        self.counters
            .queued
            .fetch_sub(waiting_before - self.waiting.len(), Ordering::SeqCst);
        self.running.retain(|r| !r.job.events.is_closed());
        let gone = before - self.running.len() - self.waiting.len();
        self.counters
            .jobs_cancelled
            .fetch_add(gone as u64, Ordering::Relaxed);
    }

    fn fail_all(&mut self, error: JobError) {
        let n = self.waiting.len();
        self.counters.queued.fetch_sub(n, Ordering::SeqCst);
        for job in self.waiting.drain(..) {
            job.send(Event::Failed(error.clone()));
        }
        for r in self.running.drain(..) {
            r.job.send(Event::Failed(error.clone()));
        }
        self.counters.running.store(0, Ordering::Relaxed);
    }

    fn fail(&self, job: &Job, error: JobError) {
        self.counters.jobs_failed.fetch_add(1, Ordering::Relaxed);
        job.send(Event::Failed(error));
    }

    /// Starts a job: its state after the prompt, from the cache and prefill.
    fn admit(&mut self, job: Job) {
        let started = Instant::now();
        let admitted = catch_unwind(AssertUnwindSafe(|| self.start(&job.spec)));
        EngineCounters::add_seconds_since(&self.counters.prefill_seconds, started);
        match admitted {
            Ok(Ok(started)) => {
                let spec = &job.spec;
                let cached = started.cached_tokens;
                self.counters
                    .prompt_tokens
                    .fetch_add(spec.prompt.len() as u64, Ordering::Relaxed);
                self.counters
                    .cached_prompt_tokens
                    .fetch_add(cached as u64, Ordering::Relaxed);
                job.send(Event::Prefilled {
                    prompt_tokens: spec.prompt.len(),
                    cached_tokens: cached,
                });
                if spec.max_tokens == 0 {
                    self.counters.jobs_finished.fetch_add(1, Ordering::Relaxed);
                    job.send(Event::Finished {
                        text: String::new(),
                        reason: Finish::Length,
                        completion_tokens: 0,
                    });
                    return;
                }
                self.running.push(started.into_running(job));
            }
            Ok(Err(error)) => self.fail(&job, JobError::Invalid(error.to_string())),
            Err(panic) => self.fail(&job, internal_from_panic("prefill", panic)),
        }
    }

    /// Takes in a job's prompt: from the longest cached prefix, then
    /// prefill of the rest (whose state the cache keeps).
    fn start(&mut self, spec: &JobSpec) -> crate::Result<Started<'a, M::State>> {
        let generate = options_for(
            self.model,
            Some(self.tokenizer),
            spec.max_tokens,
            spec.sampling.clone(),
            spec.ignore_eos,
        )?;
        let sampler = Sampler::new(spec.sampling.clone())?;
        let text = SequenceText::new(self.tokenizer, &spec.stop, generate.eos)?;
        if spec.prompt.is_empty() {
            return Err(crate::error::invalid(
                "prompt",
                "is empty: give at least one token",
            ));
        }
        let (cached, mut state) = match self.cache.longest_prefix(&spec.prompt) {
            Some((len, state)) => (len, state),
            None => (0, self.model.new_state()),
        };
        if cached < spec.prompt.len() {
            self.model.prefill(&mut state, &spec.prompt[cached..])?;
            let bytes = state_bytes(&state);
            self.cache.insert(&spec.prompt, state.clone(), bytes);
        }
        Ok(Started {
            state,
            cached_tokens: cached,
            sampler,
            text,
            generate,
        })
    }

    /// Samples each running job's next token and sends its text.
    fn sample_all(&mut self) {
        let mut failed = Vec::new();
        for (i, r) in self.running.iter_mut().enumerate() {
            match catch_unwind(AssertUnwindSafe(|| sample_one(r))) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failed.push((i, JobError::Internal(e.to_string()))),
                Err(panic) => failed.push((i, internal_from_panic("sampling", panic))),
            }
        }
        for (i, error) in failed.into_iter().rev() {
            let r = self.running.remove(i);
            self.fail(&r.job, error);
        }
    }

    /// Feeds every running job its sampled token in one step.
    fn decode_step(&mut self) {
        let started = Instant::now();
        let tokens: Vec<u32> = self
            .running
            .iter()
            .map(|r| *r.generated.last().expect("sampled this turn"))
            .collect();
        let model = self.model;
        let buffers = &mut self.buffers;
        let running = &mut self.running;
        let result = catch_unwind(AssertUnwindSafe(|| {
            let mut states: Vec<&mut M::State> = running.iter_mut().map(|r| &mut r.state).collect();
            model.decode_step(&mut states, &tokens, buffers)
        }));
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(JobError::Internal(e.to_string())),
            Err(panic) => Some(internal_from_panic("decoding", panic)),
        };
        EngineCounters::add_seconds_since(&self.counters.decode_seconds, started);
        self.counters.decode_steps.fetch_add(1, Ordering::Relaxed);
        self.counters
            .decoded_tokens
            .fetch_add(tokens.len() as u64, Ordering::Relaxed);
        if let Some(error) = error {
            // Every state in the step may be half updated.
            for r in std::mem::take(&mut self.running) {
                self.fail(&r.job, error.clone());
            }
        }
    }

    fn retire_finished(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let Some(reason) = self.running[i].finish else {
                i += 1;
                continue;
            };
            // remove, not swap_remove: the batch keeps the arrival order
            let mut r = self.running.remove(i);
            let rest = match catch_unwind(AssertUnwindSafe(|| r.text.finish(reason))) {
                Ok(Ok(rest)) => rest,
                Ok(Err(e)) => {
                    self.fail(&r.job, JobError::Internal(e.to_string()));
                    continue;
                }
                Err(panic) => {
                    self.fail(&r.job, internal_from_panic("detokenising", panic));
                    continue;
                }
            };
            let mut tokens = r.job.spec.prompt.clone();
            tokens.extend_from_slice(&r.generated);
            let bytes = state_bytes(&r.state);
            self.counters.jobs_finished.fetch_add(1, Ordering::Relaxed);
            r.job.send(Event::Finished {
                text: rest,
                reason: match reason {
                    FinishReason::MaxTokens => Finish::Length,
                    FinishReason::Eos | FinishReason::Stopped => Finish::Stop,
                },
                completion_tokens: r.generated.len(),
            });
            self.cache.insert(&tokens, r.state, bytes);
        }
    }
}

/// Samples one job's next token, as [`crate::generate::generate`] does for
/// one sequence, and sends its text.
fn sample_one<S: DecodingState>(r: &mut Running<'_, S>) -> crate::Result<()> {
    let (logits, recent) = r.state.logits_and_recent();
    let token = match r.generate.vocab_size {
        Some(vocab) => r.sampler.sample_within(logits, recent, vocab),
        None => r.sampler.sample(logits, recent),
    }?;
    let logprobs = r
        .job
        .spec
        .logprobs
        .map(|top| token_logprobs(logits, r.generate.vocab_size, token, top));
    r.generated.push(token);
    let released = r.text.push(token)?;
    r.finish = if r.generate.eos == Some(token) {
        Some(FinishReason::Eos)
    } else if released.stopped {
        Some(FinishReason::Stopped)
    } else if r.generated.len() >= r.generate.max_new_tokens {
        Some(FinishReason::MaxTokens)
    } else {
        None
    };
    r.job.send(Event::Token {
        id: token,
        text: released.text,
        logprobs,
    });
    Ok(())
}

/// log-softmax of `logits[..vocab]` at `token`, and the `top` most likely
/// ids with theirs.
pub fn token_logprobs(
    logits: &[f32],
    vocab: Option<usize>,
    token: u32,
    top: usize,
) -> TokenLogprobs {
    let logits = &logits[..vocab.unwrap_or(logits.len()).min(logits.len())];
    let max = logits
        .iter()
        .fold(f64::NEG_INFINITY, |m, &x| m.max(x as f64));
    let sum: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let log_z = max + sum.ln();
    let logprob_of = |id: usize| (logits[id] as f64 - log_z) as f32;
    let mut ids: Vec<usize> = (0..logits.len()).collect();
    let top = top.min(ids.len());
    if top > 0 && top < ids.len() {
        ids.select_nth_unstable_by(top - 1, |&a, &b| logits[b].total_cmp(&logits[a]));
    }
    ids.truncate(top);
    ids.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    TokenLogprobs {
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |_| logprob_of(token as usize)),
        top: ids
            .into_iter()
            .map(|id| (id as u32, logprob_of(id)))
            .collect(),
    }
}

/// Bytes a cached state takes: its context and its logits.
fn state_bytes<S: DecodingState>(state: &S) -> usize {
    state.context_bytes() + std::mem::size_of_val(state.logits())
}

/// The text a panic carries (a `&str` or a `String`; other payloads have none).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

fn internal_from_panic(what: &str, panic: Box<dyn std::any::Any + Send>) -> JobError {
    let message = panic_message(&*panic);
    eprintln!("selective serve: a panic during {what} was caught: {message}");
    JobError::Internal(format!("internal error during {what}: {message}"))
}
