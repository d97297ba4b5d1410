"""Transport: the one place gRPC servers and channels are built (TLS/mTLS, limits, keepalive, retries, health).

Every service and client goes through `make_server` / `make_channel`, so they
all share message-size limits, keepalive, retry policy and TLS settings.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from securecollab.errors import ProtocolError
from securecollab.net.certs import PartyIdentity, TlsFiles, identity_from_auth_context
from securecollab.net.costs import CostMeter

log = logging.getLogger(__name__)

# Large payloads (HE keys, secret shares of big updates) are streamed in
# chunks (securecollab.net.wire), so no message needs more than this.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEFAULT_DEADLINE_S = 60.0
LINGER_ENV = "SECURECOLLAB_LINGER_S"  # seconds a stopping server keeps serving first (slow links)

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted peer (a compute party, a container) is seen within seconds, not gRPC's default 2 minutes.
    ("grpc.max_reconnect_backoff_ms", 5_000),
]
_SERVER_KEEPALIVE = [
    # A second server on a busy port must fail, not silently share its traffic.
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
]
# Retries are the library's: transient UNAVAILABLE (a restarting peer) is
# retried with exponential backoff; services dedupe by (party, round) anyway.
RETRY_SERVICE_CONFIG = json.dumps({
    "methodConfig": [{
        "name": [{}],
        "retryPolicy": {
            "maxAttempts": 5,
            "initialBackoff": "0.2s",
            "maxBackoff": "3s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        },
    }]
})


def _size_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


class _LoopThread:
    """An asyncio event loop on a thread of its own: where an asynchronous server's handlers run, so a
    handler that waits (a client asking for the next round) holds a task rather than a thread."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-aio", daemon=True)
        self.thread.start()

    def run(self, coroutine):
        """Run `coroutine` on the loop and wait for its result, from any other thread."""
        if not self.thread.is_alive():  # stopped already (a second stop): its result would never come
            coroutine.close()
            raise RuntimeError("this server's event loop has stopped")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5.0)


@dataclass
class Server:
    """A gRPC server with health checking and reflection; services are added before start().

    An asynchronous one (`make_server(asynchronous=True)`) is a grpc.aio server on its own event-loop
    thread: its `async def` handlers wait as tasks, its plain ones run in the thread pool as usual."""

    grpc_server: grpc.Server | grpc.aio.Server
    port: int
    health: health.HealthServicer
    service_names: list[str] = field(default_factory=list)
    loop: _LoopThread | None = None

    def add(self, add_to_server: Callable, servicer, service_name: str) -> None:
        add_to_server(servicer, self.grpc_server)
        self.service_names.append(service_name)

    def start(self) -> "Server":
        reflection.enable_server_reflection(
            [*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], self.grpc_server)
        if self.loop:
            self.loop.run(self.grpc_server.start())
        else:
            self.grpc_server.start()
        self.set_serving(True)
        return self

    def set_serving(self, serving: bool) -> None:
        """Report every service SERVING or NOT_SERVING (e.g. while a compute party re-forms its MPC world)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            self.health.set(name, status)

    def stop(self, grace: float | None = 2.0) -> None:
        # Tell health checkers first so load balancers stop sending work.
        self.health.enter_graceful_shutdown()
        # A call is done once its reply is in the kernel's buffers; on a slow link megabytes may still be on
        # their way, and a closed server that leaves the client's flow-control frames unread resets the
        # connection, losing them. $SECURECOLLAB_LINGER_S keeps reading (and serving) that long first.
        time.sleep(float(os.environ.get(LINGER_ENV) or 0))
        if self.loop:
            if self.loop.thread.is_alive():  # stopping twice is a no-op, as for a threaded server
                self.loop.run(self.grpc_server.stop(grace))
                self.loop.close()
        else:
            self.grpc_server.stop(grace).wait()

    def wait(self) -> None:
        if self.loop:
            self.loop.run(self.grpc_server.wait_for_termination())
        else:
            self.grpc_server.wait_for_termination()

    def serve_until_signal(self, grace: float = 5.0) -> None:
        """Block until SIGTERM/SIGINT, then drain in-flight calls for up to `grace` seconds."""
        done = threading.Event()

        def on_signal(signum, _frame):
            log.info("signal %s: shutting down (grace %.1fs)", signum, grace)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        done.wait()
        self.stop(grace)


class _Unparsable:
    """Stands for a request whose bytes do not parse, so the refusal is ours rather than gRPC's."""

    def __init__(self, type_name: str):
        self.details = f"the request is not a valid {type_name} message"


