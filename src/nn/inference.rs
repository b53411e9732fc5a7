//! Inference (docs/DESIGN.md §9): parallel prefill, then constant-memory
//! recurrent decoding, with weights in any [`WeightFormat`] and f32
//! arithmetic.
//!
//! Per sequence and layer the state is fixed in size:
//!
//! ```text
//! conv_state  (E, K)   the last K pre-conv inputs x (zero padded)
//! ssm_state   (E, N)   h
//! ```
//!
//! Prefill runs a prompt through the parallel path (matrix multiplications
//! over all positions, the fused scan) in chunks of `prefill_chunk`
//! positions, each continuing from the state the previous one left, and
//! computes the vocabulary head only for the last position. A decoding step
//! for a batch of sequences is
//!
//! ```text
//! h = E[token]                                        (b, D)
//! per layer:  xz = norm(h) W_inᵀ                      (b, 2E)
//!             conv_state ← shift(conv_state, x);  xs = silu(W_conv · conv_state + b_conv)
//!             dt_low, B, C = xs W_xᵀ                   (b, R), (b, N), (b, N)
//!             delta = dt_low W_dtᵀ                     (b, E)
//!             ssm_state ← exp(ΔA) ssm_state + ΔB xs;   y = (C · ssm_state + D xs) silu(z)
//!             h += y W_outᵀ                            (b, D)
//! logits = norm_f(h) headᵀ                            (b, V)
//! ```
//! whose cost does not depend on the position.

use super::block::{
    add_row_bias, norm_forward, normalize_dt_b_c, Block, BlockStateMut, ChunkBuffers, Conv, Linear,
    Mixer, Ssd, StepBuffers, Values, S6,
};
use super::config::MambaConfig;
use super::lm::Mamba;
use super::params::LayerParams;
use crate::error::{invalid, Error, Result};
use crate::kernels::{WeightFormat, Weights};
use crate::nn::decoder::{remember_tokens, Decoder, DecodingState};

/// Positions prefilled at once: large enough for the GEMM to run at full
/// speed, small enough that activations stay a few tens of MB at any
/// prompt length.
pub const DEFAULT_PREFILL_CHUNK: usize = 2048;

/// How many of the most recent tokens a [`Sequence`] remembers (for the
/// repetition penalty); fixed so that a saved state has a fixed size.
pub const RECENT_TOKENS: usize = 1024;

/// One layer's weights for inference.
struct InferenceLayer {
    norm_weight: Vec<f32>,
    norm_bias: Option<Vec<f32>>,
    /// (2E, D)
    in_proj: Weights,
    in_proj_bias: Option<Vec<f32>>,
    /// (E, K)
    conv_weight: Vec<f32>,
    conv_bias: Option<Vec<f32>>,
    /// (R + 2N, E); None for Mamba-2
    x_proj: Option<Weights>,
    /// (E, R); None for Mamba-2
    dt_proj: Option<Weights>,
    /// (E); Mamba-2 (H)
    dt_bias: Vec<f32>,
    /// A = -exp(A_log) (E, N), computed once; Mamba-2 (H)
    a: Vec<f32>,
    /// (E); Mamba-2 (H)
    d: Vec<f32>,
    /// Mamba-2's gated norm weight (E)
    gated_norm_weight: Option<Vec<f32>>,
    /// (D, E)
    out_proj: Weights,
    out_proj_bias: Option<Vec<f32>>,
}

/// A Mamba language model prepared for generation: projection and
/// embedding weights in one [`WeightFormat`], SSM parameters (A, D, dt bias,
/// conv) and norms in f32.
pub struct InferenceModel {
    pub config: MambaConfig,
    format: WeightFormat,
    /// (V, D), also the head when tied
    embedding: Weights,
    lm_head: Option<Weights>,
    norm_f_weight: Vec<f32>,
    norm_f_bias: Option<Vec<f32>>,
    layers: Vec<InferenceLayer>,
    /// Positions per prefill chunk.
    pub prefill_chunk: usize,
}

