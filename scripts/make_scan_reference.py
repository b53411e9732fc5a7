#!/usr/bin/env python3
"""Generate golden reference numbers for the selective scan from the OFFICIAL
Mamba PyTorch reference implementation, ``selective_scan_ref`` in
``mamba_ssm/ops/selective_scan_interface.py`` (state-spaces/mamba), with
PyTorch autograd for the gradients.

What it does
    1. Downloads the mamba-ssm source distribution from PyPI with pip (cached in
       $MAMBA_SDIST_DIR, default /tmp/mamba_sdist) and checks its sha256.
       The official code is NOT vendored in this repository.
    2. Reads selective_scan_interface.py straight out of the tarball, parses it
       with ``ast`` and execs only the ``selective_scan_ref`` FunctionDef in a
       namespace holding torch, torch.nn.functional as F and einops'
       rearrange/repeat (importing the module itself needs the CUDA extensions).
    3. Runs a fixed set of seeded cases (float32 inputs, official layouts,
       "variable B/C" 3-D form) with return_last_state=True, takes a seeded
       random upstream gradient grad_out and computes the gradients of
       sum(out * grad_out) w.r.t. every input with torch.autograd.grad.
    4. Writes tests/data/selective_scan_ref.json (path relative to the repo
       root; override with the first command-line argument).

How to run (from the repository root, CPU only is fine)
    pip install torch einops numpy
    python3 scripts/make_scan_reference.py
    # optional: MAMBA_SDIST_DIR=/some/cache python3 scripts/make_scan_reference.py [out.json]

Versions used for the committed file
    Python 3.11.7, torch 2.15.0 (PyPI wheel, run on CPU), einops 0.8.2,
    numpy 2.4.6, mamba-ssm 2.2.2 sdist
    (sha256 009de2d74decd847d463ae9cdbc1f9419f454ca6bf9beab36ed5243f01ea44d5).

Float format
    Every number is a float32 value written as the shortest decimal that maps
    back to exactly that float32 (checked here, including a one-f64-ulp margin
    so that parsing to f64 and casting to f32 recovers the same bits).
"""

import ast
import glob
import hashlib
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange, repeat

MAMBA_SSM_VERSION = "2.2.2"
SDIST_SHA256 = {
    "2.2.2": "009de2d74decd847d463ae9cdbc1f9419f454ca6bf9beab36ed5243f01ea44d5",
}
REF_PATH_IN_SDIST = "mamba_ssm/ops/selective_scan_interface.py"

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "tests", "data", "selective_scan_ref.json")

LAYOUT = (
    "u, delta, z, out: (batch, dim, len); A: (dim, dstate); "
    "B, C: (batch, dstate, len); D, delta_bias: (dim); "
    "last_state: (batch, dim, dstate); all flattened row-major"
)


# --------------------------------------------------------------------------
# Fetch the official reference function
# --------------------------------------------------------------------------

def fetch_sdist(version):
    cache = os.environ.get("MAMBA_SDIST_DIR", "/tmp/mamba_sdist")
    os.makedirs(cache, exist_ok=True)
    pattern = os.path.join(cache, f"mamba_ssm-{version}.tar.gz")
    if not glob.glob(pattern):
        # setup.py imports torch at top level, hence --no-build-isolation (torch
        # is installed anyway); MAMBA_SKIP_CUDA_BUILD keeps metadata generation
        # from touching CUDA.
        env = dict(os.environ, MAMBA_SKIP_CUDA_BUILD="TRUE", MAMBA_FORCE_BUILD="FALSE")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             "--no-build-isolation", f"mamba-ssm=={version}", "-d", cache],
            check=True, env=env,
        )
    paths = glob.glob(pattern)
    if not paths:
        raise SystemExit(f"sdist not found after download: {pattern}")
    path = paths[0]
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    want = SDIST_SHA256.get(version)
    if want is not None and digest != want:
        raise SystemExit(f"sha256 mismatch for {path}: {digest} != {want}")
    return path


def load_selective_scan_ref(sdist_path, version):
    with tarfile.open(sdist_path, "r:gz") as tf:
        member = tf.getmember(f"mamba_ssm-{version}/{REF_PATH_IN_SDIST}")
        source = tf.extractfile(member).read().decode("utf-8")
    tree = ast.parse(source)
    fdefs = [n for n in tree.body
             if isinstance(n, ast.FunctionDef) and n.name == "selective_scan_ref"]
    if len(fdefs) != 1:
        raise SystemExit("selective_scan_ref not found in the official source")
    module = ast.Module(body=fdefs, type_ignores=[])
    ns = {"torch": torch, "F": F, "rearrange": rearrange, "repeat": repeat}
    exec(compile(module, f"<{REF_PATH_IN_SDIST}:selective_scan_ref>", "exec"), ns)
    return ns["selective_scan_ref"]


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------

