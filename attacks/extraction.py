"""Model extraction by a querying client of the HE inference service (attack ``extraction``).

The adversary is an ordinary client (adversary ``"he-client"``). It holds its
own CKKS secret key, so it decrypts whatever the server returns. It knows:

* the served architecture (the server's ``Describe`` reply names the model
  and input shape; HE-friendly means square activations);
* the queries it sent (its own inputs, which it records itself as
  transcript records of kind ``Kind.QUERY``) and the decrypted answers (kind
  ``Kind.LOGITS``, recorded by the HE client library);
* auxiliary data of its own: unlabelled inputs from the task's distribution
  to use as queries, and, for the no-query baseline, their true labels.

It never sees the weights. Two attacks:

* **equation solving** (linear model): logits are ``W x + b``, so ``d + 1``
  linearly independent queries determine ``W`` and ``b``; least squares over
  the answers absorbs the CKKS noise (a few 1e-4 per logit here);
* **distillation** (any model, here the convnet): train a student of the
  known architecture on the (query, answer) pairs -- logit matching (MSE) on
  decrypted logits, cross-entropy on labels.

Defence, label-only output: the attacker's view is reduced to the argmax of
each answer (:func:`observe`). This *measures* what a label-only API would
cost the attacker; it is **not enforced** here. With CKKS the key holder
decrypts every slot the server returns, so only a server computing the
argmax homomorphically could enforce it -- a comparison needs a high-degree
polynomial approximation of sign (tens of rescales per comparison, four
rounds for 10 classes) where this code base's contexts budget 1 to 5
rescales and have no bootstrapping; a client library that returns labels
only protects against nobody who holds the key.

Scoring (not the attacker's knowledge): fidelity is the argmax agreement of
the extracted model with the target on held-out data disjoint from every
query; the target's labels there come from the served weights
(``he_model.npz``), which only the evaluator reads. Every fidelity comes
with a Wilson interval and beside a baseline that uses no query at all: a
student of the same architecture trained on the attacker's own labelled
auxiliary data of the same size (``aux_labels_student``), and the agreement
of always answering the auxiliary data's majority class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.metrics import rate_ci
from attacks.registry import attack, row
from securecollab.models import build_model
from securecollab.plans import HEModelPlan
from securecollab.training import one_thread, predict_logits
from securecollab.transcript import Kind, Transcript, load_transcript

OUTPUTS = ("logits", "label")
PLAN_FILE = "extraction.json"       # written by the experiment: what the attacker declared it knows
TARGET_WEIGHTS = "he_model.npz"     # the served weights: read for scoring only

Output = Literal["logits", "label"]


# --- what the attacker observed ------------------------------------------------------------------

@dataclass(frozen=True)
class QueryLog:
    """The client's queries and the decrypted answers, in the order sent.

    ``labels`` are the attacker's own labels of its queries (auxiliary data
    only; -1 where it has none, e.g. random inputs): never sent, used only by
    the no-query baseline.
    """

    queries: np.ndarray   # (n, *input_shape) float32
    logits: np.ndarray    # (n, num_classes) float64
    labels: np.ndarray    # (n,) int64

    def first(self, n: int) -> "QueryLog":
        return QueryLog(self.queries[:n], self.logits[:n], self.labels[:n])


def record_query(recorder, x: np.ndarray, *, source: str, labels: np.ndarray | None = None) -> None:
    """The client's own note of what it is about to encrypt and send (call right before ``infer_batch``)."""
    tensors = {"inputs": np.asarray(x, dtype=np.float32)}
    if labels is not None:
        tensors["labels"] = np.asarray(labels, dtype=np.int64)
    recorder.record(Kind.QUERY, round=0, sender="self", meta={"source": source, "num_inputs": len(x)},
                    tensors=tensors)


def read_queries(transcript: Transcript, source: str | None = None) -> QueryLog:
    """Pair each ``Kind.QUERY`` record with the batch answer that followed it, in order.

    ``infer_batch`` splits a query record into requests of the session's
    batch size, so one query record may be answered by several ``Kind.LOGITS``
    records; their row counts must add up.
    """
    answers = [r for r in transcript.records if r.kind == Kind.LOGITS and r.meta.get("mode") == "batch"]
    queries = transcript.of_kind(Kind.QUERY)
    xs, ls, ys, k = [], [], [], 0
    for q in queries:
        x = q.tensors["inputs"]
        got, rows = [], 0
        while rows < len(x):
            if k >= len(answers):
                raise ValueError("the transcript has fewer answers than queries")
            got.append(answers[k].tensors["logits"])
            rows += len(got[-1])
            k += 1
        if rows != len(x):
            raise ValueError(f"a query of {len(x)} inputs was answered with {rows} rows")
        if source is None or q.meta.get("source") == source:
            xs.append(x)
            ls.append(np.concatenate(got).astype(np.float64))
            ys.append(q.tensors.get("labels", np.full(len(x), -1, dtype=np.int64)))
    if not xs:
        raise ValueError(f"no recorded queries{'' if source is None else f' from source {source!r}'}: "
                         "the client must record what it sent (record_query)")
    return QueryLog(np.concatenate(xs).astype(np.float32), np.concatenate(ls), np.concatenate(ys).astype(np.int64))