/// The recurrent state of one layer for one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerState {
    /// (E, K)
    pub conv: Vec<f32>,
    /// (E, N)
    pub ssm: Vec<f32>,
}

/// Everything needed to continue one sequence: the layers' states, the
/// logits for its next token, and its most recent tokens. Its size does not
/// depend on the sequence length.
#[derive(Clone, Debug, PartialEq)]
pub struct Sequence {
    pub layers: Vec<LayerState>,
    /// Logits (V) predicting the next token; empty before any token.
    pub logits: Vec<f32>,
    /// Tokens processed so far.
    pub position: u64,
    /// The last up to [`RECENT_TOKENS`] tokens, oldest first.
    pub recent: std::collections::VecDeque<u32>,
}

impl Sequence {
    /// An empty sequence (zero states) for `config`.
    pub fn new(config: &MambaConfig) -> Self {
        let (e, n, k) = (config.conv_channels(), config.d_state, config.d_conv);
        // the SSM state: (E, N) for Mamba-1, (H, P, N) = E·N values for Mamba-2
        let ssm = config.d_inner * n;
        Self {
            layers: (0..config.n_layer)
                .map(|_| LayerState {
                    conv: vec![0.0; e * k],
                    ssm: vec![0.0; ssm],
                })
                .collect(),
            logits: Vec::new(),
            position: 0,
            recent: std::collections::VecDeque::with_capacity(RECENT_TOKENS),
        }
    }

    fn remember(&mut self, ids: &[u32]) {
        remember_tokens(&mut self.recent, RECENT_TOKENS, ids);
        self.position += ids.len() as u64;
    }

    /// The recent tokens as one slice, oldest first.
    pub fn recent_tokens(&mut self) -> &[u32] {
        self.recent.make_contiguous()
    }

    /// Checks that this state belongs to a model of `config`.
    pub fn check_fits(&self, config: &MambaConfig) -> Result<()> {
        let (e, n, k) = (config.d_inner, config.d_state, config.d_conv);
        let channels = config.conv_channels();
        let fits = self.layers.len() == config.n_layer
            && self
                .layers
                .iter()
                .all(|l| l.conv.len() == channels * k && l.ssm.len() == e * n)
            && (self.logits.is_empty() || self.logits.len() == config.vocab_size);
        if fits {
            Ok(())
        } else {
            Err(invalid(
                "Sequence",
                format!(
                    "this state does not fit the model (n_layer={}, d_inner={e}, d_state={n}, d_conv={k}, vocab={})",
                    config.n_layer, config.vocab_size
                ),
            ))
        }
    }
}

/// Working memory of a decoding step for up to `batch` sequences, reused
/// from step to step.
pub struct DecodeBuffers {
    batch: usize,
    /// residual stream (b, D)
    h: Vec<f32>,
    /// the block's step buffers
    step: StepBuffers<f32>,
    /// (b, V)
    logits: Vec<f32>,
}

impl DecodeBuffers {
    pub fn new(config: &MambaConfig, batch: usize) -> Self {
        Self {
            batch,
            h: vec![0.0; batch * config.d_model],
            step: StepBuffers::new(&config.block_shape(), batch),
            logits: vec![0.0; batch * config.vocab_size],
        }
    }

    /// Whether these buffers were made for `config`'s sizes.
    fn fit(&self, config: &MambaConfig) -> bool {
        let s = &self.step;
        let (b, d, e) = (self.batch, config.d_model, config.d_inner);
        self.h.len() == b * config.d_model
            && self.logits.len() == b * config.vocab_size
            && s.normed.len() == b * d
            && s.xz.len() == b * config.in_proj_rows()
            && s.v.len() == b * config.conv_channels()
            && s.x_dbl.len() == b * (config.dt_rank + 2 * config.d_state)
            && s.dt_low.len() == b * config.dt_rank
            && s.delta.len() == b * e
            && s.y.len() == b * e
    }
}

