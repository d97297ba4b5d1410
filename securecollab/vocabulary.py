"""The scorecard's words that a reader needs without our code: how a row's regime follows from what the
adversary observed, and which fields each attack's rows must carry to be read.

Dependency-free on purpose: ``scripts/check-scorecard`` imports it with a bare Python, and the attacks
derive their rows' ``regime`` from it, so the rule the checker enforces is the rule the rows were made by.
"""

from __future__ import annotations

REGIMES = ("fedsgd", "fedavg")

# Rates carry a 95% interval beside them (`<name>_ci` = [low, high]).
RATES = ("reid_rate", "label_accuracy", "tpr_at_1pct_fpr", "tpr_at_0p1pct_fpr", "fidelity", "attack_success_rate",
         "main_accuracy", "member_accuracy", "non_member_accuracy", "plaintext_label_agreement")

# What an inversion row observed: the examples behind one observed update (all included clients' for an
# aggregate) and the SGD steps each contributing client took in the round.
OBSERVATION = ("samples_per_update", "local_steps")

# Rows of one attack with equal values here must describe the same observations (OBSERVATION fields).
INVERSION_KEY = ("attack", "protocol", "regime", "n_clients", "defence", "prior")

# Fields in `metrics` without which an attack's row cannot be read.
READ_FIELDS = {
    "gradient_inversion": ("n_clients", "regime", *OBSERVATION, "defence", "prior", "images", "observations",
                           "psnr_db", "ssim", "reid_rate", "label_accuracy"),
    "analytic_fc": ("n_clients", "regime", *OBSERVATION, "images", "psnr_db", "max_abs_error"),
    "activation_inversion": ("cut", "mode", "method", "defence", "knowledge", "n_images", "psnr_db", "reid_rate"),
    "label_leakage": ("cut", "mode", "method", "defence", "n_examples"),
    "membership_loss": ("members", "non_members", "auc", "tpr_at_1pct_fpr"),
    "membership_lira": ("members", "non_members", "variant", "shadow_models", "auc", "tpr_at_1pct_fpr"),
    "extraction": ("queries", "output", "model", "source", "method", "fidelity"),
    # a malicious client's effect: `behaviour` (securecollab.poisoning), the `defence` it met, the share of
    # malicious clients; backdoor success on triggered images of the other classes, and the main task
    "backdoor": ("n_clients", "rounds", "behaviour", "defence", "malicious_fraction", "attack_success_rate",
                 "main_accuracy", "asr_by_round"),
    "model_poisoning": ("n_clients", "rounds", "behaviour", "defence", "malicious_fraction", "main_accuracy"),
}


def regime_of(local_steps: int) -> str:
    """``fedsgd`` when each client took one gradient step on what it held that round (the observed update
    is one gradient, of a batch of ``samples_per_update`` examples), ``fedavg`` when it took several local
    steps. The number of examples does not enter: a batch of 8 in one step is FedSGD."""
    if not isinstance(local_steps, int) or isinstance(local_steps, bool) or local_steps < 1:
        raise ValueError(f"local_steps must be a positive int, got {local_steps!r}")
    return "fedsgd" if local_steps == 1 else "fedavg"


def row_problems(rows: list[dict]) -> list[str]:
    """What makes rows unreadable or ambiguous: missing fields, rates without intervals, a regime that is
    not the one its local_steps give, images that are not samples_per_update x observations, and rows
    sharing an INVERSION_KEY while describing different observations."""
    problems, seen = [], {}
    for r in rows:
        m, name = r.get("metrics") or {}, f"{r.get('attack')} {r.get('protocol')}"
        if r.get("attack") not in READ_FIELDS:
            problems.append(f"{name}: attack not in securecollab/vocabulary.py READ_FIELDS")
        missing = [f for f in READ_FIELDS.get(r.get("attack"), ()) if f not in m]
        if missing:
            problems.append(f"{name}: row lacks {', '.join(missing)}")
        for rate in RATES:
            if rate in m and f"{rate}_ci" not in m:
                problems.append(f"{name}: {rate} without {rate}_ci")
        if "regime" in m:
            try:
                derived = regime_of(m.get("local_steps"))
            except ValueError as e:
                problems.append(f"{name}: regime {m['regime']!r} but {e}")
                continue
            if m["regime"] != derived:
                problems.append(f"{name}: regime {m['regime']!r} but local_steps {m['local_steps']} "
                                f"make it {derived!r}")
        if r.get("attack") == "gradient_inversion" and all(f in m for f in ("images", "observations", *OBSERVATION)):
            if m["images"] != m["samples_per_update"] * m["observations"]:
                problems.append(f"{name}: {m['images']} images is not samples_per_update {m['samples_per_update']}"
                                f" x {m['observations']} observations")
        if "regime" in m:
            key = tuple(r.get(k, m.get(k)) for k in INVERSION_KEY)
            observed = tuple(m.get(k) for k in OBSERVATION)
            if seen.setdefault(key, observed) != observed:
                problems.append(f"two rows {dict(zip(INVERSION_KEY, key))} describe different observations: "
                                f"{dict(zip(OBSERVATION, seen[key]))} and {dict(zip(OBSERVATION, observed))}")
    return problems
