"""Experiment "membership": membership inference on every released model and through the HE service.

Adversaries (see attacks/membership.py for the threat model they share):

* **model-user** -- anyone handed the final model of a training protocol
  (centralized, fedavg, secagg, split). Secure aggregation hides the clients'
  updates, not what the final model remembers, so these rows are expected to
  look alike; they measure the released model, not the protocol's transcript.
* **he-client** -- a client of the HE inference service querying candidates
  encrypted and reading the logits it decrypts (its transcript, kind
  ``Kind.LOGITS``). Encryption protects the query from the server, not the
  model's training set from the client: its AUC should match the plaintext
  API's on the same model to within CKKS noise.
* **mpc-client** -- a client of a label-only model-private MPC deployment
  (the parties compute the argmax on shares; its transcript holds labels,
  kind ``Kind.LABELS``). Without logits, loss and LiRA have nothing to read;
  what is left is the label-only gap attack (Yeom et al. 2018): a candidate
  the model labels correctly is called a member (the 0-1 loss as the loss).
  Its AUC is 0.5 + (member accuracy - non-member accuracy) / 2, beside the
  loss attack on the same model's logits computed in the clear by the
  evaluator (what a logits deployment would leak).
* an **overfit** model (a small digits subset, many epochs), where
  LiRA's per-example calibration shows at low FPR (Carlini et al. 2022).

Members are the target's training set, non-members the held-out test set,
balanced; the adversary's population is both (the standard LiRA setting).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attacks.extraction_view import read_queries, record_query
from attacks.membership import (
    Candidates,
    Recipe,
    attack_rows,
    attack_scores,
    loss_scores,
    one_torch_thread,
    train_shadows,
)
from attacks.metrics import membership_metrics, rate_ci, roc_points
from attacks.released import TRAINING_PROTOCOLS, load_released
from experiments.figures import pyplot, save_figure
from experiments.registry import experiment
from securecollab.transcript import Kind, load_transcript

ROC_FIGURE = "membership_roc.png"
HE_FIGURE = "membership_roc_he.png"
LABELS = {"loss": "loss threshold", "online": "LiRA online", "offline": "LiRA offline"}


def demo_plan(quick: bool, seed: int):
    """The FedAvg plan `securecollab demo` trains with: what the adversary assumes of runs it is handed."""
    from securecollab.plans import FedAvgPlan
    return FedAvgPlan(seed=seed, **({"rounds": 5} if quick else {}))


def own_plan(quick: bool, seed: int):
    """The plan of runs this experiment starts itself (quick: 2 clients, 6 epochs, to fit the time budget)."""
    from securecollab.plans import FedAvgPlan
    return FedAvgPlan(seed=seed, num_clients=2, rounds=2) if quick else FedAvgPlan(seed=seed)


def released_model_rows(out_dir: Path, runs: dict, *, quick: bool, seed: int, n_shadows: int, progress,
                        curves: dict) -> list[dict]:
    """Loss attack and LiRA (online) on the final model of each training protocol."""
    from securecollab.runs import run_protocol
    from securecollab.training import predict_logits

    rows, shadow_sets = [], {}
    for protocol in TRAINING_PROTOCOLS:
        run_dir, plan = runs.get(protocol), demo_plan(quick, seed)
        if run_dir is not None and (Path(run_dir) / "plan.json").exists():  # the public recipe of that run
            from securecollab.plans import FedAvgPlan
            plan = FedAvgPlan.from_json((Path(run_dir) / "plan.json").read_text())
        if run_dir is None:
            plan = own_plan(quick, seed)
            run_dir = out_dir / "runs" / protocol
            progress(f"running {protocol} ({plan.rounds} rounds x {plan.local_epochs} epochs) ...")
            run_protocol(protocol, plan, run_dir)
        model, plan = load_released(Path(run_dir), protocol, plan)
        recipe = Recipe.of_fedavg(plan)
        cand = Candidates.of_dataset(plan.load_data(), seed)
        if recipe not in shadow_sets:  # protocols trained alike share the attacker's shadows
            progress(f"{n_shadows} shadow models ({recipe.model}, {recipe.epochs} epochs) ...")
            shadow_sets[recipe] = train_shadows(cand.x, cand.y, recipe.fit(plan.load_data(), seed),
                                                n_shadows=n_shadows, seed=seed)
        scores = attack_scores(predict_logits(model, cand.queries), cand, shadow_sets[recipe], ("loss", "online"))
        curves[protocol] = {v: roc_points(s, cand.is_member) for v, s in scores.items()}
        rows += attack_rows(scores, cand.is_member, protocol=protocol, adversary="model-user",
                            shadow_models=shadow_sets[recipe].count, extra_metrics={"epochs": recipe.epochs}, seed=seed,
                            figure=ROC_FIGURE,
                            notes="released model; shadows repeat the recipe centrally (same epochs, lr, batch)")
        progress(f"{protocol}: loss AUC {rows[-2]['metrics']['auc']:.3f}, LiRA AUC {rows[-1]['metrics']['auc']:.3f}")
    return rows


def overfit_rows(*, quick: bool, seed: int, n_shadows: int, progress, curves: dict) -> list[dict]:
    """A digits MLP trained on half of a small population for many epochs: members are memorised."""
    from securecollab.data import load_dataset

    ds = load_dataset("digits", seed=seed)
    x_all, y_all = np.concatenate([ds.x_train, ds.x_test]), np.concatenate([ds.y_train, ds.y_test])
    rng = np.random.default_rng([seed, 8])
    pop = rng.permutation(len(x_all))[:600 if quick else 1000]
    members = np.zeros(len(pop), bool)
    members[rng.permutation(len(pop))[:len(pop) // 2]] = True
    cand = Candidates(x_all[pop], y_all[pop], np.arange(len(pop)), members)
    recipe = Recipe("mlp", "relu", epochs=100, lr=0.1, momentum=0.9, batch_size=32)
    progress(f"overfit target: mlp, {members.sum()} examples, {recipe.epochs} epochs ...")
    target = recipe.fit(ds, seed + 101)(cand.x[members], cand.y[members], 0)
    logits = target(cand.queries)
    train_acc = float((logits.argmax(1) == cand.labels)[members].mean())
    test_acc = float((logits.argmax(1) == cand.labels)[~members].mean())
    progress(f"{n_shadows} shadow models for the overfit target ...")
    shadows = train_shadows(cand.x, cand.y, recipe.fit(ds, seed), n_shadows=n_shadows, seed=seed)
    scores = attack_scores(logits, cand, shadows, ("loss", "online", "offline"))
    curves["overfit"] = {v: roc_points(s, cand.is_member) for v, s in scores.items()}
    return attack_rows(scores, cand.is_member, protocol="centralized", adversary="model-user",
                       shadow_models=shadows.count, seed=seed, figure=ROC_FIGURE,
                       extra_metrics={"setting": "overfit", "epochs": recipe.epochs, "train_accuracy": train_acc,
                                      "test_accuracy": test_acc},
                       notes="overfit digits MLP trained in-process (the centralized worker's training code)")


def he_rows(out_dir: Path, *, seed: int, n_shadows: int, progress, curves: dict, plan=None,
            per_side: int | None = None) -> list[dict]:
    """Both attacks on logits decrypted from the HE service, beside the same model's plaintext API.

    ``plan``: the served model (default HEModelPlan(seed)); ``per_side`` caps members and non-members queried.
    """
    from securecollab.launch import ProcessGroup
    from securecollab.net.certs import TlsFiles
    from securecollab.plans import HEModelPlan
    from securecollab.runs.inference import CLIENT, PLAIN_CLIENT, prepare, start_server
    from securecollab.transcript import TranscriptRecorder
    from services.he_client import HEClient

    plan = plan or HEModelPlan(seed=seed)
    work = out_dir / "he_membership"
    progress("HE model and server ...")
    _, ds, weights, certs = prepare(plan, work)
    cand = Candidates.of_dataset(ds, seed, per_side)
    queries = cand.queries
    transcript = work / "transcripts" / f"{CLIENT}.jsonl"
    plain_transcript = work / "transcripts" / f"{PLAIN_CLIENT}.jsonl"
    with ProcessGroup(work / "logs") as group:
        port = start_server(group, plan, weights, certs, None, max_batch=len(queries))
        target = f"localhost:{port}"
        with HEClient(target, tls=TlsFiles.for_party(certs, CLIENT), party_id=CLIENT,
                      transcript=TranscriptRecorder(transcript, party=CLIENT, role="client")) as client:
            client.open_session(batch_size=len(queries))
            progress(f"{len(queries)} encrypted queries ...")
            client.infer_batch(queries)
        with HEClient(target, tls=TlsFiles.for_party(certs, PLAIN_CLIENT), party_id=PLAIN_CLIENT,
                      transcript=TranscriptRecorder(plain_transcript, party=PLAIN_CLIENT, role="client")) as plain:
            plain.predict_plain(queries)
    he_logits = transcript_logits(transcript, Kind.LOGITS, len(queries))
    plain_logits = transcript_logits(plain_transcript, Kind.PLAIN_LOGITS, len(queries))
    progress(f"{n_shadows} shadow models ({plan.model}, x^2) ...")
    shadows = train_shadows(cand.x, cand.y, Recipe.of_he(plan, ds).fit(ds, seed), n_shadows=n_shadows, seed=seed)
    he_scores = attack_scores(he_logits, cand, shadows)
    plain_scores = attack_scores(plain_logits, cand, shadows)
    curves["he"] = {v: roc_points(s, cand.is_member) for v, s in he_scores.items()}
    curves["plaintext"] = {v: roc_points(s, cand.is_member) for v, s in plain_scores.items()}
    rows = []
    for variant in he_scores:
        p = membership_metrics(plain_scores[variant], cand.is_member, seed=seed)
        extra = {"logits": "decrypted", "plaintext_auc": p["auc"], "plaintext_auc_ci": p["auc_ci"],
                 "plaintext_tpr_at_1pct_fpr": p["tpr_at_1pct_fpr"],
                 "plaintext_tpr_at_1pct_fpr_ci": p["tpr_at_1pct_fpr_ci"],
                 "max_abs_logit_error": float(np.abs(he_logits - plain_logits).max()),
                 "queries": len(queries)}
        (r,) = attack_rows({variant: he_scores[variant]}, cand.is_member, protocol="he_inference",
                           adversary="he-client", shadow_models=shadows.count, extra_metrics=extra, seed=seed,
                           figure=HE_FIGURE, notes="logits read from the client's transcript; plaintext: the "
                                                   "same server's PredictPlain on the same candidates")
        r["metrics"]["abs_delta_auc"] = abs(r["metrics"]["auc"] - p["auc"])
        rows.append(r)
    progress(f"HE: loss AUC {rows[0]['metrics']['auc']:.3f} (plaintext {rows[0]['metrics']['plaintext_auc']:.3f}), "
             f"LiRA AUC {rows[1]['metrics']['auc']:.3f} (plaintext {rows[1]['metrics']['plaintext_auc']:.3f})")
    return rows


def mpc_rows(out_dir: Path, *, seed: int, progress, plan=None, per_side: int | None = None,
             model=None) -> list[dict]:
    """The label-only gap attack on labels a client received from a label-only MPC deployment (no figure: its
    ROC is one point, the row's member and non-member accuracies).

    ``plan``: the served model (default MpcInferencePlan(seed), label output); ``per_side`` as in :func:`he_rows`;
    ``model``: the owner's trained model (by default trained here from a secret seed, as an owner would).
    """
    from securecollab.plans import MpcInferencePlan
    from securecollab.runs.mpc_inference import CLIENT, client, deployment, infer_all, prepare
    from securecollab.training import predict_logits
    from securecollab.transcript import load_transcript

    plan = plan or MpcInferencePlan(seed=seed, output="label")
    if plan.output != "label":
        raise ValueError("mpc_rows attacks a label-only deployment (output='label')")
    work = out_dir / "mpc_membership"
    progress(f"MPC model ({plan.model}, {plan.activation}) and a label-only deployment ...")
    model, ds, certs = prepare(plan, work, model)
    cand = Candidates.of_dataset(ds, seed, per_side)
    with deployment(plan, work, model, certs) as targets, client(targets, certs, work, CLIENT) as c:
        progress(f"{len(cand.idx)} secret-shared queries, labels only ...")
        record_query(c.transcript, cand.queries, source="candidates")  # pairs the answers with the candidates
        infer_all(c, cand.queries, plan.max_batch)
    received = read_queries(load_transcript(work / "transcripts" / f"{CLIENT}.jsonl"), "candidates").answers
    correct = (received == cand.labels).astype(np.float64)   # higher means member
    # the evaluator's comparison, not the attacker's view: the loss attack on the same model's logits
    plain_logits = predict_logits(model, cand.queries)
    logits_scores = loss_scores(plain_logits, cand.labels)
    logits_metrics = membership_metrics(logits_scores, cand.is_member, seed=seed)
    member_acc, other_acc = float(correct[cand.is_member].mean()), float(correct[~cand.is_member].mean())
    agree = received == plain_logits.argmax(1)
    extra = {"score": "label correct (0-1 loss, label only)", "enforced": True, "queries": len(cand.idx),
             "member_accuracy": member_acc,
             "member_accuracy_ci": list(rate_ci(int(correct[cand.is_member].sum()), int(cand.is_member.sum()))),
             "non_member_accuracy": other_acc,
             "non_member_accuracy_ci": list(rate_ci(int(correct[~cand.is_member].sum()), int((~cand.is_member).sum()))),
             "advantage": member_acc - other_acc,
             "logits_loss_auc": logits_metrics["auc"], "logits_loss_auc_ci": logits_metrics["auc_ci"],
             "plaintext_label_agreement": float(agree.mean()),
             "plaintext_label_agreement_ci": list(rate_ci(int(agree.sum()), len(agree)))}
    rows = attack_rows({"loss": correct}, cand.is_member, protocol="mpc_inference", adversary="mpc-client",
                       extra_metrics=extra, seed=seed,
                       notes="labels read from the client's transcript (the deployment returns labels only); "
                             "logits_loss_auc: the loss attack on the same model's logits, in the clear; "
                             "plaintext_label_agreement: the labels that equal its plaintext argmax")
    progress(f"MPC label-only: AUC {rows[0]['metrics']['auc']:.3f}, advantage {member_acc - other_acc:.3f} "
             f"(the same model's logits: loss AUC {logits_metrics['auc']:.3f})")
    return rows


def transcript_logits(path: Path, kind: str, expected: int) -> np.ndarray:
    """The logits a client recorded (``kind``: Kind.LOGITS or Kind.PLAIN_LOGITS), in query order, concatenated."""
    records = sorted(load_transcript(path).of_kind(kind), key=lambda r: r.step)
    logits = np.concatenate([r.tensors["logits"] for r in records]).astype(np.float64)
    if len(logits) != expected:
        raise ValueError(f"{path}: {len(logits)} logits recorded, {expected} queried")
    return logits


def plot_rocs(path: Path, panels: dict[str, dict[str, tuple]], title: str) -> None:
    """ROC curves on log-log axes, one panel per entry, the chance line dashed.

    A curve is (fpr, tpr) or (fpr, tpr, matplotlib line keywords).
    """
    fig, axes = pyplot().subplots(1, len(panels), figsize=(3.4 * len(panels), 3.4), squeeze=False)
    for ax, (name, curves) in zip(axes[0], panels.items()):
        low = 1.0
        for label, (fpr, tpr, *style) in curves.items():
            low = min(low, np.min(fpr[fpr > 0]) if (fpr > 0).any() else 1.0)
            ax.plot(fpr, tpr, label=label, **{"lw": 1.2, **(style[0] if style else {})})
        ax.plot([low, 1], [low, 1], "k--", lw=0.8, label="random guess")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(low, 1)
        ax.set_ylim(low, 1)
        ax.set_title(name)
        ax.set_xlabel("false positive rate")
        ax.grid(True, which="both", lw=0.3, alpha=0.5)
    axes[0][0].set_ylabel("true positive rate")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path, dpi=120)


@experiment("membership", minutes=(3.0, 12.5), attacks=("membership_loss", "membership_lira"),
            summary="loss attack vs LiRA on each released model, an overfit model, through HE inference, and "
                    "the label-only attack through label-only MPC inference")
def membership_experiment(out_dir: Path, *, quick: bool, seed: int, progress, runs=None) -> list[dict]:
    n_shadows = 8 if quick else 32
    curves: dict = {}
    with one_torch_thread():
        rows = released_model_rows(out_dir, dict(runs or {}), quick=quick, seed=seed, n_shadows=n_shadows,
                                   progress=progress, curves=curves)
        rows += overfit_rows(quick=quick, seed=seed, n_shadows=n_shadows, progress=progress, curves=curves)
        rows += he_rows(out_dir, seed=seed, n_shadows=n_shadows, progress=progress, curves=curves)
        rows += mpc_rows(out_dir, seed=seed, progress=progress)
    panels = {name: {LABELS[v]: c for v, c in curves[name].items()} for name in (*TRAINING_PROTOCOLS, "overfit")}
    plot_rocs(out_dir / ROC_FIGURE, panels, f"membership inference, released models ({n_shadows} shadow models)")
    # HE and plaintext curves coincide: same colour per attack, plaintext dotted and wider underneath
    he_panel = {f"{LABELS[v]}, {src}": (*curves[src][v], {"color": colour, **style})
                for v, colour in (("loss", "C0"), ("online", "C1"))
                for src, style in (("plaintext", {"ls": ":", "lw": 3.0}), ("he", {}))}
    plot_rocs(out_dir / HE_FIGURE, {"HE-decrypted vs plaintext logits": he_panel},
              "membership inference by an HE client")
    return rows

