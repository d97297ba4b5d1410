"""Activation inversion by the split-learning server (attack ``activation_inversion``).

The honest-but-curious server receives, every training step, the client's
activations at the cut (plus, vanilla, the labels). It wants the client's raw
images back. What it holds, and nothing else is read:

* its own transcript (``transcripts/split-server.jsonl``): the activations of
  every batch and, when client-side weights are handed off from client to
  client, those weights as they pass through it;
* the plan it wrote (architecture, cut, seed, defences with their parameters)
  and its own part of the model (``split_server_part.npz``);
* auxiliary data: half of the test split (:func:`auxiliary_split`); the other
  half is never touched by the attacker.

From these it builds a stand-in for the client's bottom ``f``: the handed-off
weights themselves, or, when it never saw them (``per_client`` weights or a
single client), a *clone* trained on its auxiliary data through its own part of
the model, starting from the seeded initialisation the plan fixes. Then:

* ``decoder``: a network trained on ``(f(aux) [+ the plan's noise], aux)``
  maps each observed activation back to an image;
* ``optimization``: for each observed activation ``a``, pixels ``x`` in
  [0, 1] minimising ``||f(x) - a||^2 + tv * TV(x)``.

Reconstructions of the last epoch's activations (the model as trained) are
scored against the true training images, which the evaluator looks up from
the plan's partition and batch order -- for scoring only. Loading the server's
view and that ground truth is :mod:`attacks.split_view`'s.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from attacks.metrics import score_with_baselines
from attacks.registry import attack, row
from attacks.split_view import SERVER, GroundTruth, ServerView, last_epoch_sample, load_server_view, sweep_metrics
from securecollab.data import Dataset
from securecollab.models import load_arrays
from securecollab.plans import SplitPlan
from securecollab.training import one_thread

METHODS = ("decoder", "optimization")


# --- the attacker's own data ------------------------------------------------------------------

def auxiliary_split(ds: Dataset, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The attacker's auxiliary data: a seeded half of the test split (images, labels), disjoint from training."""
    order = np.random.default_rng([seed, 17]).permutation(len(ds.x_test))
    aux = np.sort(order[: len(order) // 2])
    return ds.x_test[aux], ds.y_test[aux]


# --- the attacker's stand-in for the client's bottom -----------------------------------------

def _parts(plan: SplitPlan, ds: Dataset):
    return plan.parts(plan.build_model(ds))


class BottomPath:
    """The client's bottom along one turn: weights at its start (t=0) and end (t=1), interpolated in between.

    Weights move during a turn (every batch is an SGD step), and the server saw
    only those handed in and out; a batch ``s`` of ``S`` is attacked with the
    weights at ``t = s / S`` -- exact for the turn's first batch.
    """

    def __init__(self, module: nn.Module, start: dict[str, torch.Tensor], end: dict[str, torch.Tensor]):
        self.module = module.eval()
        self.start, self.end = start, end
        self.fixed = all(torch.equal(start[k], end[k]) for k in start)
        for p in module.parameters():
            p.requires_grad_(False)

    @classmethod
    def constant(cls, module: nn.Module) -> "BottomPath":
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return cls(module, state, state)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Activations of each x[i] under the weights at t[i]."""
        if self.fixed:
            return self.module(x)
        params = {k: self.start[k] + t.reshape(-1, *[1] * self.start[k].dim()) * (self.end[k] - self.start[k])
                  for k in self.start}
        one = lambda p, xi: functional_call(self.module, p, (xi[None],))[0]  # noqa: E731
        return torch.func.vmap(one)(params, x)

    def on_batch(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """Activations of a whole batch under the weights at one t."""
        if self.fixed:
            return self.module(x)
        return functional_call(self.module, {k: self.start[k] + t * (self.end[k] - self.start[k])
                                             for k in self.start}, (x,))


def _bottom_state(plan: SplitPlan, ds: Dataset, named: dict[str, np.ndarray] | None):
    """(bottom module, its state) from hand-off weights ("bottom.*", "head.*"), or the seeded initialisation."""
    bottom, _, head = _parts(plan, ds)
    if named is not None:
        mine = nn.ModuleDict({"bottom": bottom, **({"head": head} if head is not None else {})})
        load_arrays(mine, list(named.items()))
    return bottom, {k: v.detach().clone() for k, v in bottom.state_dict().items()}


def paths_from_handoff(view: ServerView, ds: Dataset) -> dict[str, BottomPath] | None:
    """Per client, its bottom along its last-epoch turn: weights handed to it and by it (None: none seen).

    Turns follow each other, so the weights a client started from are those
    recorded just before its own (the seeded initialisation for the very first turn).
    """
    records = view.client_weights
    paths = {}
    for i, rec in enumerate(records):
        if rec.round != view.last_epoch:
            continue
        module, end = _bottom_state(view.plan, ds, rec.tensors)
        _, start = _bottom_state(view.plan, ds, records[i - 1].tensors if i else None)
        paths[rec.sender] = BottomPath(module, start, end)
    return paths or None


def server_part(plan: SplitPlan, ds: Dataset, run_dir: Path) -> nn.Module:
    """The server's own trained part of the model (its own file)."""
    _, part, _ = _parts(plan, ds)
    with np.load(Path(run_dir) / "split_server_part.npz", allow_pickle=False) as f:
        load_arrays(part, [(k, f[k]) for k in f.files])
    return part.eval()


def clone_bottom(plan: SplitPlan, ds: Dataset, part: nn.Module, aux_x: np.ndarray, aux_y: np.ndarray,
                 observed: np.ndarray, *, steps: int = 600, seed: int = 0) -> nn.Module:
    """A clone of the client's bottom trained on auxiliary data through the server's own (frozen) part.

    Starts from the seeded initialisation the plan fixes (the clients' start
    too). Vanilla: cross-entropy of ``part(clone(aux))``; U-shaped the server
    lacks the head, so a surrogate head (seeded as the plan's) trains along.
    A moment term pulls the clone's activation statistics (mean and spread per
    unit) towards those of the observed activations, which the server holds
    unpaired.
    """
    torch.manual_seed(seed)
    bottom, _, head = _parts(plan, ds)
    for p in part.parameters():
        p.requires_grad_(False)
    trainable = list(bottom.parameters()) + (list(head.parameters()) if head is not None else [])
    opt = torch.optim.Adam(trainable, lr=1e-2)
    x, y = torch.from_numpy(aux_x), torch.from_numpy(aux_y)
    obs = torch.from_numpy(observed.reshape(len(observed), -1))
    obs_mean, obs_std = obs.mean(0), obs.std(0)
    sigma = plan.noise_sigma
    for _ in range(steps):
        opt.zero_grad()
        act = bottom(x)
        out = part(act + sigma * torch.randn_like(act) if sigma else act)
        logits = head(out) if head is not None else out
        flat = act.reshape(len(act), -1)
        spread = (flat.var(0) + sigma ** 2).sqrt()  # the observed activations carry the plan's noise
        moments = ((flat.mean(0) - obs_mean) ** 2).mean() + ((spread - obs_std) ** 2).mean()
        (nn.functional.cross_entropy(logits, y) + moments).backward()
        opt.step()
    return bottom.eval()


# --- the two inversions ------------------------------------------------------------------------

class Decoder(nn.Module):
    """Activations at the cut -> images in [0, 1]."""

    def __init__(self, cut_features: int, image_shape: tuple[int, ...], hidden: int = 256):
        super().__init__()
        self.image_shape = image_shape
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(cut_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, int(np.prod(image_shape))), nn.Sigmoid())

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return self.net(a).reshape(len(a), *self.image_shape)


def train_decoder(paths: list[BottomPath], aux_x: np.ndarray, *, noise_sigma: float = 0.0, steps: int = 1500,
                  seed: int = 0) -> Decoder:
    """Fit one decoder on ``(f(aux) + N(0, noise_sigma^2), aux)``, f drawn from the clients' turns.

    Each step takes one client's path at a fresh random point per image, and
    fresh noise: the decoder learns to invert whatever weights the turn passed through.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(aux_x)
    with torch.no_grad():
        cut_features = int(np.prod(paths[0].on_batch(x[:1], 0.0).shape[1:]))
    dec = Decoder(cut_features, tuple(aux_x.shape[1:]))
    opt = torch.optim.Adam(dec.parameters(), lr=2e-3, weight_decay=1e-5)
    for _ in range(steps):
        path = paths[int(torch.randint(len(paths), (1,), generator=gen))]
        with torch.no_grad():
            act = path(x, torch.rand(len(x), generator=gen))
            if noise_sigma:
                act = act + noise_sigma * torch.randn(act.shape, generator=gen)
        opt.zero_grad()
        nn.functional.mse_loss(dec(act), x).backward()
        opt.step()
    return dec.eval()


def _tv(x: torch.Tensor) -> torch.Tensor:
    """Per-image anisotropic total variation of (N, C, H, W) images."""
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
            + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1))


@torch.no_grad()
def nearest_auxiliary(path: BottomPath, activations: torch.Tensor, t: torch.Tensor, aux_x: np.ndarray) -> torch.Tensor:
    """For each observed activation, the auxiliary image whose activation (same weights) is nearest: a start."""
    aux = torch.from_numpy(aux_x)
    out = torch.empty(len(activations), *aux.shape[1:])
    for i, (a, ti) in enumerate(zip(activations, t)):
        cand = path.on_batch(aux, float(ti)).flatten(1)
        out[i] = aux[((cand - a.flatten()) ** 2).sum(1).argmin()]
    return out


def optimize_inputs(path: BottomPath, activations: np.ndarray, t: np.ndarray, aux_x: np.ndarray, *,
                    iterations: int = 400, tv_weight: float = 1e-4, anchor: float = 0.0,
                    step_size: float = 0.05) -> np.ndarray:
    """Pixels in [0, 1] whose activations match the observed ones, from the nearest auxiliary image.

    The sum of per-image losses gives every image its own full-size
    gradient. ReLU activations at the cut are sparse (most units read 0, which
    only says "below threshold"), so the start carries much of the prior.
    ``anchor`` weighs staying near the start: against activations with noise of
    variance s^2 the attacker sets it to s^2 (a Gaussian prior around the start
    beside a Gaussian likelihood); with none the fit chases the noise
    (measured at s=1: 5.8 dB, below the mean image, vs 12 dB with the anchor).
    """
    target = torch.from_numpy(activations)
    tt = torch.from_numpy(np.asarray(t, dtype=np.float32))
    x0 = nearest_auxiliary(path, target, tt, aux_x)
    x = x0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x], lr=step_size)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [iterations // 2, 3 * iterations // 4], gamma=0.3)
    for _ in range(iterations):
        opt.zero_grad()
        err = ((path(x, tt) - target) ** 2).flatten(1).mean(1)
        prior = tv_weight * _tv(x) + anchor * ((x - x0) ** 2).flatten(1).mean(1)
        (err + prior).sum().backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(0.0, 1.0)
    return x.detach().numpy()


# --- the attack ----------------------------------------------------------------------------------

def invert_activations(view: ServerView, ds: Dataset, run_dir: Path | None, *, n_images: int = 128,
                       methods=METHODS, seed: int = 0, decoder_steps: int = 1500, iterations: int = 400,
                       paths: dict[str, BottomPath] | None = None, activations=None) -> dict:
    """Reconstruct up to ``n_images`` last-epoch images per method; returns them with their ground truth.

    ``paths`` (per client) replaces the attacker's stand-in for the bottom and
    ``activations`` the observed ones: the controls (an untrained bottom, noise).
    """
    with one_thread():
        plan = view.plan
        aux_x, aux_y = auxiliary_split(ds, seed)
        sample = last_epoch_sample(view, GroundTruth(plan, ds), n_images, seed)
        acts = sample["activations"] if activations is None else np.asarray(activations, np.float32)[: len(sample["activations"])]
        knowledge = "given"
        if paths is None:
            paths, knowledge = paths_from_handoff(view, ds), "handoff_weights"
        if paths is None:
            clone = clone_bottom(plan, ds, server_part(plan, ds, run_dir), aux_x, aux_y, acts, seed=seed)
            paths, knowledge = {s: BottomPath.constant(clone) for s in set(sample["senders"])}, "clone"
        recon = {}
        if "decoder" in methods:
            dec = train_decoder(list(paths.values()), aux_x, noise_sigma=plan.noise_sigma, steps=decoder_steps,
                                seed=seed)
            with torch.no_grad():
                recon["decoder"] = dec(torch.from_numpy(acts)).numpy()
        if "optimization" in methods:
            images = np.empty((len(acts), *ds.input_shape), np.float32)
            for sender, path in paths.items():
                mask = sample["senders"] == sender
                if mask.any():
                    images[mask] = optimize_inputs(path, acts[mask], sample["progress"][mask], aux_x,
                                                   iterations=iterations, anchor=plan.noise_sigma ** 2)
            recon["optimization"] = images
    return {"reconstructions": recon, "sources": sample["sources"], "aux_x": aux_x, "knowledge": knowledge}


def score(result: dict, ds: Dataset, seed: int = 0) -> dict[str, dict]:
    """Per method: ``{"metrics", "baseline", "random"}`` against the true images (baseline: mean auxiliary image)."""
    originals = ds.x_train[result["sources"]]
    return {method: score_with_baselines(images, originals, result["aux_x"], pool=ds.x_train,
                                         source_indices=result["sources"], match=False, seed=seed)
            for method, images in result["reconstructions"].items()}


def rows_for(view: ServerView, scores: dict[str, dict], knowledge: str, **extra_metrics) -> list[dict]:
    sweep = {**sweep_metrics(view.plan), "knowledge": knowledge, "epoch": view.last_epoch, **extra_metrics}
    return [row("activation_inversion", "split", SERVER, {**s["metrics"], "method": m, **sweep}, s["baseline"])
            for m, s in scores.items()]


@attack("activation_inversion", adversary=SERVER, protocols=("split",),
        summary="the split server inverts the client's cut activations into images (a decoder trained on its "
                "auxiliary data; optimization through the handed-off weights or a clone of the bottom)")
def activation_inversion(run_dir: Path, *, plan=None, n_images: int = 128, methods=METHODS, seed: int = 0,
                         quick: bool = False, **extra_metrics) -> list[dict]:
    view = load_server_view(run_dir, plan)
    ds = view.plan.load_data()
    result = invert_activations(view, ds, run_dir, n_images=n_images, methods=tuple(methods), seed=seed,
                                decoder_steps=1000 if quick else 1500, iterations=300 if quick else 400)
    return rows_for(view, score(result, ds, seed), result["knowledge"], **extra_metrics)
