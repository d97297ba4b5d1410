"""Tests for securecollab.secagg.mpc: secure aggregation across real MPC party processes.

Each multi-party test writes every party's client shares to .npy files, starts
the compute parties (and the dealer when needed) as separate OS processes
running this file as a script, and reconstructs the aggregate from the shares
they return, the way the coordinator would: sum mod 2^64, divide by 2^16.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from ast import literal_eval
from pathlib import Path

import numpy as np
import pytest

from tests.crypten_procs import REPO, free_port, party_env

SCALE = 2**16
SUBPROCESS_TIMEOUT = 60
INT64 = np.iinfo(np.int64)


# --------------------------------------------------------------------------- #
# helpers: shares, processes, reconstruction
# --------------------------------------------------------------------------- #


def _split(updates: np.ndarray, n_parties: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Fixed-point encode (K, D) updates and split them into n additive int64 shares."""
    encoded = np.round(updates * SCALE).astype(np.int64)
    shares = [rng.integers(INT64.min, INT64.max, encoded.shape, dtype=np.int64, endpoint=True)
              for _ in range(n_parties - 1)]
    # Wrap-around int64 arithmetic is exactly the ring Z_2^64.
    shares.append(encoded - np.sum(shares, axis=0, dtype=np.int64))
    return shares


def _reconstruct(result_shares: list[np.ndarray]) -> np.ndarray:
    return np.sum(result_shares, axis=0, dtype=np.int64) / SCALE






TRANSPORTS = pytest.mark.parametrize("transport", ["grpc", "gloo"])  # gloo: the insecure comparison mode
GRPC_ONLY = pytest.mark.parametrize("transport", ["grpc"])


