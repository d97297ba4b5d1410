from securecollab.generated.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecAggJoinRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class SecAggJoinReply(_message.Message):
    __slots__ = ("plan_json", "party_targets", "party_names", "seed_compression")
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    PARTY_TARGETS_FIELD_NUMBER: _ClassVar[int]
    PARTY_NAMES_FIELD_NUMBER: _ClassVar[int]
    SEED_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    plan_json: str
    party_targets: _containers.RepeatedScalarFieldContainer[str]
    party_names: _containers.RepeatedScalarFieldContainer[str]
    seed_compression: bool
    def __init__(self, plan_json: _Optional[str] = ..., party_targets: _Optional[_Iterable[str]] = ..., party_names: _Optional[_Iterable[str]] = ..., seed_compression: _Optional[bool] = ...) -> None: ...

class RoundRequest(_message.Message):
    __slots__ = ("client_id", "round")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class RoundInfo(_message.Message):
    __slots__ = ("round", "done", "params")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    round: int
    done: bool
    params: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    def __init__(self, round: _Optional[int] = ..., done: _Optional[bool] = ..., params: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ...) -> None: ...

class UploadReport(_message.Message):
    __slots__ = ("client_id", "round")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class UploadAck(_message.Message):
    __slots__ = ("reported",)
    REPORTED_FIELD_NUMBER: _ClassVar[int]
    reported: int
    def __init__(self, reported: _Optional[int] = ...) -> None: ...

class ShareHeader(_message.Message):
    __slots__ = ("client_id", "round", "party", "length", "seed")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARTY_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    party: int
    length: int
    seed: bytes
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., party: _Optional[int] = ..., length: _Optional[int] = ..., seed: _Optional[bytes] = ...) -> None: ...

class ShareChunk(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: ShareHeader
    chunk: _tensor_pb2.Chunk
    def __init__(self, header: _Optional[_Union[ShareHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.Chunk, _Mapping]] = ...) -> None: ...

class ShareAck(_message.Message):
    __slots__ = ("round", "held")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    round: int
    held: int
    def __init__(self, round: _Optional[int] = ..., held: _Optional[int] = ...) -> None: ...

class HeldRequest(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class HeldReply(_message.Message):
    __slots__ = ("client_ids",)
    CLIENT_IDS_FIELD_NUMBER: _ClassVar[int]
    client_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, client_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AggregateRequest(_message.Message):
    __slots__ = ("round", "client_ids", "norm_bound", "dp_sigma", "norm_mode", "robust", "reference")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IDS_FIELD_NUMBER: _ClassVar[int]
    NORM_BOUND_FIELD_NUMBER: _ClassVar[int]
    DP_SIGMA_FIELD_NUMBER: _ClassVar[int]
    NORM_MODE_FIELD_NUMBER: _ClassVar[int]
    ROBUST_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    round: int
    client_ids: _containers.RepeatedScalarFieldContainer[str]
    norm_bound: float
    dp_sigma: float
    norm_mode: str
    robust: str
    reference: _tensor_pb2.Tensor
    def __init__(self, round: _Optional[int] = ..., client_ids: _Optional[_Iterable[str]] = ..., norm_bound: _Optional[float] = ..., dp_sigma: _Optional[float] = ..., norm_mode: _Optional[str] = ..., robust: _Optional[str] = ..., reference: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class RejoinRequest(_message.Message):
    __slots__ = ("round", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RejoinReply(_message.Message):
    __slots__ = ("rejoining",)
    REJOINING_FIELD_NUMBER: _ClassVar[int]
    rejoining: bool
    def __init__(self, rejoining: _Optional[bool] = ...) -> None: ...
