#!/usr/bin/env python3
"""Generate Mamba-2 and Falcon-Mamba reference data for `selective` (CPU,
float64), so that the Rust tests can check those models, their loaders, their
gradients and the SSD scan without PyTorch. Companion of
scripts/make_model_reference.py (the Mamba-1 fixtures), whose helpers it imports
(exact_float64, fix_serialization_id, fresh_dir, next_token_loss, rand_ids).

How to run (from the repository root; CPU only, about 10 seconds)
    pip install torch transformers safetensors numpy
    python3 scripts/make_mamba2_reference.py            # writes the directories below
    python3 scripts/make_mamba2_reference.py --verify   # only re-check what is there

Versions used for the committed files
    Python 3.11.7, torch 2.15.0 (PyPI wheel "2.15.0+cu132", run on CPU),
    transformers 5.25.0, safetensors 0.8.0, numpy 2.4.6, huggingface-hub 2.4.0.
    No mamba-ssm / causal-conv1d installed (checked: their kernels would replace
    the torch paths), HF_HUB_OFFLINE=1 (nothing is downloaded), one torch thread
    (REF_THREADS; other thread counts change the last bits of the HF logits).

Output, about 395 KB, byte-for-byte reproducible
    tests/data/models/
    falcon-tiny-hf/       FalconMambaForCausalLM. config.json, generation_config.json,
                          model.safetensors (f32) exactly as save_pretrained writes them,
                          + reference.safetensors. hidden 16, 2 layers, vocab 40,
                          state 5, conv 4, expand 2 (d_inner 32), time_step_rank 3,
                          mixer_rms_eps 1e-6, layer_norm_epsilon 1e-5, untied lm_head;
                          seed 11; input (2, 13). Reference from transformers.
    mamba2-tiny-hf/       Mamba2ForCausalLM, same files. hidden 15, expand 2 (d_inner 30),
                          head_dim 6 (5 heads), n_groups 1, state 5, conv 4, chunk_size 4,
                          vocab 41, 2 layers, untied lm_head, time_step_limit (0, inf)
                          (the default); seed 12; input (2, 13) (13 is not a multiple of
                          the chunk). Reference from transformers.
    mamba2-tiny-hf-limit/ as mamba2-tiny-hf but tied embeddings (no lm_head.weight in
                          the file) and time_step_limit (0.004, 0.04), which clamps at both
                          ends: of the 260 deltas of the input (2 x 13 x 5 heads x 2
                          layers) 84 are raised to 0.004 and 29 lowered to 0.04 (no
                          softplus value lies within 5.3e-5 of a bound); seed 13.
                          Reference from transformers.
    mamba2-g4-hf/         Mamba2ForCausalLM files, n_groups 4: hidden 16, expand 2
                          (d_inner 32), head_dim 4 (8 heads, 2 per group), state 6, conv 4,
                          chunk_size 3, vocab 40, 2 layers, untied lm_head; seed 15;
                          input (2, 13). Reference from the PURE PATH below (per-group
                          gated norm, as mamba_ssm), not from transformers.
    mamba2-g2-original/   state-spaces (mamba_ssm 2.x) layout, reference from the pure
                          path. config.json exactly as mamba_ssm's
                          MambaLMHeadModel.save_pretrained writes its MambaConfig
                          (json.dump(config.__dict__, indent=4), field order, no final
                          newline):
                            d_model 16, d_intermediate 0, n_layer 2, vocab_size 37,
                            ssm_cfg {layer "Mamba2", d_state 7, d_conv 4, expand 2,
                            headdim 8, ngroups 2, chunk_size 5}, attn_layer_idx [],
                            attn_cfg {}, rms_norm true, residual_in_fp32 true,
                            fused_add_norm true, pad_vocab_size_multiple 8,
                            tie_embeddings true
                          (so d_inner 32, 4 heads, 2 per group; every other Mamba2 argument
                          is mamba_ssm's default: rmsnorm True, norm_before_gate False,
                          D_has_hdim False, d_ssm None, bias False, conv_bias True,
                          dt_limit (0, inf), gated-norm eps 1e-5, block/final norm eps 1e-5).
                          pytorch_model.bin: torch.save of the state dict of a skeleton of
                          the mamba_ssm module tree (same names and registration order), an
                          OrderedDict of 21 f32 tensors, vocab padded 37 -> 40 rows:
                            backbone.embedding.weight (40, 16)
                            backbone.layers.{i}.norm.weight (16)
                            backbone.layers.{i}.mixer.dt_bias (4), .A_log (4), .D (4),
                              .in_proj.weight (96, 16), .conv1d.weight (60, 1, 4),
                              .conv1d.bias (60), .norm.weight (32), .out_proj.weight (16, 32)
                            backbone.norm_f.weight (16)
                            lm_head.weight (40, 16), the same storage as the embedding
                          (state_dict() puts a module's own parameters before its
                          submodules', hence dt_bias/A_log/D before in_proj; mamba_ssm 2.x
                          Block registers norm before mixer). seed 14; input (2, 12) with
                          ids < 37; logits over all 40 rows; no grads.
    tests/data/ssd_reference.safetensors   kernel-level SSD reference (below).

HF config.json, as transformers 5.25 writes it (mamba2-tiny-hf, every key)
    architectures ["Mamba2ForCausalLM"], bos_token_id 0, chunk_size 4,
    conv_kernel 4, dtype "float32", eos_token_id 0, expand 2, head_dim 6,
    hidden_act "silu", hidden_size 15, initializer_range 0.1,
    layer_norm_epsilon 1e-05, model_type "mamba2", n_groups 1, num_heads 5,
    num_hidden_layers 2, pad_token_id 0, rescale_prenorm_residual false,
    residual_in_fp32 true, state_size 5, tie_word_embeddings false,
    time_step_floor 0.0001, time_step_limit [0.0, {"__float__": "Infinity"}],
    time_step_max 0.1, time_step_min 0.001, time_step_rank 1,
    transformers_version "5.25.0", use_bias false, use_cache true,
    use_conv_bias true, vocab_size 41.
    Note time_step_limit: the default (0.0, inf) is written with transformers'
    own encoding of a non-finite float, {"__float__": "Infinity"} (not a number,
    not the non-standard JSON token Infinity); a finite limit is written plainly
    ([0.004, 0.04] in mamba2-tiny-hf-limit). A loader should accept both, and a
    missing key means (0, inf). num_heads is stored (and checked: hidden_size *
    expand == num_heads * head_dim); time_step_rank is written but Mamba-2 does not
    use it. There is no rms_norm / norm_before_gate key: transformers always applies
    the gated norm, gate before norm. layer_norm_epsilon is the eps of the block
    norms, norm_f AND the gated norm (mamba_ssm hard-codes 1e-5 for the latter).
    Library defaults that a checkpoint may omit: n_groups 8, num_heads 128,
    head_dim 64, state_size 128, chunk_size 256, expand 2, conv_kernel 4,
    tie_word_embeddings false, residual_in_fp32 true, pad 1 / bos 0 / eos 2.
    FalconMamba's config.json has the Mamba-1 keys plus "mixer_rms_eps": 1e-06
    and "intermediate_size": 32 (derived), "time_step_rank": 3,
    "use_associative_scan", "use_mambapy"; tie_word_embeddings defaults to TRUE
    for FalconMamba (set false here explicitly).

Tensor names (model.safetensors, sorted by name as safetensors writes them)
    Mamba2: backbone.embeddings.weight, backbone.layers.{i}.norm.weight,
    backbone.layers.{i}.mixer.{in_proj.weight (2 d_inner + 2 G N + H, hidden),
    conv1d.weight (d_inner + 2 G N, 1, conv), conv1d.bias, dt_bias (H), A_log (H),
    D (H), norm.weight (d_inner), out_proj.weight (hidden, d_inner)},
    backbone.norm_f.weight, lm_head.weight (absent when tied). The same names as
    mamba_ssm except backbone.embeddings (HF) vs backbone.embedding (mamba_ssm);
    Mamba2Model's load hook renames the first key containing "embedding." so a
    mamba_ssm state dict loads as is (verify() does so: transformers on
    mamba2-g2-original's pytorch_model.bin matches its reference to 6.7e-16).
    FalconMamba: exactly the Mamba-1 HF names (backbone.layers.{i}.mixer.{A_log
    (d_inner, N), D, conv1d.weight, conv1d.bias, in_proj.weight, x_proj.weight
    (R + 2N, d_inner), dt_proj.weight (d_inner, R), dt_proj.bias, out_proj.weight},
    norms, embeddings, lm_head.weight). Its three mixer norms are weightless: their
    `weight` buffers (ones; dt_layernorm's has d_inner entries though it normalises
    R features) are non-persistent dummies, never saved and never used.

Random models
    The configs are built with every field given (mamba2_config, falcon_config;
    pad, bos and eos ids all 0, initializer_range 0.1), torch.manual_seed(seed),
    library init, then perturb(seed + 1) as in make_model_reference: norm weights
    (block norms, norm_f and the gated mixer.norm) *= 1 + 0.2 randn, D += 0.3 randn,
    conv1d.bias, A_log, dt_bias (Mamba-2) / dt_proj.bias (Falcon) += 0.2 randn (one
    torch.Generator, named_parameters() order), then out_proj.weight *= 8
    (OUT_PROJ_GAIN). The f32 model is saved, reloaded (from_pretrained, or torch.load
    for mamba2-g2-original) and upcast to float64, so every reference is the float64
    function of exactly the stored f32 weights. input_ids = rand_ids(seed + 2, (2, T),
    vocab) (vocab 37 for mamba2-g2-original). The greedy prompt is the first of
    rand_ids(seed + 3 + 1000 k, (1, 5), vocab), k = 0, 1, ..., whose 8-token greedy
    continuation (cache-free argmax loop) has >= 4 distinct tokens, a top-1 logit
    margin >= 1e-2 at every step, no EOS id 0 and no padding id >= 37
    (mamba2-g2-original). Committed:
      falcon-tiny-hf       k=0  [35, 8, 4, 14, 39] -> [1, 30, 39, 1, 2, 35, 22, 37]  margin 0.072
      mamba2-tiny-hf       k=0  [0, 5, 4, 3, 12] -> [9, 20, 6, 8, 35, 34, 11, 4]     margin 0.018
      mamba2-tiny-hf-limit k=2  [13, 22, 39, 31, 31] -> [29, 13, 35, 38, 11, 9, 31, 29]  margin 0.020
      mamba2-g4-hf         k=1  [1, 17, 11, 21, 39] -> [34, 15, 15, 17, 16, 37, 12, 27]  margin 0.013
      mamba2-g2-original   k=19 [21, 16, 21, 11, 6] -> [35, 36, 5, 7, 36, 15, 3, 30]  margin 0.047
    losses 3.639083644003, 3.809652712684, 3.809694118830, 3.646274509840,
    3.870960456819 (same order).

reference.safetensors tensors (all contiguous, little-endian)
    input_ids      I64 (B, T)
    logits         F64 (B, T, vocab rows)  (40 padded rows for mamba2-g2-original)
    loss           F64 (1,)            mean next-token cross-entropy:
                                       CE(logits[:, :-1], input_ids[:, 1:]) averaged
                                       over all B*(T-1) predictions, natural log
    grad.<name>    F64                 d loss / d parameter for every name in
                                       model.named_parameters() (every tensor of the
                                       file's model.safetensors); the tied head of
                                       mamba2-tiny-hf-limit appears once, as
                                       backbone.embeddings.weight. Not for
                                       mamba2-g2-original.
    greedy_prompt  I64 (1, 5)
    greedy_tokens  I64 (1, 8)          from the cache-free argmax loop (full recompute
                                       per token) of the reference's own path
                                       (transformers or pure); checked against
                                       transformers' generate() (see the notes).

The pure path (what the Rust code implements; written out below as plain torch)
    Model: h = embed[ids]; per layer h = h + mixer(rmsnorm(h) * norm.weight);
    logits = lm_head(rmsnorm(h) * norm_f.weight), rmsnorm(x) = x / sqrt(mean(x^2)
    + eps) over the last dim, eps = layer_norm_epsilon (1e-5).
    Mamba-2 mixer (mamba_ssm modules/mamba2.py, rmsnorm=True, norm_before_gate=False;
    SSD as modules/ssd_minimal.py), with d = d_inner, G groups, N state, H = d / P
    heads of P = head_dim:
      in_proj(u) split along features, in order, into z (d), xBC (d + 2GN), dt (H);
      xBC = silu(causal depthwise conv1d(xBC) + conv1d.bias), kernel conv_kernel,
        out[t, c] = bias[c] + sum_k w[c, 0, k] xBC[t - (K-1) + k, c], zero before t=0;
      xBC split into x (d, viewed (H, P)), B (G N, viewed (G, N)), C (G N);
      head h reads group g = h // (H / G) (contiguous blocks of heads per group);
      A_h = -exp(A_log_h) (one scalar per head);
      delta = clamp(softplus(dt + dt_bias), lo, hi), (lo, hi) = time_step_limit
        (all softplus arguments here are < 1.5, far from F.softplus's threshold 20;
        where delta is clamped its gradient w.r.t. dt and dt_bias is 0);
      per head, S (P x N) from 0: S <- exp(delta_t A_h) S + delta_t x_t (outer) B_{g,t},
        y_t = S C_{g,t} + D_h x_t;
      gated RMSNorm: v = y * silu(z), normalised (rmsnorm without weight, eps 1e-5)
        over each of the G contiguous blocks of d / G features, then * norm.weight;
      out_proj(v). No biases in the linear layers.
    The chunked (ssd_minimal) form: X = x delta, a = A delta, segsum-based intra-chunk
    term + chunk-state recurrence, the sequence zero-padded to a multiple of the chunk
    (x = 0, a = 0 leave the state unchanged), D x added afterwards; B and C are
    expanded from groups to heads first (repeat_interleave, as transformers does).
    Falcon-Mamba mixer: Mamba-1 (x, z = in_proj(u) halves, x first; x = silu(conv(x));
    dt_low, B, C = x_proj(x) split [R, N, N]) with dt_low, B and C each replaced by
    x / sqrt(mean(x^2) + mixer_rms_eps) (no weight) right after x_proj; then
    delta = softplus(dt_proj.weight @ dt_low + dt_proj.bias), A = -exp(A_log)
    (d_inner, N), per channel S <- exp(delta A) S + delta x B, y = S C + D x,
    y * silu(z), out_proj.

tests/data/ssd_reference.safetensors (kernel level; all F64)
    For case in {g1, g3}: inputs {case}.x (B,L,H,P), .dt (B,L,H) raw (before bias and
    softplus), .dt_bias (H), .a (H) (negative: A itself), .b (B,L,G,N), .c (B,L,G,N),
    .d (H), .initial_state (B,H,P,N), .dt_limit (2,) = (lo, hi) (hi may be +inf),
    .chunk (1,) the chunk length Q as a float, .dy (B,L,H,P), .d_final_state
    (B,H,P,N); outputs .y (B,L,H,P), .final_state (B,H,P,N) (S after the last step,
    starting from initial_state); gradients .grad.{x, dt, dt_bias, a, b, c, d,
    initial_state} of loss = sum(y * dy) + sum(final_state * d_final_state), all from
    the literal recurrence (ssd_recurrence) with autograd.
      g1: B=2, L=11, H=3, P=4, G=1, N=5, Q=4, dt_limit (0, inf); seed 31; softplus
          values in [0.0136, 1.248].
      g3: B=1, L=9, H=6, P=2, G=3, N=3, Q=3, dt_limit (0.05, 0.6); seed 32; softplus
          values in [0.0127, 1.636]: 3 of 54 deltas clamped up to 0.05 and 9 of 54
          down to 0.6; none within 1.06e-3 of a bound (the seed is the first of 32,
          1032, ... with a gap > 1e-3).
    Inputs are randn (float64, torch.Generator(seed)) in the order x, dt, dt_bias, a,
    b, c, d, initial_state, dy, d_final_state; dt = 1.2 randn - 1, dt_bias = 0.5 randn,
    a = -exp(0.5 randn), initial_state = 0.5 randn.

Agreement numbers (max |difference|, printed by the script)
    transformers (patched float64) vs the pure path (recurrence):
      falcon-tiny-hf        logits 4.4e-16, grads 1.9e-16
      mamba2-tiny-hf        logits 5.5e-16, grads 1.7e-16
      mamba2-tiny-hf-limit  logits 3.3e-16, grads 2.2e-16
      mamba2-g4-hf          logits 5.6e-16   (transformers 5.25 normalises per group)
      mamba2-g2-original    logits 6.7e-16
    the gated norm over the whole d_inner instead (one group; what older
    transformers releases did for n_groups > 1) vs the pure path: 1.11 (g4), 0.61 (g2).
    recurrence vs chunked (ssd_minimal) pure path: logits 0 / 2.2e-16 / 2.2e-16 /
    2.2e-16 (tiny, limit, g4, g2), grads <= 1.2e-16; SSD file: y 1.8e-15 (g1),
    8.9e-16 (g3), final_state 4.4e-16, grads 7.1e-15 / 4.4e-15.
    unpatched transformers float64 run (its float32 casts) vs the reference logits:
      1.8e-7 (falcon), 2.4e-7 (tiny), 1.9e-7 (limit), 6.6e-7 (g4), 2.6e-7 (g2).
    transformers generate() (cached single-token steps) vs the cache-free loop, step
    logits: <= 1.4e-15 everywhere except mamba2-tiny-hf-limit: 9.9e-4 (see below);
    greedy tokens agree in all five.

Float64 note (important)
    model.double() is NOT a float64 computation in transformers 5.25. Mamba2:
    Mamba2RMSNorm and Mamba2RMSNormGated cast to float32 (input and gate), the block
    casts the residual to float32 (residual_in_fp32), the mixer does A_log.float(),
    the chunked scan .float() on x, B, C and dt, the decode step dt.float() *
    A.float(), and the head returns lm_head(...).float(). FalconMamba: the weightless
    norms do x.float(), FalconMambaRMSNorm .to(float32), the residual, A_log,
    dt_proj.bias and D .float(), the scan B.float() and x.float(), the decode step
    state.float(), the head .float(). Everything therefore runs inside
    make_model_reference's exact_float64() (Tensor.float() / .to(float32) are no-ops
    on float64 tensors while it is active), and an op-level audit (TorchDispatchMode)
    checks that the patched HF forward produces no floating tensor other than float64.

transformers vs mamba_ssm, and other things to know
    - The cached decode step (mamba2_selective_state_update, used by generate() after
      the prefill) does NOT apply time_step_limit; the prefill (mamba2_chunk_scan)
      does. mamba_ssm's Mamba2.step passes no dt_limit either. With a clamping limit
      the cached step logits differ from a full forward (9.9e-4 here); the committed
      greedy tokens are the clamped, cache-free ones (generate() happens to give the
      same tokens). Without a clamping limit the two agree to 1e-15.
    - transformers 5.25's Mamba2RMSNormGated takes group_size = d_inner / n_groups
      and agrees with mamba_ssm; older releases normalised over all of d_inner. The
      n_groups > 1 references come from the pure path regardless.
    - In train mode without a cache Mamba2Mixer first calls the hub kernel
      mamba2_split_conv1d_scan_combined (a stub returning None without kernels) and
      falls back to the torch path; everything here runs in eval mode.
    - FalconMamba applies dt_proj as dt_proj.weight @ dt_low (no bias) and adds
      dt_proj.bias inside the scan before softplus (same maths); the associative scan
      path is only taken under torch.compile, the sequential loop runs here.
    - In the mamba_ssm sources read for this script, Mamba2.forward's fallback without
      causal_conv1d uses self.dconv (no such attribute) and keeps the LAST d_conv - 1
      conv outputs, and a recent ssd_minimal.py takes B, C per group and sums over
      the group index (not the per-head group selection of the kernels); neither is
      followed here: the conv is causal_conv1d's, B and C are expanded to heads first.

Reproducibility
    Output bytes are identical from run to run (same versions, one thread):
    save_pretrained's safetensors metadata is the single {"format": "pt"}, ours has
    a single "note" key, and the random serialization id torch.save puts in
    pytorch_model.bin is overwritten with the zero-padded seed (fix_serialization_id).
    After writing, verify() reloads every directory (from_pretrained; torch.load for
    mamba2-g2-original) and the SSD file, recomputes from the stored inputs and checks
    that logits, loss, every gradient, greedy tokens and the SSD outputs and gradients
    come out bit-identical (the chunked form within 1e-12).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

warnings.filterwarnings("ignore")

import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import (  # noqa: E402
    FalconMambaConfig,
    FalconMambaForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_model_reference import (  # noqa: E402
    exact_float64,
    fix_serialization_id,
    fresh_dir,
    next_token_loss,
    rand_ids,
)

try:  # progress bars of save_pretrained / from_pretrained go to stderr; keep the log readable
    transformers.utils.logging.disable_progress_bar()
except Exception:  # noqa: BLE001
    pass

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_ROOT = REPO_ROOT / "tests" / "data" / "models"
SSD_PATH = REPO_ROOT / "tests" / "data" / "ssd_reference.safetensors"
INF = float("inf")
N_NEW = 8  # greedy tokens per fixture

# ----------------------------------------------------------------------------
# configs
# ----------------------------------------------------------------------------


def mamba2_config(hidden, layers, vocab, state, conv, expand, head_dim, n_groups, chunk, tie, limit=(0.0, INF)):
    """A Mamba2Config with EVERY field given (the library defaults are for a 2.7B model)."""
    d_inner = expand * hidden
    assert d_inner % head_dim == 0 and (d_inner // head_dim) % n_groups == 0
    return Mamba2Config(
        num_heads=d_inner // head_dim,
        head_dim=head_dim,
        vocab_size=vocab,
        hidden_size=hidden,
        state_size=state,
        num_hidden_layers=layers,
        layer_norm_epsilon=1e-5,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        expand=expand,
        conv_kernel=conv,
        n_groups=n_groups,
        use_bias=False,
        use_conv_bias=True,
        hidden_act="silu",
        initializer_range=0.1,
        residual_in_fp32=True,
        time_step_rank=math.ceil(hidden / 16),  # unused by Mamba-2 ("auto" gives the same)
        time_step_min=0.001,
        time_step_max=0.1,
        time_step_floor=1e-4,
        time_step_limit=tuple(limit),
        rescale_prenorm_residual=False,
        use_cache=True,
        chunk_size=chunk,
        tie_word_embeddings=tie,
    )


def falcon_config(hidden, layers, vocab, state, conv, expand, dt_rank, mixer_rms_eps, tie):
    """A FalconMambaConfig with EVERY field given."""
    return FalconMambaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        state_size=state,
        num_hidden_layers=layers,
        layer_norm_epsilon=1e-5,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        expand=expand,
        conv_kernel=conv,
        use_bias=False,
        use_conv_bias=True,
        hidden_act="silu",
        initializer_range=0.1,
        residual_in_fp32=True,
        time_step_rank=dt_rank,
        time_step_scale=1.0,
        time_step_min=0.001,
        time_step_max=0.1,
        time_step_init_scheme="random",
        time_step_floor=1e-4,
        rescale_prenorm_residual=False,
        use_cache=True,
        use_mambapy=False,
        use_associative_scan=True,
        tie_word_embeddings=tie,
        mixer_rms_eps=mixer_rms_eps,
    )


def arch_of(cfg):
    """The numbers the pure path needs, from a Mamba2Config or FalconMambaConfig."""
    d_inner = int(cfg.expand * cfg.hidden_size)
    a = {
        "d_inner": d_inner,
        "state": cfg.state_size,
        "layers": cfg.num_hidden_layers,
        "eps": cfg.layer_norm_epsilon,
        "tied": bool(cfg.tie_word_embeddings),
    }
    if cfg.model_type == "mamba2":
        a.update(
            kind="mamba2",
            groups=cfg.n_groups,
            heads=cfg.num_heads,
            head_dim=cfg.head_dim,
            chunk=cfg.chunk_size,
            dt_limit=tuple(float(v) for v in cfg.time_step_limit),
        )
        assert a["heads"] * a["head_dim"] == d_inner
    else:
        assert cfg.model_type == "falcon_mamba"
        a.update(kind="falcon", dt_rank=int(cfg.time_step_rank), mixer_eps=cfg.mixer_rms_eps)
    return a


# ----------------------------------------------------------------------------
# random models
# ----------------------------------------------------------------------------


@torch.no_grad()
def perturb(model, seed):
    """Perturb the parameters the library initialises to constants (as make_model_reference)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # fixed order
        noise = lambda: torch.randn(p.shape, generator=g, dtype=p.dtype)  # noqa: E731
        if name.endswith(".norm.weight") or name == "backbone.norm_f.weight":  # incl. mixer.norm (gated)
            p.mul_(1 + 0.2 * noise())
        elif name.endswith(".mixer.D"):
            p.add_(0.3 * noise())
        elif name.endswith(".conv1d.bias"):
            p.add_(0.2 * noise())
        elif name.endswith(".A_log"):
            p.add_(0.2 * noise())
        elif name.endswith(".dt_proj.bias") or name.endswith(".mixer.dt_bias"):
            p.add_(0.2 * noise())


