"""Specification of securecollab.net.transport over real sockets: mutual TLS, identity, health,
reflection, deadlines, retries, graceful shutdown and message limits.

Every test runs a real server from make_server (mutual TLS, port 0) and real clients from
make_channel, with certificates from the session CA in conftest.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from securecollab.errors import ProtocolError
from securecollab.net.certs import TlsFiles
from securecollab.net.costs import CostMeter
from securecollab.net.transport import (
    MAX_MESSAGE_BYTES,
    check_health,
    make_channel,
    make_server,
    peer_identity,
    wait_ready,
    wait_budget,
)
from securecollab.protocols.rounds import RoundState

SERVICE = "test.Identity"


class Handlers:
    """A tiny service whose methods take and return raw bytes."""

    def __init__(self):
        self.lock = threading.Lock()
        self.attempts: dict[bytes, int] = {}
        self.slow_finished = threading.Event()
        self.who_calls = 0

    def who(self, request, context):
        with self.lock:
            self.who_calls += 1
        try:
            ident = peer_identity(context)
        except ProtocolError as e:  # as every servicer's refusals map it
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        return f"{ident.party_id}/{ident.role}".encode()

    def sleep(self, request, context):
        end = time.monotonic() + float(request.decode())
        while time.monotonic() < end and context.is_active():
            time.sleep(0.01)
        self.slow_finished.set()
        return b"slept"

    def flaky(self, request, context):
        """Request b"<key>:<failures>:<code>": fails with <code> the first <failures> attempts of <key>."""
        key, failures, code = request.split(b":")
        with self.lock:
            n = self.attempts[key] = self.attempts.get(key, 0) + 1
        if n <= int(failures):
            context.abort(getattr(grpc.StatusCode, code.decode()), f"attempt {n} fails")
        return str(n).encode()

    def size(self, request, context):
        return str(len(request)).encode()

    def generic_handler(self):
        return grpc.method_handlers_generic_handler(SERVICE, {
            name: grpc.unary_unary_rpc_method_handler(fn)
            for name, fn in (("Who", self.who), ("Sleep", self.sleep), ("Flaky", self.flaky),
                             ("Size", self.size))
        })


def _start(tls: TlsFiles, handlers: Handlers, **kwargs):
    server = make_server(tls=tls, port=0, **kwargs)
    server.add(lambda _servicer, grpc_server: grpc_server.add_generic_rpc_handlers(
        (handlers.generic_handler(),)), None, SERVICE)
    return server.start()


@pytest.fixture
def handlers() -> Handlers:
    return Handlers()


@pytest.fixture
def server(tls_for, handlers):
    srv = _start(tls_for("server"), handlers)
    yield srv
    srv.stop(0)


@pytest.fixture
def target(server) -> str:
    return f"localhost:{server.port}"


def _call(channel, method: str, request: bytes = b"", timeout: float = 10.0) -> bytes:
    return channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=timeout)


def _code(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code()


# --------------------------------------------------------------------------- the asynchronous server

def test_asynchronous_server_holds_no_thread_per_waiting_caller(tls_for):
    """Fifty callers wait for the next round on a server with two threads: they wait as tasks, so a plain
    call still gets a thread and is served, and then all fifty are answered. (A threaded server with two
    workers would queue the plain call behind the waiters until their deadline.)"""
    state = RoundState(total_rounds=3, client_ids=[], initial=[])

    async def wait(round_, context):
        reached, _done, _ = await state.wait_for_round_async(round_, timeout=wait_budget(context, 30.0))
        return str(reached).encode()

    def advance(_request, context):
        with state._cond:
            state._advance([])
        return b"advanced"

    as_round = lambda data: int(data.decode())  # noqa: E731  (fails on bytes that are not a number)
    generic = grpc.method_handlers_generic_handler(SERVICE, {
        "Wait": grpc.unary_unary_rpc_method_handler(wait, request_deserializer=as_round),
        "Advance": grpc.unary_unary_rpc_method_handler(advance)})
    meter = CostMeter("server")
    server = make_server(tls=tls_for("server"), port=0, max_workers=2, asynchronous=True, meter=meter)
    server.add(lambda _s, grpc_server: grpc_server.add_generic_rpc_handlers((generic,)), None, SERVICE)
    server.start()
    try:
        with make_channel(f"localhost:{server.port}", tls=tls_for("client-0")) as channel:
            wait_ready(channel, timeout=10)
            threads = threading.active_count()
            waiting = [channel.unary_unary(f"/{SERVICE}/Wait").future(b"1", timeout=30) for _ in range(50)]
            time.sleep(1.0)
            assert not any(f.done() for f in waiting)
            assert threading.active_count() <= threads + 2  # at most the pool's two, not fifty
            assert _call(channel, "Advance", timeout=5) == b"advanced"
            assert [f.result(timeout=10) for f in waiting] == [b"1"] * 50
            # The refusal of an unparsable request, and the meter, work on asynchronous handlers too.
            assert _code(lambda: _call(channel, "Wait", b"not a round")) == grpc.StatusCode.INVALID_ARGUMENT
            assert check_health(channel) == "SERVING"
        # 51 requests, each with gRPC's 5-byte length prefix
        assert meter.snapshot()["by_method"]["received"][f"/{SERVICE}/Wait"] == 50 * 1 + len(b"not a round") + 51 * 5
    finally:
        server.stop(0)
    server.stop(0)  # a second stop returns (the loop is gone), as it does for a threaded server
    assert not server.loop.thread.is_alive()


# --------------------------------------------------------------------------- mutual TLS and identity

@pytest.mark.parametrize("party,expected", [("client-1", "client-1/client"), ("aggregator", "aggregator/aggregator"),
                                            ("client-x", "client-x/client")])
def test_caller_identity_comes_from_its_certificate(target, tls_for, party, expected):
    with make_channel(target, tls=tls_for(party)) as channel:
        wait_ready(channel, timeout=10)
        assert _call(channel, "Who") == expected.encode()


def test_server_reachable_by_ip_and_with_name_override(server, tls_for):
    with make_channel(f"127.0.0.1:{server.port}", tls=tls_for("client-0")) as channel:
        assert _call(channel, "Who") == b"client-0/client"
    # server_name is the name checked in the server's certificate: a wrong one is refused ...
    with make_channel(f"localhost:{server.port}", tls=tls_for("client-0"), server_name="client-3") as channel:
        assert _code(lambda: _call(channel, "Who", timeout=5)) == grpc.StatusCode.UNAVAILABLE
    # ... and the right one is accepted whatever the target's host name.
    with make_channel(f"127.0.0.1:{server.port}", tls=tls_for("client-0"), server_name="server") as channel:
        assert _call(channel, "Who") == b"client-0/client"


def test_client_cert_from_another_ca_is_refused(server, target, cert_dir, other_ca_dir, handlers):
    # The client trusts our CA (so it accepts the server) but presents a foreign certificate.
    foreign = TlsFiles(ca=cert_dir / "ca.pem", cert=other_ca_dir / "client-0.pem", key=other_ca_dir / "client-0.key")
    with make_channel(target, tls=foreign) as channel:
        assert _code(lambda: _call(channel, "Who", timeout=10)) == grpc.StatusCode.UNAVAILABLE
    assert handlers.who_calls == 0  # refused during the handshake, before any handler ran


def test_client_trusting_another_ca_refuses_our_server(target, other_ca_dir):
    with make_channel(target, tls=TlsFiles.for_party(other_ca_dir, "client-0")) as channel:
        assert _code(lambda: _call(channel, "Who", timeout=10)) == grpc.StatusCode.UNAVAILABLE


def test_client_without_certificate_is_refused(target, cert_dir, handlers):
    creds = grpc.ssl_channel_credentials(root_certificates=(cert_dir / "ca.pem").read_bytes())
    with grpc.secure_channel(target, creds) as channel:
        assert _code(lambda: _call(channel, "Who", timeout=10)) == grpc.StatusCode.UNAVAILABLE
    assert handlers.who_calls == 0


def test_plaintext_client_is_refused(target):
    with grpc.insecure_channel(target) as channel:
        assert _code(lambda: _call(channel, "Who", timeout=5)) == grpc.StatusCode.UNAVAILABLE


def test_peer_identity_refuses_unauthenticated_without_client_cert(tls_for, cert_dir, handlers):
    server = _start(tls_for("server"), handlers, require_client_auth=False)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=(cert_dir / "ca.pem").read_bytes())
        with grpc.secure_channel(f"localhost:{server.port}", creds) as channel:
            with pytest.raises(grpc.RpcError) as err:
                _call(channel, "Who")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "no client certificate" in err.value.details()
            assert _call(channel, "Size", b"abc") == b"3"  # methods not asking for identity still work
        # Without required client auth the server does not even ask for a certificate
        # (gRPC's semantics), so a caller that has one is anonymous as well.
        with make_channel(f"localhost:{server.port}", tls=tls_for("client-2")) as channel:
            assert _code(lambda: _call(channel, "Who")) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


def test_wait_ready_times_out_naming_the_cause(tls_for):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with make_channel(f"127.0.0.1:{port}", tls=tls_for("client-0")) as channel:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="no connection within 1s"):
            wait_ready(channel, timeout=1.0)
        assert time.monotonic() - t0 < 5


def test_make_server_bind_failure_is_an_os_error(tls_for):
    with pytest.raises(OSError, match="could not bind 203.0.113.5:0"):
        make_server(tls=tls_for("server"), host="203.0.113.5", port=0)  # TEST-NET-3, never local


# --------------------------------------------------------------------------- health and reflection

def test_health_serving_then_not_after_stop(tls_for, handlers):
    server = _start(tls_for("server"), handlers)
    with make_channel(f"localhost:{server.port}", tls=tls_for("client-0")) as channel:
        assert check_health(channel) == "SERVING"
        assert check_health(channel, SERVICE) == "SERVING"
        assert _code(lambda: check_health(channel, "no.such.Service")) == grpc.StatusCode.NOT_FOUND

        server.stop(0)
        # The health service was told first (NOT_SERVING for every name) ...
        for name in ("", SERVICE):
            reply = server.health.Check(health_pb2.HealthCheckRequest(service=name), None)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        # ... and then the server stopped answering at all.
        try:
            status = check_health(channel, timeout=5)
        except grpc.RpcError as e:
            assert e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        else:
            assert status == "NOT_SERVING"


def test_reflection_lists_services(target, tls_for):
    with make_channel(target, tls=tls_for("client-0")) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
    assert len(replies) == 1
    names = {s.name for s in replies[0].list_services_response.service}
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


# --------------------------------------------------------------------------- deadlines and retries

def test_deadline_exceeded(target, tls_for, handlers):
    with make_channel(target, tls=tls_for("client-0")) as channel:
        wait_ready(channel, timeout=10)
        t0 = time.monotonic()
        assert _code(lambda: _call(channel, "Sleep", b"3", timeout=0.3)) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 2.0
        # The server notices the cancellation too (context no longer active).
        assert handlers.slow_finished.wait(2.0)


def test_unavailable_is_retried_transparently(target, tls_for, handlers):
    with make_channel(target, tls=tls_for("client-0")) as channel:
        assert _call(channel, "Flaky", b"a:2:UNAVAILABLE", timeout=15) == b"3"
    assert handlers.attempts[b"a"] == 3


def test_retries_give_up_after_five_attempts(target, tls_for, handlers):
    with make_channel(target, tls=tls_for("client-0")) as channel:
        with pytest.raises(grpc.RpcError) as err:
            _call(channel, "Flaky", b"b:99:UNAVAILABLE", timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "attempt 5 fails" in err.value.details()
    assert handlers.attempts[b"b"] == 5


@pytest.mark.parametrize("code", ["INTERNAL", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNKNOWN"])
def test_other_failures_are_not_retried(target, tls_for, handlers, code):
    with make_channel(target, tls=tls_for("client-0")) as channel:
        assert _code(lambda: _call(channel, "Flaky", f"c:1:{code}".encode())) == getattr(grpc.StatusCode, code)
    assert handlers.attempts[b"c"] == 1


# --------------------------------------------------------------------------- message limits

def test_message_limit(target, tls_for, handlers):
    at_limit = bytes(MAX_MESSAGE_BYTES)
    over = bytes(MAX_MESSAGE_BYTES + 1)
    with make_channel(target, tls=tls_for("client-0")) as channel:
        assert _call(channel, "Size", at_limit, timeout=30) == str(MAX_MESSAGE_BYTES).encode()
        # Our own channel refuses to send more.
        assert _code(lambda: _call(channel, "Size", over, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _call(channel, "Size", b"next") == b"4"
    # A client with a higher limit of its own is still refused by the server ...
    with make_channel(target, tls=tls_for("client-1"), max_message_bytes=4 * MAX_MESSAGE_BYTES) as channel:
        assert _code(lambda: _call(channel, "Size", over, timeout=30)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        # ... which keeps serving, on the same connection too.
        assert _call(channel, "Size", b"next") == b"4"
        assert _call(channel, "Who") == b"client-1/client"


# --------------------------------------------------------------------------- graceful shutdown

SERVER_SCRIPT = textwrap.dedent("""
    import sys, time
    import grpc
    from securecollab.net.certs import TlsFiles
    from securecollab.net.transport import make_server

    def sleep(request, context):
        print("started", flush=True)
        time.sleep(float(request.decode()))
        return b"finished"

    handler = grpc.method_handlers_generic_handler(
        "test.Slow", {"Sleep": grpc.unary_unary_rpc_method_handler(sleep)})
    server = make_server(tls=TlsFiles.for_party(sys.argv[1], "server"), port=0)
    server.add(lambda _s, srv: srv.add_generic_rpc_handlers((handler,)), None, "test.Slow")
    server.start()
    print(server.port, flush=True)
    server.serve_until_signal(grace=float(sys.argv[2]))
    print("stopped", flush=True)
""")


@pytest.mark.timeout(60)
def test_sigterm_drains_in_flight_call_then_exits_zero(cert_dir: Path, tls_for):
    grace = 8.0
    proc = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, str(cert_dir), str(grace)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"server did not start: {line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        with make_channel(f"localhost:{int(line)}", tls=tls_for("client-0")) as channel:
            call = channel.unary_unary("/test.Slow/Sleep").future(b"1.0", timeout=20)
            assert proc.stdout.readline().strip() == "started"
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert call.result() == b"finished"  # the in-flight call completes OK
            code = proc.wait(timeout=grace + 5)
            took = time.monotonic() - t0
        out, err = proc.communicate(timeout=5)
        assert code == 0, err
        assert out.strip() == "stopped"
        # Exited once the call drained, without sitting out the whole grace period.
        assert took < grace - 2, took
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
