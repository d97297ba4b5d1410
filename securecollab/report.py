"""report.html: a scorecard as one self-contained web page to send around.

The same tables as scorecard.md (protocols with their costs beside the plain baseline's; attacks with
their baselines and 95% intervals) and every figure the scorecard names, embedded as a data URI, so the
file opens anywhere without the results directory. Rendered with Jinja2, autoescaped: a row's text
cannot become markup.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import jinja2

from securecollab.scorecard import ATTACK_HEADERS, HEADERS, attack_cells, rows

COSTS_FIGURE = "costs.png"
MIME = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

TEMPLATE = """{% macro table(id, headers, rows) -%}
<table id="{{ id }}">
<thead><tr>{% for h in headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>
{% for r in rows %}<tr>{% for c in r %}<td>{{ c }}</td>{% endfor %}</tr>
{% endfor %}</tbody>
</table>
{%- endmacro %}<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>securecollab scorecard: {{ card.dataset }}, {{ card.model }}</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 78em; padding: 0 1em; color: #222; }
 table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
 th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
 th { background: #f0f3f7; }
 tr:nth-child(even) td { background: #fafafa; }
 figure { margin: 1.5em 0; }
 figure img { max-width: 100%; border: 1px solid #ddd; }
 figcaption, .note { color: #555; font-size: 0.9em; }
 .missing { color: #a00; }
</style>
</head>
<body>
<h1>securecollab scorecard — {{ card.dataset }}, {{ card.model }}</h1>
<p class="note">Created {{ card.created }}. Values in brackets are the plain baseline's (same data, model, seed
and epochs). Bytes are those the clients sent/received at the gRPC boundary.</p>
<h2>Protocols</h2>
{{ table("protocols", headers, protocol_rows) }}
{% if attack_rows %}
<h2>Attacks</h2>
<p class="note">What each adversary recovered from exactly what it received (its transcript), beside a baseline
that uses no transcript (mean image of the adversary's own data, random guess, prior). Rates with 95% intervals
in brackets; every metric is in scorecard.json.</p>
{{ table("attacks", attack_headers, attack_rows) }}
{% endif %}
{% if figures %}
<h2>Figures</h2>
{% for f in figures %}<figure>
{% if f.uri %}<img src="{{ f.uri }}" alt="{{ f.name }}">{% else %}<p class="missing">{{ f.name }}: not found beside
the scorecard</p>{% endif %}
<figcaption>{{ f.name }}</figcaption>
</figure>
{% endfor %}{% endif %}
</body>
</html>
"""


def _data_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    mime = MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def figure_names(card: dict) -> list[str]:
    """The figures a report shows: the costs chart, then every attack row's figure (paths relative to the
    scorecard's directory), each once."""
    names = [COSTS_FIGURE] + sorted({a["figure"] for a in card.get("attacks", []) if a.get("figure")})
    return list(dict.fromkeys(names))


def to_html(card: dict, results_dir: Path) -> str:
    """The report of ``card``, whose figures lie under ``results_dir``."""
    root = Path(results_dir).resolve()
    figures = []
    for name in figure_names(card):
        path = (root / name).resolve()
        inside = path == root or root in path.parents  # a row cannot make the report read files elsewhere
        figures.append({"name": name, "uri": _data_uri(path) if inside else None})
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(
        card=card, headers=HEADERS, protocol_rows=rows(card), attack_headers=ATTACK_HEADERS,
        attack_rows=[attack_cells(a) for a in card.get("attacks", [])], figures=figures)


def load_scorecard(results_dir: Path) -> dict:
    """``results_dir/scorecard.json``, refused (FileNotFoundError, ValueError) unless it is a scorecard."""
    source = Path(results_dir) / "scorecard.json"
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found: run `securecollab demo --out {results_dir}` first")
    try:
        card = json.loads(source.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not JSON: {e}") from None
    if not isinstance(card, dict) or card.get("format") != "securecollab.scorecard.v1":
        raise ValueError(f"{source} is not a securecollab scorecard (format securecollab.scorecard.v1)")
    return card


def write_report(card: dict, results_dir: Path, out: Path | None = None) -> Path:
    """Write ``report.html`` (or ``out``) for ``card``, whose figures lie under ``results_dir``."""
    out = Path(out) if out else Path(results_dir) / "report.html"
    out.write_text(to_html(card, results_dir), encoding="utf-8")
    return out
