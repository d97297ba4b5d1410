"""Datasets and client partitions for the collaborative-training experiments.

A :class:`Dataset` holds float32 features (channels-first images or flat
tabular rows) and int64 labels, already split into train and test parts.
The partition functions hand each simulated client a disjoint set of
training indices, either uniformly (IID) or label-skewed (Dirichlet).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# scikit-learn is imported where a data set is loaded: it costs ~1.5 s of CPU at start-up, and most
# processes (compute parties, the dealer, servers that never load data) import this module only for its names.

DATASETS = ("digits", "breast_cancer", "npz")
PARTITION_SCHEMES = ("iid", "dirichlet")

NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels")

# Enough resampling to succeed for any reasonable alpha, yet a hard stop
# so an impossible request fails fast instead of looping forever.
MAX_DIRICHLET_ATTEMPTS = 100


@dataclass(frozen=True, eq=False)  # eq on arrays is ambiguous, so use identity
class Dataset:
    """A train/test split ready for training: float32 inputs, int64 labels."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of a single example, e.g. (1, 8, 8) or (30,)."""
        return tuple(self.x_train.shape[1:])

    @property
    def is_image(self) -> bool:
        """True for channels-first image data (C, H, W)."""
        return self.x_train.ndim == 4


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.25,
    path: str | os.PathLike | None = None,
) -> Dataset:
    """Load a dataset by name.

    ``seed`` and ``test_fraction`` control the stratified split of the
    scikit-learn sets; an ``npz`` file brings its own split, so they are
    ignored there.
    """
    if name in EMBEDDED:
        return _cached(name, seed, test_fraction)
    if name == "npz":
        if path is None:
            raise ValueError("dataset 'npz' needs a path to a .npz file")
        return load_npz(path)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def cache_dir() -> Path | None:
    """Where the embedded data sets' splits are kept: $SECURECOLLAB_CACHE, or ~/.cache/securecollab; None
    (no cache) when $SECURECOLLAB_CACHE is set but empty."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return Path(chosen) if chosen else None
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "securecollab"


def _cached(name: str, seed: int, test_fraction: float) -> Dataset:
    """An embedded data set's split, computed once per (name, seed, fraction, scikit-learn version) and kept
    as an .npz (no pickle): importing scikit-learn costs each process ~1.5 s of CPU, and every client of a
    federation is a process of its own. A missing, damaged or unwritable cache only means computing it."""
    _check_test_fraction(test_fraction)
    directory = cache_dir()
    if directory is None:
        return EMBEDDED[name](seed, test_fraction)
    from importlib.metadata import version
    path = directory / f"{name}-seed{seed}-test{test_fraction!r}-sklearn{version('scikit-learn')}.npz"
    try:
        with np.load(path, allow_pickle=False) as z:
            return Dataset(name, z["x_train"], z["y_train"], z["x_test"], z["y_test"], int(z["num_classes"]))
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass
    data = EMBEDDED[name](seed, test_fraction)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # then renamed: readers never see half
        with open(partial, "wb") as f:
            np.savez(f, x_train=data.x_train, y_train=data.y_train, x_test=data.x_test, y_test=data.y_test,
                     num_classes=data.num_classes)
        os.replace(partial, path)
    except OSError:
        pass
    return data


def _check_test_fraction(test_fraction: float) -> None:
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _stratified_split(x, y, seed: int, test_fraction: float):
    _check_test_fraction(test_fraction)
    from sklearn.model_selection import train_test_split
    return train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )


def _load_digits(seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    # Pixel intensities in load_digits run from 0 to 16.
    images = (bunch.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = _stratified_split(
        images, labels, seed, test_fraction
    )
    return Dataset("digits", x_train, y_train, x_test, y_test, num_classes=10)


def _load_breast_cancer(seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_breast_cancer
    bunch = load_breast_cancer()
    features = bunch.data.astype(np.float64)
    labels = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = _stratified_split(
        features, labels, seed, test_fraction
    )
    # Statistics from the train split only, so nothing leaks from the test set.
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0
    x_train = ((x_train - mean) / std).astype(np.float32)
    x_test = ((x_test - mean) / std).astype(np.float32)
    return Dataset("breast_cancer", x_train, y_train, x_test, y_test, num_classes=2)


EMBEDDED = {"digits": _load_digits, "breast_cancer": _load_breast_cancer}
CACHE_ENV = "SECURECOLLAB_CACHE"


def load_npz(path: str | os.PathLike) -> Dataset:
    """Load a MedMNIST-style archive with its own train/test split."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"npz dataset file not found: {path}")
    arrays = {}
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise ValueError(
                f"npz file {path} is missing key(s) {', '.join(missing)}; "
                f"expected {', '.join(NPZ_KEYS)}"
            )
        for key in NPZ_KEYS:
            try:
                arrays[key] = archive[key]
            except ValueError as err:  # object arrays need pickle, which we refuse
                raise ValueError(
                    f"npz key {key!r} in {path} holds an object array; "
                    "only plain numeric arrays are accepted"
                ) from err

    x_train = _npz_images(arrays["train_images"], "train_images")
    x_test = _npz_images(arrays["test_images"], "test_images")
    y_train = _npz_labels(arrays["train_labels"], "train_labels")
    y_test = _npz_labels(arrays["test_labels"], "test_labels")
    if len(x_train) != len(y_train):
        raise ValueError(
            f"train_images has {len(x_train)} examples but train_labels has {len(y_train)}"
        )
    if len(x_test) != len(y_test):
        raise ValueError(
            f"test_images has {len(x_test)} examples but test_labels has {len(y_test)}"
        )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"train images have shape {x_train.shape[1:]} but test images "
            f"have shape {x_test.shape[1:]}"
        )
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return Dataset("npz", x_train, y_train, x_test, y_test, num_classes)


