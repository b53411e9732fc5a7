#!/usr/bin/env python3
"""Generate whole-model reference data for `selective` from Hugging Face
transformers' ``MambaForCausalLM`` (its slow pure-PyTorch path, CPU, float64),
so that the Rust tests can check the model, its loaders and its gradients
without PyTorch.

How to run (from the repository root; CPU only, about a minute, ~3 GB RAM for
the mamba-130m-sized case)
    pip install torch transformers safetensors numpy
    python3 scripts/make_model_reference.py            # writes tests/data/models/
    python3 scripts/make_model_reference.py --verify   # only re-check what is there

Versions used for the committed files
    Python 3.11.7, torch 2.15.0 (PyPI wheel, run on CPU), transformers 5.24.0,
    safetensors 0.8.0, numpy 2.4.6, huggingface-hub 2.4.0.
    No mamba-ssm / causal-conv1d installed (so the pure-torch fallbacks run),
    HF_HUB_OFFLINE=1 (nothing is downloaded).

Output (under tests/data/models/), about 3.3 MB, byte-for-byte reproducible
    tiny-hf/        config.json, generation_config.json, model.safetensors (f32)
                    exactly as save_pretrained writes them, + reference.safetensors.
                    hidden 16, 2 layers, vocab 40, state 4, conv 4, expand 2, dt_rank 2;
                    input (2, 13)
    small-hf/       same recipe: hidden 64, 3 layers, vocab 96, state 16, dt_rank 4;
                    input (2, 33)
    small-bf16/     the small-hf weights saved in bfloat16 (config "dtype": "bfloat16");
                    reference from the bf16 weights upcast to float64 (no grads)
    tiny-original/  state-spaces layout: config.json (d_model/n_layer/ssm_cfg, vocab 37
                    padded to 40) + pytorch_model.bin (torch.save of the state dict,
                    original key names, lm_head.weight on the embedding's storage)
                    + reference.safetensors (logits over the padded 40; no grads)
    mamba-130m-uniform/  config.json (HF format), GENERATOR.md, reference.safetensors
                    only: the weights come from the SplitMix64/FNV-1a generator in
                    generated_param() (reimplemented in Rust), see GENERATOR.md.

Random models (tiny-hf, small-hf, tiny-original)
    MambaConfig with every field set explicitly (hf_config), torch.manual_seed(seed),
    MambaForCausalLM(cfg) (library init), then perturb(seed + 1): norm weights
    *= 1 + 0.2 randn, D += 0.3 randn, conv1d.bias, A_log, dt_proj.bias += 0.2 randn
    (one torch.Generator, named_parameters() order), then out_proj.weight *= 8
    (OUT_PROJ_GAIN: without it every greedy continuation merely repeats the last
    prompt token). Seeds: tiny-hf 1, small-hf 2, tiny-original 4; input_ids use
    seed + 2. The greedy prompt is the first of rand_ids(seed + 3 + 1000 k), k = 0,
    1, ..., whose 8-token greedy continuation has >= 4 distinct tokens, a top-1
    logit margin >= 1e-2 at every step, no EOS id 0 (all configs keep HF's
    eos_token_id 0, which would stop generate()) and, for tiny-original, no padding
    id >= 37.

reference.safetensors tensors (all contiguous, little-endian)
    input_ids      I64 (B, T)
    logits         F64 (B, T, vocab)   [F32 for mamba-130m-uniform, computed in f64]
    loss           F64 (1,)            mean next-token cross-entropy:
                                       CE(logits[:, :-1], input_ids[:, 1:]) averaged
                                       over all B*(T-1) predictions, natural log
    grad.<name>    F64                 d loss / d parameter, for every name in
                                       model.named_parameters() (tiny-hf, small-hf);
                                       the tied head appears once, as
                                       backbone.embeddings.weight
    greedy_prompt  I64 (1, P)
    greedy_tokens  I64 (1, K)          the K tokens generate(max_new_tokens=K,
                                       do_sample=False) appends to greedy_prompt
                                       (cross-checked against a cache-free argmax loop)

Float64 note (important)
    In transformers 5.24 ``model.double()`` is NOT enough for a float64
    computation: MambaRMSNorm casts its input to float32, MambaBlock casts the
    residual to float32 (residual_in_fp32), the mixer does ``A_log.float()``,
    ``D.float()``, ``dt_proj.bias.float()``, ``B.float()`` ..., and
    MambaForCausalLM returns ``lm_head(...).float()`` (float32 logits). Every
    computation here therefore runs inside ``exact_float64()``, which makes
    ``Tensor.float()`` / ``Tensor.to(torch.float32)`` a no-op on float64 tensors
    while it is active. The maths is unchanged; only those downcasts go. The
    script prints how far the unpatched HF float64 run is from the pure one
    (2e-7 .. 8e-7 on the small models, 2e-6 on mamba-130m-uniform).

Reproducibility
    Output bytes are identical from run to run (same versions): the safetensors
    metadata has a single key (several would be written in hash order), and the
    random 40-digit `.data/serialization_id` record torch.save puts in
    pytorch_model.bin is overwritten with the zero-padded seed
    (fix_serialization_id; CRC-32 updated, nothing else touched).
    After writing, verify() reloads every directory (from_pretrained for the HF
    ones, torch.load + key renaming for tiny-original, the generator for
    mamba-130m-uniform) and checks that logits, loss and greedy tokens come out
    bit-identical.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import copy
import hashlib
import json
import math
import shutil
import sys
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")

import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import MambaConfig, MambaForCausalLM  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
OUT_ROOT = REPO_ROOT / "tests" / "data" / "models"

# ----------------------------------------------------------------------------
# float64 hygiene
# ----------------------------------------------------------------------------

_ORIG_TO = torch.Tensor.to
_ORIG_FLOAT = torch.Tensor.float


def _to_keep_f64(self, *args, **kwargs):
    if self.dtype == torch.float64:
        args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        if kwargs.get("dtype") is torch.float32:
            kwargs["dtype"] = torch.float64
    return _ORIG_TO(self, *args, **kwargs)


def _float_keep_f64(self, *args, **kwargs):
    if self.dtype == torch.float64:
        return self
    return _ORIG_FLOAT(self, *args, **kwargs)


@contextlib.contextmanager
def exact_float64():
    """While active, float64 tensors ignore casts to float32 (see header)."""
    torch.Tensor.to = _to_keep_f64
    torch.Tensor.float = _float_keep_f64
    try:
        yield
    finally:
        torch.Tensor.to = _ORIG_TO
        torch.Tensor.float = _ORIG_FLOAT


# ----------------------------------------------------------------------------
# configs and random models
# ----------------------------------------------------------------------------


def hf_config(hidden, layers, vocab, state, conv, expand, dt_rank):
    """A MambaConfig with EVERY field given (a bare MambaConfig() differs)."""
    return MambaConfig(
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
        tie_word_embeddings=True,
    )


@torch.no_grad()
def perturb(model, seed):
    """Perturb the parameters the library initialises to constants."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # fixed order
        noise = lambda: torch.randn(p.shape, generator=g, dtype=p.dtype)  # noqa: E731
        if name.endswith(".norm.weight") or name == "backbone.norm_f.weight":
            p.mul_(1 + 0.2 * noise())
        elif name.endswith(".mixer.D"):
            p.add_(0.3 * noise())
        elif name.endswith(".conv1d.bias"):
            p.add_(0.2 * noise())
        elif name.endswith(".A_log"):
            p.add_(0.2 * noise())
        elif name.endswith(".dt_proj.bias"):
            p.add_(0.2 * noise())


