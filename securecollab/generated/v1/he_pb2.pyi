from securecollab.generated.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ResultFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SEAL_CIPHERTEXT: _ClassVar[ResultFormat]
    PACKED_COEFFICIENTS: _ClassVar[ResultFormat]
SEAL_CIPHERTEXT: ResultFormat
PACKED_COEFFICIENTS: ResultFormat

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelDescription(_message.Message):
    __slots__ = ("model", "input_shape", "num_classes", "depth", "galois_steps", "min_slots", "input_encoding_json", "max_batch_size", "max_context_bytes", "ckks", "input_layout", "logit_slots")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    GALOIS_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_SLOTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_ENCODING_JSON_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CKKS_FIELD_NUMBER: _ClassVar[int]
    INPUT_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LOGIT_SLOTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    depth: int
    galois_steps: _containers.RepeatedScalarFieldContainer[int]
    min_slots: int
    input_encoding_json: str
    max_batch_size: int
    max_context_bytes: int
    ckks: CkksParameters
    input_layout: SlotLayout
    logit_slots: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., depth: _Optional[int] = ..., galois_steps: _Optional[_Iterable[int]] = ..., min_slots: _Optional[int] = ..., input_encoding_json: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., max_context_bytes: _Optional[int] = ..., ckks: _Optional[_Union[CkksParameters, _Mapping]] = ..., input_layout: _Optional[_Union[SlotLayout, _Mapping]] = ..., logit_slots: _Optional[_Iterable[int]] = ...) -> None: ...

class CkksParameters(_message.Message):
    __slots__ = ("poly_modulus_degree", "coeff_mod_bit_sizes", "scale_bits")
    POLY_MODULUS_DEGREE_FIELD_NUMBER: _ClassVar[int]
    COEFF_MOD_BIT_SIZES_FIELD_NUMBER: _ClassVar[int]
    SCALE_BITS_FIELD_NUMBER: _ClassVar[int]
    poly_modulus_degree: int
    coeff_mod_bit_sizes: _containers.RepeatedScalarFieldContainer[int]
    scale_bits: int
    def __init__(self, poly_modulus_degree: _Optional[int] = ..., coeff_mod_bit_sizes: _Optional[_Iterable[int]] = ..., scale_bits: _Optional[int] = ...) -> None: ...

class SlotLayout(_message.Message):
    __slots__ = ("period", "source", "ciphertexts")
    PERIOD_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    period: int
    source: _containers.RepeatedScalarFieldContainer[int]
    ciphertexts: int
    def __init__(self, period: _Optional[int] = ..., source: _Optional[_Iterable[int]] = ..., ciphertexts: _Optional[int] = ...) -> None: ...

class SessionOptions(_message.Message):
    __slots__ = ("batch_size",)
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    batch_size: int
    def __init__(self, batch_size: _Optional[int] = ...) -> None: ...

class SessionPart(_message.Message):
    __slots__ = ("options", "context")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    options: SessionOptions
    context: _tensor_pb2.Chunk
    def __init__(self, options: _Optional[_Union[SessionOptions, _Mapping]] = ..., context: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("session_id", "context_bytes", "slot_count", "setup_s")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SLOT_COUNT_FIELD_NUMBER: _ClassVar[int]
    SETUP_S_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    context_bytes: int
    slot_count: int
    setup_s: float
    def __init__(self, session_id: _Optional[str] = ..., context_bytes: _Optional[int] = ..., slot_count: _Optional[int] = ..., setup_s: _Optional[float] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("session_id", "query_id", "ciphertext", "result_format", "more_ciphertexts")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    MORE_CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    query_id: int
    ciphertext: bytes
    result_format: ResultFormat
    more_ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, session_id: _Optional[str] = ..., query_id: _Optional[int] = ..., ciphertext: _Optional[bytes] = ..., result_format: _Optional[_Union[ResultFormat, str]] = ..., more_ciphertexts: _Optional[_Iterable[bytes]] = ...) -> None: ...

class InferReply(_message.Message):
    __slots__ = ("query_id", "ciphertext", "server_s", "packed")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    SERVER_S_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    query_id: int
    ciphertext: bytes
    server_s: float
    packed: PackedCiphertext
    def __init__(self, query_id: _Optional[int] = ..., ciphertext: _Optional[bytes] = ..., server_s: _Optional[float] = ..., packed: _Optional[_Union[PackedCiphertext, _Mapping]] = ...) -> None: ...

class PackedCiphertext(_message.Message):
    __slots__ = ("modulus", "scale", "degree", "dropped_bits", "value_bits", "values")
    MODULUS_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    DROPPED_BITS_FIELD_NUMBER: _ClassVar[int]
    VALUE_BITS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    modulus: int
    scale: float
    degree: int
    dropped_bits: _containers.RepeatedScalarFieldContainer[int]
    value_bits: _containers.RepeatedScalarFieldContainer[int]
    values: bytes
    def __init__(self, modulus: _Optional[int] = ..., scale: _Optional[float] = ..., degree: _Optional[int] = ..., dropped_bits: _Optional[_Iterable[int]] = ..., value_bits: _Optional[_Iterable[int]] = ..., values: _Optional[bytes] = ...) -> None: ...

class BatchPart(_message.Message):
    __slots__ = ("session_id", "query_id", "num_inputs", "index", "count", "ciphertext")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_INPUTS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    query_id: int
    num_inputs: int
    index: int
    count: int
    ciphertext: bytes
    def __init__(self, session_id: _Optional[str] = ..., query_id: _Optional[int] = ..., num_inputs: _Optional[int] = ..., index: _Optional[int] = ..., count: _Optional[int] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class BatchReply(_message.Message):
    __slots__ = ("query_id", "ciphertexts", "server_s")
    QUERY_ID_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXTS_FIELD_NUMBER: _ClassVar[int]
    SERVER_S_FIELD_NUMBER: _ClassVar[int]
    query_id: int
    ciphertexts: _containers.RepeatedScalarFieldContainer[bytes]
    server_s: float
    def __init__(self, query_id: _Optional[int] = ..., ciphertexts: _Optional[_Iterable[bytes]] = ..., server_s: _Optional[float] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PlainRequest(_message.Message):
    __slots__ = ("inputs",)
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: _tensor_pb2.Tensor
    def __init__(self, inputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PlainReply(_message.Message):
    __slots__ = ("logits", "server_s")
    LOGITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_S_FIELD_NUMBER: _ClassVar[int]
    logits: _tensor_pb2.Tensor
    server_s: float
    def __init__(self, logits: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., server_s: _Optional[float] = ...) -> None: ...