impl InferenceLayer {
    /// This layer as a [`Block`] over its inference weights.
    fn block(&self, config: &MambaConfig) -> Block<'_, f32, &Weights> {
        let mixer = match (&self.x_proj, &self.dt_proj, &self.gated_norm_weight) {
            (Some(x_proj), Some(dt_proj), _) => Mixer::S6(S6 {
                x_proj,
                dt_proj,
                dt_bias: &self.dt_bias,
                a: Values::Borrowed(&self.a),
                d: &self.d,
                dt_bc_rms_eps: config.dt_bc_rms_eps,
            }),
            (_, _, norm) => Mixer::Ssd(Ssd {
                dt_bias: &self.dt_bias,
                a: Values::Borrowed(&self.a),
                d: &self.d,
                // from_mamba made it for every Mamba-2 layer (and validate
                // refuses an empty one)
                norm_weight: norm.as_deref().unwrap_or(&[]),
            }),
        };
        Block {
            shape: config.block_shape(),
            norm_weight: &self.norm_weight,
            norm_bias: self.norm_bias.as_deref(),
            in_proj: &self.in_proj,
            in_proj_bias: self.in_proj_bias.as_deref(),
            conv: Some(Conv {
                weight: &self.conv_weight,
                bias: self.conv_bias.as_deref(),
            }),
            mixer,
            out_proj: &self.out_proj,
            out_proj_bias: self.out_proj_bias.as_deref(),
        }
    }
}

/// Keeps the first error of a thread of the decoding team: it goes on
/// through every barrier so that no other thread waits forever.
fn keep_first(first: &mut Option<Error>, result: Result<()>) {
    if let Err(e) = result {
        first.get_or_insert(e);
    }
}

impl InferenceModel {
    /// Converts a loaded model, layer by layer (each layer's f32 copy is
    /// freed as soon as it is converted, so memory peaks near the f32 model).
    pub fn from_mamba(model: Mamba<f32>, format: WeightFormat) -> Result<Self> {
        let Mamba { config, params } = model;
        let c = &config;
        let (d, e, r, n, v) = (c.d_model, c.d_inner, c.dt_rank, c.d_state, c.vocab_size);
        let mut layers = Vec::with_capacity(c.n_layer);
        let mamba1 = c.ssd.is_none();
        for layer in params.layers {
            let LayerParams {
                norm_weight,
                norm_bias,
                mixer: m,
            } = layer;
            layers.push(InferenceLayer {
                norm_weight,
                norm_bias,
                in_proj: Weights::from_f32(format, c.in_proj_rows(), d, &m.in_proj_weight)?,
                in_proj_bias: m.in_proj_bias,
                conv_weight: m.conv1d_weight,
                conv_bias: m.conv1d_bias,
                x_proj: mamba1
                    .then(|| Weights::from_f32(format, r + 2 * n, e, &m.x_proj_weight))
                    .transpose()?,
                dt_proj: mamba1
                    .then(|| Weights::from_f32(format, e, r, &m.dt_proj_weight))
                    .transpose()?,
                dt_bias: m.dt_proj_bias,
                a: m.a_log.iter().map(|&v| -v.exp()).collect(),
                d: m.d,
                gated_norm_weight: m.norm_weight,
                out_proj: Weights::from_f32(format, d, e, &m.out_proj_weight)?,
                out_proj_bias: m.out_proj_bias,
            });
            // the layer's f32 projections are freed here; hand their memory
            // back before the next layer maps its own, so that the peak stays
            // near the f32 model
            crate::kernels::huge_pages::release_free_heap_memory();
        }
        for layer in &layers {
            layer.block(c).validate()?;
        }
        let embedding = Weights::from_f32(format, v, d, &params.embedding)?;
        drop(params.embedding);
        let lm_head = params
            .lm_head
            .map(|w| Weights::from_f32(format, v, d, &w))
            .transpose()?;
        crate::kernels::huge_pages::release_free_heap_memory();
        Ok(Self {
            config,
            format,
            embedding,
            lm_head,
            norm_f_weight: params.norm_f_weight,
            norm_f_bias: params.norm_f_bias,
            layers,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        })
    }

    pub fn format(&self) -> WeightFormat {
        self.format
    }

