"""Offline checks of the Kubernetes manifests in deploy/k8s/.

Each document is validated against the Kubernetes OpenAPI schemas bundled with
kubernetes-validate (strict: unknown fields fail), then checked for what the
schema cannot know: every command line parses with the real CLI, one image,
mTLS health probes, stable party names that match the certificates, one plan
everywhere, two MPC worlds (secure aggregation; model-private inference) kept
apart, Secrets that are documented.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import typer
import yaml

from securecollab.cli import app as cli_app

K8S_DIR = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
K8S_VERSION = "1.30.0"  # a schema version bundled with kubernetes-validate
IMAGE = "securecollab:latest"
GRPC_PORT = 50051
PLAN_FLAGS = ("--clients", "--rounds", "--local-epochs", "--norm-bound")


def _load() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


DOCS = _load()
README = (K8S_DIR / "README.md").read_text()
COMPOSE = yaml.safe_load((K8S_DIR.parent / "docker-compose.yml").read_text())


def _find(kind: str, name: str | None = None) -> list[dict]:
    return [d for _, d in DOCS if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def _one(kind: str, name: str) -> dict:
    found = _find(kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _workloads() -> list[tuple[dict, dict]]:
    """(workload, pod template) for every object that makes pods."""
    return [(d, d["spec"]["template"]) for _, d in DOCS if d["kind"] in ("Deployment", "StatefulSet", "Job")]


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return spec["containers"] + spec.get("initContainers", [])


def _all_containers() -> list[tuple[dict, dict, dict]]:
    return [(w, t, c) for w, t in _workloads() for c in _containers(t)]


def _tokens(argv: list[str]) -> list[str]:
    """A command line as words; `sh -c SCRIPT` is split as the shell would (no expansion)."""
    if argv[:2] == ["sh", "-c"]:
        words = shlex.split(argv[2])
        return words[1:] if words[:1] == ["exec"] else words
    return argv


def _argv(container: dict) -> list[str]:
    """What the container runs; without `command` the image's ENTRYPOINT (securecollab) comes first."""
    if "command" in container:
        return _tokens(container["command"] + container.get("args", []))
    return ["securecollab", *container.get("args", [])]


def _values(words: list[str], flag: str) -> list[str]:
    return [words[i + 1] for i, w in enumerate(words[:-1]) if w == flag]


def _value(words: list[str], flag: str) -> str | None:
    vals = _values(words, flag)
    assert len(vals) <= 1, f"{flag} given {len(vals)} times in {words}"
    return vals[0] if vals else None


def _role(words: list[str]) -> str:
    """The role of the certificate a command runs with: serve <role> -> role (`serve mpc`, an inference
    compute party: party); `client mpc-owner` -> owner; other client/infer commands -> 'client'."""
    assert words[0] == "securecollab", words
    if words[1] == "serve":
        return {"mpc": "party"}.get(words[2], words[2])
    assert words[1] in ("client", "infer"), words
    return "owner" if words[1:3] == ["client", "mpc-owner"] else "client"


def _headless(name: str = "party") -> tuple[dict, dict]:
    sts = _one("StatefulSet", name)
    return sts, _one("Service", sts["spec"]["serviceName"])


# The shell expansions the manifests use, as a pod of `workload` (ordinal 0) would see them.
def _expand(words: list[str], workload: str) -> list[str]:
    env = {"${POD_NAME##*-}": "0", "$POD_NAME": f"{workload}-0", "$JOB_COMPLETION_INDEX": "0"}
    for var, value in env.items():
        words = [w.replace(var, value) for w in words]
    return words


_CLI = typer.main.get_command(cli_app)