def write_medmnist_shaped(path: str | os.PathLike, *, size: int = 28, channels: int = 1, seed: int = 0) -> Path:
    """The digits, resized (bilinear) to ``size`` x ``size`` and written as a MedMNIST archive: uint8 images
    (n, size, size), or (n, size, size, 3) for ``channels=3`` (the gray digit in each, as in MedMNIST's colour
    sets' layout), labels (n, 1), the split of ``load_dataset("digits", seed=seed)``. A stand-in with
    MedMNIST's shape and format where the real archives cannot be downloaded."""
    import torch
    from torch.nn import functional as F
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    ds = load_dataset("digits", seed=seed)

    def resized(x: np.ndarray) -> np.ndarray:
        big = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False)
        gray = np.rint(big[:, 0].clamp(0, 1).numpy() * 255).astype(np.uint8)
        return gray if channels == 1 else np.repeat(gray[..., None], 3, axis=-1)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:  # a file, so numpy writes this very name (it adds .npz to a bare path)
        np.savez_compressed(f, train_images=resized(ds.x_train), train_labels=ds.y_train[:, None].astype(np.uint8),
                            test_images=resized(ds.x_test), test_labels=ds.y_test[:, None].astype(np.uint8))
    return path


def _npz_images(images: np.ndarray, key: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise ValueError(f"{key} must be uint8 pixels, got dtype {images.dtype}")
    if images.ndim == 3:
        images = images[:, None, :, :]  # grayscale: add the channel axis
    elif images.ndim == 4:
        images = images.transpose(0, 3, 1, 2)  # (n, H, W, C) -> (n, C, H, W)
    else:
        raise ValueError(
            f"{key} must have rank 3 (n, H, W) or 4 (n, H, W, C), got shape {images.shape}"
        )
    if len(images) == 0:
        raise ValueError(f"{key} is empty")
    return np.ascontiguousarray(images, dtype=np.float32) / np.float32(255.0)


def _npz_labels(labels: np.ndarray, key: str) -> np.ndarray:
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]  # MedMNIST stores labels as (n, 1)
    if labels.ndim != 1:
        raise ValueError(f"{key} must have shape (n,) or (n, 1), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{key} must hold integer class ids, got dtype {labels.dtype}")
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{key} holds negative class ids")
    return labels.astype(np.int64)


def _check_partition_args(labels: np.ndarray, num_clients: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be at least 1, got {num_clients}")
    if num_clients > len(labels):
        raise ValueError(
            f"cannot give {num_clients} clients at least one of {len(labels)} examples"
        )
    return labels


def partition_iid(labels: np.ndarray, num_clients: int, seed: int) -> list[np.ndarray]:
    """Shuffle the examples and deal them out in near-equal shares."""
    labels = _check_partition_args(labels, num_clients)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(share).astype(np.int64) for share in np.array_split(order, num_clients)]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label-skewed shares: each class is spread over clients by Dirichlet(alpha).

    Small ``alpha`` concentrates each class on few clients. Draws are
    repeated until every client holds at least ``min_size`` examples.
    """
    labels = _check_partition_args(labels, num_clients)
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if min_size < 0 or min_size * num_clients > len(labels):
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_size} of "
            f"{len(labels)} examples each"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        shares = [[] for _ in range(num_clients)]
        for members in by_class:
            members = rng.permutation(members)
            proportions = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                shares[client].append(chunk)
        result = [np.sort(np.concatenate(parts)).astype(np.int64) for parts in shares]
        if min(len(share) for share in result) >= min_size:
            return result
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw in {MAX_DIRICHLET_ATTEMPTS} attempts gave "
        f"all {num_clients} clients at least {min_size} examples; "
        "raise alpha, lower min_size or use fewer clients"
    )


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """Split training indices among clients with the named scheme."""
    if scheme == "iid":
        return partition_iid(labels, num_clients, seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha, seed)
    raise ValueError(
        f"unknown partition scheme {scheme!r}; choose one of {', '.join(PARTITION_SCHEMES)}"
    )