OUT_PROJ_GAIN = 8.0  # as make_model_reference: lets the mixers steer the greedy tokens


def random_model(cls, cfg, seed):
    """f32 model: library init under torch.manual_seed(seed), perturb(seed + 1),
    then out_proj.weight *= OUT_PROJ_GAIN."""
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    tied = model.lm_head.weight is model.backbone.embeddings.weight
    assert tied == bool(cfg.tie_word_embeddings)
    perturb(model, seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".out_proj.weight"):
                p.mul_(OUT_PROJ_GAIN)
    return model


def params_f64(model):
    """{HF name: float64 leaf tensor} for every named parameter; a tied head shares the
    embedding's tensor under lm_head.weight (so its gradient accumulates there)."""
    p = {n: t.detach().to(torch.float64).clone() for n, t in model.named_parameters()}
    if "lm_head.weight" not in p:
        p["lm_head.weight"] = p["backbone.embeddings.weight"]
    return p


# ----------------------------------------------------------------------------
# the pure path (what the Rust code implements), float64
# ----------------------------------------------------------------------------


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) over the last dim, then * weight (weight may be None)."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else weight * y


def causal_conv1d(x, weight, bias):
    """Depthwise causal conv over time. x (B, L, C), weight (C, 1, K), bias (C,):
    out[t, c] = bias[c] + sum_k weight[c, 0, k] * x[t - (K - 1) + k, c] (x = 0 before t = 0)."""
    k_size = weight.shape[-1]
    length = x.shape[1]
    xp = F.pad(x, (0, 0, k_size - 1, 0))
    out = bias
    for k in range(k_size):
        out = out + weight[:, 0, k] * xp[:, k:k + length]
    return out


