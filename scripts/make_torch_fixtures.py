#!/usr/bin/env python3
"""Write the small PyTorch checkpoints that tests/torch_checkpoint.rs reads
with `selective::model::torch_checkpoint::TorchCheckpoint`.

How to run (from the repository root; CPU, a second or two)
    pip install torch
    python3 scripts/make_torch_fixtures.py           # (re)writes tests/data/torch/
    python3 scripts/make_torch_fixtures.py --verify  # re-check the files there

Versions used for the committed files: Python 3.11.7, torch 2.15.0 (CPU).
The files are written with plain `torch.save` (zip format, pickle protocol 2),
exactly as checkpoints such as state-spaces/mamba-130m's pytorch_model.bin are.

Output (tests/data/torch/, about 30 KB in all)
    f32.bin      float32 tensors of varied shapes: 2-D, 3-D, 0-d (scalar),
                 1-element, 0-element (two of them), an nn.Parameter, plus an
                 int64 tensor `int_buffer` (the reader skips non-float tensors)
                 and non-tensor entries (an int, a string)
    f16.bin      float16 tensors, one of them a transposed view; written to a
                 BytesIO so the archive prefix is `archive`
    bf16.bin     bfloat16 tensors, one of them a sliced view
    f64.bin      float64 tensors
    views.bin    one 5x7 storage seen as w, w.t(), w[2], a column, a block, a
                 strided slice and again as `tied` (like a tied lm_head), plus a
                 permuted 3-D tensor and a slice of it
    nested.bin   {"model": {...tensors, "sub": {...}}, "epoch": 3, "config":
                 {ints incl. 2**70, floats, strings, lists, tuples, None, bools}}:
                 no tensor at the top level, so the reader joins keys with '.'
    legacy.bin   a tensor saved with _use_new_zipfile_serialization=False (the
                 pre-1.6 format, which the reader rejects with a clear error)
    bigendian.bin   f32.bin rewritten with byteorder = "big" (rejected)
    unknown_global.bin  a state dict holding a fractions.Fraction (rejected:
                 the reader only knows the globals torch.save uses for tensors)
    nocrc.bin    saved with torch.serialization.set_crc32_options(False): every
                 zip record's CRC-32 is 0, which means "not computed"
    expected.json   for every readable fixture: per tensor its dtype (F32, F16,
                 BF16, F64), shape and the little-endian row-major bytes (hex)
                 of the tensor made contiguous; and the names that must be
                 skipped (non-float tensors)
"""

import io
import json
import os
import sys
import zipfile
from fractions import Fraction

import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "torch")

DTYPE_NAMES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
}


def tensor_hex(t):
    t = t.detach().contiguous()
    if t.dtype in (torch.float16, torch.bfloat16):
        raw = t.view(torch.int16).numpy().astype("<i2").tobytes()
    elif t.dtype == torch.float32:
        raw = t.view(torch.int32).numpy().astype("<i4").tobytes()
    elif t.dtype == torch.float64:
        raw = t.view(torch.int64).numpy().astype("<i8").tobytes()
    else:
        raise ValueError(t.dtype)
    return raw.hex()


def flatten(obj, prefix=""):
    """Mirror of the Rust reader's naming rule (see torch_checkpoint.rs)."""
    tensors, skipped = {}, []
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        for k, v in obj.items():
            if isinstance(v, torch.Tensor):
                if v.dtype in DTYPE_NAMES:
                    tensors[k] = v
                else:
                    skipped.append(k)
        return tensors, skipped

    def walk(d, pre):
        for k, v in d.items():
            name = f"{pre}{k}"
            if isinstance(v, torch.Tensor):
                if v.dtype in DTYPE_NAMES:
                    tensors[name] = v
                else:
                    skipped.append(name)
            elif isinstance(v, dict):
                walk(v, name + ".")

    walk(obj, prefix)
    return tensors, skipped


def describe(obj):
    tensors, skipped = flatten(obj)
    return {
        "tensors": {
            name: {
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "hex": tensor_hex(t),
            }
            for name, t in tensors.items()
        },
        "skipped": sorted(skipped),
    }