# Extra step beyond "library init + perturb": with the library's init the mixer
# output is small next to the residual stream, so (tied head) every greedy
# continuation just repeats the last prompt token, which makes a weak test of
# generation. Scaling out_proj up lets the mixers steer the next token.
OUT_PROJ_GAIN = 8.0


def random_hf_model(cfg, seed):
    """f32 model: library init under torch.manual_seed(seed), perturb(seed + 1),
    then out_proj.weight *= OUT_PROJ_GAIN."""
    torch.manual_seed(seed)
    model = MambaForCausalLM(cfg).eval()
    assert model.lm_head.weight is model.backbone.embeddings.weight
    perturb(model, seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".out_proj.weight"):
                p.mul_(OUT_PROJ_GAIN)
    return model


def pick_prompt(model64, seed, high, n_new, valid_vocab=None, tries=64):
    """First prompt (1, 5) drawn with seed, seed + 1000, seed + 2000, ... whose greedy
    continuation has >= 4 distinct tokens, no EOS/padding id and a top-1 margin >= 1e-2."""
    for t in range(tries):
        prompt = rand_ids(seed + 1000 * t, (1, 5), high)
        try:
            tokens, margin = greedy(model64, prompt, n_new, valid_vocab)
        except AssertionError:
            continue
        if len(set(tokens[0].tolist())) >= 4 and margin >= 1e-2:
            print(f"  prompt seed {seed + 1000 * t}: {prompt.tolist()} -> {tokens.tolist()}")
            return prompt
    raise RuntimeError("no suitable greedy prompt found")


