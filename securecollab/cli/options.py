"""Options that several commands share, each defined once, and `uses`, which gives a command a group of them.

A group is a function whose parameters are typer options; it builds something from their values (a plan,
the serving address). ``@uses(plan=training_options)`` puts the group's options on the command in place of
its ``plan`` parameter and calls the command with ``plan=training_options(**their values)``.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")


def uses(**groups):
    """Give the command each group's options, in place of the parameter named like the group (see above)."""
    def deco(command):
        params, taken = [], {}
        for name, p in inspect.signature(command, eval_str=True).parameters.items():
            if name in groups:
                taken[name] = list(inspect.signature(groups[name], eval_str=True).parameters.values())
                params += taken[name]
            else:
                params.append(p)
        names = [p.name for p in params]
        if missing := set(groups) - set(taken):
            raise TypeError(f"{command.__name__} has no parameter for group(s) {sorted(missing)}")
        if len(set(names)) != len(names):
            raise TypeError(f"{command.__name__}: an option is in two groups: {names}")

        @functools.wraps(command)
        def run(**values):
            for name, group_params in taken.items():
                values[name] = groups[name](**{p.name: values.pop(p.name) for p in group_params})
            return command(**values)

        run.__signature__ = inspect.Signature([p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params])
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__  # typer must see this signature, not the command's
        return run
    return deco


# Options of a training plan.
Model = Annotated[str, typer.Option(help="Model: mlp, cnn or convnet.")]
DatasetOpt = Annotated[str, typer.Option(help="Data set: digits, breast_cancer or npz (with --dataset-path).")]
DatasetPath = Annotated[Optional[Path], typer.Option(help="MedMNIST-style .npz file (for --dataset npz).")]
Clients = Annotated[int, typer.Option(min=1, help="Number of FL clients.")]
Rounds = Annotated[int, typer.Option(min=1, help="Federated rounds.")]
LocalEpochs = Annotated[int, typer.Option(min=1, help="Local epochs per round.")]
Lr = Annotated[float, typer.Option(min=0.0, help="SGD learning rate.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Mini-batch size.")]
Seed = Annotated[int, typer.Option(help="Seed for data split, partition, init and batch order.")]
PartitionOpt = Annotated[str, typer.Option(help="Client partition: iid or dirichlet.")]
Alpha = Annotated[float, typer.Option(min=0.0, help="Dirichlet concentration (smaller = more skewed).")]
# Options of a secure-aggregation plan.
NarrowRing = Annotated[bool, typer.Option(
    "--narrow-ring/--wide-ring", help="A plain sum's shares in Z_2^32 (4-byte words; every update must keep "
    "|x| < 2^15 / clients). --wide-ring: CrypTen's 64-bit ring, which a rule inside MPC uses anyway.")]
DpNoise = Annotated[float, typer.Option(min=0.0, help="DP-SGD local training (opacus): noise multiplier; 0 = off. "
                                                   "Clients report their epsilon.")]
DpClip = Annotated[float, typer.Option(min=0.0, help="DP-SGD: per-example gradient clipping norm.")]
# Options of every party.
CertsDir = Annotated[Path, typer.Option(help="Directory with ca.pem and <party>.pem/.key (see `securecollab certs`).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log progress to stderr.")]
ServerName = Annotated[Optional[str], typer.Option(
    help="Name expected in the server's certificate, if not the target host.")]


def fedavg_plan(model, dataset, dataset_path, clients, rounds, local_epochs, lr, batch_size, seed, partition, alpha,
                dp_noise=0.0, dp_clip=1.0, **defence):
    """The FedAvg plan of these option values (`defence`: a plain aggregator's, see defence_options); a bad
    combination is a usage error (exit 2)."""
    from securecollab.plans import FedAvgPlan
    try:
        return FedAvgPlan(model=model, dataset=dataset, dataset_path=str(dataset_path) if dataset_path else None,
                          num_clients=clients, rounds=rounds, local_epochs=local_epochs, lr=lr,
                          batch_size=batch_size, seed=seed, partition=partition, alpha=alpha,
                          dp_noise_multiplier=dp_noise, dp_max_grad_norm=dp_clip, **defence)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def training_options(
    model: Model = "mlp", dataset: DatasetOpt = "digits", dataset_path: DatasetPath = None,
    clients: Clients = 4, rounds: Rounds = 10, local_epochs: LocalEpochs = 3, lr: Lr = 0.1,
    batch_size: BatchSize = 32, seed: Seed = 0, partition: PartitionOpt = "iid", alpha: Alpha = 0.5,
):
    """Group: a training plan's options. Gives ``plan(dp_noise=0.0, dp_clip=1.0, **defence) -> FedAvgPlan`` (built when asked:
    a command given --plan-json does not need it)."""
    return functools.partial(fedavg_plan, model, dataset, dataset_path, clients, rounds, local_epochs, lr,
                             batch_size, seed, partition, alpha)


def dp_options(dp_noise: DpNoise = 0.0, dp_clip: DpClip = 1.0) -> dict:
    """Group: DP-SGD local training; gives the keywords of ``fedavg_plan``."""
    return {"dp_noise": dp_noise, "dp_clip": dp_clip}


# Defences against malicious clients: inside MPC under secure aggregation, in the clear at a plain aggregator.
NormBound = Annotated[float, typer.Option(
    min=0.0, help="Bound every update's L2 norm (0: off): inside MPC under secure aggregation (needs the dealer), "
                  "in the clear at a plain FedAvg aggregator.")]
NormMode = Annotated[str, typer.Option(
    help="What --norm-bound does to an update above it: reject (drop it) or clip (scale it to the bound).")]
Robust = Annotated[str, typer.Option(
    help="A robust rule instead of the bound: fltrust (trust scores against the aggregator's own update on the "
         "plan's root_samples training examples, default 100).")]


def defence_options(norm_bound: NormBound = 0.0, norm_mode: NormMode = "reject", robust: Robust = "") -> dict:
    """Group: the aggregation's defence; gives the plans' keywords (checked: a bad combination is a usage error)."""
    from securecollab.plans import check_robustness
    try:
        check_robustness(norm_bound, norm_mode, robust)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    return {"norm_bound": norm_bound, "norm_mode": norm_mode, "robust": robust}
