"""What every servicer shares: mapping protocol and wire errors to gRPC statuses, and run-time outputs."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from pathlib import Path

import grpc

from securecollab.errors import ProtocolError
from securecollab.net.transport import peer_identity
from securecollab.net.wire import WireError, decode_named
from securecollab.transcript import Kind

log = logging.getLogger(__name__)


REFUSALS = (ProtocolError, WireError)


def refusal_status(e: Exception) -> tuple[grpc.StatusCode, str]:
    """The status a refusal is answered with: a protocol error names its own, a wire error is bad input."""
    code = getattr(grpc.StatusCode, e.code) if isinstance(e, ProtocolError) else grpc.StatusCode.INVALID_ARGUMENT
    return code, str(e)


@contextlib.contextmanager
def refusals(context):
    """Turn refusals inside the block into a status with a clear message; the service keeps serving."""
    try:
        yield
    except REFUSALS as e:
        context.abort(*refusal_status(e))


def rpc_errors(method):
    """:func:`refusals` around a whole (unary-response) method, `async def` ones included (whose context
    aborts with await, on an asynchronous server)."""
    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def refusing(self, request, context):
            try:
                return await method(self, request, context)
            except REFUSALS as e:
                await context.abort(*refusal_status(e))

        return refusing

    @functools.wraps(method)
    def wrapper(self, request, context):
        with refusals(context):
            return method(self, request, context)

    return wrapper


def require_caller(context, client_id: str) -> None:
    """The certificate must be a client's, with the party id the request claims."""
    identity = peer_identity(context)
    if identity.party_id != client_id:
        raise ProtocolError("PERMISSION_DENIED", f"certificate of {identity.party_id!r} cannot act as {client_id!r}")
    if identity.role != "client":
        raise ProtocolError("PERMISSION_DENIED",
                            f"a certificate of role {identity.role!r} cannot act as client {client_id!r}")


def require_role(context, role: str, party_id: str | None = None):
    """The certificate's role (and, if given, party id) must be these."""
    identity = peer_identity(context)
    if identity.role != role or (party_id is not None and identity.party_id != party_id):
        raise ProtocolError("PERMISSION_DENIED",
                            f"{identity.role} {identity.party_id!r} may not call this as {party_id or role}")
    return identity


class RoundReplies:
    """The reply for a round, built once: the clients waiting for the same round (a thousand, at scale) share
    one message rather than each holding its own copy of the global model until it is sent."""

    def __init__(self, build):
        self._build = build  # (round, done, params) -> reply
        self._key = self._reply = None

    def reply(self, round_: int, done: bool, params):
        if self._key != (round_, done):  # a round's model never changes once it is out
            self._key, self._reply = (round_, done), self._build(round_, done, params)
        return self._reply


def write_port_file(path, port: int) -> None:
    """Tell a launcher which port a port-0 server bound (written atomically)."""
    if path:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(path)


def receive_global_model(reply, shapes: dict, transcript, sender: str) -> list:
    """A client's view of a round's global model: validated against its own model's shapes, then recorded."""
    params = decode_named(reply.params, expect=shapes, finite=True)
    transcript.record(Kind.GLOBAL_MODEL, round=reply.round, sender=sender, meta={"done": reply.done}, tensors=params)
    return params
