from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVHeader(_message.Message):
    __slots__ = ("request_id", "reservation_id", "block_ids", "shape", "dtype", "num_bytes", "checksum", "transport", "stream_index", "stream_count", "transfer_id")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHECKSUM_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    STREAM_INDEX_FIELD_NUMBER: _ClassVar[int]
    STREAM_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    reservation_id: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    num_bytes: int
    checksum: int
    transport: str
    stream_index: int
    stream_count: int
    transfer_id: str
    def __init__(self, request_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., num_bytes: _Optional[int] = ..., checksum: _Optional[int] = ..., transport: _Optional[str] = ..., stream_index: _Optional[int] = ..., stream_count: _Optional[int] = ..., transfer_id: _Optional[str] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: KVHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[KVHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ChannelOpen(_message.Message):
    __slots__ = ("store_host", "store_port", "pair_id", "generation")
    STORE_HOST_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    PAIR_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    store_host: str
    store_port: int
    pair_id: str
    generation: int
    def __init__(self, store_host: _Optional[str] = ..., store_port: _Optional[int] = ..., pair_id: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class TransferDescriptor(_message.Message):
    __slots__ = ("transfer_id", "header")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    HEADER_FIELD_NUMBER: _ClassVar[int]
    transfer_id: int
    header: KVHeader
    def __init__(self, transfer_id: _Optional[int] = ..., header: _Optional[_Union[KVHeader, _Mapping]] = ...) -> None: ...

class ControlMessage(_message.Message):
    __slots__ = ("open", "transfer")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_FIELD_NUMBER: _ClassVar[int]
    open: ChannelOpen
    transfer: TransferDescriptor
    def __init__(self, open: _Optional[_Union[ChannelOpen, _Mapping]] = ..., transfer: _Optional[_Union[TransferDescriptor, _Mapping]] = ...) -> None: ...

class ControlAck(_message.Message):
    __slots__ = ("transfer_id", "ack", "closing")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    CLOSING_FIELD_NUMBER: _ClassVar[int]
    transfer_id: int
    ack: KVAck
    closing: bool
    def __init__(self, transfer_id: _Optional[int] = ..., ack: _Optional[_Union[KVAck, _Mapping]] = ..., closing: _Optional[bool] = ...) -> None: ...

class KVAck(_message.Message):
    __slots__ = ("ok", "error", "bytes", "seconds")
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    error: str
    bytes: int
    seconds: float
    def __init__(self, ok: _Optional[bool] = ..., error: _Optional[str] = ..., bytes: _Optional[int] = ..., seconds: _Optional[float] = ...) -> None: ...
