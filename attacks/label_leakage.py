"""Label leakage to the split-learning server (attack ``label_leakage``), after Li et al. 2022 (norm and cosine).

In U-shaped mode the labels and the head stay on the client; the server
receives, for every training step, the gradient of the loss with respect to
its own outputs (transcript kind ``Kind.OUTPUT_GRADIENT``). Under cross-entropy that
row is ``W_head^T (softmax - onehot(y))`` (through the head): it points one way
per class, so the server can read labels off its direction. What it holds:

* its transcript: the output gradients of the last epoch, one row per example
  (scaled back from the batch mean by the batch size, which it also sees);
* for the ``cosine`` score, the label of one example per class (declared
  knowledge: e.g. examples the server itself planted or knows); those
  reference examples are left out of the score;
* for ``cluster`` (k-means on the gradient directions, which finds the classes
  up to a renaming), the same one known example per class names the clusters
  (Hungarian on the cosine between those examples and the centroids); those
  examples are left out of the score too;
* ``norm``: the gradient's length alone, the binary-case attack.

Vanilla mode sends the labels in the clear (``plaintext``): reported for contrast.
Scores: per-class one-vs-rest AUC (macro mean, bootstrap interval) beside 0.5,
and label accuracy beside the prior (always guessing the commonest class of the
adversary's own labelled data, the test split), both with 95% intervals.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

from attacks.metrics import mann_whitney_auc, rate_ci
from attacks.registry import attack, row
from attacks.split_view import SERVER, GroundTruth, ServerView, load_server_view, sweep_metrics

METHODS = ("norm", "cosine", "cluster")


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); 0.5 when one side is empty."""
    pos = np.asarray(positive, bool)
    if pos.all() or not pos.any():
        return 0.5
    scores = np.asarray(scores)
    return mann_whitney_auc(scores[pos], scores[~pos])