    /// Bytes of weights one decoding step reads: every projection, the head
    /// (the embedding, when tied), the norms and the SSM parameters; the
    /// embedding rows looked up are negligible.
    pub fn bytes_per_token(&self) -> usize {
        let f32_bytes = |v: &[f32]| v.len() * 4;
        let opt = |v: &Option<Vec<f32>>| v.as_deref().map_or(0, f32_bytes);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                f32_bytes(&l.norm_weight)
                    + opt(&l.norm_bias)
                    + l.in_proj.bytes()
                    + opt(&l.in_proj_bias)
                    + f32_bytes(&l.conv_weight)
                    + opt(&l.conv_bias)
                    + l.x_proj.as_ref().map_or(0, Weights::bytes)
                    + l.dt_proj.as_ref().map_or(0, Weights::bytes)
                    + opt(&l.gated_norm_weight)
                    + f32_bytes(&l.dt_bias)
                    + f32_bytes(&l.a)
                    + f32_bytes(&l.d)
                    + l.out_proj.bytes()
                    + opt(&l.out_proj_bias)
            })
            .sum();
        layers + self.head().bytes() + f32_bytes(&self.norm_f_weight) + opt(&self.norm_f_bias)
    }

    fn head(&self) -> &Weights {
        self.lm_head.as_ref().unwrap_or(&self.embedding)
    }

    fn check_ids(&self, op: &'static str, ids: &[u32]) -> Result<()> {
        let v = self.config.vocab_size;
        match ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            Some((i, id)) => Err(invalid(
                op,
                format!("token id {id} at position {i} is outside the vocabulary of {v}"),
            )),
            None => Ok(()),
        }
    }

    /// norm_f(h)  (rows, D)
    fn norm_f(&self, h: &[f32], y: &mut [f32]) -> Result<()> {
        let (w, b) = (&self.norm_f_weight, self.norm_f_bias.as_deref());
        norm_forward(h, w, b, self.config.norm_eps, y)
    }

    /// Runs `ids` through the model after what `seq` has seen, leaving the
    /// state after the last of them in `seq` and its next-token logits in
    /// `seq.logits`.
    pub fn prefill(&self, seq: &mut Sequence, ids: &[u32]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut last_hidden = Vec::new();
        self.prefill_with(seq, ids, |_, normed| {
            let d = self.config.d_model;
            last_hidden.clear();
            last_hidden.extend_from_slice(&normed[normed.len() - d..]);
            Ok(())
        })?;
        seq.logits.resize(self.config.vocab_size, 0.0);
        self.head()
            .matmul_xwt(&last_hidden, 1, &mut seq.logits, false)
    }

    /// Prefill that hands norm_f(h) of every chunk (rows, D) to `on_chunk`
    /// with the position of its first row.
    fn prefill_with(
        &self,
        seq: &mut Sequence,
        ids: &[u32],
        mut on_chunk: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        const OP: &str = "InferenceModel::prefill";
        self.check_ids(OP, ids)?;
        seq.check_fits(&self.config)?;
        if self.prefill_chunk == 0 {
            return Err(invalid(OP, "prefill_chunk must be at least 1"));
        }
        let d = self.config.d_model;
        let mut bufs = ChunkBuffers::default();
        let mut normed = Vec::new();
        for (chunk_index, chunk) in ids.chunks(self.prefill_chunk).enumerate() {
            let len = chunk.len();
            // h = E[ids]  (L, D)
            let mut h = vec![0.0f32; len * d];
            for (row, &id) in h.chunks_mut(d).zip(chunk) {
                self.embedding.row_to_f32(id as usize, row)?;
            }
            for (layer, state) in self.layers.iter().zip(seq.layers.iter_mut()) {
                let state = BlockStateMut {
                    conv: &mut state.conv,
                    ssm: &mut state.ssm,
                };
                layer
                    .block(&self.config)
                    .forward(&mut h, 1, len, Some(state), &mut bufs, false)?;
            }
            normed.resize(len * d, 0.0);
            self.norm_f(&h, &mut normed)?;
            on_chunk(chunk_index * self.prefill_chunk, &normed)?;
        }
        seq.remember(ids);
        Ok(())
    }

    /// One decoding step for a batch of sequences: feeds `tokens[i]` to
    /// `seqs[i]` and leaves its next-token logits in `seqs[i].logits`.
    pub fn decode_step(
        &self,
        seqs: &mut [&mut Sequence],
        tokens: &[u32],
        buffers: &mut DecodeBuffers,
    ) -> Result<()> {
        const OP: &str = "InferenceModel::decode_step";
        let b = seqs.len();
        if b == 0 || tokens.len() != b {
            return Err(invalid(
                OP,
                format!("{} tokens for {} sequences", tokens.len(), b),
            ));
        }
        if b > buffers.batch {
            return Err(invalid(
                OP,
                format!("{b} sequences but buffers for {}", buffers.batch),
            ));
        }
        self.check_ids(OP, tokens)?;
        for seq in seqs.iter() {
            seq.check_fits(&self.config)?;
        }
        if !buffers.fit(&self.config) {
            return Err(invalid(OP, "the buffers were made for another model"));
        }
        if b == 1 && rayon::current_num_threads() > 1 {
            return self.decode_one_with_team(&mut *seqs[0], tokens[0], buffers);
        }
        let (d, v) = (self.config.d_model, self.config.vocab_size);
        let buf = buffers;
        let h = &mut buf.h[..b * d];
        for (row, &id) in h.chunks_mut(d).zip(tokens) {
            self.embedding.row_to_f32(id as usize, row)?;
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let mut states: Vec<BlockStateMut<'_, f32>> = seqs
                .iter_mut()
                .map(|seq| {
                    let l = &mut seq.layers[li];
                    BlockStateMut {
                        conv: &mut l.conv,
                        ssm: &mut l.ssm,
                    }
                })
                .collect();
            layer
                .block(&self.config)
                .step(h, &mut states, &mut buf.step)?;
        }
        let normed = &mut buf.step.normed[..b * d];
        self.norm_f(h, normed)?;
        let logits = &mut buf.logits[..b * v];
        self.head().matmul_xwt(normed, b, logits, false)?;
        for ((seq, row), &token) in seqs.iter_mut().zip(logits.chunks(v)).zip(tokens) {
            seq.logits.clear();
            seq.logits.extend_from_slice(row);
            seq.remember(&[token]);
        }
        Ok(())
    }

    /// The decoding step of one sequence on a team of all the pool's
    /// threads that stays together for the whole step: each thread owns a
    /// fixed share of every projection's output rows (and of the channels
    /// or heads after them) and the threads meet at a barrier between the
    /// phases that read what others wrote. One pool call per token instead
    /// of one per projection: decoding reads every weight once and is bound
    /// by memory, and each of the ~100 small pool calls per token cost a
    /// start-up and a new short stream for the prefetchers.
    ///
    /// Per layer, thread t of T (E, D, H and the head split into T ranges).
    /// Mamba (in_proj rows [x, z]):
    /// ```text
    /// normed = norm(h)                           every thread, its own copy (D)
    /// xz[x, z of channels_t] = in_proj rows; conv step + silu of channels_t
    /// ── barrier ──
    /// x_dbl[rows_t] = x_proj rows                (R + 2N)
    /// ── barrier ──
    /// delta[channels_t] = dt_proj rows; scan step of channels_t → y[channels_t]
    /// ── barrier ──
    /// h[model rows_t] += out_proj rows · y
    /// ── barrier ──
    /// ```
    /// Mamba-2 (in_proj rows [z, xBC, dt]; x_proj's phase has no work):
    /// ```text
    /// normed = norm(h)
    /// zxbcdt[z of channels_t, xBC of conv channels_t, dt of heads_t] = in_proj rows;
    ///     conv step + silu of conv channels_t → x, B, C
    /// ── barrier ──
    /// SSD step of heads_t; g[heads_t] = y ⊙ silu(z)
    /// ── barrier ──
    /// v = gated_norm(g)                          every thread, its own copy (E)
    /// h[model rows_t] += out_proj rows · v
    /// ── barrier ──
    /// ```
    ///
    /// Everything that could fail is checked before the team starts (the
    /// token, the state and buffer sizes, the blocks' shapes at
    /// construction); should a phase fail anyway, its thread keeps the
    /// error and still meets every barrier.
    fn decode_one_with_team(
        &self,
        seq: &mut Sequence,
        token: u32,
        buffers: &mut DecodeBuffers,
    ) -> Result<()> {
        use crate::kernels::shared::SharedMut;
        let c = &self.config;
        let (d, e, r, n, k, v) = (
            c.d_model,
            c.d_inner,
            c.dt_rank,
            c.d_state,
            c.d_conv,
            c.vocab_size,
        );
        let (in_rows, channels, heads) = (c.in_proj_rows(), c.conv_channels(), c.heads());
        let head_dim = c.ssd.map_or(1, |s| s.head_dim);
        // Where in an in_proj row the convolution's input starts (x for
        // Mamba, xBC for Mamba-2), and the other row ranges each thread
        // computes a share of: (start, rows, alignment of a share).
        let (conv_at, other_rows): (usize, &[(usize, usize, usize)]) = match c.ssd {
            None => (0, &[(e, e, 16)]),
            Some(_) => (e, &[(0, e, 16), (e + channels, heads, 1)]),
        };
        let x_dbl_len = r + 2 * n;
        let buf = buffers;
        self.embedding.row_to_f32(token as usize, &mut buf.h[..d])?;
        let threads = rayon::current_num_threads();
        // [start, end) of thread t's share of `total`, in multiples of `align`.
        let share = move |total: usize, t: usize, align: usize| -> (usize, usize) {
            let per = total.div_ceil(threads).next_multiple_of(align);
            ((t * per).min(total), ((t + 1) * per).min(total))
        };
        let barrier = SpinBarrier::new(threads);
        let blocks: Vec<Block<'_, f32, &Weights>> =
            self.layers.iter().map(|l| l.block(c)).collect();
        let step = &mut buf.step;
        let h = SharedMut::new(&mut buf.h[..d]);
        let xz = SharedMut::new(&mut step.xz[..in_rows]);
        let xs = SharedMut::new(&mut step.v[..channels]);
        let x_dbl = SharedMut::new(&mut step.x_dbl[..x_dbl_len]);
        let delta = SharedMut::new(&mut step.delta[..e]);
        let y = SharedMut::new(&mut step.y[..e]);
        let logits = SharedMut::new(&mut buf.logits[..v]);
        let states: Vec<(SharedMut<'_, f32>, SharedMut<'_, f32>)> = seq
            .layers
            .iter_mut()
            .map(|l| (SharedMut::new(&mut l.conv), SharedMut::new(&mut l.ssm)))
            .collect();
        let errors: Vec<Option<Error>> = rayon::broadcast(|ctx| -> Option<Error> {
            let t = ctx.index();
            let (c0, c1) = share(channels, t, 16);
            let (m0, m1) = share(d, t, 16);
            let (p0, p1) = share(x_dbl_len, t, 1);
            let (h0, h1) = share(heads, t, 1);
            let mut normed = vec![0.0f32; d];
            let mut row_copy = vec![0.0f32; x_dbl_len];
            let mut gated = vec![0.0f32; if heads > 0 { e } else { 0 }];
            let mut failed = None;
            // SAFETY (every `slice` below): a thread writes only its own
            // ranges [c0, c1), [m0, m1), [p0, p1), heads [h0, h1) and its
            // shares of `other_rows` in the shared buffers, and reads other
            // threads' ranges only after the barrier that follows their
            // writes.
            for (block, (conv, ssm)) in blocks.iter().zip(&states) {
                let h_all = unsafe { h.read(0, d) };
                keep_first(&mut failed, block.norm(h_all, &mut normed));
                // in_proj rows of this thread's conv channels, then the conv step + silu
                if c1 > c0 {
                    let rows = unsafe { xz.slice(conv_at + c0, c1 - c0) };
                    keep_first(
                        &mut failed,
                        block
                            .in_proj
                            .forward_rows(&normed, conv_at + c0, rows, false),
                    );
                    if let Some(bias) = block.in_proj_bias {
                        add_row_bias(rows, &bias[conv_at + c0..conv_at + c1]);
                    }
                    let conv_t = unsafe { conv.slice(c0 * k, (c1 - c0) * k) };
                    let xs_t = unsafe { xs.slice(c0, c1 - c0) };
                    keep_first(&mut failed, block.step_conv(c0, rows, conv_t, xs_t));
                }
                // the rest of in_proj's rows (z; and dt of Mamba-2)
                for &(at, total, align) in other_rows {
                    let (s0, s1) = share(total, t, align);
                    if s1 > s0 {
                        let rows = unsafe { xz.slice(at + s0, s1 - s0) };
                        keep_first(
                            &mut failed,
                            block.in_proj.forward_rows(&normed, at + s0, rows, false),
                        );
                        if let Some(bias) = block.in_proj_bias {
                            add_row_bias(rows, &bias[at + s0..at + s1]);
                        }
                    }
                }
                barrier.wait();
                let xs_all = unsafe { xs.read(0, channels) };
                match &block.mixer {
                    Mixer::S6(s6) => {
                        // x_dbl[rows_t] = x_proj rows
                        let out = unsafe { x_dbl.slice(p0, p1 - p0) };
                        keep_first(&mut failed, s6.x_proj.forward_rows(xs_all, p0, out, false));
                        barrier.wait();
                        // delta[channels_t] = dt_proj rows; scan step → y[channels_t]
                        if c1 > c0 {
                            let shared_row = unsafe { x_dbl.read(0, x_dbl_len) };
                            let delta_t = unsafe { delta.slice(c0, c1 - c0) };
                            // Falcon-Mamba: this thread's own normalised copy of the row
                            let row: &[f32] = match s6.dt_bc_rms_eps {
                                None => shared_row,
                                Some(eps) => {
                                    row_copy.copy_from_slice(shared_row);
                                    normalize_dt_b_c(&mut row_copy, r, n, eps);
                                    &row_copy
                                }
                            };
                            keep_first(
                                &mut failed,
                                s6.dt_proj.forward_rows(&row[..r], c0, delta_t, false),
                            );
                            let z = unsafe { xz.read(e + c0, c1 - c0) };
                            let ssm_t = unsafe { ssm.slice(c0 * n, (c1 - c0) * n) };
                            let y_t = unsafe { y.slice(c0, c1 - c0) };
                            let scanned = block.step_scan(
                                c0,
                                row,
                                &xs_all[c0..c1],
                                Some(z),
                                delta_t,
                                ssm_t,
                                y_t,
                            );
                            keep_first(&mut failed, scanned);
                        }
                    }
                    Mixer::Ssd(ssd) => {
                        // SSD step of heads_t, gated: g[heads_t]
                        if h1 > h0 {
                            let row = unsafe { xz.read(0, in_rows) };
                            let per_head = head_dim * n;
                            let ssm_t = unsafe { ssm.slice(h0 * per_head, (h1 - h0) * per_head) };
                            let g_t = unsafe { y.slice(h0 * head_dim, (h1 - h0) * head_dim) };
                            let stepped =
                                block.step_ssd_heads(ssd, h0..h1, row, xs_all, ssm_t, g_t);
                            keep_first(&mut failed, stepped);
                        }
                    }
                    Mixer::S4d(_) => keep_first(
                        &mut failed,
                        Err(invalid(
                            "InferenceModel::decode_step",
                            "an S4D layer has no team step",
                        )),
                    ),
                }
                barrier.wait();
                // h[model rows_t] += out_proj rows · y (Mamba-2: · gated_norm(g))
                if m1 > m0 {
                    let y_all = unsafe { y.read(0, e) };
                    let read: &[f32] = match &block.mixer {
                        Mixer::Ssd(ssd) => {
                            gated.copy_from_slice(y_all);
                            keep_first(&mut failed, block.step_gated_norm(ssd, &mut gated));
                            &gated
                        }
                        _ => y_all,
                    };
                    let h_t = unsafe { h.slice(m0, m1 - m0) };
                    keep_first(
                        &mut failed,
                        block.out_proj.forward_rows(read, m0, h_t, true),
                    );
                    if let Some(bias) = block.out_proj_bias {
                        add_row_bias(h_t, &bias[m0..m1]);
                    }
                }
                barrier.wait();
            }
            let h_all = unsafe { h.read(0, d) };
            keep_first(&mut failed, self.norm_f(h_all, &mut normed));
            let (v0, v1) = share(v, t, 16);
            if v1 > v0 {
                let out = unsafe { logits.slice(v0, v1 - v0) };
                keep_first(
                    &mut failed,
                    self.head().forward_rows(&normed, v0, out, false),
                );
            }
            failed
        });
        if let Some(e) = errors.into_iter().flatten().next() {
            return Err(e);
        }
        seq.logits.clear();
        seq.logits.extend_from_slice(&buf.logits[..v]);
        seq.remember(&[token]);
        Ok(())
    }
}

