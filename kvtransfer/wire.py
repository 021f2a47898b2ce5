"""protobuf <-> kvtransfer objects. The only kvtransfer module (with service.py and client.py)
that sees protobuf."""

from __future__ import annotations

from google.protobuf.message import DecodeError

from kvtransfer.chunking import Chunk, ChunkParts, PageSlice, TransferError
from kvtransfer.exporter import ReadRequest
from kvtransfer.handle import KVHandle
from kvtransfer.layout import KVLayout
from kvtransfer.shm import ShmSegmentInfo
from protos.pdserve.v1 import common_pb2, kvtransfer_pb2, worker_pb2


def layout_to_pb(layout: KVLayout) -> kvtransfer_pb2.KVLayout:
    return kvtransfer_pb2.KVLayout(
        layout_version=layout.layout_version,
        model_fingerprint=layout.model_fingerprint,
        dtype=layout.dtype,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        block_size=layout.block_size,
        num_blocks=layout.num_blocks,
        page_bytes=layout.page_bytes,
    )


def layout_from_pb(msg: kvtransfer_pb2.KVLayout) -> KVLayout:
    """Raises ValueError on a malformed layout."""
    layout = KVLayout(
        model_fingerprint=msg.model_fingerprint,
        dtype=msg.dtype,
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        head_dim=msg.head_dim,
        block_size=msg.block_size,
        num_blocks=msg.num_blocks,
        layout_version=msg.layout_version,
    )
    if msg.page_bytes != layout.page_bytes:
        raise ValueError(
            f"layout says page_bytes={msg.page_bytes}, its fields give {layout.page_bytes}"
        )
    return layout


def read_request_from_pb(msg: kvtransfer_pb2.ReadBlocksRequest) -> ReadRequest:
    return ReadRequest(
        transfer_id=msg.transfer_id,
        block_ids=tuple(msg.block_ids),
        layers=tuple(msg.layers),
        epoch=msg.epoch,
        compat_hash=msg.compat_hash,
        max_chunk_bytes=msg.max_chunk_bytes,
        packed=msg.packed,
    )


def read_request_to_pb(req: ReadRequest) -> kvtransfer_pb2.ReadBlocksRequest:
    return kvtransfer_pb2.ReadBlocksRequest(
        transfer_id=req.transfer_id,
        block_ids=req.block_ids,
        layers=req.layers,
        epoch=req.epoch,
        compat_hash=req.compat_hash,
        max_chunk_bytes=req.max_chunk_bytes,
        packed=req.packed,
    )


def chunk_from_pb(msg: kvtransfer_pb2.KVChunk) -> Chunk:
    slices = [PageSlice(s.layer, s.kind, s.block_id, s.offset, s.length) for s in msg.slices]
    return Chunk(msg.seq, slices, msg.data, msg.crc32, msg.total_bytes, msg.stream_offset)


# -- KVChunk without copying its data ---------------------------------------------------------
#
# A KVChunk is a few small fields and one large `data` (field 3). Building the message object
# and serializing it would copy the data twice (and parsing, twice more), so the server writes
# the wire bytes itself -- the small fields, then the data tag and length, then the page bytes,
# joined with one copy -- and the client finds the data in the received bytes and reads it in
# place (a memoryview), parsing only the rest with protobuf. Both are the standard encoding:
# a generated KVChunk parses what the server writes, and the client reads any valid KVChunk.

_DATA_TAG = bytes([(3 << 3) | 2])  # field 3, length-delimited


def encode_chunk(parts: ChunkParts, total_bytes: int) -> bytes:
    header = kvtransfer_pb2.KVChunk(
        seq=parts.seq,
        slices=[
            kvtransfer_pb2.PageSlice(
                layer=s.layer, kind=s.kind, block_id=s.block_id, offset=s.offset, length=s.length
            )
            for s in parts.slices
        ],
        crc32=parts.crc32,
        total_bytes=total_bytes,
        stream_offset=parts.stream_offset,
    ).SerializeToString()
    return b"".join([header, _DATA_TAG, _varint(parts.nbytes), *parts.parts])


