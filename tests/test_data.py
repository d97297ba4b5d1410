"""Tests for dataset loading and client partitioning."""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securecollab.data import (
    DATASETS,
    PARTITION_SCHEMES,
    Dataset,
    load_dataset,
    load_npz,
    partition,
    partition_dirichlet,
    partition_iid,
)

# --- scikit-learn datasets -------------------------------------------------


def test_digits_shapes_dtypes_and_range():
    ds = load_dataset("digits")
    assert isinstance(ds, Dataset)
    assert ds.name == "digits"
    assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.x_train.shape[1:] == (1, 8, 8) and ds.x_test.shape[1:] == (1, 8, 8)
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    assert ds.x_train.max() == 1.0
    assert ds.num_classes == 10
    assert ds.input_shape == (1, 8, 8)
    assert ds.is_image


def test_breast_cancer_is_standardized_with_train_statistics():
    ds = load_dataset("breast_cancer", seed=3)
    assert ds.x_train.shape[1:] == (30,) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int64
    assert ds.num_classes == 2
    assert ds.input_shape == (30,)
    assert not ds.is_image
    np.testing.assert_allclose(ds.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(ds.x_train.std(axis=0), 1.0, atol=1e-4)
    # The test split is transformed with train statistics, so it is not exactly standard.
    assert np.abs(ds.x_test.mean(axis=0)).max() > 1e-3


def test_test_fraction_sets_split_size():
    ds = load_dataset("digits", test_fraction=0.5)
    assert abs(len(ds.x_test) - 1797 / 2) <= 1


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_split_is_deterministic_per_seed(name):
    a = load_dataset(name, seed=7)
    b = load_dataset(name, seed=7)
    c = load_dataset(name, seed=8)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train, c.y_train) or not np.array_equal(a.x_train, c.x_train)


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_split_is_stratified(name):
    ds = load_dataset(name, seed=1)
    train_share = np.bincount(ds.y_train, minlength=ds.num_classes) / len(ds.y_train)
    test_share = np.bincount(ds.y_test, minlength=ds.num_classes) / len(ds.y_test)
    np.testing.assert_allclose(train_share, test_share, atol=0.01)


def test_unknown_dataset_and_bad_fraction():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)
    assert set(DATASETS) == {"digits", "breast_cancer", "npz"}


# --- npz (MedMNIST-style) files ---------------------------------------------


def _write_npz(path, **overrides):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 3, size=(20, 1)),
        "test_images": rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 3, size=(6, 1)),
    }
    arrays["train_labels"][:3, 0] = [0, 1, 2]  # make sure every class occurs
    arrays.update(overrides)
    arrays = {key: value for key, value in arrays.items() if value is not None}
    np.savez(path, **arrays)
    return arrays


def test_npz_grayscale_with_column_labels(tmp_path):
    path = tmp_path / "tiny.npz"
    raw = _write_npz(path)
    ds = load_dataset("npz", path=str(path))
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (6, 1, 28, 28)
    assert ds.x_train.dtype == np.float32
    assert ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    np.testing.assert_allclose(ds.x_train[:, 0], raw["train_images"] / 255.0, rtol=1e-6)
    assert ds.y_train.shape == (20,) and ds.y_train.dtype == np.int64
    np.testing.assert_array_equal(ds.y_train, raw["train_labels"][:, 0])
    assert ds.num_classes == 3
    assert ds.is_image and ds.input_shape == (1, 28, 28)


def test_npz_color_images_become_channels_first(tmp_path):
    path = tmp_path / "color.npz"
    images = np.zeros((20, 28, 28, 3), dtype=np.uint8)
    images[:, 2, 5, 1] = 255  # one bright pixel in the green channel
    _write_npz(path, train_images=images,
               test_images=np.zeros((6, 28, 28, 3), dtype=np.uint8),
               train_labels=np.arange(20) % 4, test_labels=np.arange(6) % 4)
    ds = load_dataset("npz", path=path)
    assert ds.x_train.shape == (20, 3, 28, 28)
    assert ds.x_train[0, 1, 2, 5] == 1.0 and ds.x_train.sum() == 20
    assert ds.y_train.shape == (20,)
    assert ds.num_classes == 4


def test_npz_needs_a_path_and_an_existing_file(tmp_path):
    with pytest.raises(ValueError, match="path"):
        load_dataset("npz")
    with pytest.raises(FileNotFoundError):
        load_dataset("npz", path=tmp_path / "absent.npz")