impl DecodingState for Sequence {
    fn logits(&self) -> &[f32] {
        &self.logits
    }

    fn logits_and_recent(&mut self) -> (&[f32], &[u32]) {
        (&self.logits, self.recent.make_contiguous())
    }

    fn position(&self) -> u64 {
        self.position
    }

    fn context_bytes(&self) -> usize {
        self.layers
            .iter()
            .map(|l| (l.conv.len() + l.ssm.len()) * 4)
            .sum()
    }
}

impl Decoder for InferenceModel {
    type State = Sequence;
    type Buffers = DecodeBuffers;

    fn vocab_rows(&self) -> usize {
        self.config.vocab_size
    }

    fn n_params(&self) -> usize {
        self.config.n_params()
    }

    fn format(&self) -> WeightFormat {
        self.format
    }

    fn bytes_per_token(&self) -> usize {
        InferenceModel::bytes_per_token(self)
    }

    fn new_state(&self) -> Sequence {
        Sequence::new(&self.config)
    }

    fn new_buffers(&self, batch: usize) -> DecodeBuffers {
        DecodeBuffers::new(&self.config, batch)
    }

    fn prefill(&self, seq: &mut Sequence, ids: &[u32]) -> Result<()> {
        InferenceModel::prefill(self, seq, ids)
    }