def fixtures():
    g = torch.Generator().manual_seed(20240601)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    f32 = {
        "a": randn(3, 4),
        "b3": randn(2, 3, 4),
        "vec": randn(7),
        "scalar": torch.tensor(1.5),
        "one": torch.tensor([2.25]),
        "empty": torch.zeros(0),
        "empty3": torch.zeros(2, 0, 3),
        "param": torch.nn.Parameter(randn(2, 2)),
        "int_buffer": torch.arange(5, dtype=torch.int64),
        "specials": torch.tensor([float("inf"), float("-inf"), -0.0, 1e-45, 3.4e38]),
        "steps": 1000,
        "note": "not a tensor",
    }

    h = randn(4, 6, dtype=torch.float16)
    f16 = {"h": h, "ht": h.t(), "h3": randn(2, 2, 3, dtype=torch.float16)}

    b = randn(6, 5, dtype=torch.bfloat16)
    bf16 = {"b": b, "rows": b[1:4], "cols": b[:, 1:3], "v": randn(9, dtype=torch.bfloat16)}

    f64 = {"d": randn(3, 3, dtype=torch.float64), "dv": randn(4, dtype=torch.float64)}

    w = randn(5, 7)
    x = randn(2, 3, 4)
    views = {
        "w": w,
        "wt": w.t(),
        "row": w[2],
        "col": w[:, 3],
        "block": w[1:4, 2:6],
        "step": w[::2, ::3],
        "elem": w[4, 6],
        "tied": w,
        "xp": x.permute(2, 0, 1),
        "xs": x[1],
        "xe": x[1, :, 1:2],
    }

    nested = {
        "model": {
            "backbone.weight": randn(3, 2),
            "sub": {"bias": randn(2), "deeper": {"t": randn(2, 2).t()}},
        },
        "epoch": 3,
        "config": {
            "d": 1,
            "neg": -5,
            "i2": 300,
            "i4": 70000,
            "i8": -(2**40),
            "big": 2**70,
            "f": 0.5,
            "s": "text",
            "l": [1, 2.0, "s", None],
            "t": (1, None, True, False),
            "e": (),
            "t1": (1,),
            "t3": (1, 2, 3),
            "b": b"bytes",
        },
        "extra": {"ids": torch.arange(3, dtype=torch.int64)},
    }
    return {
        "f32.bin": f32,
        "f16.bin": f16,
        "bf16.bin": bf16,
        "f64.bin": f64,
        "views.bin": views,
        "nested.bin": nested,
    }


def save(obj, path, via_bytesio=False):
    if via_bytesio:
        buf = io.BytesIO()
        torch.save(obj, buf)
        with open(path, "wb") as f:
            f.write(buf.getvalue())
    else:
        torch.save(obj, path)


def rewrite_byteorder(src, dst, order):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        prefix = names[0].split("/")[0]
        if f"{prefix}/byteorder" not in names:
            zout.writestr(f"{prefix}/byteorder", order)
        for n in names:
            data = zin.read(n)
            if n.endswith("/byteorder"):
                data = order.encode()
            zout.writestr(n, data)


def write():
    os.makedirs(OUT, exist_ok=True)
    expected = {}
    for name, obj in fixtures().items():
        save(obj, os.path.join(OUT, name), via_bytesio=(name == "f16.bin"))
        expected[name] = describe(obj)
    torch.save({"t": torch.ones(2)}, os.path.join(OUT, "legacy.bin"), _use_new_zipfile_serialization=False)
    rewrite_byteorder(os.path.join(OUT, "f32.bin"), os.path.join(OUT, "bigendian.bin"), "big")
    torch.save({"t": torch.ones(2), "frac": Fraction(1, 3)}, os.path.join(OUT, "unknown_global.bin"))
    # torch.save can skip CRC-32s (every record then says 0); the reader must accept that.
    nocrc = {"n": fixtures()["f32.bin"]["a"] * 2}
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(nocrc, os.path.join(OUT, "nocrc.bin"))
    finally:
        torch.serialization.set_crc32_options(True)
    expected["nocrc.bin"] = describe(nocrc)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")
    verify()


def verify():
    with open(os.path.join(OUT, "expected.json")) as f:
        expected = json.load(f)
    for name, want in expected.items():
        obj = torch.load(os.path.join(OUT, name), weights_only=False)
        got = describe(obj)
        assert got == want, f"{name}: torch.load disagrees with expected.json"
        with zipfile.ZipFile(os.path.join(OUT, name)) as z:
            for info in z.infolist():
                assert info.compress_type == zipfile.ZIP_STORED, (name, info.filename)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    assert total < 200_000, total
    print(f"ok: {len(expected)} fixtures verified, {total} bytes in {os.path.normpath(OUT)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--verify"]:
        verify()
    else:
        write()
