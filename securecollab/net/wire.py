"""Wire format: numpy/torch tensors and large opaque payloads to and from securecollab.v1 messages.

Every decoder here validates what it is given and raises `WireError` (a
ValueError) with a message fit for a gRPC status; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from securecollab.generated.v1 import tensor_pb2 as pb

# 1 MiB chunks keep every message well under gRPC's default 4 MiB limit, so any
# peer can receive them (4 MiB chunks measured no faster in bench secagg).
CHUNK_BYTES = 1 << 20
# Refuse absurd payloads before allocating for them (HE contexts are ~100 MB).
MAX_PAYLOAD_BYTES = 1 << 30
MAX_TENSOR_ELEMENTS = 1 << 31

_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
    pb.DTYPE_FLOAT16: np.dtype("<f2"),
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_INT8: np.dtype("i1"),
    pb.DTYPE_UINT8: np.dtype("u1"),
    pb.DTYPE_UINT64: np.dtype("<u8"),
    pb.DTYPE_BOOL: np.dtype("?"),
}
_CODES = {dt.newbyteorder("<") if dt.itemsize > 1 else dt: code for code, dt in _DTYPES.items()}


class WireError(ValueError):
    """A message that does not decode to what it claims to be."""


def dtype_code(dtype) -> int:
    """The wire code of a numpy dtype (little-endian); WireError if it has none."""
    dtype = np.dtype(dtype)
    code = _CODES.get(dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)
    if code is None:
        raise WireError(f"unsupported dtype {dtype}")
    return code


def code_dtype(code: int) -> np.dtype:
    """The (little-endian) numpy dtype of a wire code; WireError if unknown."""
    if code not in _DTYPES:
        raise WireError(f"unknown dtype code {code}")
    return _DTYPES[code]


def encode_tensor(array) -> pb.Tensor:
    """Encode a numpy array or torch tensor (any supported dtype, any shape)."""
    if not isinstance(array, np.ndarray):
        array = _torch_to_numpy(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    code = _CODES.get(dtype)
    if code is None:
        raise WireError(f"unsupported dtype {array.dtype}")
    data = np.ascontiguousarray(array, dtype=dtype).tobytes()
    return pb.Tensor(dtype=code, shape=list(array.shape), data=data)


def decode_tensor(msg: pb.Tensor, *, expect_dtype=None, expect_shape=None,
                  finite: bool = False) -> np.ndarray:
    """Decode a Tensor, checking its dtype, shape and byte length (and finiteness if asked)."""
    dtype = _DTYPES.get(msg.dtype)
    if dtype is None:
        raise WireError(f"unknown dtype code {msg.dtype}")
    shape = tuple(msg.shape)
    if any(d < 0 for d in shape):
        raise WireError(f"negative dimension in shape {shape}")
    count = math.prod(shape)
    if count > MAX_TENSOR_ELEMENTS:
        raise WireError(f"tensor of {count} elements exceeds the limit")
    if len(msg.data) != count * dtype.itemsize:
        raise WireError(
            f"tensor data is {len(msg.data)} bytes; shape {shape} of {dtype.name} needs "
            f"{count * dtype.itemsize}")
    if expect_dtype is not None and dtype != np.dtype(expect_dtype).newbyteorder("<"):
        raise WireError(f"expected dtype {np.dtype(expect_dtype).name}, got {dtype.name}")
    if expect_shape is not None and shape != tuple(expect_shape):
        raise WireError(f"expected shape {tuple(expect_shape)}, got {shape}")
    if len(shape) > 32:
        raise WireError(f"tensor rank {len(shape)} exceeds 32")
    try:
        array = np.frombuffer(msg.data, dtype=dtype).reshape(shape)
    except ValueError as e:  # shapes numpy cannot build, e.g. a zero dim beside a huge one
        raise WireError(f"shape {shape} cannot be built: {e}") from None
    if finite and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise WireError("tensor contains NaN or Inf")
    # Native byte order and writable, so callers can hand it to torch directly.
    return array.astype(dtype.newbyteorder("="), copy=True)


def encode_named(named: Iterable[tuple[str, object]]) -> list[pb.NamedTensor]:
    return [pb.NamedTensor(name=name, tensor=encode_tensor(arr)) for name, arr in named]


def decode_named(msgs: Sequence[pb.NamedTensor], *, expect: dict[str, tuple] | None = None,
                 finite: bool = False, expect_dtype=None) -> list[tuple[str, np.ndarray]]:
    """Decode named tensors; with `expect` ({name: shape}), names and shapes must match exactly.

    With `expect_dtype`, every tensor must have that dtype (e.g. float32 model weights).
    """
    out = []
    seen = set()
    for m in msgs:
        if m.name in seen:
            raise WireError(f"duplicate tensor name {m.name!r}")
        seen.add(m.name)
        shape = None
        if expect is not None:
            if m.name not in expect:
                raise WireError(f"unexpected tensor {m.name!r}")
            shape = expect[m.name]
        try:
            out.append((m.name, decode_tensor(m.tensor, expect_shape=shape, finite=finite,
                                              expect_dtype=expect_dtype)))
        except WireError as e:
            raise WireError(f"tensor {m.name!r}: {e}") from None
    if expect is not None and seen != set(expect):
        raise WireError(f"missing tensors: {sorted(set(expect) - seen)}")
    return out


def iter_chunks(payload: bytes, *, transfer_id: str | None = None,
                chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.Chunk]:
    """Split `payload` into ordered Chunk messages; the last one carries the SHA-256."""
    if chunk_bytes <= 0:
        raise ValueError("chunk_bytes must be positive")
    transfer_id = transfer_id or uuid.uuid4().hex
    view = memoryview(payload)
    total = max(1, math.ceil(len(view) / chunk_bytes))
    digest = hashlib.sha256(view).digest()
    for seq in range(total):
        piece = view[seq * chunk_bytes:(seq + 1) * chunk_bytes]
        yield pb.Chunk(transfer_id=transfer_id, seq=seq, total=total, total_bytes=len(view),
                       data=bytes(piece), sha256=digest if seq == total - 1 else b"")


def assemble_chunks(chunks: Iterable[pb.Chunk], *, max_bytes: int = MAX_PAYLOAD_BYTES) -> tuple[str, bytes]:
    """Reassemble one transfer, checking order, count, size and checksum; returns (transfer_id, payload)."""
    buf = bytearray()
    transfer_id, total, total_bytes, expected_seq = None, None, None, 0
    digest_ok = False
    for chunk in chunks:
        if transfer_id is None:
            transfer_id, total, total_bytes = chunk.transfer_id, chunk.total, chunk.total_bytes
            if not transfer_id:
                raise WireError("chunk without transfer_id")
            if total == 0:
                raise WireError("transfer declares zero chunks")
            if total_bytes > max_bytes:
                raise WireError(f"payload of {total_bytes} bytes exceeds the limit of {max_bytes}")
        elif (chunk.transfer_id, chunk.total, chunk.total_bytes) != (transfer_id, total, total_bytes):
            raise WireError(f"chunk {chunk.seq} does not belong to transfer {transfer_id}")
        if digest_ok:
            raise WireError(f"more than the {total} declared chunks")
        if chunk.seq != expected_seq:
            kind = "duplicated" if chunk.seq < expected_seq else "missing or out of order"
            raise WireError(f"chunk {expected_seq} expected, got {chunk.seq} ({kind})")
        if expected_seq >= total:
            raise WireError(f"more than the {total} declared chunks")
        if len(buf) + len(chunk.data) > total_bytes:
            raise WireError(f"chunks exceed the declared {total_bytes} bytes")
        buf += chunk.data
        expected_seq += 1
        if expected_seq == total:
            if len(buf) != total_bytes:
                raise WireError(f"received {len(buf)} bytes, {total_bytes} declared (truncated)")
            if hashlib.sha256(buf).digest() != chunk.sha256:
                raise WireError("payload checksum mismatch")
            digest_ok = True
    if transfer_id is None:
        raise WireError("empty transfer: no chunks")
    if expected_seq < total:
        raise WireError(f"transfer {transfer_id} truncated: {expected_seq} of {total} chunks")
    return transfer_id, bytes(buf)


def _torch_to_numpy(tensor) -> np.ndarray:
    try:
        return tensor.detach().cpu().contiguous().numpy()
    except (AttributeError, TypeError):  # not a tensor, or a dtype numpy lacks (bfloat16)
        raise WireError(f"cannot encode object of type {type(tensor).__name__}") from None