class _UnparsableRequests(grpc.ServerInterceptor):
    """Refuse a request that does not parse with INVALID_ARGUMENT, from the handler's side.

    Left to gRPC (1.85), a bidirectional stream whose only message does not parse is
    answered INTERNAL but never completes on the server, and ``Server.stop`` then waits
    for it forever: any authenticated client could keep a server from shutting down.
    """

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        message_type = getattr(parse, "__self__", None)
        type_name = getattr(getattr(message_type, "DESCRIPTOR", None), "full_name", "request")

        def safe_parse(data):
            try:
                return parse(data)
            except Exception:  # DecodeError, or whatever a custom deserializer raises
                return _Unparsable(type_name)

        def checked(request, context):
            if isinstance(request, _Unparsable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
            return request

        def checked_stream(requests, context):
            for request in requests:
                yield checked(request, context)

        if inspect.iscoroutinefunction(handler.unary_unary):
            behavior = handler.unary_unary

            async def wrapped_async(request, context):  # an asynchronous server's context aborts with await
                if isinstance(request, _Unparsable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
                return await behavior(request, context)

            return handler._replace(request_deserializer=safe_parse, unary_unary=wrapped_async)
        if any(inspect.iscoroutinefunction(b) or inspect.isasyncgenfunction(b) for b in
               (handler.unary_stream, handler.stream_unary, handler.stream_stream)):
            return handler  # asynchronous streams (reflection's, on an asynchronous server) are grpc.aio's to refuse
        if handler.request_streaming:
            kind, behavior = ("stream_stream", handler.stream_stream) if handler.response_streaming else \
                ("stream_unary", handler.stream_unary)
            wrapped = lambda requests, context: behavior(checked_stream(requests, context), context)  # noqa: E731
        else:
            kind, behavior = ("unary_stream", handler.unary_stream) if handler.response_streaming else \
                ("unary_unary", handler.unary_unary)
            wrapped = lambda request, context: behavior(checked(request, context), context)  # noqa: E731
        return handler._replace(request_deserializer=safe_parse, **{kind: wrapped})


class _OnAsyncServer(grpc.aio.ServerInterceptor):
    """One of the interceptors above, on an asynchronous server: they only rewrite the handler they are given."""

    def __init__(self, interceptor: grpc.ServerInterceptor):
        self._interceptor = interceptor

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        return self._interceptor.intercept_service(lambda _details: handler, handler_call_details)


def make_server(*, tls: TlsFiles, port: int = 0, host: str = "[::]",
                meter: CostMeter | None = None, require_client_auth: bool = True,
                max_message_bytes: int = MAX_MESSAGE_BYTES, max_workers: int = 32,
                asynchronous: bool = False) -> Server:
    """Build a TLS gRPC server (mutual TLS by default) bound to host:port (0 picks a free port).

    `asynchronous`: a grpc.aio server (see `Server`) for services whose callers wait long for an event;
    `max_workers` then bounds only the threads of its plain handlers."""
    ca, cert, key = tls.read()
    creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                        require_client_auth=require_client_auth)
    # The meter first: it counts the bytes of every request, parsable or not.
    interceptors = [*([meter.server_interceptor()] if meter else []), _UnparsableRequests()]
    options = [*_size_options(max_message_bytes), *_SERVER_KEEPALIVE]
    pool = futures.ThreadPoolExecutor(max_workers=max_workers)
    loop = _LoopThread() if asynchronous else None
    if loop:
        async def build():  # an aio server belongs to the loop it is made on
            return grpc.aio.server(pool, interceptors=[_OnAsyncServer(i) for i in interceptors], options=options)
        server = loop.run(build())
    else:
        server = grpc.server(pool, interceptors=interceptors, options=options)
    try:
        bound = server.add_secure_port(f"{host}:{port}", creds)
    except RuntimeError as e:  # grpc raises rather than returning 0 on a failed bind
        bound = 0
        error = f": {e}"
    else:
        error = ""
    if bound == 0:
        if loop:
            loop.close()
        raise OSError(f"could not bind {host}:{port}{error}")
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    return Server(server, bound, health_servicer, loop=loop)


def make_channel(target: str, *, tls: TlsFiles, meter: CostMeter | None = None,
                 server_name: str | None = None,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> grpc.Channel:
    """Open a mutual-TLS channel to `target` ("host:port"); `server_name` overrides the name checked in the server certificate."""
    ca, cert, key = tls.read()
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
    options = [*_size_options(max_message_bytes), *_KEEPALIVE,
               ("grpc.enable_retries", 1), ("grpc.service_config", RETRY_SERVICE_CONFIG)]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    channel = grpc.secure_channel(target, creds, options=options)
    return meter.wrap_channel(channel) if meter else channel


def wait_ready(channel: grpc.Channel, timeout: float = 30.0) -> None:
    """Wait until the channel is connected, or raise TimeoutError naming the cause."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout)
    except grpc.FutureTimeoutError:
        raise TimeoutError(f"no connection within {timeout:.0f}s") from None


def check_health(channel: grpc.Channel, service: str = "", timeout: float = 5.0) -> str:
    """Ask a server's standard health service; returns the status name (e.g. 'SERVING')."""
    reply = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def wait_budget(context: grpc.ServicerContext, limit: float) -> float:
    """How long a handler may block for its caller: ``limit``, or less if the call's deadline comes first.

    A deadline already past gives 0 (do not wait), not ``limit``: a caller that
    gave up must not leave a server thread (and its place in line) behind.
    """
    remaining = context.time_remaining()
    return limit if remaining is None else max(0.0, min(limit, remaining))


def peer_identity(context: grpc.ServicerContext) -> PartyIdentity:
    """The calling party's identity from its client certificate; refuses UNAUTHENTICATED (ProtocolError) if absent."""
    identity = identity_from_auth_context(context.auth_context())
    if identity is None:  # refused by the handler's refusals, on a threaded and an asynchronous server alike
        raise ProtocolError("UNAUTHENTICATED", "no client certificate")
    return identity
