#!/usr/bin/env python3
"""How long can a trained induction-heads model remember? (numpy, f64)

Runs one induction-heads sequence through a saved task model
(task-model.json + model.safetensors, arch mamba, layer s6) with the
equations of SPEC.md written again in numpy, and prints, for the channels
of each layer that write most at the token to recall, their step size
Delta = softplus(dt_proj(x_proj(v)) + dt_bias) at the trigger, at the token
to recall and after it, its mean over the filler tokens, and the channel's
memory horizon 1 / (mean filler Delta * min_n |A_n|): the number of filler
tokens after which the channel's slowest mode keeps 1/e of what was
written (h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t, eq. 2a / 4).

A model extrapolates to length L only if the channels it reads the answer
from have horizons well beyond L. Usage:

    python3 scripts/induction_heads_memory.py models/induction-heads [--len 4096]
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
    ap.add_argument("--trigger-at", type=int, default=5, help="first trigger position")
    ap.add_argument("--channels", type=int, default=6, help="channels shown per layer")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = json.load(open(os.path.join(args.model_dir, "task-model.json")))
    if cfg["layer"] != "s6" or cfg["arch"] != "mamba":
        raise SystemExit(f"{args.model_dir}: only layer s6 with arch mamba is analysed")
    w = {k: v.astype(np.float64) for k, v in load_file(os.path.join(args.model_dir, "model.safetensors")).items()}
    V, D = w["embedding.weight"].shape
    E, N, R, K = cfg["expand"] * D, cfg["d_state"], cfg["dt_rank"], cfg["d_conv"]
    L, p = args.len, args.trigger_at
    if not 0 <= p < L - 3:
        raise SystemExit(f"--trigger-at {p} must leave room in a sequence of {L}")

    # the generator's layout: trigger = V-1 at p and at L-1, the token to
    # recall at p+1, uniform fillers 0..V-2 elsewhere
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, V - 1, L)
    ids[p] = ids[L - 1] = V - 1
    answer = ids[p + 1]

    h = w["embedding.weight"][ids]  # (L, D)
    for layer in range(cfg["n_layer"]):
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
        print(f"layer {layer}: channels writing most at the token to recall (t = {p + 1})")
        print("  channel  Δ trigger  Δ recall   Δ next   mean Δ filler  max Δ filler  horizon (tokens)")
        for e in np.argsort(-delta[p + 1])[: args.channels]:
            print(
                f"  {e:7d}  {delta[p, e]:9.3g}  {delta[p + 1, e]:8.3g}  {delta[p + 2, e]:8.3g}"
                f"  {mean_fill[e]:13.3g}  {delta[fill, e].max():12.3g}  {horizon[e]:16.3g}"
            )

        hs = np.zeros((E, N))
        ys = np.empty((L, E))
        for t in range(L):  # eq. 2a / 2b, ZOH with B discretised as Δ B
            hs = np.exp(delta[t][:, None] * A) * hs + (delta[t] * v[t])[:, None] * B[t][None, :]
            ys[t] = hs @ C[t]
        y = (ys + P("mixer.D") * v) * silu(z)
        h = h + y @ P("mixer.out_proj.weight").T

    logits = rms_norm(h[-1], w["norm_f.weight"], cfg["norm_eps"]) @ w["embedding.weight"].T
    top = np.argsort(-logits)[:2]
    print(f"length {L}: answer {answer}, predicted {top[0]} (logit margin {logits[top[0]] - logits[top[1]]:.2f})")


if __name__ == "__main__":
    main()
