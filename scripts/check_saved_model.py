#!/usr/bin/env python3
"""Check a model directory (as `selective` saves it: config.json +
model.safetensors, Hugging Face layout) with Hugging Face transformers.

    python3 scripts/check_saved_model.py DIR [--tol 1e-4]

Loads DIR with ``MambaForCausalLM.from_pretrained(DIR)`` (fails on missing,
unexpected or mis-shaped weights instead of silently initialising them), runs it
in float64 (pure: the library's float32 downcasts are neutralised, see
scripts/make_model_reference.py) on the ``input_ids`` of DIR/reference.safetensors
if there is one, else on fixed ids, and compares with the ``logits`` stored there
(and ``loss`` / ``greedy_tokens`` when present). Prints the max abs logits
difference; exit status 1 when it is above --tol (or anything else is off),
0 otherwise. Without a reference it only prints a summary of the logits.

A Llama (Transformer++) directory -- config.json with "model_type": "llama" or
"architectures": ["LlamaForCausalLM"] -- is loaded with
``LlamaForCausalLM.from_pretrained(DIR, attn_implementation="eager")`` instead and
run in float64 the way scripts/make_transformer_reference.py does (its softmax
hook and float64 rotary frequencies on top of exact_float64()); the same
comparisons follow, plus ``decode_logits`` when DIR/kv_decode.safetensors exists.

Needs: pip install torch transformers safetensors numpy (versions: see
make_model_reference.py / make_transformer_reference.py). Runs on CPU, nothing is
downloaded.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.dont_write_bytecode = True  # no scripts/__pycache__ from the import below
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import MambaForCausalLM  # noqa: E402

from make_model_reference import exact_float64, greedy, next_token_loss  # noqa: E402

FIXED_IDS = [[1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144]]


def main():
    ap = argparse.ArgumentParser(description="compare a saved model with Hugging Face transformers")
    ap.add_argument("dir", type=Path)
    ap.add_argument("--tol", type=float, default=1e-4, help="max abs logits difference allowed")
    args = ap.parse_args()
    d = args.dir

    raw_cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").exists() else {}
    is_llama = raw_cfg.get("model_type") == "llama" or "LlamaForCausalLM" in (raw_cfg.get("architectures") or [])
    if is_llama:
        # importing it also installs its softmax hook (active only inside exact_float64())
        import make_transformer_reference as mtr
        from transformers import LlamaForCausalLM

        model, info = LlamaForCausalLM.from_pretrained(str(d), attn_implementation="eager", output_loading_info=True)
        cfg = model.config
        print(
            f"{d}: llama, loaded dtype {model.dtype}; hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, "
            f"vocab {cfg.vocab_size}, intermediate {cfg.intermediate_size}, heads {cfg.num_attention_heads}, "
            f"kv_heads {cfg.num_key_value_heads}, head_dim {mtr.head_dim_of(cfg)}, rope theta {mtr.rope_theta_of(cfg)}, "
            f"eps {cfg.rms_norm_eps}, tied {cfg.tie_word_embeddings}, attention {cfg._attn_implementation}"
        )
    else:
        model, info = MambaForCausalLM.from_pretrained(str(d), output_loading_info=True)
        cfg = model.config
        print(
            f"{d}: loaded dtype {model.dtype}; hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, "
            f"vocab {cfg.vocab_size}, state {cfg.state_size}, conv {cfg.conv_kernel}, expand {cfg.expand}, "
            f"dt_rank {cfg.time_step_rank}, use_bias {cfg.use_bias}, conv_bias {cfg.use_conv_bias}, "
            f"eps {cfg.layer_norm_epsilon}, tied {cfg.tie_word_embeddings}"
        )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        print(f"FAIL: loading problems {problems}")
        sys.exit(1)
    model = model.double().eval()
    if is_llama:
        mtr.exact_rope(model)  # rotary inverse frequencies in float64

    ref_path = d / "reference.safetensors"
    ref = load_file(str(ref_path)) if ref_path.exists() else {}
    if "input_ids" in ref:
        ids = ref["input_ids"].to(torch.int64)
    else:
        ids = torch.tensor(FIXED_IDS, dtype=torch.int64) % cfg.vocab_size
    with exact_float64(), torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert logits.dtype == torch.float64

    ok = bool(torch.isfinite(logits).all())
    if not ok:
        print("FAIL: non-finite logits")
    if "logits" not in ref:
        print(f"no reference logits; ids {ids.shape}, logits {tuple(logits.shape)}, "
              f"mean {logits.mean().item():.6f}, std {logits.std().item():.6f}, |max| {logits.abs().max().item():.6f}")
        sys.exit(0 if ok else 1)

    want = ref["logits"].to(torch.float64)
    if want.shape != logits.shape:
        print(f"FAIL: logits shape {tuple(logits.shape)} != reference {tuple(want.shape)}")
        sys.exit(1)
    diff = (logits - want).abs().max().item()
    print(f"max abs logits diff {diff:.3e} (tol {args.tol:g}) over {tuple(logits.shape)}")
    ok &= diff <= args.tol
    if "loss" in ref:
        loss = next_token_loss(logits, ids).item()
        ldiff = abs(loss - ref["loss"].double().item())
        print(f"loss {loss:.12f}, abs diff {ldiff:.3e}")
        ok &= ldiff <= args.tol
    if "greedy_tokens" in ref:
        prompt = ref.get("greedy_prompt", ids[:1])
        try:
            toks, margin = greedy(model, prompt, ref["greedy_tokens"].shape[1])
            same = torch.equal(toks, ref["greedy_tokens"])
            print(f"greedy {toks.tolist()} {'==' if same else '!='} reference {ref['greedy_tokens'].tolist()}")
        except AssertionError as e:  # e.g. generation hit EOS
            same = False
            print(f"greedy failed: {e}")
        ok &= same
    kv_path = d / "kv_decode.safetensors"
    if is_llama and kv_path.exists():
        kv = load_file(str(kv_path))
        t = int(kv["decode_position"].item())
        dec = mtr.kv_decode_logits(model, ids[0], t)
        kdiff = (dec - kv["decode_logits"].to(torch.float64)).abs().max().item()
        print(f"kv decode at position {t}: max abs logits diff {kdiff:.3e}")
        ok &= kdiff <= args.tol
    print("OK" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