def as_f64(model):
    m = copy.deepcopy(model).double().eval()
    assert m.lm_head.weight is m.backbone.embeddings.weight
    return m


# ----------------------------------------------------------------------------
# reference computations (float64)
# ----------------------------------------------------------------------------


def forward_logits(model64, ids):
    with exact_float64(), torch.no_grad():
        logits = model64(input_ids=ids, use_cache=False).logits
    assert logits.dtype == torch.float64
    return logits


def next_token_loss(logits, ids):
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), ids[:, 1:].reshape(-1), reduction="mean")


def greedy(model64, prompt, n_new, valid_vocab=None):
    """Greedy continuation via generate() (cached/recurrent path), checked
    against a cache-free full-recompute argmax loop. Returns (tokens, min top-1 margin)."""
    with exact_float64(), torch.no_grad():
        out = model64.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new, do_sample=False
        )
        new = out[:, prompt.shape[1]:]
        seq, margins = prompt, []
        for _ in range(n_new):
            last = model64(input_ids=seq, use_cache=False).logits[:, -1]
            assert last.dtype == torch.float64
            top2 = last.topk(2, dim=-1).values
            margins.append((top2[:, 0] - top2[:, 1]).min().item())
            seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    manual = seq[:, prompt.shape[1]:]
    assert new.shape == (prompt.shape[0], n_new), f"generate stopped early (EOS?): {new.tolist()}"
    assert torch.equal(new, manual), (new.tolist(), manual.tolist())
    # eos_token_id is 0 in every config: a 0 would end generation in some engines
    assert (new != 0).all(), f"greedy produced EOS id 0: {new.tolist()}"
    if valid_vocab is not None:
        assert (new < valid_vocab).all(), f"greedy produced a padding id: {new.tolist()}"
    return new.contiguous(), min(margins)


def reference(model64, ids, prompt, n_new, with_grads, valid_vocab=None, tag=""):
    ref = {"input_ids": ids.contiguous()}
    with exact_float64():
        model64.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = model64(input_ids=ids, use_cache=False).logits
            assert logits.dtype == torch.float64
            loss = next_token_loss(logits, ids)
            if with_grads:
                loss.backward()
    ref["logits"] = logits.detach().contiguous()
    ref["loss"] = loss.detach().reshape(1).contiguous()
    if with_grads:
        for name, p in model64.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float64, name
            ref["grad." + name] = p.grad.detach().clone().contiguous()
        model64.zero_grad(set_to_none=True)
    assert torch.equal(forward_logits(model64, ids), ref["logits"])  # grad/no-grad agree
    with torch.no_grad():  # information only: HF's own float64 run keeps its f32 casts
        hf_plain = model64(input_ids=ids, use_cache=False).logits
    plain_diff = (hf_plain.double() - ref["logits"]).abs().max().item()
    tokens, margin = greedy(model64, prompt, n_new, valid_vocab)
    ref["greedy_prompt"] = prompt.clone().contiguous()
    ref["greedy_tokens"] = tokens
    print(
        f"  {tag}: loss {ref['loss'].item():.12f}, |logits|max {ref['logits'].abs().max().item():.4f}, "
        f"unpatched-HF(f32 casts) vs f64 max diff {plain_diff:.3e}, greedy {tokens.tolist()} "
        f"(min top-1 margin {margin:.3e})"
    )
    return ref


def save_reference(ref, path, note):
    # ONE metadata key: safetensors writes the metadata map in hash order, so
    # several keys would make the header (not the data) differ from run to run
    meta = {
        "note": f"{note}; scripts/make_model_reference.py, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    }
    save_file({k: v.contiguous() for k, v in ref.items()}, str(path), metadata=meta)


def fresh_dir(name):
    d = OUT_ROOT / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


def rand_ids(seed, shape, high):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, high, shape, generator=g, dtype=torch.int64)


# ----------------------------------------------------------------------------
# the HF directories (1-3)
# ----------------------------------------------------------------------------


