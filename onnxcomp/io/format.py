"""The packed model file (.onnxc): the model protobuf without its tensor payloads, plus
entropy-coded streams (one per large tensor, one per bundle of small tensors of a layout), each
with its checksum, and each tensor's checksum.

Layout (little-endian; varints are LEB128):
    magic  b"ONNXC\\x00\\r\\n"        8 bytes (the CR LF catches text-mode mangling)
    u16 version, u16 flags, u32 header length, u32 header crc32
    header: u8 skeleton method (0 raw, 1 zstd, 2 xz), u64 skeleton bytes, u64 skeleton decoded bytes,
            u32 skeleton crc32, u64 tables bytes, u32 tables crc32, u64 total decoded bytes,
            u32 stream count, then per stream: varint tensors, varint coded bytes, u32 coded crc32,
            varint padding elements, and per tensor: varint tensor index, u8 field << 4 | storage
            dtype, varint decoded bytes, u32 decoded crc32
    skeleton, shared tables, streams (back to back, in header order)
A bundle stream decodes to its tensors' bytes one after another, then the padding (zeros up to
whole rows of BUNDLE_ROW elements). Version 1 files (one tensor per stream) are still read.

Tensors are every TensorProto of the model, walked in a fixed order: initializers, sparse
initializers (values, indices), node attributes (Constant values, sparse tensors), recursively
through subgraphs, then functions. A tensor keeps its representation: raw_data stays raw_data
and a typed field (float_data, int32_data...) is refilled with the same values, so the unpacked
model is bit-identical. The reader checks every length against the file, the decoded sizes
against the tensors' declared shapes and a cap, and every checksum; any mismatch is one
InputError line.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx

MAGIC = b"ONNXC\x00\r\n"
VERSION = 2                      # 2: small tensors in bundles
READS = (1, 2)
MIN_PACKED_BYTES = 64            # smaller payloads stay in the protobuf
BUNDLE_MAX = 16 << 10            # tensors under this many bytes are coded in bundles
BUNDLE_CAP = 16 << 20            # ... of at most this many bytes each
TABLES_CAP = 64 * (3 + 2 * 256) + 16  # the largest shared tables section (64 tables)
SECTION_BROTLI_MAX = 1 << 20
SLOW_CODERS_MAX = 64 << 20  # models up to this many tensor bytes also try xz/brotli on their small tensors
FIT_STREAMS = 64                 # the shared tables are fitted on at most this many streams
RECODE_MAX = 8 << 20             # a model with up to this many tensor bytes is also coded without rANS...
RANS_MARGIN = 0.005              # ... and packed so unless rANS saves more than this share of the file
BUNDLE_ROW = 64                  # a bundle's rows (one symbol table each) hold this many elements
MAX_DECODED = int(os.environ.get("ONNXCOMP_MAX_DECODED", 64 << 30))  # refuse files declaring more
T = onnx.TensorProto
FIELDS = {1: ("raw_data", None), 2: ("float_data", np.float32), 3: ("int32_data", np.int32),
          4: ("int64_data", np.int64), 5: ("double_data", np.float64), 6: ("uint64_data", np.uint64)}
PACKED_FIXED = {2: (4, "<f4"), 5: (10, "<f8")}  # field -> (TensorProto field number, wire dtype)
STORAGE = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.int32, 5: np.int64,
           6: np.float32, 7: np.float64, 8: np.uint64, 9: np.uint32}
STORAGE_CODE = {np.dtype(v): k for k, v in STORAGE.items()}
STORAGE_DTYPE = {k: np.dtype(v).newbyteorder("<") for k, v in STORAGE.items()}  # as stored: little-endian
# ONNX types whose raw data is exactly this numpy type (the ones handed to ORT as arrays)
PLAIN_TYPES = {T.FLOAT: np.dtype("<f4"), T.DOUBLE: np.dtype("<f8"), T.FLOAT16: np.dtype("<f2"), T.INT8: np.dtype("i1"),
               T.UINT8: np.dtype("u1"), T.INT16: np.dtype("<i2"), T.UINT16: np.dtype("<u2"), T.INT32: np.dtype("<i4"),
               T.UINT32: np.dtype("<u4"), T.INT64: np.dtype("<i8"), T.UINT64: np.dtype("<u8")}
UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
CODING_THREADS = min(4, os.cpu_count() or 1)  # streams coded at once (each holds one tensor in memory)
# Streams coded past the one being written: a large tensor (an embedding) no longer idles the
# other thread. A 1.16 GB int4 decoder encoded in 17.1 s two ahead, 12.6-13.6 s sixteen ahead
# (same bytes; 0.1 GB more memory, the small tensors' coded streams).
CODING_AHEAD = 8 * CODING_THREADS


# ---- walking every tensor ----------------------------------------------------------------
def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        for sparse in attr.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _element_count(tensor: onnx.TensorProto) -> int:
    return math.prod(tensor.dims)  # Python ints: hostile dims cannot overflow into a small count


@functools.lru_cache(maxsize=None)
def _natural_dtype(data_type: int) -> np.dtype | None:
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
    except (KeyError, TypeError, ValueError):
        return None


def _raw_nbytes(tensor: onnx.TensorProto) -> int | None:
    from onnxcomp.model import _declared_nbytes

    if tensor.data_type in (T.FLOAT4E2M1,):
        return (_element_count(tensor) + 1) // 2
    return _declared_nbytes(tensor)


def _payload(tensor: onnx.TensorProto, raw: bytes | None = None) -> tuple[int, np.ndarray] | None:
    """(field id, values in their storage dtype) of a tensor worth packing, else None. `raw`:
    the bytes of an external tensor, read by the caller (they then count as its raw_data)."""
    if tensor.data_type in (T.STRING, T.UNDEFINED) or (raw is None and tensor.HasField("data_location")
                                                       and tensor.data_location == T.EXTERNAL):
        return None
    if tensor.HasField("segment"):
        return None
    raw = tensor.raw_data if raw is None else raw
    if raw:
        if len(raw) < MIN_PACKED_BYTES or _raw_nbytes(tensor) != len(raw):
            return None
        natural = _natural_dtype(tensor.data_type)
        storage = natural if natural is not None and natural.itemsize in UNSIGNED and \
            len(raw) == _element_count(tensor) * natural.itemsize and natural.kind != "V" else np.uint8
        storage = np.dtype(storage).newbyteorder("<")
        if np.dtype(storage).newbyteorder("=") not in STORAGE_CODE:
            storage = np.dtype("<u2") if storage.itemsize == 2 else np.dtype(np.uint8)
        return 1, np.frombuffer(raw, dtype=storage)
    for fid, (name, dtype) in FIELDS.items():
        if fid == 1:
            continue
        field = getattr(tensor, name)
        if len(field) * np.dtype(dtype).itemsize < MIN_PACKED_BYTES:
            continue
        values = np.array(field, dtype=dtype)
        if fid == 3:  # int32_data carries narrower types; keep the narrowest exact storage
            for narrow in (np.int8, np.uint8, np.int16, np.uint16):
                if values.size and values.min() >= np.iinfo(narrow).min and values.max() <= np.iinfo(narrow).max:
                    values = values.astype(narrow)
                    break
        return fid, values
    return None


# ---- the header's entries ----------------------------------------------------------------
@dataclass
class _Member:
    """One tensor's place in a stream."""
    index: int
    field: int
    storage: int
    decoded: int
    decoded_crc: int
    name: str


@dataclass
class _Stream:
    members: list[_Member]
    pad: int          # zero elements after the members (bundles are padded to whole rows)
    coded: int
    coded_crc: int
    choice: str


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _in_order(jobs: list, workers: int, ahead: int | None = None) -> Iterator:
    """Run the jobs on `workers` threads and yield their results in order (streams are written in
    order). At most `ahead` jobs (default `workers`) are submitted past the one being consumed:
    memory holds that many results, and a long job no longer leaves the other threads idle once
    they are `ahead` jobs past it."""
    ahead = workers if ahead is None else max(ahead, workers)
    if workers <= 1 or len(jobs) <= 1:
        yield from (job() for job in jobs)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(job) for job in jobs[:ahead]]
        for i in range(len(jobs)):
            result = pending[i].result()
            pending[i] = None  # (its tensor can go)
            if i + ahead < len(jobs):
                pending.append(pool.submit(jobs[i + ahead]))
            yield result
