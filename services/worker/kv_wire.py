"""The FetchKV chunk codec without copying the KV bytes through protobuf.

A `KVChunk` on the wire is its small fields plus field 5 (`data`, the raw KV). Sending, the
prefill worker serializes the small fields with protobuf and splices the data in from the host
buffer it was read into (one copy, into the bytes gRPC sends; the result is byte-identical to
`KVChunk(...).SerializeToString()`). Receiving, the decode worker finds field 5 in the bytes gRPC
hands over and views it in place (a memoryview: no copy until the write into its cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tandem.v1 import worker_pb2

_DATA_FIELD = 5
_DATA_TAG = bytes([_DATA_FIELD << 3 | 2])


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def encode_chunk(head: worker_pb2.KVChunk, tail: worker_pb2.KVChunk, data: memoryview | bytes) -> bytes:
    """A KVChunk's wire bytes: `head` (fields 1-4), the data as field 5, `tail` (fields 6 on);
    protobuf writes fields in number order, so this equals the whole message serialized."""
    return encode_parts(head.SerializeToString(), tail.SerializeToString(), data)


def encode_parts(head: bytes, tail: bytes, data: memoryview | bytes) -> bytes:
    """`encode_chunk` of the head's and the tail's serialized bytes (a wire helper gets them so)."""
    return b"".join((head, _DATA_TAG, _varint(len(data)), data, tail))


@dataclass(frozen=True)
class WireChunk:
    """A received KVChunk: its small fields, and its data viewed in the received bytes."""

    header: worker_pb2.KVChunk  # every field but `data`
    data: memoryview
    # frees the buffer `data` views once the chunk is written (a wire helper's receive slot);
    # None: the received bytes, freed with the last reference
    release: Callable[[], None] | None = None


def decode_chunk(raw: bytes) -> WireChunk:
    """Parse a KVChunk's wire bytes, leaving the data field where it is."""
    view = memoryview(raw)
    pos, end = 0, len(view)
    while pos < end:
        start = pos
        key, pos = _read_varint(view, pos)
        field, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = _read_varint(view, pos)
        elif wire_type == 2:
            size, pos = _read_varint(view, pos)
            if field == _DATA_FIELD:
                header = worker_pb2.KVChunk.FromString(bytes(view[:start]) + bytes(view[pos + size :]))
                return WireChunk(header, view[pos : pos + size])
            pos += size
        elif wire_type == 1:
            pos += 8
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"KVChunk: unexpected wire type {wire_type} of field {field}")
    return WireChunk(worker_pb2.KVChunk.FromString(raw), view[0:0])
