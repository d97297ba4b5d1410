from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class MpcDescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MpcModelDescription(_message.Message):
    __slots__ = ("plan_json", "party", "input_shape", "num_classes", "output", "param_count", "model_id", "max_batch")
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    PARTY_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PARAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    plan_json: str
    party: int
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    output: str
    param_count: int
    model_id: str
    max_batch: int
    def __init__(self, plan_json: _Optional[str] = ..., party: _Optional[int] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., output: _Optional[str] = ..., param_count: _Optional[int] = ..., model_id: _Optional[str] = ..., max_batch: _Optional[int] = ...) -> None: ...

class ModelShare(_message.Message):
    __slots__ = ("model_id", "party", "length", "seed", "dense")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    PARTY_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    party: int
    length: int
    seed: bytes
    dense: bytes
    def __init__(self, model_id: _Optional[str] = ..., party: _Optional[int] = ..., length: _Optional[int] = ..., seed: _Optional[bytes] = ..., dense: _Optional[bytes] = ...) -> None: ...

class ModelShareAck(_message.Message):
    __slots__ = ("model_id", "length")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    length: int
    def __init__(self, model_id: _Optional[str] = ..., length: _Optional[int] = ...) -> None: ...

class QueryShare(_message.Message):
    __slots__ = ("query_id", "party", "num_inputs", "model_id", "seed", "dense")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    PARTY_FIELD_NUMBER: _ClassVar[int]
    NUM_INPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    query_id: int
    party: int
    num_inputs: int
    model_id: str
    seed: bytes
    dense: bytes
    def __init__(self, query_id: _Optional[int] = ..., party: _Optional[int] = ..., num_inputs: _Optional[int] = ..., model_id: _Optional[str] = ..., seed: _Optional[bytes] = ..., dense: _Optional[bytes] = ...) -> None: ...

class AnswerShare(_message.Message):
    __slots__ = ("query_id", "output", "shape", "frac_bits", "share", "mpc_s")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FRAC_BITS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    MPC_S_FIELD_NUMBER: _ClassVar[int]
    query_id: int
    output: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    frac_bits: int
    share: bytes
    mpc_s: float
    def __init__(self, query_id: _Optional[int] = ..., output: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., frac_bits: _Optional[int] = ..., share: _Optional[bytes] = ..., mpc_s: _Optional[float] = ...) -> None: ...
