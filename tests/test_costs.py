"""Specification of securecollab.net.costs: exact per-direction byte counts at the gRPC boundary.

A CostMeter on each side of a real mTLS connection (server: make_server(meter=...),
client: make_channel(meter=...)) must count, for every message, its protobuf encoding
plus gRPC's 5-byte prefix -- so what one side sent is exactly what the other received,
per full method name -- alongside wall/CPU time and peak RSS.
"""

from __future__ import annotations

import hashlib
import json
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from securecollab.generated.v1 import tensor_pb2 as pb
from securecollab.net.costs import GRPC_MESSAGE_PREFIX, CostMeter
from securecollab.net.transport import check_health, make_channel, make_server
from securecollab.net.wire import encode_tensor, iter_chunks

ECHO, UPLOAD, DOWNLOAD = "/test.Cost/Echo", "/test.Cost/Upload", "/test.Cost/Download"
FIELDS = {"party", "wall_s", "cpu_s", "peak_rss_mb", "bytes_sent", "bytes_received", "messages", "by_method"}


def _wire(msg) -> int:
    return len(msg.SerializeToString()) + GRPC_MESSAGE_PREFIX


# Deterministic handlers, so the test can compute every response it should see.
def echo_reply(request: pb.Tensor) -> pb.Tensor:
    return pb.Tensor(dtype=pb.DTYPE_INT64, shape=[len(request.data)], data=bytes(8 * len(request.data) % 97))


def upload_reply(chunks: list[pb.Chunk]) -> pb.Chunk:
    data = b"".join(c.data for c in chunks)
    return pb.Chunk(transfer_id="ack", total=len(chunks), total_bytes=len(data), sha256=hashlib.sha256(data).digest())


def download_replies(request: pb.Tensor) -> list[pb.Chunk]:
    return [pb.Chunk(transfer_id="down", seq=i, data=bytes(size)) for i, size in enumerate(request.shape)]


def _echo(request, context):
    if request.dtype == 99:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "refused")
    return echo_reply(request)


@pytest.fixture
def metered(tls_for):
    """(server meter, client meter, channel) on a real mTLS connection."""
    server_meter, client_meter = CostMeter("server"), CostMeter("client-0")
    handler = grpc.method_handlers_generic_handler("test.Cost", {
        "Echo": grpc.unary_unary_rpc_method_handler(
            _echo, request_deserializer=pb.Tensor.FromString, response_serializer=pb.Tensor.SerializeToString),
        "Upload": grpc.stream_unary_rpc_method_handler(
            lambda it, ctx: upload_reply(list(it)),
            request_deserializer=pb.Chunk.FromString, response_serializer=pb.Chunk.SerializeToString),
        "Download": grpc.unary_stream_rpc_method_handler(
            lambda req, ctx: iter(download_replies(req)),
            request_deserializer=pb.Tensor.FromString, response_serializer=pb.Chunk.SerializeToString),
    })
    server = make_server(tls=tls_for("server"), port=0, meter=server_meter)
    server.add(lambda _s, srv: srv.add_generic_rpc_handlers((handler,)), None, "test.Cost")
    server.start()
    channel = make_channel(f"localhost:{server.port}", tls=tls_for("client-0"), meter=client_meter)
    yield server_meter, client_meter, channel
    channel.close()
    server.stop(0)


def _stubs(channel):
    echo = channel.unary_unary(ECHO, request_serializer=pb.Tensor.SerializeToString,
                               response_deserializer=pb.Tensor.FromString)
    upload = channel.stream_unary(UPLOAD, request_serializer=pb.Chunk.SerializeToString,
                                  response_deserializer=pb.Chunk.FromString)
    download = channel.unary_stream(DOWNLOAD, request_serializer=pb.Tensor.SerializeToString,
                                    response_deserializer=pb.Chunk.FromString)
    return echo, upload, download


