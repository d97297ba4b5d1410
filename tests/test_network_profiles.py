"""Network profiles (securecollab.net.testbed): hosts in network namespaces on shaped veth links, built and torn
down whole; the benchmarks run their parties there."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from securecollab.net import testbed
from securecollab.net.testbed import PROFILES, NetworkUnavailable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")


def _leftovers(prefix: str) -> list[str]:
    """Namespaces, links and qdiscs of this host that carry the testbed's prefix."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line for line in (netns + links).splitlines() if prefix in line]


def _this_process_leftovers() -> list[str]:
    """Namespaces and links any testbed of this process made (its names: sc<pid><letter>-hub, -h<i>, h<i>a/b),
    not another process's whose pid begins with the same digits."""
    own = re.compile(rf"(?<![0-9])sc{os.getpid() % 100_000}[a-z](-hub|-h[0-9]|h[0-9])")
    return [line for line in _leftovers("sc") if own.search(line)]


def test_a_testbed_shapes_each_link_and_leaves_nothing_behind():
    bed = testbed.Testbed(PROFILES["uplink"], clients=["client-0"], servers=["server"], here="client-0")
    with bed as placement:
        assert placement.namespaces["client-0"] == ""  # this process's own namespace
        ns = placement.namespaces["server"]
        assert ns in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        server_up = subprocess.run(["tc", "-n", ns, "qdisc", "show"], capture_output=True, text=True).stdout
        downlinks = subprocess.run(["tc", "-n", bed.hub, "qdisc", "show"], capture_output=True, text=True).stdout
        assert "tbf" in server_up and "rate 1Gbit" in server_up
        assert "rate 100Mbit" in downlinks and "rate 1Gbit" in downlinks  # the client's and the server's
        # The server side listens in its namespace; this process, the client, sends 2.5 MB up its 20 Mbit/s link.
        listener = subprocess.Popen(placement.command("server", [sys.executable, "-c", (
            "import socket,sys\n"
            f"s=socket.create_server(('{placement.bind('server')}', 9555))\n"
            "print('up', flush=True)\n"
            "c,_=s.accept(); n=0\n"
            "while (b:=c.recv(1<<20)): n+=len(b)\n"
            "print(n, flush=True)\n")]), stdout=subprocess.PIPE, text=True)
        assert listener.stdout.readline().strip() == "up"
        t0 = time.perf_counter()
        with socket.create_connection((placement.address("server"), 9555), timeout=30) as conn:
            conn.sendall(b"x" * 2_500_000)
            conn.shutdown(socket.SHUT_WR)
            assert int(listener.stdout.readline()) == 2_500_000
        took = time.perf_counter() - t0
        listener.wait(timeout=10)
        # 20 Mbit/s is 2.5 MB/s: 2.5 MB cannot cross in less than ~1 s (loopback takes milliseconds)
        assert took > 0.8, f"2.5 MB crossed a 20 Mbit/s link in {took:.2f}s: not shaped"
        # and a host that is not on the testbed is named in a clear error
        with pytest.raises(KeyError, match="no host"):
            placement.address("nobody")
    assert _leftovers(bed.prefix) == []


def test_a_testbed_that_fails_half_built_is_torn_down(monkeypatch):
    calls = []
    real = testbed._shape

    def shape_then_fail(ns, dev, mbit):
        calls.append(dev)
        if len(calls) == 3:  # the second host's uplink
            raise NetworkUnavailable("tc refused (injected)")
        real(ns, dev, mbit)

    monkeypatch.setattr(testbed, "_shape", shape_then_fail)
    bed = testbed.Testbed(PROFILES["wan"], clients=["a", "b"], servers=["s"])
    with pytest.raises(NetworkUnavailable, match="injected"):
        with bed:
            pass
    assert len(calls) == 3 and _leftovers(bed.prefix) == []


def test_a_link_made_before_its_namespace_failed_is_deleted_too(monkeypatch):
    real = testbed._run

    def run(*cmd):
        if cmd[:3] == ("ip", "netns", "add") and cmd[3].endswith("-h3"):  # after the pair for host 3 was made
            raise NetworkUnavailable("netns refused (injected)")
        real(*cmd)

    monkeypatch.setattr(testbed, "_run", run)
    bed = testbed.Testbed(PROFILES["wan"], clients=["a", "b"], servers=["s"])
    with pytest.raises(NetworkUnavailable, match="injected"):
        with bed:
            pass
    assert _leftovers(bed.prefix) == []


