"""The compact result form (securecollab/he/packing.py): exact up to the rounding it documents, smaller than
SEAL's serialization, and refusing what does not fit the receiver's context."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from securecollab.he import make_context
from securecollab.he.net import kit_of
from securecollab.he.packing import DROPPED_BITS, pack, unpack


@pytest.fixture(scope="module")
def kit():
    return kit_of(make_context(5))


def _result(kit, values, level=-1):
    ct = kit.encrypt(np.resize(values, kit.slot_count))
    kit.evaluator.mod_switch_to_inplace(ct, kit.level_parms()[level])
    return ct


def test_packed_result_decrypts_within_the_rounding_bound_in_fewer_bytes(kit):
    values = np.random.default_rng(0).uniform(-100, 100, kit.slot_count)
    ct = _result(kit, values)
    plain_ckks = kit.decrypt(ct)
    packed = pack(kit, ct)
    got = kit.decrypt(unpack(kit, packed))
    n = kit.slot_count * 2
    assert packed.value_bits == (26, 30) and packed.dropped_bits == DROPPED_BITS
    assert packed.nbytes == n * (26 + 30) // 8
    assert packed.nbytes < 0.65 * len(kit.ciphertext_bytes(ct))  # SEAL's own, zstd-compressed
    added = np.abs(got - plain_ckks).max()
    assert 1e-5 < added < 0.02  # rounding shows, and stays far below a logit's scale
    assert np.abs(plain_ckks - values).max() < 1e-3
    assert ct.is_ntt_form()  # the server's ciphertext is left as it was


def test_a_result_above_the_last_level_is_switched_down_first(kit):
    values = np.linspace(-50, 50, kit.slot_count)
    packed = pack(kit, _result(kit, values, level=2))
    assert np.abs(kit.decrypt(unpack(kit, packed)) - values).max() < 0.02


def test_dropping_more_bits_of_c1_costs_more_than_of_c0(kit):
    """c1's rounding is multiplied by the secret key: why c1 keeps more bits."""
    values = np.zeros(kit.slot_count)
    ct = _result(kit, values)
    err_c0 = np.abs(kit.decrypt(unpack(kit, pack(kit, ct, (12, 1)))) - kit.decrypt(ct)).max()
    err_c1 = np.abs(kit.decrypt(unpack(kit, pack(kit, ct, (1, 12)))) - kit.decrypt(ct)).max()
    assert err_c1 > 10 * err_c0


@pytest.mark.parametrize("change, words", [
    ({"modulus": 97}, "modulus"), ({"degree": 4096}, "degree"), ({"value_bits": (25, 30)}, "inconsistent"),
    ({"dropped_bits": (0, 7)}, "inconsistent"), ({"dropped_bits": (11,)}, "inconsistent"),
    ({"scale": float("nan")}, "scale"), ({"values": b"\0" * 10}, "bytes")])
def test_a_packed_result_that_does_not_fit_is_refused(kit, change, words):
    packed = dataclasses.replace(pack(kit, _result(kit, np.zeros(4))), **change)
    with pytest.raises(ValueError, match=words):
        unpack(kit, packed)