CASES = [
    # name, batch, dim, dstate, len, D, z, delta_bias, softplus, A kind
    dict(name="minimal", batch=1, dim=3, dstate=2, len=1,
         D=False, z=False, bias=False, softplus=False, a="random"),
    dict(name="full_small", batch=2, dim=5, dstate=3, len=7,
         D=True, z=True, bias=True, softplus=True, a="random"),
    dict(name="full_odd", batch=2, dim=7, dstate=16, len=37,
         D=True, z=True, bias=True, softplus=True, a="random"),
    dict(name="no_z", batch=3, dim=4, dstate=5, len=19,
         D=True, z=False, bias=True, softplus=True, a="random"),
    dict(name="no_softplus_D", batch=1, dim=6, dstate=4, len=13,
         D=True, z=False, bias=False, softplus=False, a="random"),
    dict(name="s4d_real_init", batch=2, dim=8, dstate=16, len=50,
         D=True, z=True, bias=True, softplus=True, a="s4d_real"),
    dict(name="large_delta", batch=1, dim=4, dstate=3, len=9,
         D=True, z=True, bias=True, softplus=True, a="random", large=True),
]

BASE_SEED = 20240601


def make_inputs(case, seed):
    g = torch.Generator().manual_seed(seed)
    b, d, n, L = case["batch"], case["dim"], case["dstate"], case["len"]
    f32 = torch.float32

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=f32)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=f32)

    u = randn(b, d, L)
    if case["softplus"]:
        delta = randn(b, d, L) * 0.5 - 1.0
    else:
        delta = 0.01 + 0.49 * rand(b, d, L)  # uniform(0.01, 0.5), positive
    if case["a"] == "s4d_real":
        # Mamba's S4D-real init: A_log = log(1..N), A = -exp(A_log) = -(n+1)
        A = -torch.arange(1, n + 1, dtype=f32).repeat(d, 1)
    else:
        A = -torch.exp(randn(d, n) * 0.5)
    B = randn(b, n, L)
    C = randn(b, n, L)
    D = randn(d) if case["D"] else None
    z = randn(b, d, L) if case["z"] else None
    delta_bias = randn(d) * 0.5 if case["bias"] else None
    if case.get("large"):
        # Put some pre-softplus values (delta + delta_bias) above softplus'
        # threshold of 20 (linear branch) and some large ones below it.
        bias = delta_bias if delta_bias is not None else torch.zeros(d)
        for (bi, di, ti), target in [((0, 0, 2), 20.5), ((0, 1, 5), 23.0),
                                     ((0, 3, 8), 30.0), ((0, 2, 0), 15.0),
                                     ((0, 2, 4), 5.0)]:
            delta[bi, di, ti] = target - bias[di]
        pre = delta + bias[:, None]
        assert (pre > 20).sum() == 3, pre
    grad_out = randn(b, d, L)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias), grad_out


INPUT_ORDER = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def f32_list(t):
    """float32 tensor -> list of Python floats, each the shortest decimal that
    round-trips to exactly the same float32."""
    a = t.detach().to(torch.float32).contiguous().numpy().ravel()
    out = []
    for x in a:
        x = np.float32(x)
        if not np.isfinite(x):
            raise ValueError("non-finite value")
        s = float(np.format_float_scientific(x, unique=True, precision=None))
        s = float(repr(float(s)))  # what json will write back
        # parse-as-f64-then-cast-to-f32 must give exactly x, with a one-ulp
        # f64 margin either side (tolerates a non correctly rounded parser)
        for v in (s, np.nextafter(s, np.inf), np.nextafter(s, -np.inf)):
            if np.float32(v) != x:
                s = float(x)  # fall back to the exact value
                break
        out.append(s)
    return out


def run_case(ref, case, seed):
    inputs, grad_out = make_inputs(case, seed)
    leaves = {k: (v.clone().requires_grad_(True) if v is not None else None)
              for k, v in inputs.items()}
    out, last_state = ref(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
        D=leaves["D"], z=leaves["z"], delta_bias=leaves["delta_bias"],
        delta_softplus=case["softplus"], return_last_state=True,
    )
    assert out.dtype == torch.float32 and out.shape == grad_out.shape
    names = [k for k in INPUT_ORDER if leaves[k] is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in names], grad_out)
    grad_map = dict(zip(names, grads))
    return {
        "name": case["name"],
        "batch": case["batch"], "dim": case["dim"], "dstate": case["dstate"],
        "len": case["len"], "delta_softplus": case["softplus"],
        "inputs": {k: (f32_list(inputs[k]) if inputs[k] is not None else None)
                   for k in INPUT_ORDER},
        "grad_out": f32_list(grad_out),
        "outputs": {"out": f32_list(out), "last_state": f32_list(last_state)},
        "grads": {k: (f32_list(grad_map[k]) if k in grad_map else None)
                  for k in INPUT_ORDER},
    }


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    sdist = fetch_sdist(MAMBA_SSM_VERSION)
    ref = load_selective_scan_ref(sdist, MAMBA_SSM_VERSION)
    cases = [run_case(ref, c, BASE_SEED + i) for i, c in enumerate(CASES)]
    doc = {
        "generator": "scripts/make_scan_reference.py",
        "mamba_ssm_version": MAMBA_SSM_VERSION,
        "torch_version": torch.__version__,
        "layout": LAYOUT,
        "cases": cases,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    # Compact JSON, one case per line (keeps diffs readable).
    compact = dict(separators=(",", ":"))
    head = json.dumps({k: v for k, v in doc.items() if k != "cases"}, **compact)
    text = head[:-1] + ',"cases":[\n' + ",\n".join(
        json.dumps(c, **compact) for c in cases) + "\n]}\n"
    assert json.loads(text) == doc
    with open(out_path, "w") as f:
        f.write(text)
    print(f"wrote {out_path} ({os.path.getsize(out_path)} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    main()
