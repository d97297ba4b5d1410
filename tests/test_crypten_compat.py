"""Tests for securecollab.secagg.crypten_compat: CrypTen on torch 2.13, real MPC parties.

Every test runs CrypTen in fresh subprocesses so CrypTen's global state
(communicator, process groups, patched modules) never leaks into this process.
"""

import json
import subprocess
import sys
import tempfile
import textwrap

import pytest

from tests.crypten_procs import REPO, free_port, party_env

SUBPROCESS_TIMEOUT = 90
SCALE = 2**16  # CrypTen's default fixed-point precision (16 fractional bits)






def _spawn(code: str, *args) -> subprocess.Popen:
    # Output goes to an unnamed temp file, not a pipe: a chatty party can then
    # never block on a full pipe while we are waiting on the other one.
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        cwd=REPO,
        env=party_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    proc.log = log
    return proc


def _wait_all(procs) -> None:
    """Wait for every process; kill all and fail if any hangs or errors."""
    hung = False
    try:
        for p in procs:
            p.wait(timeout=SUBPROCESS_TIMEOUT)
    except subprocess.TimeoutExpired:
        hung = True
        for p in procs:
            p.kill()
            p.wait()
    outputs = []
    for p in procs:
        p.log.seek(0)
        outputs.append(p.log.read()[-4000:])
        p.log.close()
    if hung:
        pytest.fail("CrypTen subprocess hung (rendezvous?):\n" + "\n---\n".join(outputs))
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"subprocess failed (rc={p.returncode}):\n{out}"


# --------------------------------------------------------------------------- #
# 1. from_pytorch on a small CNN, encrypted inference vs plaintext
# --------------------------------------------------------------------------- #

_CNN_WORKER = """
    import json, sys
    from pathlib import Path
    import torch
    from securecollab.secagg.crypten_compat import init_party

    port, out = int(sys.argv[1]), sys.argv[2]
    crypten = init_party(0, 1, "127.0.0.1", port)

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 10),
    ).eval()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        expected = model(x)

    cmodel = crypten.nn.from_pytorch(model, torch.empty(1, 1, 8, 8))
    cmodel.encrypt()
    cmodel.eval()
    enc_out = cmodel(crypten.cryptensor(x))
    Path(out).write_text(json.dumps(
        {
            "model_encrypted": bool(cmodel.encrypted),
            "output_encrypted": crypten.is_encrypted_tensor(enc_out),
            "crypten_layers": sorted({type(m).__name__ for m in cmodel.modules()}),
            "expected": expected.tolist(),
            "actual": enc_out.get_plain_text().tolist(),
        }
    ))
    crypten.uninit()
"""


@pytest.mark.timeout(120)
def test_from_pytorch_cnn_encrypted_inference_matches_plaintext(tmp_path):
    import torch

    out = tmp_path / "cnn.json"
    _wait_all([_spawn(_CNN_WORKER, free_port(), out)])
    res = json.loads(out.read_text())

    assert res["model_encrypted"] and res["output_encrypted"]
    assert {"Conv", "ReLU", "Flatten", "Gemm"} <= set(res["crypten_layers"])
    expected, actual = torch.tensor(res["expected"]), torch.tensor(res["actual"])
    assert actual.shape == (5, 10)
    assert expected.abs().max() > 0.1  # non-trivial outputs
    torch.testing.assert_close(actual, expected, atol=1e-2, rtol=0)
    assert torch.equal(actual.argmax(1), expected.argmax(1))


# --------------------------------------------------------------------------- #
# 2. Two real OS processes doing MPC over env:// rendezvous
# --------------------------------------------------------------------------- #

_X = [1.5, -2.0, 3.25, 0.5, -0.75, 0.0]
_Y = [0.5, 4.0, -1.25, 0.5, 2.0, -3.0]

