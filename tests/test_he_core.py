"""CKKS inference core: encrypted MLP logits match plaintext, and the server-side context holds no secret."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts

from securecollab.data import load_dataset
from securecollab.he.batched import BatchLayout, HENetBatched, decrypt_batch, encrypt_batch, encrypt_batch_bytes
from securecollab.he.context import load_public, make_context, public_bytes, split_public
from securecollab.he.linear import DiagonalPlan, EncryptedLinear, replicate
from securecollab.he.net import HENet, decrypt_logits, encrypt_input, encrypt_input_bytes
from securecollab.he.seal import SealKit
from securecollab.models import build_model
from securecollab.training import TrainConfig, accuracy, predict_logits, train_local

LOGIT_TOL = 0.05


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits):
    model = build_model("mlp", digits.input_shape, digits.num_classes, activation="square", seed=0)
    train_local(model, digits.x_train, digits.y_train, TrainConfig(epochs=15, lr=0.01, batch_size=32, seed=0))
    return model


@pytest.fixture(scope="module")
def single(trained):
    """(client context, public blob, server-bound HENet)."""
    he = HENet.from_torch(trained, (1, 8, 8))
    ctx = make_context(he.depth)
    blob = public_bytes(ctx, he.galois_steps)
    he.bind(load_public(blob))
    return ctx, blob, he


def test_trained_square_mlp_is_accurate(trained, digits):
    assert accuracy(trained, digits.x_test, digits.y_test) > 0.9


def test_linear_layer_matches_numpy_for_rectangular_shapes():
    rng = np.random.default_rng(1)
    ctx = make_context(1, scale_bits=40)  # N(0, 1) weights: more precision than the MLP needs
    client = SealKit(ctx)
    for m, n in [(64, 64), (32, 64), (10, 32), (100, 30)]:
        plan = DiagonalPlan(m, n)
        server = load_public(public_bytes(ctx, plan.galois_steps())).kit
        w, b, x = rng.normal(size=(m, n)), rng.normal(size=m), rng.random(n)
        layer = EncryptedLinear(server, w, b, level=0, in_scale=server.scale)
        out = client.decrypt(layer(client.encrypt(replicate(x, plan.in_period, client.slot_count))))
        # Every slot must hold the (padded) result: the next layer rotates over all of them.
        np.testing.assert_allclose(out, replicate(w @ x + b, plan.out_period, client.slot_count), atol=1e-4)


def test_single_query_matches_plaintext(single, trained, digits):
    ctx, _, he = single
    x = digits.x_test[:20]
    expected = predict_logits(trained, x)
    got = np.stack([decrypt_logits(ctx, he.evaluate(encrypt_input(ctx, xi)), 10) for xi in x])
    assert np.abs(got - expected).max() <= LOGIT_TOL
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_default_context_fits_the_mlp_in_degree_8192(single):
    ctx, _, he = single
    assert ctx.seal_context().data.key_context_data().parms().poly_modulus_degree() == 8192
    assert he.depth == 5


def test_single_query_over_the_wire(single, trained, digits):
    ctx, _, he = single
    kit = SealKit(ctx)
    [upload] = encrypt_input_bytes(ctx, digits.x_test[0])
    # Seeded symmetric encryption: about half a public-key ciphertext.
    assert len(upload) < 0.6 * len(kit.ciphertext_bytes(encrypt_input(ctx, digits.x_test[0])[0]))
    reply = he.evaluate_bytes([upload])
    assert len(upload) + len(reply) <= 500_000
    got = decrypt_logits(ctx, kit.ciphertext_from_bytes(reply), 10)
    assert np.abs(got - predict_logits(trained, digits.x_test[:1])[0]).max() <= LOGIT_TOL


def test_batch_layout_packs_and_block_weights_match_numpy():
    rng = np.random.default_rng(2)
    layout = BatchLayout(5, 64)  # blocks of 8 slots, 8 features per ciphertext
    x, w = rng.normal(size=(5, 20)), rng.normal(size=(11, 20))
    slots = layout.pack(x)
    assert len(slots) == 3 and layout.galois_steps() == [8, 16, 32]
    np.testing.assert_array_equal(layout.unpack(slots, 20), x)
    # Plaintext model of one encrypted layer: sum_c sum_r P[o, c, r] * rot(x_c, r blocks).
    weights = layout.block_weights(w)
    out = [sum(np.repeat(weights[o, c, r], layout.block) * np.roll(slots[c], -r * layout.block)
               for c in range(len(slots)) for r in range(layout.groups)) for o in range(weights.shape[0])]
    np.testing.assert_allclose(layout.unpack(out, 11), x @ w.T, atol=1e-12)


def test_batched_whole_test_set_matches_plaintext(trained, digits):
    he = HENetBatched.from_torch(trained, (1, 8, 8))
    ctx = make_context(he.depth)
    n, slots = len(digits.x_test), SealKit(ctx).slot_count
    he.bind(load_public(public_bytes(ctx, HENetBatched.galois_steps(n, slots))), n)
    upload = encrypt_batch_bytes(ctx, digits.x_test)
    got = decrypt_batch(ctx, he.evaluate([he.kit.ciphertext_from_bytes(b) for b in upload]), n, 10)
    expected = predict_logits(trained, digits.x_test)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= LOGIT_TOL
    assert (got.argmax(1) == expected.argmax(1)).all()


def test_batched_full_batch_needs_no_rotation(trained, digits):
    he = HENetBatched.from_torch(trained, (1, 8, 8))
    ctx = make_context(he.depth)
    slots = SealKit(ctx).slot_count
    assert HENetBatched.galois_steps(slots, slots) == []
    # A full layout's plaintexts are per-weight constants: check on a small slice of the model.
    small = HENetBatched([(trained[1].weight.detach().double().numpy()[:4, :8], None)])
    small.bind(load_public(public_bytes(ctx, [])), slots)
    x = np.resize(digits.x_test[:, :8], (slots, 8))
    got = decrypt_batch(ctx, small.evaluate(encrypt_batch(ctx, x)), slots, 4)
    np.testing.assert_allclose(got, x @ small.layers[0][0].T, atol=1e-3)


def test_public_blob_holds_no_secret_key(single):
    ctx, blob, _ = single
    server = load_public(blob)
    assert not server.context.is_private() and not server.context.has_secret_key()
    with pytest.raises(ValueError):
        server.kit.decrypt(server.kit.encrypt(np.ones(4)))
    # TenSEAL's own decryption refuses too.
    with pytest.raises(ValueError):
        ts.ckks_vector(server.context, [1.0, 2.0]).decrypt()


def test_load_public_refuses_a_secret_key(single):
    ctx, blob, _ = single
    _, galois = split_public(blob)
    private = ctx.serialize(save_secret_key=True, save_galois_keys=False)
    leaky = b"SCHE1" + len(private).to_bytes(8, "big") + private + galois
    with pytest.raises(ValueError, match="secret key"):
        load_public(leaky)
    with pytest.raises(ValueError):
        load_public(b"not a context")


def test_galois_keys_only_for_the_model_steps(single):
    ctx, blob, he = single
    kit = load_public(blob).kit
    tool = kit.context.key_context_data().galois_tool()
    assert kit.galois_keys.size() == len(he.galois_steps)
    for step in he.galois_steps:
        assert kit.galois_keys.has_key(tool.get_elt_from_step(step))
    for step in (3, 64, -1):
        assert not kit.galois_keys.has_key(tool.get_elt_from_step(step))
    # A model that needs a missing rotation is refused at bind time.
    rng = np.random.default_rng(0)
    wider = HENet([(rng.normal(size=(8, 256)), None)])
    with pytest.raises(ValueError, match="Galois key"):
        wider.bind(load_public(blob))
