"""What a querying client of an inference service observed, read from its own transcript (attack ``extraction``).

The client records each query itself (``Kind.QUERY``, :func:`record_query`) right before sending it; its
client library records the answers: logits decrypted from the HE service or reconstructed from the MPC
parties' shares (``Kind.LOGITS``), or, in a label-only MPC deployment, only the labels (``Kind.LABELS``).
:func:`read_queries` pairs them; :func:`observe` is the attacker's view of the answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from securecollab.transcript import Kind, Transcript

OUTPUTS = ("logits", "label")
ANSWERS = {Kind.LOGITS: "logits", Kind.LABELS: "labels"}   # an answer record's kind -> its tensor

Output = Literal["logits", "label"]


def observe(answers: np.ndarray, output: Output) -> np.ndarray:
    """The attacker's view of the answers: the logits, or only their argmax (the label-only defence).

    Labels (1-D answers of a label-only deployment) stay labels: their logits were never received."""
    answers = np.asarray(answers)
    if output not in OUTPUTS:
        raise ValueError(f"unknown output {output!r}; choose one of {', '.join(OUTPUTS)}")
    if answers.ndim == 1:
        if output == "logits":
            raise ValueError("output='logits' asked of a label-only transcript: the service answered labels only "
                             "(a label-only deployment), so the client never received logits; use output='label'")
        return answers.astype(np.int64)
    return answers.astype(np.float64) if output == "logits" else answers.argmax(axis=1).astype(np.int64)


@dataclass(frozen=True)
class QueryLog:
    """The client's queries and the answers it received, in the order sent.

    ``answers`` are logits (n, C), or labels (n,) where the service answered labels only. ``labels`` are the
    attacker's own labels of its queries (auxiliary data only; -1 where it has none, e.g. random inputs): never
    sent, used only by the no-query baseline.
    """

    queries: np.ndarray   # (n, *input_shape) float32
    answers: np.ndarray   # (n, num_classes) float64 logits, or (n,) int64 labels
    labels: np.ndarray    # (n,) int64

    @property
    def label_only(self) -> bool:
        """The service answered labels only: the label-only view is what the client got, not a choice."""
        return np.asarray(self.answers).ndim == 1

    @property
    def logits(self) -> np.ndarray:
        return observe(self.answers, "logits")

    def first(self, n: int) -> "QueryLog":
        return QueryLog(self.queries[:n], self.answers[:n], self.labels[:n])


def record_query(recorder, x: np.ndarray, *, source: str, labels: np.ndarray | None = None) -> None:
    """The client's own note of what it is about to send (call right before ``infer_batch`` / ``infer``)."""
    tensors = {"inputs": np.asarray(x, dtype=np.float32)}
    if labels is not None:
        tensors["labels"] = np.asarray(labels, dtype=np.int64)
    recorder.record(Kind.QUERY, round=0, sender="self", meta={"source": source, "num_inputs": len(x)},
                    tensors=tensors)


def read_queries(transcript: Transcript, source: str | None = None) -> QueryLog:
    """Pair each ``Kind.QUERY`` record with the batch answers that followed it, in order.

    A client splits a query record into requests of its batch size (``infer_batch``; the MPC client at most
    the plan's ``max_batch``), so one query record may be answered by several ``Kind.LOGITS`` records, or
    ``Kind.LABELS`` records in a label-only deployment; their row counts must add up.
    """
    answers = [r for r in transcript.records if r.kind in ANSWERS and r.meta.get("mode") == "batch"]
    if len({r.kind for r in answers}) > 1:
        raise ValueError("the transcript mixes logits and label answers: read one deployment's transcript")
    xs, got, ys, k = [], [], [], 0
    for q in transcript.of_kind(Kind.QUERY):
        x = q.tensors["inputs"]
        mine, rows = [], 0
        while rows < len(x):
            if k >= len(answers):
                raise ValueError("the transcript has fewer answers than queries")
            mine.append(answers[k].tensors[ANSWERS[answers[k].kind]])
            rows += len(mine[-1])
            k += 1
        if rows != len(x):
            raise ValueError(f"a query of {len(x)} inputs was answered with {rows} rows")
        if source is None or q.meta.get("source") == source:
            xs.append(x)
            got.append(np.concatenate(mine))
            ys.append(q.tensors.get("labels", np.full(len(x), -1, dtype=np.int64)))
    if not xs:
        raise ValueError(f"no recorded queries{'' if source is None else f' from source {source!r}'}: "
                         "the client must record what it sent (record_query)")
    answered = np.concatenate(got)
    answered = answered.astype(np.int64) if answered.ndim == 1 else answered.astype(np.float64)
    return QueryLog(np.concatenate(xs).astype(np.float32), answered, np.concatenate(ys).astype(np.int64))