def _compose_command(service: dict) -> list[str]:
    """A compose service's command line, `securecollab ...` (the image's ENTRYPOINT), variables at their
    defaults."""
    cmd = service["command"]
    words = shlex.split(cmd) if isinstance(cmd, str) else list(cmd)
    words = [re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", w) for w in words]
    if (service.get("entrypoint") or [None])[0] == "claim-slot":  # it appends the slot it claims
        words += ["--id", "client-0", "--index", "0"]
    return words if words[0] == "securecollab" else ["securecollab", *words]


def _parse_cli(words: list[str]) -> tuple[list[str], dict]:
    """Parse `securecollab ...` with the real command line (types, ranges, required options, unknown
    flags fail) without running it: (sub-command path, its parameters)."""
    assert words[0] == "securecollab", words
    args = list(words[1:])
    command, ctx, path = _CLI, _CLI.make_context("securecollab", list(args), resilient_parsing=True), []
    while hasattr(command, "get_command"):  # a group: the next word names the sub-command
        name, args = args[0], args[1:]
        sub = command.get_command(ctx, name)
        assert sub is not None, f"no command `securecollab {' '.join([*path, name])}`"
        path.append(name)
        ctx, command = sub.make_context(name, list(args), parent=ctx), sub
    return path, ctx.params


def _probes(container: dict) -> list[dict]:
    return [container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in container]


def _secret_names(template: dict) -> list[str]:
    names = []
    for vol in template["spec"].get("volumes", []):
        if "secret" in vol:
            names.append(vol["secret"]["secretName"])
        for src in vol.get("projected", {}).get("sources", []):
            if "secret" in src:
                names.append(src["secret"]["name"])
    return names


def test_expected_objects_present():
    for kind, name in [("Namespace", "securecollab"), ("StatefulSet", "party"), ("Service", "parties"),
                       ("Deployment", "dealer"), ("Job", "coordinator"), ("Service", "coordinator"),
                       ("Job", "clients"), ("Deployment", "he"), ("Service", "he"),
                       ("Job", "split"), ("Service", "split"), ("Job", "split-clients"),
                       ("StatefulSet", "infer-party"), ("Service", "infer-parties"),
                       ("Deployment", "infer-dealer"), ("Service", "infer-dealer"),
                       ("Job", "mpc-owner"), ("Job", "mpc-client"),
                       ("NetworkPolicy", "infer-party-ingress"), ("NetworkPolicy", "infer-dealer-ingress")]:
        _one(kind, name)


def _command_lines() -> list[tuple[str, list[str]]]:
    """(where, `securecollab ...` words) of every container and probe in the manifests, and of every
    service and health check in deploy/docker-compose.yml (the one-shot `certs` shell script aside)."""
    lines = []
    for w, _t, c in _all_containers():
        where = f"k8s:{w['metadata']['name']}/{c['name']}"
        lines.append((where, _expand(_argv(c), w["metadata"]["name"])))
        for probe in _probes(c):
            lines.append((f"{where}:probe", _expand(_tokens(probe["exec"]["command"]), w["metadata"]["name"])))
    for name, service in COMPOSE["services"].items():
        if name != "certs":
            lines.append((f"compose:{name}", _compose_command(service)))
        if "healthcheck" in service:
            lines.append((f"compose:{name}:health", service["healthcheck"]["test"][1:]))  # after "CMD"
    return list({where: words for where, words in lines}.items())  # a probe repeated: checked once


@pytest.mark.parametrize("words", [w for _, w in _command_lines()], ids=[where for where, _ in _command_lines()])
def test_command_lines_parse_with_the_real_cli(words):
    """Every command line is a valid `securecollab` one: known sub-command and options, values of the
    right type and range, required options given (parsed by the real CLI, not run)."""
    path, _params = _parse_cli(words)
    assert path, words


@pytest.mark.parametrize("doc", [d for _, d in DOCS],
                         ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCS])
def test_schema(doc):
    assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.30"
    if doc["kind"] != "Namespace":
        assert doc["metadata"].get("namespace") == "securecollab"


def test_one_image_everywhere():
    for w, _, c in _all_containers():
        assert c["image"] == IMAGE, f"{w['metadata']['name']}/{c['name']}"


def test_probes_are_mtls_health_execs():
    for w, _t, c in _all_containers():
        where = f"{w['metadata']['name']}/{c['name']}"
        if any(p.get("name") == "grpc" for p in c.get("ports", [])):
            assert "startupProbe" in c or "readinessProbe" in c, f"{where}: a gRPC server needs a probe"
        if not _probes(c):
            continue
        serve = _argv(c)
        assert serve[1] == "serve", where
        # the server's own port (the control port 50051; the dealer's 29700), one of its containerPorts
        port = int(_value(serve, "--port"))
        assert port in {p["containerPort"] for p in c.get("ports", [])}, where
        certs = _value(serve, "--certs")
        # The server's own certificate. A StatefulSet's compute party is party-<ordinal>: the pod name for
        # secure aggregation's `party-N`, built from the ordinal for the inference parties `infer-party-N`.
        if w["kind"] == "StatefulSet":
            own_id = "$POD_NAME" if w["metadata"]["name"] == "party" else "party-${POD_NAME##*-}"
        else:
            own_id = _value(serve, "--id") or serve[2]
        for probe in _probes(c):
            # Built-in grpc/http/tcp probes cannot present a client certificate.
            assert set(probe) & {"grpc", "httpGet", "tcpSocket"} == set(), where
            words = _tokens(probe["exec"]["command"])
            assert words[:2] == ["securecollab", "health"], where
            assert _value(words, "--target") == f"localhost:{port}", where
            assert _value(words, "--certs") == certs, where
            assert _value(words, "--id") == own_id, where
            assert probe.get("timeoutSeconds", 1) >= 5, f"{where}: one probe starts a Python process"


