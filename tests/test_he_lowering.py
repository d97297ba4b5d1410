"""Lowering networks to affine maps, client-side im2col, and the encrypted convnet against plaintext."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from securecollab.data import load_dataset
from securecollab.he import HENet, Im2colGeometry, affine_layers, load_public, make_context, public_bytes
from securecollab.he.conv import Im2colConv
from securecollab.he.lower import conv_matrix
from securecollab.he.net import decrypt_logits, encrypt_input, kit_of
from securecollab.models import Square, build_model
from securecollab.plans import HEModelPlan


def _forward_affine(layers, x):
    h = x.reshape(len(x), -1).astype(np.float64)
    for i, (w, b) in enumerate(layers):
        h = h @ w.T + b
        if i < len(layers) - 1:
            h = h * h
    return h


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3), dict(kernel_size=3, padding=1),
                                    dict(kernel_size=(2, 3), stride=2), dict(kernel_size=3, dilation=2, bias=False)])
def test_conv_matrix_is_the_convolution(kwargs):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, **kwargs).double()
    x = torch.randn(4, 2, 9, 8, dtype=torch.float64)
    w, b, out_shape = conv_matrix(conv, (2, 9, 8))
    with torch.no_grad():
        expected = conv(x)
    assert tuple(expected.shape[1:]) == out_shape
    np.testing.assert_allclose(x.reshape(4, -1).numpy() @ w.T + b, expected.reshape(4, -1).numpy(), atol=1e-12)
    # each output row holds exactly the kernel (no padding: all of it)
    if kwargs.get("padding", 0) == 0:
        assert ((w != 0).sum(1) <= 2 * np.prod(conv.kernel_size)).all()


@pytest.mark.parametrize("name", ["mlp", "cnn", "convnet"])
def test_affine_layers_reproduce_square_models(name):
    model = build_model(name, (1, 8, 8), 10, activation="square", seed=3).double().eval()
    x = np.random.default_rng(0).random((5, 1, 8, 8))
    layers = affine_layers(model, (1, 8, 8))
    # cnn: conv | pool+conv | pool+flatten+fc | fc -- pooling folds into the next affine map
    assert len(layers) == {"mlp": 3, "cnn": 4, "convnet": 3}[name]
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_forward_affine(layers, x), expected, rtol=1e-9, atol=1e-9)


def test_non_polynomial_models_are_refused():
    with pytest.raises(ValueError, match="ReLU"):
        affine_layers(build_model("mlp", (1, 8, 8), 10, activation="relu"), (1, 8, 8))
    with pytest.raises(ValueError, match="end with a linear"):
        affine_layers(nn.Sequential(nn.Flatten(), nn.Linear(64, 4), Square()), (1, 8, 8))


def test_im2col_slots_times_weights_sum_to_the_convolution():
    torch.manual_seed(1)
    conv = nn.Conv2d(1, 4, 3).double()
    g = Im2colGeometry.of(conv, (1, 8, 8))
    assert (g.windows, g.kernel_elements, g.block, g.kpad, g.period) == (36, 9, 256, 16, 4096)
    x = np.random.default_rng(1).random((1, 8, 8))
    prod = (g.input_slots(x, 4096) * g.weight_slots(conv.weight.detach().numpy(), 4096)).reshape(g.kpad, g.block)
    assert g.ciphertexts == 1
    with torch.no_grad():
        expected = conv(torch.from_numpy(x)[None])[0].numpy().ravel() - np.repeat(conv.bias.detach().numpy(), 36)
    np.testing.assert_allclose(prod.sum(0)[:g.out_features], expected, atol=1e-12)
    assert g.galois_steps() == [256, 512, 1024, 2048]
    assert Im2colGeometry.from_dict(g.to_dict()) == g


def test_encrypted_im2col_convolution_matches_plaintext():
    torch.manual_seed(2)
    conv = nn.Conv2d(1, 4, 3).double()
    g = Im2colGeometry.of(conv, (1, 8, 8))
    ctx = make_context(1)
    server = load_public(public_bytes(ctx, g.galois_steps())).kit
    layer = Im2colConv(server, g, conv.weight.detach().numpy(), conv.bias.detach().numpy(), in_scale=server.scale)
    x = np.random.default_rng(2).random((1, 8, 8))
    out = kit_of(ctx).decrypt(layer([kit_of(ctx).encrypt(g.input_slots(x, 4096)[0])]))
    with torch.no_grad():
        expected = conv(torch.from_numpy(x)[None])[0].numpy().ravel()
    # the output is repeated with period `block`, as the next diagonal layer expects
    for copy in out.reshape(-1, g.block):
        np.testing.assert_allclose(copy[:g.out_features], expected, atol=2e-3)


@pytest.mark.parametrize("channels, rotated, ciphertexts", [(4, True, 1), (3, False, 4)])
def test_an_im2col_layout_larger_than_the_slots_makes_channels_by_rotation_or_goes_in_groups(
        channels, rotated, ciphertexts):
    """28x28, 7x7 stride 3 (the convnet's first layer on MedMNIST's shape): 64 padded kernel elements x 256
    outputs is 4x the 4096 slots. With 4 channels x 64 windows filling the block, the patches go once in one
    ciphertext and the server rotates them into the channels' copies; with 3 channels, kernel elements go in
    groups of 16, one ciphertext each. Either way the products, summed, are the convolution, in plaintext and
    encrypted."""
    torch.manual_seed(3)
    conv = nn.Conv2d(1, channels, 7, stride=3).double()
    g = Im2colGeometry.of(conv, (1, 28, 28))
    assert g.fitted(16384).group == 0 and not g.fitted(16384).rotated_channels and g.fitted(16384).ciphertexts == 1
    g = g.fitted(4096)
    assert (g.windows, g.kernel_elements, g.block, g.period) == (64, 49, 256, 4096)
    assert (g.rotated_channels, g.group, g.ciphertexts) == (rotated, 0 if rotated else 16, ciphertexts)
    assert g.sum_steps() == [256, 512, 1024, 2048]
    assert g.galois_steps() == ([64, 128, 192] if rotated else []) + [256, 512, 1024, 2048]
    assert Im2colGeometry.from_dict(g.to_dict()) == g
    # what a client refuses to lay out (the server describes the geometry)
    for bad, why in [({"group": 12}, "power of two"), ({"stride": [0, 3]}, "positive"), ({"kernel": [7]}, "2 each"),
                     ({"rotated_channels": "false"}, "true or false"), ({"kernel": [29, 29]}, "does not fit"),
                     ({"in_shape": [3, 28, 28], "group": 1, "rotated_channels": False}, "at most 64")]:
        with pytest.raises(ValueError, match=why):
            Im2colGeometry.from_dict({**g.to_dict(), **bad})
    if not rotated:
        with pytest.raises(ValueError, match="rotations"):
            Im2colGeometry.from_dict({**g.to_dict(), "group": 0, "rotated_channels": True})
    x = np.random.default_rng(3).random((1, 28, 28))
    inputs, weights = g.input_slots(x, 4096), g.weight_slots(conv.weight.detach().numpy(), 4096)
    assert inputs.shape == (ciphertexts, 4096) and weights.shape == (len(g.terms()), 4096)
    with torch.no_grad():
        expected = conv(torch.from_numpy(x)[None])[0].numpy().ravel()
    summed = sum(np.roll(inputs[i], -step) * w for (i, step), w in zip(g.terms(), weights))
    for step in g.sum_steps():
        summed = summed + np.roll(summed, -step)
    for copy in summed.reshape(-1, g.block):
        np.testing.assert_allclose(copy[:g.out_features], expected - np.repeat(conv.bias.detach().numpy(), 64),
                                   atol=1e-12)

    ctx = make_context(1)
    server = load_public(public_bytes(ctx, g.galois_steps())).kit
    layer = Im2colConv(server, g, conv.weight.detach().numpy(), conv.bias.detach().numpy(), in_scale=server.scale)
    with pytest.raises(ValueError, match=f"{ciphertexts} input ciphertexts"):
        layer([kit_of(ctx).encrypt(inputs[0])] * (ciphertexts + 1))
    out = kit_of(ctx).decrypt(layer([kit_of(ctx).encrypt(row) for row in inputs]))
    for copy in out.reshape(-1, g.block):
        np.testing.assert_allclose(copy[:g.out_features], expected, atol=5e-3)


@pytest.mark.parametrize("channels, ciphertexts", [(1, 1), (3, 10)])
def test_a_28x28_convnet_answers_single_queries_like_plaintext(channels, ciphertexts):
    """Gray 28x28: one ciphertext (channels by rotation); RGB: 147 kernel elements in 10 groups of 16."""
    model = build_model("convnet", (channels, 28, 28), 10, activation="square", seed=0).double()
    he = HENet.from_torch(model, (channels, 28, 28))
    assert he.input_encoding.ciphertexts == ciphertexts and he.min_slots == 4096
    ctx = make_context(he.depth)
    he.bind(load_public(public_bytes(ctx, he.galois_steps)))
    x = np.random.default_rng(4).random((2, channels, 28, 28))
    with torch.no_grad():
        plain = model(torch.from_numpy(x)).numpy()
    got = np.stack([decrypt_logits(ctx, he.evaluate(encrypt_input(ctx, xi, he.input_encoding)), 10) for xi in x])
    assert (got.argmax(1) == plain.argmax(1)).all()
    np.testing.assert_allclose(got, plain, atol=1e-3 + 1e-3 * np.abs(plain).max())
    with pytest.raises(ValueError, match=f"{ciphertexts} ciphertext"):
        he.evaluate(encrypt_input(ctx, x[0], he.input_encoding) * 2)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_he_friendly_models_stay_close_to_their_relu_counterparts(digits):
    for model in ("convnet", "mlp"):
        acc = {}
        for act in ("square", "relu"):
            net, _ = HEModelPlan(model=model, activation=act).train(digits)
            with torch.no_grad():
                acc[act] = (net(torch.from_numpy(digits.x_test)).argmax(1).numpy() == digits.y_test).mean()
        assert acc["square"] >= 0.95, (model, acc)
        assert acc["square"] >= acc["relu"] - 0.02, (model, acc)


def test_single_query_convnet_uses_im2col_and_matches_plaintext(digits):
    net, _ = HEModelPlan().train(digits)
    he = HENet.from_torch(net, digits.input_shape)
    assert he.input_encoding.im2col is not None and he.depth == 5
    ctx = make_context(he.depth)
    he.bind(load_public(public_bytes(ctx, he.galois_steps)))
    with torch.no_grad():
        plain = net(torch.from_numpy(digits.x_test[:4])).double().numpy()
    got = np.stack([decrypt_logits(ctx, he.evaluate(encrypt_input(ctx, x, he.input_encoding)), 10)
                    for x in digits.x_test[:4]])
    assert (got.argmax(1) == plain.argmax(1)).all()
    assert np.abs(got - plain).max() <= 0.05


@pytest.mark.parametrize("name, shape, ciphertexts", [("convnet", (1, 8, 8), 1), ("mlp", (1, 8, 8), 1),
                                                     ("convnet", (1, 28, 28), 1), ("convnet", (3, 28, 28), 10)])
def test_the_described_slot_layout_gathers_exactly_the_encoded_input(name, shape, ciphertexts):
    """What Describe sends a client written elsewhere (InputEncoding.slot_sources): gathering input values
    into one period per ciphertext by it and repeating gives the very slots the project's own client encrypts."""
    model = build_model(name, shape, 10, activation="square", seed=0)
    encoding = HENet.from_torch(model, shape).input_encoding
    assert (encoding.im2col is not None) == (name == "convnet") and encoding.ciphertexts == ciphertexts
    source = np.array(encoding.slot_sources())
    x = np.random.default_rng(0).random(shape) + 0.5  # no zero pixel: a -1 can only be padding
    gathered = np.where(source >= 0, x.ravel()[np.maximum(source, 0)], 0.0).reshape(ciphertexts, encoding.period)
    assert len(source) == ciphertexts * encoding.period
    assert np.array_equal(np.tile(gathered, (1, 4096 // encoding.period)), encoding.slots(x, 4096))
    assert set(source[source >= 0]) == set(range(math.prod(shape)))
    # im2col: each pixel once per window that covers it and per output channel; slots past them empty
    assert (source == -1).any() == (name == "convnet")