    fn decode_step(
        &self,
        seqs: &mut [&mut Sequence],
        tokens: &[u32],
        buffers: &mut DecodeBuffers,
    ) -> Result<()> {
        InferenceModel::decode_step(self, seqs, tokens, buffers)
    }

    fn prefill_hidden(
        &self,
        seq: &mut Sequence,
        ids: &[u32],
        on_chunk: &mut dyn FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        self.prefill_with(seq, ids, on_chunk)
    }

    fn head(&self) -> &Weights {
        InferenceModel::head(self)
    }
}

/// A barrier for the decoding team: the threads spin briefly (a phase
/// lasts tens of microseconds) and then yield, so that a thread the
/// operating system took away does not stall the others on a busy machine.
struct SpinBarrier {
    threads: usize,
    arrived: std::sync::atomic::AtomicUsize,
    generation: std::sync::atomic::AtomicUsize,
}

impl SpinBarrier {
    fn new(threads: usize) -> Self {
        Self {
            threads,
            arrived: std::sync::atomic::AtomicUsize::new(0),
            generation: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn wait(&self) {
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release};
        let generation = self.generation.load(Acquire);
        if self.arrived.fetch_add(1, AcqRel) + 1 == self.threads {
            self.arrived.store(0, Relaxed);
            self.generation.fetch_add(1, Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Acquire) == generation {
            if spins < 4096 {
                std::hint::spin_loop();
                spins += 1;
            } else {
                std::thread::yield_now();
            }
        }
    }
}