@pytest.mark.parametrize("name,role", [("party", "party"), ("infer-party", "mpc")])
def test_parties_have_stable_names_and_indices(name, role):
    sts, svc = _headless(name)
    spec, template = sts["spec"], sts["spec"]["template"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert spec["podManagementPolicy"] == "Parallel"
    assert spec.get("template", {}).get("spec", {}).get("restartPolicy", "Always") == "Always"
    (c,) = template["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    words = _argv(c)
    assert words[:3] == ["securecollab", "serve", role]
    assert _value(words, "--index") == "${POD_NAME##*-}"  # party-2 -> 2 (infer-party-2 -> 2)
    assert _value(words, "--id") is None  # default party-<index>, the certificate id


def _party_names(svc: dict, port: int | str, pod: str = "party") -> list[str]:
    """What a target may be for each party: <pod>-<i>.<svc>, optionally fully qualified, at `port`."""
    name = re.escape(svc["metadata"]["name"])
    return [rf"{re.escape(pod)}-{i}\.{name}(\.securecollab(\.svc(\.[a-z0-9.-]+)?)?)?:{port}" for i in range(3)]


def _dealer(name: str = "dealer") -> tuple[dict, dict, dict]:
    """(Deployment, its container, the Service in front of it)."""
    dep = _one("Deployment", name)
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    (svc,) = [s for s in _find("Service") if s["spec"]["selector"].items() <= labels.items()]
    return dep, c, svc


def test_mpc_is_grpc_with_mutual_tls_not_gloo():
    """Every MPC role runs the grpc transport (the default; one value for all): no gloo rendezvous flags."""
    transports = set()
    for w, _, c in _all_containers():
        words = _argv(c)
        for flag in ("--mpc-addr", "--mpc-port"):  # gloo only (insecure)
            assert _value(words, flag) is None, f"{w['metadata']['name']}: {flag} is the insecure gloo transport"
        if words[1] == "serve" and words[2] in ("party", "dealer", "coordinator"):
            transports.add(_value(words, "--mpc-transport") or "grpc")
    assert transports == {"grpc"}


def test_every_party_reaches_every_peers_mpc_endpoint():
    sts, svc = _headless()
    (party,) = sts["spec"]["template"]["spec"]["containers"]
    mpc_port = {p["name"]: p["containerPort"] for p in party["ports"]}["mpc"]
    assert mpc_port != GRPC_PORT
    svc_ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    assert svc_ports["mpc"] == mpc_port and svc_ports["grpc"] == GRPC_PORT
    words = _argv(party)
    peers = _values(words, "--mpc-peer")
    replicas = sts["spec"]["replicas"]
    assert len(peers) == replicas == int(_value(words, "--compute-parties") or 3)
    # in index order; a party serves its endpoint at its own entry's port, checked as party-<i>
    for pattern, peer in zip(_party_names(svc, mpc_port), peers):
        assert re.fullmatch(pattern, peer), peer


def test_parties_reach_the_dealer_service():
    sts, _svc = _headless()
    (party,) = sts["spec"]["template"]["spec"]["containers"]
    words = _argv(party)
    dep, dealer, svc = _dealer()
    serve = _argv(dealer)
    assert serve[:3] == ["securecollab", "serve", "dealer"]
    assert _value(serve, "--port") == "29700"
    assert _value(serve, "--id") is None  # default: dealer, the certificate id the parties check
    assert {p["name"]: p["containerPort"] for p in dealer["ports"]} == {"dealer": 29700}
    # the Service name is the dealer's certificate id: parties check the TLS name `dealer`
    assert svc["metadata"]["name"] == "dealer"
    assert [p["port"] for p in svc["spec"]["ports"]] == [29700]
    assert dep["spec"]["replicas"] == 1  # one dealer: each party's seed for a world is dealt once
    if float(_value(words, "--norm-bound") or 0) > 0:
        assert _value(words, "--dealer") == "dealer:29700"


def _selects(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions; {} selects everything)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


ANYONE = "<outside the namespace or any pod>"


def _covers(rule_port: dict, port: int, container_ports: dict) -> bool:
    """Whether a NetworkPolicy port entry admits TCP `port` (a named port is the container's)."""
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    if "port" not in rule_port:
        return True  # every port
    first = container_ports.get(rule_port["port"], rule_port["port"])
    return first <= port <= rule_port.get("endPort", first)


def _admitted(template: dict, port: int) -> set[str]:
    """Who the NetworkPolicies let connect to `port` of a pod made from `template`: the
    app.kubernetes.io/name of each workload, or ANYONE."""
    labels = template["metadata"]["labels"]
    container_ports = {p.get("name"): p["containerPort"] for c in _containers(template) for p in c.get("ports", [])}
    policies = [p["spec"] for p in _find("NetworkPolicy")
                if _selects(p["spec"]["podSelector"], labels) and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not policies:
        return {ANYONE}
    pods = {t["metadata"]["labels"]["app.kubernetes.io/name"]: t["metadata"]["labels"] for _, t in _workloads()}
    admitted: set[str] = set()
    for policy in policies:
        for rule in policy.get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(_covers(p, port, container_ports) for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return {ANYONE}
            for peer in peers:
                if set(peer) != {"podSelector"}:  # namespaceSelector or ipBlock: beyond this namespace
                    return {ANYONE}
                admitted |= {name for name, pod_labels in pods.items() if _selects(peer["podSelector"], pod_labels)}
    return admitted


def test_network_policy_keeps_mpc_ports_to_parties_and_dealer():
    """Only compute parties and the dealer may connect to the parties' MPC endpoints (29600) and the
    dealer (29700); coordinator and clients reach only the parties' control port."""
    party = _one("StatefulSet", "party")["spec"]["template"]
    dealer = _one("Deployment", "dealer")["spec"]["template"]
    mpc = {"party", "dealer"}
    for template, port in ((party, 29600), (dealer, 29700)):
        who = _admitted(template, port)
        assert ANYONE not in who and who <= mpc, f"port {port}: admits {who}"
        assert "party" in who, f"port {port}: the parties must reach it"
    assert {"coordinator", "client"} <= _admitted(party, GRPC_PORT)
    assert not _admitted(dealer, GRPC_PORT)  # nothing but its own port


def test_no_pod_admits_traffic_from_outside_the_namespace():
    for w, t in _workloads():
        for port in {p["containerPort"] for c in _containers(t) for p in c.get("ports", [])}:
            assert ANYONE not in _admitted(t, port), f"{w['metadata']['name']}:{port}"


def test_compose_runs_mpc_over_grpc_on_its_own_network():
    """deploy/docker-compose.yml: the same transport, with MPC traffic on an internal network that only
    the parties and the dealer join (the dealer on nothing else)."""
    compose = yaml.safe_load((K8S_DIR.parent / "docker-compose.yml").read_text())
    services = compose["services"]

    def networks(name: str) -> set[str]:
        nets = services[name].get("networks", ["default"])
        return set(nets)

    internal = {n for n, spec in compose["networks"].items() if (spec or {}).get("internal")}
    (mpc_net,) = networks("dealer") & internal
    assert {n for n in services if mpc_net in networks(n)} == {"party-0", "party-1", "party-2", "dealer"}
    assert networks("dealer") == {mpc_net}
    aliases = {}
    for i in range(3):
        name = f"party-{i}"
        assert "default" in networks(name)  # coordinator and clients
        nets = services[name]["networks"]
        aliases[i] = {name, *((nets.get(mpc_net) or {}).get("aliases", []) if isinstance(nets, dict) else [])}
    dealer_words = shlex.split(services["dealer"]["command"])
    assert dealer_words[:2] == ["serve", "dealer"] and _value(dealer_words, "--port") == "29700"
    for i in range(3):
        words = shlex.split(services[f"party-{i}"]["command"])
        assert _value(words, "--mpc-addr") is None and _value(words, "--mpc-port") is None
        assert (_value(words, "--mpc-transport") or "grpc") == "grpc"
        peers = _values(words, "--mpc-peer")
        assert len(peers) == 3
        for j, peer in enumerate(peers):
            host, port = peer.rsplit(":", 1)
            assert host in aliases[j] and port == "29600", peer
        assert _value(words, "--dealer") == "dealer:29700"
    health = services["dealer"]["healthcheck"]["test"]
    assert health[1:3] == ["securecollab", "health"] and _value(health, "--target") == "localhost:29700"


def test_compose_model_private_inference_is_its_own_mpc_world():
    """deploy/docker-compose.yml: infer-party-0..2 and infer-dealer on their own internal network (not
    secure aggregation's), the inference port on the default network, names the certificates carry."""
    compose = yaml.safe_load((K8S_DIR.parent / "docker-compose.yml").read_text())
    services = compose["services"]

    def networks(name: str) -> set[str]:
        return set(services[name].get("networks", ["default"]))

    internal = {n for n, spec in compose["networks"].items() if (spec or {}).get("internal")}
    (infer_net,) = networks("infer-dealer") & internal
    (secagg_net,) = networks("dealer") & internal
    assert infer_net != secagg_net
    parties = [f"infer-party-{i}" for i in range(3)]
    assert {n for n in services if infer_net in networks(n)} == {*parties, "infer-dealer"}
    assert networks("infer-dealer") == {infer_net}
    # the certs service gives each party-N certificate the name infer-party-N (owner and client dial it)
    certs = " ".join(services["certs"]["command"])
    assert re.search(r"securecollab certs --out /certs [^&]*\bowner\b", certs), certs
    assert "--host infer-party-$$i party-$$i" in certs and "for i in 0 1 2" in certs, certs
    dealer = _compose_command(services["infer-dealer"])
    assert _parse_cli(dealer)[0] == ["serve", "dealer"]
    assert _value(dealer, "--port") == "29700" and _value(dealer, "--id") is None  # certificate `dealer`
    for i, name in enumerate(parties):
        assert networks(name) == {"default", infer_net}
        aliases = {name, *(services[name]["networks"][infer_net] or {}).get("aliases", [])}
        assert services[name]["restart"] == "unless-stopped"  # exits 75 to be started again
        words = _compose_command(services[name])
        path, params = _parse_cli(words)
        assert path == ["serve", "mpc"] and params["index"] == i and params["port"] == GRPC_PORT
        assert params["party_id"] is None and params["compute_parties"] == 3
        assert params["mpc_host"] in aliases - {name}  # the MPC endpoint binds on infer_net only
        assert [p.rsplit(":", 1)[0] for p in params["mpc_peer"]] == [
            (services[p]["networks"][infer_net] or {}).get("aliases", [p])[0] for p in parties]
        assert all(p.endswith(":29600") for p in params["mpc_peer"])
        assert params["dealer"] == "infer-dealer:29700"
        health = services[name]["healthcheck"]["test"]
        assert _value(health, "--id") == f"party-{i}" and _value(health, "--server-name") == f"party-{i}"
        assert services[name]["depends_on"]["infer-dealer"] == {"condition": "service_healthy"}
    targets = [f"{p}:{GRPC_PORT}" for p in parties]
    owner = _parse_cli(_compose_command(services["mpc-owner"]))
    assert owner[0] == ["client", "mpc-owner"] and owner[1]["party_target"] == targets
    assert owner[1]["out"] is None  # the plain weights stay out of the volume the parties mount
    path, client = _parse_cli(_compose_command(services["mpc-client"]))
    assert path == ["infer"] and client["protocol"] == "mpc" and client["party_target"] == targets
    assert client["batch"] and str(client["out"]) == "/results/mpc"
    assert services["mpc-client"]["depends_on"]["mpc-owner"] == {"condition": "service_completed_successfully"}


def test_inference_world():
    """Model-private inference: 3 parties (StatefulSet infer-party) that reach each other's MPC endpoints
    by their stable names, their own dealer, and an owner and a client that target every party in order."""
    sts, svc = _headless("infer-party")
    (party,) = sts["spec"]["template"]["spec"]["containers"]
    mpc_port = {p["name"]: p["containerPort"] for p in party["ports"]}["mpc"]
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": GRPC_PORT, "mpc": mpc_port}
    path, params = _parse_cli(_expand(_argv(party), "infer-party"))
    assert path == ["serve", "mpc"] and params["port"] == GRPC_PORT
    replicas = sts["spec"]["replicas"]
    assert len(params["mpc_peer"]) == replicas == params["compute_parties"] == 3
    for pattern, peer in zip(_party_names(svc, mpc_port, "infer-party"), params["mpc_peer"]):
        assert re.fullmatch(pattern, peer), peer
    # its own dealer, not secure aggregation's (one dealer per MPC world)
    dep, dealer, dealer_svc = _dealer("infer-dealer")
    assert params["dealer"] == f"{dealer_svc['metadata']['name']}:29700" != "dealer:29700"
    assert dep["spec"]["replicas"] == 1
    dealer_path, dealer_params = _parse_cli(_argv(dealer))
    assert dealer_path == ["serve", "dealer"] and dealer_params["port"] == 29700
    assert dealer_params["party_id"] is None  # default: dealer, the certificate id the parties check
    assert dealer_params["compute_parties"] == params["compute_parties"]
    assert [p["port"] for p in dealer_svc["spec"]["ports"]] == [29700]
    targets = _party_names(svc, GRPC_PORT, "infer-party")
    for job, command in (("mpc-owner", ["client", "mpc-owner"]), ("mpc-client", ["infer"])):
        (c,) = _one("Job", job)["spec"]["template"]["spec"]["containers"]
        path, p = _parse_cli(_argv(c))
        assert path == command, job
        assert len(p["party_target"]) == replicas, job
        for pattern, target in zip(targets, p["party_target"]):
            assert re.fullmatch(pattern, target), target
    (owner,) = _one("Job", "mpc-owner")["spec"]["template"]["spec"]["containers"]
    assert _parse_cli(_argv(owner))[1]["party_id"] == "owner" and _value(_argv(owner), "--out") is None
    (client,) = _one("Job", "mpc-client")["spec"]["template"]["spec"]["containers"]
    p = _parse_cli(_argv(client))[1]
    assert p["protocol"] == "mpc" and p["batch"] and str(p["out"]).startswith("/results/")


def test_network_policy_keeps_the_two_mpc_worlds_apart():
    """The inference parties' MPC endpoint and their dealer admit inference parties only; secure
    aggregation's MPC ports admit no inference party; the owner and clients reach the inference port."""
    infer_party = _one("StatefulSet", "infer-party")["spec"]["template"]
    infer_dealer = _one("Deployment", "infer-dealer")["spec"]["template"]
    for template, port in ((infer_party, 29600), (infer_dealer, 29700)):
        assert _admitted(template, port) == {"infer-party"}, f"port {port}"
    assert {"mpc-owner", "mpc-client"} <= _admitted(infer_party, GRPC_PORT)
    assert not _admitted(infer_dealer, GRPC_PORT)
    party = _one("StatefulSet", "party")["spec"]["template"]
    dealer = _one("Deployment", "dealer")["spec"]["template"]
    for template, port in ((party, 29600), (dealer, 29700)):
        assert "infer-party" not in _admitted(template, port), f"port {port}"


def test_coordinator_targets_every_party_in_order():
    sts, svc = _headless()
    (c,) = _one("Job", "coordinator")["spec"]["template"]["spec"]["containers"]
    words = _argv(c)
    targets = _values(words, "--party-target")
    replicas = sts["spec"]["replicas"]
    assert len(targets) == replicas == int(_value(words, "--compute-parties") or 3)
    name = re.escape(svc["metadata"]["name"])
    for i, target in enumerate(targets):
        # party-<i>.<svc>, optionally fully qualified; the coordinator checks the cert as party-<i>
        assert re.fullmatch(rf"party-{i}\.{name}(\.securecollab(\.svc(\.[a-z0-9.-]+)?)?)?:{GRPC_PORT}", target), target


def test_one_plan_everywhere():
    plans = {}
    for w, _, c in _all_containers():
        words = _argv(c)
        if w["metadata"]["name"] == "infer-dealer":
            continue  # model-private inference's own dealer: no FedAvg plan (test_inference_world)
        if words[1] == "serve" and words[2] in ("party", "dealer", "coordinator"):
            plans[w["metadata"]["name"]] = tuple(_value(words, f) for f in PLAN_FLAGS)
    assert set(plans) == {"party", "dealer", "coordinator"}
    assert len(set(plans.values())) == 1, plans
    (split_server,) = _one("Job", "split")["spec"]["template"]["spec"]["containers"]
    sizes = {"clients": int(plans["coordinator"][0]), "split-clients": int(_value(_argv(split_server), "--clients"))}
    for job_name, n in sizes.items():
        job = _one("Job", job_name)["spec"]
        assert job["completionMode"] == "Indexed"
        assert job["completions"] == job["parallelism"] == n, job_name
        (c,) = job["template"]["spec"]["containers"]
        words = _argv(c)
        assert _value(words, "--id") == "client-$JOB_COMPLETION_INDEX"
        assert _value(words, "--index") == "$JOB_COMPLETION_INDEX"


def test_secrets_documented_and_not_shared_across_roles():
    documented = set(re.findall(r"securecollab-certs-[a-z0-9-]*[a-z0-9]", README))
    users: dict[str, set[str]] = {}
    for w, t in _workloads():
        roles = {_role(_argv(c)) for c in _containers(t)}
        for name in _secret_names(t):
            assert name in documented, f"{w['metadata']['name']} mounts undocumented Secret {name}"
            users.setdefault(name, set()).update(roles)
    assert users, "no workload mounts certificates"
    for name, roles in users.items():
        assert len(roles) == 1, f"{name} is mounted by roles {roles}: one Secret per party"


def test_no_key_material_in_manifests():
    for path in K8S_DIR.iterdir():
        assert "PRIVATE KEY" not in path.read_text(), path.name
    for secret in _find("Secret"):  # only empty placeholders may live here
        assert not any(secret.get(k) for k in ("data", "stringData")), secret["metadata"]["name"]


def test_service_ports_match_container_ports():
    for svc in _find("Service"):
        name, selector = svc["metadata"]["name"], svc["spec"]["selector"]
        pods = [t for _, t in _workloads() if selector.items() <= t["metadata"]["labels"].items()]
        assert pods, f"Service {name} selects no pods"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for t in pods:
                cports = [p for c in t["spec"]["containers"] for p in c.get("ports", [])]
                match = [p for p in cports if target in (p.get("name"), p["containerPort"])]
                assert match, f"Service {name} port {target}: no such containerPort"
                assert match[0]["containerPort"] == port["port"], f"Service {name}: port {port['port']}"


def test_locked_down_containers():
    for w, t, c in _all_containers():
        where = f"{w['metadata']['name']}/{c['name']}"
        pod_sc, sc = t["spec"].get("securityContext", {}), c.get("securityContext", {})
        assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, where
        # The image's USER is a name; the kubelet needs a numeric uid to verify non-root.
        assert sc.get("runAsUser", pod_sc.get("runAsUser")) == 10001, where
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        volumes = {v["name"]: v for v in t["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
        assert "emptyDir" in volumes[mounts["/tmp"]["name"]], f"{where}: /tmp must be writable"
        words = _argv(c)
        out = _value(words, "--out")
        if out:
            assert out.startswith("/results/") and not mounts["/results"].get("readOnly"), where
        certs = mounts[_value(words, "--certs")]
        assert certs["readOnly"] is True and "secret" in volumes[certs["name"]], where
        assert volumes[certs["name"]]["secret"].get("defaultMode", 0o644) & 0o007 == 0, f"{where}: keys world-readable"
        res = c["resources"]
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), f"{where}: {kind}"


def test_party_resources():
    (c,) = _one("StatefulSet", "party")["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["requests"] == {"cpu": "1", "memory": "2Gi"}


def test_each_inference_party_keeps_its_model_share_on_a_volume_of_its_own():
    """`serve mpc --state DIR`: a party started again (its world broke, its pod moved) reads its share back.
    DIR must be a volume only that party mounts: on the shared results volume every party could read the
    others' shares, and together they are the model."""
    sts = _one("StatefulSet", "infer-party")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    state = _value(_argv(container), "--state")
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == state]
    assert mount["name"] in {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates", [])}
    # and they go with it: left behind, the three claims together would hold the model
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"
    services = COMPOSE["services"]
    owners: dict[str, set[str]] = {}
    for name, service in services.items():
        for volume in service.get("volumes", []):
            owners.setdefault(volume.split(":")[0], set()).add(name)
    for i in range(3):
        service = services[f"infer-party-{i}"]
        state = _value(_compose_command(service), "--state")
        (volume,) = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == state]
        assert volume in COMPOSE["volumes"] and owners[volume] == {f"infer-party-{i}"}, (volume, owners[volume])