def make_hf_dir(name, cfg, seed, seq_len):
    print(f"{name}: seed {seed}")
    model = random_hf_model(cfg, seed)
    d = fresh_dir(name)
    model.save_pretrained(str(d), safe_serialization=True)
    ids = rand_ids(seed + 2, (2, seq_len), cfg.vocab_size)
    m64 = as_f64(model)
    prompt = pick_prompt(m64, seed + 3, cfg.vocab_size, 8)
    ref = reference(m64, ids, prompt, 8, with_grads=True, tag=name)
    save_reference(ref, d / "reference.safetensors", f"{name}: f32 weights (model.safetensors) evaluated in float64")
    return model, ids, prompt


def make_bf16_dir(name, model_f32, ids, prompt):
    print(f"{name}: bfloat16 copy of small-hf")
    model_bf16 = copy.deepcopy(model_f32).to(torch.bfloat16)
    d = fresh_dir(name)
    model_bf16.save_pretrained(str(d), safe_serialization=True)
    ref = reference(as_f64(model_bf16), ids, prompt, 8, with_grads=False, tag=name)
    save_reference(ref, d / "reference.safetensors", f"{name}: bf16 weights upcast to float64")


# ----------------------------------------------------------------------------
# the original state-spaces layout (4)
# ----------------------------------------------------------------------------

ORIGINAL_CONFIG = {
    "d_model": 16,
    "n_layer": 2,
    "vocab_size": 37,
    "ssm_cfg": {"d_state": 4, "d_conv": 4, "expand": 2, "dt_rank": 2},
    "rms_norm": True,
    "residual_in_fp32": True,
    "fused_add_norm": True,
    "pad_vocab_size_multiple": 8,
    "tie_embeddings": True,
}

# A skeleton of the official mamba_ssm 1.x module tree (MambaLMHeadModel ->
# MixerModel -> Block(mixer, norm) -> Mamba), with the same attribute names and
# registration order, so that its state_dict() is what the official
# `torch.save(model.state_dict(), "pytorch_model.bin")` pickles: an OrderedDict
# (with the usual `_metadata` attribute) in the official key order (Mamba's own
# A_log and D first, then in_proj, conv1d, x_proj, dt_proj, out_proj; a Block's
# mixer before its norm), lm_head.weight tied to backbone.embedding.weight.


class _OrigMamba(torch.nn.Module):
    def __init__(self, d_model, d_state, d_conv, expand, dt_rank):
        super().__init__()
        d_inner = expand * d_model
        self.in_proj = torch.nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = torch.nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.act = torch.nn.SiLU()
        self.x_proj = torch.nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = torch.nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = torch.nn.Parameter(torch.zeros(d_inner, d_state))
        self.D = torch.nn.Parameter(torch.zeros(d_inner))
        self.out_proj = torch.nn.Linear(d_inner, d_model, bias=False)


class _OrigRMSNorm(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(d))
        self.register_parameter("bias", None)


class _OrigBlock(torch.nn.Module):
    def __init__(self, d_model, ssm):
        super().__init__()
        self.mixer = _OrigMamba(d_model, **ssm)
        self.norm = _OrigRMSNorm(d_model)


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
    """The HF model's weights as the official MambaLMHeadModel.state_dict() holds them."""
    s = oc["ssm_cfg"]
    ssm = {"d_state": s["d_state"], "d_conv": s["d_conv"], "expand": s["expand"], "dt_rank": s["dt_rank"]}
    orig = _OrigLMHeadModel(oc["d_model"], oc["n_layer"], vocab_padded, ssm)
    hf = {k: v.detach() for k, v in model_f32.state_dict().items() if k != "lm_head.weight"}
    renamed = {("backbone.embedding.weight" if k == "backbone.embeddings.weight" else k): v for k, v in hf.items()}
    renamed["lm_head.weight"] = renamed["backbone.embedding.weight"]
    orig.load_state_dict(renamed, strict=True)
    sd = orig.state_dict()  # OrderedDict, param.detach() per key, tied head shares storage
    assert len(sd) == len(hf) + 1 and sd["lm_head.weight"].data_ptr() == sd["backbone.embedding.weight"].data_ptr()
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    return sd