def test_bytes_match_exactly_in_both_directions(metered):
    server_meter, client_meter, channel = metered
    echo, upload, download = _stubs(channel)
    rng = np.random.default_rng(0)

    requests = [pb.Tensor()]  # empty message: 0 bytes of protobuf, still 5 on the wire
    requests += [encode_tensor(rng.standard_normal(n).astype(np.float32)) for n in (1, 10, 1000, 100_000)]
    requests += [encode_tensor(np.arange(n, dtype=np.int64).reshape(-1, 1)) for n in (3, 300)]
    for req in requests:
        reply = echo(req, timeout=10)
        assert reply == echo_reply(req)

    chunks = list(iter_chunks(rng.bytes(50_000), transfer_id="up", chunk_bytes=7_000))
    assert upload(iter(chunks), timeout=10) == upload_reply(chunks)

    down_req = pb.Tensor(shape=[0, 1, 500, 70_000])
    assert list(download(down_req, timeout=10)) == download_replies(down_req)

    expected_sent = {  # client -> server
        ECHO: sum(_wire(r) for r in requests),
        UPLOAD: sum(_wire(c) for c in chunks),
        DOWNLOAD: _wire(down_req),
    }
    expected_received = {  # server -> client
        ECHO: sum(_wire(echo_reply(r)) for r in requests),
        UPLOAD: _wire(upload_reply(chunks)),
        DOWNLOAD: sum(_wire(c) for c in download_replies(down_req)),
    }
    client, server = client_meter.snapshot(), server_meter.snapshot()
    assert client["by_method"] == {"sent": expected_sent, "received": expected_received}
    assert server["by_method"] == {"sent": expected_received, "received": expected_sent}

    total_up, total_down = sum(expected_sent.values()), sum(expected_received.values())
    assert client_meter.bytes_sent == server_meter.bytes_received == total_up
    assert client_meter.bytes_received == server_meter.bytes_sent == total_down
    assert (client["bytes_sent"], client["bytes_received"]) == (total_up, total_down)
    assert (server["bytes_sent"], server["bytes_received"]) == (total_down, total_up)

    n_up = len(requests) + len(chunks) + 1
    n_down = len(requests) + 1 + len(download_replies(down_req))
    assert client["messages"] == {"sent": n_up, "received": n_down}
    assert server["messages"] == {"sent": n_down, "received": n_up}
    assert client["party"] == "client-0" and server["party"] == "server"


def test_refused_call_counts_the_request_only(metered):
    server_meter, client_meter, channel = metered
    echo, _, _ = _stubs(channel)
    bad = pb.Tensor(dtype=99, shape=[3], data=b"abc")
    with pytest.raises(grpc.RpcError) as err:
        echo(bad, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client_meter.bytes_sent == server_meter.bytes_received == _wire(bad)
    assert client_meter.bytes_received == server_meter.bytes_sent == 0


def test_generated_stubs_are_metered_under_full_method_names(tls_for):
    """Health checks go through a generated stub: the metered channel must count them too."""
    server_meter, client_meter = CostMeter("server"), CostMeter("client")
    server = make_server(tls=tls_for("server"), port=0, meter=server_meter).start()
    try:
        with make_channel(f"localhost:{server.port}", tls=tls_for("client-0"), meter=client_meter) as channel:
            assert check_health(channel) == "SERVING"
            assert check_health(channel) == "SERVING"
    finally:
        server.stop(0)
    method = "/grpc.health.v1.Health/Check"
    req = 2 * _wire(health_pb2.HealthCheckRequest(service=""))
    resp = 2 * _wire(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING))
    assert client_meter.snapshot()["by_method"] == {"sent": {method: req}, "received": {method: resp}}
    assert server_meter.snapshot()["by_method"] == {"sent": {method: resp}, "received": {method: req}}


def test_raw_bytes_methods_without_serializers(tls_for):
    """Methods without (de)serializers carry raw bytes; their length is what is counted."""
    server_meter, client_meter = CostMeter("s"), CostMeter("c")
    handler = grpc.method_handlers_generic_handler(
        "test.Raw", {"Rev": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req[::-1] + b"!")})
    server = make_server(tls=tls_for("server"), port=0, meter=server_meter)
    server.grpc_server.add_generic_rpc_handlers((handler,))
    server.start()
    try:
        with make_channel(f"localhost:{server.port}", tls=tls_for("client-0"), meter=client_meter) as channel:
            assert channel.unary_unary("/test.Raw/Rev")(b"abcdef", timeout=10) == b"fedcba!"
    finally:
        server.stop(0)
    assert client_meter.bytes_sent == server_meter.bytes_received == 6 + 5
    assert client_meter.bytes_received == server_meter.bytes_sent == 7 + 5


