"""The public command line, as a user runs it: help, certificates, benchmark JSON, and the demo's scorecard."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from securecollab.net.certs import identity_from_pem


def securecollab(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "securecollab", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_help_lists_the_public_commands():
    out = securecollab("--help")
    assert out.returncode == 0
    for command in ("demo", "train", "serve", "client", "certs", "bench", "infer"):
        assert command in out.stdout


def test_certs_writes_a_ca_and_role_bearing_certificates(tmp_path):
    out = securecollab("certs", "--out", str(tmp_path), "coordinator", "party-0", "client-3", "p9:dealer")
    assert out.returncode == 0, out.stderr
    roles = {p: identity_from_pem((tmp_path / f"{p}.pem").read_bytes()).role
             for p in ("coordinator", "party-0", "client-3", "p9")}
    assert roles == {"coordinator": "coordinator", "party-0": "party", "client-3": "client", "p9": "dealer"}
    assert (tmp_path / "ca.pem").exists()


def test_infer_reports_an_unreachable_server_clearly(tmp_path):
    securecollab("certs", "--out", str(tmp_path), "client-0")
    out = securecollab("infer", "--target", "localhost:1", "--certs", str(tmp_path), "--connect-timeout", "1")
    assert out.returncode == 1
    assert "cannot reach the HE server" in out.stderr and "Traceback" not in out.stderr


def test_certs_refuses_a_bad_party_spec_with_a_clear_error(tmp_path):
    out = securecollab("certs", "--out", str(tmp_path), "client-0:wizard")
    assert out.returncode == 2
    assert "wizard" in out.stderr


@pytest.mark.slow
def test_bench_secagg_writes_the_documented_json(tmp_path):
    path = tmp_path / "bench.json"
    # a norm bound (every update passes: norms ~7), so the parties talk in the MPC; both transports
    out = securecollab("bench", "secagg", "--clients", "3", "--params", "20000", "--rounds", "2", "--warmup", "0",
                       "--norm-bound", "1000", "--out", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(path.read_text())
    for side in ("plain", "secure"):
        assert r[side]["round_wall_s"] > 0 and r[side]["upload_bytes_per_client"] > 0
    # one int64 share (plus seeds and framing) against float32 weights: a rule inside MPC needs the 64-bit ring
    assert r["share_bits"] == 64 and 1.95 <= r["ratio"]["upload_bytes"] <= 2.1
    assert r["ratio"]["round_wall"] == pytest.approx(r["secure"]["round_wall_s"] / r["plain"]["round_wall_s"])
    assert 0 < r["max_abs_error"] <= 3 * 2 ** -16
    assert r["secure"]["mpc_transport"] == "grpc" and set(r["by_transport"]) == {"grpc", "gloo"}
    for t, side in r["by_transport"].items():
        assert side["mpc_phase_s"] > 0 and 0 < side["max_abs_error"] <= 3 * 2 ** -16
        for party in side["mpc_traffic"].values():
            # the squared norms of 3 x 20,001 values need at least one opened 60,003-element tensor each
            assert party["payload_bytes_per_round"] >= 60_003 * 8
            # over grpc the gRPC bytes hold that payload; gloo is not gRPC
            assert (party["grpc_bytes_per_round"] > party["payload_bytes_per_round"]) == (t == "grpc")
            assert party["peak_rss_mb"] > 50  # the party's own process: torch, CrypTen, the shares


def test_bench_secagg_scale_path_runs_many_clients_as_threads_of_few_processes(tmp_path):
    path = tmp_path / "scale.json"
    out = securecollab("bench", "secagg", "--clients", "24", "--client-processes", "2", "--params", "5000",
                       "--rounds", "1", "--warmup", "0", "--mpc-transport", "grpc", "--out", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(path.read_text())
    assert r["clients"] == 24 and r["client_processes"] == 2
    # a plain sum: one share of 4-byte words (plus seeds and framing) against float32 weights
    assert r["share_bits"] == 32 and 0.95 <= r["ratio"]["upload_bytes"] <= 1.1, r["ratio"]
    assert 0 < r["max_abs_error"] <= 24 * 2 ** -16  # every one of the 24 updates is in the sum
    rss = r["secure"]["peak_rss_mb"]
    assert set(rss) == {"coordinator", "party-0", "party-1", "party-2", "clients_process"}
    assert all(mb > 30 for mb in rss.values()) and r["plain"]["peak_rss_mb"]["aggregator"] > 30
    assert "peak RSS MB: aggregator" in " ".join(out.stderr.split())
    # a network profile puts each client on its own host: sharing processes is refused before anything runs
    bad = securecollab("bench", "secagg", "--clients", "4", "--client-processes", "2", "--network", "lan",
                       "--out", str(tmp_path / "x.json"))
    assert bad.returncode == 2 and "own host" in bad.stderr and not (tmp_path / "x.json").exists()


def test_demo_refuses_an_unknown_attack_experiment_before_running_anything(tmp_path):
    # The demo itself (every protocol and every attack) runs in CI as `make demo`, and
    # scripts/check-scorecard checks its scorecard: its time is not the test suite's.
    bad = securecollab("demo", "--quick", "--attacks", "gradient_inversion,nope", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "unknown experiment" in bad.stderr and "nope" in bad.stderr
    assert not (tmp_path / "x" / "runs").exists()


def test_check_scorecard_fails_on_a_failed_experiment_and_missing_rows(tmp_path):
    card = {"protocols": {"fedavg": {}}, "attacks": [], "attack_errors": [{"experiment": "dp", "error": "boom"}]}
    (tmp_path / "scorecard.json").write_text(json.dumps(card))
    script = Path(__file__).resolve().parents[1] / "scripts" / "check-scorecard"
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "scorecard.json")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    for problem in ("experiment dp failed: boom", "protocols", "no rows for", "batch-1 FedAvg inversion",
                    "no report.html"):
        assert problem in out.stdout, out.stdout


@pytest.mark.slow
def test_bench_split_writes_the_documented_json(tmp_path):
    path = tmp_path / "bench.json"
    out = securecollab("bench", "split", "--model", "mlp", "--epochs", "2", "--out", str(path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(path.read_text())
    for side in ("centralized", "split"):
        assert r[side]["epoch_wall_s"] > 0 and 0 <= r[side]["accuracy"] <= 1
    assert r["ratio"]["epoch_wall"] == pytest.approx(r["split"]["epoch_wall_s"] / r["centralized"]["epoch_wall_s"])
    # one client, vanilla: activations and gradients (64 floats each) and a label per example, plus framing
    assert r["split"]["payload_bytes_per_epoch"] == 1347 * (64 * 4 * 2 + 8)
    assert 1.0 <= r["split"]["bytes_ratio_to_payload"] <= 1.05
    # a vanilla step's computation alone: both parts measured, and their serial sum gives the floor
    alone, steps = r["split"]["per_step"]["computation_alone"], math.ceil(1347 / 32)
    assert alone["client_s"] > 0 and alone["server_until_reply_s"] > 0 and alone["server_deferred_s"] > 0
    step = alone["server_until_reply_s"] + max(alone["client_s"], alone["server_deferred_s"])
    assert r["ratio"]["computation_floor"] == pytest.approx(step * steps / r["centralized"]["epoch_wall_s"])
    # the client's side in the run, phase by phase: each measured, together no more than its whole side
    per_step = r["split"]["per_step"]
    phases = per_step["client_phases"]
    assert all(v > 0 for v in phases.values()), phases
    assert sum(phases.values()) <= per_step["client_s"] * 1.02, (phases, per_step["client_s"])


@pytest.mark.slow
def test_bench_he_writes_the_documented_json(tmp_path):
    path = tmp_path / "bench.json"
    out = securecollab("bench", "he", "--queries", "3", "--batch-size", "512", "--batch-rounds", "1",
                       "--out", str(path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(path.read_text())
    assert r["plain"]["latency_s"] > 0
    he = r["he"]
    for field in ("latency_s", "throughput_per_s", "query_bytes", "session_key_bytes"):
        assert he[field] > 0
    # a 512-image batch cycles through the whole 450-image test set
    assert he["argmax_agreement"] == 1.0 and he["max_abs_logit_error"] <= 0.05
    assert he["query_bytes"] <= 500_000
    assert set(he["single"]["stages_s"]) == {"keygen", "encrypt", "network_and_server", "server", "decrypt"}


@pytest.mark.slow
def test_bench_load_40_clients_rounds_close_without_waiting_for_the_deadline(tmp_path):
    """More clients than the default 32 server threads: waiting clients must not starve the others'
    reports (rounds then closed only at the 300 s upload deadline)."""
    path = tmp_path / "load.json"
    out = securecollab("bench", "load", "--clients", "40", "--rounds", "2", "--out", str(path), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(path.read_text())
    assert r["errors"] == [] and r["clients_finished"] == 40
    assert r["included_per_round"] == [40, 40]
    assert max(r["round_wall_s"][1:]) < 60, r["round_wall_s"]
    assert r["peak_rss_mb"]["coordinator"] > 0


@pytest.mark.slow
def test_bench_load_he_answers_every_concurrent_query_correctly(tmp_path):
    """Six clients with their own keys and sessions query one HE server at the same time: every decrypted
    answer must match the plaintext model, and throughput, latency and both sides' memory are reported."""
    path, secagg_path = tmp_path / "load_he.json", tmp_path / "load.json"
    out = securecollab("bench", "load", "--protocol", "he", "--he-clients", "6", "--he-queries", "2",
                       "--he-out", str(path), "--out", str(secagg_path), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not secagg_path.exists()  # --protocol he runs the HE half only
    r = json.loads(path.read_text())
    assert r["errors"] == [] and r["clients_finished"] == 6
    assert r["queries"] == r["queries_answered"] == r["answers_correct"] == 12
    assert r["queries_per_s"] > 0 and r["concurrent_wall_s"] > 0
    assert 0 < r["latency_s"]["p50"] <= r["latency_s"]["p95"]
    setup = r["session_setup_s"]["keygen_plus_upload"]
    assert 0 < setup["p50"] <= setup["p95"]
    assert 0 < r["bytes_per_query"] <= 300_000 and r["session_key_bytes"] > 1e6
    # six sessions' keys and encoded weights are resident in the server at its peak
    assert r["peak_rss_mb"]["server"] > r["rss_mb"]["server_idle"] + 6 * 24 > 0
    assert r["peak_rss_mb"]["clients (this process)"] > 0
    assert "queries/s" in out.stdout  # the summary table


def test_bench_load_refuses_an_unknown_protocol():
    out = securecollab("bench", "load", "--protocol", "fedsgd")
    assert out.returncode == 2 and "secagg, he or both" in out.stderr


def test_serve_has_a_sub_command_per_role_with_only_its_options():
    party = securecollab("serve", "party", "--help")
    assert party.returncode == 0, party.stderr
    for option in ("--index", "--mpc-addr", "--mpc-port", "--norm-bound", "--clients", "--certs", "--port-file"):
        assert option in party.stdout, option
    for other in ("--weights", "--max-sessions", "--split-mode", "--party-target"):
        assert other not in party.stdout, other
    he = securecollab("serve", "he", "--help")
    assert he.returncode == 0, he.stderr
    for option in ("--weights", "--max-sessions", "--max-batch", "--plan-json", "--certs"):
        assert option in he.stdout, option
    for other in ("--index", "--mpc-port", "--norm-bound", "--split-mode", "--rounds"):
        assert other not in he.stdout, other
    roles = securecollab("serve", "--help")
    assert roles.returncode == 0
    for role in ("aggregator", "coordinator", "party", "dealer", "he", "split"):
        assert role in roles.stdout


def test_serve_accepts_every_deployed_command_line():
    """The compose file and the k8s manifests call `serve ROLE ...`: each role must take every option given."""
    import re
    import shlex

    import typer.main
    import yaml

    from securecollab.cli import app
    serve = typer.main.get_command(app).commands["serve"]
    deploy = Path(__file__).resolve().parents[1] / "deploy"
    lines = [s["command"] for s in yaml.safe_load((deploy / "docker-compose.yml").read_text())["services"].values()
             if isinstance(s.get("command"), str) and s["command"].startswith("serve ")]
    for path in sorted((deploy / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for c in (doc or {}).get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                argv = c.get("command", []) + c.get("args", [])
                lines.append(argv[2] if argv[:2] == ["sh", "-c"] else shlex.join(argv))
    seen = set()
    for line in lines:
        words = shlex.split(re.sub(r"\$?\$\{[A-Z_]+(:-([^}]*))?[^}]*\}", lambda m: m.group(2) or "1", line))
        if "serve" not in words:
            continue
        role, args = words[words.index("serve") + 1], words[words.index("serve") + 2:]
        serve.commands[role].make_context(role, args)  # raises on an option the role does not take
        seen.add(role)
    assert seen == {"coordinator", "party", "dealer", "he", "split", "mpc"}


def test_every_compose_command_parses():
    """The compose file's other commands (infer, demo-web, client ...) take every option they are given."""
    import re
    import shlex

    import typer.main
    import yaml

    from securecollab.cli import app
    group = typer.main.get_command(app)
    compose = yaml.safe_load((Path(__file__).resolve().parents[1] / "deploy" / "docker-compose.yml").read_text())
    commands = [s["command"] for s in compose["services"].values() if isinstance(s.get("command"), str)]
    for line in commands:
        words = shlex.split(re.sub(r"\$?\$\{[A-Z_]+(:-([^}]*))?[^}]*\}", lambda m: m.group(2) or "1", line))
        command = group
        while hasattr(command, "commands"):  # a group (typer carries its own click: no isinstance)
            command, words = command.commands[words[0]], words[1:]
        command.make_context(command.name, words)  # raises on an option the command does not take
    assert any(line.startswith("demo-web ") for line in commands)


def test_pipeline_chooses_experiments_in_the_demo_order():
    from securecollab import pipeline
    order = pipeline.experiment_order()
    assert set(pipeline.DEMO_ORDER) <= set(order)
    assert pipeline.chosen_experiments("all") == order
    assert pipeline.chosen_experiments("none") == []
    assert pipeline.chosen_experiments("dp, gradient_inversion") == ["gradient_inversion", "dp"]
    with pytest.raises(ValueError, match="nope"):
        pipeline.chosen_experiments("gradient_inversion,nope")


def test_attack_list_shows_the_experiments(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # names in one piece
    out = securecollab("attack", "list")
    assert out.returncode == 0, out.stderr
    for name in ("gradient_inversion", "membership", "dp"):
        assert name in out.stdout


def test_demo_runs_the_pipeline_and_reports_a_failed_experiment(tmp_path, monkeypatch):
    """The demo's flow with the protocol runs and experiments stubbed (the real demo runs in CI): every
    protocol, the HE examples, the experiments on the demo's runs, the scorecard, and exit 1 for a failure."""
    from typer.testing import CliRunner

    import experiments.registry
    import securecollab.runs
    from attacks.registry import row
    from securecollab import pipeline
    from securecollab.cli import app

    costs = {"wall_s": 1.5, "cpu_s": 2.0, "bytes_sent": 1e6, "bytes_received": 2e6, "peak_rss_mb": 100.0}
    he = {"metrics": {"model": "convnet", "batched_argmax_agreement": 1.0, "batched_max_abs_logit_error": 1e-4,
                      "single_latency_s": 0.5, "session_key_bytes": 3e7},
          "examples": [{"index": 7, "label": 3, "plaintext": 3, "decrypted": 3, "max_abs_logit_error": 2e-4}]}
    mpc = {"metrics": {"model": "convnet", "n_parties": 3, "output": "label", "label_agreement": 1.0,
                       "single_latency_s": 2.0, "party_bytes_sent_per_image": 2e5}}
    ran, given = [], {}

    def run_protocol(name, plan, out_dir, **_):
        ran.append((name, Path(out_dir)))
        return {"accuracy": 0.875, "costs": dict(costs), **{"he_inference": he, "mpc_inference": mpc}.get(name, {})}

    def run_experiment(name, target, *, quick, seed, progress, runs):
        given[name] = runs
        if name == "dp":
            raise RuntimeError("boom")
        progress("halfway")
        return [row(name, "fedavg", "aggregator", {"psnr_db": 20.0}, {"psnr_db": 10.0}, figure="fig.png")]

    monkeypatch.setattr(securecollab.runs, "run_protocol", run_protocol)
    monkeypatch.setattr(experiments.registry, "run_experiment", run_experiment)
    res = CliRunner().invoke(app, ["demo", "--quick", "--attacks", "dp,gradient_inversion", "--out", str(tmp_path)])
    assert res.exit_code == 1, res.output
    assert ran == [(n, tmp_path / "runs" / n) for n in pipeline.DEMO_PROTOCOLS]
    assert list(given) == ["gradient_inversion", "dp"]  # the demo's order
    assert given["dp"] == {n: tmp_path / "runs" / n for n in pipeline.DEMO_PROTOCOLS}
    card = json.loads((tmp_path / "scorecard.json").read_text())
    assert set(card["protocols"]) == set(pipeline.DEMO_PROTOCOLS)
    assert card["plan"]["rounds"] == 5  # --quick
    assert [a["figure"] for a in card["attacks"]] == ["attacks/gradient_inversion/fig.png"]
    assert [(e["experiment"], e["error"]) for e in card["attack_errors"]] == [("dp", "RuntimeError: boom")]
    for line in ("done centralized training (baseline): accuracy 0.875, 1.5s", "whole test set, batched", "max |logit error|",
                 "done attack experiment gradient_inversion: 1 rows", "failed dp: boom", "securecollab scorecard",
                 "what each adversary learned", "attack experiments failed: dp", "model-private inference (convnet"):
        assert line in res.output, line


@pytest.mark.parametrize("args, says", [
    (["--robust", "fltrust", "--norm-bound", "1"], "do not combine"),
    (["--norm-mode", "sideways", "--norm-bound", "1"], "norm_mode"),
    (["--protocol", "split", "--norm-bound", "1"], "DP-SGD, malicious clients"),
    (["--malicious", 'client-9={"behaviour": "scale"}'], "CLIENT one of"),
    (["--malicious", 'client-0={"behaviour": "bribe"}'], "unknown malicious behaviour"),
])
def test_train_refuses_a_bad_defence_or_malicious_client_before_running(tmp_path, args, says):
    out = securecollab("train", "--out", str(tmp_path), *args)
    assert out.returncode == 2, out.stderr
    assert says in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "plan.json").exists()


@pytest.mark.slow
def test_train_clips_a_malicious_clients_update_at_the_plain_aggregator(tmp_path):
    """`train` with a defence and a malicious client: the plan the aggregator ran says clip, and the
    model survives a client that scales its update 1000x. Measured with these settings: honest 0.92, this 0.85,
    the same client without the clip 0.10."""
    out = securecollab("train", "--protocol", "fedavg", "--rounds", "2", "--out", str(tmp_path),
                       "--norm-bound", "2", "--norm-mode", "clip",
                       "--malicious", 'client-0={"behaviour": "scale", "factor": 1000}')
    assert out.returncode == 0, out.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert (plan["norm_bound"], plan["norm_mode"]) == (2, "clip")
    assert json.loads(out.stdout)["accuracy"] > 0.7


def test_infer_mpc_needs_every_party_and_says_which_is_unreachable(tmp_path):
    out = securecollab("infer", "--protocol", "mpc", "--certs", str(tmp_path))
    assert out.returncode == 2 and "--party-target" in out.stderr
    securecollab("certs", "--out", str(tmp_path), "client-0")
    out = securecollab("infer", "--protocol", "mpc", "--party-target", "localhost:1", "--certs", str(tmp_path),
                       "--connect-timeout", "1")
    assert out.returncode == 1 and "compute party at localhost:1" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_mpc_owner_then_infer_on_running_parties(tmp_path):
    """`serve mpc` parties and their dealer; a client before the owner uploaded is told so; then the owner
    uploads and the client's label-only answers are the test images' classes (mostly)."""
    from securecollab.launch import ProcessGroup, ensure_certs
    from securecollab.plans import MpcInferencePlan
    from securecollab.runs.mpc_inference import start_parties
    plan = MpcInferencePlan(model="mlp", output="label")
    certs = ensure_certs(tmp_path / "certs", ["party-0", "party-1", "party-2", "dealer", "owner", "client-0"])
    with ProcessGroup(tmp_path / "logs") as group:
        targets = [a for t in start_parties(group, plan, certs, tmp_path) for a in ("--party-target", t)]
        infer = ["infer", "--protocol", "mpc", *targets, "--certs", str(certs), "--count", "40", "--batch"]
        out = securecollab(*infer)
        assert out.returncode == 1 and "no model yet" in out.stderr
        out = securecollab("client", "mpc-owner", *targets, "--certs", str(certs))
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.splitlines()[-1])["output"] == "label"
        out = securecollab(*infer, "--out", str(tmp_path / "client"))
        assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "client" / "infer_client-0.json").read_text())
    assert result["output"] == "label" and "logits" not in result and len(result["predictions"]) == 40
    assert result["accuracy"] > 0.8


@pytest.mark.slow
def test_bench_mpc_inference_writes_the_documented_json(tmp_path):
    path = tmp_path / "bench.json"
    out = securecollab("bench", "mpc-inference", "--model", "mlp", "--output", "label", "--queries", "3", "--no-he",
                       "--out", str(path))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(path.read_text())
    m = r["mpc"]["label"]
    assert m["argmax_agreement"] >= 0.995 and m["latency_s"] > 0 and m["throughput_per_s"] > 0
    assert m["query_bytes"] > 0 and all(v > 0 for k, v in m["party_bytes_sent_per_image_batched"].items()
                                        if k.startswith("party"))
    assert r["plain"]["latency_s"] > 0 and "he" not in r and "MPC," in out.stdout
