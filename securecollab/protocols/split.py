"""Split learning: the plan, the model's parts, the server's state machine, and the client's defences.

Clients take turns (round-robin over clients within each epoch, each going
through its whole shard). By default the client-side weights -- and their
momentum buffers -- are *handed off* from client to client through the
server at the end of every turn, so the sequence of SGD steps is exactly
that of centralized training over the clients' batches in turn order (the
equivalence the tests check); the server therefore sees the client-side
weights at each hand-off (they are in its transcript). ``per_client`` keeps
one client-side model per client instead: nothing but activations and
gradients leaves a client, at the price of C different bottoms and no
equivalence with centralized training.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch
from torch import nn

from securecollab.errors import ProtocolError
from securecollab.plans import SplitPlan

log = logging.getLogger(__name__)


def sgd(module: nn.Module, plan: SplitPlan) -> torch.optim.SGD:
    return torch.optim.SGD(module.parameters(), lr=plan.lr, momentum=plan.momentum)


def optimizer_arrays(module: nn.Module, opt: torch.optim.SGD) -> list[tuple[str, np.ndarray]]:
    """Momentum buffers by parameter name (absent before the first step)."""
    out = []
    for name, p in module.named_parameters():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out.append((name, buf.detach().numpy().astype(np.float32, copy=True)))
    return out


def load_optimizer_arrays(module: nn.Module, opt: torch.optim.SGD, named) -> None:
    params = dict(module.named_parameters())
    for name, array in named:
        if name not in params or tuple(array.shape) != tuple(params[name].shape):
            raise ValueError(f"momentum buffer {name!r} does not fit the client-side model")
        opt.state[params[name]]["momentum_buffer"] = torch.from_numpy(np.array(array, dtype=np.float32))


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation between the rows of x and z (NoPeek's leakage penalty)."""
    def centred(v):
        v = v.reshape(len(v), -1)
        sq = (v * v).sum(1)
        d = (sq[:, None] + sq[None, :] - 2 * v @ v.T).clamp_min(1e-12).sqrt()  # no NaN gradient at 0
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()
    a, b = centred(x), centred(z)
    dcov_xz, dvar_x, dvar_z = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return dcov_xz.clamp_min(0).sqrt() / (dvar_x * dvar_z).clamp_min(1e-24).sqrt().sqrt()


def _finite(*tensors: torch.Tensor) -> bool:
    """All entries finite, checked in one pass (one synchronisation instead of one per tensor)."""
    return bool(torch.isfinite(torch.cat([t.reshape(-1) for t in tensors])).all()) if tensors else True


