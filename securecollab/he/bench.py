"""Timing of one encrypted linear layer: BSGS diagonals versus TenSEAL's ``CKKSVector.mm``.

Run ``python -m securecollab.he.bench``; not part of the test suite.
"""

from __future__ import annotations

import time

import numpy as np
import tenseal as ts

from securecollab.he.context import load_public, make_context, public_bytes
from securecollab.he.linear import DiagonalPlan, EncryptedLinear, replicate
from securecollab.he.seal import SealKit


def bench_layer(out_features: int, in_features: int, repeats: int = 3) -> dict:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(out_features, in_features)) * 0.1
    x = rng.random(in_features)
    ctx = make_context(1)  # degree 8192, moduli [60, 40, 60]
    plan = DiagonalPlan(out_features, in_features)
    client, server = SealKit(ctx), load_public(public_bytes(ctx, plan.galois_steps())).kit
    t0 = time.perf_counter()
    layer = EncryptedLinear(server, w, None, level=0, in_scale=server.scale)
    encode_s = time.perf_counter() - t0
    ct = client.encrypt(replicate(x, plan.in_period, client.slot_count))
    bsgs = min(_timed(lambda: layer(ct)) for _ in range(repeats))

    ctx.generate_galois_keys()  # TenSEAL's mm rotates by arbitrary steps
    vec = ts.ckks_vector(ctx, x.tolist())
    wt = w.T.tolist()
    mm = min(_timed(lambda: vec.mm(wt)) for _ in range(repeats))
    return {"shape": (out_features, in_features), "bsgs_s": bsgs, "bsgs_encode_once_s": encode_s,
            "tenseal_mm_s": mm, "galois_steps": plan.galois_steps()}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    for shape in [(64, 64), (128, 784)]:
        print(bench_layer(*shape))