def test_npz_missing_key_is_named(tmp_path):
    path = tmp_path / "nokey.npz"
    _write_npz(path, test_labels=None)
    with pytest.raises(ValueError, match="test_labels"):
        load_dataset("npz", path=path)


def test_npz_object_array_is_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    labels = np.empty(20, dtype=object)
    labels[:] = [0, 1] * 10
    _write_npz(path, train_labels=labels)
    with pytest.raises(ValueError, match="train_labels.*object array"):
        load_dataset("npz", path=path)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"train_labels": np.zeros(19, dtype=np.int64)}, "20 examples but train_labels has 19"),
        ({"test_labels": np.zeros((6, 2), dtype=np.int64)}, "test_labels must have shape"),
        ({"train_images": np.zeros((20, 28), dtype=np.uint8)}, "rank"),
        ({"train_images": np.zeros((20, 1, 28, 28, 1), dtype=np.uint8)}, "rank"),
        ({"train_images": np.zeros((20, 28, 28), dtype=np.float64)}, "uint8"),
        ({"test_images": np.zeros((6, 14, 14), dtype=np.uint8)}, "shape"),
        ({"train_labels": np.full(20, 0.5)}, "integer"),
        ({"train_labels": -np.ones(20, dtype=np.int64)}, "negative"),
    ],
)
def test_npz_malformed_arrays_are_rejected(tmp_path, override, message):
    path = tmp_path / "bad.npz"
    _write_npz(path, **override)
    with pytest.raises(ValueError, match=message):
        load_dataset("npz", path=path)


# --- partitions -------------------------------------------------------------

label_arrays = st.integers(min_value=20, max_value=300).flatmap(
    lambda n: st.integers(min_value=2, max_value=6).map(
        lambda k: np.arange(n) % k
    )
)


def _assert_disjoint_cover(shares, n):
    everything = np.concatenate(shares)
    assert all(share.dtype == np.int64 for share in shares)
    assert len(everything) == n
    np.testing.assert_array_equal(np.sort(everything), np.arange(n))


@settings(max_examples=50, deadline=None)
@given(labels=label_arrays, num_clients=st.integers(1, 12), seed=st.integers(0, 2**31))
def test_iid_partition_is_disjoint_balanced_and_deterministic(labels, num_clients, seed):
    shares = partition_iid(labels, num_clients, seed)
    assert len(shares) == num_clients
    _assert_disjoint_cover(shares, len(labels))
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1
    again = partition_iid(labels, num_clients, seed)
    assert all(np.array_equal(a, b) for a, b in zip(shares, again))


@settings(max_examples=50, deadline=None)
@given(
    labels=label_arrays,
    num_clients=st.integers(1, 5),
    seed=st.integers(0, 2**31),
    alpha=st.sampled_from([0.3, 0.5, 1.0, 10.0]),
)
def test_dirichlet_partition_is_disjoint_and_deterministic(labels, num_clients, seed, alpha):
    shares = partition_dirichlet(labels, num_clients, alpha, seed)
    assert len(shares) == num_clients
    _assert_disjoint_cover(shares, len(labels))
    assert min(len(share) for share in shares) >= 1
    again = partition_dirichlet(labels, num_clients, alpha, seed)
    assert all(np.array_equal(a, b) for a, b in zip(shares, again))


def test_dirichlet_respects_min_size():
    labels = np.arange(1000) % 10
    shares = partition_dirichlet(labels, 10, alpha=0.5, seed=0, min_size=20)
    assert min(len(share) for share in shares) >= 20
    _assert_disjoint_cover(shares, 1000)


def _mean_label_entropy(labels, shares, num_classes):
    entropies = []
    for share in shares:
        p = np.bincount(labels[share], minlength=num_classes) / len(share)
        p = p[p > 0]
        entropies.append(-(p * np.log(p)).sum())
    return float(np.mean(entropies))


def test_small_alpha_skews_labels_more_than_iid():
    labels = np.random.default_rng(0).integers(0, 10, size=2000)
    iid = partition_iid(labels, 10, seed=0)
    skewed = partition_dirichlet(labels, 10, alpha=0.1, seed=0)
    assert _mean_label_entropy(labels, skewed, 10) < 0.6 * _mean_label_entropy(labels, iid, 10)


def test_different_seeds_give_different_partitions():
    labels = np.arange(200) % 4
    a = partition(labels, 4, "dirichlet", seed=0)
    b = partition(labels, 4, "dirichlet", seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, b))