def test_a_failure_inside_the_testbed_still_tears_it_down():
    bed = testbed.Testbed(PROFILES["lan"], clients=["a"], servers=["s"], here="a")
    with pytest.raises(RuntimeError, match="boom"):
        with bed:
            assert _leftovers(bed.prefix)
            raise RuntimeError("boom")
    assert _leftovers(bed.prefix) == []


def test_without_root_the_benchmark_refuses_clearly(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from securecollab.cli import app
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(app, ["bench", "split", "--network", "wan", "--out", str(tmp_path / "x.json")])
    assert result.exit_code == 2, result.output
    assert "needs root" in result.output and not (tmp_path / "x.json").exists()
    result = CliRunner().invoke(app, ["bench", "he", "--network", "moon"])
    assert result.exit_code == 2 and "--network is one of loopback, lan, wan, uplink" in result.output


def test_bench_secagg_on_the_lan_profile_runs_every_party_on_its_own_host(tmp_path):
    from securecollab.bench.secagg import bench_secagg
    seen = []

    def log(msg):
        seen.append(str(msg))
    r = bench_secagg(3, 20_000, rounds=1, warmup=0, work_dir=tmp_path, network="lan", transports=("grpc", "gloo"),
                     log=log)
    assert r["network"]["profile"] == "lan" and r["network"]["emulated_delay"] is False
    assert list(r["by_transport"]) == ["grpc"]  # gloo binds loopback only: left out, and said so
    assert any("gloo left out" in m for m in seen)
    assert r["max_abs_error"] < 1e-3 and r["ratio"]["upload_bytes"] < 2.05
    assert r["latency_model"]["secure"]["round_trips_per_step"] >= 4
    assert r["ratio"]["round_wall_with_rtt"] > 0
    # the certificates name the testbed's addresses (the servers bound those, not loopback)
    from cryptography import x509
    cert = x509.load_pem_x509_certificate((tmp_path / "certs" / "coordinator.pem").read_bytes())
    ips = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress)
    assert any(str(ip).startswith("10.") for ip in ips)
    assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                if n.startswith(f"sc{os.getpid() % 100_000}")]


def test_bench_split_cli_on_the_uplink_profile(tmp_path):
    out = tmp_path / "split.json"
    proc = subprocess.run([sys.executable, "-m", "securecollab", "bench", "split", "--model", "mlp", "--epochs", "1",
                           "--network", "uplink", "--out", str(out)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads(out.read_text())
    assert r["network"]["profile"] == "uplink" and r["network"]["client_link_mbit"] == {"up": 20, "down": 100}
    assert r["split"]["accuracy"] == pytest.approx(r["centralized"]["accuracy"], abs=1e-6)
    assert r["latency_model"]["steps_per_epoch"] > 0 and r["ratio"]["epoch_wall_with_rtt"] > r["ratio"]["epoch_wall"]
    assert "network uplink" in " ".join(proc.stderr.split())  # progress and notes go to stderr


def test_bench_mpc_inference_on_the_lan_profile_runs_each_party_and_the_dealer_on_its_own_host(tmp_path):
    from cryptography import x509

    from securecollab.bench.mpc_inference import bench_mpc_inference
    from securecollab.plans import MpcInferencePlan
    r = bench_mpc_inference(MpcInferencePlan(model="mlp", epochs=5), outputs=("label",), queries=2, he=False,
                            work_dir=tmp_path, network="lan", log=lambda _m: None)
    m = r["mpc"]["label"]
    assert r["network"]["profile"] == "lan" and r["network"]["emulated_delay"] is False
    assert m["argmax_agreement"] >= 0.97 and m["latency_s"] > 0
    # a query's round trips: the client's call, the parties' MPC rounds and requests to the dealer (dozens)
    assert m["mpc_round_trips_per_single_query"] > 10
    assert m["latency_model"]["round_trips_per_step"] == 1 + m["mpc_round_trips_per_single_query"]
    assert m["latency_with_rtt_s"] == pytest.approx(m["latency_s"] + m["latency_model"]["added_s_per_step"])
    # the client reached each party at its own testbed address, with certificates naming those addresses
    hosts = [t.rsplit(":", 1)[0] for t in m["party_targets"]]
    assert len(set(hosts)) == 3 and all(h.startswith("10.") for h in hosts), hosts
    for party in ("party-0", "dealer"):
        cert = x509.load_pem_x509_certificate((tmp_path / "label" / "certs" / f"{party}.pem").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert any(str(ip).startswith("10.") for ip in san.get_values_for_type(x509.IPAddress)), party
    assert _this_process_leftovers() == []