def _run_round(tmp_path: Path, updates: np.ndarray, n_parties: int, *, norm_bound=None, dp_sigma=None,
               check_refusal=False, seed=0, transport="grpc", before_start=None, **rule_options) -> list[np.ndarray]:
    """Share `updates`, run aggregate_round on n party processes (+ dealer), return their result shares.
    `norm_bound`, `dp_sigma` and `rule_options` configure securecollab.aggregation.secure_rule."""
    rng = np.random.default_rng(seed)
    for rank, share in enumerate(_split(updates, n_parties, rng)):
        np.save(tmp_path / f"in{rank}.npy", share)
    from securecollab.aggregation import secure_rule
    dealer = secure_rule(norm_bound=norm_bound, **rule_options).needs_dealer
    if transport == "grpc":
        from securecollab.net.certs import make_certs
        make_certs(tmp_path / "certs", [f"party-{i}" for i in range(n_parties)] + ["dealer"])
        port = ",".join(str(free_port()) for _ in range(n_parties + 1))  # each party's endpoint, the dealer's
    else:
        port = str(free_port())
    rule = {"norm_bound": norm_bound, "dp_sigma": dp_sigma, **rule_options}
    common = [str(n_parties), port, str(tmp_path), repr(rule), str(check_refusal), transport]
    if before_start:
        before_start([int(p) for p in port.split(",")])
    roles = [("party", rank) for rank in range(n_parties)] + ([("dealer", n_parties)] if dealer else [])
    procs = []
    try:
        for role, rank in roles:
            # Logs go to temp files, not pipes, so a chatty process never blocks.
            log = tempfile.TemporaryFile(mode="w+")
            proc = subprocess.Popen([sys.executable, __file__, role, str(rank), *common],
                                    cwd=REPO, env=party_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
            proc.log = log
            procs.append(proc)
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT  # for the whole round, not per process
        for proc in procs:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:
            p.kill()
            p.wait()
        logs = []
        for (role, rank), p in zip(roles, procs):
            p.log.seek(0)
            logs.append(f"{role} {rank} rc={p.returncode}:\n{p.log.read()[-3000:]}")
            p.log.close()
    report = "\n---\n".join(logs)
    if hung:
        pytest.fail(f"{len(hung)} MPC process(es) hung and were killed:\n{report}")
    assert all(p.returncode == 0 for p in procs), report
    assert "without a goodbye" not in report and "where its goodbye was due" not in report, report
    return [np.load(tmp_path / f"out{rank}.npy") for rank in range(n_parties)]


def _process_main(argv: list[str]) -> None:
    """Body of one party/dealer process: `role rank n port dir rule_options check_refusal transport`."""
    from securecollab.aggregation import secure_rule
    from securecollab.secagg import mpc

    role, rank, n_parties, workdir = argv[0], int(argv[1]), int(argv[2]), Path(argv[4])
    rule = secure_rule(**literal_eval(argv[5]))
    if argv[7] == "grpc":
        _grpc_main(role, rank, n_parties, [int(p) for p in argv[3].split(",")], workdir, rule)
    elif role == "dealer":
        mpc.run_dealer(n_parties, "127.0.0.1", int(argv[3]))
        return
    else:
        mpc.setup_party(rank, n_parties, "127.0.0.1", int(argv[3]), dealer=rule.needs_dealer)
    if role == "dealer":
        return
    sent = _record_sent() if (workdir / "record").exists() else None
    shares = list(np.load(workdir / f"in{rank}.npy"))  # this party's share of each client
    if argv[6] == "True":
        # Without the dealer, multiplications must be refused, not done with CrypTen's TFP.
        try:
            mpc.aggregate_round(shares, secure_rule(norm_bound=1.0))
        except RuntimeError as err:
            assert "dealer" in str(err)
        else:
            raise AssertionError("norm bound ran without a dealer")
    result = mpc.aggregate_round(shares, rule)
    assert result.dtype == np.int64 and result.shape == shares[0].shape
    if sent is not None:
        np.save(workdir / f"sent{rank}.npy", np.concatenate(sent) if sent else np.zeros(0, np.int64))
        np.save(workdir / f"sent_sizes{rank}.npy", np.array([t.size for t in sent], dtype=np.int64))
    np.save(workdir / f"out{rank}.npy", result)
    mpc.shutdown()
    if _endpoint is not None:
        # Stop serving before the interpreter exits: a call still arriving (the wire test's intruder) while
        # atexit tears down the server's thread pool kills gRPC's serving thread and hangs the exit.
        _endpoint.stop(grace=None)


_endpoint = None


def _record_sent() -> list:
    """Wrap this party's communicator so every int64 tensor it hands to the network is kept (wire tests)."""
    import torch

    from securecollab.secagg.crypten_compat import load_crypten
    comm, sent = load_crypten().communicator.get(), []
    for name in ("send", "isend", "all_reduce", "reduce", "gather", "all_gather"):
        original = getattr(comm, name)

        def recording(tensor, *args, _original=original, **kwargs):
            for t in tensor if isinstance(tensor, list) else [tensor]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.long:
                    sent.append(t.detach().reshape(-1).numpy().copy())
            return _original(tensor, *args, **kwargs)

        setattr(comm, name, recording)
    return sent


def opened_values(workdir: Path, n_parties: int) -> list[np.ndarray]:
    """Everything the MPC opened, from what every party sent (a round run with a `record` file).

    CrypTen's protocols are lockstep: at each step every party sends its part of the same value, so the
    i-th tensor of each party's record together make one value any party can rebuild: the sum mod 2^64
    (arithmetic shares) or the XOR (binary shares). Both are returned; a party can compute either."""
    sent = [np.split(np.load(workdir / f"sent{r}.npy"), np.cumsum(np.load(workdir / f"sent_sizes{r}.npy"))[:-1])
            for r in range(n_parties)]
    assert len({len(s) for s in sent}) == 1, "the parties' records are not in lockstep"
    opened = []
    for parts in zip(*sent):
        assert len({p.size for p in parts}) == 1, "the parties' records are not in lockstep"
        total, xor = parts[0].astype(np.uint64), parts[0].copy()
        for p in parts[1:]:
            total = total + p.astype(np.uint64)  # wraps mod 2^64, as the ring does
            xor = np.bitwise_xor(xor, p)
        opened += [total.view(np.int64), xor]
    return opened


def assert_nothing_opened_holds(workdir: Path, n_parties: int, values, vectors=()) -> None:
    """No value the MPC opened holds any of `values` (norms, scores, factors) at a fixed-point scale the
    rules use (2^16, 2^24, 2^32; within 2 units), nor any of `vectors` (per-client accept bits) at scale
    2^16. Opened values are masked, so they are uniform ring elements: a chance match has odds ~1e-13."""
    opened = opened_values(workdir, n_parties)
    words = np.unique(np.concatenate(opened))
    assert words.size > 1000, "nothing was recorded"
    for scale in (2.0 ** 16, 2.0 ** 24, 2.0 ** 32):
        encoded = np.rint(np.asarray(values, dtype=np.float64) * scale)
        encoded = encoded[(np.abs(encoded) >= 2 ** 12) & (np.abs(encoded) < 2 ** 62)].astype(np.int64)
        near = np.searchsorted(words, encoded - 2)
        hits = (near < words.size) & (words[np.minimum(near, words.size - 1)] <= encoded + 2)
        assert not hits.any(), f"an opened value holds {encoded[hits][:3]} at scale {scale:g}"
    for v in vectors:
        pattern = (np.asarray(v, dtype=np.int64) * SCALE)
        assert not any(o.size == pattern.size and np.array_equal(o, pattern) for o in opened), "accept bits opened"


def _grpc_main(role, rank, n_parties, ports, workdir, rule):
    """Join over mutual TLS; the dealer serves until the parties are done (they leave a file each)."""
    from securecollab.net.certs import TlsFiles
    from securecollab.secagg import mpc
    from securecollab.secagg.mpc_net import start_endpoint
    tls = TlsFiles.for_party(workdir / "certs", "dealer" if role == "dealer" else f"party-{rank}")
    if role == "dealer":
        import threading

        from securecollab.net.transport import make_server
        from securecollab.generated.v1 import mpc_pb2_grpc
        from services.secagg_dealer import SERVICE, DealerServicer
        server = make_server(tls=tls, port=ports[-1], host="127.0.0.1")
        server.add(mpc_pb2_grpc.add_DealerServicer_to_server, DealerServicer(n_parties), SERVICE)
        server.start()
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not all((workdir / f"out{r}.npy").exists() for r in range(n_parties)) and time.monotonic() < deadline:
            threading.Event().wait(0.2)
        server.stop(grace=1.0)
        return
    global _endpoint
    _endpoint, servicer = start_endpoint(rank, n_parties, rule.needs_dealer, tls, port=ports[rank], host="127.0.0.1")
    override = workdir / f"peers{rank}.txt"  # a wire test routes some links through its proxy
    targets = override.read_text().split(",") if override.exists() else [f"localhost:{p}" for p in ports[:n_parties]]
    mpc.setup_party_grpc(servicer, targets, tls,
                         dealer_target=f"localhost:{ports[-1]}" if rule.needs_dealer else None)


def _updates_with_norms(norms, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Update vectors as clients send them: a delta of each given L2 norm (dim - 1 long), then the counting 1."""
    directions = rng.normal(size=(len(norms), dim - 1))
    deltas = directions / np.linalg.norm(directions, axis=1, keepdims=True) * np.asarray(norms)[:, None]
    return np.hstack([deltas, np.ones((len(norms), 1))])


# --------------------------------------------------------------------------- #
# spec (no processes)
# --------------------------------------------------------------------------- #


def test_spec_validation_and_dealer_need():
    from securecollab.aggregation import secure_rule
    from securecollab.aggregation.norm_bound import MAX_NORM_BOUND

    assert not secure_rule().needs_dealer
    assert not secure_rule(dp_sigma=1.0).needs_dealer  # noise is linear
    assert secure_rule(norm_bound=1.0).needs_dealer
    assert secure_rule(norm_bound=1.0, dp_sigma=1.0).needs_dealer
    for bad in (0.0, -1.0, MAX_NORM_BOUND * 2, float("nan")):
        with pytest.raises(ValueError):
            secure_rule(norm_bound=bad)
    assert secure_rule(robust="fltrust", reference=[1.0]).needs_dealer
    assert secure_rule(robust="fltrust", reference=[1.0], dp_sigma=0.1).real_weights
    for bad in ({"norm_bound": 1.0, "norm_mode": "shrink"}, {"norm_bound": 1.0, "norm_mode": "clip", "range_check": False},
                {"robust": "fltrust"}, {"robust": "krum", "reference": [1.0]},
                {"robust": "fltrust", "reference": [1.0], "norm_bound": 1.0}):
        with pytest.raises(ValueError):
            secure_rule(**bad)
    for sigma in (-0.1, float("inf"), float("nan")):  # infinite noise would encode as INT64_MIN, silently
        with pytest.raises(ValueError, match="finite and >= 0"):
            secure_rule(dp_sigma=sigma)


# --------------------------------------------------------------------------- #
# multi-party rounds
# --------------------------------------------------------------------------- #


@pytest.mark.timeout(90)
@TRANSPORTS
def test_three_party_sum_without_dealer(tmp_path, transport):
    rng = np.random.default_rng(1)
    updates = rng.normal(0.0, 3.0, size=(10, 1000))
    out = _run_round(tmp_path, updates, 3, check_refusal=True, transport=transport)
    np.testing.assert_allclose(_reconstruct(out), updates.sum(0), rtol=0, atol=10 / SCALE)
    # No single party's result share is the aggregate: each looks uniformly random.
    for share in out:
        assert np.abs(share / SCALE - updates.sum(0)).max() > 1e6


@pytest.mark.timeout(90)
@TRANSPORTS
def test_norm_bound_rejects_oversized_update_inside_mpc(tmp_path, transport):
    rng = np.random.default_rng(2)
    bound = 1.0
    norms = rng.uniform(0.2, 0.95, size=10) * bound  # honest clients, all under the bound
    norms[4] = 100 * bound  # one oversized (e.g. poisoned) update
    updates = _updates_with_norms(norms, 1000, rng)
    out = _run_round(tmp_path, updates, 3, norm_bound=bound, transport=transport)
    honest = np.delete(updates, 4, axis=0).sum(0)
    np.testing.assert_allclose(_reconstruct(out), honest, rtol=0, atol=10 / SCALE)
    # The same rule computed in the clear (what a plaintext aggregator would do) agrees.
    from securecollab.aggregation import secure_rule
    clear = secure_rule(norm_bound=bound).clear(list(updates), np.ones(len(updates)))
    np.testing.assert_allclose(_reconstruct(out), clear, rtol=0, atol=10 / SCALE)


def _malformed_round(rng: np.random.Generator, bound: float, dim: int):
    """Updates around the bound, plus what a malicious client can send: the crafted wrap-around update (every
    delta coordinate +-65536: each squares to 2^64 = 0 in the ring, so the bare norm check sees norm 0), an
    update counting itself 5 times, and a huge one. Returns (updates, which the sound check must accept)."""
    from securecollab.poisoning.wraparound import wraparound_vector
    honest = _updates_with_norms([0.5 * bound, 0.99 * bound, 1.01 * bound, 100 * bound], dim, rng)
    recount = _updates_with_norms([0.5 * bound], dim, rng)
    recount[0, -1] = 5.0
    wrap = np.append(wraparound_vector(rng.normal(size=dim - 1)), 1.0)[None, :]
    return np.vstack([honest, recount, wrap]), np.array([True, True, False, False, False, False])


@pytest.mark.timeout(120)
@GRPC_ONLY
def test_sound_norm_bound_rejects_wraparound_and_recounting_and_holds_the_boundary(tmp_path, transport):
    from securecollab.aggregation import secure_rule
    from securecollab.aggregation.norm_bound import clear_accepts
    rng = np.random.default_rng(6)
    bound = 1.0
    updates, accepted = _malformed_round(rng, bound, 800)
    assert [clear_accepts(u, bound) for u in updates] == list(accepted)  # the rule in the clear agrees
    (tmp_path / "record").touch()
    out = _run_round(tmp_path, updates, 3, norm_bound=bound, transport=transport)
    np.testing.assert_allclose(_reconstruct(out), updates[accepted].sum(0), rtol=0, atol=10 / SCALE)
    clear = secure_rule(norm_bound=bound).clear(list(updates), np.ones(len(updates)))
    np.testing.assert_allclose(_reconstruct(out), clear, rtol=0, atol=10 / SCALE)
    # what the parties opened to each other holds no norm, squared norm or accept bit
    norms = np.linalg.norm(updates[:4, :-1], axis=1)  # the well-formed updates' (the others' wrap the ring)
    assert_nothing_opened_holds(tmp_path, 3, [*norms, *norms ** 2], vectors=[accepted.astype(int)])


@pytest.mark.timeout(120)
@GRPC_ONLY
def test_positive_control_the_bare_norm_check_lets_the_wraparound_update_through(tmp_path, transport):
    # The check of earlier versions (no range check): the crafted update counts with "norm" 0.
    rng = np.random.default_rng(6)
    updates, _ = _malformed_round(rng, 1.0, 800)
    updates = updates[[0, 5]]  # an honest update and the wrap-around one
    out = _run_round(tmp_path, updates, 3, norm_bound=1.0, range_check=False, transport=transport)
    total = _reconstruct(out)
    assert total[-1] == pytest.approx(2.0)  # both counted
    assert np.abs(total[:-1]).max() >= 65535  # the model is wrecked


def _flat_updates(norms, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Like _updates_with_norms, but every coordinate of a delta has the same magnitude (random signs), so
    a norm far above a bound still passes its coordinate bound."""
    signs = rng.choice([-1.0, 1.0], size=(len(norms), dim - 1))
    return np.hstack([signs * (np.asarray(norms)[:, None] / np.sqrt(dim - 1)), np.ones((len(norms), 1))])


def _write_records(workdir: Path, opened: list[np.ndarray], n_parties: int, rng) -> None:
    """Records as _process_main writes them, of parties whose sent tensors open to `opened` (summed)."""
    parts = [[] for _ in range(n_parties)]
    for value in opened:
        shares = rng.integers(INT64.min, INT64.max, size=(n_parties - 1, value.size), dtype=np.int64)
        last = value.astype(np.uint64) - shares.astype(np.uint64).sum(0, dtype=np.uint64)
        for r, share in enumerate([*shares, last.view(np.int64)]):
            parts[r].append(share)
    for r in range(n_parties):
        np.save(workdir / f"sent{r}.npy", np.concatenate(parts[r]))
        np.save(workdir / f"sent_sizes{r}.npy", np.array([t.size for t in parts[r]], dtype=np.int64))


def test_the_opened_value_check_finds_a_norm_or_an_accept_vector_that_was_opened(tmp_path):
    rng = np.random.default_rng(3)
    masked = [rng.integers(INT64.min, INT64.max, size=n, dtype=np.int64) for n in (1000, 5, 300)]
    _write_records(tmp_path, masked, 3, rng)
    assert_nothing_opened_holds(tmp_path, 3, [3.9, 3.9 ** 2], vectors=[[1, 0, 1, 1, 0]])  # masked: nothing
    leaks = {"a norm at 2^16": [np.array([int(3.9 * SCALE) + 1])],
             "a squared norm at 2^32": [np.array([int(3.9 ** 2 * 2 ** 32)])],
             "accept bits": [np.array([1, 0, 1, 1, 0]) * SCALE]}
    for what, leak in leaks.items():
        _write_records(tmp_path, masked + leak, 3, rng)
        with pytest.raises(AssertionError, match="opened"):
            assert_nothing_opened_holds(tmp_path, 3, [3.9, 3.9 ** 2], vectors=[[1, 0, 1, 1, 0]])
            pytest.fail(f"{what} was opened and not found")


@pytest.mark.timeout(120)
@GRPC_ONLY
def test_clipping_inside_mpc_equals_clipping_in_the_clear(tmp_path, transport):
    from securecollab.aggregation import secure_rule
    from securecollab.poisoning.wraparound import wraparound_vector
    rng = np.random.default_rng(7)
    bound, dim = 4.0, 401
    updates = _flat_updates([0.5, 3.9, 4.1, 12.0, 70.0], dim, rng)  # the last: 17.5 times the bound
    wrap = np.append(wraparound_vector(rng.normal(size=dim - 1)), 1.0)[None, :]
    updates = np.vstack([updates, wrap])
    (tmp_path / "record").touch()
    out = _reconstruct(_run_round(tmp_path, updates, 3, norm_bound=bound, norm_mode="clip", transport=transport))
    norms = np.array([0.5, 3.9, 4.1, 12.0, 70.0])  # no norm, squared norm or clipping factor was opened
    assert_nothing_opened_holds(tmp_path, 3, [*norms, *norms ** 2, *np.minimum(1, bound / norms),
                                              *(norms / bound) ** 2])
    clear = secure_rule(norm_bound=bound, norm_mode="clip").clear(list(updates), np.ones(len(updates)))
    want = updates[:2, :-1].sum(0) + (updates[2:5, :-1] * (bound / np.array([4.1, 12.0, 70.0]))[:, None]).sum(0)
    np.testing.assert_allclose(clear[:-1], want, atol=1e-9)
    assert clear[-1] == out[-1] == 5.0  # the wrap-around update is not counted, the clipped ones are
    np.testing.assert_allclose(out[:-1], clear[:-1], rtol=0, atol=2e-3)  # 16-bit fixed point, ~1e-4 relative
    assert np.linalg.norm(out[:-1] - clear[:-1]) < 1e-3 * np.linalg.norm(clear[:-1])


@pytest.mark.timeout(120)
@GRPC_ONLY
def test_coordinate_range_check_inside_mpc_holds_its_power_of_two_edges(tmp_path, transport):
    # Clip mode counts any well-formed update, so only the range check decides: R = 8 for B = 4.
    from securecollab.aggregation import secure_rule
    from securecollab.aggregation.norm_bound import clear_well_formed, coordinate_bound
    bound, dim, unit = 4.0, 301, 1.0 / SCALE
    radius = coordinate_bound(bound, dim - 1)
    assert radius == 8.0
    edges = [radius - unit, -radius, radius, -radius - unit, 3 * radius, 0.5]
    updates = np.zeros((len(edges), dim))
    updates[:, -1] = 1.0
    for i, value in enumerate(edges):
        updates[i, 7 * i] = value  # one coordinate at the edge, the rest 0
    ok = np.array([True, True, False, False, False, True])
    assert [clear_well_formed(u, bound) for u in updates] == list(ok)
    out = _reconstruct(_run_round(tmp_path, updates, 3, norm_bound=bound, norm_mode="clip", transport=transport))
    assert out[-1] == pytest.approx(ok.sum())
    clear = secure_rule(norm_bound=bound, norm_mode="clip").clear(list(updates), np.ones(len(updates)))
    np.testing.assert_allclose(out[:-1], clear[:-1], rtol=0, atol=2e-3)
    assert out[7 * 0] == pytest.approx(bound, abs=2e-3) and out[7 * 1] == pytest.approx(-bound, abs=2e-3)
    assert np.abs(out[[14, 21, 28]]).max() < 1e-3  # refused: nothing of them in the sum


@pytest.mark.timeout(120)
@GRPC_ONLY
def test_fltrust_inside_mpc_equals_fltrust_in_the_clear(tmp_path, transport):
    from securecollab.aggregation import secure_rule
    rng = np.random.default_rng(8)
    dim = 401
    g0 = rng.normal(size=dim - 1)
    g0 *= 2.0 / np.linalg.norm(g0)
    noise = rng.normal(size=(4, dim - 1)) / np.sqrt(dim - 1)  # norm ~1 against ‖g0‖ = 2
    deltas = np.vstack([
        g0 + 0.5 * noise[0],           # honest, aligned
        0.3 * g0 + 0.5 * noise[1],     # weakly aligned, shorter
        -g0 + 0.2 * noise[2],          # opposite: no trust
        50 * (g0 + 0.5 * noise[3]),    # boosted (model replacement): normalised back to ||g0||
        0.001 * g0,                    # tiny: normalised as if ||g0|| / 8 long
    ])
    updates = np.hstack([deltas, np.ones((len(deltas), 1))])
    rule = secure_rule(robust="fltrust", reference=g0)
    clear = rule.clear(list(updates), np.ones(len(updates)))
    norms = np.linalg.norm(deltas, axis=1)
    trust = np.maximum(deltas @ g0, 0) / (np.maximum(norms, 2.0 / 8) * 2.0)  # relu(cos); the tiny one damped
    assert trust[2] == 0 and trust[4] == pytest.approx(0.008) and clear[-1] == pytest.approx(trust.sum())
    (tmp_path / "record").touch()
    out = _reconstruct(_run_round(tmp_path, updates, 3, robust="fltrust", reference=g0.tolist(), transport=transport))
    assert out[-1] == pytest.approx(clear[-1], abs=2e-3)  # the total trust, the only per-round scalar revealed
    # no trust score, cosine, inner product with g0 or norm was opened between the parties
    assert_nothing_opened_holds(tmp_path, 3, [*trust[trust > 0], *(deltas @ g0), *norms, *norms ** 2,
                                              *(deltas @ g0) / (norms * 2.0)])
    np.testing.assert_allclose(out[:-1], clear[:-1], rtol=0, atol=5e-3)
    assert np.linalg.norm(out[:-1] - clear[:-1]) < 2e-3 * np.linalg.norm(clear[:-1])
    step = out[:-1] / out[-1]  # the FLTrust update: close to g0's direction, norm at most ||g0||
    assert step @ g0 / (np.linalg.norm(step) * 2.0) > 0.8 and np.linalg.norm(step) <= 2.0 + 1e-2


@pytest.mark.timeout(90)
@GRPC_ONLY
def test_distributed_dp_noise_has_requested_sigma(tmp_path, transport):
    rng = np.random.default_rng(3)
    sigma = 0.5
    updates = rng.normal(0.0, 1.0, size=(3, 20000))
    out = _run_round(tmp_path, updates, 3, dp_sigma=sigma, transport=transport)
    noise = _reconstruct(out) - updates.sum(0)
    assert abs(noise.std() / sigma - 1) < 0.10
    assert abs(noise.mean()) < 5 * sigma / np.sqrt(noise.size)


@pytest.mark.timeout(90)
@GRPC_ONLY
def test_two_party_sum(tmp_path, transport):
    rng = np.random.default_rng(4)
    updates = rng.normal(0.0, 3.0, size=(10, 1000))
    out = _run_round(tmp_path, updates, 2, transport=transport)
    np.testing.assert_allclose(_reconstruct(out), updates.sum(0), rtol=0, atol=10 / SCALE)


@pytest.mark.timeout(90)
@GRPC_ONLY
def test_two_party_norm_bound_with_dealer(tmp_path, transport):
    # Two parties and the dealer service (over gloo the dealer would be rank 2 of a world CrypTen calls size 2).
    rng = np.random.default_rng(5)
    norms = np.array([0.5, 3.0, 0.9, 1.5])  # bound 1.0: clients 1 and 3 are dropped
    updates = _updates_with_norms(norms, 500, rng)
    out = _run_round(tmp_path, updates, 2, norm_bound=1.0, transport=transport)
    np.testing.assert_allclose(_reconstruct(out), updates[[0, 2]].sum(0), rtol=0, atol=10 / SCALE)


if __name__ == "__main__":
    _process_main(sys.argv[1:])