SOFTPLUS_CHECK = []  # largest softplus argument seen (F.softplus returns x itself above 20)


def delta_of(dt, dt_bias, dt_limit, stats=None):
    """Delta = clamp(softplus(dt + dt_bias), lo, hi)."""
    pre = dt + dt_bias
    SOFTPLUS_CHECK.append(pre.detach().max().item())
    assert pre.detach().max().item() < 20.0, "softplus threshold reached"
    sp = F.softplus(pre)
    lo, hi = dt_limit
    delta = torch.clamp(sp, min=lo, max=hi)
    if stats is not None:
        s = sp.detach()
        stats["n"] = stats.get("n", 0) + s.numel()
        stats["below"] = stats.get("below", 0) + int((s < lo).sum())
        stats["above"] = stats.get("above", 0) + int((s > hi).sum())
        for bound in (lo, hi):  # distance of the nearest softplus value to a bound that clamps
            if 0.0 < bound < INF:
                stats["gap"] = min(stats.get("gap", INF), (s - bound).abs().min().item())
    return delta


def ssd_recurrence(x, dt, dt_bias, a, b, c, d, dt_limit, initial_state=None, stats=None):
    """The literal SSD recurrence. x (B, L, H, P); dt (B, L, H) raw; dt_bias, a, d (H,);
    b, c (B, L, G, N); head h reads group h // (H / G). Per head, with S (P, N):
        S <- exp(delta_t a) S + delta_t x_t (outer) b_t;   y_t = S c_t + d x_t.
    Returns y (B, L, H, P) and the final state (B, H, P, N)."""
    bsz, length, heads, hdim = x.shape
    groups, n = b.shape[2:]
    delta = delta_of(dt, dt_bias, dt_limit, stats)
    bh = b.repeat_interleave(heads // groups, dim=2)  # (B, L, H, N)
    ch = c.repeat_interleave(heads // groups, dim=2)
    s = x.new_zeros(bsz, heads, hdim, n) if initial_state is None else initial_state
    ys = []
    for t in range(length):
        decay = torch.exp(delta[:, t] * a)  # (B, H)
        s = decay[:, :, None, None] * s + (delta[:, t, :, None] * x[:, t])[..., None] * bh[:, t, :, None, :]
        ys.append((s * ch[:, t, :, None, :]).sum(-1) + d[:, None] * x[:, t])
    return torch.stack(ys, dim=1), s


def segsum(x):
    """mamba_ssm ssd_minimal.segsum: out[..., i, j] = sum_{j < k <= i} x[..., k], -inf above the diagonal."""
    t = x.size(-1)
    x = x[..., None].expand(*x.shape, t)
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool), diagonal=-1)
    x = x.masked_fill(~mask, 0)
    x_segsum = torch.cumsum(x, dim=-2)
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool), diagonal=0)
    return x_segsum.masked_fill(~mask, -torch.inf)


