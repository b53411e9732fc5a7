#!/usr/bin/env python3
"""Generate whole-model reference data for the Transformer++ (Llama) baseline of
`selective` from Hugging Face transformers' ``LlamaForCausalLM`` (eager
attention, CPU, float64), so that the Rust tests can check the model, its loader,
its gradients and its KV-cached decoding without PyTorch. Companion of
scripts/make_model_reference.py (the Mamba fixtures), whose helpers it imports.

How to run (from the repository root; CPU only, a few seconds)
    pip install torch transformers safetensors numpy
    python3 scripts/make_transformer_reference.py            # writes tests/data/models/{tiny,small}-llama/
    python3 scripts/make_transformer_reference.py --verify   # only re-check what is there

Versions used for the committed files
    Python 3.11.7, torch 2.15.0 (PyPI wheel "2.15.0+cu132", run on CPU),
    transformers 5.25.0, safetensors 0.8.0, numpy 2.4.6, huggingface-hub 2.4.0.
    HF_HUB_OFFLINE=1 (nothing is downloaded), one torch thread.

Output (under tests/data/models/), about 1 MB, byte-for-byte reproducible
    tiny-llama/   config.json, generation_config.json, model.safetensors (f32) exactly
                  as save_pretrained writes them, + reference.safetensors + kv_decode.safetensors.
                  vocab 40, hidden 24, intermediate 40, 2 layers, 3 heads (= 3 kv heads),
                  head_dim 8, rms_norm_eps 1e-5, rope theta 10000, tied embeddings; seed 1;
                  input (2, 13)
    small-llama/  same recipe: vocab 72, hidden 48, intermediate 80, 3 layers, 4 heads
                  (= 4 kv heads), head_dim 12, rms_norm_eps 1e-6, rope theta 500 (small, so
                  that the rotation matters at short lengths), untied lm_head; seed 2;
                  input (2, 37)

config.json (as transformers 5.25 writes it; tiny-llama, every key)
    architectures ["LlamaForCausalLM"], attention_bias false, attention_dropout 0.0,
    bos_token_id 0, dtype "float32", eos_token_id 0, head_dim 8, hidden_act "silu",
    hidden_size 24, initializer_range 0.1, intermediate_size 40,
    max_position_embeddings 128, mlp_bias false, model_type "llama",
    num_attention_heads 3, num_hidden_layers 2, num_key_value_heads 3, pad_token_id 0,
    pretraining_tp 1, rms_norm_eps 1e-05,
    rope_parameters {"rope_theta": 10000.0, "rope_type": "default"},
    tie_word_embeddings true, transformers_version "5.25.0", use_cache true,
    vocab_size 40.
    RoPE theta is NOT a top-level "rope_theta" key in this version: it is
    rope_parameters.rope_theta (older transformers, and most Llama checkpoints on
    the Hub, write a top-level "rope_theta" and optionally "rope_scaling"; a loader
    should accept both). "head_dim" is written explicitly. attn_implementation is
    not written (it is a load-time choice; eager is used here).

Random models
    LlamaConfig with every relevant field set explicitly (llama_config; pad, bos and
    eos ids all 0, initializer_range 0.1 so that the random model is not near
    uniform), torch.manual_seed(seed), LlamaForCausalLM(cfg) (library init: normal
    (0, 0.1) weights, norms 1, embedding row 0 (padding_idx = pad_token_id = 0)
    zeroed), then perturb(seed + 1): input_layernorm, post_attention_layernorm and
    model.norm weights *= 1 + 0.2 randn (one torch.Generator, named_parameters()
    order), then mlp.down_proj.weight *= 8 (DOWN_PROJ_GAIN; o_proj is left alone,
    O_PROJ_GAIN = 1): with the plain library init the tied tiny model's greedy
    continuations merely repeat a token (none of 64 candidate prompts passes the
    test below); with the gain the first candidate prompt already gives 7 distinct
    tokens of 8 (margin 0.087). small-llama gets the same gain (one recipe; it
    also widens its greedy margins). Attention still matters a lot: zeroing o_proj
    changes the logits by about their own spread, dropping RoPE by 23% / 68%.
    The f32 model is saved with save_pretrained, reloaded with from_pretrained
    (attn_implementation="eager"), upcast to float64 and only then evaluated, so
    the references are the float64 function of exactly the stored f32 weights.
    Token ids: input_ids = 1 + rand_ids(seed + 2, (2, T), vocab - 1), i.e. drawn
    from [1, vocab): id 0 is the padding id, and nn.Embedding(padding_idx=0) gives
    no gradient to row 0 through the lookup (a PyTorch quirk the Rust model need not
    copy), so the inputs avoid it; the embedding gradient then is the plain one.
    The greedy prompt is the first of 1 + rand_ids(seed + 3 + 1000 k, (1, 5),
    vocab - 1), k = 0, 1, ..., whose 8-token greedy continuation has >= 4 distinct
    tokens, a top-1 logit margin >= 1e-2 at every step and no EOS id 0 (committed:
    k = 0 for both; tiny-llama [20, 4, 38, 15, 16] -> [9, 12, 23, 32, 24, 8, 32, 24],
    margin 0.087; small-llama [21, 22, 27, 70, 60] -> [24, 67, 29, 40, 34, 47, 55, 71],
    margin 0.060).

reference.safetensors tensors (all contiguous, little-endian)
    input_ids      I64 (B, T)
    logits         F64 (B, T, vocab)
    loss           F64 (1,)            mean next-token cross-entropy:
                                       CE(logits[:, :-1], input_ids[:, 1:]) averaged
                                       over all B*(T-1) predictions, natural log
    grad.<name>    F64                 d loss / d parameter, for every name in
                                       model.named_parameters(); in tiny-llama the tied
                                       head appears once, as model.embed_tokens.weight
                                       (small-llama also has grad.lm_head.weight)
    greedy_prompt  I64 (1, 5)
    greedy_tokens  I64 (1, 8)          the 8 tokens generate(max_new_tokens=8,
                                       do_sample=False) appends to greedy_prompt (KV
                                       cache), cross-checked against a cache-free
                                       argmax loop
kv_decode.safetensors tensors
    decode_position I64 (1,)           t = T - 1
    decode_logits  F64 (vocab,)        logits at position t of batch row 0 of input_ids,
                                       computed by a prefill of positions 0..t-1
                                       (use_cache=True) and then ONE cached decode step
                                       with token input_ids[0, t]; agrees with
                                       logits[0, t] to ~1e-15 (printed), not bit-exact.

The maths (transformers 5.25, eager attention), for the Rust side
    h = embed[ids]; per layer: h += o_proj(attn(rope(q_proj(n)), rope(k_proj(n)),
    v_proj(n))) with n = rmsnorm(h) * input_layernorm.weight; then h +=
    down_proj(silu(gate_proj(n)) * up_proj(n)) with n = rmsnorm(h) *
    post_attention_layernorm.weight; logits = lm_head(rmsnorm(h) * norm.weight).
    rmsnorm(x) = x / sqrt(mean(x^2) + eps) (weight multiplies afterwards). Heads are
    contiguous blocks of head_dim in the q/k/v projections' output features. RoPE is
    the "rotate_half" (GPT-NeoX) convention, NOT interleaved pairs: for a head
    vector x of size d = head_dim, x1 = x[:d/2], x2 = x[d/2:], inv_freq[i] =
    1 / theta^(2i/d) (i < d/2), angle = position * inv_freq[i], and
    out[:d/2] = x1 cos - x2 sin, out[d/2:] = x2 cos + x1 sin (positions from 0).
    scores = q k^T / sqrt(head_dim) + causal mask, softmax, times v. No biases.

Float64 note (important)
    ``model.double()`` is NOT enough for a float64 computation in transformers
    5.25: LlamaRMSNorm casts its input to float32, eager attention does
    ``softmax(..., dtype=torch.float32)`` and the rotary inverse frequencies are
    computed in float32 at construction (``model.double()`` only upcasts the
    rounded values). Every computation therefore runs inside
    make_model_reference's ``exact_float64()`` (Tensor.float()/.to(float32) are
    no-ops on float64 tensors), this script installs a softmax wrapper that, while
    exact_float64() is active (and only then), turns a dtype=float32 request on a
    float64 input into float64 (install_softmax_hook), and exact_rope() recomputes
    inv_freq in float64. An op-level audit (TorchDispatchMode) checks that the
    patched forward produces no floating tensor other than float64, except the
    float32 copy of the integer position ids (exact). The script prints how far the
    unpatched HF float64 run (all three f32 roundings) is from the pure one: max
    |logits diff| 4.2e-7 (tiny-llama), 1.2e-6 (small-llama); the f32 softmax alone
    gives 1.8e-7 / 5.7e-7, the f32-built inv_freq alone 2.7e-9 / 2.2e-7.
    Independently, a plain numpy float64 implementation of "The maths" above, on
    the f32 model.safetensors, matches the reference logits to 5e-15.

Reproducibility
    Output bytes are identical from run to run (same versions): save_pretrained's
    safetensors metadata is the single {"format": "pt"}, ours has a single "note"
    key (several would be written in hash order). After writing, verify() reloads
    each directory with from_pretrained and checks that logits, loss, every
    gradient, greedy tokens and decode_logits come out bit-identical.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.dont_write_bytecode = True  # no scripts/__pycache__ from the import below
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

warnings.filterwarnings("ignore")

import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import make_model_reference as mmr  # noqa: E402
from make_model_reference import (  # noqa: E402
    exact_float64,
    fresh_dir,
    greedy,
    next_token_loss,
    rand_ids,
    reference,
)

try:  # progress bars of save_pretrained / from_pretrained go to stderr; keep the log readable
    transformers.utils.logging.disable_progress_bar()
except Exception:  # noqa: BLE001
    pass

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_ROOT = REPO_ROOT / "tests" / "data" / "models"
N_NEW = 8

# ----------------------------------------------------------------------------
# float64 hygiene, beyond make_model_reference.exact_float64()
# ----------------------------------------------------------------------------

_ORIG_SOFTMAX = F.softmax


def _exact_float64_active():
    return torch.Tensor.float is mmr._float_keep_f64


def _softmax_keep_f64(input, dim=None, _stacklevel=3, dtype=None):
    if dtype is torch.float32 and input.dtype == torch.float64 and _exact_float64_active():
        dtype = torch.float64
    return _ORIG_SOFTMAX(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)


def install_softmax_hook():
    """Eager attention calls nn.functional.softmax(w, dim=-1, dtype=torch.float32):
    while exact_float64() is active, keep float64 inputs in float64. Outside
    exact_float64() the wrapper does exactly what softmax does."""
    if torch.nn.functional.softmax is not _softmax_keep_f64:
        torch.nn.functional.softmax = _softmax_keep_f64


install_softmax_hook()


def head_dim_of(cfg):
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def rope_theta_of(cfg):
    rp = getattr(cfg, "rope_parameters", None)
    if rp:
        assert rp.get("rope_type", "default") == "default", rp
        return float(rp["rope_theta"])
    assert getattr(cfg, "rope_scaling", None) in (None, {}), cfg.rope_scaling
    return float(cfg.rope_theta)


@torch.no_grad()
def exact_rope(model):
    """Recompute the rotary inverse frequencies in float64 (the library builds them
    in float32 at construction; model.double() would only upcast the rounded values)."""
    rot = model.model.rotary_emb
    assert rot.rope_type == "default" and float(rot.attention_scaling) == 1.0
    d = head_dim_of(model.config)
    inv = 1.0 / (rope_theta_of(model.config) ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    rot.inv_freq = inv
    rot.original_inv_freq = inv.clone()
    return model


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
                ins = [a.dtype for a in args if isinstance(a, torch.Tensor)]
                self.bad.append((str(func), str(o.dtype), [str(x) for x in ins]))
        return out


def audit_forward(model64, ids):
    """Run the patched forward under DtypeAudit; allow only integer -> float32 copies
    (the rotary position ids, exact for positions < 2^24)."""
    audit = DtypeAudit()
    with exact_float64(), torch.no_grad(), audit:
        logits = model64(input_ids=ids, use_cache=False).logits
    assert logits.dtype == torch.float64
    allowed = [b for b in audit.bad if b[0].startswith("aten._to_copy") and b[2] == ["torch.int64"]]
    other = [b for b in audit.bad if b not in allowed]
    assert not other, f"non-float64 floating ops in the patched forward: {other[:5]}"
    return len(allowed)


# ----------------------------------------------------------------------------
# configs and random models
# ----------------------------------------------------------------------------


def llama_config(vocab, hidden, intermediate, layers, heads, kv_heads, head_dim, eps, theta, tied):
    """A LlamaConfig with every relevant field given (defaults differ: eps 1e-6,
    bos 1 / eos 2, no pad, initializer_range 0.02, untied, ...)."""
    fields = set(getattr(LlamaConfig, "__dataclass_fields__", {})) | set(inspect.signature(LlamaConfig).parameters)
    if "rope_parameters" in fields:  # transformers >= 5
        rope = {"rope_parameters": {"rope_type": "default", "rope_theta": float(theta)}}
    else:  # transformers 4.x
        rope = {"rope_theta": float(theta), "rope_scaling": None}
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        hidden_act="silu",
        max_position_embeddings=128,
        initializer_range=0.1,
        rms_norm_eps=eps,
        use_cache=True,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        pretraining_tp=1,
        tie_word_embeddings=tied,
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        attn_implementation="eager",
        **rope,
    )
    assert cfg._attn_implementation == "eager"
    assert head_dim_of(cfg) == head_dim and rope_theta_of(cfg) == float(theta)
    return cfg


@torch.no_grad()
def perturb(model, seed):
    """The norm weights (library init: ones) *= 1 + 0.2 randn, named_parameters() order."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith((".input_layernorm.weight", ".post_attention_layernorm.weight")) or name == "model.norm.weight":
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# Extra step beyond "library init + perturb" (as OUT_PROJ_GAIN in the Mamba
# script): with the library init the tied tiny model's greedy continuations just
# repeat a token (no candidate prompt passes pick_prompt), a weak test of
# generation; scaling the MLP output projections up lets the blocks steer the next
# token. (Gains tried on tiny-llama, prompts passing out of 64: o1/d1 0, o4/d4 3,
# o8/d8 4, o1/d4 22, o1/d8 33.) The final RMSNorm keeps the logits O(1).
O_PROJ_GAIN = 1.0
DOWN_PROJ_GAIN = 8.0