def serialize_chunk(msg: bytes | kvtransfer_pb2.KVChunk) -> bytes:
    """ReadBlocks' response serializer: wire bytes from `encode_chunk` pass through."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


def chunk_from_bytes(raw: bytes) -> Chunk:
    """A KVChunk from its wire bytes; `data` is a view of `raw` (no copy). TransferError when
    the bytes are not a well-formed message."""
    view = memoryview(raw)
    n = len(raw)
    pos = 0
    data = (0, 0)
    rest: list[memoryview] = []  # every field but data, for protobuf to parse
    rest_start = 0
    try:
        while pos < n:
            start = pos
            key, pos = _read_varint(raw, pos)
            wire_type = key & 7
            if wire_type == 0:
                _, pos = _read_varint(raw, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, pos = _read_varint(raw, pos)
                if key >> 3 == 3:  # data: the last occurrence wins, as in protobuf
                    if pos + length > n:
                        raise TransferError("malformed KVChunk: data runs past the message")
                    data = (pos, pos + length)
                    rest.append(view[rest_start:start])
                    rest_start = pos = pos + length
                    continue
                pos += length
            else:
                raise TransferError(f"malformed KVChunk: wire type {wire_type}")
        if pos > n:
            raise TransferError("malformed KVChunk: truncated field")
        rest.append(view[rest_start:n])
        msg = kvtransfer_pb2.KVChunk.FromString(b"".join(rest))
    except (IndexError, DecodeError) as exc:
        raise TransferError(f"malformed KVChunk: {exc}") from exc
    chunk = chunk_from_pb(msg)
    chunk.data = view[data[0] : data[1]]
    return chunk


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise TransferError("malformed KVChunk: varint too long")


def shm_to_pb(info: ShmSegmentInfo) -> kvtransfer_pb2.ShmSegment:
    return kvtransfer_pb2.ShmSegment(
        name=info.name,
        size=info.size,
        layers=info.layers,
        block_ids=info.block_ids,
        crc32=info.crc32,
    )


def shm_from_pb(msg: kvtransfer_pb2.ShmSegment) -> ShmSegmentInfo:
    return ShmSegmentInfo(msg.name, msg.size, tuple(msg.layers), tuple(msg.block_ids), msg.crc32)


def handle_to_pb(handle: KVHandle) -> worker_pb2.KVHandle:
    msg = worker_pb2.KVHandle(
        engine_id=handle.engine_id,
        epoch=handle.epoch,
        kv_endpoint=handle.kv_endpoint,
        transfer_id=handle.transfer_id,
        block_ids=handle.block_ids,
        num_tokens=handle.num_tokens,
        first_token=handle.first_token,
        first_logprob=handle.first_logprob or 0.0,
        lease_ms=handle.lease_ms,
        compat_hash=handle.compat_hash,
        host_id=handle.host_id,
        expires_at_ms=handle.expires_at_ms,
        signature=handle.signature,
    )
    if handle.first_top_logprobs is not None:
        msg.first_token_logprobs.CopyFrom(
            token_logprobs_to_pb(handle.first_logprob or 0.0, handle.first_top_logprobs)
        )
    return msg


def handle_from_pb(msg: worker_pb2.KVHandle) -> KVHandle:
    """Raises ValueError on a malformed handle."""
    top = None
    if msg.HasField("first_token_logprobs"):
        top = {lp.token_id: lp.logprob for lp in msg.first_token_logprobs.top_logprobs}
    return KVHandle(
        engine_id=msg.engine_id,
        epoch=msg.epoch,
        kv_endpoint=msg.kv_endpoint,
        transfer_id=msg.transfer_id,
        block_ids=tuple(msg.block_ids),
        num_tokens=msg.num_tokens,
        first_token=msg.first_token,
        first_logprob=msg.first_logprob,
        first_top_logprobs=top,
        lease_ms=msg.lease_ms,
        compat_hash=msg.compat_hash,
        host_id=msg.host_id,
        expires_at_ms=msg.expires_at_ms,
        signature=msg.signature,
    )


def token_logprobs_to_pb(
    logprob: float, top: dict[int, float], rank: int | None = None
) -> common_pb2.TokenLogprobs:
    return common_pb2.TokenLogprobs(
        logprob=logprob,
        top_logprobs=[common_pb2.Logprob(token_id=t, logprob=lp) for t, lp in top.items()],
        rank=rank,
    )
