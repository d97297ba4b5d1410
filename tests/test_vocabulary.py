"""The scorecard's vocabulary: a row's regime follows from its local steps by one rule, and the checker
(scripts/check-scorecard) refuses rows that are mislabelled, unreadable or ambiguous."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from attacks.registry import row
from securecollab.vocabulary import READ_FIELDS, regime_of, row_problems

CHECKER = Path(__file__).resolve().parents[1] / "scripts" / "check-scorecard"


def inversion_row(**overrides) -> dict:
    metrics = {"n_clients": 1, "samples_per_update": 1, "local_steps": 1, "defence": "none", "prior": "tv",
               "images": 8, "observations": 8, "psnr_db": 40.0, "ssim": 0.9, "reid_rate": 1.0,
               "reid_rate_ci": [0.6, 1.0], "label_accuracy": 1.0, "label_accuracy_ci": [0.6, 1.0]}
    metrics.update(overrides)
    return row("gradient_inversion", "fedavg", "aggregator", metrics, {"psnr_db": 11.0})


def test_regime_is_one_step_or_several_whatever_the_batch():
    assert regime_of(1) == "fedsgd" and regime_of(4) == "fedavg"
    for bad in (0, -1, None, 1.0, True):
        with pytest.raises(ValueError):
            regime_of(bad)


def test_rows_derive_their_regime_and_refuse_one_set_by_hand():
    assert inversion_row()["metrics"]["regime"] == "fedsgd"
    assert inversion_row(local_steps=4)["metrics"]["regime"] == "fedavg"
    with pytest.raises(ValueError, match="derived"):
        row("gradient_inversion", "fedavg", "aggregator", {"local_steps": 1, "regime": "fedavg"}, {})


def test_well_formed_rows_pass_and_each_defect_is_named():
    good = [inversion_row(), inversion_row(n_clients=2, samples_per_update=2, images=2, observations=1)]
    assert row_problems(good) == []
    mislabelled = inversion_row()
    mislabelled["metrics"]["regime"] = "fedavg"  # what the DP sweep used to write for one-step updates
    assert "make it 'fedsgd'" in " ".join(row_problems([mislabelled]))
    unreadable = inversion_row()
    del unreadable["metrics"]["prior"], unreadable["metrics"]["reid_rate_ci"]
    text = " ".join(row_problems([unreadable]))
    assert "lacks prior" in text and "reid_rate without reid_rate_ci" in text
    assert "is not samples_per_update" in " ".join(row_problems([inversion_row(images=9)]))
    # same setting, different observations: a reader filtering on the setting would mix them
    twins = [inversion_row(), inversion_row(samples_per_update=32, images=64, observations=2)]
    assert "describe different observations" in " ".join(row_problems(twins))
    # two defences (different noise) are two settings
    noisy = inversion_row(defence="dp_sgd(noise=0.03,clip=1)", samples_per_update=32, images=64, observations=2)
    assert row_problems([inversion_row(), noisy]) == []
    # the label-only membership attack's own finding is a pair of rates: each needs its interval
    label_only = row("membership_loss", "mpc_inference", "mpc-client",
                     {"auc": 0.5, "auc_ci": [0.4, 0.6], "member_accuracy": 0.9, "non_member_accuracy": 0.8,
                      "non_member_accuracy_ci": [0.7, 0.9]}, {"auc": 0.5})
    assert "member_accuracy without member_accuracy_ci" in " ".join(row_problems([label_only]))
    stranger = row("backdoor_x", "fedavg", "client", {"asr": 1.0}, {})
    assert "not in securecollab/vocabulary.py READ_FIELDS" in " ".join(row_problems([stranger]))
    assert set(READ_FIELDS) >= {"gradient_inversion", "analytic_fc", "activation_inversion", "label_leakage",
                                "membership_loss", "membership_lira", "extraction"}


def test_checker_fails_on_a_mislabelled_row_with_a_bare_python(tmp_path):
    mislabelled = inversion_row()
    mislabelled["metrics"]["regime"] = "fedavg"
    card = {"protocols": {}, "attacks": [inversion_row(), mislabelled]}
    (tmp_path / "scorecard.json").write_text(json.dumps(card))
    # -S -E: no site-packages, no PYTHONPATH; the checker must not need the project's dependencies
    out = subprocess.run([sys.executable, "-S", "-E", str(CHECKER), str(tmp_path / "scorecard.json")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert "regime 'fedavg' but local_steps 1 make it 'fedsgd'" in out.stdout, out.stdout
    assert "describe different observations" not in out.stdout  # same observations, only the label is wrong
