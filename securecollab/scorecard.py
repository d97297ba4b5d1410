"""The scorecard: each protocol's accuracy and measured cost beside its plain baseline, and attack results (JSON, Markdown, PNG; HTML in securecollab.report)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

COST_FIELDS = ("wall_s", "cpu_s", "bytes_sent", "bytes_received", "peak_rss_mb")
# Which plain run each protocol's overhead is measured against.
# (HE inference brings its own: the plain inference API of the same server.)
BASELINE_OF = {"fedavg": "centralized", "secagg": "fedavg", "split": "centralized"}


def build_scorecard(results: dict[str, dict], *, plan: dict, attacks: list[dict] | None = None) -> dict:
    protocols = {}
    for name, res in results.items():
        entry = {"accuracy": res["accuracy"], "costs": res["costs"]}
        entry.update({k: res[k] for k in ("metrics", "examples") if k in res})
        base = BASELINE_OF.get(name)
        if "baseline" in res:
            entry["baseline"] = {"protocol": res["baseline"]["protocol"], "accuracy": res["baseline"]["accuracy"],
                                 "costs": {k: res["baseline"]["costs"][k] for k in COST_FIELDS}}
        elif base in results:
            entry["baseline"] = {"protocol": base, "accuracy": results[base]["accuracy"],
                                 "costs": {k: results[base]["costs"][k] for k in COST_FIELDS}}
        protocols[name] = entry
    return {
        "format": "securecollab.scorecard.v1",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "dataset": plan.get("dataset"), "model": plan.get("model"), "plan": plan,
        "protocols": protocols,
        "attacks": attacks or [],
    }


def rows(card: dict) -> list[list[str]]:
    """One row per protocol: accuracy and costs, with the baseline's in brackets."""
    out = []
    for name, p in card["protocols"].items():
        c, b = p["costs"], p.get("baseline")
        def beside(value: str, base: str | None) -> str:
            return f"{value} ({base})" if base is not None else value
        bc = b["costs"] if b else None
        out.append([
            name,
            beside(f"{p['accuracy']:.3f}", f"{b['accuracy']:.3f}" if b else None),
            beside(f"{c['wall_s']:.1f}", f"{bc['wall_s']:.1f}" if b else None),
            beside(f"{c['cpu_s']:.1f}", f"{bc['cpu_s']:.1f}" if b else None),
            beside(_mb(c["bytes_sent"]), _mb(bc["bytes_sent"]) if b else None),
            beside(_mb(c["bytes_received"]), _mb(bc["bytes_received"]) if b else None),
            beside(f"{c['peak_rss_mb']:.0f}", f"{bc['peak_rss_mb']:.0f}" if b else None),
            b["protocol"] if b else "-",
        ])
    return out


HEADERS = ["protocol", "accuracy", "wall s", "CPU s", "sent MB", "received MB", "peak RSS MB", "baseline"]


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f}"


ATTACK_HEADERS = ["attack", "protocol", "adversary", "setting", "result", "baseline"]
# Shown in the table (all metrics are in scorecard.json), in this order when present.
MAIN_METRICS = ("psnr_db", "ssim", "reid_rate", "label_accuracy", "auc", "tpr_at_1pct_fpr", "tpr_at_0p1pct_fpr",
                "fidelity", "max_abs_error", "attack_success_rate", "main_accuracy")
SETTINGS = (("n_clients", "N={}"), ("regime", "{}"), ("samples_per_update", "{} samples/update"),
            ("local_steps", "{} local steps"), ("setting", "{}"), ("cut", "cut {}"), ("head_cut", "head {}"),
            ("mode", "{}"), ("defence", "defence {}"), ("noise_multiplier", "σ={:g}"), ("epsilon", "ε={:.3g}"),
            ("prior", "prior {}"), ("separation", "separation {}"), ("method", "{}"), ("score", "{} score"), ("variant", "{}"), ("target", "{}"), ("model", "{}"),
            ("logits", "{} logits"), ("output", "{} output"), ("source", "{} inputs"), ("queries", "{} queries"),
            ("images", "{} images"), ("behaviour", "{}"), ("malicious_fraction", "{:g} malicious"),
            ("target_class", "target class {}"))
SHORT = {"psnr_db": "PSNR", "ssim": "SSIM", "reid_rate": "re-id", "label_accuracy": "label acc",
         "auc": "AUC", "tpr_at_1pct_fpr": "TPR@1%", "tpr_at_0p1pct_fpr": "TPR@0.1%", "fidelity": "fidelity",
         "max_abs_error": "max err", "attack_success_rate": "ASR", "main_accuracy": "main acc"}


def _metric(name: str, values: dict) -> str | None:
    v = values.get(name)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return None
    text = f"{v:.1f} dB" if name == "psnr_db" else (f"{v:.1e}" if name == "max_abs_error" else f"{v:.3f}")
    ci = values.get(f"{name}_ci")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return f"{SHORT[name]} {text}"


def attack_cells(a: dict) -> list[str]:
    """One attack row as table cells: its setting, its main metrics, and the same metrics of its baseline."""
    m, b = a.get("metrics", {}), a.get("baseline", {})
    setting = ", ".join(fmt.format(m[k]) for k, fmt in SETTINGS if m.get(k) is not None)
    shown = [k for k in MAIN_METRICS if _metric(k, m)]
    result = "; ".join(_metric(k, m) for k in shown)
    base = "; ".join(t for t in (_metric(k, b) for k in shown) if t) or "-"
    return [a["attack"], a["protocol"], a["adversary"], setting or "-", result or "-", base]


def to_markdown(card: dict) -> str:
    lines = [f"# securecollab scorecard — {card['dataset']}, {card['model']}", "",
             f"Created {card['created']}. Values in brackets are the plain baseline's "
             "(same data, model, seed and epochs). Bytes are those the clients sent/received "
             "at the gRPC boundary.", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(card)]
    if card["attacks"]:
        lines += ["", "## Attacks", "",
                  "What each adversary recovered from exactly what it received (its transcript), beside a "
                  "baseline that uses no transcript (mean image of the adversary's own data, random guess, prior). "
                  "Rates with 95% intervals in brackets; every metric is in scorecard.json.", "",
                  "| " + " | ".join(ATTACK_HEADERS) + " |", "|" + "---|" * len(ATTACK_HEADERS)]
        lines += ["| " + " | ".join(attack_cells(a)) + " |" for a in card["attacks"]]
        figures = sorted({a["figure"] for a in card["attacks"] if a.get("figure")})
        if figures:
            lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def write_scorecard(card: dict, out_dir: Path) -> list[Path]:
    """scorecard.json, scorecard.md and costs.png in ``out_dir`` (report.html: securecollab.report)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "scorecard.json", out_dir / "scorecard.md", out_dir / "costs.png"]
    paths[0].write_text(json.dumps(card, indent=2))
    paths[1].write_text(to_markdown(card))
    _plot_costs(card, paths[2])
    return paths


def _plot_costs(card: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(card["protocols"])
    acc = [card["protocols"][n]["accuracy"] for n in names]
    wall = [card["protocols"][n]["costs"]["wall_s"] for n in names]
    sent = [card["protocols"][n]["costs"]["bytes_sent"] / 1e6 for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, vals, title in zip(axes, [acc, wall, sent], ["test accuracy", "wall time (s)", "client upload (MB)"]):
        ax.bar(names, vals, color=["#888888" if n == "centralized" else "#3b75af" for n in names])
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=20)
    fig.suptitle(f"{card['dataset']} / {card['model']}: protocol vs plain baseline")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
