"""What the honest-but-curious split-learning server observed, and the evaluator's ground truth for it.

Both split attacks (``activation_inversion`` and ``label_leakage``) start
here. The server holds its own transcript (``transcripts/split-server.jsonl``:
cut activations, the labels in vanilla mode, U-shaped output gradients, the
client-side weights handed off through it) and the plan it wrote; nothing else
is read. :class:`GroundTruth` maps each recorded batch to the training images
it carried, from the plan's partition and batch order -- for scoring only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from securecollab.data import Dataset, partition
from securecollab.plans import SplitPlan
from securecollab.training import batch_order
from securecollab.transcript import Kind, Record, load_transcript

SERVER = "split-server"


# --- what the server observed ---------------------------------------------------------------

@dataclass
class ServerView:
    """The server's transcript, sorted by kind, with the plan it wrote."""

    plan: SplitPlan
    batches: list[Record]
    client_weights: list[Record]
    output_gradients: list[Record]

    @property
    def last_epoch(self) -> int:
        return max(r.round for r in self.batches)


def split_plan(run_dir: Path, plan: SplitPlan | str | dict | None = None, transcript=None) -> SplitPlan:
    """The plan the server wrote: given, recorded in its transcript, or saved beside the run."""
    if isinstance(plan, SplitPlan):
        return plan
    if isinstance(plan, dict):
        return SplitPlan(**plan)
    if isinstance(plan, str):
        return SplitPlan.from_json(plan)
    records = transcript.of_kind(Kind.PLAN) if transcript is not None else []
    if records:
        return SplitPlan(**records[0].meta["plan"])
    saved = Path(run_dir) / "split_plan.json"
    if saved.exists():
        return SplitPlan.from_json(saved.read_text())
    raise ValueError(f"{run_dir}: no split plan (none given, none in the transcript, no split_plan.json)")


def save_plan(run_dir: Path, plan: SplitPlan) -> None:
    """Save the plan beside a run (the server wrote it; its transcript does not record it yet)."""
    (Path(run_dir) / "split_plan.json").write_text(json.dumps(json.loads(plan.to_json()), indent=2))


def load_server_view(run_dir: Path, plan=None) -> ServerView:
    transcript = load_transcript(Path(run_dir) / "transcripts" / f"{SERVER}.jsonl")
    return ServerView(split_plan(run_dir, plan, transcript), transcript.of_kind(Kind.BATCH),
                      transcript.of_kind(Kind.CLIENT_WEIGHTS), transcript.of_kind(Kind.OUTPUT_GRADIENT))


def describe_defence(plan: SplitPlan) -> dict:
    """Scorecard sweep parameters of a run's defence."""
    name = "+".join(n for n, v in (("noise", plan.noise_sigma), ("nopeek", plan.nopeek_alpha)) if v) or "none"
    return {"defence": name, "noise_sigma": float(plan.noise_sigma), "nopeek_alpha": float(plan.nopeek_alpha)}


def sweep_metrics(plan: SplitPlan) -> dict:
    """The run's sweep parameters, as scorecard metrics."""
    return {"cut": plan.cut or plan.build_model().default_cut, "mode": plan.mode, "client_weights": plan.client_weights,
            **describe_defence(plan)}


# --- ground truth (the evaluator's, never the attacker's) -------------------------------------

class GroundTruth:
    """Which training images (indices into ``ds.x_train``) each recorded batch carried: for scoring only."""

    def __init__(self, plan: SplitPlan, ds: Dataset):
        self.plan, self.ds = plan, ds
        self._shards = [np.sort(p) for p in partition(ds.y_train, plan.num_clients, plan.partition,
                                                      seed=plan.seed, alpha=plan.alpha)]

    def sources(self, record: Record) -> np.ndarray:
        shard = self._shards[self.plan.client_ids().index(record.sender)]
        return shard[batch_order(len(shard), self.plan.batch_size, self.plan.seed, record.round)[record.step]]


def last_epoch_sample(view: ServerView, truth: GroundTruth, n_images: int, seed: int) -> dict[str, np.ndarray]:
    """Up to ``n_images`` examples of the last epoch: their activations, sender, how far into the sender's turn
    their batch came (step / steps, from the transcript) and -- for scoring only -- their training-set index."""
    records = [r for r in view.batches if r.round == view.last_epoch]
    steps = {s: sum(r.sender == s for r in records) for s in {r.sender for r in records}}
    sizes = [len(r.tensors["activations"]) for r in records]
    cols = {"activations": np.concatenate([r.tensors["activations"] for r in records]),
            "senders": np.repeat([r.sender for r in records], sizes),
            "progress": np.repeat([r.step / steps[r.sender] for r in records], sizes).astype(np.float32),
            "sources": np.concatenate([truth.sources(r) for r in records])}
    n = len(cols["sources"])
    pick = np.sort(np.random.default_rng([seed, 29]).choice(n, min(n_images, n), replace=False))
    return {k: v[pick] for k, v in cols.items()}
