"""Specification of securecollab.secagg.sharing: fixed-point encoding and additive shares over Z_{2^64}.

What must hold:
* encode/decode round-trips any in-bound float within 2^-17 (round to nearest), negatives
  included; NaN/Inf and values at or past the safe bound are refused with a message naming them;
* shares for 2 and 3 parties, with and without seed compression, add up to the secret exactly
  (mod 2^64), for every length including 0 and 1;
* a seed expands deterministically with AES-256-CTR and different seeds give different streams;
* any single share looks uniform whatever the secret, and is uncorrelated with it;
* adding K clients' shares party by party reconstructs the exact encoded sum.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from securecollab.secagg.sharing import (
    FRAC_BITS,
    MAX_ABS,
    SCALE,
    SEED_BYTES,
    Share,
    add_shares,
    client_shares,
    decode_fixed,
    encode_fixed,
    from_wire,
    narrow_bound,
    prg_int64,
    prg_words,
    reconstruct,
    reveal,
    split_shares,
    to_wire,
)

HALF_ULP = 2.0 ** -(FRAC_BITS + 1)
N_STAT = 100_000
MODES = [(n, c) for n in (2, 3) for c in (True, False)]


def seed_source(label: str):
    """A reproducible stand-in for os.urandom, so statistical tests never flake."""
    counter = itertools.count()
    return lambda n: hashlib.sha256(f"{label}/{next(counter)}".encode()).digest()[:n]


def secrets_for_stats() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "zeros": np.zeros(N_STAT, np.int64),
        "ones": encode_fixed(np.ones(N_STAT)),
        "ramp": encode_fixed(np.linspace(-1000.0, 1000.0, N_STAT)),
        "gaussian": encode_fixed(rng.normal(0.0, 1.0, N_STAT)),
    }


# --- fixed point -------------------------------------------------------------------------------

in_bound = st.floats(min_value=-MAX_ABS, max_value=MAX_ABS, exclude_min=True, exclude_max=True,
                     allow_nan=False)


@given(hnp.arrays(np.float64, st.integers(0, 50), elements=in_bound))
def test_round_trip_float64_within_half_step(x):
    assert np.all(np.abs(decode_fixed(encode_fixed(x)) - x) <= HALF_ULP)


@given(hnp.arrays(np.float32, st.integers(0, 50),
                  elements=st.floats(-MAX_ABS, MAX_ABS, width=32, exclude_min=True, exclude_max=True)))
def test_round_trip_float32_within_half_step(x):
    assert encode_fixed(x).dtype == np.int64
    assert np.all(np.abs(decode_fixed(encode_fixed(x)) - x.astype(np.float64)) <= HALF_ULP)


def test_encoding_is_scale_2_16_rounded_to_nearest_with_twos_complement_negatives():
    x = np.array([0.0, 1.0, -1.0, 1.7, -1.7, 3 * 2.0**-17, -(3 * 2.0**-17), 0.25 * 2.0**-16, 1e9])
    v = encode_fixed(x)
    assert SCALE == 65536
    assert v.tolist() == [0, 65536, -65536, 111411, -111411, 2, -2, 0, 65536 * 10**9]
    assert decode_fixed(v).tolist()[:3] == [0.0, 1.0, -1.0]
    assert decode_fixed(np.array([-1], np.int64))[0] == -(2.0**-16)


def test_encoding_keeps_shape():
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    np.testing.assert_array_equal(decode_fixed(encode_fixed(x)), x)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(bad):
    with pytest.raises(ValueError, match="NaN/Inf.*index \\(2,\\)"):
        encode_fixed(np.array([0.0, 1.0, bad], np.float32))


@pytest.mark.parametrize("value", [MAX_ABS, -MAX_ABS, 1e15, -3e300])
def test_out_of_bound_is_refused_naming_the_max(value):
    with pytest.raises(ValueError, match=re.escape(f"max |x| = {abs(value):.6g} ")):
        encode_fixed(np.array([1.0, value]))


def test_safe_bound_keeps_64_clients_from_wrapping():
    near = np.nextafter(MAX_ABS, 0.0)
    for sign in (1.0, -1.0):
        total = add_shares([encode_fixed(np.array([sign * near]))] * 64)
        assert decode_fixed(total)[0] == pytest.approx(sign * 64 * near)


def test_non_numbers_and_non_int64_are_refused():
    with pytest.raises(TypeError):
        encode_fixed(np.array(["1.0"]))
    with pytest.raises(TypeError):
        decode_fixed(np.array([1.0]))


# --- PRG ---------------------------------------------------------------------------------------

def test_prg_is_aes256_ctr_keystream():
    # Known answer: AES-256 of the zero block under the zero key.
    assert prg_int64(bytes(32), 2).astype("<i8").tobytes() == bytes.fromhex("dc95c078a2408989ad48a21492842087")
    # Block i of the stream is AES-256 under the seed of the counter i (from 0, big-endian), as a client
    # written elsewhere would compute it.
    seed = bytes(range(32))
    ecb = Cipher(algorithms.AES256(seed), modes.ECB()).encryptor()
    blocks = b"".join(ecb.update(i.to_bytes(16, "big")) for i in range(4))
    assert prg_int64(seed, 8).astype("<i8").tobytes() == blocks


def test_prg_is_deterministic_per_seed_and_differs_across_seeds():
    a, b = os.urandom(SEED_BYTES), os.urandom(SEED_BYTES)
    x = prg_int64(a, 10_000)
    assert x.dtype == np.int64 and x.shape == (10_000,)
    np.testing.assert_array_equal(x, prg_int64(a, 10_000))
    np.testing.assert_array_equal(x[:3000], prg_int64(a, 3000))  # a prefix of the same stream
    assert np.mean(x == prg_int64(b, 10_000)) < 0.001
    # Longer than one internal chunk: the stream continues across chunk boundaries.
    long = prg_int64(a, 300_000)
    np.testing.assert_array_equal(long[:10_000], x)
    assert len(np.unique(long)) == len(long)
    assert prg_int64(a, 0).shape == (0,)


@pytest.mark.parametrize("seed", [b"", bytes(16), bytes(33), "x" * 32, None])
def test_prg_refuses_wrong_seeds(seed):
    with pytest.raises(ValueError, match="seed"):
        prg_int64(seed, 4)


def test_prg_refuses_negative_length():
    with pytest.raises(ValueError, match="length"):
        prg_int64(bytes(32), -1)


# --- Share -------------------------------------------------------------------------------------

def test_share_needs_exactly_one_of_dense_or_seed():
    with pytest.raises(ValueError, match="exactly one"):
        Share(party=0)
    with pytest.raises(ValueError, match="exactly one"):
        Share(party=0, dense=np.zeros(2, np.int64), seed=bytes(32), length=2)


@pytest.mark.parametrize("kwargs", [
    dict(party=1, seed=bytes(31), length=4),
    dict(party=1, seed=bytearray(32), length=4),
    dict(party=-1, seed=bytes(32), length=4),
    dict(party=1, seed=bytes(32), length=-4),
    dict(party=0, dense=np.zeros(4, np.float64)),
    dict(party=0, dense=np.zeros((2, 2), np.int64)),
    dict(party=0, dense=[1, 2, 3]),
    dict(party=0, dense=np.zeros(4, np.int64), length=5),
])
def test_share_refuses_malformed_fields(kwargs):
    with pytest.raises(ValueError):
        Share(**kwargs)


def test_share_expands_seed_or_returns_dense():
    seed = os.urandom(SEED_BYTES)
    np.testing.assert_array_equal(Share(party=2, seed=seed, length=7).expand(), prg_int64(seed, 7))
    dense = np.arange(5, dtype=np.int64)
    share = Share(party=0, dense=dense)
    assert share.length == 5 and share.expand() is dense


# --- splitting and reconstruction ----------------------------------------------------------------

ring_vectors = hnp.arrays(np.int64, st.integers(0, 64),
                          elements=st.integers(-(2**63), 2**63 - 1))


@settings(max_examples=60)
@given(ring_vectors, st.sampled_from(MODES))
def test_split_reconstructs_exactly(secret, mode):
    n_parties, compress = mode
    shares = split_shares(secret, n_parties, compress=compress)
    assert [s.party for s in shares] == list(range(n_parties))
    assert all(s.length == secret.size for s in shares)
    assert shares[0].dense is not None
    assert all((s.seed is not None) == compress for s in shares[1:])
    np.testing.assert_array_equal(reconstruct(shares), secret)
    np.testing.assert_array_equal(reconstruct([s.expand() for s in shares]), secret)


@pytest.mark.parametrize("length", [0, 1])
@pytest.mark.parametrize("n_parties,compress", MODES)
def test_split_tiny_vectors(length, n_parties, compress):
    secret = np.full(length, -(2**63), np.int64)
    np.testing.assert_array_equal(reconstruct(split_shares(secret, n_parties, compress=compress)), secret)


def test_missing_share_does_not_reconstruct():
    secret = encode_fixed(np.linspace(-5, 5, 1000))
    shares = split_shares(secret, 3)
    assert np.mean(reconstruct(shares[:2]) == secret) < 0.01


def test_compressed_and_dense_modes_send_the_same_shares():
    secret = encode_fixed(np.linspace(-5, 5, 1000))
    packed = split_shares(secret, 3, compress=True, rng_seed_source=seed_source("same"))
    dense = split_shares(secret, 3, compress=False, rng_seed_source=seed_source("same"))
    for p, d in zip(packed, dense):
        assert d.dense is not None
        np.testing.assert_array_equal(p.expand(), d.expand())


def test_split_draws_fresh_seeds_from_the_source():
    drawn = []

    def source(n):
        drawn.append(os.urandom(n))
        return drawn[-1]

    shares = split_shares(np.zeros(8, np.int64), 3, rng_seed_source=source)
    assert [s.seed for s in shares[1:]] == drawn and len(drawn) == 2
    default = split_shares(np.zeros(8, np.int64), 3)
    assert default[1].seed != default[2].seed != shares[1].seed


@pytest.mark.parametrize("args,exc", [
    ((np.zeros(4, np.int64), 1), ValueError),
    ((np.zeros(4, np.int64), True), ValueError),
    ((np.zeros(4, np.float64), 2), ValueError),
    ((np.zeros((2, 2), np.int64), 2), ValueError),
])
def test_split_refuses_bad_arguments(args, exc):
    with pytest.raises(exc):
        split_shares(*args)


def test_split_refuses_a_bad_seed_source():
    with pytest.raises(ValueError, match="rng_seed_source"):
        split_shares(np.zeros(4, np.int64), 2, rng_seed_source=lambda n: bytes(n - 1))


@pytest.mark.parametrize("n_parties", [2, 3])
def test_client_shares_rotate_the_dense_share_and_still_reconstruct(n_parties):
    update = np.linspace(-3.0, 3.0, 50)
    dense_at = set()
    for client, round_ in itertools.product(("client-0", "client-1", "client-2"), range(4)):
        shares = client_shares(client, round_, update, n_parties, compress=True)
        assert [s.party for s in shares] == list(range(n_parties))  # share i goes to party i
        np.testing.assert_array_equal(reconstruct(shares), encode_fixed(update))
        dense_at |= {s.party for s in shares if s.dense is not None}
    assert dense_at == set(range(n_parties))  # the dense correction spreads over every party


def test_add_shares_wraps_without_warnings():
    top = np.array([2**63 - 1, -(2**63)], np.int64)
    with np.errstate(all="raise"):
        total = add_shares([top, np.array([1, -1], np.int64)])
    assert total.tolist() == [-(2**63), 2**63 - 1]
    with pytest.raises(ValueError):
        add_shares([])
    with pytest.raises(ValueError):
        add_shares([np.zeros(2, np.int64), np.zeros(3, np.int64)])
    with pytest.raises(TypeError):
        add_shares([np.zeros(2, np.int64), np.zeros(2, np.int32)])


@pytest.mark.parametrize("n_parties,compress", MODES)
def test_k_clients_aggregate_party_by_party(n_parties, compress):
    rng = np.random.default_rng(7)
    k, d = 10, 5000
    updates = [rng.normal(0.0, 3.0, d).astype(np.float32) for _ in range(k)]
    encoded = [encode_fixed(u) for u in updates]
    per_client = [split_shares(e, n_parties, compress=compress) for e in encoded]
    # Each party adds up what it holds; only the per-party totals are combined.
    party_totals = [add_shares(shares[p].expand() for shares in per_client) for p in range(n_parties)]
    aggregate = reconstruct(party_totals)
    np.testing.assert_array_equal(aggregate, add_shares(encoded))
    true_sum = np.sum([u.astype(np.float64) for u in updates], axis=0)
    assert np.max(np.abs(decode_fixed(aggregate) - true_sum)) <= k * HALF_ULP


# --- a single share reveals nothing --------------------------------------------------------------

def uniform_bins_chi2(values: np.ndarray, bins: int = 256) -> float:
    counts = np.bincount(values, minlength=bins)
    expected = len(values) / bins
    return float(np.sum((counts - expected) ** 2 / expected))


# chi-square with 255 degrees of freedom: mean 255, sd 22.6; 400 is over 6 sd out.
CHI2_LIMIT = 400.0


@pytest.mark.parametrize("n_parties,compress", MODES)
def test_every_single_share_looks_uniform_and_uncorrelated(n_parties, compress):
    for name, secret in secrets_for_stats().items():
        shares = split_shares(secret, n_parties, compress=compress,
                              rng_seed_source=seed_source(f"{name}/{n_parties}/{compress}"))
        for share in shares:
            u = share.expand().view(np.uint64)
            where = f"{name} secret, party {share.party}"
            # Uniform on [0, 2^64): mean 1/2, sd of the mean 0.29/sqrt(1e5) ~ 0.0009.
            assert abs(np.mean(u / 2.0**64) - 0.5) < 0.005, where
            assert uniform_bins_chi2((u >> np.uint64(56)).astype(np.intp)) < CHI2_LIMIT, where
            assert uniform_bins_chi2(((u >> np.uint64(8)) & np.uint64(0xFF)).astype(np.intp)) < CHI2_LIMIT, where
            assert uniform_bins_chi2((u & np.uint64(0xFF)).astype(np.intp)) < CHI2_LIMIT, where
            if np.ptp(secret) > 0:
                # |r| for independent samples has sd 1/sqrt(1e5) ~ 0.003.
                r = np.corrcoef(secret.astype(np.float64), share.expand().astype(np.float64))[0, 1]
                assert abs(r) < 0.02, where
                low = np.corrcoef(secret & 0xFFFF, share.expand() & 0xFFFF)[0, 1]
                assert abs(low) < 0.02, where


@pytest.mark.parametrize("n_parties,compress", MODES)
def test_share_distribution_does_not_depend_on_the_secret(n_parties, compress):
    # Party 0's share is the one computed from the secret; its statistics must not move with it.
    stats = []
    for name, secret in secrets_for_stats().items():
        share = split_shares(secret, n_parties, compress=compress,
                             rng_seed_source=seed_source(name))[0].expand().view(np.uint64)
        stats.append((np.mean(share / 2.0**64), np.mean((share & np.uint64(0xFFFF)) / 65536.0)))
    stats = np.array(stats)
    assert np.ptp(stats[:, 0]) < 0.008 and np.ptp(stats[:, 1]) < 0.008


def test_narrow_ring_sums_residues_exactly_up_to_its_bound_and_wraps_beyond_it():
    """A plain sum in Z_2^32: each party sums the residues of its shares; revealing sign-extends the sum.
    Exact while the sum's encoding fits int32 (updates under narrow_bound); beyond that it wraps."""
    k, rng = 10, np.random.default_rng(5)
    bound = narrow_bound(k)
    assert bound == 2.0 ** 15 / k
    updates = rng.uniform(-1, 1, size=(k, 1000)) * bound * 0.999
    updates[:, 0] = bound * 0.999  # the sum's extreme: just inside int32
    per_party = [[], [], []]
    for u in updates:
        for s in split_shares(encode_fixed(u), 3, bits=32):
            assert s.expand().dtype == np.uint32 and (s.party == 0 or s.dense is None)  # seeds expand to uint32
            words = to_wire(s.expand(), 32)
            assert len(words) == 4 * u.size  # 4-byte words on the wire
            per_party[s.party].append(from_wire(words, 32))
    results = [from_wire(to_wire(add_shares(p), 32), 32) for p in per_party]
    total = reveal(results, 32)
    np.testing.assert_array_equal(total, encode_fixed(updates).sum(0))
    assert decode_fixed(total)[0] == pytest.approx(k * bound * 0.999, abs=1e-3)
    # the residues of 64-bit shares are 32-bit shares too (the reduction is a ring map)
    wide = [from_wire(to_wire(s.expand(), 32), 32) for s in split_shares(encode_fixed(updates[0]), 3)]
    np.testing.assert_array_equal(reveal(wide, 32), encode_fixed(updates[0]))
    # one more update at the bound pushes the sum past 2^31 in fixed point: it wraps to the other sign
    over = [add_shares([r, s.expand()]) for r, s in
            zip(results, split_shares(encode_fixed(np.full(1000, bound)), 3, bits=32))]
    assert decode_fixed(reveal(over, 32))[0] < 0
    with pytest.raises(TypeError, match="all int64 or all uint32"):
        add_shares([results[0], results[0].astype(np.int64)])
    with pytest.raises(ValueError, match="uint32"):
        Share(party=0, dense=np.zeros(3, np.int64), bits=32)
    with pytest.raises(ValueError, match="32 or 64"):
        Share(party=1, seed=bytes(32), length=3, bits=16)
    # 64-bit words are the plain ring: no reduction
    secret = encode_fixed(updates[0])
    np.testing.assert_array_equal(reveal([from_wire(to_wire(s.expand(), 64), 64) for s in split_shares(secret, 3)],
                                         64), secret)
    with pytest.raises(ValueError, match="32 or 64"):
        to_wire(secret, 16)
    # a 32-bit seed is the same keystream, read in 4-byte words
    seed = bytes(range(32))
    np.testing.assert_array_equal(prg_words(seed, 2000, 32).view("<i8"), prg_int64(seed, 1000))