def fix_serialization_id(path, new_id):
    """torch.save writes a random 40-digit `<root>/.data/serialization_id` record;
    overwrite it in place (same length, CRC-32 fixed in the local and central
    headers) so that the file is byte-for-byte reproducible. Nothing else changes."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        (info,) = [i for i in z.infolist() if i.filename.endswith("/.data/serialization_id")]
    new = new_id.encode("ascii")
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size == len(new)
    name = info.filename.encode("utf-8")
    h = info.header_offset
    assert data[h:h + 4] == b"PK\x03\x04" and data[h + 30:h + 30 + len(name)] == name
    n_len, x_len = struct.unpack_from("<HH", data, h + 26)
    start = h + 30 + n_len + x_len
    data[start:start + len(new)] = new
    crc = struct.pack("<I", zlib.crc32(new))
    data[h + 14:h + 18] = crc  # local header
    c = 0
    found = 0
    while True:  # central directory entry with that name
        c = data.find(b"PK\x01\x02", c)
        if c < 0:
            break
        cn_len = struct.unpack_from("<H", data, c + 28)[0]
        if data[c + 46:c + 46 + cn_len] == name:
            data[c + 16:c + 20] = crc
            found += 1
        c += 4
    assert found == 1
    path.write_bytes(bytes(data))
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None and z.read(info.filename) == new


def make_original_dir(name, seed):
    print(f"{name}: seed {seed}")
    oc = ORIGINAL_CONFIG
    mult = oc["pad_vocab_size_multiple"]
    vocab_padded = (oc["vocab_size"] + mult - 1) // mult * mult  # 37 -> 40
    s = oc["ssm_cfg"]
    cfg = hf_config(oc["d_model"], oc["n_layer"], vocab_padded, s["d_state"], s["d_conv"], s["expand"], s["dt_rank"])
    model = random_hf_model(cfg, seed)
    d = fresh_dir(name)
    (d / "config.json").write_text(json.dumps(oc) + "\n")
    sd = original_state_dict(model, oc, vocab_padded)
    torch.save(sd, str(d / "pytorch_model.bin"))
    fix_serialization_id(d / "pytorch_model.bin", f"{seed:040d}")
    ids = rand_ids(seed + 2, (2, 9), oc["vocab_size"])
    m64 = as_f64(model)
    prompt = pick_prompt(m64, seed + 3, oc["vocab_size"], 8, valid_vocab=oc["vocab_size"])
    ref = reference(m64, ids, prompt, 8, with_grads=False, valid_vocab=oc["vocab_size"], tag=name)
    save_reference(ref, d / "reference.safetensors", f"{name}: logits over the padded vocab ({vocab_padded})")


# ----------------------------------------------------------------------------
# mamba-130m-sized model with generated weights (5)
# ----------------------------------------------------------------------------

MASK64 = (1 << 64) - 1
SM_GAMMA = 0x9E3779B97F4A7C15
SM_M1 = 0xBF58476D1CE4E5B9
SM_M2 = 0x94D049BB133111EB
FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3


def fnv1a64(name: str) -> int:
    h = FNV_OFFSET
    for b in name.encode("utf-8"):
        h ^= b
        h = (h * FNV_PRIME) & MASK64
    return h


class SplitMix64:
    """Reference scalar implementation (the Rust port mirrors this)."""

    def __init__(self, seed: int):
        self.state = seed & MASK64

    def next(self) -> int:
        self.state = (self.state + SM_GAMMA) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * SM_M1) & MASK64
        z = ((z ^ (z >> 27)) * SM_M2) & MASK64
        return z ^ (z >> 31)

    def uniform(self) -> float:
        return (self.next() >> 11) * 2.0**-53


def splitmix64_uniform_array(seed: int, n: int) -> np.ndarray:
    """Vectorised SplitMix64: the i-th output (i = 1..n) mixes seed + i*gamma."""
    z = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z *= np.uint64(SM_GAMMA)
        z += np.uint64(seed)
        z ^= z >> np.uint64(30)
        z *= np.uint64(SM_M1)
        z ^= z >> np.uint64(27)
        z *= np.uint64(SM_M2)
        z ^= z >> np.uint64(31)
    z >>= np.uint64(11)
    return z.astype(np.float64) * 2.0**-53


def generated_param(name: str, shape) -> np.ndarray:
    """Float64 value of parameter `name` (HF name) under the uniform generator."""
    n = int(np.prod(shape))
    seed = fnv1a64(name)
    u = splitmix64_uniform_array(seed, n)
    ref = SplitMix64(seed)  # scalar cross-check of the first elements
    for i in range(min(n, 16)):
        assert ref.uniform() == u[i]
    e = 2.0 * u - 1.0
    if name == "backbone.embeddings.weight":
        v = 0.1 * e
    elif name.endswith((".in_proj.weight", ".x_proj.weight", ".out_proj.weight", ".dt_proj.weight")):
        v = e / math.sqrt(shape[1])
    elif name.endswith(".conv1d.weight"):
        v = 0.5 * e
    elif name.endswith(".conv1d.bias"):
        v = 0.1 * e
    elif name.endswith(".dt_proj.bias"):
        lo, hi = math.log(0.001), math.log(0.1)
        out = []
        for x in e.tolist():  # scalar libm calls (same as Rust's f64 methods)
            dt = math.exp(lo + (x + 1.0) / 2.0 * (hi - lo))
            out.append(dt + math.log(-math.expm1(-dt)))
        v = np.array(out, dtype=np.float64)
    elif name.endswith(".A_log"):
        d_inner, n_state = shape
        logs = np.array([math.log(j + 1) for j in range(n_state)], dtype=np.float64)
        v = logs[None, :] + 0.1 * e.reshape(d_inner, n_state)
    elif name.endswith(".mixer.D"):
        v = 1.0 + 0.1 * e
    elif name.endswith(".norm.weight") or name == "backbone.norm_f.weight":
        v = 1.0 + 0.1 * e
    else:
        raise ValueError(f"no generator rule for {name}")
    return np.ascontiguousarray(v, dtype=np.float64).reshape(shape)


def build_uniform_model(cfg, checks=None):
    """float64 MambaForCausalLM whose parameters all come from generated_param."""
    torch.manual_seed(0)  # the library init is overwritten entirely
    model = MambaForCausalLM(cfg).double().eval()
    assert model.lm_head.weight is model.backbone.embeddings.weight
    with torch.no_grad():
        for pname, p in model.named_parameters():
            v = generated_param(pname, tuple(p.shape))
            p.copy_(torch.from_numpy(v))
            if checks is not None:
                checks[pname] = v.reshape(-1)[:4].tolist()
    return model


MAMBA130M_IDS = [510, 3158, 8516, 30013, 27287, 689, 253, 22658]


def make_uniform_dir(name):
    print(f"{name}: building the generated mamba-130m-sized model (float64)")
    cfg = hf_config(768, 24, 50280, 16, 4, 2, 48)
    checks = {}
    model = build_uniform_model(cfg, checks)
    n_params = sum(p.numel() for p in model.parameters())
    d = fresh_dir(name)
    cfg.architectures = ["MambaForCausalLM"]
    cfg.to_json_file(str(d / "config.json"))
    ids = torch.tensor([MAMBA130M_IDS], dtype=torch.int64)
    ref = reference(model, ids, ids, 4, with_grads=False, tag=name)
    ref["logits"] = ref["logits"].to(torch.float32)  # computed in f64, stored f32 (size)
    save_reference(ref, d / "reference.safetensors", f"{name}: generated weights, f64 compute, logits stored f32")
    write_generator_md(d / "GENERATOR.md", checks, n_params, ref)
    del model


def write_generator_md(path, checks, n_params, ref):
    def fmt(vals):
        return ", ".join(repr(float(x)) for x in vals)

    name_a = "backbone.layers.0.mixer.in_proj.weight"
    sm = SplitMix64(fnv1a64(name_a))
    raw = [sm.next() for _ in range(4)]
    lines = [
        "# mamba-130m-uniform: generated weights",
        "",
        "No weights are stored here. The model is the mamba-130m configuration (`config.json`,",
        "Hugging Face format: hidden 768, 24 layers, vocab 50280, state 16, conv 4, expand 2,",
        f"dt_rank 48, tied embeddings, eps 1e-5; {n_params} parameters) whose every parameter is",
        "produced by the deterministic generator below, evaluated in float64.",
        "`reference.safetensors` holds `input_ids` I64 (1, 8), `logits` F32 (1, 8, 50280) (computed in",
        "float64, rounded to f32 for storage), `loss` F64 (1,) (mean next-token cross-entropy over the 7",
        "predictions, from the f64 logits), `greedy_prompt` I64 (1, 8) (= input_ids) and",
        "`greedy_tokens` I64 (1, 4): the 4 tokens greedy generation appends (with these weights the",
        "residual stream is dominated by the input embedding and the tied head, so greedy decoding",
        "just repeats the last token, by a wide top-1 margin of about 7). Written by",
        "`scripts/make_model_reference.py` (function `generated_param`).",
        "",
        "## Generator",
        "",
        "All integer arithmetic is on u64, wrapping (mod 2^64).",
        "",
        "```text",
        "SplitMix64 { state: u64 }",
        "next():    state = state + 0x9E3779B97F4A7C15",
        "           z = state",
        "           z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9",
        "           z = (z ^ (z >> 27)) * 0x94D049BB133111EB",
        "           return z ^ (z >> 31)",
        "uniform(): (next() >> 11) as f64 * 2^-53          in [0, 1)",
        "",
        "fnv1a64(bytes): h = 0xcbf29ce484222325",
        "                for b in bytes: h = (h ^ b) * 0x100000001b3",
        "```",
        "",
        "For each parameter, by its Hugging Face name (e.g. `backbone.layers.3.mixer.in_proj.weight`):",
        "a fresh generator with `state = fnv1a64(utf8(name))`; the tensor's elements are filled in",
        "row-major order (last index fastest), one `uniform()` per element, `e = 2*uniform() - 1`",
        "(in [-1, 1)); the value is computed in f64 as follows (exactly this order of operations; the",
        "transcendental functions are the libm ones, i.e. Rust's `f64::exp`, `ln`, `exp_m1`, `sqrt`):",
        "",
        "| parameter | value |",
        "|---|---|",
        "| `backbone.embeddings.weight` [50280, 768] | `0.1 * e` |",
        "| `*.in_proj.weight`, `*.x_proj.weight`, `*.out_proj.weight`, `*.dt_proj.weight` | `e / sqrt(in_features)` (in_features = shape[1]) |",
        "| `*.conv1d.weight` [1536, 1, 4] | `0.5 * e` |",
        "| `*.conv1d.bias` | `0.1 * e` |",
        "| `*.dt_proj.bias` | `dt = exp(ln(0.001) + (e + 1) / 2 * (ln(0.1) - ln(0.001)))`; value `dt + ln(-exp_m1(-dt))` |",
        "| `*.A_log` [1536, 16] | `ln(n + 1) + 0.1 * e`, n = state index (column) |",
        "| `*.mixer.D` | `1 + 0.1 * e` |",
        "| `*.norm.weight`, `backbone.norm_f.weight` | `1 + 0.1 * e` |",
        "",
        "There is no `lm_head.weight`: the head is tied to `backbone.embeddings.weight`",
        "(the original layout's `backbone.embedding.weight` is the same tensor).",
        "",
        "## Check values",
        "",
        f"`fnv1a64(\"{name_a}\")` = `0x{fnv1a64(name_a):016x}`; its first 4 `next()` outputs:",
        "",
        "```text",
        *[f"0x{x:016x}" for x in raw],
        "```",
        "",
        "First 4 values (row-major) of some tensors, as f64 (Python `repr`, round-trips exactly):",
        "",
        "```text",
    ]
    for pname in [
        "backbone.embeddings.weight",
        name_a,
        "backbone.layers.0.mixer.A_log",
        "backbone.layers.0.mixer.conv1d.weight",
        "backbone.layers.0.mixer.conv1d.bias",
        "backbone.layers.0.mixer.x_proj.weight",
        "backbone.layers.0.mixer.dt_proj.weight",
        "backbone.layers.0.mixer.dt_proj.bias",
        "backbone.layers.0.mixer.D",
        "backbone.layers.0.mixer.out_proj.weight",
        "backbone.layers.0.norm.weight",
        "backbone.layers.23.mixer.in_proj.weight",
        "backbone.norm_f.weight",
    ]:
        lines.append(f"{pname}: [{fmt(checks[pname])}]")
    lines += [
        "```",
        "",
        f"Reference: input_ids {ref['input_ids'].tolist()}, greedy_tokens {ref['greedy_tokens'].tolist()},",
        f"logits[0, 0, :4] = [{fmt(ref['logits'][0, 0, :4].tolist())}] (f32).",
        "",
    ]
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------
# verification: reload what was written and recompute
# ----------------------------------------------------------------------------


def verify():
    print("verify:")
    ok = True
    for name in ["tiny-hf", "small-hf", "small-bf16"]:
        d = OUT_ROOT / name
        model, info = MambaForCausalLM.from_pretrained(str(d), output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        ref = load_file(str(d / "reference.safetensors"))
        loaded_dtype = model.dtype
        m64 = model.double().eval()
        logits = forward_logits(m64, ref["input_ids"])
        exact = torch.equal(logits, ref["logits"])
        loss_ok = torch.equal(next_token_loss(logits, ref["input_ids"]).reshape(1), ref["loss"])
        toks, _ = greedy(m64, ref["greedy_prompt"], ref["greedy_tokens"].shape[1])
        g_ok = torch.equal(toks, ref["greedy_tokens"])
        print(f"  {name}: loaded dtype {loaded_dtype}, logits exact {exact}, loss exact {loss_ok}, greedy {g_ok}, loading issues {bad}")
        ok &= exact and loss_ok and g_ok and not bad
    # original layout
    d = OUT_ROOT / "tiny-original"
    oc = json.loads((d / "config.json").read_text())
    sd = torch.load(str(d / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    shared = sd["lm_head.weight"].untyped_storage().data_ptr() == sd["backbone.embedding.weight"].untyped_storage().data_ptr()
    s = oc["ssm_cfg"]
    vocab_padded = sd["backbone.embedding.weight"].shape[0]
    cfg = hf_config(oc["d_model"], oc["n_layer"], vocab_padded, s["d_state"], s["d_conv"], s["expand"], s["dt_rank"])
    model = MambaForCausalLM(cfg)
    hf_sd = {("backbone.embeddings.weight" if k == "backbone.embedding.weight" else k): v for k, v in sd.items()}
    model.load_state_dict(hf_sd, strict=True)
    ref = load_file(str(d / "reference.safetensors"))
    m64 = model.double().eval()
    logits = forward_logits(m64, ref["input_ids"])
    exact = torch.equal(logits, ref["logits"])
    toks, _ = greedy(m64, ref["greedy_prompt"], ref["greedy_tokens"].shape[1], valid_vocab=oc["vocab_size"])
    g_ok = torch.equal(toks, ref["greedy_tokens"])
    dtypes = {str(v.dtype) for v in sd.values()}
    contiguous = all(v.is_contiguous() for v in sd.values())
    print(f"  tiny-original: {len(sd)} keys, dtypes {dtypes}, contiguous {contiguous}, lm_head shares storage {shared}, "
          f"logits exact {exact}, greedy {g_ok}")
    ok &= exact and g_ok and shared and dtypes == {"torch.float32"} and contiguous
    # generated model: rebuild from the generator and config.json, recompute
    d = OUT_ROOT / "mamba-130m-uniform"
    if (d / "reference.safetensors").exists():
        model = build_uniform_model(MambaConfig.from_json_file(str(d / "config.json")))
        ref = load_file(str(d / "reference.safetensors"))
        logits64 = forward_logits(model, ref["input_ids"])
        logits = logits64.to(torch.float32)
        exact = torch.equal(logits, ref["logits"])
        exact &= torch.equal(next_token_loss(logits64, ref["input_ids"]).reshape(1), ref["loss"])
        toks, _ = greedy(model, ref["greedy_prompt"], ref["greedy_tokens"].shape[1])
        g_ok = torch.equal(toks, ref["greedy_tokens"])
        print(f"  mamba-130m-uniform: logits (f32) and loss exact {exact}, greedy {g_ok}")
        ok &= exact and g_ok
        del model
    # files and sizes
    total = 0
    for f in sorted(OUT_ROOT.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"  {f.stat().st_size:>9}  {f.relative_to(REPO_ROOT)}  sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:16]}")
    print(f"  total {total} bytes")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verify", action="store_true", help="only re-check the existing files")
    ap.add_argument("--skip-130m", action="store_true", help="do not (re)build mamba-130m-uniform")
    args = ap.parse_args()
    # one thread: results then cannot depend on how a machine splits the work
    # (and a busy machine does not slow the run down through thread contention)
    torch.set_num_threads(int(os.environ.get("REF_THREADS", "1")))
    torch.use_deterministic_algorithms(True)
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"safetensors {safetensors.__version__}, numpy {np.__version__}"
    )
    if not args.verify:
        OUT_ROOT.mkdir(parents=True, exist_ok=True)
        make_hf_dir("tiny-hf", hf_config(16, 2, 40, 4, 4, 2, 2), seed=1, seq_len=13)
        small, ids, prompt = make_hf_dir("small-hf", hf_config(64, 3, 96, 16, 4, 2, 4), seed=2, seq_len=33)
        make_bf16_dir("small-bf16", small, ids, prompt)
        make_original_dir("tiny-original", seed=4)
        if not args.skip_130m:
            make_uniform_dir("mamba-130m-uniform")
    ok = verify()
    for f in OUT_ROOT.rglob("*"):  # safetensors creates its files with mode 0600
        if f.is_file():
            f.chmod(0o644)
    print("OK" if ok else "VERIFY FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