def ssd_minimal_discrete(xs, adt, b, c, block_len, initial_states=None):
    """mamba_ssm modules/ssd_minimal.py (Listing 1 of the Mamba-2 paper), B and C already
    per head. xs (B, L, H, P) = x * delta; adt (B, L, H) = a * delta; b, c (B, L, H, N);
    L a multiple of block_len; initial_states (B, 1, H, P, N) or None."""
    bsz, length = xs.shape[:2]
    nc = length // block_len
    xs, adt, b, c = [t.reshape(bsz, nc, block_len, *t.shape[2:]) for t in (xs, adt, b, c)]
    adt = adt.permute(0, 3, 1, 2)  # b h c l
    a_cumsum = torch.cumsum(adt, dim=-1)
    # 1. intra-chunk (diagonal blocks)
    lmat = torch.exp(segsum(adt))
    y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", c, b, lmat, xs)
    # 2. state at the end of each chunk from its own inputs
    decay_states = torch.exp(a_cumsum[:, :, :, -1:] - a_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", b, decay_states, xs)
    # 3. inter-chunk recurrence
    if initial_states is None:
        initial_states = torch.zeros_like(states[:, :1])
    states = torch.cat([initial_states, states], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(a_cumsum[:, :, :, -1], (1, 0))))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    states, final_state = new_states[:, :-1], new_states[:, -1]
    # 4. state -> output per chunk
    state_decay_out = torch.exp(a_cumsum)
    y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", c, states, state_decay_out)
    return (y_diag + y_off).reshape(bsz, length, *y_diag.shape[3:]), final_state


