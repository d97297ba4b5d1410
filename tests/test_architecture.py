"""The tree keeps the shape ARCHITECTURE.md describes: no import cycle, layers respected, small modules."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_graph_has_no_cycle_and_respects_the_layers():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "check-architecture")], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 problem(s)" in run.stdout


def test_the_checker_finds_a_cycle_and_a_layer_breach(tmp_path):
    import importlib.machinery
    import importlib.util
    loader = importlib.machinery.SourceFileLoader("check_architecture", str(ROOT / "scripts" / "check-architecture"))
    spec = importlib.util.spec_from_loader("check_architecture", loader)
    check = importlib.util.module_from_spec(spec)
    loader.exec_module(check)
    assert check.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    problems = check.layer_problems({"attacks.x": {"securecollab.protocols.secagg"},
                                     "securecollab.protocols.fedavg": {"securecollab.runs"},
                                     "securecollab.plans": {"services.common"},
                                     "securecollab.runs": {"securecollab.cli"}})
    assert len(problems) == 4, problems
