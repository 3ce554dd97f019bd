"""Two facts of an ONNX file read from its protobuf wire format, for the runtime-only install (no
``onnx`` package): whether a top-level initializer keeps its data in an external file, and which
operator domains the top-level nodes use. ONNX Runtime's reader cannot say either (it resolves the
external file beside the model, which a bundle then shipped without), and the full install's check
(``onnx.load``) must not differ from the runtime's."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

# field numbers of onnx.proto (ModelProto.graph; GraphProto.node, .initializer; NodeProto.domain;
# TensorProto.data_location, whose EXTERNAL is 1)
_MODEL_GRAPH, _GRAPH_NODE, _GRAPH_INITIALIZER, _NODE_DOMAIN, _TENSOR_LOCATION, _EXTERNAL = 7, 1, 5, 7, 14, 1


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("a truncated or overlong varint")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, object]]:
    """(field number, value) of one message: an int (varint), a (start, end) slice (length-delimited)
    or None (fixed-width)."""
    i = start
    while i < end:
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise ValueError("field number 0")
        if wire == 3:   # an unknown group (a deprecated encoding protobuf still skips): skipped whole
            i = _skip_group(buf, i, end)
            yield number, None
        elif wire == 0:
            value, i = _varint(buf, i)
            yield number, value
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
            yield number, None
        elif wire == 2:
            size, i = _varint(buf, i)
            if i + size > end:
                raise ValueError("a field runs past its message")
            yield number, (i, i + size)
            i += size
        else:
            raise ValueError(f"wire type {wire}")
    if i != end:
        raise ValueError("a field runs past its message")


def _skip_group(buf: memoryview, i: int, end: int) -> int:
    """The offset after the end-group tag matching a start-group just read (groups nest)."""
    depth = 1
    while depth:
        if i >= end:
            raise ValueError("a group without its end")
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        elif wire == 2:
            size, i = _varint(buf, i)
            i += size
        elif wire in (3, 4):
            depth += 1 if wire == 3 else -1
        else:
            raise ValueError(f"wire type {wire}")
    if i > end:
        raise ValueError("a group runs past its message")
    return i


def graph_facts(path: Path) -> tuple[bool, set[str]]:
    """(any top-level initializer external, the top-level nodes' domains); ValueError: not protobuf."""
    buf = memoryview(Path(path).read_bytes())
    external, domains = False, set()
    for number, graph in _fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH or not isinstance(graph, tuple):
            continue
        for field, value in _fields(buf, *graph):
            if not isinstance(value, tuple):
                continue
            if field == _GRAPH_NODE:
                domains.add(_last_string(buf, value, _NODE_DOMAIN))
            elif field == _GRAPH_INITIALIZER:
                external |= any(f == _TENSOR_LOCATION and v == _EXTERNAL for f, v in _fields(buf, *value))
    return external, domains


def _last_string(buf: memoryview, message: tuple[int, int], field: int) -> str:
    """A string field of a message ("" when absent; the last one where repeated, as protobuf reads it)."""
    found = ""
    for number, value in _fields(buf, *message):
        if number == field and isinstance(value, tuple):
            found = bytes(buf[value[0]:value[1]]).decode("utf-8", "replace")
    return found