@pytest.mark.parametrize("k", [1, 3, 10])
def test_the_narrow_bound_is_checked_on_the_encoding_where_rounding_could_cross_it(k):
    """Just under the float bound a value can round up to one step above 2^31 / k: k of them would wrap. The
    honest client's check (client_shares with sum_of) refuses what would wrap and accepts what would not."""
    bound = narrow_bound(k)
    just_under = bound - 2.0 ** -20  # rounds to bound * 2^16 exactly: k of them reach 2^31
    with pytest.raises(ValueError, match="could wrap"):
        client_shares("client-0", 0, np.array([0.5, just_under]), 3, bits=32, sum_of=k)
    wrapped = [add_shares(p) for p in zip(*[[s.expand() for s in split_shares(encode_fixed(np.array([just_under])),
                                                                               3, bits=32)] for _ in range(k)])]
    assert decode_fixed(reveal(wrapped, 32))[0] < 0  # what the check prevents: the sum wraps to the other sign
    safe = bound - 2.0 ** -16  # one step lower encodes below 2^31 / k
    shares = client_shares("client-0", 0, np.array([0.5, safe]), 3, bits=32, sum_of=k)
    assert len(shares) == 3 and all(s.bits == 32 for s in shares)
    assert client_shares("client-0", 0, np.array([1e6]), 3, bits=64, sum_of=k)  # the 64-bit ring has room