def observe(logits: np.ndarray, output: Output) -> np.ndarray:
    """The attacker's view of the answers: decrypted logits, or only their argmax (label-only defence)."""
    if output == "logits":
        return np.asarray(logits, dtype=np.float64)
    if output == "label":
        return np.asarray(logits).argmax(axis=1).astype(np.int64)
    raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")


# --- equation solving (linear target) -----------------------------------------------------------

def solve_linear(queries: np.ndarray, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) with ``logits ~= queries @ W.T + b``, least squares (minimum norm when under-determined)."""
    x = np.asarray(queries, dtype=np.float64).reshape(len(queries), -1)
    design = np.hstack([x, np.ones((len(x), 1))])
    coef, *_ = np.linalg.lstsq(design, np.asarray(logits, dtype=np.float64), rcond=None)
    return coef[:-1].T, coef[-1]


def random_queries(n: int, input_shape: tuple[int, ...], *, low: float = 0.0, high: float = 1.0,
                   seed: int = 0) -> np.ndarray:
    """Uniform random inputs over the valid range: linearly independent with probability one."""
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, size=(n, *input_shape)).astype(np.float32)


def linear_predict(weight: np.ndarray, bias: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1) @ weight.T + bias


# --- distillation --------------------------------------------------------------------------------

@dataclass(frozen=True)
class DistillConfig:
    """How the attacker trains its student (Adam on minibatches; steps, not epochs, so small budgets
    still converge). Measured on the digits convnet: 600 steps ~2 s on one core; random-input
    queries gain from 1500."""

    steps: int = 600
    batch_size: int = 64
    lr: float = 3e-3
    clip: float = 5.0   # square activations blow up without it
    seed: int = 0


def distill(student: nn.Module, queries: np.ndarray, answers: np.ndarray,
            config: DistillConfig = DistillConfig()) -> nn.Module:
    """Train ``student`` (in place) to reproduce the answers: MSE to float logits, cross-entropy to labels."""
    x = torch.as_tensor(np.asarray(queries, dtype=np.float32))
    answers = np.asarray(answers)
    as_labels = answers.ndim == 1
    y = torch.as_tensor(answers.astype(np.int64) if as_labels else answers.astype(np.float32))
    opt = torch.optim.Adam(student.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    student.train()
    with one_thread():
        for _ in range(config.steps):
            idx = torch.randint(0, len(x), (min(config.batch_size, len(x)),), generator=gen)
            out = student(x[idx])
            loss = F.cross_entropy(out, y[idx]) if as_labels else F.mse_loss(out, y[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), config.clip)
            opt.step()
    return student.eval()


# --- scoring -------------------------------------------------------------------------------------

def fidelity(predicted_labels: np.ndarray, target_labels: np.ndarray) -> dict:
    """Argmax agreement with the target on held-out data, with its Wilson 95% interval."""
    hits = np.asarray(predicted_labels) == np.asarray(target_labels)
    return {"fidelity": float(hits.mean()), "fidelity_ci": list(rate_ci(int(hits.sum()), len(hits))),
            "n_eval": int(len(hits))}


def majority_fidelity(aux_labels: np.ndarray, target_labels: np.ndarray, num_classes: int) -> float:
    """Agreement of always answering the most common class of the attacker's own labels."""
    majority = int(np.bincount(aux_labels, minlength=num_classes).argmax())
    return float(np.mean(np.asarray(target_labels) == majority))


@dataclass(frozen=True)
class Extraction:
    """One extracted model as a labelling function on inputs, and what it took."""

    predict: Callable[[np.ndarray], np.ndarray]   # inputs -> logits (or scores)
    queries: int
    method: str
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None


def extract(log: QueryLog, *, architecture: str, input_shape: tuple[int, ...], num_classes: int,
            output: Output, method: str | None = None, config: DistillConfig = DistillConfig()) -> Extraction:
    """Extract from the pairs in ``log``: equation solving for a linear target's logits, else distillation."""
    answers = observe(log.logits, output)
    method = method or ("equation_solving" if architecture == "linear" and output == "logits" else "distillation")
    if method == "equation_solving":
        if output != "logits":
            raise ValueError("equation solving needs the logits; labels only allow distillation")
        w, b = solve_linear(log.queries, answers)
        return Extraction(lambda x: linear_predict(w, b, x), len(log.queries), method, w, b)
    if method != "distillation":
        raise ValueError(f"unknown method {method!r}")
    return Extraction(_student(architecture, input_shape, num_classes, log.queries, answers, config),
                      len(log.queries), method)


def aux_labels_student(aux_x: np.ndarray, aux_y: np.ndarray, *, architecture: str, input_shape: tuple[int, ...],
                       num_classes: int, config: DistillConfig = DistillConfig()) -> Extraction:
    """The no-query baseline: the same architecture and training, on the attacker's own labelled data."""
    return Extraction(_student(architecture, input_shape, num_classes, aux_x, aux_y, config), 0,
                      "aux_labels_student")