def test_retried_request_is_counted_once_by_client_and_per_attempt_by_server(tls_for):
    """Documented limitation: gRPC core retries transparently, so only the server sees each attempt."""
    attempts = []

    def flaky(request, context):
        attempts.append(1)
        if len(attempts) < 3:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return b"ok"

    server_meter, client_meter = CostMeter("s"), CostMeter("c")
    server = make_server(tls=tls_for("server"), port=0, meter=server_meter)
    server.grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Retry", {"Flaky": grpc.unary_unary_rpc_method_handler(flaky)}),))
    server.start()
    try:
        with make_channel(f"localhost:{server.port}", tls=tls_for("client-0"), meter=client_meter) as channel:
            assert channel.unary_unary("/test.Retry/Flaky")(b"x" * 100, timeout=15) == b"ok"
    finally:
        server.stop(0)
    assert len(attempts) == 3
    assert server_meter.bytes_received == 3 * 105  # every attempt reached the server
    assert client_meter.bytes_sent == 105  # the client serialized it once


# --------------------------------------------------------------------------- snapshot, time, memory

def test_snapshot_measures_time_cpu_and_memory():
    meter = CostMeter("p")
    first = meter.snapshot()
    assert set(first) == FIELDS
    assert first["bytes_sent"] == first["bytes_received"] == 0
    assert first["messages"] == {"sent": 0, "received": 0}
    assert first["by_method"] == {"sent": {}, "received": {}}
    digest = b""
    for _ in range(3000):  # busy work, so the process accrues CPU time
        digest = hashlib.sha256(digest + bytes(4096)).digest()
    busy = np.ones((256, 256)) @ np.ones((256, 256))
    assert busy[0, 0] == 256
    snap = meter.snapshot()
    assert snap["wall_s"] > first["wall_s"] >= 0
    assert snap["cpu_s"] > 0
    assert snap["peak_rss_mb"] > 10  # a Python process with numpy and grpc loaded is well above 10 MB
    assert snap["peak_rss_mb"] < 1024 * 1024  # and the unit is MB, not KiB or bytes


def test_counters_and_json_output(tmp_path):
    meter = CostMeter("client-3")
    meter.count_sent("/a.B/C", 10)
    meter.count_sent("/a.B/C", 0)
    meter.count_received("/a.B/D", 1)
    assert meter.bytes_sent == 10 + 0 + 2 * GRPC_MESSAGE_PREFIX
    assert meter.bytes_received == 1 + GRPC_MESSAGE_PREFIX
    before = meter.snapshot()
    path = tmp_path / "costs.json"
    meter.write(path)
    written = json.loads(path.read_text())
    assert set(written) == FIELDS
    assert written["party"] == "client-3"
    for key in ("bytes_sent", "bytes_received", "messages", "by_method"):
        assert written[key] == before[key]
    assert written["by_method"] == {"sent": {"/a.B/C": 20}, "received": {"/a.B/D": 6}}
    assert written["messages"] == {"sent": 2, "received": 1}
    assert written["wall_s"] >= before["wall_s"] and written["cpu_s"] >= before["cpu_s"]
    assert written["peak_rss_mb"] > 10


def test_counting_is_thread_safe():
    meter = CostMeter()
    threads = [threading.Thread(target=lambda i=i: [meter.count_sent(f"/m/{i % 2}", i) or
                                                    meter.count_received("/m/r", 1) for _ in range(2000)])
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert meter.bytes_sent == 2000 * sum(i + 5 for i in range(8))
    assert meter.bytes_received == 8 * 2000 * 6
    assert meter.snapshot()["messages"] == {"sent": 16000, "received": 16000}