def random_llama(cfg, seed):
    """f32 model: library init under torch.manual_seed(seed), perturb(seed + 1),
    then o_proj.weight *= O_PROJ_GAIN, down_proj.weight *= DOWN_PROJ_GAIN."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == cfg.tie_word_embeddings
    assert all(p.dtype == torch.float32 for p in model.parameters())
    perturb(model, seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".self_attn.o_proj.weight"):
                p.mul_(O_PROJ_GAIN)
            elif name.endswith(".mlp.down_proj.weight"):
                p.mul_(DOWN_PROJ_GAIN)
    return model


def load_llama(d):
    """from_pretrained (eager attention), failing on missing/unexpected/mis-shaped weights."""
    model, info = LlamaForCausalLM.from_pretrained(str(d), attn_implementation="eager", output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{d}: loading problems {bad}"
    assert model.config._attn_implementation == "eager"
    return model.eval()


def as_f64(model):
    """float64 copy in place: parameters upcast (exactly), rope recomputed in float64."""
    m = exact_rope(model.double().eval())
    assert all(p.dtype == torch.float64 for p in m.parameters())
    return m


def ids_no_pad(seed, shape, vocab):
    """Token ids from [1, vocab): id 0 is the padding (and bos/eos) id, see header."""
    return rand_ids(seed, shape, vocab - 1) + 1


def pick_prompt(model64, seed, vocab, n_new, tries=64):
    """First prompt (1, 5) drawn with seed, seed + 1000, ... whose greedy continuation
    has >= 4 distinct tokens, no EOS id 0 and a top-1 margin >= 1e-2 at every step."""
    for t in range(tries):
        prompt = ids_no_pad(seed + 1000 * t, (1, 5), vocab)
        try:
            tokens, margin = greedy(model64, prompt, n_new)
        except AssertionError:
            continue
        if len(set(tokens[0].tolist())) >= 4 and margin >= 1e-2:
            print(f"  prompt seed {seed + 1000 * t}: {prompt.tolist()} -> {tokens.tolist()} (margin {margin:.3e})")
            return prompt
    raise RuntimeError("no suitable greedy prompt found")


# ----------------------------------------------------------------------------
# KV-cached decode
# ----------------------------------------------------------------------------

_CACHE_KW = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def kv_decode_logits(model64, ids_row, t):
    """Logits of position t: prefill positions 0..t-1 (use_cache=True), then one
    cached decode step with token ids_row[t]."""
    with exact_float64(), torch.no_grad():
        pre = model64(input_ids=ids_row[None, :t], use_cache=True)
        cache = pre[_CACHE_KW] if _CACHE_KW in pre else pre["past_key_values"]
        assert cache is not None and cache.get_seq_length() == t
        step = model64(input_ids=ids_row[None, t:t + 1], use_cache=True, **{_CACHE_KW: cache})
        assert cache.get_seq_length() == t + 1
    logits = step.logits
    assert logits.dtype == torch.float64 and logits.shape[:2] == (1, 1)
    return logits[0, 0].contiguous()


def unpatched_hf_logits(d, ids):
    """Information only: HF's own float64 run (from_pretrained(...).double(); its
    f32 casts in RMSNorm and softmax and its f32-built inv_freq kept)."""
    m = load_llama(d).double()
    with torch.no_grad():
        return m(input_ids=ids, use_cache=False).logits.double()


# ----------------------------------------------------------------------------
# the directories
# ----------------------------------------------------------------------------


def save_st(tensors, path, note):
    # ONE metadata key: safetensors writes the metadata map in hash order
    meta = {
        "note": f"{note}; scripts/make_transformer_reference.py, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)


def make_dir(name, cfg, seed, seq_len):
    print(f"{name}: seed {seed}")
    model = random_llama(cfg, seed)
    d = fresh_dir(name)
    model.float().save_pretrained(str(d), safe_serialization=True)
    # the reference model: the stored f32 weights, reloaded, upcast to float64
    loaded = load_llama(d)
    sd_mem, sd_file = model.state_dict(), loaded.state_dict()
    assert sd_mem.keys() == sd_file.keys() and all(torch.equal(sd_mem[k], sd_file[k]) for k in sd_mem)
    m64 = as_f64(loaded)
    ids = ids_no_pad(seed + 2, (2, seq_len), cfg.vocab_size)
    n_int_casts = audit_forward(m64, ids)
    prompt = pick_prompt(m64, seed + 3, cfg.vocab_size, N_NEW)
    ref = reference(m64, ids, prompt, N_NEW, with_grads=True, tag=name)
    names = [n for n, _ in m64.named_parameters()]
    assert [k[5:] for k in ref if k.startswith("grad.")] == names
    plain = unpatched_hf_logits(d, ids)
    print(
        f"  {name}: patched forward audited: all floating ops float64 (+{n_int_casts} int64->f32 position casts); "
        f"unpatched HF .double() (f32 RMSNorm/softmax/inv_freq) vs pure f64 max |diff| "
        f"{(plain - ref['logits']).abs().max().item():.3e}"
    )
    save_st(ref, d / "reference.safetensors", f"{name}: f32 weights (model.safetensors) evaluated in float64")
    t = seq_len - 1
    dec = kv_decode_logits(m64, ids[0], t)
    print(f"  {name}: kv decode at t={t} vs full forward max |diff| {(dec - ref['logits'][0, t]).abs().max().item():.3e}")
    save_st(
        {"decode_logits": dec, "decode_position": torch.tensor([t], dtype=torch.int64)},
        d / "kv_decode.safetensors",
        f"{name}: logits of input_ids[0, {t}] after a prefill of positions 0..{t - 1}, one cached decode step",
    )


CONFIGS = {
    "tiny-llama": (dict(vocab=40, hidden=24, intermediate=40, layers=2, heads=3, kv_heads=3, head_dim=8,
                        eps=1e-5, theta=10000.0, tied=True), 1, 13),
    "small-llama": (dict(vocab=72, hidden=48, intermediate=80, layers=3, heads=4, kv_heads=4, head_dim=12,
                         eps=1e-6, theta=500.0, tied=False), 2, 37),
}


# ----------------------------------------------------------------------------
# verification: reload what was written and recompute
# ----------------------------------------------------------------------------


def verify():
    print("verify:")
    ok = True
    for name in CONFIGS:
        d = OUT_ROOT / name
        model = load_llama(d)
        loaded_dtype = model.dtype
        m64 = as_f64(model)
        ref = load_file(str(d / "reference.safetensors"))
        ids = ref["input_ids"]
        with exact_float64():
            m64.zero_grad(set_to_none=True)
            logits = m64(input_ids=ids, use_cache=False).logits
            loss = next_token_loss(logits, ids)
            loss.backward()
        exact = torch.equal(logits.detach(), ref["logits"])
        loss_ok = torch.equal(loss.detach().reshape(1), ref["loss"])
        grads = {"grad." + n: p.grad for n, p in m64.named_parameters()}
        g_keys = sorted(k for k in ref if k.startswith("grad."))
        grads_ok = sorted(grads) == g_keys and all(torch.equal(grads[k], ref[k]) for k in g_keys)
        toks, _ = greedy(m64, ref["greedy_prompt"], ref["greedy_tokens"].shape[1])
        g_ok = torch.equal(toks, ref["greedy_tokens"])
        kv = load_file(str(d / "kv_decode.safetensors"))
        t = int(kv["decode_position"].item())
        dec_ok = torch.equal(kv_decode_logits(m64, ids[0], t), kv["decode_logits"])
        print(f"  {name}: loaded dtype {loaded_dtype}, logits exact {exact}, loss exact {loss_ok}, "
              f"{len(g_keys)} grads exact {grads_ok}, greedy {g_ok}, kv decode exact {dec_ok}")
        ok &= exact and loss_ok and grads_ok and g_ok and dec_ok
    total = 0
    for name in CONFIGS:
        for f in sorted((OUT_ROOT / name).iterdir()):
            total += f.stat().st_size
            print(f"  {f.stat().st_size:>9}  {f.relative_to(REPO_ROOT)}  sha256 {hashlib.sha256(f.read_bytes()).hexdigest()}")
    print(f"  total {total} bytes")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verify", action="store_true", help="only re-check the existing files")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "1")))
    torch.use_deterministic_algorithms(True)
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"safetensors {safetensors.__version__}, numpy {np.__version__}"
    )
    if not args.verify:
        OUT_ROOT.mkdir(parents=True, exist_ok=True)
        for name, (kw, seed, seq_len) in CONFIGS.items():
            make_dir(name, llama_config(**kw), seed, seq_len)
    ok = verify()
    for name in CONFIGS:  # safetensors creates its files with mode 0600
        for f in (OUT_ROOT / name).iterdir():
            f.chmod(0o644)
    print("OK" if ok else "VERIFY FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
