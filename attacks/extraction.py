"""Model extraction by a querying client of an inference service (attack ``extraction``).

The adversary is an ordinary client of the HE service (``"he-client"``) or of
a model-private MPC deployment (``"mpc-client"``). An HE client holds its own
CKKS secret key, so it decrypts whatever the server returns; an MPC client
adds up the compute parties' answer shares. It knows:

* the served architecture (the service's ``Describe`` reply names the model
  and input shape; HE-friendly means square activations, MPC serves ReLU);
* the queries it sent (its own inputs, which it records itself as
  transcript records of kind ``Kind.QUERY``) and the answers its client
  library recorded: logits (``Kind.LOGITS``), or in a label-only MPC
  deployment only the labels (``Kind.LABELS``) -- see attacks.extraction_view;
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
each answer (:func:`observe`). Against MPC it is **enforced**: a label-only
deployment computes the argmax on shares, so the client's transcript holds
labels and nothing else (asking it for logits is an error); such rows say
``"enforced": true``. Against HE it only *measures* what a label-only API
would cost the attacker; it is **not enforced** (``"enforced": false``).
With CKKS the key holder decrypts every slot the server returns, so only a
server computing the argmax homomorphically could enforce it -- a comparison
needs a high-degree polynomial approximation of sign (tens of rescales per
comparison, four rounds for 10 classes) where this code base's contexts
budget 1 to 5 rescales and have no bootstrapping; a client library that
returns labels only protects against nobody who holds the key. (MPC escapes
this because no single party, the client included, holds a key to the
shares: the comparisons are evaluated on shares with the dealer's help.)

Scoring (not the attacker's knowledge): fidelity is the argmax agreement of
the extracted model with the target on held-out data disjoint from every
query; the target's labels there come from the served weights
(``he_model.npz``, ``mpc_model.npz``), which only the evaluator reads.
Every fidelity comes with a Wilson interval and beside a baseline that uses no query at all: a
student of the same architecture trained on the attacker's own labelled
auxiliary data of the same size (``aux_labels_student``), and the agreement
of always answering the auxiliary data's majority class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from attacks.extraction_view import Output, QueryLog, observe, read_queries
from attacks.metrics import rate_ci
from attacks.registry import attack, row
from securecollab.models import build_model
from securecollab.plans import HEModelPlan, MpcInferencePlan
from securecollab.training import one_thread, predict_logits
from securecollab.transcript import load_transcript

PLAN_FILE = "extraction.json"       # written by the experiment: what the attacker declared it knows


@dataclass(frozen=True)
class Served:
    """A service the attack extracts from: its plan class, its client adversary, the served weights' file."""

    plan: type
    adversary: str
    weights: str   # in the run directory: read for scoring only


SERVED = {"he_inference": Served(HEModelPlan, "he-client", "he_model.npz"),
          "mpc_inference": Served(MpcInferencePlan, "mpc-client", "mpc_model.npz")}


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
            output: Output, method: str | None = None, config: DistillConfig = DistillConfig(),
            activation: str = "square") -> Extraction:
    """Extract from the pairs in ``log``: equation solving for a linear target's logits, else distillation
    (a student of ``architecture`` with the served ``activation``)."""
    answers = observe(log.answers, output)
    method = method or ("equation_solving" if architecture == "linear" and output == "logits" else "distillation")
    if method == "equation_solving":
        if output != "logits":
            raise ValueError("equation solving needs the logits; labels only allow distillation")
        w, b = solve_linear(log.queries, answers)
        return Extraction(lambda x: linear_predict(w, b, x), len(log.queries), method, w, b)
    if method != "distillation":
        raise ValueError(f"unknown method {method!r}")
    return Extraction(_student(architecture, activation, input_shape, num_classes, log.queries, answers, config),
                      len(log.queries), method)


def aux_labels_student(aux_x: np.ndarray, aux_y: np.ndarray, *, architecture: str, input_shape: tuple[int, ...],
                       num_classes: int, config: DistillConfig = DistillConfig(),
                       activation: str = "square") -> Extraction:
    """The no-query baseline: the same architecture and training, on the attacker's own labelled data."""
    return Extraction(_student(architecture, activation, input_shape, num_classes, aux_x, aux_y, config), 0,
                      "aux_labels_student")


def _student(architecture: str, activation: str, input_shape: tuple[int, ...], num_classes: int, x: np.ndarray,
             answers: np.ndarray, config: DistillConfig) -> Callable[[np.ndarray], np.ndarray]:
    """A student of the served architecture and activation (HE: square, MPC: ReLU) distilled on (x, answers)."""
    student = distill(build_model(architecture, input_shape, num_classes, activation=activation,
                                  seed=config.seed + 1), x, answers, config)
    return lambda q: predict_logits(student, np.asarray(q, dtype=np.float32))


