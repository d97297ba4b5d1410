"""The small objects CrypTen's protocols pass with ``send_obj``/``broadcast_obj``, encoded without pickle.

CrypTen pickles them over gloo; a peer's bytes must never reach ``pickle.loads``. What its MPC
code actually sends is a closed set: sizes (``torch.Size``), ints, floats, strings, None, bools,
and lists, tuples and string-keyed dicts of those. Each encodes as canonical JSON with its type
tagged, so a value comes back as exactly the type it left as; anything else is refused, both
ways, with :class:`ObjectError`.
"""

from __future__ import annotations

import json
import math

import torch

MAX_OBJECT_BYTES = 1 << 16  # sizes and small messages; nothing big travels as an object
MAX_DEPTH = 8


class ObjectError(ValueError):
    """An object outside the closed set, or bytes that do not decode to one."""


def _tag(value, depth: int):
    if depth > MAX_DEPTH:
        raise ObjectError("object nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return {"int": str(value)}
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ObjectError(f"non-finite float {value!r}")
        return {"float": value}
    if isinstance(value, torch.Size):
        return {"size": [int(d) for d in value]}
    if isinstance(value, (list, tuple)):
        return {type(value).__name__: [_tag(v, depth + 1) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _tag(v, depth + 1) for k, v in value.items()}}
    raise ObjectError(f"{type(value).__name__} is not one of the objects the MPC may send")


def _untag(value, depth: int):
    if depth > MAX_DEPTH:
        raise ObjectError("object nested too deeply")
    if value is None or isinstance(value, (bool, str)):
        return value
    if not isinstance(value, dict) or len(value) != 1:
        raise ObjectError("malformed object")
    (kind, inner), = value.items()
    if kind == "int" and isinstance(inner, str):
        try:
            return int(inner)
        except ValueError:
            raise ObjectError("malformed int") from None
    if kind == "float" and isinstance(inner, (int, float)) and not isinstance(inner, bool):
        return float(inner)
    if kind == "size" and isinstance(inner, list) and all(type(d) is int and d >= 0 for d in inner):
        return torch.Size(inner)
    if kind in ("list", "tuple") and isinstance(inner, list):
        items = [_untag(v, depth + 1) for v in inner]
        return items if kind == "list" else tuple(items)
    if kind == "dict" and isinstance(inner, dict):
        return {k: _untag(v, depth + 1) for k, v in inner.items()}
    raise ObjectError(f"unknown object kind {kind!r}")


def encode_object(value) -> bytes:
    data = json.dumps(_tag(value, 0), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(data) > MAX_OBJECT_BYTES:
        raise ObjectError(f"object of {len(data)} bytes exceeds {MAX_OBJECT_BYTES}")
    return data


def decode_object(data: bytes):
    if len(data) > MAX_OBJECT_BYTES:
        raise ObjectError(f"object of {len(data)} bytes exceeds {MAX_OBJECT_BYTES}")
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ObjectError(f"object is not JSON: {e}") from None
    return _untag(parsed, 0)


def same_message(a, b) -> bool:
    """Whether two MPC messages (a tensor or one of these objects) are equal: of one dtype and shape and equal
    elementwise, or encoding to the same canonical bytes."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    try:
        return encode_object(a) == encode_object(b)
    except ObjectError:
        return False
