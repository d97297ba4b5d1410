"""Cost meter: bytes serialized at the gRPC boundary per direction, wall and CPU time, peak RSS.

Bytes are counted in the (de)serializers gRPC calls for every message, so the
figure is what was actually put on, or taken off, the wire by this party: the
protobuf encoding plus gRPC's 5-byte length prefix per message. HTTP/2 frame
headers and TLS record overhead are not included.
"""

from __future__ import annotations

import json
import resource
import threading
import time
from collections import defaultdict
from pathlib import Path

import grpc

GRPC_MESSAGE_PREFIX = 5  # 1-byte compressed flag + 4-byte length


class CostMeter:
    """Counts one party's costs from its creation; thread-safe."""

    def __init__(self, party: str = ""):
        self.party = party
        self._lock = threading.Lock()
        self._sent: dict[str, int] = defaultdict(int)
        self._received: dict[str, int] = defaultdict(int)
        self._messages = {"sent": 0, "received": 0}
        self._wall0 = time.perf_counter()
        self._cpu0 = time.process_time()

    def count_sent(self, method: str, nbytes: int) -> None:
        with self._lock:
            self._sent[method] += nbytes + GRPC_MESSAGE_PREFIX
            self._messages["sent"] += 1

    def count_received(self, method: str, nbytes: int) -> None:
        with self._lock:
            self._received[method] += nbytes + GRPC_MESSAGE_PREFIX
            self._messages["received"] += 1

    @property
    def bytes_sent(self) -> int:
        with self._lock:
            return sum(self._sent.values())

    @property
    def bytes_received(self) -> int:
        with self._lock:
            return sum(self._received.values())

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "party": self.party,
                "wall_s": time.perf_counter() - self._wall0,
                "cpu_s": time.process_time() - self._cpu0,
                "peak_rss_mb": peak_rss_mb(),
                "bytes_sent": sum(self._sent.values()),
                "bytes_received": sum(self._received.values()),
                "messages": dict(self._messages),
                "by_method": {"sent": dict(self._sent), "received": dict(self._received)},
            }

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.snapshot(), indent=2))

    # -- wiring into gRPC -------------------------------------------------
    def _serializer(self, method, fn, sent: bool):
        count = self.count_sent if sent else self.count_received
        if sent:
            def wrapped(msg):
                data = fn(msg) if fn else msg
                count(method, len(data))
                return data
        else:
            def wrapped(data):
                count(method, len(data))
                return fn(data) if fn else data
        return wrapped

    def server_interceptor(self) -> grpc.ServerInterceptor:
        return _MeterServerInterceptor(self)

    def wrap_channel(self, channel: grpc.Channel) -> grpc.Channel:
        return _MeteredChannel(channel, self)


def method_bytes(snapshot: dict, *suffixes: str, directions=("sent", "received")) -> int:
    """Bytes a cost snapshot counted for the methods ending in ``suffixes`` (e.g. "/Infer")."""
    return sum(v for d in directions for k, v in snapshot["by_method"][d].items() if k.endswith(suffixes))


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _MeterServerInterceptor(grpc.ServerInterceptor):
    def __init__(self, meter: CostMeter):
        self._meter = meter

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return handler._replace(
            request_deserializer=self._meter._serializer(method, handler.request_deserializer, sent=False),
            response_serializer=self._meter._serializer(method, handler.response_serializer, sent=True),
        )


class _MeteredChannel(grpc.Channel):
    """A channel whose stubs count every serialized request and received response."""

    def __init__(self, channel: grpc.Channel, meter: CostMeter):
        self._channel = channel
        self._meter = meter

    def _wrap(self, factory, method, request_serializer=None, response_deserializer=None,
              *args, **kwargs):
        return factory(method, self._meter._serializer(method, request_serializer, sent=True),
                       self._meter._serializer(method, response_deserializer, sent=False),
                       *args, **kwargs)

    def unary_unary(self, method, *args, **kwargs):
        return self._wrap(self._channel.unary_unary, method, *args, **kwargs)

    def unary_stream(self, method, *args, **kwargs):
        return self._wrap(self._channel.unary_stream, method, *args, **kwargs)

    def stream_unary(self, method, *args, **kwargs):
        return self._wrap(self._channel.stream_unary, method, *args, **kwargs)

    def stream_stream(self, method, *args, **kwargs):
        return self._wrap(self._channel.stream_stream, method, *args, **kwargs)

    def subscribe(self, callback, try_to_connect=False):
        self._channel.subscribe(callback, try_to_connect)

    def unsubscribe(self, callback):
        self._channel.unsubscribe(callback)

    def close(self):
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
