from securecollab.generated.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SplitJoinRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class SplitJoinReply(_message.Message):
    __slots__ = ("plan_json",)
    PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    plan_json: str
    def __init__(self, plan_json: _Optional[str] = ...) -> None: ...

class TurnRequest(_message.Message):
    __slots__ = ("client_id", "epoch")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    epoch: int
    def __init__(self, client_id: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class TurnReply(_message.Message):
    __slots__ = ("epoch", "previous_client", "client_weights", "client_optimizer")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_CLIENT_FIELD_NUMBER: _ClassVar[int]
    CLIENT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    previous_client: str
    client_weights: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    client_optimizer: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    def __init__(self, epoch: _Optional[int] = ..., previous_client: _Optional[str] = ..., client_weights: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., client_optimizer: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ...) -> None: ...

class TurnEnd(_message.Message):
    __slots__ = ("client_id", "epoch", "client_weights", "client_optimizer")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    CLIENT_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    epoch: int
    client_weights: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    client_optimizer: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.NamedTensor]
    def __init__(self, client_id: _Optional[str] = ..., epoch: _Optional[int] = ..., client_weights: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ..., client_optimizer: _Optional[_Iterable[_Union[_tensor_pb2.NamedTensor, _Mapping]]] = ...) -> None: ...

class TurnAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("client_id", "epoch", "step", "activations", "labels")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    epoch: int
    step: int
    activations: _tensor_pb2.Tensor
    labels: _tensor_pb2.Tensor
    def __init__(self, client_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., activations: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., labels: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class ForwardReply(_message.Message):
    __slots__ = ("gradient", "outputs", "loss", "server_s")
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SERVER_S_FIELD_NUMBER: _ClassVar[int]
    gradient: _tensor_pb2.Tensor
    outputs: _tensor_pb2.Tensor
    loss: float
    server_s: float
    def __init__(self, gradient: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., outputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., loss: _Optional[float] = ..., server_s: _Optional[float] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("client_id", "epoch", "step", "gradient")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    epoch: int
    step: int
    gradient: _tensor_pb2.Tensor
    def __init__(self, client_id: _Optional[str] = ..., epoch: _Optional[int] = ..., step: _Optional[int] = ..., gradient: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class BackwardReply(_message.Message):
    __slots__ = ("gradient",)
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    gradient: _tensor_pb2.Tensor
    def __init__(self, gradient: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("client_id", "activations")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    activations: _tensor_pb2.Tensor
    def __init__(self, client_id: _Optional[str] = ..., activations: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class PredictReply(_message.Message):
    __slots__ = ("outputs",)
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    outputs: _tensor_pb2.Tensor
    def __init__(self, outputs: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ...) -> None: ...

class FinishRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class FinishReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
