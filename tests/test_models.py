"""Tests for the cuttable models and their parameter helpers."""

import numpy as np
import pytest
import torch
from torch import nn

from securecollab.data import load_dataset
from securecollab.models import (
    ACTIVATIONS,
    MODELS,
    CutSequential,
    Poly,
    Square,
    build_model,
    count_parameters,
    load_arrays,
    parameters_to_arrays,
    split_model,
)

DIGITS_SHAPE = (1, 8, 8)
MNIST_SHAPE = (1, 28, 28)


@pytest.mark.parametrize(
    "name, input_shape",
    [("mlp", DIGITS_SHAPE), ("cnn", DIGITS_SHAPE), ("cnn", MNIST_SHAPE),
     ("mlp", (30,)), ("cnn", (3, 28, 28)), ("cnn", (1, 9, 11))],
)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_output_shape(name, input_shape, activation):
    model = build_model(name, input_shape, 10, activation=activation, seed=0)
    assert isinstance(model, CutSequential)
    out = model(torch.zeros(5, *input_shape))
    assert out.shape == (5, 10)


def test_layer_sizes():
    mlp = build_model("mlp", DIGITS_SHAPE, 10)
    linears = [m for m in mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 64), (64, 32), (32, 10)]
    cnn = build_model("cnn", MNIST_SHAPE, 7)
    assert not any(isinstance(m, nn.MaxPool2d) for m in cnn)
    assert sum(isinstance(m, nn.AvgPool2d) for m in cnn) == 2
    linears = [m for m in cnn if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16 * 7 * 7, 64), (64, 7)]


def _all_cuts():
    for name, shape in [("mlp", DIGITS_SHAPE), ("cnn", DIGITS_SHAPE), ("cnn", MNIST_SHAPE)]:
        for cut in build_model(name, shape, 10).cut_points:
            yield name, shape, cut


@pytest.mark.parametrize("name, input_shape, cut", list(_all_cuts()))
def test_split_halves_compose_to_the_full_model(name, input_shape, cut):
    model = build_model(name, input_shape, 10, seed=1)
    bottom, top = split_model(model, cut)
    x = torch.randn(4, *input_shape)
    torch.testing.assert_close(top(bottom(x)), model(x))
    assert len(bottom) + len(top) == len(model)
    assert len(bottom) > 0 and len(top) > 0


@pytest.mark.parametrize("name, input_shape, cut", list(_all_cuts()))
def test_split_halves_share_parameters(name, input_shape, cut):
    model = build_model(name, input_shape, 10, seed=1)
    bottom, top = split_model(model, cut)
    full_ids = {id(p) for p in model.parameters()}
    half_ids = [id(p) for p in bottom.parameters()] + [id(p) for p in top.parameters()]
    assert set(half_ids) == full_ids and len(half_ids) == len(full_ids)
    # Editing a half edits the full model.
    first = next(bottom.parameters())
    with torch.no_grad():
        first.add_(1.0)
    assert first is next(model.parameters())


def test_cut_names_and_default():
    mlp = build_model("mlp", DIGITS_SHAPE, 10)
    cnn = build_model("cnn", DIGITS_SHAPE, 10)
    assert set(mlp.cut_points) == {"after_fc1", "after_fc2"}
    assert set(cnn.cut_points) == {"after_conv1", "after_conv2", "after_fc1"}
    assert mlp.default_cut in mlp.cut_points and cnn.default_cut in cnn.cut_points
    bottom, _ = split_model(cnn)
    assert len(bottom) == cnn.cut_points[cnn.default_cut]
    with pytest.raises(ValueError, match="unknown cut 'after_conv9'"):
        split_model(cnn, "after_conv9")


@pytest.mark.parametrize("name", MODELS)
def test_square_variant_is_polynomial(name):
    model = build_model(name, DIGITS_SHAPE, 10, activation="square")
    modules = list(model.modules())
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in modules)
    assert any(isinstance(m, Square) for m in modules)
    poly = build_model(name, DIGITS_SHAPE, 10, activation="poly")
    assert not any(isinstance(m, nn.ReLU) for m in poly.modules())
    assert any(isinstance(m, Poly) for m in poly.modules())


