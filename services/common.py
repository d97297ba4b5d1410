"""What every servicer shares: mapping protocol and wire errors to gRPC statuses, and run-time outputs."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import grpc

from securecollab.protocols import ProtocolError
from securecollab.wire import WireError, decode_named

log = logging.getLogger(__name__)


def rpc_errors(method):
    """Turn refusals into a status with a clear message; the service keeps serving."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except ProtocolError as e:
            context.abort(getattr(grpc.StatusCode, e.code), str(e))
        except WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))

    return wrapper


def write_port_file(path, port: int) -> None:
    """Tell a launcher which port a port-0 server bound (written atomically)."""
    if path:
        tmp = Path(str(path) + ".tmp")
        tmp.write_text(str(port))
        tmp.replace(path)


def receive_global_model(reply, shapes: dict, transcript, sender: str) -> list:
    """A client's view of a round's global model: validated against its own model's shapes, then recorded."""
    params = decode_named(reply.params, expect=shapes, finite=True)
    transcript.record("global_model", round=reply.round, sender=sender, meta={"done": reply.done}, tensors=params)
    return params
