#!/usr/bin/env python3
"""How long can a trained induction-heads model remember? (numpy, f64)

Runs one induction-heads sequence through a saved task model
(task-model.json + model.safetensors, arch mamba, layer s6) with the
equations of SPEC.md written again in numpy, and prints, for the channels
of each layer that write most at the token to recall or the next, their step size
Delta = softplus(dt_proj(x_proj(v)) + dt_bias) at the trigger, at the token
to recall and after it (layer 2 writes one token later: its conv sees
the trigger and the token together there), its mean over the filler tokens, and the channel's
memory horizon 1 / (mean filler Delta * min_n |A_n|): the number of filler
tokens after which the channel's slowest mode keeps 1/e of what was
written (h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t, eq. 2a / 4).

A model extrapolates to length L only if the channels it reads the answer
from have horizons well beyond L. `--hold` tests which: it sets the last
layer's filler Δ to 0 in a set of channels and reports the answer again.
Usage:

    python3 scripts/induction_heads_memory.py models/induction-heads [--len 4096]
    python3 scripts/induction_heads_memory.py models/induction-heads-stage6 --len 65536 --seed 4 --hold below:1e5
"""
import argparse
import json
import os

import numpy as np
from safetensors.numpy import load_file


def softplus(x):
    return np.log1p(np.exp(-np.abs(x))) + np.maximum(x, 0.0)


def silu(x):
    return x / (1.0 + np.exp(-x))


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--len", type=int, default=4096, help="sequence length")
    ap.add_argument("--trigger-at", type=int, help="first trigger position (default: drawn below L/2 - 1 from --seed)")
    ap.add_argument(
        "--hold",
        help="an ablation: set the last layer's Δ to 0 on the filler tokens (perfect memory) in "
        "'all' channels, those with a horizon 'below:H' or 'above:H' tokens, and compare the answers",
    )
    ap.add_argument("--channels", type=int, default=6, help="channels shown per layer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = json.load(open(os.path.join(args.model_dir, "task-model.json")))
    if cfg["layer"] != "s6" or cfg["arch"] != "mamba":
        raise SystemExit(f"{args.model_dir}: only layer s6 with arch mamba is analysed")
    w = {k: v.astype(np.float64) for k, v in load_file(os.path.join(args.model_dir, "model.safetensors")).items()}
    V, D = w["embedding.weight"].shape
    E, N, R, K = cfg["expand"] * D, cfg["d_state"], cfg["dt_rank"], cfg["d_conv"]
    L = args.len
    rng = np.random.default_rng(args.seed)
    p = args.trigger_at if args.trigger_at is not None else int(rng.integers(0, L // 2 - 1))
    if not 0 <= p < L - 4:
        raise SystemExit(f"the trigger at {p} must leave room in a sequence of {L}")

    # the generator's layout: trigger = V-1 at p and at L-1, the token to
    # recall at p+1, uniform fillers 0..V-2 elsewhere
    ids = rng.integers(0, V - 1, L)
    ids[p] = ids[L - 1] = V - 1
    answer_id = ids[p + 1]

    def block(layer, h, hold=None, report=False):
        """One residual block; `hold` picks channels whose filler Δ is set to 0."""
        P = lambda name: w[f"layers.{layer}.{name}"]
        xz = rms_norm(h, P("norm.weight"), cfg["norm_eps"]) @ P("mixer.in_proj.weight").T  # (L, 2E)
        x, z = xz[:, :E], xz[:, E:]
        cw = P("mixer.conv1d.weight")  # (E, K)
        xpad = np.vstack([np.zeros((K - 1, E)), x])
        v = silu(sum(xpad[k : k + L] * cw[:, k] for k in range(K)) + P("mixer.conv1d.bias"))  # (L, E)
        x_dbl = v @ P("mixer.x_proj.weight").T  # (L, R + 2N)
        dt_low, B, C = x_dbl[:, :R], x_dbl[:, R : R + N], x_dbl[:, R + N :]
        delta = softplus(dt_low @ P("mixer.dt_proj.weight").T + P("mixer.dt_proj.bias"))  # (L, E)
        A = -np.exp(P("mixer.A_log"))  # (E, N)

        fill = np.r_[p + 4 : L - 1]
        mean_fill = delta[fill].mean(0)
        horizon = 1.0 / (mean_fill * np.abs(A).min(1))
        if report:
            print(f"layers.{layer}: channels writing most at the token to recall (t = {p + 1}) or the next")
            print("  channel  Δ trigger  Δ recall   Δ next   mean Δ filler  max Δ filler  horizon (tokens)")
            for e in np.argsort(-np.maximum(delta[p + 1], delta[p + 2]))[: args.channels]:
                print(
                    f"  {e:7d}  {delta[p, e]:9.3g}  {delta[p + 1, e]:8.3g}  {delta[p + 2, e]:8.3g}"
                    f"  {mean_fill[e]:13.3g}  {delta[fill, e].max():12.3g}  {horizon[e]:16.3g}"
                )
        if hold is not None:
            chosen = hold(horizon)
            delta[np.ix_(fill, chosen)] = 0.0
            print(f"holding layers.{layer}'s {len(chosen)} channels {list(map(int, chosen))} on the fillers")

        hs = np.zeros((E, N))
        ys = np.empty((L, E))
        for t in range(L):  # eq. 2a / 2b, ZOH with B discretised as Δ B
            hs = np.exp(delta[t][:, None] * A) * hs + (delta[t] * v[t])[:, None] * B[t][None, :]
            ys[t] = hs @ C[t]
        y = (ys + P("mixer.D") * v) * silu(z)
        return h + y @ P("mixer.out_proj.weight").T

    def answer(h):
        logits = rms_norm(h[-1], w["norm_f.weight"], cfg["norm_eps"]) @ w["embedding.weight"].T
        top = np.argsort(-logits)[:2]
        return top[0], logits[top[0]] - logits[top[1]]

    h = w["embedding.weight"][ids]  # (L, D)
    last = cfg["n_layer"] - 1
    for layer in range(last):
        h = block(layer, h, report=True)
    h_last_in = h
    pred, margin = answer(block(last, h, report=True))
    print(f"length {L}, trigger at {p}: answer {answer_id}, predicted {pred} (logit margin {margin:.2f})")
    if args.hold:
        kind, _, value = args.hold.partition(":")
        if kind == "all":
            hold = lambda hz: np.arange(len(hz))
        elif kind == "below":
            hold = lambda hz: np.where(hz < float(value))[0]
        elif kind == "above":
            hold = lambda hz: np.where(hz >= float(value))[0]
        else:
            raise SystemExit(f"--hold {args.hold}: expected all, below:H or above:H")
        pred, margin = answer(block(last, h_last_in, hold=hold))
        print(f"with the hold: predicted {pred} (logit margin {margin:.2f})")


if __name__ == "__main__":
    main()
