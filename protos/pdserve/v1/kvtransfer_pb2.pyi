from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KV_KIND_K: _ClassVar[KVKind]
    KV_KIND_V: _ClassVar[KVKind]
KV_KIND_K: KVKind
KV_KIND_V: KVKind

class KVLayout(_message.Message):
    __slots__ = ("layout_version", "model_fingerprint", "dtype", "num_layers", "num_kv_heads", "head_dim", "block_size", "num_blocks", "page_bytes")
    LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    layout_version: int
    model_fingerprint: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    page_bytes: int
    def __init__(self, layout_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., dtype: _Optional[str] = ..., num_layers: _Optional[int] = ..., num_kv_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., block_size: _Optional[int] = ..., num_blocks: _Optional[int] = ..., page_bytes: _Optional[int] = ...) -> None: ...

class HandshakeRequest(_message.Message):
    __slots__ = ("layout", "compat_hash")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    layout: KVLayout
    compat_hash: str
    def __init__(self, layout: _Optional[_Union[KVLayout, _Mapping]] = ..., compat_hash: _Optional[str] = ...) -> None: ...

class HandshakeResponse(_message.Message):
    __slots__ = ("engine_id", "epoch", "layout", "compat_hash", "host_id", "max_chunk_bytes", "shm_available")
    ENGINE_ID_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    HOST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHM_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    engine_id: str
    epoch: int
    layout: KVLayout
    compat_hash: str
    host_id: str
    max_chunk_bytes: int
    shm_available: bool
    def __init__(self, engine_id: _Optional[str] = ..., epoch: _Optional[int] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., compat_hash: _Optional[str] = ..., host_id: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., shm_available: _Optional[bool] = ...) -> None: ...

class ReadBlocksRequest(_message.Message):
    __slots__ = ("transfer_id", "block_ids", "layers", "epoch", "compat_hash", "max_chunk_bytes", "packed")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    COMPAT_HASH_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    layers: _containers.RepeatedScalarFieldContainer[int]
    epoch: int
    compat_hash: str
    max_chunk_bytes: int
    packed: bool
    def __init__(self, transfer_id: _Optional[str] = ..., block_ids: _Optional[_Iterable[int]] = ..., layers: _Optional[_Iterable[int]] = ..., epoch: _Optional[int] = ..., compat_hash: _Optional[str] = ..., max_chunk_bytes: _Optional[int] = ..., packed: _Optional[bool] = ...) -> None: ...

class PageSlice(_message.Message):
    __slots__ = ("layer", "kind", "block_id", "offset", "length")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    layer: int
    kind: KVKind
    block_id: int
    offset: int
    length: int
    def __init__(self, layer: _Optional[int] = ..., kind: _Optional[_Union[KVKind, str]] = ..., block_id: _Optional[int] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class KVChunk(_message.Message):
    __slots__ = ("seq", "slices", "data", "crc32", "total_bytes", "stream_offset")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    SLICES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STREAM_OFFSET_FIELD_NUMBER: _ClassVar[int]
    seq: int
    slices: _containers.RepeatedCompositeFieldContainer[PageSlice]
    data: bytes
    crc32: int
    total_bytes: int
    stream_offset: int
    def __init__(self, seq: _Optional[int] = ..., slices: _Optional[_Iterable[_Union[PageSlice, _Mapping]]] = ..., data: _Optional[bytes] = ..., crc32: _Optional[int] = ..., total_bytes: _Optional[int] = ..., stream_offset: _Optional[int] = ...) -> None: ...

class ShmSegment(_message.Message):
    __slots__ = ("name", "size", "layers", "block_ids", "crc32")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_IDS_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    name: str
    size: int
    layers: _containers.RepeatedScalarFieldContainer[int]
    block_ids: _containers.RepeatedScalarFieldContainer[int]
    crc32: int
    def __init__(self, name: _Optional[str] = ..., size: _Optional[int] = ..., layers: _Optional[_Iterable[int]] = ..., block_ids: _Optional[_Iterable[int]] = ..., crc32: _Optional[int] = ...) -> None: ...

class ExtendLeaseRequest(_message.Message):
    __slots__ = ("transfer_id", "lease_ms")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    lease_ms: int
    def __init__(self, transfer_id: _Optional[str] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class ExtendLeaseResponse(_message.Message):
    __slots__ = ("lease_ms",)
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    lease_ms: int
    def __init__(self, lease_ms: _Optional[int] = ...) -> None: ...

class KVReleaseRequest(_message.Message):
    __slots__ = ("transfer_id",)
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    def __init__(self, transfer_id: _Optional[str] = ...) -> None: ...

class KVReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...