def macro_auc(class_scores: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean over the classes present of the one-vs-rest AUC of ``class_scores[:, c]``."""
    present = [c for c in range(num_classes) if 0 < (labels == c).sum() < len(labels)]
    return float(np.mean([auc(class_scores[:, c], labels == c) for c in present])) if present else 0.5


def macro_auc_ci(class_scores, labels, num_classes: int, *, resamples: int = 200, seed: int = 0):
    """95% percentile-bootstrap interval of :func:`macro_auc` over examples."""
    rng = np.random.default_rng(seed)
    stats = [macro_auc(class_scores[i], labels[i], num_classes)
             for i in (rng.integers(0, len(labels), len(labels)) for _ in range(resamples))]
    return [float(np.quantile(stats, 0.025)), float(np.quantile(stats, 0.975))]


def _unit(g: np.ndarray) -> np.ndarray:
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)


def last_epoch_gradients(view: ServerView, truth: GroundTruth) -> tuple[np.ndarray, np.ndarray]:
    """(per-example output gradients of the last epoch, their true labels -- for scoring only)."""
    records = [r for r in view.output_gradients if r.round == view.last_epoch]
    if not records:
        raise ValueError("the server's transcript holds no output gradients (vanilla mode sends labels instead)")
    # The client's loss is a batch mean: each row is 1/B of the example's own gradient.
    grads = np.concatenate([len(r.tensors["gradient"]) * r.tensors["gradient"].reshape(len(r.tensors["gradient"]), -1)
                            for r in records]).astype(np.float64)
    labels = np.concatenate([truth.ds.y_train[truth.sources(r)] for r in records])
    return grads, labels


def norm_scores(grads: np.ndarray, num_classes: int) -> np.ndarray:
    """The same score for every class: the gradient's length (misfit examples have long gradients)."""
    return np.repeat(np.linalg.norm(grads, axis=1)[:, None], num_classes, axis=1)


def reference_examples(labels: np.ndarray, num_classes: int) -> dict[int, int]:
    """The first example of each class: the one label per class the server is assumed to know."""
    return {c: int(np.flatnonzero(labels == c)[0]) for c in range(num_classes) if (labels == c).any()}


def cosine_scores(grads: np.ndarray, references: dict[int, int], num_classes: int) -> np.ndarray:
    """Cosine similarity of each gradient to each class's known reference gradient (-1 for an unknown class)."""
    unit = _unit(grads)
    out = np.full((len(grads), num_classes), -1.0)
    for c, i in references.items():
        out[:, c] = unit @ unit[i]
    return out


def cluster_scores(grads: np.ndarray, references: dict[int, int], num_classes: int, seed: int = 0) -> np.ndarray:
    """k-means on the gradient directions; cosine to each centroid, the centroids named by the known examples
    (Hungarian on the cosine between each class's reference gradient and the centroids; -1 for a class not
    named). Clustering alone finds the classes up to a renaming; the one known label per class names them."""
    unit = _unit(grads)
    km = KMeans(n_clusters=num_classes, n_init=4, random_state=seed).fit(unit)
    centroids = _unit(km.cluster_centers_)
    classes = np.array(sorted(references))
    named, clusters = linear_sum_assignment(-(unit[[references[c] for c in classes]] @ centroids.T))
    out = np.full((len(grads), num_classes), -1.0)
    out[:, classes[named]] = unit @ centroids[clusters].T
    return out


def _accuracy(predicted: np.ndarray, labels: np.ndarray) -> tuple[float, list]:
    hits = int((predicted == labels).sum())
    return hits / len(labels), list(rate_ci(hits, len(labels)))


def baseline(labels: np.ndarray, prior_labels: np.ndarray) -> dict:
    """What the server gets without looking: AUC 0.5, and always guessing the commonest class of its own
    labelled data ``prior_labels`` (scored on ``labels``)."""
    prior, ci = _accuracy(np.full(len(labels), np.bincount(prior_labels).argmax()), labels)
    return {"auc": 0.5, "label_accuracy": prior, "label_accuracy_ci": ci}


def leak_labels(grads: np.ndarray, labels: np.ndarray, num_classes: int, *, prior_labels: np.ndarray,
                methods=METHODS, seed: int = 0) -> dict[str, dict]:
    """Per method: ``{"metrics", "baseline"}`` for these gradients and (scoring-only) labels; ``prior_labels``:
    the adversary's own labelled data, for the baseline."""
    out = {}
    for method in methods:
        keep = np.ones(len(labels), bool)
        if method == "norm":
            scores = norm_scores(grads, num_classes)
        elif method in ("cosine", "cluster"):
            refs = reference_examples(labels, num_classes)
            scores = cosine_scores(grads, refs, num_classes) if method == "cosine" else \
                cluster_scores(grads, refs, num_classes, seed=seed)
            keep[list(refs.values())] = False  # the known examples are not a finding
        else:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        s, y = scores[keep], labels[keep]
        metrics = {"auc": macro_auc(s, y, num_classes), "auc_ci": macro_auc_ci(s, y, num_classes, seed=seed),
                   "n_examples": int(len(y))}
        if method != "norm":  # one scalar orders examples, it cannot name a class among ten
            metrics["label_accuracy"], metrics["label_accuracy_ci"] = _accuracy(s.argmax(1), y)
        out[method] = {"metrics": metrics, "baseline": baseline(y, prior_labels)}
    return out


def plaintext_labels(view: ServerView, truth: GroundTruth, prior_labels: np.ndarray) -> dict[str, dict]:
    """Vanilla mode: the labels the server received, checked against the truth."""
    records = [r for r in view.batches if r.round == view.last_epoch]
    got = np.concatenate([r.tensors["labels"] for r in records])
    true = np.concatenate([truth.ds.y_train[truth.sources(r)] for r in records])
    acc, ci = _accuracy(got, true)
    return {"plaintext": {"metrics": {"label_accuracy": acc, "label_accuracy_ci": ci, "n_examples": int(len(true))},
                          "baseline": baseline(true, prior_labels)}}


@attack("label_leakage", adversary=SERVER, protocols=("split",),
        summary="the split server reads the client's labels off the gradients it returns in U-shaped mode "
                "(norm, cosine to one known example per class, clustering); vanilla sends them in the clear")
def label_leakage(run_dir: Path, *, plan=None, methods=METHODS, seed: int = 0, quick: bool = False,
                  **extra_metrics) -> list[dict]:
    """Rows per method; ``quick`` changes nothing (this attack takes about a second)."""
    view = load_server_view(run_dir, plan)
    ds = view.plan.load_data()
    truth = GroundTruth(view.plan, ds)
    if view.plan.mode == "vanilla":
        results = plaintext_labels(view, truth, ds.y_test)
    else:
        grads, labels = last_epoch_gradients(view, truth)
        results = leak_labels(grads, labels, ds.num_classes, prior_labels=ds.y_test, methods=tuple(methods),
                              seed=seed)
    sweep = {**sweep_metrics(view.plan), "epoch": view.last_epoch, **extra_metrics}
    return [row("label_leakage", "split", SERVER, {**r["metrics"], "method": m, **sweep}, r["baseline"])
            for m, r in results.items()]