_MPC_WORKER = """
    import json, sys
    from pathlib import Path
    import torch
    from securecollab.secagg.crypten_compat import init_party

    rank, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    x = torch.tensor(%r)
    y = torch.tensor(%r)
    crypten = init_party(rank, 2, "127.0.0.1", port)
    comm = crypten.communicator.get()

    # Party 0 owns x, party 1 owns y; the other party passes an empty tensor
    # and learns only the size (broadcast_size), never the values.
    ex = crypten.cryptensor(x if rank == 0 else torch.empty(0), src=0, broadcast_size=True)
    ey = crypten.cryptensor(y if rank == 1 else torch.empty(0), src=1, broadcast_size=True)

    result = {
        "rank": comm.get_rank(),
        "world_size": comm.get_world_size(),
        "x_share": ex.share.tolist(),
        "sum": (ex + ey).get_plain_text().tolist(),
        "prod": (ex * ey).get_plain_text().tolist(),
        "lt": (ex < ey).get_plain_text().tolist(),
    }
    Path(out).write_text(json.dumps(result))
    crypten.uninit()
""" % (_X, _Y)


def _to_signed64(v: int) -> int:
    v %= 2**64
    return v - 2**64 if v >= 2**63 else v


@pytest.mark.timeout(120)
def test_two_party_mpc_sum_product_comparison(tmp_path):
    port = free_port()
    outs = [tmp_path / f"party{r}.json" for r in range(2)]
    _wait_all([_spawn(_MPC_WORKER, r, port, outs[r]) for r in range(2)])
    p0, p1 = (json.loads(o.read_text()) for o in outs)

    assert (p0["rank"], p1["rank"]) == (0, 1)
    assert p0["world_size"] == p1["world_size"] == 2

    # x is genuinely secret-shared: neither share is the encoding of x, but
    # the two shares add up to it modulo 2**64.
    encoded_x = [round(v * SCALE) for v in _X]
    assert p0["x_share"] != encoded_x and p1["x_share"] != encoded_x
    assert [_to_signed64(a + b) for a, b in zip(p0["x_share"], p1["x_share"])] == encoded_x

    # Revealed results agree across parties and match plaintext arithmetic.
    for key in ("sum", "prod", "lt"):
        assert p0[key] == p1[key], f"parties disagree on {key}"
    res = 4 / SCALE  # a few units of fixed-point resolution
    assert p0["sum"] == pytest.approx([a + b for a, b in zip(_X, _Y)], abs=res)
    assert p0["prod"] == pytest.approx([a * b for a, b in zip(_X, _Y)], abs=res)
    assert p0["lt"] == [float(a < b) for a, b in zip(_X, _Y)]


# --------------------------------------------------------------------------- #
# 3. load_crypten() is idempotent and patches exactly once
# --------------------------------------------------------------------------- #

_IDEMPOTENT_WORKER = """
    import importlib, importlib.util, io, sys
    import torch

    OLD = "torch.onnx._internal.registration"
    NEW = "torch.onnx._internal.torchscript_exporter.registration"
    old_missing = importlib.util.find_spec(OLD) is None

    # Record the kwargs crypten's *original* exporter passes to torch.onnx.export.
    calls = []
    torch.onnx.export = lambda model, args, f, **kw: calls.append(kw)
    if old_missing:
        sys.modules[OLD] = importlib.import_module(NEW)
    from crypten.nn import onnx_converter as oc
    original = oc._export_pytorch_model
    model, x = torch.nn.Linear(3, 2), torch.zeros(1, 3)
    original(io.BytesIO(), model, x)
    if old_missing:
        del sys.modules[OLD]  # let load_crypten() see the old path missing again

    from securecollab.secagg import crypten_compat as cc
    crypten = cc.load_crypten()
    patched = oc._export_pytorch_model
    assert patched is not original
    if old_missing:
        assert sys.modules[OLD] is sys.modules[NEW], "registry alias not installed"
    patched(io.BytesIO(), model, x)
    assert calls[1] == {**calls[0], "dynamo": False}, calls

    # Second call: same module, nothing re-applied (a sentinel survives).
    sentinel = object()
    oc._export_pytorch_model = sentinel
    assert cc.load_crypten() is crypten is sys.modules["crypten"]
    assert oc._export_pytorch_model is sentinel, "load_crypten re-patched"
    print("ok")
"""


@pytest.mark.timeout(120)
def test_load_crypten_idempotent_and_patches_once():
    proc = _spawn(_IDEMPOTENT_WORKER)
    _wait_all([proc])