def ssd_chunked(x, dt, dt_bias, a, b, c, d, dt_limit, chunk, initial_state=None):
    """Same inputs/outputs as ssd_recurrence, through ssd_minimal_discrete with chunk
    length `chunk`; the sequence is zero-padded to a multiple of it (x = 0 and a*delta = 0
    on the padding, which leaves the state unchanged)."""
    bsz, length, heads, _ = x.shape
    groups = b.shape[2]
    delta = delta_of(dt, dt_bias, dt_limit)
    bh = b.repeat_interleave(heads // groups, dim=2)
    ch = c.repeat_interleave(heads // groups, dim=2)
    pad = (-length) % chunk
    xs = F.pad(x * delta[..., None], (0, 0, 0, 0, 0, pad))
    adt = F.pad(a * delta, (0, 0, 0, pad))
    bh = F.pad(bh, (0, 0, 0, 0, 0, pad))
    ch = F.pad(ch, (0, 0, 0, 0, 0, pad))
    init = None if initial_state is None else initial_state[:, None]
    y, final = ssd_minimal_discrete(xs, adt, bh, ch, chunk, init)
    return y[:, :length] + d[:, None] * x, final


def mamba2_mixer(p, pre, u, a, scan="recurrence", stats=None):
    """Mamba-2 mixer (mamba_ssm modules/mamba2.py, rmsnorm=True, norm_before_gate=False)."""
    bsz, length, _ = u.shape
    d_inner, groups, n, heads, hdim = a["d_inner"], a["groups"], a["state"], a["heads"], a["head_dim"]
    zxbcdt = F.linear(u, p[pre + "in_proj.weight"])
    z, xbc, dt = torch.split(zxbcdt, [d_inner, d_inner + 2 * groups * n, heads], dim=-1)
    xbc = F.silu(causal_conv1d(xbc, p[pre + "conv1d.weight"], p[pre + "conv1d.bias"]))
    x, b, c = torch.split(xbc, [d_inner, groups * n, groups * n], dim=-1)
    args = (
        x.reshape(bsz, length, heads, hdim),
        dt,
        p[pre + "dt_bias"],
        -torch.exp(p[pre + "A_log"]),
        b.reshape(bsz, length, groups, n),
        c.reshape(bsz, length, groups, n),
        p[pre + "D"],
        a["dt_limit"],
    )
    if scan == "recurrence":
        y, _ = ssd_recurrence(*args, stats=stats)
    else:
        y, _ = ssd_chunked(*args, a["chunk"])
    v = y.reshape(bsz, length, d_inner) * F.silu(z)
    norm_groups = a.get("norm_groups", groups)  # "norm_groups": 1 = the old transformers behaviour
    v = rms_norm(v.reshape(bsz, length, norm_groups, d_inner // norm_groups), None, a["eps"])
    v = p[pre + "norm.weight"] * v.reshape(bsz, length, d_inner)
    return F.linear(v, p[pre + "out_proj.weight"])


def falcon_mixer(p, pre, u, a):
    """Falcon-Mamba mixer: Mamba-1 with weightless RMSNorms on dt_low, B and C."""
    bsz, length, _ = u.shape
    d_inner, n, rank = a["d_inner"], a["state"], a["dt_rank"]
    x, z = F.linear(u, p[pre + "in_proj.weight"]).split(d_inner, dim=-1)
    x = F.silu(causal_conv1d(x, p[pre + "conv1d.weight"], p[pre + "conv1d.bias"]))
    dt_low, b, c = torch.split(F.linear(x, p[pre + "x_proj.weight"]), [rank, n, n], dim=-1)
    dt_low, b, c = (rms_norm(t, None, a["mixer_eps"]) for t in (dt_low, b, c))
    dt = F.linear(dt_low, p[pre + "dt_proj.weight"])
    delta = delta_of(dt, p[pre + "dt_proj.bias"], (0.0, INF))  # (B, L, d_inner)
    A = -torch.exp(p[pre + "A_log"])  # (d_inner, N)
    s = u.new_zeros(bsz, d_inner, n)
    ys = []
    for t in range(length):
        s = torch.exp(delta[:, t, :, None] * A) * s + (delta[:, t] * x[:, t])[..., None] * b[:, t, None, :]
        ys.append((s * c[:, t, None, :]).sum(-1) + p[pre + "D"] * x[:, t])
    y = torch.stack(ys, dim=1) * F.silu(z)
    return F.linear(y, p[pre + "out_proj.weight"])


def pure_logits(p, ids, a, scan="recurrence", stats=None):
    """Whole model: h = embed[ids]; per layer h = h + mixer(rmsnorm(h) * norm.weight);
    logits = lm_head(rmsnorm(h) * norm_f.weight)."""
    h = p["backbone.embeddings.weight"][ids]
    for i in range(a["layers"]):
        pre = f"backbone.layers.{i}."
        u = rms_norm(h, p[pre + "norm.weight"], a["eps"])
        if a["kind"] == "mamba2":
            h = h + mamba2_mixer(p, pre + "mixer.", u, a, scan, stats)
        else:
            h = h + falcon_mixer(p, pre + "mixer.", u, a)
    h = rms_norm(h, p["backbone.norm_f.weight"], a["eps"])
    return F.linear(h, p["lm_head.weight"])


def pure_reference(p, ids, a, scan="recurrence"):
    """(logits, loss, {name: grad}) of the pure path; grads keyed like named_parameters
    (the tied head folded into backbone.embeddings.weight)."""
    leaves = {}
    q = {}
    for name, t in p.items():
        if name == "lm_head.weight" and t is p["backbone.embeddings.weight"]:
            continue
        leaves[name] = q[name] = t.detach().clone().requires_grad_(True)
    q["lm_head.weight"] = q.get("lm_head.weight", q["backbone.embeddings.weight"])
    with torch.enable_grad():
        logits = pure_logits(q, ids, a, scan)
        loss = next_token_loss(logits, ids)
        grads = torch.autograd.grad(loss, list(leaves.values()))
    return logits.detach(), loss.detach().reshape(1), dict(zip(leaves.keys(), grads))


# ----------------------------------------------------------------------------
# transformers' own float64 path
# ----------------------------------------------------------------------------


class DtypeAudit(TorchDispatchMode):
    """Records every op that produces a floating tensor which is not float64."""

    def __init__(self):
        super().__init__()
        self.bad = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        for o in outs:
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.dtype != torch.float64:
                self.bad.append(str(func))
        return out


def hf_logits(model64, ids, audit=False):
    mode = DtypeAudit() if audit else None
    with exact_float64(), torch.no_grad():
        if mode is None:
            logits = model64(input_ids=ids, use_cache=False).logits
        else:
            with mode:
                logits = model64(input_ids=ids, use_cache=False).logits
    assert logits.dtype == torch.float64
    if mode is not None:
        assert not mode.bad, f"non-float64 ops in the patched forward: {sorted(set(mode.bad))}"
    return logits


def hf_reference(model64, ids):
    """(logits, loss, {name: grad}) from transformers (patched float64, eval mode)."""
    model64.zero_grad(set_to_none=True)
    with exact_float64(), torch.enable_grad():
        logits = model64(input_ids=ids, use_cache=False).logits
        assert logits.dtype == torch.float64
        loss = next_token_loss(logits, ids)
        loss.backward()
    grads = {}
    for name, t in model64.named_parameters():
        assert t.grad is not None and t.grad.dtype == torch.float64, name
        grads[name] = t.grad.detach().clone()
    model64.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach().reshape(1), grads


def hf_generate(model64, prompt, n_new):
    """generate() (prefill + cached single-token recurrent steps), float64. Returns the new
    tokens and the largest difference between generate()'s per-step logits and a cache-free
    forward over the same tokens."""
    with exact_float64(), torch.no_grad():
        out = model64.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                               do_sample=False, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, prompt.shape[1]:]
        full = model64(input_ids=out.sequences, use_cache=False).logits
    step_logits = torch.stack(out.logits, dim=1)
    assert step_logits.dtype == torch.float64
    return new, maxdiff(step_logits, full[:, prompt.shape[1] - 1:-1])


def load_hf(cls, d):
    model, info = cls.from_pretrained(str(d), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, bad
    loaded_dtype = model.dtype
    return model.double().eval(), loaded_dtype


# ----------------------------------------------------------------------------
# greedy decoding
# ----------------------------------------------------------------------------


def greedy_loop(logits_fn, prompt, n_new, valid_vocab=None):
    """Cache-free argmax loop (full recompute each step). Returns (tokens, min top-1 margin)."""
    seq, margins = prompt, []
    with torch.no_grad():
        for _ in range(n_new):
            last = logits_fn(seq)[:, -1]
            assert last.dtype == torch.float64
            top2 = last.topk(2, dim=-1).values
            margins.append((top2[:, 0] - top2[:, 1]).min().item())
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    new = seq[:, prompt.shape[1]:].contiguous()
    # eos_token_id is 0 in every config: a 0 would end generation in some engines
    assert (new != 0).all(), f"greedy produced EOS id 0: {new.tolist()}"
    if valid_vocab is not None:
        assert (new < valid_vocab).all(), f"greedy produced a padding id: {new.tolist()}"
    return new, min(margins)


def pick_prompt(logits_fn, seed, high, n_new, valid_vocab=None, tries=64):
    """First prompt (1, 5) drawn with seed, seed + 1000, seed + 2000, ... whose greedy
    continuation has >= 4 distinct tokens, no EOS/padding id and a top-1 margin >= 1e-2."""
    for t in range(tries):
        prompt = rand_ids(seed + 1000 * t, (1, 5), high)
        try:
            tokens, margin = greedy_loop(logits_fn, prompt, n_new, valid_vocab)
        except AssertionError:
            continue
        if len(set(tokens[0].tolist())) >= 4 and margin >= 1e-2:
            print(f"  prompt seed {seed + 1000 * t}: {prompt.tolist()} -> {tokens.tolist()} (min margin {margin:.3e})")
            return prompt
    raise RuntimeError("no suitable greedy prompt found")


# ----------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------


def save_reference(ref, path, note):
    # ONE metadata key: safetensors writes the metadata map in hash order
    meta = {
        "note": f"{note}; scripts/make_mamba2_reference.py, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    }
    save_file({k: v.contiguous() for k, v in ref.items()}, str(path), metadata=meta)


def maxdiff(a, b):
    return (a.double() - b.double()).abs().max().item()


def grads_maxdiff(ga, gb):
    assert ga.keys() == gb.keys(), (sorted(ga), sorted(gb))
    return max(maxdiff(ga[k], gb[k]) for k in ga)


def assemble(ids, logits, loss, grads, prompt, tokens):
    ref = {"input_ids": ids.contiguous(), "logits": logits.contiguous(), "loss": loss.contiguous()}
    if grads is not None:
        for name, g in grads.items():
            ref["grad." + name] = g.contiguous()
    ref["greedy_prompt"] = prompt.contiguous()
    ref["greedy_tokens"] = tokens.contiguous()
    return ref


NUMBERS = {}  # printed agreement numbers, summarised at the end


def compare_paths(tag, p, ids, a, ref_logits, ref_grads=None, hf_model=None):
    """Print (and record) recurrence vs chunked, and optional transformers vs pure."""
    lr, _, gr = pure_reference(p, ids, a, "recurrence")
    out = {}
    if a["kind"] == "mamba2":
        lc, _, gc = pure_reference(p, ids, a, "chunked")
        out["recurrence vs chunked logits"] = maxdiff(lr, lc)
        out["recurrence vs chunked grads"] = grads_maxdiff(gr, gc)
    out["reference vs pure logits"] = maxdiff(ref_logits, lr)
    if ref_grads is not None:
        out["reference vs pure grads"] = grads_maxdiff(ref_grads, gr)
    if hf_model is not None:
        with torch.no_grad():  # information only: HF's own float64 run keeps its f32 casts
            plain = hf_model(input_ids=ids, use_cache=False).logits
        out["unpatched HF (f32 casts) vs reference logits"] = maxdiff(plain, ref_logits)
    NUMBERS[tag] = out
    for k, v in out.items():
        print(f"  {tag}: {k} {v:.3e}")
    return lr, gr


# ----------------------------------------------------------------------------
# the HF-layout directories
# ----------------------------------------------------------------------------


def make_hf_dir(name, cls, cfg, seed, seq_len, source):
    """source "hf": committed logits/grads from transformers (patched float64);
    source "pure": from the pure path (recurrence)."""
    print(f"{name}: seed {seed}, reference from {'transformers' if source == 'hf' else 'the pure path'}")
    model = random_model(cls, cfg, seed)
    d = fresh_dir(name)
    model.save_pretrained(str(d), safe_serialization=True)
    m64, _ = load_hf(cls, d)  # evaluate exactly the stored f32 weights
    a = arch_of(m64.config)
    p = params_f64(m64)
    ids = rand_ids(seed + 2, (2, seq_len), cfg.vocab_size)
    hf_l = hf_logits(m64, ids, audit=True)
    if a["kind"] == "mamba2":
        stats = {}
        with torch.no_grad():
            pure_logits(p, ids, a, stats=stats)
        lo, hi = a["dt_limit"]
        print(f"  dt_limit ({lo}, {hi}): {stats['below']} of {stats['n']} deltas clamped up to lo, "
              f"{stats['above']} clamped down to hi, nearest |softplus - clamping bound| {stats.get('gap', INF):.3e}")
        NUMBERS[name + " clamp"] = stats
    if source == "hf":
        logits, loss, grads = hf_reference(m64, ids)
        assert torch.equal(logits, hf_l)  # grad/no-grad agree
        compare_paths(name, p, ids, a, logits, grads, hf_model=m64)
        fn = lambda s: hf_logits(m64, s)  # noqa: E731
    else:
        logits, loss, grads = pure_reference(p, ids, a)
        compare_paths(name, p, ids, a, logits, grads, hf_model=m64)
        d_hf = maxdiff(hf_l, logits)
        NUMBERS[name]["transformers (patched f64) vs pure logits"] = d_hf
        print(f"  {name}: transformers (patched f64) vs pure logits {d_hf:.3e}")
        a1 = dict(a, norm_groups=1)
        with torch.no_grad():
            d_old = maxdiff(pure_logits(p, ids, a1), logits)
        NUMBERS[name]["one norm group over d_inner vs pure logits"] = d_old
        print(f"  {name}: gated norm over the whole d_inner (1 group) vs pure logits {d_old:.3e}")
        fn = lambda s: pure_logits(p, s, a)  # noqa: E731
    prompt = pick_prompt(fn, seed + 3, cfg.vocab_size, N_NEW)
    tokens, margin = greedy_loop(fn, prompt, N_NEW)
    pure_tokens, _ = greedy_loop(lambda s: pure_logits(p, s, a), prompt, N_NEW)
    assert torch.equal(tokens, pure_tokens), (tokens.tolist(), pure_tokens.tolist())
    gen, step_diff = hf_generate(m64, prompt, N_NEW)
    gen_ok = torch.equal(gen, tokens)
    NUMBERS[name]["generate() step logits vs cache-free"] = step_diff
    print(f"  {name}: loss {loss.item():.12f}, greedy {tokens.tolist()} (min margin {margin:.3e}); "
          f"transformers generate() {'agrees' if gen_ok else 'DIFFERS: ' + str(gen.tolist())}, "
          f"its cached step logits vs cache-free {step_diff:.3e}")
    if a["kind"] == "falcon" or a["dt_limit"] == (0.0, INF):
        assert gen_ok and step_diff < 1e-12, "generate() disagrees with the cache-free loop"
    ref = assemble(ids, logits, loss, grads, prompt, tokens)
    note = f"{name}: f32 weights (model.safetensors) evaluated in float64, reference from " + (
        "transformers" if source == "hf" else "the pure path (per-group gated norm)")
    save_reference(ref, d / "reference.safetensors", note)


# ----------------------------------------------------------------------------
# the state-spaces (mamba_ssm) layout: mamba2-g2-original
# ----------------------------------------------------------------------------

ORIGINAL_CONFIG = {  # field order of mamba_ssm 2.x MambaConfig (json.dump(config.__dict__, indent=4))
    "d_model": 16,
    "d_intermediate": 0,
    "n_layer": 2,
    "vocab_size": 37,
    "ssm_cfg": {"layer": "Mamba2", "d_state": 7, "d_conv": 4, "expand": 2, "headdim": 8, "ngroups": 2, "chunk_size": 5},
    "attn_layer_idx": [],
    "attn_cfg": {},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}


def original_hf_config(oc):
    s = oc["ssm_cfg"]
    mult = oc["pad_vocab_size_multiple"]
    vocab_padded = (oc["vocab_size"] + mult - 1) // mult * mult
    cfg = mamba2_config(oc["d_model"], oc["n_layer"], vocab_padded, s["d_state"], s["d_conv"], s["expand"],
                        s["headdim"], s["ngroups"], s["chunk_size"], tie=oc["tie_embeddings"])
    return cfg, vocab_padded


# A skeleton of the mamba_ssm 2.x module tree (MambaLMHeadModel -> MixerModel ->
# Block(norm, mixer) -> Mamba2), same attribute names and registration order, so that
# its state_dict() is what `torch.save(model.state_dict(), "pytorch_model.bin")` pickles:
# an OrderedDict in the official key order (2.x Block registers norm BEFORE mixer; Mamba2
# registers in_proj, conv1d, dt_bias, A_log, D, norm, out_proj), lm_head.weight tied.


class _OrigMamba2(torch.nn.Module):
    def __init__(self, d_model, d_state, d_conv, expand, headdim, ngroups):
        super().__init__()
        d_inner = expand * d_model
        nheads = d_inner // headdim
        self.in_proj = torch.nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=False)
        conv_dim = d_inner + 2 * ngroups * d_state
        self.conv1d = torch.nn.Conv1d(conv_dim, conv_dim, d_conv, groups=conv_dim, padding=d_conv - 1, bias=True)
        self.act = torch.nn.SiLU()
        self.dt_bias = torch.nn.Parameter(torch.zeros(nheads))
        self.A_log = torch.nn.Parameter(torch.zeros(nheads))
        self.D = torch.nn.Parameter(torch.zeros(nheads))
        self.norm = _OrigRMSNorm(d_inner)  # mamba_ssm.ops.triton.layernorm_gated.RMSNorm
        self.out_proj = torch.nn.Linear(d_inner, d_model, bias=False)


class _OrigRMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.register_parameter("bias", None)


class _OrigBlock(torch.nn.Module):
    def __init__(self, d_model, ssm):
        super().__init__()
        self.norm = _OrigRMSNorm(d_model)
        self.mixer = _OrigMamba2(d_model, **ssm)
        self.mlp = None  # d_intermediate = 0


class _OrigMixerModel(torch.nn.Module):
    def __init__(self, d_model, n_layer, vocab, ssm):
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, d_model)
        self.layers = torch.nn.ModuleList([_OrigBlock(d_model, ssm) for _ in range(n_layer)])
        self.norm_f = _OrigRMSNorm(d_model)


class _OrigLMHeadModel(torch.nn.Module):
    def __init__(self, d_model, n_layer, vocab, ssm):
        super().__init__()
        self.backbone = _OrigMixerModel(d_model, n_layer, vocab, ssm)
        self.lm_head = torch.nn.Linear(d_model, vocab, bias=False)
        self.lm_head.weight = self.backbone.embedding.weight  # tie_weights()


def original_state_dict(model_f32, oc, vocab_padded):
    s = oc["ssm_cfg"]
    ssm = {k: s[k] for k in ("d_state", "d_conv", "expand", "headdim", "ngroups")}
    orig = _OrigLMHeadModel(oc["d_model"], oc["n_layer"], vocab_padded, ssm)
    hf = {k: v.detach() for k, v in model_f32.state_dict().items() if k != "lm_head.weight"}
    renamed = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in hf.items()}
    renamed["lm_head.weight"] = renamed["backbone.embedding.weight"]
    orig.load_state_dict(renamed, strict=True)
    sd = orig.state_dict()
    assert len(sd) == len(hf) + 1 and sd["lm_head.weight"].data_ptr() == sd["backbone.embedding.weight"].data_ptr()
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    return sd


def original_params_f64(sd):
    """{HF name: float64 tensor} from an original-layout state dict (tied head shared)."""
    p = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v.to(torch.float64)
         for k, v in sd.items() if k != "lm_head.weight"}
    p["lm_head.weight"] = p["backbone.embeddings.weight"]
    return p


def make_original_dir(name, seed, seq_len):
    print(f"{name}: seed {seed}, reference from the pure path")
    oc = ORIGINAL_CONFIG
    cfg, vocab_padded = original_hf_config(oc)
    model = random_model(Mamba2ForCausalLM, cfg, seed)
    d = fresh_dir(name)
    (d / "config.json").write_text(json.dumps(oc, indent=4))  # exactly what mamba_ssm's json.dump writes
    sd = original_state_dict(model, oc, vocab_padded)
    torch.save(sd, str(d / "pytorch_model.bin"))
    fix_serialization_id(d / "pytorch_model.bin", f"{seed:040d}")
    sd = torch.load(str(d / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    p = original_params_f64(sd)
    a = arch_of(cfg)
    ids = rand_ids(seed + 2, (2, seq_len), oc["vocab_size"])
    logits, loss, _ = pure_reference(p, ids, a)
    m64 = model.double().eval()
    compare_paths(name, p, ids, a, logits, hf_model=m64)
    d_hf = maxdiff(hf_logits(m64, ids, audit=True), logits)
    NUMBERS[name]["transformers (patched f64) vs pure logits"] = d_hf
    print(f"  {name}: transformers (patched f64) vs pure logits {d_hf:.3e}")
    with torch.no_grad():
        d_old = maxdiff(pure_logits(p, ids, dict(a, norm_groups=1)), logits)
    NUMBERS[name]["one norm group over d_inner vs pure logits"] = d_old
    print(f"  {name}: gated norm over the whole d_inner (1 group) vs pure logits {d_old:.3e}")
    fn = lambda s: pure_logits(p, s, a)  # noqa: E731
    prompt = pick_prompt(fn, seed + 3, oc["vocab_size"], N_NEW, valid_vocab=oc["vocab_size"])
    tokens, margin = greedy_loop(fn, prompt, N_NEW, valid_vocab=oc["vocab_size"])
    print(f"  {name}: loss {loss.item():.12f}, greedy {tokens.tolist()} (min margin {margin:.3e})")
    ref = assemble(ids, logits, loss, None, prompt, tokens)
    save_reference(ref, d / "reference.safetensors", f"{name}: pure path, logits over the padded vocab ({vocab_padded})")


# ----------------------------------------------------------------------------
# kernel-level SSD reference
# ----------------------------------------------------------------------------

SSD_CASES = {
    "g1": dict(B=2, L=11, H=3, P=4, G=1, N=5, Q=4, dt_limit=(0.0, INF), seed=31),
    "g3": dict(B=1, L=9, H=6, P=2, G=3, N=3, Q=3, dt_limit=(0.05, 0.6), seed=32),
}
SSD_INPUTS = ["x", "dt", "dt_bias", "a", "b", "c", "d", "initial_state"]


def ssd_inputs(c, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    B, L, H, P, G, N = (c[k] for k in "BLHPGN")
    t = {
        "x": r(B, L, H, P),
        "dt": r(B, L, H) * 1.2 - 1.0,  # raw: softplus(dt + dt_bias) spans about 0.02 .. 2
        "dt_bias": r(H) * 0.5,
        "a": -torch.exp(r(H) * 0.5),
        "b": r(B, L, G, N),
        "c": r(B, L, G, N),
        "d": r(H),
        "initial_state": r(B, H, P, N) * 0.5,
    }
    t["dy"] = r(B, L, H, P)
    t["d_final_state"] = r(B, H, P, N)
    return t


def ssd_forward_backward(t, dt_limit, chunk=None):
    """Outputs and gradients of sum(y * dy) + sum(final_state * d_final_state)."""
    leaves = [t[k].detach().clone().requires_grad_(True) for k in SSD_INPUTS]
    with torch.enable_grad():
        x, dt, dt_bias, a, b, c, d, s0 = leaves
        if chunk is None:
            y, fs = ssd_recurrence(x, dt, dt_bias, a, b, c, d, dt_limit, s0)
        else:
            y, fs = ssd_chunked(x, dt, dt_bias, a, b, c, d, dt_limit, chunk, s0)
        loss = (y * t["dy"]).sum() + (fs * t["d_final_state"]).sum()
        grads = torch.autograd.grad(loss, leaves)
    return y.detach(), fs.detach(), dict(zip(SSD_INPUTS, grads))


def ssd_case_tensors(case, c):
    """Inputs (seed c["seed"], bumped by 1000 until no softplus value lies within 1e-3
    of a finite clamp bound), outputs and gradients of one case."""
    lo, hi = c["dt_limit"]
    for k in range(64):
        seed = c["seed"] + 1000 * k
        t = ssd_inputs(c, seed)
        sp = F.softplus(t["dt"] + t["dt_bias"])
        gap = min([(sp - bound).abs().min().item() for bound in (lo, hi) if 0.0 < bound < INF], default=INF)
        if gap > 1e-3:
            break
    else:
        raise RuntimeError("no seed keeps softplus away from the clamp bounds")
    below, above = int((sp < lo).sum()), int((sp > hi).sum())
    y, fs, grads = ssd_forward_backward(t, c["dt_limit"])
    yc, fsc, gc = ssd_forward_backward(t, c["dt_limit"], chunk=c["Q"])
    nums = {
        "y": maxdiff(y, yc),
        "final_state": maxdiff(fs, fsc),
        "grads": max(maxdiff(grads[k], gc[k]) for k in SSD_INPUTS),
    }
    NUMBERS["ssd " + case] = dict(nums, seed=seed, below=below, above=above, n=sp.numel(), gap=gap,
                                  softplus_range=(sp.min().item(), sp.max().item()))
    print(f"  ssd {case}: seed {seed}, softplus(dt + dt_bias) in [{sp.min().item():.4f}, {sp.max().item():.4f}], "
          f"dt_limit ({lo}, {hi}): {below} of {sp.numel()} clamped up to lo, {above} clamped down to hi, "
          f"nearest |softplus - clamping bound| {gap:.3e}; recurrence vs chunked (Q={c['Q']}): y {nums['y']:.3e}, "
          f"final_state {nums['final_state']:.3e}, grads {nums['grads']:.3e}")
    if case == "g3":
        assert below > 0 and above > 0
    out = {f"{case}.{k}": t[k] for k in SSD_INPUTS + ["dy", "d_final_state"]}
    out[f"{case}.dt_limit"] = torch.tensor([lo, hi], dtype=torch.float64)
    out[f"{case}.chunk"] = torch.tensor([float(c["Q"])], dtype=torch.float64)
    out[f"{case}.y"] = y
    out[f"{case}.final_state"] = fs
    for k in SSD_INPUTS:
        out[f"{case}.grad.{k}"] = grads[k]
    return out


def make_ssd_reference():
    print("ssd_reference.safetensors")
    out = {}
    for case, c in SSD_CASES.items():
        out.update(ssd_case_tensors(case, c))
    save_reference(out, SSD_PATH, "SSD scan: literal recurrence in float64, autograd gradients")


def verify_ssd():
    ref = load_file(str(SSD_PATH))
    ok = True
    for case, c in SSD_CASES.items():
        t = {k: ref[f"{case}.{k}"] for k in SSD_INPUTS + ["dy", "d_final_state"]}
        lo, hi = ref[f"{case}.dt_limit"].tolist()
        chunk = ref[f"{case}.chunk"].item()
        y, fs, grads = ssd_forward_backward(t, (lo, hi))
        exact = torch.equal(y, ref[f"{case}.y"]) and torch.equal(fs, ref[f"{case}.final_state"])
        exact &= all(torch.equal(grads[k], ref[f"{case}.grad.{k}"]) for k in SSD_INPUTS)
        yc, fsc, _ = ssd_forward_backward(t, (lo, hi), chunk=int(chunk))
        close = maxdiff(yc, y) < 1e-12 and maxdiff(fsc, fs) < 1e-12
        dtypes = {str(v.dtype) for k, v in ref.items() if k.startswith(case + ".")}
        print(f"  ssd {case}: {len([k for k in ref if k.startswith(case + '.')])} tensors, dtypes {dtypes}, "
              f"recurrence exact {exact}, chunked (Q={chunk:g}) within 1e-12 {close}")
        ok &= exact and close and dtypes == {"torch.float64"}
    return ok


# ----------------------------------------------------------------------------
# the list of directories, and verification
# ----------------------------------------------------------------------------

HF_DIRS = {
    # name: (class, config, seed, seq_len, source of the committed reference)
    "falcon-tiny-hf": (FalconMambaForCausalLM, lambda: falcon_config(16, 2, 40, 5, 4, 2, 3, 1e-6, tie=False), 11, 13, "hf"),
    "mamba2-tiny-hf": (Mamba2ForCausalLM, lambda: mamba2_config(15, 2, 41, 5, 4, 2, 6, 1, 4, tie=False), 12, 13, "hf"),
    "mamba2-tiny-hf-limit": (Mamba2ForCausalLM,
                             lambda: mamba2_config(15, 2, 41, 5, 4, 2, 6, 1, 4, tie=True, limit=(0.004, 0.04)),
                             13, 13, "hf"),
    "mamba2-g4-hf": (Mamba2ForCausalLM, lambda: mamba2_config(16, 2, 40, 6, 4, 2, 4, 4, 3, tie=False), 15, 13, "pure"),
}
ORIGINAL_DIR = ("mamba2-g2-original", 14, 12)


def verify():
    print("verify:")
    ok = True
    for name, (cls, _, _, _, source) in HF_DIRS.items():
        d = OUT_ROOT / name
        m64, loaded_dtype = load_hf(cls, d)
        a = arch_of(m64.config)
        ref = load_file(str(d / "reference.safetensors"))
        ids = ref["input_ids"]
        if source == "hf":
            logits, loss, grads = hf_reference(m64, ids)
            fn = lambda s: hf_logits(m64, s)  # noqa: E731
        else:
            logits, loss, grads = pure_reference(params_f64(m64), ids, a)
            p = params_f64(m64)
            fn = lambda s: pure_logits(p, s, a)  # noqa: E731
        exact = torch.equal(logits, ref["logits"]) and torch.equal(loss, ref["loss"])
        g_names = sorted(k[5:] for k in ref if k.startswith("grad."))
        g_ok = g_names == sorted(grads) and all(torch.equal(grads[k], ref["grad." + k]) for k in grads)
        toks, _ = greedy_loop(fn, ref["greedy_prompt"], ref["greedy_tokens"].shape[1])
        t_ok = torch.equal(toks, ref["greedy_tokens"])
        extra = ""
        if a["kind"] == "mamba2":
            extra = f", n_groups {a['groups']}, time_step_limit {a['dt_limit']}"
        print(f"  {name}: loaded dtype {loaded_dtype}{extra}, logits+loss exact {exact}, "
              f"{len(g_names)} grads exact {g_ok}, greedy {t_ok}")
        ok &= exact and g_ok and t_ok and loaded_dtype == torch.float32
    name, _, _ = ORIGINAL_DIR
    d = OUT_ROOT / name
    oc = json.loads((d / "config.json").read_text())
    sd = torch.load(str(d / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    shared = sd["lm_head.weight"].untyped_storage().data_ptr() == sd["backbone.embedding.weight"].untyped_storage().data_ptr()
    cfg, vocab_padded = original_hf_config(oc)
    assert sd["backbone.embedding.weight"].shape[0] == vocab_padded
    a = arch_of(cfg)
    p = original_params_f64(sd)
    ref = load_file(str(d / "reference.safetensors"))
    logits, loss, _ = pure_reference(p, ref["input_ids"], a)
    exact = torch.equal(logits, ref["logits"]) and torch.equal(loss, ref["loss"])
    toks, _ = greedy_loop(lambda s: pure_logits(p, s, a), ref["greedy_prompt"], ref["greedy_tokens"].shape[1],
                          valid_vocab=oc["vocab_size"])
    t_ok = torch.equal(toks, ref["greedy_tokens"])
    dtypes = {str(v.dtype) for v in sd.values()}
    contiguous = all(v.is_contiguous() for v in sd.values())
    # the same weights through transformers' Mamba2 (its load hook renames backbone.embedding.)
    model = Mamba2ForCausalLM(cfg)
    model.load_state_dict({k: v for k, v in sd.items()}, strict=True)
    hf_d = maxdiff(hf_logits(model.double().eval(), ref["input_ids"]), ref["logits"])
    print(f"  {name}: {len(sd)} keys, dtypes {dtypes}, contiguous {contiguous}, lm_head shares storage {shared}, "
          f"logits+loss exact {exact}, greedy {t_ok}; transformers on the same file vs reference {hf_d:.3e}")
    ok &= exact and t_ok and shared and dtypes == {"torch.float32"} and contiguous
    ok &= verify_ssd()
    total = 0
    files = [f for n in list(HF_DIRS) + [ORIGINAL_DIR[0]] for f in sorted((OUT_ROOT / n).iterdir())] + [SSD_PATH]
    for f in files:
        total += f.stat().st_size
        print(f"  {f.stat().st_size:>9}  {f.relative_to(REPO_ROOT)}  sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:16]}")
    print(f"  total {total} bytes")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verify", action="store_true", help="only re-check the existing files")
    args = ap.parse_args()
    # one thread: results then cannot depend on how a machine splits the work
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "1")))
    torch.use_deterministic_algorithms(True)
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"safetensors {safetensors.__version__}, numpy {np.__version__}"
    )
    for pkg in ("mamba_ssm", "causal_conv1d"):  # their kernels would replace the torch paths
        assert importlib.util.find_spec(pkg) is None, f"{pkg} is installed; uninstall it"
    if not args.verify:
        OUT_ROOT.mkdir(parents=True, exist_ok=True)
        for name, (cls, cfg_fn, seed, seq_len, source) in HF_DIRS.items():
            make_hf_dir(name, cls, cfg_fn(), seed, seq_len, source)
        make_original_dir(*ORIGINAL_DIR)
        make_ssd_reference()
        print(f"largest softplus argument seen: {max(SOFTPLUS_CHECK):.3f} (F.softplus switches to identity above 20)")
        print("summary:", json.dumps(NUMBERS, default=str))
    ok = verify()
    for f in [f for n in list(HF_DIRS) + [ORIGINAL_DIR[0]] for f in (OUT_ROOT / n).iterdir()] + [SSD_PATH]:
        f.chmod(0o644)  # safetensors creates its files with mode 0600
    print("OK" if ok else "VERIFY FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
