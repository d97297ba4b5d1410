"""Hypothesis-driven fuzzing of any securecollab gRPC service (a helper module, not a test file).

Two entry points, both over a real channel (mutual TLS, see
:func:`securecollab.net.transport.make_channel`) to a running server:

* :func:`fuzz_service` sends random *well-formed* messages to every method of
  a service, built from the message descriptors: every scalar type (with
  boundary and huge values), strings (random, or drawn from ``strings`` so
  that some requests name a real client, session or transfer), bytes (random,
  or ``byte_seeds`` truncated / bit-flipped / extended), oneofs, repeated
  fields, and the shared ``Tensor`` / ``Chunk`` messages with random dtype,
  shape, data (NaN, Inf, huge, zeros, random bytes; consistent with the shape
  or not) and checksums (right or wrong). Client-streaming methods get a short
  random list of messages. It asserts that each reply is OK or a status from
  ``allowed`` (never ``UNKNOWN``: an unhandled exception in a handler), that an
  error carries a non-empty details message, and, after each method's
  examples, that the server still answers its gRPC health check ``SERVING``
  and that ``valid_after(channel)`` passes (a real request that must still
  give the right answer).
* :func:`fuzz_raw` sends random bytes (and mutated serializations of random
  messages) as the serialized request of every method. What does not parse
  is refused before the handler (``INVALID_ARGUMENT`` from a
  :func:`securecollab.net.transport.make_server` server, ``INTERNAL`` from plain
  gRPC); what does parse reaches the handler. It asserts the status is never
  ``UNKNOWN`` nor ``UNAVAILABLE`` and the service survives (health
  ``SERVING``, ``valid_after``).

Both return a :class:`FuzzReport`: per method, how many replies had each
status, so a test can also check that the examples got past the first
refusal (e.g. some requests reached the shape checks, not only NOT_FOUND).

Example::

    from securecollab.generated.v1 import split_pb2
    report = fuzz_service(channel, split_pb2.DESCRIPTOR.services_by_name["SplitServer"],
                          max_examples=30, strings=["client-0"], shapes=[(4, 64)],
                          skip_methods={"Finish"},
                          timeouts={"AwaitTurn": 0.3},
                          extra_allowed={"AwaitTurn": {grpc.StatusCode.DEADLINE_EXCEEDED}},
                          valid_after=lambda ch: check_training_step(ch))
    assert report.codes("Forward") - {"NOT_FOUND", "PERMISSION_DENIED"}

Hypothesis runs derandomized by default (the same examples on every run, so
a suite never flakes). To hunt bugs, set ``SECURECOLLAB_FUZZ_RANDOM=1`` (new
examples each run; or pass ``derandomize=False``) and
``SECURECOLLAB_FUZZ_SCALE=10`` (ten times every ``max_examples``)::

    SECURECOLLAB_FUZZ_RANDOM=1 SECURECOLLAB_FUZZ_SCALE=10 pytest -k fuzz
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import descriptor as _d
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from securecollab.net.certs import CA_CERT, CA_KEY, TlsFiles, make_certs
from securecollab.net.transport import check_health, make_channel

SC = grpc.StatusCode
# Refusals a service may answer with for a random request. Not UNKNOWN (an unhandled exception),
# not INTERNAL (gRPC's own failure, or a handler bug), not UNAVAILABLE (a crashed server).
DEFAULT_ALLOWED: frozenset[grpc.StatusCode] = frozenset({
    SC.OK, SC.INVALID_ARGUMENT, SC.NOT_FOUND, SC.ALREADY_EXISTS, SC.PERMISSION_DENIED,
    SC.FAILED_PRECONDITION, SC.OUT_OF_RANGE, SC.RESOURCE_EXHAUSTED,
})
TENSOR = "securecollab.v1.Tensor"
CHUNK = "securecollab.v1.Chunk"

_F = _d.FieldDescriptor
_INT_RANGES = {
    _F.TYPE_INT32: (-2**31, 2**31 - 1), _F.TYPE_SINT32: (-2**31, 2**31 - 1), _F.TYPE_SFIXED32: (-2**31, 2**31 - 1),
    _F.TYPE_INT64: (-2**63, 2**63 - 1), _F.TYPE_SINT64: (-2**63, 2**63 - 1), _F.TYPE_SFIXED64: (-2**63, 2**63 - 1),
    _F.TYPE_UINT32: (0, 2**32 - 1), _F.TYPE_FIXED32: (0, 2**32 - 1),
    _F.TYPE_UINT64: (0, 2**64 - 1), _F.TYPE_FIXED64: (0, 2**64 - 1),
}
# securecollab.v1.DType codes and their numpy types (kept local: the harness must not trust the code under test).
_DTYPES = {1: "<f4", 2: "<f8", 3: "<i8", 4: "<i4", 5: "u1", 6: "?", 7: "<f2", 8: "i1", 9: "<u8"}
_MAX_ELEMENTS = 1 << 16  # a hint shape with more elements gives an empty tensor instead
_PRESENT = st.integers(0, 3)  # 0: leave the field unset (so a field is set 3 times in 4)


@dataclass
class FuzzReport:
    """Status names counted per method, e.g. ``report.counts["Forward"]["INVALID_ARGUMENT"]``."""

    counts: dict[str, Counter] = field(default_factory=dict)
    # The first details message seen per (method, status name): what the refusals said.
    details: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, method: str, code: grpc.StatusCode, details: str = "") -> None:
        self.counts.setdefault(method, Counter())[code.name] += 1
        self.details.setdefault((method, code.name), details)

    def codes(self, method: str) -> set[str]:
        """The status names ``method`` answered with."""
        return set(self.counts.get(method, {}))

    def merge(self, other: "FuzzReport") -> "FuzzReport":
        for method, counter in other.counts.items():
            self.counts.setdefault(method, Counter()).update(counter)
        for key, text in other.details.items():
            self.details.setdefault(key, text)
        return self


# -- strategies ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Hints:
    strings: tuple[str, ...]
    byte_seeds: tuple[bytes, ...]
    shapes: tuple[tuple[int, ...], ...]
    overrides: Mapping[str, st.SearchStrategy]


def _ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = sorted({lo, hi, max(lo, -1), min(hi, 2**31), min(hi, 2**32), hi // 2 + 1, max(lo, 0)})
    return st.one_of(st.integers(max(lo, -1), min(hi, 3)), st.sampled_from(edges), st.integers(lo, hi))


def _strings(hints: _Hints) -> st.SearchStrategy[str]:
    text = st.text(max_size=24)
    if not hints.strings:
        return text
    # Mostly a hint (a real id gets past the first check), sometimes anything.
    return st.integers(0, 3).flatmap(lambda k: text if k == 0 else st.sampled_from(hints.strings))


@st.composite
def _mutated(draw, seeds: tuple[bytes, ...]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    op = draw(st.sampled_from(["same", "same", "truncate", "flip", "append", "prefix"]))
    if op == "truncate":
        data = data[:draw(st.integers(0, max(0, len(data) - 1)))]
    elif op == "flip" and data:
        i = draw(st.integers(0, len(data) - 1))
        data[i] ^= draw(st.integers(1, 255))
    elif op == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    elif op == "prefix":
        data = bytearray(draw(st.binary(min_size=1, max_size=16))) + data
    return bytes(data)


def _bytes(hints: _Hints) -> st.SearchStrategy[bytes]:
    raw = st.binary(max_size=256)
    return st.one_of(raw, _mutated(hints.byte_seeds)) if hints.byte_seeds else raw


@st.composite
def _tensor(draw, cls, hints: _Hints):
    """A Tensor: mostly consistent (data fits dtype and shape) with nasty values, sometimes not."""
    if draw(st.integers(0, 3)) == 0:  # raw: any dtype code, any shape, any bytes
        return cls(dtype=draw(st.one_of(st.integers(0, 10), _ints(-2**31, 2**31 - 1))),
                   shape=draw(st.lists(_ints(-2**63, 2**63 - 1), max_size=5)),
                   data=draw(st.binary(max_size=256)))
    code = draw(st.one_of(st.just(1), st.sampled_from(sorted(_DTYPES))))  # float32 half the time
    dtype = np.dtype(_DTYPES[code])
    if hints.shapes and draw(st.booleans()):
        shape = tuple(draw(st.sampled_from(hints.shapes)))
    else:
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=4)))
    count = math.prod(shape)
    if count > _MAX_ELEMENTS:
        shape, count = (0,), 0
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    fill = draw(st.sampled_from(["normal", "bytes", "zeros", "nan", "inf", "-inf", "huge", "-huge",
                                 "one_nan", "one_inf", "tiny"]))
    if fill == "bytes" or dtype.kind in "b":
        data = rng.bytes(count * dtype.itemsize)
    else:
        if dtype.kind == "f":
            special = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf, "huge": np.finfo(dtype).max,
                       "-huge": np.finfo(dtype).min, "tiny": np.finfo(dtype).smallest_subnormal,
                       "zeros": 0.0, "one_nan": np.nan, "one_inf": np.inf}
        else:
            info = np.iinfo(dtype)
            special = {"huge": info.max, "-huge": info.min, "tiny": 1, "zeros": 0}
        array = rng.standard_normal(count).astype(dtype) if dtype.kind == "f" else \
            rng.integers(-3, 12, count).astype(dtype)
        if fill in special:
            value = special[fill]
            if fill.startswith("one_"):
                if count:
                    array[rng.integers(0, count)] = value
            else:
                array[:] = value
        data = array.reshape(shape).tobytes()
    slack = draw(st.sampled_from([0, 0, 0, 0, -1, 1, -dtype.itemsize, dtype.itemsize]))
    if slack < 0:
        data = data[:max(0, len(data) + slack)]
    elif slack > 0:
        data += bytes(slack)
    return cls(dtype=code, shape=list(shape), data=data)


@st.composite
def _chunk(draw, cls, hints: _Hints):
    """A Chunk: either a plausible one (one-chunk transfer, right or wrong size and checksum) or random fields."""
    if draw(st.booleans()):
        return draw(_generic(cls.DESCRIPTOR, hints, depth=0))
    data = draw(_bytes(hints))
    total = draw(st.sampled_from([1, 1, 1, 2, 3]))
    seq = draw(st.sampled_from([0, 0, 0, 1, total - 1, total]))
    total_bytes = draw(st.sampled_from([len(data), len(data), len(data) + 1, max(0, len(data) - 1), 2**64 - 1]))
    digest = hashlib.sha256(data).digest()
    sha = draw(st.sampled_from([digest, digest, b"", bytes(32), digest[:31]]))
    transfer_id = draw(st.one_of(st.just("t0"), _strings(hints)))
    return cls(transfer_id=transfer_id, seq=seq, total=total, total_bytes=total_bytes, data=data, sha256=sha)


def _scalar(fd: _d.FieldDescriptor, hints: _Hints) -> st.SearchStrategy:
    if fd.type in _INT_RANGES:
        return _ints(*_INT_RANGES[fd.type])
    if fd.type == _F.TYPE_BOOL:
        return st.booleans()
    if fd.type == _F.TYPE_FLOAT:
        return st.floats(width=32)
    if fd.type == _F.TYPE_DOUBLE:
        return st.floats()
    if fd.type == _F.TYPE_STRING:
        return _strings(hints)
    if fd.type == _F.TYPE_BYTES:
        return _bytes(hints)
    if fd.type == _F.TYPE_ENUM:
        known = st.sampled_from([v.number for v in fd.enum_type.values])
        closed = getattr(fd.enum_type, "is_closed", False)
        return known if closed else st.one_of(known, st.integers(-3, 200))
    raise TypeError(f"no strategy for field {fd.full_name} of type {fd.type}")


def _value(fd: _d.FieldDescriptor, hints: _Hints, depth: int) -> st.SearchStrategy:
    if fd.full_name in hints.overrides:
        return hints.overrides[fd.full_name]
    if fd.type == _F.TYPE_MESSAGE:
        return _message(fd.message_type, hints, depth + 1)
    return _scalar(fd, hints)


def _is_repeated(fd: _d.FieldDescriptor) -> bool:
    repeated = getattr(fd, "is_repeated", None)  # protobuf >= 6; `label` before
    return repeated if repeated is not None else fd.label == _F.LABEL_REPEATED


@st.composite
def _generic(draw, desc: _d.Descriptor, hints: _Hints, depth: int):
    msg = message_factory.GetMessageClass(desc)()
    in_oneof: set[str] = set()
    for oneof in desc.oneofs:
        in_oneof.update(f.name for f in oneof.fields)
        chosen = draw(st.sampled_from([None, *oneof.fields]))
        if chosen is not None:
            _set(msg, chosen, draw(_value(chosen, hints, depth)))
    for fd in desc.fields:
        if fd.name in in_oneof or draw(_PRESENT) == 0:  # mostly set: an absent field stops most requests early
            continue
        if _is_repeated(fd):
            # Nested messages: fewer of them, so messages stay small.
            most = 3 if fd.type == _F.TYPE_MESSAGE else 6
            _set(msg, fd, draw(st.lists(_value(fd, hints, depth), max_size=most if depth < 3 else 0)), repeated=True)
        elif fd.type != _F.TYPE_MESSAGE or depth < 4:
            _set(msg, fd, draw(_value(fd, hints, depth)))
    return msg


def _set(msg, fd: _d.FieldDescriptor, value, repeated: bool = False) -> None:
    if repeated:
        getattr(msg, fd.name).extend(value)
    elif fd.type == _F.TYPE_MESSAGE:
        getattr(msg, fd.name).CopyFrom(value)
    else:
        setattr(msg, fd.name, value)


def _message(desc: _d.Descriptor, hints: _Hints, depth: int = 0) -> st.SearchStrategy:
    if desc.full_name in hints.overrides:
        return hints.overrides[desc.full_name]
    cls = message_factory.GetMessageClass(desc)
    if desc.full_name == TENSOR:
        return _tensor(cls, hints)
    if desc.full_name == CHUNK:
        return _chunk(cls, hints)
    return _generic(desc, hints, depth)


def messages(desc: _d.Descriptor, *, strings: Sequence[str] = (), byte_seeds: Sequence[bytes] = (),
             shapes: Sequence[Sequence[int]] = (),
             overrides: Mapping[str, st.SearchStrategy] | None = None) -> st.SearchStrategy:
    """A strategy of random ``desc`` messages (see the module docstring for the hints)."""
    return _message(desc, _hints(strings, byte_seeds, shapes, overrides))


def _hints(strings, byte_seeds, shapes, overrides) -> _Hints:
    return _Hints(tuple(strings), tuple(bytes(b) for b in byte_seeds), tuple(tuple(s) for s in shapes),
                  dict(overrides or {}))


# -- calling the service --------------------------------------------------------------------


def _callable(channel: grpc.Channel, service: _d.ServiceDescriptor, method: _d.MethodDescriptor, raw: bool):
    path = f"/{service.full_name}/{method.name}"
    if raw:
        ser = deser = None  # bytes in, bytes out
    else:
        ser = message_factory.GetMessageClass(method.input_type).SerializeToString
        deser = message_factory.GetMessageClass(method.output_type).FromString
    kind = {(False, False): channel.unary_unary, (True, False): channel.stream_unary,
            (False, True): channel.unary_stream, (True, True): channel.stream_stream}
    return kind[(method.client_streaming, method.server_streaming)](
        path, request_serializer=ser, response_deserializer=deser)


def _invoke(call, method: _d.MethodDescriptor, request, timeout: float) -> tuple[grpc.StatusCode, str]:
    """(status, details) of one call; a streamed reply is read to its end."""
    if method.client_streaming:
        request = iter(request)
    try:
        reply = call(request, timeout=timeout)
        if method.server_streaming:
            for _ in reply:
                pass
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return SC.OK, ""


def _check_alive(channel: grpc.Channel, service: _d.ServiceDescriptor, valid_after, when: str) -> None:
    for name in ("", service.full_name):
        status = check_health(channel, name)
        assert status == "SERVING", f"after {when}: health of {name or 'the server'!r} is {status}"
    if valid_after is not None:
        valid_after(channel)


def _settings(max_examples: int, derandomize: bool | None):
    if derandomize is None:
        derandomize = not os.environ.get("SECURECOLLAB_FUZZ_RANDOM")
    max_examples = max(1, round(max_examples * float(os.environ.get("SECURECOLLAB_FUZZ_SCALE", "1"))))
    return settings(max_examples=max_examples, deadline=None, derandomize=derandomize, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


def _run(check: Callable, requests: st.SearchStrategy, max_examples: int, derandomize: bool | None) -> None:
    """Run ``check(request)`` on ``max_examples`` examples of ``requests`` under hypothesis."""
    @_settings(max_examples, derandomize)
    @given(request=requests)
    def run(request):
        check(request)

    run()


def _methods(service: _d.ServiceDescriptor, skip_methods: Collection[str]) -> list[_d.MethodDescriptor]:
    unknown = set(skip_methods) - {m.name for m in service.methods}
    if unknown:
        raise ValueError(f"{service.full_name} has no method(s) {sorted(unknown)}")
    return [m for m in service.methods if m.name not in skip_methods]


def fuzz_service(channel: grpc.Channel, service: _d.ServiceDescriptor, *, max_examples: int = 30,
                 allowed: Collection[grpc.StatusCode] = DEFAULT_ALLOWED,
                 extra_allowed: Mapping[str, Collection[grpc.StatusCode]] | None = None,
                 skip_methods: Collection[str] = (), strings: Sequence[str] = (),
                 byte_seeds: Sequence[bytes] = (), shapes: Sequence[Sequence[int]] = (),
                 overrides: Mapping[str, st.SearchStrategy] | None = None,
                 max_stream: int = 4, timeout: float = 10.0, timeouts: Mapping[str, float] | None = None,
                 valid_after: Callable[[grpc.Channel], None] | None = None,
                 derandomize: bool | None = None) -> FuzzReport:
    """Send ``max_examples`` random messages to each method of ``service``; assert the replies and survival.

    channel: a channel to the server (its certificate is the caller's identity).
    service: the ServiceDescriptor, e.g. ``he_pb2.DESCRIPTOR.services_by_name["HEInference"]``.
    allowed: statuses any method may answer with (default :data:`DEFAULT_ALLOWED`).
    extra_allowed: more statuses for some methods, e.g. ``{"GetModel": {DEADLINE_EXCEEDED}}``
        (a method that documents INTERNAL would list it here).
    skip_methods: method names not to call (e.g. one that ends the service's work).
    strings / byte_seeds / shapes: values random strings, bytes and tensor shapes are
        sometimes drawn from (real client ids, a valid ciphertext to mutate, the shapes a
        method expects), so that examples get past the first checks.
    overrides: a strategy per message full name (``"securecollab.v1.Chunk"``) or field
        full name (``"securecollab.v1.InferRequest.ciphertext"``), replacing the built-in one.
    max_stream: at most this many messages for a client-streaming method.
    timeout / timeouts: per-call deadline, default and per method name (short for methods
        that block, with DEADLINE_EXCEEDED in ``extra_allowed``).
    valid_after: called with ``channel`` after each method's examples (after the health
        check); it should make a real request and assert its answer is right.
    Raises AssertionError (with hypothesis's falsifying example) on the first violation.
    """
    hints = _hints(strings, byte_seeds, shapes, overrides)
    report = FuzzReport()
    for method in _methods(service, skip_methods):
        ok = set(allowed) | set((extra_allowed or {}).get(method.name, ()))
        call = _callable(channel, service, method, raw=False)
        one = _message(method.input_type, hints)
        requests = st.lists(one, max_size=max_stream) if method.client_streaming else one
        limit = (timeouts or {}).get(method.name, timeout)

        def check(request, method=method, call=call, ok=ok, limit=limit):
            code, details = _invoke(call, method, request, limit)
            report.add(method.name, code, details)
            assert code in ok, f"{method.name} answered {code.name} ({details!r}) to {_short(request)}"
            assert code == SC.OK or details.strip(), f"{method.name} answered {code.name} with no details"

        _run(check, requests, max_examples, derandomize)
        _check_alive(channel, service, valid_after, f"fuzzing {method.name}")
    return report


def fuzz_raw(channel: grpc.Channel, service: _d.ServiceDescriptor, *, max_examples: int = 30,
             skip_methods: Collection[str] = (), max_stream: int = 3, timeout: float = 10.0,
             timeouts: Mapping[str, float] | None = None,
             valid_after: Callable[[grpc.Channel], None] | None = None,
             derandomize: bool | None = None) -> FuzzReport:
    """Send random bytes as the serialized request(s) of each method; the service must survive.

    Half the examples are random bytes, half are serializations of random messages
    with bytes flipped, cut or appended. What does not parse is refused before
    the handler; the status must never be UNKNOWN (an unhandled exception in a
    handler) nor UNAVAILABLE (a dead server). Afterwards the health check and
    ``valid_after`` run as in :func:`fuzz_service`. Arguments as there.
    """
    report = FuzzReport()
    for method in _methods(service, skip_methods):
        call = _callable(channel, service, method, raw=True)
        serialized = _message(method.input_type, _hints((), (), (), None)).map(lambda m: m.SerializeToString())
        one = st.one_of(st.binary(max_size=128),
                        st.tuples(serialized, st.integers(0, 2**16), st.integers(1, 255), st.integers(0, 3))
                        .map(_damage))
        requests = st.lists(one, max_size=max_stream) if method.client_streaming else one
        limit = (timeouts or {}).get(method.name, timeout)

        def check(request, method=method, call=call, limit=limit):
            code, details = _invoke(call, method, request, limit)
            report.add(method.name, code, details)
            assert code not in (SC.UNKNOWN, SC.UNAVAILABLE), \
                f"{method.name} answered {code.name} ({details!r}) to raw bytes {_short(request)}"

        _run(check, requests, max_examples, derandomize)
        _check_alive(channel, service, valid_after, f"raw bytes to {method.name}")
    return report


def _short(value, limit: int = 600) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _damage(args: tuple[bytes, int, int, int]) -> bytes:
    data, where, xor, how = args
    data = bytearray(data)
    if not data or how == 0:
        return bytes(data) + bytes([xor])
    i = where % len(data)
    if how == 1:
        data[i] ^= xor
    elif how == 2:
        del data[i:]
    else:
        data[i:i] = bytes([xor, xor])
    return bytes(data)


# -- small helpers for targeted bad-input tests -------------------------------------------------


def refusal(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    """(status, details) of a call that must fail; AssertionError if it succeeds.

    A streamed reply is read to its end (a stream's refusal may come after a reply or two).
    """
    try:
        reply = call(*args, **kwargs)
        if hasattr(reply, "__next__"):
            for _ in reply:
                pass
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    raise AssertionError(f"the call succeeded: {reply!r:.200}")


def lax_channel(target: str, tls: TlsFiles, max_message_bytes: int = 64 << 20) -> grpc.Channel:
    """A channel that will send messages past the transport's limit (only the server's limit then applies)."""
    return make_channel(target, tls=tls, max_message_bytes=max_message_bytes)


def same_ca_certs(cert_dir: Path, out_dir: Path, specs: Sequence[str]) -> Path:
    """Issue ``party_id:role`` certificates from ``cert_dir``'s CA into ``out_dir`` (e.g. a client id with a
    role other than client, which would clash with that client's own files in ``cert_dir``); returns out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in (CA_CERT, CA_KEY):
        shutil.copy(Path(cert_dir) / name, out / name)
    make_certs(out, list(specs))
    return out
