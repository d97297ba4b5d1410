"""Transcripts: what one party received, recorded at its service/client boundary, for attacks.

A transcript is a JSON-lines file: a header line naming the party, then one
line per received message with its kind, round/step ids, sender, metadata,
tensors (dtype, shape, base64 of raw little-endian bytes) and opaque blobs
(base64). No pickle anywhere, so loading another party's transcript is safe.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT = "securecollab.transcript.v1"


class Kind:
    """Record kinds: the contract between the services that write transcripts and the attacks that read them.

    Named once here; writers and readers both use these names. Who records each (its adversary view):"""

    PLAN = "plan"                        # aggregator, coordinator, split server: its own plan (public knowledge)
    GLOBAL_MODEL = "global_model"        # FL clients: the global model of each round
    UPDATE = "update"                    # FedAvg aggregator: a client's weights after local training
    SHARE = "share"                      # compute party: its share of one client's update; MPC inference
                                         # party: its share of the owner's weights or of a client's query
    AGGREGATE = "aggregate"              # secagg coordinator: the revealed sum of a round's update vectors
    ROUND_LOST = "round_lost"            # secagg client: a round that did not count its update
    BATCH = "batch"                      # split server: cut-layer activations (labels in vanilla mode);
                                         # HE server: a batched ciphertext query
    OUTPUT_GRADIENT = "output_gradient"  # split server, U-shaped: gradient at the head's input
    CLIENT_WEIGHTS = "client_weights"    # split server / next client: hand-off of client-side weights
    GRADIENT = "gradient"                # split client: the gradient at the cut
    PREDICT = "predict"                  # split server: activations of a prediction request
    CONTEXT = "context"                  # HE server: a client's public CKKS context
    QUERY = "query"                      # HE server: one encrypted query; extraction attacker: its own inputs
    PLAIN_QUERY = "plain_query"          # HE server: inputs sent to the plaintext API (the baseline)
    LOGITS = "logits"                    # HE client: decrypted logits; MPC client: reconstructed logits
    LABELS = "labels"                    # MPC client in a label-only deployment: reconstructed labels
    PLAIN_LOGITS = "plain_logits"        # HE client: the plaintext API's answer


@dataclass
class Record:
    kind: str
    round: int
    step: int
    sender: str
    meta: dict = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    time: float = 0.0


@dataclass
class Transcript:
    party: str
    role: str
    records: list[Record]

    def of_kind(self, kind: str) -> list[Record]:
        return [r for r in self.records if r.kind == kind]


class TranscriptRecorder:
    """Appends records to `path`; with path None it records nothing (the party opted out)."""

    def __init__(self, path: str | Path | None, *, party: str, role: str, resume: bool = False):
        """A new transcript at `path`; with `resume`, one this party already began there is continued
        (a restarted service keeps what it recorded before)."""
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        if not self.path:
            return
        header = json.dumps({"format": FORMAT, "party": party, "role": role})
        if resume and self.path.exists():
            with self.path.open("rb+") as f:
                if f.readline().decode(errors="replace").strip() == header:
                    data = f.seek(0) or f.read()
                    f.truncate(data.rfind(b"\n") + 1)  # drop a line torn by the crash before the restart
                    return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(header + "\n")

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def record(self, kind: str, *, round: int, sender: str, step: int = 0, meta: dict | None = None,
               tensors=None, blobs: dict[str, bytes] | None = None) -> None:
        if not self.path:
            return
        items = tensors.items() if isinstance(tensors, dict) else (tensors or [])
        line = json.dumps({
            "kind": kind, "round": int(round), "step": int(step), "sender": sender,
            "time": time.time(), "meta": meta or {},
            "tensors": {name: _encode_array(np.asarray(a)) for name, a in items},
            "blobs": {k: base64.b64encode(v).decode() for k, v in (blobs or {}).items()},
        })
        with self._lock, self.path.open("a") as f:
            f.write(line + "\n")


def load_transcript(path: str | Path) -> Transcript:
    """Load a transcript as plain values; raises ValueError on anything malformed."""
    lines = Path(path).read_text().splitlines()
    if not lines:
        raise ValueError(f"{path}: empty transcript")
    try:
        header = json.loads(lines[0])
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        party, role = header["party"], header["role"]
        records = []
        for line in lines[1:]:
            d = json.loads(line)
            records.append(Record(
                kind=d["kind"], round=d["round"], step=d["step"], sender=d["sender"],
                meta=d["meta"], time=d["time"],
                tensors={k: _decode_array(v) for k, v in d["tensors"].items()},
                blobs={k: base64.b64decode(v, validate=True) for k, v in d["blobs"].items()},
            ))
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, ValueError) as e:
        raise ValueError(f"{path}: malformed transcript: {e}") from e
    return Transcript(party=party, role=role, records=records)


def _encode_array(a: np.ndarray) -> dict:
    if a.dtype == object:
        raise TypeError("object arrays cannot be recorded")
    le = a.astype(a.dtype.newbyteorder("<"), copy=False)
    return {"dtype": le.dtype.str, "shape": list(a.shape),
            "b64": base64.b64encode(np.ascontiguousarray(le).tobytes()).decode()}


def _decode_array(d: dict) -> np.ndarray:
    dtype = np.dtype(d["dtype"])
    if dtype.hasobject:
        raise ValueError("object dtype in transcript")
    raw = base64.b64decode(d["b64"], validate=True)
    return np.frombuffer(raw, dtype=dtype).reshape(d["shape"]).astype(dtype.newbyteorder("="))