def test_polynomial_activations():
    x = torch.tensor([-2.0, 0.0, 3.0])
    torch.testing.assert_close(Square()(x), torch.tensor([4.0, 0.0, 9.0]))
    torch.testing.assert_close(Poly(a=0.5, b=-1.0)(x), torch.tensor([4.0, 0.0, 1.5]))


@pytest.mark.parametrize("name", MODELS)
def test_seeded_build_is_deterministic_and_leaves_global_rng_alone(name):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = build_model(name, DIGITS_SHAPE, 10, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    b = build_model(name, DIGITS_SHAPE, 10, seed=5)
    c = build_model(name, DIGITS_SHAPE, 10, seed=6)
    for (_, pa), (_, pb) in zip(parameters_to_arrays(a), parameters_to_arrays(b)):
        np.testing.assert_array_equal(pa, pb)
    assert not all(
        np.array_equal(pa, pc)
        for (_, pa), (_, pc) in zip(parameters_to_arrays(a), parameters_to_arrays(c))
    )


def test_build_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet", DIGITS_SHAPE, 10)
    with pytest.raises(ValueError, match="cnn needs image input"):
        build_model("cnn", (30,), 2)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        build_model("mlp", (30,), 2, activation="tanh")
    with pytest.raises(ValueError, match="at least 4x4"):
        build_model("cnn", (1, 2, 8), 2)


def test_parameter_arrays_round_trip():
    source = build_model("cnn", DIGITS_SHAPE, 10, seed=0)
    target = build_model("cnn", DIGITS_SHAPE, 10, seed=1)
    arrays = parameters_to_arrays(source)
    assert [name for name, _ in arrays] == list(source.state_dict())
    assert all(a.dtype == np.float32 for _, a in arrays)
    load_arrays(target, arrays)
    x = torch.randn(3, *DIGITS_SHAPE)
    torch.testing.assert_close(target(x), source(x))
    # Arrays are copies: changing them later touches neither model.
    arrays[0][1][...] = 0.0
    assert not torch.all(next(source.parameters()) == 0)
    assert not torch.all(next(target.parameters()) == 0)


def test_load_arrays_rejects_mismatches():
    model = build_model("mlp", (30,), 2, seed=0)
    good = parameters_to_arrays(model)
    name, first = good[0]
    with pytest.raises(ValueError, match="missing"):
        load_arrays(model, good[1:])
    with pytest.raises(ValueError, match="unexpected.*extra"):
        load_arrays(model, good + [("extra", first)])
    with pytest.raises(ValueError, match="more than once"):
        load_arrays(model, good + [good[0]])
    with pytest.raises(ValueError, match=f"{name}.*shape"):
        load_arrays(model, [(name, first.T)] + good[1:])
    with pytest.raises(ValueError, match=f"{name}.*float32"):
        load_arrays(model, [(name, first.astype(np.float64))] + good[1:])
    with pytest.raises(ValueError, match="numpy array"):
        load_arrays(model, [(name, first.tolist())] + good[1:])
    # A failed load leaves the model untouched.
    for (_, before), (_, after) in zip(good, parameters_to_arrays(model)):
        np.testing.assert_array_equal(before, after)


def test_count_parameters():
    model = build_model("mlp", (30,), 2)
    assert count_parameters(model) == (30 * 64 + 64) + (64 * 32 + 32) + (32 * 2 + 2)


def _train_and_score(model, ds, epochs=8, batch_size=32):
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), batch_size):
            batch = perm[start:start + batch_size]
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    with torch.no_grad():
        predicted = model(torch.from_numpy(ds.x_test)).argmax(dim=1).numpy()
    return float((predicted == ds.y_test).mean())


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("activation", ["relu", "square"])
def test_models_learn_digits(name, activation):
    ds = load_dataset("digits", seed=0)
    model = build_model(name, ds.input_shape, ds.num_classes, activation=activation, seed=0)
    assert _train_and_score(model, ds) > 0.85