class SplitServerState:
    """The server's part of the model, its optimizer, the turn order and each client's step counter."""

    def __init__(self, plan: SplitPlan):
        self.plan = plan
        ds = plan.load_data()
        model = plan.build_model(ds)
        bottom, self.part, head = plan.parts(model)
        client_side = nn.ModuleDict({"bottom": bottom, **({"head": head} if head is not None else {})})
        # What a hand-off must carry: the client-side weights (and momentum) by name and shape.
        self.client_shapes = {n: tuple(p.shape) for n, p in client_side.state_dict().items()}
        self.client_param_shapes = {n: tuple(p.shape) for n, p in client_side.named_parameters()}
        self.num_classes = ds.num_classes
        with torch.no_grad():
            self.cut_shape = tuple(bottom(torch.from_numpy(ds.x_train[:1])).shape[1:])
        self.opt = sgd(self.part, plan)
        self._params = list(self.part.parameters())
        self.clients = plan.client_ids()
        self._lock = threading.Lock()
        self._turn_changed = threading.Condition(self._lock)
        self._turn = 0                 # index into the (epoch, client) order
        self._handoff: tuple[str, list, list] | None = None
        self._last_step: dict[str, tuple[int, int]] = {}
        self._pending: dict[str, tuple[int, int, torch.Tensor, torch.Tensor]] = {}
        self.finished: set[str] = set()
        self.all_finished = threading.Event()
        self._step_pending: tuple | None = None  # (client, epoch, step, loss) of a vanilla batch not yet stepped
        self._skipped: dict[str, tuple[int, int]] = {}  # client -> (epoch, step) whose server step was skipped
        self._version = 0
        self._waiting: set[str] = set()

    def flush(self) -> None:
        """Take the optimizer step that :meth:`forward` left pending (see ``defer_step``)."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self._step_pending is None:
            return
        (client_id, epoch, step, loss), self._step_pending = self._step_pending, None
        if not self._weights_step(loss):
            # The batch's cut gradient has gone back to the client, but nothing of it reaches the server's
            # weights. The client's next call is refused, so training does not go on silently without this step.
            self._skipped[client_id] = (epoch, step)
            log.warning("%s: step %d of epoch %d: its weight gradients overflow float32; the server skipped its "
                        "step", client_id, step, epoch)

    def _weights_step(self, loss: torch.Tensor) -> bool:
        """The weights' gradients of `loss` (the cut's went back already) and, if finite, the optimizer step.
        False, with nothing of the batch in the weights, when finite activations, outputs, loss and cut
        gradient still give weight gradients that overflow."""
        self.opt.zero_grad()
        loss.backward(inputs=self._params)
        if not self._gradients_finite():
            self.opt.zero_grad()
            return False
        self._step()
        return True

    def _check_not_skipped(self, client_id: str) -> None:
        """Refuse (once) the next call of a client whose last batch the server could not step on."""
        if client_id in self._skipped:
            epoch, step = self._skipped.pop(client_id)
            raise ProtocolError("FAILED_PRECONDITION", f"step {step} of epoch {epoch}: its weight gradients "
                                "overflowed float32, and the server skipped its optimizer step")

    def _step(self) -> None:
        self.opt.step()
        self._version += 1  # the weights a pending U-shaped forward used are gone

    def _gradients_finite(self, *tensors: torch.Tensor) -> bool:
        """Whether `tensors` and the weights' gradients are all finite."""
        return _finite(*tensors, *(p.grad for p in self._params if p.grad is not None))

    # -- who may act ----------------------------------------------------------

    def check_client(self, client_id: str) -> int:
        if client_id not in self.clients:
            raise ProtocolError("NOT_FOUND", f"unknown client {client_id!r}")
        return self.clients.index(client_id)

    def _current(self) -> tuple[int, str] | None:
        epoch, k = divmod(self._turn, len(self.clients))
        return (epoch, self.clients[k]) if epoch < self.plan.epochs else None

    def await_turn(self, client_id: str, epoch: int, timeout: float):
        """Block until (epoch, client) is the current turn; returns the hand-off (previous client, weights, momentum)."""
        self.check_client(client_id)
        if not self.plan.hands_off:
            raise ProtocolError("FAILED_PRECONDITION", "turns exist only when client-side weights are handed off")
        if epoch >= self.plan.epochs:
            raise ProtocolError("OUT_OF_RANGE", f"training has {self.plan.epochs} epochs; there is no epoch {epoch}")
        with self._turn_changed:
            if client_id in self._waiting:  # one waiting call per client: waits hold server threads
                raise ProtocolError("ALREADY_EXISTS", f"{client_id} is already waiting for a turn")
            self._waiting.add(client_id)
            try:
                came = self._turn_changed.wait_for(lambda: self._current() == (epoch, client_id)
                                                   or self._past(epoch, client_id), timeout=timeout)
            finally:
                self._waiting.discard(client_id)
            if not came:
                raise ProtocolError("DEADLINE_EXCEEDED", f"turn of {client_id} in epoch {epoch} has not come yet")
            if self._current() != (epoch, client_id):
                raise ProtocolError("FAILED_PRECONDITION", f"the turn of {client_id} in epoch {epoch} is over")
            return self._handoff or ("", [], [])

    def _past(self, epoch: int, client_id: str) -> bool:
        return self._turn > epoch * len(self.clients) + self.clients.index(client_id)

    def end_turn(self, client_id: str, epoch: int, weights: list, momentum: list) -> None:
        self.check_client(client_id)
        with self._turn_changed:
            if self._current() != (epoch, client_id):
                raise ProtocolError("FAILED_PRECONDITION", f"it is not {client_id}'s turn in epoch {epoch}")
            self._flush()
            self._check_not_skipped(client_id)
            self._pending.pop(client_id, None)
            self._handoff = (client_id, weights, momentum)
            self._turn += 1
            self._turn_changed.notify_all()

    def _check_step(self, client_id: str, epoch: int, step: int) -> None:
        if self.plan.hands_off and self._current() != (epoch, client_id):
            raise ProtocolError("FAILED_PRECONDITION", f"{client_id} is not training in epoch {epoch} now")
        last = self._last_step.get(client_id)
        if last is not None and (epoch, step) <= last:
            raise ProtocolError("ALREADY_EXISTS", f"step {step} of epoch {epoch} was already taken (replay)")

    def _check_batch(self, activations: np.ndarray, labels: np.ndarray | None) -> None:
        if activations.ndim != 1 + len(self.cut_shape) or tuple(activations.shape[1:]) != self.cut_shape \
                or not 1 <= len(activations) <= self.plan.batch_size:
            raise ProtocolError("INVALID_ARGUMENT", f"activations must be shaped (1..{self.plan.batch_size}, "
                                                    f"{', '.join(map(str, self.cut_shape))}), got {activations.shape}")
        if labels is not None:
            if labels.shape != (len(activations),):
                raise ProtocolError("INVALID_ARGUMENT", f"labels must be shaped ({len(activations)},), got {labels.shape}")
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ProtocolError("INVALID_ARGUMENT", f"labels must lie in [0, {self.num_classes})")

    # -- training -------------------------------------------------------------

    def forward(self, client_id: str, epoch: int, step: int, activations: np.ndarray, labels: np.ndarray | None,
                *, defer_step: bool = False):
        """Vanilla: (gradient at the cut, loss). U-shaped: (server outputs, None).

        ``defer_step`` (vanilla) returns the cut's gradient before the
        weights' gradients and the optimizer step, which then run on
        :meth:`flush` -- while the client back-propagates -- or before
        anything else reads the weights.
        """
        self.check_client(client_id)
        ushaped = self.plan.mode == "ushaped"
        if ushaped and labels is not None:
            raise ProtocolError("INVALID_ARGUMENT", "U-shaped mode keeps labels on the client: do not send them")
        if not ushaped and labels is None:
            raise ProtocolError("INVALID_ARGUMENT", "vanilla mode needs the labels")
        self._check_batch(activations, labels)
        with self._lock:
            self._check_step(client_id, epoch, step)
            self._flush()
            self._check_not_skipped(client_id)
            act = torch.from_numpy(activations).requires_grad_(True)
            self.part.train()
            out = self.part(act)
            if not torch.isfinite(out).all():
                raise ProtocolError("INVALID_ARGUMENT", "these activations overflow the server's layers")
            if ushaped:
                self._last_step[client_id] = (epoch, step)
                self._pending[client_id] = (epoch, step, act, out, self._version)
                return out.detach().numpy(), None
            loss = nn.functional.cross_entropy(out, torch.from_numpy(labels))
            # The cut's gradient first: it is all the client waits for. The weights' gradients and the step
            # come on flush, from the same graph.
            (cut_grad,) = torch.autograd.grad(loss, act, retain_graph=True)
            if not _finite(loss, cut_grad):
                raise ProtocolError("INVALID_ARGUMENT", "this batch gives a non-finite loss or gradient")
            if defer_step:
                self._step_pending = (client_id, epoch, step, loss)
            elif not self._weights_step(loss):  # refused whole: the step is not used up
                raise ProtocolError("INVALID_ARGUMENT", "this batch gives a non-finite loss or gradient")
            self._last_step[client_id] = (epoch, step)
            return cut_grad.numpy(), float(loss.detach())

    def backward(self, client_id: str, epoch: int, step: int, gradient: np.ndarray) -> np.ndarray:
        """U-shaped: the gradient of the server's outputs in, the gradient at the cut out."""
        self.check_client(client_id)
        with self._lock:
            if self.plan.hands_off and self._current() != (epoch, client_id):
                raise ProtocolError("FAILED_PRECONDITION", f"{client_id} is not training in epoch {epoch} now")
            pending = self._pending.get(client_id)
            if pending is None or pending[:2] != (epoch, step):
                raise ProtocolError("FAILED_PRECONDITION", f"no forward pass of step {step}, epoch {epoch} awaits "
                                                           "its gradient")
            _, _, act, out, version = pending
            if gradient.shape != tuple(out.shape):
                raise ProtocolError("INVALID_ARGUMENT", f"gradient must be shaped {tuple(out.shape)}, got {gradient.shape}")
            if version != self._version:
                # Another client stepped in between (per-client mode): redo the forward pass on the
                # current weights, as asynchronous split learning does, rather than use a stale graph.
                act = act.detach().requires_grad_(True)
                out = self.part(act)
            self.opt.zero_grad()
            act.grad = None
            # The graph is kept until the step is done: a refused gradient leaves the forward pass
            # waiting for a good one (freed with the pending entry).
            out.backward(torch.from_numpy(gradient), retain_graph=True)
            if not self._gradients_finite(act.grad):
                self.opt.zero_grad()
                raise ProtocolError("INVALID_ARGUMENT", "this gradient gives non-finite updates")
            del self._pending[client_id]
            self._step()
            return act.grad.numpy()

    def predict(self, activations: np.ndarray) -> np.ndarray:
        if activations.ndim < 1 or activations.ndim != 1 + len(self.cut_shape) or tuple(activations.shape[1:]) != self.cut_shape:
            raise ProtocolError("INVALID_ARGUMENT", f"activations must be shaped (n, {', '.join(map(str, self.cut_shape))})")
        with self._lock, torch.no_grad():
            self._flush()
            self.part.eval()
            out = self.part(torch.from_numpy(activations))
        if not torch.isfinite(out).all():
            raise ProtocolError("INVALID_ARGUMENT", "these activations overflow the server's layers")
        return out.numpy()

    def finish(self, client_id: str) -> None:
        self.check_client(client_id)
        with self._lock:
            self._flush()
            self._check_not_skipped(client_id)
            self.finished.add(client_id)
            if self.finished == set(self.clients):
                self.all_finished.set()
