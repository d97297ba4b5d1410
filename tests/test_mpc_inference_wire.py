"""What model-private inference puts on the wire between compute parties: three party processes and a dealer over
mutual TLS evaluate a trained convnet on shares and record every int64 tensor they send. Whatever the MPC
opens (sums or XORs of the parties' parts) must hold no pixel, no weight and, in label mode, no logit."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.crypten_procs import REPO, free_port, party_env
from tests.test_mpc import assert_nothing_opened_holds

pytestmark = pytest.mark.slow
N_PARTIES = 3
IMAGES = 6


def _plan():
    from securecollab.plans import MpcInferencePlan
    return MpcInferencePlan(model="convnet", output="label", epochs=3)


def _party_main(role: str, rank: int, ports: list[int], workdir: Path) -> None:
    from securecollab.secagg import mpc
    from securecollab.secagg.mpc_model import ParamLayout, answer, shared_weights
    from tests import test_mpc
    test_mpc._grpc_main(role, rank, N_PARTIES, ports, workdir, SimpleNamespace(needs_dealer=True))
    if role == "dealer":
        return
    plan = _plan()
    ds = plan.load_data()
    model = plan.build_model(ds).eval()  # the public architecture only
    sent = test_mpc._record_sent()
    weights = shared_weights(ParamLayout.of(model), np.load(workdir / f"w{rank}.npy"))
    out = answer(model, weights, np.load(workdir / f"x{rank}.npy"), ds.input_shape, plan.output)
    np.save(workdir / f"sent{rank}.npy", np.concatenate(sent))
    np.save(workdir / f"sent_sizes{rank}.npy", np.array([t.size for t in sent], dtype=np.int64))
    np.save(workdir / f"out{rank}.npy", out)
    mpc.shutdown()
    test_mpc._endpoint.stop(grace=None)


def test_nothing_the_parties_open_holds_a_pixel_a_weight_or_a_logit(tmp_path):
    from securecollab.models import parameters_to_arrays
    from securecollab.net.certs import make_certs
    from securecollab.secagg.mpc_model import ParamLayout
    from securecollab.secagg.sharing import SCALE, encode_fixed, reconstruct, split_shares
    from securecollab.training import predict_logits
    model, ds = _plan().train()
    x = ds.x_test[:IMAGES]
    flat = ParamLayout.of(model).flatten(dict(parameters_to_arrays(model)))
    for name, secret in (("w", flat), ("x", x.ravel())):
        for s in split_shares(encode_fixed(secret), N_PARTIES, compress=False):
            np.save(tmp_path / f"{name}{s.party}.npy", s.dense)
    make_certs(tmp_path / "certs", [f"party-{i}" for i in range(N_PARTIES)] + ["dealer"])
    ports = ",".join(str(free_port()) for _ in range(N_PARTIES + 1))
    procs = []
    for role, rank in [("party", r) for r in range(N_PARTIES)] + [("dealer", N_PARTIES)]:
        log = tempfile.TemporaryFile(mode="w+")
        procs.append((subprocess.Popen([sys.executable, __file__, role, str(rank), ports, str(tmp_path)], cwd=REPO,
                                       env=party_env(), stdout=log, stderr=subprocess.STDOUT, text=True), log))
    deadline = time.monotonic() + 120
    for p, _ in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    logs = []
    for p, log in procs:
        log.seek(0)
        logs.append(f"rc={p.returncode}: {log.read()[-2000:]}")
    assert all(p.returncode == 0 for p, _ in procs), "\n---\n".join(logs)
    logits = predict_logits(model, x)
    labels = reconstruct([np.load(tmp_path / f"out{r}.npy") for r in range(N_PARTIES)]) / SCALE
    assert np.array_equal(np.rint(labels), logits.argmax(1))  # the computation ran, and right
    pixels = x.ravel()[x.ravel() >= 1 / 16]
    assert pixels.size > 100 and np.abs(flat).max() > 1 / 16
    assert_nothing_opened_holds(tmp_path, N_PARTIES, np.concatenate([pixels, flat, logits.ravel()]))


if __name__ == "__main__":
    _party_main(sys.argv[1], int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")], Path(sys.argv[4]))
