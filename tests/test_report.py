"""report.html: the scorecard's tables and every figure, embedded, in one page (securecollab/report.py)."""

from __future__ import annotations

import base64
import json
from html.parser import HTMLParser

from typer.testing import CliRunner

from securecollab.cli import app
from securecollab.pipeline import build_and_write_scorecard
from securecollab.plans import FedAvgPlan
from securecollab.scorecard import build_scorecard, write_scorecard


def costs(wall: float) -> dict:
    return {"wall_s": wall, "cpu_s": wall * 1.5, "bytes_sent": 2e6, "bytes_received": 1e6, "peak_rss_mb": 300.0}


def card_with_figure(results_dir):
    """A scorecard of two protocols and two attack rows, one with a figure in a subdirectory, one naming a
    file beside the results directory (which exists, and must not be read)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (results_dir / "attacks").mkdir(parents=True)
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.plot([1, 2, 4], [30, 20, 10])
    fig.savefig(results_dir / "attacks" / "leakage.png")
    fig.savefig(results_dir.parent / "outside.png")
    plt.close(fig)
    results = {"centralized": {"accuracy": 0.95, "costs": costs(1.0)},
               "fedavg": {"accuracy": 0.94, "costs": costs(3.0)}}
    attacks = [
        {"attack": "gradient_inversion", "protocol": "fedavg", "adversary": "aggregator",
         "metrics": {"n_clients": 1, "psnr_db": 16.1, "reid_rate": 0.23, "reid_rate_ci": [0.15, 0.35],
                     "defence": "<script>alert(1)</script>"},
         "baseline": {"psnr_db": 11.3, "reid_rate": 0.0}, "figure": "attacks/leakage.png"},
        {"attack": "membership_loss", "protocol": "fedavg", "adversary": "anyone", "metrics": {"auc": 0.52},
         "baseline": {"auc": 0.5}, "figure": "../outside.png"},
    ]
    return build_scorecard(results, plan={"dataset": "digits", "model": "mlp"}, attacks=attacks)


class Page(HTMLParser):
    """The rows of each table (by id), every <img> src, and every tag seen."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self.tags, self._table, self._row = {}, [], [], None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._row is not None and data.strip():
            self._row.append(data.strip())


def parse(path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_the_demo_writes_a_report_with_both_tables_and_every_figure_embedded(tmp_path):
    tmp_path = tmp_path / "results"
    card = card_with_figure(tmp_path)
    results = {name: card["protocols"][name] for name in ("centralized", "fedavg")}
    _, paths = build_and_write_scorecard(results, FedAvgPlan(), tmp_path, attacks=card["attacks"])
    page = parse(tmp_path / "report.html")
    assert tmp_path / "report.html" in paths
    assert len(page.tables["protocols"]) == 1 + 2 and page.tables["protocols"][2][0] == "fedavg"
    assert "0.940 (0.950)" in page.tables["protocols"][2]
    assert len(page.tables["attacks"]) == 1 + 2
    assert "PSNR 16.1 dB; re-id 0.230 [0.15, 0.35]" in page.tables["attacks"][1]
    # a row's text stays text: the setting shows the markup, the page holds no <script>
    assert "script" not in page.tags and any("<script>" in cell for cell in page.tables["attacks"][1])
    # costs.png and the attack's figure, byte for byte; the figure outside the results directory is not read
    embedded = [base64.b64decode(src.split(",", 1)[1]) for src in page.images]
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    assert embedded == [(tmp_path / "costs.png").read_bytes(), (tmp_path / "attacks" / "leakage.png").read_bytes()]
    assert "../outside.png: not found beside" in (tmp_path / "report.html").read_text()


def test_report_command_writes_the_page_and_refuses_what_is_not_a_scorecard(tmp_path):
    tmp_path = tmp_path / "results"
    write_scorecard(card_with_figure(tmp_path), tmp_path)  # json, md, costs.png; no report yet
    runner = CliRunner()
    done = runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "r.html")])
    assert done.exit_code == 0, done.output
    assert len(parse(tmp_path / "r.html").images) == 2
    missing = runner.invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "scorecard.json not found" in missing.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "scorecard.json").write_text(json.dumps({"rows": []}))
    wrong = runner.invoke(app, ["report", str(tmp_path / "other")])
    assert wrong.exit_code == 2 and "not a securecollab scorecard" in wrong.output
    assert not (tmp_path / "other" / "report.html").exists()
