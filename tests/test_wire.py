"""Specification of the wire format (securecollab.net.wire): tensors, named tensors and chunked payloads.

What must hold:
* every dtype of the proto round-trips bit-exactly from numpy and torch, whatever the
  input's layout (0-d, empty, non-contiguous, big-endian), as row-major little-endian bytes;
* every decoder refuses malformed input with a WireError whose message names the problem,
  and never raises anything else on hostile bytes (fuzzed here);
* chunked transfers reassemble exactly, and any tampering (order, count, size, checksum,
  mixing transfers) is refused;
* over a real mTLS gRPC stream, a 100 MB payload goes through in chunks with default
  message limits, while the same payload as one message is refused.
"""

from __future__ import annotations

import hashlib
import math
from datetime import timedelta

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from securecollab.generated.v1 import tensor_pb2 as pb
from securecollab.net.transport import MAX_MESSAGE_BYTES, make_channel, make_server
from securecollab.net.wire import (
    CHUNK_BYTES,
    MAX_TENSOR_ELEMENTS,
    WireError,
    assemble_chunks,
    decode_named,
    decode_tensor,
    encode_named,
    encode_tensor,
    iter_chunks,
)

# Deterministic fuzzing (same examples on every run of this Hypothesis version), with a
# per-example deadline so that a decoder that starts to crawl on some input fails loudly.
FUZZ = settings(max_examples=300, deadline=timedelta(seconds=2), derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROPERTY = settings(max_examples=100, deadline=timedelta(seconds=2), derandomize=True, database=None)

# numpy dtype (little-endian) and the proto code it must travel as.
DTYPES = [
    (np.float32, pb.DTYPE_FLOAT32),
    (np.float64, pb.DTYPE_FLOAT64),
    (np.float16, pb.DTYPE_FLOAT16),
    (np.int64, pb.DTYPE_INT64),
    (np.int32, pb.DTYPE_INT32),
    (np.int8, pb.DTYPE_INT8),
    (np.uint8, pb.DTYPE_UINT8),
    (np.uint64, pb.DTYPE_UINT64),
    (np.bool_, pb.DTYPE_BOOL),
]
TORCH_DTYPES = [
    (torch.float32, np.float32), (torch.float64, np.float64), (torch.float16, np.float16),
    (torch.int64, np.int64), (torch.int32, np.int32), (torch.int8, np.int8),
    (torch.uint8, np.uint8), (torch.uint64, np.uint64), (torch.bool, np.bool_),
]


def _sample(dtype, shape, seed=0) -> np.ndarray:
    """Values that exercise the whole range of a dtype (extremes, negatives, NaN/Inf for floats)."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    n = math.prod(shape)
    if dtype.kind == "b":
        flat = rng.integers(0, 2, n).astype(bool)
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        flat = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        flat[: min(n, 2)] = [info.min, info.max][: min(n, 2)]
    else:
        flat = rng.standard_normal(n).astype(dtype) * dtype.type(100)
        specials = np.array([np.nan, np.inf, -np.inf, -0.0, np.finfo(dtype).max, np.finfo(dtype).tiny],
                            dtype=dtype)
        flat[: min(n, len(specials))] = specials[: min(n, len(specials))]
    return flat.reshape(shape)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-for-bit equal values, dtype and shape (NaN == NaN, -0.0 != 0.0)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes())


def _tensor(dtype=pb.DTYPE_FLOAT32, shape=(2, 3), data: bytes | None = None) -> pb.Tensor:
    if data is None:
        data = bytes(4 * math.prod(shape))
    return pb.Tensor(dtype=dtype, shape=list(shape), data=data)


# --------------------------------------------------------------------------- tensors: round trips

def test_dtype_table_covers_every_proto_dtype():
    assert {code for _, code in DTYPES} == set(pb.DType.values()) - {pb.DTYPE_UNSPECIFIED}


@pytest.mark.parametrize("dtype,code", DTYPES, ids=[np.dtype(d).name for d, _ in DTYPES])
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 4), (2, 0, 5), (2, 3, 4, 1)], ids=str)
def test_numpy_round_trip(dtype, code, shape):
    arr = _sample(dtype, shape)
    msg = encode_tensor(arr)
    assert msg.dtype == code
    assert tuple(msg.shape) == shape
    # The payload is exactly the row-major little-endian bytes.
    assert msg.data == arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    # ... and survives serialization.
    out = decode_tensor(pb.Tensor.FromString(msg.SerializeToString()))
    assert _same(out, arr)
    assert out.dtype.isnative and out.flags.writeable and out.flags.c_contiguous


@pytest.mark.parametrize("tdtype,ndtype", TORCH_DTYPES, ids=[str(t) for t, _ in TORCH_DTYPES])
def test_torch_round_trip(tdtype, ndtype):
    expected = _sample(ndtype, (3, 5), seed=1)
    t = torch.from_numpy(expected.copy())
    assert t.dtype == tdtype
    out = decode_tensor(encode_tensor(t))
    assert _same(out, expected)
    # Torch takes the decoded array as is (native order, writable) and gets its dtype back.
    back = torch.from_numpy(out)
    assert back.dtype == tdtype and back.shape == t.shape


def test_torch_inputs_needing_detach_or_copy():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    grad = (base * 2).requires_grad_(True)
    assert _same(decode_tensor(encode_tensor(grad)), (base * 2).numpy())
    strided = base.t()[::2]  # non-contiguous view
    assert not strided.is_contiguous()
    assert _same(decode_tensor(encode_tensor(strided)), strided.contiguous().numpy())
    assert _same(decode_tensor(encode_tensor(torch.tensor(2.5))), np.array(2.5, dtype=np.float32))


def test_non_contiguous_numpy_inputs():
    base = _sample(np.int32, (6, 8), seed=2)
    for view in (base[::2, ::3], base.T, base[:, 1], np.asfortranarray(base), base[::-1]):
        out = decode_tensor(encode_tensor(view))
        assert out.shape == view.shape
        assert np.array_equal(out, view)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">f2", ">i8", ">i4", ">u8"])
def test_big_endian_input_travels_as_little_endian(dtype):
    native = _sample(np.dtype(dtype).newbyteorder("="), (4, 3), seed=3)
    big = native.astype(dtype)
    msg = encode_tensor(big)
    assert msg.data == native.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    out = decode_tensor(msg)
    assert out.dtype.isnative
    assert _same(out, native)


def test_large_tensor_round_trip():
    arr = np.random.default_rng(4).standard_normal(4 * 1024 * 1024, dtype=np.float32).reshape(2048, 2048)
    msg = encode_tensor(arr)
    assert len(msg.data) == 16 * 1024 * 1024
    out = decode_tensor(msg, expect_dtype=np.float32, expect_shape=(2048, 2048), finite=True)
    assert np.array_equal(out, arr)


def test_decoded_array_does_not_alias_the_message():
    msg = encode_tensor(np.arange(4, dtype=np.int64))
    out = decode_tensor(msg)
    out[:] = -1
    assert np.array_equal(decode_tensor(msg), np.arange(4))


@pytest.mark.parametrize("bad", [np.zeros(3, np.int16), np.zeros(3, np.uint32), np.zeros(2, np.complex64),
                                 np.array(["a"]), np.array([object()], dtype=object)],
                         ids=["int16", "uint32", "complex64", "str", "object"])
def test_encode_refuses_unsupported_dtypes(bad):
    with pytest.raises(WireError, match="unsupported dtype"):
        encode_tensor(bad)


def test_encode_refuses_non_tensors():
    with pytest.raises(WireError, match="cannot encode object of type list"):
        encode_tensor([1.0, 2.0])


def test_encode_refuses_unsupported_torch_dtype_with_wire_error():
    with pytest.raises(WireError, match="unsupported dtype|cannot encode"):
        encode_tensor(torch.zeros(3, dtype=torch.bfloat16))


# --------------------------------------------------------------------------- tensors: refusals

def test_decode_wrong_byte_length():
    with pytest.raises(WireError, match=r"23 bytes.*\(2, 3\).*float32.*24"):
        decode_tensor(_tensor(shape=(2, 3), data=bytes(23)))
    with pytest.raises(WireError, match=r"25 bytes"):
        decode_tensor(_tensor(shape=(2, 3), data=bytes(25)))
    with pytest.raises(WireError, match="needs 8"):  # a 0-d float64 is one element
        decode_tensor(pb.Tensor(dtype=pb.DTYPE_FLOAT64, data=bytes(4)))
    with pytest.raises(WireError, match="needs 0"):  # empty shape dimension means no bytes at all
        decode_tensor(_tensor(shape=(3, 0), data=b"\x00"))


@pytest.mark.parametrize("shape", [(-1,), (2, -3), (-2, -2)], ids=str)
def test_decode_negative_dims(shape):
    with pytest.raises(WireError, match="negative dimension"):
        decode_tensor(_tensor(shape=shape, data=bytes(16)))


@pytest.mark.parametrize("code", [pb.DTYPE_UNSPECIFIED, 10, 99, -1])
def test_decode_unknown_dtype_code(code):
    with pytest.raises(WireError, match=f"unknown dtype code {code}"):
        decode_tensor(pb.Tensor(dtype=code, shape=[1], data=bytes(4)))


def test_decode_too_many_elements_refused_before_anything_else():
    with pytest.raises(WireError, match="exceeds the limit"):
        decode_tensor(_tensor(shape=(MAX_TENSOR_ELEMENTS + 1,), data=b""))
    with pytest.raises(WireError, match="exceeds the limit"):
        decode_tensor(_tensor(shape=(1 << 40, 1 << 40), data=b""))


def test_decode_expect_dtype():
    msg = encode_tensor(np.zeros((2, 2), np.float32))
    assert decode_tensor(msg, expect_dtype=np.float32).dtype == np.float32
    assert decode_tensor(msg, expect_dtype="<f4").dtype == np.float32
    with pytest.raises(WireError, match="expected dtype float64, got float32"):
        decode_tensor(msg, expect_dtype=np.float64)
    with pytest.raises(WireError, match="expected dtype int32, got float32"):
        decode_tensor(msg, expect_dtype="int32")  # same itemsize, still refused


def test_decode_expect_shape():
    msg = encode_tensor(np.zeros((2, 3), np.int64))
    assert decode_tensor(msg, expect_shape=[2, 3]).shape == (2, 3)
    with pytest.raises(WireError, match=r"expected shape \(3, 2\), got \(2, 3\)"):
        decode_tensor(msg, expect_shape=(3, 2))  # same element count, still refused
    with pytest.raises(WireError, match=r"expected shape \(6,\), got \(2, 3\)"):
        decode_tensor(msg, expect_shape=(6,))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_decode_finite_refuses_nan_inf(dtype, bad):
    arr = np.ones((3, 3), dtype)
    arr[1, 2] = bad
    msg = encode_tensor(arr)
    with pytest.raises(WireError, match="NaN or Inf"):
        decode_tensor(msg, finite=True)
    assert _same(decode_tensor(msg), arr)  # without finite=True it is just a value


def test_decode_finite_accepts_finite_and_integer_tensors():
    big = np.array([np.finfo(np.float16).max, -np.finfo(np.float16).max], np.float16)
    assert _same(decode_tensor(encode_tensor(big), finite=True), big)
    ints = np.array([np.iinfo(np.int64).min, 0], np.int64)
    assert _same(decode_tensor(encode_tensor(ints), finite=True), ints)


@pytest.mark.parametrize("shape", [[1] * 65, [0, 1 << 62, 1 << 62], [0, (1 << 63) - 1]], ids=["65-dims", "0x2^62x2^62", "0x2^63-1"])
def test_decode_unrepresentable_shape_is_a_wire_error(shape):
    data = b"" if 0 in shape else bytes(4)
    with pytest.raises(WireError):
        decode_tensor(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape, data=data))


# --------------------------------------------------------------------------- named tensors

def test_named_round_trip_keeps_order_names_and_values():
    named = [("w", _sample(np.float32, (3, 2))), ("b", _sample(np.float32, (2,), seed=5)),
             ("step", np.array(7, np.int64)), ("mask", _sample(np.bool_, (4,)))]
    msgs = encode_named(named)
    assert [m.name for m in msgs] == ["w", "b", "step", "mask"]
    out = decode_named(msgs)
    assert [n for n, _ in out] == ["w", "b", "step", "mask"]
    for (_, a), (_, b) in zip(named, out):
        assert _same(a, b)
    out = decode_named(msgs, expect={"b": (2,), "w": (3, 2), "step": (), "mask": (4,)})
    assert [n for n, _ in out] == ["w", "b", "step", "mask"]


def test_named_duplicate_names():
    msgs = encode_named([("w", np.zeros(2)), ("b", np.zeros(1)), ("w", np.ones(2))])
    with pytest.raises(WireError, match="duplicate tensor name 'w'"):
        decode_named(msgs)


def test_named_unexpected_name():
    msgs = encode_named([("w", np.zeros(2)), ("z", np.zeros(1))])
    with pytest.raises(WireError, match="unexpected tensor 'z'"):
        decode_named(msgs, expect={"w": (2,), "b": (1,)})


def test_named_missing_names():
    msgs = encode_named([("w", np.zeros(2))])
    with pytest.raises(WireError, match=r"missing tensors: \['a', 'b'\]"):
        decode_named(msgs, expect={"w": (2,), "b": (1,), "a": (3,)})
    with pytest.raises(WireError, match=r"missing tensors: \['w'\]"):
        decode_named([], expect={"w": (2,)})


def test_named_shape_and_finiteness_are_checked_per_tensor():
    msgs = encode_named([("w", np.zeros((2, 2))), ("b", np.array([np.nan]))])
    with pytest.raises(WireError, match=r"expected shape \(4,\)"):
        decode_named(msgs, expect={"w": (4,), "b": (1,)})
    with pytest.raises(WireError, match="NaN or Inf"):
        decode_named(msgs, expect={"w": (2, 2), "b": (1,)}, finite=True)


# --------------------------------------------------------------------------- chunking: round trips

def _chunks(payload: bytes, chunk_bytes: int = 10, transfer_id: str = "t1") -> list[pb.Chunk]:
    return list(iter_chunks(payload, transfer_id=transfer_id, chunk_bytes=chunk_bytes))


def _copy(chunk: pb.Chunk, **changes) -> pb.Chunk:
    out = pb.Chunk()
    out.CopyFrom(chunk)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def _check_chunking(payload: bytes, chunk_bytes: int) -> None:
    chunks = _chunks(payload, chunk_bytes)
    total = max(1, math.ceil(len(payload) / chunk_bytes))
    assert len(chunks) == total
    assert [c.seq for c in chunks] == list(range(total))
    assert all(c.total == total and c.total_bytes == len(payload) and c.transfer_id == "t1" for c in chunks)
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert b"".join(c.data for c in chunks) == payload
    # Only the last chunk carries the checksum of the whole payload.
    assert chunks[-1].sha256 == hashlib.sha256(payload).digest()
    assert all(c.sha256 == b"" for c in chunks[:-1])
    wire = [pb.Chunk.FromString(c.SerializeToString()) for c in chunks]
    assert assemble_chunks(wire) == ("t1", payload)


@pytest.mark.parametrize("size,chunk_bytes", [(0, 10), (1, 10), (1, 1), (10, 10), (30, 10), (31, 10),
                                               (9, 10), (4096, 1024), (4097, 1024)])
def test_chunking_round_trip(size, chunk_bytes):
    _check_chunking(bytes(range(256)) * (size // 256) + bytes(range(size % 256)), chunk_bytes)


def test_chunking_default_chunk_size_and_transfer_id():
    payload = bytes(CHUNK_BYTES * 2 + 1)
    chunks = list(iter_chunks(payload))
    assert [len(c.data) for c in chunks] == [CHUNK_BYTES, CHUNK_BYTES, 1]
    assert all(c.ByteSize() < 4 * 1024 * 1024 for c in chunks)  # gRPC's default limit
    tid = chunks[0].transfer_id
    assert tid and all(c.transfer_id == tid for c in chunks)
    assert list(iter_chunks(b"x"))[0].transfer_id != tid  # fresh id per transfer
    assert assemble_chunks(chunks) == (tid, payload)


def test_chunking_accepts_bytearray_and_memoryview():
    payload = bytearray(b"abcdefghijk")
    assert assemble_chunks(iter_chunks(memoryview(payload), chunk_bytes=3))[1] == bytes(payload)
    assert assemble_chunks(iter_chunks(payload, chunk_bytes=3))[1] == bytes(payload)


@pytest.mark.parametrize("chunk_bytes", [0, -1])
def test_chunking_refuses_non_positive_chunk_size(chunk_bytes):
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        list(iter_chunks(b"abc", chunk_bytes=chunk_bytes))


@PROPERTY
@given(payload=st.binary(max_size=3000), chunk_bytes=st.integers(1, 700))
def test_chunking_round_trip_random_sizes(payload, chunk_bytes):
    _check_chunking(payload, chunk_bytes)


# --------------------------------------------------------------------------- chunking: refusals

PAYLOAD = bytes(range(35))  # 4 chunks of 10, 10, 10, 5 bytes


@pytest.fixture
def chunks() -> list[pb.Chunk]:
    out = _chunks(PAYLOAD, 10)
    assert len(out) == 4
    return out


def test_assemble_empty_stream():
    with pytest.raises(WireError, match="empty transfer: no chunks"):
        assemble_chunks([])


def test_assemble_duplicated_chunk(chunks):
    with pytest.raises(WireError, match=r"chunk 2 expected, got 1 \(duplicated\)"):
        assemble_chunks([chunks[0], chunks[1], chunks[1], chunks[2], chunks[3]])


def test_assemble_out_of_order(chunks):
    with pytest.raises(WireError, match=r"chunk 1 expected, got 2 \(missing or out of order\)"):
        assemble_chunks([chunks[0], chunks[2], chunks[1], chunks[3]])
    with pytest.raises(WireError, match=r"chunk 0 expected, got 1"):
        assemble_chunks(chunks[1:])


def test_assemble_missing_last_chunk(chunks):
    with pytest.raises(WireError, match="transfer t1 truncated: 3 of 4 chunks"):
        assemble_chunks(chunks[:3])


def test_assemble_extra_chunk_after_last(chunks):
    extra = pb.Chunk(transfer_id="t1", seq=4, total=4, total_bytes=35, data=b"")
    with pytest.raises(WireError, match="more than the 4 declared chunks"):
        assemble_chunks([*chunks, extra])


def test_assemble_data_beyond_declared_size(chunks):
    fat = _copy(chunks[1], data=chunks[1].data + b"!")
    with pytest.raises(WireError, match="chunks exceed the declared 35 bytes"):
        assemble_chunks([chunks[0], fat, chunks[2], chunks[3]])


def test_assemble_fewer_bytes_than_declared(chunks):
    thin = _copy(chunks[1], data=chunks[1].data[:-2])
    with pytest.raises(WireError, match=r"received 33 bytes, 35 declared \(truncated\)"):
        assemble_chunks([chunks[0], thin, chunks[2], chunks[3]])


@pytest.mark.parametrize("where", ["first-data", "last-data", "checksum", "no-checksum"])
def test_assemble_bad_checksum(chunks, where):
    if where == "first-data":
        chunks[0] = _copy(chunks[0], data=b"X" + chunks[0].data[1:])
    elif where == "last-data":
        chunks[3] = _copy(chunks[3], data=chunks[3].data[:-1] + b"\xff")
    elif where == "checksum":
        chunks[3] = _copy(chunks[3], sha256=hashlib.sha256(b"something else").digest())
    else:
        chunks[3] = _copy(chunks[3], sha256=b"")
    with pytest.raises(WireError, match="payload checksum mismatch"):
        assemble_chunks(chunks)


def test_assemble_mixed_transfers(chunks):
    other = _chunks(PAYLOAD, 10, transfer_id="t2")
    with pytest.raises(WireError, match="chunk 2 does not belong to transfer t1"):
        assemble_chunks([chunks[0], chunks[1], other[2], other[3]])
    # Same id but a different declared shape of the transfer is another transfer too.
    for field, value in (("total", 5), ("total_bytes", 36)):
        bad = _copy(chunks[2], **{field: value})
        with pytest.raises(WireError, match="does not belong to transfer t1"):
            assemble_chunks([chunks[0], chunks[1], bad, chunks[3]])


def test_assemble_refuses_oversized_declaration_before_reading_on(chunks):
    consumed = []

    def stream():
        for c in chunks:
            consumed.append(c.seq)
            yield c

    with pytest.raises(WireError, match="payload of 35 bytes exceeds the limit of 34"):
        assemble_chunks(stream(), max_bytes=34)
    assert consumed == [0]  # nothing past the first chunk was pulled
    assert assemble_chunks(chunks, max_bytes=35) == ("t1", PAYLOAD)
    huge = pb.Chunk(transfer_id="t", seq=0, total=1, total_bytes=(1 << 64) - 1)
    with pytest.raises(WireError, match="exceeds the limit"):
        assemble_chunks([huge])


def test_assemble_refuses_bad_first_chunk():
    with pytest.raises(WireError, match="chunk without transfer_id"):
        assemble_chunks([pb.Chunk(seq=0, total=1, total_bytes=0, sha256=hashlib.sha256(b"").digest())])
    with pytest.raises(WireError, match="transfer declares zero chunks"):
        assemble_chunks([pb.Chunk(transfer_id="t", seq=0, total=0, total_bytes=0)])


# --------------------------------------------------------------------------- fuzzing

ALLOWED = (WireError, DecodeError)


def _decode_all_ways(msg: pb.Tensor) -> np.ndarray | None:
    """Decode with and without checks; only WireError may come out. Returns the plain decode."""
    out = None
    for kwargs in ({}, {"finite": True}, {"expect_dtype": np.float32, "expect_shape": (2, 2)}):
        try:
            res = decode_tensor(msg, **kwargs)
        except WireError as e:
            assert str(e)
            continue
        assert isinstance(res, np.ndarray)
        assert res.shape == tuple(msg.shape)
        assert res.nbytes == len(msg.data)
        if not kwargs:
            out = res
    return out


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_tensor_from_random_bytes(raw):
    try:
        msg = pb.Tensor.FromString(raw)
    except DecodeError:
        return
    _decode_all_ways(msg)


def _shapes():
    # Up to 5 dims of at most 1000 keeps element counts representable by numpy even next to a 0;
    # shapes numpy cannot represent at all are covered by test_decode_unrepresentable_shape_is_a_wire_error.
    dims = st.one_of(st.integers(-3, 4), st.integers(-(1 << 63), 1000))
    return st.lists(dims, max_size=5)


@FUZZ
@given(code=st.integers(-2, 12), shape=_shapes(), data=st.data())
def test_fuzz_tensor_structured(code, shape, data):
    n = math.prod(shape) if all(d >= 0 for d in shape) else 0
    itemsize = {c: np.dtype(d).itemsize for d, c in DTYPES}.get(code, 4)
    exact = n * itemsize if 0 <= n * itemsize <= 4096 else 0
    length = data.draw(st.sampled_from([exact, exact + 1, max(exact - 1, 0), 0]))
    payload = data.draw(st.binary(min_size=length, max_size=length))
    msg = pb.Tensor(dtype=code, shape=shape, data=payload)
    out = _decode_all_ways(pb.Tensor.FromString(msg.SerializeToString()))
    if out is not None:
        dtype = dict((c, np.dtype(d)) for d, c in DTYPES)[code]
        assert out.dtype == dtype
        if dtype.kind == "b":  # any nonzero byte reads as True
            assert np.array_equal(out.reshape(-1), np.frombuffer(payload, np.uint8) != 0)
        else:
            assert out.tobytes() == payload


@FUZZ
@given(arr=hnp.arrays(st.sampled_from([np.dtype(d) for d, _ in DTYPES]),
                      hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)),
       cut=st.integers(0, 10_000))
def test_fuzz_tensor_truncated(arr, cut):
    raw = encode_tensor(arr).SerializeToString()
    cut = cut % (len(raw) + 1)
    try:
        msg = pb.Tensor.FromString(raw[:cut])
    except DecodeError:
        return
    try:
        out = decode_tensor(msg)
    except WireError:
        return
    # A prefix that still decodes must have lost nothing (only possible when data was empty).
    assert _same(out, arr) or (arr.dtype.kind == "f" and np.array_equal(out, arr, equal_nan=True))


def _assemble_ok_or_wire_error(chunks, payload=None):
    try:
        tid, got = assemble_chunks(chunks)
    except WireError as e:
        assert str(e)
        return None
    assert isinstance(got, bytes)
    if payload is not None:
        assert got == payload, "a tampered transfer must never assemble to other bytes"
    return got


@FUZZ
@given(st.lists(st.binary(max_size=80), max_size=6))
def test_fuzz_chunks_from_random_bytes(raws):
    msgs = []
    for raw in raws:
        try:
            msgs.append(pb.Chunk.FromString(raw))
        except DecodeError:
            return
    _assemble_ok_or_wire_error(msgs)


MUTATIONS = ["drop", "duplicate", "swap", "transfer_id", "seq", "total", "total_bytes", "data", "sha256"]


@FUZZ
@given(payload=st.binary(max_size=200), chunk_bytes=st.integers(1, 64), data=st.data())
def test_fuzz_chunks_tampered(payload, chunk_bytes, data):
    chunks = _chunks(payload, chunk_bytes)
    for _ in range(data.draw(st.integers(1, 3))):
        if not chunks:
            break
        i = data.draw(st.integers(0, len(chunks) - 1))
        what = data.draw(st.sampled_from(MUTATIONS))
        if what == "drop":
            del chunks[i]
        elif what == "duplicate":
            chunks.insert(i, chunks[i])
        elif what == "swap":
            j = data.draw(st.integers(0, len(chunks) - 1))
            chunks[i], chunks[j] = chunks[j], chunks[i]
        elif what == "transfer_id":
            chunks[i] = _copy(chunks[i], transfer_id=data.draw(st.text(max_size=4)))
        elif what in ("seq", "total"):
            chunks[i] = _copy(chunks[i], **{what: data.draw(st.integers(0, (1 << 32) - 1))})
        elif what == "total_bytes":
            chunks[i] = _copy(chunks[i], total_bytes=data.draw(st.integers(0, (1 << 64) - 1)))
        else:
            chunks[i] = _copy(chunks[i], **{what: data.draw(st.binary(max_size=40))})
    _assemble_ok_or_wire_error(chunks, payload)


@FUZZ
@given(payload=st.binary(max_size=100), chunk_bytes=st.integers(1, 40), which=st.integers(0, 1000),
       cut=st.integers(0, 1000))
def test_fuzz_chunks_truncated(payload, chunk_bytes, which, cut):
    raws = [c.SerializeToString() for c in _chunks(payload, chunk_bytes)]
    which %= len(raws)
    raws[which] = raws[which][: cut % (len(raws[which]) + 1)]
    try:
        msgs = [pb.Chunk.FromString(r) for r in raws]
    except DecodeError:
        return
    _assemble_ok_or_wire_error(msgs, payload)


# --------------------------------------------------------------------------- over real gRPC

BLOB_MB = 100


@pytest.fixture
def blob_server(tls_for):
    seen = {}

    def put(request_iterator, context):
        try:
            tid, payload = assemble_chunks(request_iterator)
        except WireError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        seen["bytes"] = len(payload)
        return pb.Chunk(transfer_id=tid, total_bytes=len(payload), sha256=hashlib.sha256(payload).digest())

    def put_one(request, context):
        return pb.Chunk(total_bytes=len(request.data), sha256=hashlib.sha256(request.data).digest())

    handler = grpc.method_handlers_generic_handler("test.Blob", {
        "Put": grpc.stream_unary_rpc_method_handler(
            put, request_deserializer=pb.Chunk.FromString, response_serializer=pb.Chunk.SerializeToString),
        "PutOne": grpc.unary_unary_rpc_method_handler(
            put_one, request_deserializer=pb.Chunk.FromString, response_serializer=pb.Chunk.SerializeToString),
    })
    server = make_server(tls=tls_for("server"), port=0)
    server.grpc_server.add_generic_rpc_handlers((handler,))
    server.start()
    yield server, seen
    server.stop(0)


def _blob_stubs(channel):
    put = channel.stream_unary("/test.Blob/Put", request_serializer=pb.Chunk.SerializeToString,
                               response_deserializer=pb.Chunk.FromString)
    put_one = channel.unary_unary("/test.Blob/PutOne", request_serializer=pb.Chunk.SerializeToString,
                                  response_deserializer=pb.Chunk.FromString)
    return put, put_one


def test_grpc_streams_100mb_in_chunks_but_not_as_one_message(blob_server, tls_for):
    server, seen = blob_server
    payload = np.random.default_rng(6).bytes(BLOB_MB * 1024 * 1024)
    digest = hashlib.sha256(payload).digest()
    with make_channel(f"localhost:{server.port}", tls=tls_for("client-0")) as channel:
        put, put_one = _blob_stubs(channel)
        reply = put(iter_chunks(payload, transfer_id="big"), timeout=120)
        assert reply.sha256 == digest
        assert (reply.transfer_id, reply.total_bytes, seen["bytes"]) == ("big", len(payload), len(payload))

        # The same bytes as one message break the per-message limit (the client refuses to send it).
        assert len(payload) > MAX_MESSAGE_BYTES
        with pytest.raises(grpc.RpcError) as err:
            put_one(pb.Chunk(transfer_id="one", total=1, total_bytes=len(payload), data=payload), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # A tampered stream is refused by the server with the WireError's message.
        bad = list(iter_chunks(b"x" * 100, transfer_id="bad", chunk_bytes=10))
        del bad[4]
        with pytest.raises(grpc.RpcError) as err:
            put(iter(bad), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "missing or out of order" in err.value.details()


def test_grpc_server_refuses_100mb_message_even_from_a_lax_client(blob_server, tls_for):
    server, _ = blob_server
    payload = bytes(BLOB_MB * 1024 * 1024)
    with make_channel(f"localhost:{server.port}", tls=tls_for("client-1"),
                      max_message_bytes=2 * len(payload)) as channel:
        _, put_one = _blob_stubs(channel)
        with pytest.raises(grpc.RpcError) as err:
            put_one(pb.Chunk(transfer_id="one", total=1, total_bytes=len(payload), data=payload), timeout=60)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = put_one(pb.Chunk(data=b"ok"), timeout=10)  # and it keeps serving
        assert small.sha256 == hashlib.sha256(b"ok").digest()
