from securecollab.generated.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MpcHello(_message.Message):
    __slots__ = ("world_size", "nonce", "dealer", "world")
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    DEALER_FIELD_NUMBER: _ClassVar[int]
    WORLD_FIELD_NUMBER: _ClassVar[int]
    world_size: int
    nonce: bytes
    dealer: bool
    world: bytes
    def __init__(self, world_size: _Optional[int] = ..., nonce: _Optional[bytes] = ..., dealer: _Optional[bool] = ..., world: _Optional[bytes] = ...) -> None: ...

class MpcFrame(_message.Message):
    __slots__ = ("world", "seq", "tensor", "data", "object", "last")
    WORLD_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OBJECT_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    world: bytes
    seq: int
    tensor: _tensor_pb2.Tensor
    data: bytes
    object: bytes
    last: bool
    def __init__(self, world: _Optional[bytes] = ..., seq: _Optional[int] = ..., tensor: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., data: _Optional[bytes] = ..., object: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class MpcAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SeedRequest(_message.Message):
    __slots__ = ("world", "world_size")
    WORLD_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    world: bytes
    world_size: int
    def __init__(self, world: _Optional[bytes] = ..., world_size: _Optional[int] = ...) -> None: ...

class SeedReply(_message.Message):
    __slots__ = ("seed",)
    SEED_FIELD_NUMBER: _ClassVar[int]
    seed: int
    def __init__(self, seed: _Optional[int] = ...) -> None: ...

class CorrelatedRequest(_message.Message):
    __slots__ = ("world", "seq", "kind", "args")
    WORLD_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    world: bytes
    seq: int
    kind: str
    args: bytes
    def __init__(self, world: _Optional[bytes] = ..., seq: _Optional[int] = ..., kind: _Optional[str] = ..., args: _Optional[bytes] = ...) -> None: ...
