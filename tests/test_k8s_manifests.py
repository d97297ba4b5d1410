"""Offline checks of the Kubernetes manifests in deploy/k8s/.

Each document is validated against the Kubernetes OpenAPI schemas bundled with
kubernetes-validate (strict: unknown fields fail), then checked for what the
schema cannot know: one image, mTLS health probes, stable party names that
match the certificates, one plan everywhere, Secrets that are documented.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

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
    """serve <role> -> role; client/infer commands -> 'client'."""
    assert words[0] == "securecollab", words
    if words[1] == "serve":
        return words[2]
    assert words[1] in ("client", "infer"), words
    return "client"


def _headless() -> tuple[dict, dict]:
    sts = _one("StatefulSet", "party")
    return sts, _one("Service", sts["spec"]["serviceName"])


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
                       ("Job", "split"), ("Service", "split"), ("Job", "split-clients")]:
        _one(kind, name)


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
        certs = _value(serve, "--certs")
        # The server's own certificate; a party's pod name is its id (party-N).
        own_id = "$POD_NAME" if w["kind"] == "StatefulSet" else _value(serve, "--id") or serve[2]
        for probe in _probes(c):
            # Built-in grpc/http/tcp probes cannot present a client certificate.
            assert set(probe) & {"grpc", "httpGet", "tcpSocket"} == set(), where
            words = _tokens(probe["exec"]["command"])
            assert words[:2] == ["securecollab", "health"], where
            assert _value(words, "--target") == f"localhost:{GRPC_PORT}", where
            assert _value(words, "--certs") == certs, where
            assert _value(words, "--id") == own_id, where
            assert probe.get("timeoutSeconds", 1) >= 5, f"{where}: one probe starts a Python process"


def test_parties_have_stable_names_and_indices():
    sts, svc = _headless()
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
    assert words[:3] == ["securecollab", "serve", "party"]
    assert _value(words, "--index") == "${POD_NAME##*-}"  # party-2 -> 2
    assert _value(words, "--id") is None  # default party-<index>, the certificate id


def test_mpc_rendezvous_is_party_0():
    sts, svc = _headless()
    (party,) = sts["spec"]["template"]["spec"]["containers"]
    mpc_port = {p["name"]: p["containerPort"] for p in party["ports"]}["mpc"]
    users = [c for _, _, c in _all_containers() if _value(_argv(c), "--mpc-addr")]
    assert {_role(_argv(c)) for c in users} == {"party", "dealer"}
    for c in users:
        words = _argv(c)
        assert _value(words, "--mpc-addr") == f"party-0.{svc['metadata']['name']}"
        assert _value(words, "--mpc-port") == str(mpc_port)


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