# --- the registered attack on a saved run --------------------------------------------------------

def _target_labels(run_dir: Path, plan, ds, served: Served) -> np.ndarray:
    """Scoring only: the served model's labels on the held-out data (the attacker never reads this)."""
    model, _ = plan.load(run_dir / served.weights, ds)
    return predict_logits(model, ds.x_test).argmax(axis=1)


def load_declared(run_dir: Path) -> tuple[str, object, str]:
    """(protocol, the served plan, the client) from the attacker's declared knowledge (``extraction.json``;
    without a "protocol", as recorded before MPC: HE)."""
    declared = json.loads((Path(run_dir) / PLAN_FILE).read_text())
    protocol = declared.get("protocol", "he_inference")
    if protocol not in SERVED:
        raise ValueError(f"extraction.json names protocol {protocol!r}; the attack knows {', '.join(SERVED)}")
    return protocol, SERVED[protocol].plan.from_json(declared["plan"]), declared["client"]


@attack("extraction", adversary="he-client | mpc-client", protocols=tuple(SERVED),
        summary="a querying HE or MPC client extracts the served model: equation solving (linear), distillation "
                "on logits or on labels only (convnet; enforced by MPC label deployments); fidelity on held-out data")
def run(run_dir: Path, *, budgets=None, output: Output = "logits", source: str = "aux", method: str | None = None,
        config: DistillConfig | None = None, with_baseline: bool = True, shuffle_answers: bool = False,
        baseline_cache: dict | None = None, progress=None) -> list[dict]:
    """Rows of fidelity vs queries for one (source, output) on a run the extraction experiment recorded.

    ``run_dir`` holds ``extraction.json`` (the attacker's declared knowledge:
    the protocol, the served plan -- architecture, data set -- and which
    client it was), ``transcripts/<client>.jsonl`` (its queries and the
    answers) and, for scoring, the served weights (``he_model.npz`` or
    ``mpc_model.npz``). ``budgets`` are prefixes of the recorded queries
    (default: all of them). ``output="logits"`` on a label-only deployment's
    transcript is a ValueError: those logits were never received.
    ``shuffle_answers`` is the control: answers permuted across queries, so
    no pair carries information. ``baseline_cache`` (a dict shared across
    calls on the same run) trains each budget's no-query baseline once.
    """
    run_dir = Path(run_dir)
    protocol, plan, client = load_declared(run_dir)
    served, ds = SERVED[protocol], plan.load_data()
    config = config or DistillConfig(seed=plan.seed)
    transcript = load_transcript(run_dir / "transcripts" / f"{client}.jsonl")
    log = read_queries(transcript, source)
    observe(log.answers[:1], output)  # logits of a label-only deployment: refused before any training
    if shuffle_answers:
        perm = np.random.default_rng(config.seed).permutation(len(log.answers))
        log = replace(log, answers=log.answers[perm])
    try:
        aux = read_queries(transcript, "aux")
    except ValueError:
        aux = None
    target = _target_labels(run_dir, plan, ds, served)
    shape, k = ds.input_shape, ds.num_classes
    w_true = None
    if plan.model == "linear":
        model, _ = plan.load(run_dir / served.weights, ds)   # scoring only: max |W - W_true|
        w_true = model[1].weight.detach().double().numpy()
    rows = []
    for n in sorted(int(b) for b in (budgets or [len(log.queries)])):
        if n > len(log.queries):
            raise ValueError(f"budget {n} exceeds the {len(log.queries)} recorded queries")
        got = extract(log.first(n), architecture=plan.model, input_shape=shape, num_classes=k, output=output,
                      method=method, config=config, activation=plan.activation)
        metrics = {**fidelity(got.predict(ds.x_test).argmax(axis=1), target), "queries": n, "output": output,
                   "model": plan.model, "source": source, "method": got.method, "activation": plan.activation}
        if output == "label":  # enforced only where the service itself answered labels only
            metrics["enforced"] = log.label_only
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
                                              input_shape=shape, num_classes=k, config=config,
                                              activation=plan.activation)
                    cache[n] = fidelity(base.predict(ds.x_test).argmax(axis=1), target)
                b = cache[n]
                baseline.update(fidelity=b["fidelity"], fidelity_ci=b["fidelity_ci"], labelled_examples=n)
        if progress:
            progress(f"extraction {protocol} {plan.model} {output}/{source} n={n}: "
                     f"fidelity {metrics['fidelity']:.3f} "
                     f"(baseline {baseline.get('fidelity', float('nan')):.3f})")
        rows.append(row("extraction", protocol, served.adversary, metrics, baseline))
    return rows