def test_dispatcher_matches_schemes():
    labels = np.arange(100) % 5
    for a, b in zip(partition(labels, 3, "iid", seed=4), partition_iid(labels, 3, 4)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(partition(labels, 3, "dirichlet", seed=4, alpha=0.2),
                    partition_dirichlet(labels, 3, 0.2, 4)):
        np.testing.assert_array_equal(a, b)
    assert PARTITION_SCHEMES == ("iid", "dirichlet")
    with pytest.raises(ValueError, match="unknown partition scheme 'shards'"):
        partition(labels, 3, "shards", seed=0)


def test_partition_argument_errors():
    labels = np.arange(10) % 2
    with pytest.raises(ValueError, match="num_clients"):
        partition_iid(labels, 0, seed=0)
    with pytest.raises(ValueError, match="11 clients"):
        partition_iid(labels, 11, seed=0)
    with pytest.raises(ValueError, match="one-dimensional"):
        partition_iid(labels.reshape(5, 2), 2, seed=0)
    with pytest.raises(ValueError, match="alpha"):
        partition_dirichlet(labels, 2, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="at least 6"):
        partition_dirichlet(labels, 2, alpha=1.0, seed=0, min_size=6)


def test_dirichlet_gives_up_after_bounded_attempts():
    labels = np.arange(100) % 10
    with pytest.raises(ValueError, match="attempts"):
        partition_dirichlet(labels, 10, alpha=0.01, seed=0, min_size=9)


@pytest.mark.parametrize("name", ["digits", "breast_cancer"])
def test_cached_split_equals_a_fresh_one_and_a_damaged_cache_is_computed_again(tmp_path, monkeypatch, name):
    from securecollab.data import CACHE_ENV
    monkeypatch.setenv(CACHE_ENV, "")
    fresh = load_dataset(name, seed=3, test_fraction=0.3)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    first, second = load_dataset(name, seed=3, test_fraction=0.3), load_dataset(name, seed=3, test_fraction=0.3)
    (cached,) = tmp_path.glob(f"{name}-seed3-test0.3-*.npz")
    for ds in (first, second):
        assert ds.name == name and ds.num_classes == fresh.num_classes
        for part in ("x_train", "y_train", "x_test", "y_test"):
            a, b = getattr(ds, part), getattr(fresh, part)
            assert a.dtype == b.dtype and np.array_equal(a, b), part
    cached.write_bytes(cached.read_bytes()[:100])  # truncated: read fails, the split is computed and saved again
    again = load_dataset(name, seed=3, test_fraction=0.3)
    assert np.array_equal(again.x_test, fresh.x_test) and cached.stat().st_size > 1000
    assert not np.array_equal(load_dataset(name, seed=4, test_fraction=0.3).y_train, fresh.y_train)


def test_a_process_that_finds_the_split_cached_does_not_import_scikit_learn(tmp_path):
    from securecollab.data import CACHE_ENV
    code = ("import sys; from securecollab.data import load_dataset; d = load_dataset('digits'); "
            "print(len(d.y_train), 'sklearn' in sys.modules)")
    env = {**os.environ, CACHE_ENV: str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    assert [r.stdout.split() for r in runs] == [["1347", "True"], ["1347", "False"]], [r.stderr for r in runs]


def test_medmnist_shaped_archive_is_the_digits_split_resized(tmp_path):
    import torch

    from securecollab.data import write_medmnist_shaped
    path = write_medmnist_shaped(tmp_path / "d28.npz", size=28)
    with np.load(path, allow_pickle=False) as z:
        assert z["train_images"].dtype == np.uint8 and z["train_images"].shape[1:] == (28, 28)
        assert z["train_labels"].shape[1] == 1
    ds, digits = load_npz(path), load_dataset("digits")
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert np.array_equal(ds.y_train, digits.y_train) and np.array_equal(ds.y_test, digits.y_test)
    # the same images, only larger: shrunk back, each is far closer to its own 8x8 digit than to another one
    shrunk = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(ds.x_test), 8).numpy()
    own = np.abs(shrunk - digits.x_test).mean()
    assert own < 0.1 and own < 0.4 * np.abs(shrunk - np.roll(digits.x_test, 1, axis=0)).mean()
    with pytest.raises(ValueError, match="at least 8"):
        write_medmnist_shaped(tmp_path / "tiny.npz", size=4)
    rgb = load_npz(write_medmnist_shaped(tmp_path / "rgb", channels=3))  # the name as given, no .npz added
    assert rgb.input_shape == (3, 28, 28) and all(np.array_equal(rgb.x_test[:, c], ds.x_test[:, 0]) for c in range(3))
