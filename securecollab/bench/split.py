"""`bench split`: one epoch of split learning across processes against one epoch of centralized training.

Centralized: the same model, data, batch size and optimizer in one process,
one math thread (as every protocol process gets), timed before and after the
split run (this shared machine's speed drifts). Split: a server process
and the client processes over mutual TLS on loopback; an epoch runs from the
first client's first batch to the last client's last batch (hand-offs
included). Bytes per epoch are what the clients' gRPC (de)serializers
counted for training calls, set beside the exact size of the activations,
gradients (and labels) the protocol has to exchange.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from securecollab.net.costs import method_bytes
from securecollab.net.testbed import PROFILES, latency_model, network_description, testbed_or_loopback
from securecollab.plans import FedAvgPlan, SplitPlan
from securecollab.protocols.split import SplitServerState, sgd
from securecollab.runs import run_protocol
from securecollab.training import accuracy, batch_order

TRAINING_METHODS = ("/Forward", "/Backward", "/Train", "/AwaitTurn", "/EndTurn")


def centralized_epochs(plan: SplitPlan) -> tuple[list[float], float]:
    """Per-epoch wall times and final accuracy of plain training, one thread."""
    ds = plan.load_data()
    model = plan.build_model(ds)
    opt = sgd(model, plan)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    walls = []
    try:
        x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
        for epoch in range(plan.epochs):
            model.train()
            t0 = time.perf_counter()
            for idx in batch_order(len(x), plan.batch_size, plan.seed, epoch):
                idx = torch.from_numpy(idx)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
            walls.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return walls, accuracy(model, ds.x_test, ds.y_test)


def compute_per_step(plan: SplitPlan) -> dict:
    """A vanilla step's computation with no transport, in this process on one thread: the client's part (its
    forward, then backward and step; no noise, penalty or encoding) and the server's (its state machine until
    the reply, then what it defers; no decoding, identity check or transcript).

    A step cannot cost less than the server's part until its reply plus the longer of the client's part and
    the server's deferred part (they overlap), if messages were free and no process ever waited."""
    if plan.mode != "vanilla":
        raise ValueError("the computation alone is timed for vanilla steps (a U-shaped step is two calls)")
    ds = plan.load_data()
    client = plan.build_model(ds)
    bottom = plan.parts(client)[0]
    opt = sgd(bottom, plan)
    server = SplitServerState(replace(plan, num_clients=1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = {"client_s": 0.0, "server_until_reply_s": 0.0, "server_deferred_s": 0.0}
    try:
        x, y = torch.from_numpy(ds.x_train), ds.y_train
        steps = batch_order(len(x), plan.batch_size, plan.seed, 0)
        for step, idx in enumerate(steps):
            t0 = time.perf_counter()
            act = bottom(x[torch.from_numpy(idx)])
            sent = act.detach().numpy()
            t1 = time.perf_counter()
            grad, _ = server.forward(server.clients[0], 0, step, sent, y[idx], defer_step=True)
            t2 = time.perf_counter()
            server.flush()
            t3 = time.perf_counter()
            opt.zero_grad()
            act.backward(torch.from_numpy(grad))
            opt.step()
            t4 = time.perf_counter()
            t["client_s"] += (t1 - t0) + (t4 - t3)
            t["server_until_reply_s"] += t2 - t1
            t["server_deferred_s"] += t3 - t2
    finally:
        torch.set_num_threads(threads)
    return {k: v / len(steps) for k, v in t.items()}


def payload_bytes_per_epoch(plan: SplitPlan) -> int:
    """Raw bytes of the tensors one epoch must exchange: activations and gradients at each cut, labels."""
    ds = plan.load_data()
    model = plan.build_model(ds)
    bottom, part, _ = plan.parts(model)
    with torch.no_grad():
        act = bottom(torch.from_numpy(ds.x_train[:1]))
        out = part(act)
    per_example = 2 * act.numel() * 4  # activations up, their gradient down
    per_example += 2 * out.numel() * 4 if plan.mode == "ushaped" else 8  # outputs and their gradient / a label
    return per_example * len(ds.x_train)


def bench_split(plan: SplitPlan, *, work_dir: Path, network: str = "loopback", log=print) -> dict:
    """Under a `network` profile other than loopback the server and each client are hosts on shaped links
    (securecollab.net.testbed); centralized training runs in this process either way."""
    plan = replace(plan, record_transcripts=False)
    log(f"centralized: {plan.epochs} epochs of {plan.model} in one process ...")
    central_walls, central_acc = centralized_epochs(plan)
    log(f"split ({plan.mode}, cut {plan.cut or 'default'}): server + {plan.num_clients} client process(es) ...")
    with testbed_or_loopback(network, plan.client_ids(), ["split"]) as placement:
        if placement.addresses:
            log(f"network profile {network}: {PROFILES[network].summary}")
        result = run_protocol("split", FedAvgPlan(), work_dir, split=plan, placement=placement)
    # The machine's speed drifts: time the baseline again after, and take the median of both runs.
    log("centralized again, and a split step's computation alone ...")
    central_walls += centralized_epochs(plan)[0]
    alone = compute_per_step(plan) if plan.mode == "vanilla" else None
    clients = [json.loads((work_dir / f"result_{c}.json").read_text()) for c in plan.client_ids()]
    epoch_walls = [max(c["epoch_times"][e][1] for c in clients) - min(c["epoch_times"][e][0] for c in clients)
                   for e in range(plan.epochs)]
    sent = sum(method_bytes(c["costs"], *TRAINING_METHODS) for c in clients)
    handoff = sum(method_bytes(c["costs"], "/AwaitTurn", "/EndTurn") for c in clients)
    payload = payload_bytes_per_epoch(plan)
    steps = sum(c["step_profile"]["steps"] for c in clients)
    profile = None
    if steps:  # vanilla: per step, the client's wait for the reply and the server's handling inside it
        mean = {k: sum(c["step_profile"][k] for c in clients) / steps
                for k in ("wait_s", "server_s", "forward_s", "backward_s", "messages_s")}
        wait = mean["wait_s"]
        profile = {"step_wait_s": wait, "server_handling_s": mean["server_s"], "transport_s": wait - mean["server_s"],
                   "client_s": statistics.median(epoch_walls) / (steps / plan.epochs) - wait,
                   # the client's side in the run, against its computation alone (forward + backward and step)
                   "client_phases": {"forward_s": mean["forward_s"], "backward_and_step_s": mean["backward_s"],
                                     "messages_s": mean["messages_s"]},
                   "computation_alone": alone}
    split = {"epoch_wall_s": statistics.median(epoch_walls), "epoch_wall_s_all": epoch_walls,
             "bytes_per_epoch": sent / plan.epochs, "payload_bytes_per_epoch": payload,
             "handoff_bytes_per_epoch": handoff / plan.epochs, "accuracy": result["accuracy"],
             "per_step": profile}
    split["bytes_ratio_to_payload"] = split["bytes_per_epoch"] / payload
    # a vanilla step is one call (activations up, their gradient down), a U-shaped one two; steps counted
    lm = latency_model(1 if plan.mode == "vanilla" else 2, PROFILES[network])
    lm["steps_per_epoch"] = steps / plan.epochs if steps else math.ceil(len(plan.load_data().x_train) / plan.batch_size)
    lm["added_s_per_epoch"] = lm["steps_per_epoch"] * lm["added_s_per_step"]
    central = {"epoch_wall_s": statistics.median(central_walls), "epoch_wall_s_all": central_walls,
               "accuracy": central_acc}
    ratio = {"epoch_wall": split["epoch_wall_s"] / central["epoch_wall_s"],
             "epoch_wall_with_rtt": (split["epoch_wall_s"] + lm["added_s_per_epoch"]) / central["epoch_wall_s"]}
    if alone:  # the floor of this design here: the serial computation of a step, no message, no wait
        step = alone["server_until_reply_s"] + max(alone["client_s"], alone["server_deferred_s"])
        ratio["computation_floor"] = step * lm["steps_per_epoch"] / central["epoch_wall_s"]
    return {"benchmark": "split", "model": plan.model, "cut": plan.cut, "mode": plan.mode,
            "clients": plan.num_clients, "epochs": plan.epochs, "batch_size": plan.batch_size,
            "client_weights": plan.client_weights, "tls": "mutual", "network": network_description(PROFILES[network]),
            "latency_model": lm,
            "centralized": central, "split": split,
            "ratio": ratio}