def _student(architecture: str, input_shape: tuple[int, ...], num_classes: int, x: np.ndarray, answers: np.ndarray,
             config: DistillConfig) -> Callable[[np.ndarray], np.ndarray]:
    """A student of the served architecture (HE-friendly: square activations) distilled on (x, answers)."""
    student = distill(build_model(architecture, input_shape, num_classes, activation="square",
                                  seed=config.seed + 1), x, answers, config)
    return lambda q: predict_logits(student, np.asarray(q, dtype=np.float32))


# --- the registered attack on a saved run --------------------------------------------------------

def _target_labels(run_dir: Path, plan, ds) -> np.ndarray:
    """Scoring only: the served model's labels on the held-out data (the attacker never reads this)."""
    model, _ = plan.load(run_dir / TARGET_WEIGHTS, ds)
    return predict_logits(model, ds.x_test).argmax(axis=1)


@attack("extraction", adversary="he-client", protocols=("he_inference",),
        summary="a querying HE client extracts the served model: equation solving (linear), distillation "
                "on decrypted logits or on labels only (convnet); fidelity on held-out data")
def run(run_dir: Path, *, budgets=None, output: Output = "logits", source: str = "aux", method: str | None = None,
        config: DistillConfig | None = None, with_baseline: bool = True, shuffle_answers: bool = False,
        baseline_cache: dict | None = None, progress=None) -> list[dict]:
    """Rows of fidelity vs queries for one (source, output) on a run the extraction experiment recorded.

    ``run_dir`` holds ``extraction.json`` (the attacker's declared knowledge:
    the served plan -- architecture, data set -- and which client it was),
    ``transcripts/<client>.jsonl`` (its queries and decrypted answers) and,
    for scoring, ``he_model.npz``. ``budgets`` are prefixes of the recorded
    queries (default: all of them). ``shuffle_answers`` is the control:
    answers permuted across queries, so no pair carries information.
    ``baseline_cache`` (a dict shared across calls on the same run) trains
    each budget's no-query baseline once.
    """
    run_dir = Path(run_dir)
    declared = json.loads((run_dir / PLAN_FILE).read_text())
    plan = HEModelPlan.from_json(declared["plan"])
    ds = plan.load_data()
    config = config or DistillConfig(seed=plan.seed)
    log = read_queries(load_transcript(run_dir / "transcripts" / f"{declared['client']}.jsonl"), source)
    if shuffle_answers:
        perm = np.random.default_rng(config.seed).permutation(len(log.logits))
        log = replace(log, logits=log.logits[perm])
    try:
        aux = read_queries(load_transcript(run_dir / "transcripts" / f"{declared['client']}.jsonl"), "aux")
    except ValueError:
        aux = None
    target = _target_labels(run_dir, plan, ds)
    shape, k = ds.input_shape, ds.num_classes
    w_true = None
    if plan.model == "linear":
        model, _ = plan.load(run_dir / TARGET_WEIGHTS, ds)   # scoring only: max |W - W_true|
        w_true = model[1].weight.detach().double().numpy()
    rows = []
    for n in sorted(int(b) for b in (budgets or [len(log.queries)])):
        if n > len(log.queries):
            raise ValueError(f"budget {n} exceeds the {len(log.queries)} recorded queries")
        got = extract(log.first(n), architecture=plan.model, input_shape=shape, num_classes=k, output=output,
                      method=method, config=config)
        metrics = {**fidelity(got.predict(ds.x_test).argmax(axis=1), target), "queries": n, "output": output,
                   "model": plan.model, "source": source, "method": got.method}
        if shuffle_answers:
            metrics["control"] = "answers_shuffled"
        if got.weight is not None and w_true is not None:
            metrics["max_abs_weight_error"] = float(np.abs(got.weight - w_true).max())
        baseline: dict = {"name": "aux_labels_student", "queries": 0}
        if aux is not None:
            labelled = aux.first(n)
            baseline["majority_fidelity"] = majority_fidelity(labelled.labels, target, k)
            if with_baseline and len(labelled.labels) == n:
                cache = {} if baseline_cache is None else baseline_cache
                if n not in cache:
                    base = aux_labels_student(labelled.queries, labelled.labels, architecture=plan.model,
                                              input_shape=shape, num_classes=k, config=config)
                    cache[n] = fidelity(base.predict(ds.x_test).argmax(axis=1), target)
                b = cache[n]
                baseline.update(fidelity=b["fidelity"], fidelity_ci=b["fidelity_ci"], labelled_examples=n)
        if progress:
            progress(f"extraction {plan.model} {output}/{source} n={n}: fidelity {metrics['fidelity']:.3f} "
                     f"(baseline {baseline.get('fidelity', float('nan')):.3f})")
        rows.append(row("extraction", "he_inference", "he-client", metrics, baseline))
    return rows
