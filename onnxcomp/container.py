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

import io
import functools
import lzma
import math
import os
import shutil
import struct
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np
import onnx

from onnxcomp import coding
from onnxcomp.coding import tables as shared_tables
from onnxcomp.coding.io import CorruptStream, Reader, Writer
from onnxcomp.errors import InputError, OutputError

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


# ---- packing -----------------------------------------------------------------------------
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


def pack_proto(proto: onnx.ModelProto, coder: str = "auto") -> tuple[bytes, dict[str, Any]]:
    """Pack a ModelProto into .onnxc bytes; returns (bytes, stats)."""
    out = io.BytesIO()
    stats = pack_to(proto, out, coder)
    return out.getvalue(), stats


def _tables_section(shared: np.ndarray) -> bytes:
    """The shared tables section: a method byte (0 raw, 1 xz as raw LZMA2, 3 brotli), the tables."""
    method, tables = _compress_section(shared_tables.write(shared), (0, 2, 3), xz=coding.tensor.xz_compress)
    return bytes([{0: 0, 2: 1, 3: 3}[method]]) + tables


def _cheaper_codings(streams: list[_Stream], without_tables: dict[int, tuple[bytes, str]],
                     without_rans: dict[int, tuple[bytes, str]], tables_cost: int) -> dict[int, tuple[bytes, int]]:
    """Recode the streams that use rANS where that makes the file smaller, or costs it no more
    than RANS_MARGIN and spares numba. The alternatives map stream positions to (stream, choice):
    `without_tables` for the streams that use the shared tables (whose bytes, `tables_cost`, go
    too when none does), `without_rans` for every stream that uses rANS; a stream that lacks one
    rules that alternative out. The chosen ones are written into the streams' records; returns
    position -> (new stream, length of the spilled one it replaces), empty when nothing changes."""
    users = [i for i, s in enumerate(streams) if "rans" in s.choice]
    if not users:
        return {}
    as_is = sum(streams[i].coded for i in users) + tables_cost
    options = [({}, as_is)]
    if all(i in without_tables for i in users if "rans*" in streams[i].choice):
        options.append(({i: without_tables[i] for i in users if i in without_tables},
                        sum(len(without_tables[i][0]) if i in without_tables else streams[i].coded for i in users)))
    if all(i in without_rans for i in users):
        no_rans = sum(len(without_rans[i][0]) for i in users)
        margin = RANS_MARGIN * (sum(s.coded for s in streams) + tables_cost)
        options.append(({i: without_rans[i] for i in users}, no_rans - margin))  # preferred within the margin
    chosen, _ = min(options, key=lambda option: option[1])
    replaced = {}
    for i, (stream, choice) in chosen.items():
        s = streams[i]
        replaced[i] = (stream, s.coded)
        s.choice, s.coded, s.coded_crc = choice, len(stream), zlib.crc32(stream)
    return replaced


def _copy_streams(spill: BinaryIO, out: BinaryIO, streams: list[_Stream], replaced: dict[int, tuple[bytes, int]]) -> None:
    """Copy the spilled streams to `out`, writing the streams at the positions of `replaced`
    (new stream, length of the spilled one it replaces) instead of the spilled ones."""
    spill.seek(0)
    for i, s in enumerate(streams):
        if i in replaced:
            data, spilled = replaced[i]
            spill.seek(spilled, os.SEEK_CUR)
            out.write(data)
            continue
        left = s.coded
        while left:
            chunk = spill.read(min(left, 16 << 20))
            if not chunk:
                raise OutputError("the temporary stream file is shorter than written")
            out.write(chunk)
            left -= len(chunk)


def _bundles(sizes: dict[int, tuple[int, tuple[str, int]]]) -> tuple[list[int], list[list[int]]]:
    """Split packed tensors (index -> (bytes, layout)) into the ones coded alone and bundles of
    small tensors with the same layout (one stream each, capped at BUNDLE_CAP bytes)."""
    alone, groups = [], {}
    for index, (nbytes, layout) in sizes.items():
        if nbytes >= BUNDLE_MAX:
            alone.append(index)
            continue
        group = groups.setdefault(layout, [[]])
        if sum(sizes[i][0] for i in group[-1]) + nbytes > BUNDLE_CAP:
            group.append([])
        group[-1].append(index)
    bundles = [b for g in groups.values() for b in g if b]
    singles = [b[0] for b in bundles if len(b) == 1]
    return sorted(alone + singles), [b for b in bundles if len(b) > 1]


CODING_THREADS = min(4, os.cpu_count() or 1)  # streams coded at once (each holds one tensor in memory)


def _varint_size(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _in_order(jobs: list, workers: int) -> Iterator:
    """Run the jobs on `workers` threads, at most `workers` ahead of the one being consumed, and
    yield their results in order (the streams are written in order; memory holds `workers` tensors)."""
    if workers <= 1 or len(jobs) <= 1:
        yield from (job() for job in jobs)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        pending = [pool.submit(job) for job in jobs[:workers]]
        for i in range(len(jobs)):
            result = pending[i].result()
            pending[i] = None  # (its tensor can go)
            if i + workers < len(jobs):
                pending.append(pool.submit(jobs[i + workers]))
            yield result


def _mapped(name: str, target: Path, offset: int, length: int) -> memoryview:
    """The bytes of an external tensor as a read-only memory map: sizing every tensor reads
    nothing, and coding reads the pages as it goes (a plain read copied each tensor three times:
    for the sizes, the shared tables and the coding)."""
    if os.path.getsize(target) < offset + length:
        raise InputError(f"tensor {name!r}: external data became shorter while packing")
    if not length:
        return memoryview(b"")
    return memoryview(np.memmap(target, np.uint8, mode="r", offset=offset, shape=(length,)))


def pack_to(proto: onnx.ModelProto, out: BinaryIO, coder: str = "auto", *, owned: bool = False,
            external: dict[str, tuple[Path, int, int]] | None = None) -> dict[str, Any]:
    """Write the packed model to the binary file `out`; returns the stats.

    Streams: each large tensor is read, coded and its stream spilled to a temporary file before
    the next, so memory holds one large tensor at a time besides the proto (the header, which
    lists every stream, comes first in the file and is written last). Tensors under BUNDLE_MAX
    bytes are coded together, one bundle per layout: one stream instead of hundreds of tiny
    ones codes smaller (one model per row of the bundle instead of per tensor) and decodes
    without a Python round trip per tensor. On a small model the streams that use rANS are also
    coded without the shared tables and without rANS, and rANS is kept only where it saves more
    than RANS_MARGIN of the file (see _cheaper_codings).
    `owned=True`: the proto is the caller's to spend (used as the skeleton instead of a copy).
    `external`: tensor name -> (file, offset, length) of main-graph initializers left in their
    (checked) data file.
    """
    if coder not in coding.CODERS:
        raise InputError(f"unknown coder {coder!r} (choose one of: {', '.join(coding.CODERS)})")
    t0 = time.perf_counter()
    if owned:
        skeleton = proto
    else:
        skeleton = onnx.ModelProto()
        skeleton.CopyFrom(proto)
    external = external or {}
    tensors = list(all_tensors(skeleton))
    initializers = {id(t) for t in skeleton.graph.initializer} if external else set()

    def payload(index: int):
        tensor = tensors[index]
        raw = None
        if id(tensor) in initializers and tensor.name in external and tensor.data_location == T.EXTERNAL:
            raw = _mapped(tensor.name, *external[tensor.name])
        return _payload(tensor, raw)

    def prepared(index: int):
        fid, values = payload(index)
        tensor = tensors[index]
        kind, itemsize = coding.layout(tensor.data_type, values.dtype)
        unsigned = np.ascontiguousarray(values).view(UNSIGNED[values.dtype.itemsize])
        shape = tuple(int(d) for d in tensor.dims) if fid == 1 and values.size == _element_count(tensor) \
            else (values.size,)
        return fid, values, kind, itemsize, unsigned, shape

    sizes = {}
    for i in range(len(tensors)):
        found = payload(i)
        if found is not None:
            sizes[i] = (found[1].nbytes, coding.layout(tensors[i].data_type, found[1].dtype))
    alone, bundles = _bundles(sizes)

    def member_of(index, fid, values, unsigned) -> _Member:
        return _Member(index, fid, STORAGE_CODE[np.dtype(values.dtype).newbyteorder("=")], unsigned.nbytes,
                       zlib.crc32(unsigned), tensors[index].name)

    def bundled(indices: list[int]):
        """The bundle's values, padded with zeros to whole rows of BUNDLE_ROW elements, its
        (rows, BUNDLE_ROW) shape, and its members."""
        parts, members = [], []
        for index in indices:
            fid, values, kind, itemsize, unsigned, _ = prepared(index)
            parts.append(unsigned)
            members.append(member_of(index, fid, values, unsigned))
        n = sum(p.size for p in parts)
        pad = -n % BUNDLE_ROW
        values = np.concatenate(parts + [np.zeros(pad, parts[0].dtype)])
        return values, kind, itemsize, (values.size // BUNDLE_ROW, BUNDLE_ROW), members, pad

    def items():
        """(values, kind, itemsize, shape) of the streams as they will be coded, for fit_shared: of
        a model with many, FIT_STREAMS evenly spaced ones (the fit keeps FIT_ROWS rows in all;
        a 4-bit decoder's 340 streams took 3.4 s to sample, a quarter of its pack time)."""
        every = [("alone", index) for index in alone] + [("bundle", indices) for indices in bundles]
        if len(every) > FIT_STREAMS:
            every = [every[i] for i in np.linspace(0, len(every) - 1, FIT_STREAMS).astype(np.int64)]
        for kind_of, what in every:
            if kind_of == "bundle":
                yield bundled(what)[:4]
            else:
                _, _, kind, itemsize, unsigned, shape = prepared(what)
                yield unsigned, kind, itemsize, shape

    shared = coding.fit_shared(items(), coder)
    tables_blob = _tables_section(shared)
    # Each stream picks its smallest coding, but rANS has costs of its own: the shared tables'
    # bytes, and numba (about 0.5 s at a cold start) to decode it. On a small model the streams
    # that use rANS are also coded without the tables and without rANS, to weigh those costs.
    recode = coder == "auto" and sum(nbytes for nbytes, _ in sizes.values()) <= RECODE_MAX
    slow = sum(nbytes for nbytes, _ in sizes.values()) <= SLOW_CODERS_MAX
    without_tables: dict[int, tuple[bytes, str]] = {}  # stream position -> (stream, choice)
    without_rans: dict[int, tuple[bytes, str]] = {}
    streams: list[_Stream] = []
    def code(values, kind, itemsize, shape, members, pad):
        """Code one stream (in a worker thread: the coders release the GIL) -> what record() keeps."""
        stream, choice = coding.encode_tensor(values, kind, itemsize, shape, coder, shared, slow=slow)
        plain = coding.encode_tensor(values, kind, itemsize, shape, coder, rans=False) \
            if recode and "rans" in choice else None
        own = coding.encode_tensor(values, kind, itemsize, shape, coder) if recode and "rans*" in choice else None
        return stream, choice, plain, own, members, pad

    def code_alone(index):
        fid, values, kind, itemsize, unsigned, shape = prepared(index)
        return code(unsigned, kind, itemsize, shape, [member_of(index, fid, values, unsigned)], 0)

    def code_bundle(indices):
        return code(*bundled(indices))

    with tempfile.TemporaryFile() as spill:
        def record(stream, choice, plain, own, members, pad):
            if plain is not None:
                without_rans[len(streams)] = plain
            if own is not None:
                without_tables[len(streams)] = own
            spill.write(stream)
            streams.append(_Stream(members, pad, len(stream), zlib.crc32(stream), choice))

        jobs = [functools.partial(code_alone, index) for index in alone] + \
            [functools.partial(code_bundle, indices) for indices in bundles]
        for result in _in_order(jobs, CODING_THREADS):
            record(*result)
        for stream in streams:
            for m in stream.members:
                tensor = tensors[m.index]
                tensor.ClearField(FIELDS[m.field][0])
                if tensor.data_location == T.EXTERNAL:  # unpacked, its data is inline
                    tensor.ClearField("data_location")
                    del tensor.external_data[:]
        no_tables = _tables_section(shared[:0])
        tables_cost = len(tables_blob) - len(no_tables) if any("rans*" in s.choice for s in streams) else 0
        replaced = _cheaper_codings(streams, without_tables, without_rans, tables_cost)
        if not any("rans*" in s.choice for s in streams):  # no stream codes with the tables: not stored
            tables_blob = no_tables
        encode_s = time.perf_counter() - t0
        skel_raw = skeleton.SerializeToString()
        # the .onnx size: the skeleton plus each tensor's bytes and field header (serializing the
        # whole model to measure it cost as much as coding its int8 weights); within a few bytes
        plain_bytes = len(skel_raw) + sum(m.decoded + 1 + _varint_size(m.decoded) for s in streams for m in s.members)
        skel_method, skel = _compress_section(skel_raw)
        total = sum(m.decoded for s in streams for m in s.members)
        h = Writer()
        h.u8(skel_method)
        h.u64(len(skel))
        h.u64(len(skel_raw))
        h.u32(zlib.crc32(skel))
        h.u64(len(tables_blob))
        h.u32(zlib.crc32(tables_blob))
        h.u64(total)
        h.u32(len(streams))
        for s in streams:
            h.varint(len(s.members))
            h.varint(s.coded)
            h.u32(s.coded_crc)
            h.varint(s.pad)
            for m in s.members:
                h.varint(m.index)
                h.u8(m.field * 16 + m.storage)
                h.varint(m.decoded)
                h.u32(m.decoded_crc)
        header = h.getvalue()
        start = out.tell()
        out.writelines((MAGIC, struct.pack("<HHII", VERSION, 0, len(header), zlib.crc32(header)), header,
                        skel, tables_blob))
        if replaced:
            _copy_streams(spill, out, streams, replaced)
        else:
            spill.seek(0)
            shutil.copyfileobj(spill, out, 16 << 20)
        packed_bytes = out.tell() - start
    choices: dict[str, int] = {}
    per_tensor = {}
    for s in streams:
        choice = s.choice if len(s.members) == 1 else f"bundle:{s.choice}"
        choices[choice] = choices.get(choice, 0) + len(s.members)
        share = s.coded / max(1, sum(m.decoded for m in s.members))
        for m in s.members:  # a bundle member's coded size is its share of the bundle's
            per_tensor[m.name or f"#{m.index}"] = {"bytes": m.decoded, "coded": round(m.decoded * share),
                                                   "choice": choice}
    return {
        "coder": coder,
        "packed_bytes": packed_bytes,
        "plain_bytes": plain_bytes,
        "tensor_bytes": total,
        "coded_tensor_bytes": sum(s.coded for s in streams),
        "skeleton_bytes": len(skel),
        "tables_bytes": len(tables_blob),
        "tensors": len(per_tensor),
        "streams": len(streams),
        "encode_seconds": encode_s,
        "choices": choices,
        "per_tensor": per_tensor,
    }


# ---- unpacking ---------------------------------------------------------------------------
def unpack_bytes(data: bytes | memoryview, where: str = "packed model",
                 max_decoded: int = MAX_DECODED, arrays: dict | None = None, sink=None,
                 release=None) -> onnx.ModelProto:
    """Validate and decode .onnxc bytes into a ModelProto; every problem is one InputError.

    `arrays`: main-graph initializers (raw data of a plain numeric type, 1 KB or more) are put
    there as read-only numpy arrays (name -> array, shaped) instead of into the proto, whose
    tensors are left without data: for a session that takes them as in-memory values.
    `sink`, `release`: as for _unpack (unpack() writes tensors to a data file as they decode)."""
    if arrays is not None:
        sink = _arrays_sink(arrays)
    data = memoryview(data)
    if len(data) < len(MAGIC) + 12 or bytes(data[:len(MAGIC)]) != MAGIC:
        raise InputError(f"{where}: not a packed onnxcomp model (bad magic)")
    version, _flags, header_len, header_crc = struct.unpack("<HHII", data[len(MAGIC):len(MAGIC) + 12])
    if version not in READS:
        raise InputError(f"{where}: packed format version {version} is not supported "
                         f"(this onnxcomp reads {', '.join(map(str, READS))})")
    start = len(MAGIC) + 12
    if header_len > len(data) - start:
        raise InputError(f"{where}: truncated (header of {header_len} bytes, {len(data) - start} left)")
    header = data[start:start + header_len]
    if zlib.crc32(header) != header_crc:
        raise InputError(f"{where}: header checksum mismatch (the file is corrupt)")
    try:
        return _unpack(data, Reader(header, f"{where}: header"), start + header_len, where, max_decoded, version,
                       sink, release)
    except CorruptStream as exc:
        raise InputError(str(exc)) from None


def _section(data: memoryview, pos: int, length: int, crc: int, what: str, where: str) -> memoryview:
    if length > len(data) - pos:
        raise InputError(f"{where}: truncated ({what} needs {length} bytes at offset {pos}, file has {len(data)})")
    part = data[pos:pos + length]
    if zlib.crc32(part) != crc:
        raise InputError(f"{where}: {what} checksum mismatch (the file is corrupt)")
    return part


def _read_streams(h: Reader, count: int, version: int, max_decoded: int) -> list[_Stream]:
    """The header's stream list. Version 1: one tensor per stream, indices as gaps from the
    previous one; version 2: a stream holds one tensor or a bundle, with absolute indices."""
    streams, last = [], -1
    for _ in range(count):
        if version == 1:
            last = last + 1 + h.varint(1 << 32)
            packed = h.u8()
            coded, decoded = h.varint(), h.varint(max_decoded)
            coded_crc, decoded_crc = h.u32(), h.u32()
            streams.append(_Stream([_Member(last, packed >> 4, packed & 15, decoded, decoded_crc, "")], 0,
                                   coded, coded_crc, ""))
            continue
        varint, u8, u32 = h.varint, h.u8, h.u32
        n_members, coded, coded_crc, pad = varint(1 << 32), varint(), u32(), varint(BUNDLE_ROW - 1)
        if n_members < 1 or n_members * 7 > h.left():
            raise h.fail(f"a stream lists {n_members} tensors")
        members = []
        for _ in range(n_members):
            index, packed, decoded, decoded_crc = varint(1 << 32), u8(), varint(max_decoded), u32()
            members.append(_Member(index, packed >> 4, packed & 15, decoded, decoded_crc, ""))
        streams.append(_Stream(members, pad, coded, coded_crc, ""))
    h.done()
    return streams


def _unpack(data: memoryview, h: Reader, pos: int, where: str, max_decoded: int, version: int,
            sink=None, release=None) -> onnx.ModelProto:
    """`sink(tensor, values, is_main_initializer) -> bool`: offered each decoded raw-data tensor;
    True when it took it (the proto's tensor is then left without data). `release(offset, length)`:
    called once a stream's coded bytes are no longer needed."""
    from onnxcomp.model import parse_model_bytes

    skel_method, skel_len, skel_raw_len, skel_crc = h.u8(), h.u64(), h.u64(), h.u32()
    tables_len, tables_crc, total, count = h.u64(), h.u32(), h.u64(), h.u32()
    if total > max_decoded:
        raise InputError(f"{where}: declares {total} decoded bytes, over the limit of {max_decoded}")
    if count * 11 > h.left():
        raise InputError(f"{where}: header lists {count} streams but holds {h.left()} bytes of entries")
    streams = _read_streams(h, count, version, max_decoded)
    skel = _section(data, pos, skel_len, skel_crc, "model skeleton", where)
    pos += skel_len
    if skel_raw_len > max(len(data), 1) * 4096 or skel_raw_len > (2 << 30):
        raise InputError(f"{where}: model skeleton declares an implausible size {skel_raw_len}")
    skel_bytes = _decompress_skeleton(skel_method, skel, skel_raw_len, where)
    tables_blob = _section(data, pos, tables_len, tables_crc, "shared tables", where)
    pos += tables_len
    if not len(tables_blob) or tables_blob[0] not in (0, 1, 3):
        raise InputError(f"{where}: bad shared tables section")
    if tables_blob[0] == 0:
        tables_raw = tables_blob[1:]
    elif tables_blob[0] == 1:
        tables_raw = coding.tensor.xz_decompress(tables_blob[1:], _xz_size(tables_blob[1:], where),
                                                 f"{where}: shared tables")
    else:
        tables_raw = coding.tensor.brotli_decompress(tables_blob[1:], TABLES_CAP, f"{where}: shared tables", exact=False)
    shared = shared_tables.read(tables_raw)
    proto = parse_model_bytes(skel_bytes, where)
    if sum(m.decoded for s in streams for m in s.members) != total:
        raise InputError(f"{where}: stream sizes do not add up to the declared total")
    tensors = _tensors_at(proto, [m.index for s in streams for m in s.members], where)
    jobs = []
    for stream in streams:
        first = stream.members[0]
        name = f"{where}: tensor #{first.index}"
        layout = None
        for m in stream.members:
            tensor = tensors[m.index]
            if m.field not in FIELDS or m.storage not in STORAGE:
                raise InputError(f"{where}: tensor #{m.index}: bad stream entry (field or storage type)")
            dtype = STORAGE_DTYPE[m.storage]
            expected = _expected_bytes(tensor, m.field, dtype)
            if m.decoded != expected:
                raise InputError(f"{where}: tensor #{m.index} ({tensor.name}): stream decodes to {m.decoded} "
                                 f"bytes but its shape declares {expected}")
            this = coding.layout(tensor.data_type, dtype)
            if layout not in (None, this):
                raise InputError(f"{name}: a bundle mixes tensors of different layouts")
            layout = this
        kind, itemsize = layout
        elements = sum(m.decoded for m in stream.members) // itemsize + stream.pad
        if len(stream.members) > 1 and elements % BUNDLE_ROW:
            raise InputError(f"{name}: a bundle does not fill whole rows")
        what = f"stream of tensor {tensors[first.index].name!r}"
        if stream.coded > len(data) - pos:
            raise InputError(f"{where}: truncated ({what} needs {stream.coded} bytes at offset {pos}, "
                             f"file has {len(data)})")
        jobs.append(functools.partial(_decode_stream, data, pos, stream, what, kind, itemsize, elements, shared,
                                      f"{name} ({tensors[first.index].name})", where))
        pos += stream.coded
    if pos != len(data):
        raise InputError(f"{where}: {len(data) - pos} unexpected bytes after the last stream")
    # Streams decode on CODING_THREADS threads (the decoders release the GIL), consumed in order.
    for stream, at, raw in _in_order(jobs, CODING_THREADS):
        offset, raw = 0, memoryview(raw)
        for m in stream.members:
            tensor = tensors[m.index]
            part = raw[offset:offset + m.decoded]
            offset += m.decoded
            if zlib.crc32(part) != m.decoded_crc:
                raise InputError(f"{where}: tensor #{m.index} ({tensor.name}): decoded data checksum mismatch")
            values = np.frombuffer(part, dtype=STORAGE_DTYPE[m.storage])
            initializer = m.index < len(proto.graph.initializer)
            if not (sink is not None and m.field == 1 and sink(tensor, values, initializer)):
                _fill(tensor, m.field, values)
        if release is not None:
            release(at, stream.coded)
    return proto


def _decode_stream(data: memoryview, pos: int, stream: _Stream, what: str, kind: str, itemsize: int,
                   elements: int, shared, name: str, where: str) -> tuple[_Stream, int, bytes]:
    """(stream, its offset, its decoded bytes): checked against its checksum, then decoded."""
    coded = _section(data, pos, stream.coded, stream.coded_crc, what, where)
    return stream, pos, coding.decode_tensor(coded, kind, itemsize, elements, shared, name)


def _arrays_sink(arrays: dict):
    """A sink putting main-graph initializers (raw data of a plain numeric type, 1 KB or more)
    into `arrays` as read-only numpy arrays, shaped, instead of into the proto."""
    def take(tensor: onnx.TensorProto, values: np.ndarray, initializer: bool) -> bool:
        if not (initializer and values.nbytes >= 1024 and tensor.data_type in PLAIN_TYPES):
            return False
        arrays[tensor.name] = values.view(PLAIN_TYPES[tensor.data_type]).reshape(tuple(tensor.dims))
        return True
    return take


def _tensors_at(proto: onnx.ModelProto, indices: list[int], where: str) -> dict[int, onnx.TensorProto]:
    """The tensors at these walk positions, each listed once. The walk stops at the highest: most
    packed tensors are initializers, so a large graph's node attributes are rarely visited."""
    wanted = set(indices)
    if len(wanted) != len(indices):
        raise InputError(f"{where}: a tensor is listed in two streams")
    found = {}
    if wanted:
        last = max(wanted)
        initializers = proto.graph.initializer
        if last < len(initializers):  # the usual case: index them, no walk
            return {i: initializers[i] for i in indices}
        for i, tensor in enumerate(all_tensors(proto)):
            if i in wanted:
                found[i] = tensor
            if i >= last:
                break
    if len(found) != len(wanted):
        raise InputError(f"{where}: a stream names tensor #{min(wanted - set(found))}, which the model lacks")
    return found


def _xz_size(blob: memoryview, where: str, cap: int = 1 << 20) -> int:
    """Decoded size of a small raw-xz block (shared tables), refusing more than `cap` bytes."""
    import lzma

    try:
        d = lzma.LZMADecompressor(format=lzma.FORMAT_RAW,
                                  filters=[{"id": lzma.FILTER_LZMA2, "dict_size": coding.tensor.XZ_DICT}])
        out = d.decompress(bytes(blob), max_length=cap)
    except lzma.LZMAError as exc:
        raise InputError(f"{where}: shared tables cannot be decoded ({exc})") from None
    if not d.eof:
        raise InputError(f"{where}: shared tables are larger than {cap} bytes")
    return len(out)


def _compress_section(data: bytes, methods=(0, 1, 2, 3), xz=None) -> tuple[int, bytes]:
    """(method, bytes) of the smallest of raw (0), zstd (1), xz (2, the .xz format unless `xz` is
    given) and brotli (3) for the skeleton or the tables; xz is weighed by its slow decoding as for
    tensors, brotli (slow to encode) is tried up to SECTION_BROTLI_MAX bytes."""
    coders = {0: bytes, 1: coding.tensor.zstd_compress,
              2: xz or (lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)), 3: coding.tensor.brotli_compress}
    options = [(m, coders[m](data)) for m in methods if m != 3 or len(data) <= SECTION_BROTLI_MAX]
    return min(options, key=lambda o: coding.tensor.weighed(coding.tensor.XZ if o[0] == 2 else 0, len(o[1])))


def _decompress_skeleton(method: int, skel: memoryview, n: int, where: str) -> bytes:
    if method == 0:
        out = bytes(skel)
    elif method == 1:
        out = coding.tensor.zstd_decompress(skel, n, f"{where}: model skeleton")
    elif method == 2:
        try:
            d = lzma.LZMADecompressor()
            out = d.decompress(bytes(skel), max_length=n + 1)
        except lzma.LZMAError as exc:
            raise InputError(f"{where}: model skeleton cannot be decoded ({exc})") from None
    elif method == 3:
        out = coding.tensor.brotli_decompress(skel, n, f"{where}: model skeleton")
    else:
        raise InputError(f"{where}: unknown skeleton method {method}")
    if len(out) != n:
        raise InputError(f"{where}: model skeleton decodes to {len(out)} bytes, expected {n}")
    return out


def _expected_bytes(tensor: onnx.TensorProto, field: int, dtype: np.dtype) -> int:
    if field == 1:
        return _raw_nbytes(tensor) or 0
    count = _element_count(tensor)
    if tensor.data_type in (T.COMPLEX64, T.COMPLEX128):
        count *= 2
    if tensor.data_type in (T.INT4, T.UINT4, T.FLOAT4E2M1):
        count = (count + 1) // 2
    return count * dtype.itemsize


def _fill(tensor: onnx.TensorProto, field: int, values: np.ndarray) -> None:
    name, dtype = FIELDS[field]
    if field == 1:
        tensor.raw_data = values.tobytes()
    elif field in PACKED_FIXED:
        # float_data and double_data are packed fixed-width fields: their wire form is the
        # little-endian values themselves, so merging it is a copy (extend() converts every value
        # to a Python float and back, ~15x slower, and may quiet a signalling NaN).
        number, wire = PACKED_FIXED[field]
        payload = values.astype(wire, copy=False).tobytes()
        w = Writer()
        w.varint(number << 3 | 2)
        w.blob(payload)
        tensor.MergeFromString(w.getvalue())
    else:
        getattr(tensor, name).extend(values.astype(dtype).tolist())


# ---- public API --------------------------------------------------------------------------
def read_packed_proto(path: str | os.PathLike | bytes, arrays: dict | None = None) -> onnx.ModelProto:
    """The model a packed file holds; refused if a tensor in it points at an external file (a
    packed model holds all its data: such a reference would be read from wherever we run).
    `arrays`: as for unpack_bytes."""
    from onnxcomp.model import refuse_external_references

    if isinstance(path, (bytes, bytearray, memoryview)):
        proto, where = unpack_bytes(path, arrays=arrays), "packed model"
    else:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such file")
        data, release = _map_packed(path)
        proto, where = unpack_bytes(data, str(path), arrays=arrays, release=release), str(path)
    refuse_external_references(proto, where)
    return proto


def _map_packed(path: Path) -> tuple[memoryview, Any]:
    """A read-only memory map of a packed file, and release(offset, length), which lets the
    kernel drop a decoded stream's pages from our resident set: the packed bytes are never all
    in memory beside the decoded ones (a 30 GB model's 4-bit file is ~4.5 GB)."""
    import mmap

    with open(path, "rb") as fh:
        if not os.fstat(fh.fileno()).st_size:
            return memoryview(b""), lambda offset, length: None
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)  # (the map outlives the descriptor)

    def release(offset: int, length: int) -> None:
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        if length and hasattr(mapped, "madvise"):
            mapped.madvise(mmap.MADV_DONTNEED, start, offset + length - start)

    return memoryview(mapped), release


def load_packed(path: str | os.PathLike) -> "Model":  # noqa: F821
    """Read an .onnxc file into an editable Model."""
    from onnxcomp.model import Model

    return Model.from_proto(read_packed_proto(path), Path(path))


def save_packed(model, path: str | os.PathLike, coder: str | None = None) -> Path:
    """Write a Model (or ModelProto) as .onnxc atomically, with the coder the entropy pass chose
    (model.packing) or `coder` (default auto)."""
    from onnxcomp.files import atomic_write, atomic_write_bytes
    from onnxcomp.model import PROTOBUF_LIMIT

    packing = getattr(model, "packing", None) or {}
    coder = coder or packing.get("coder", "auto")
    proto = model if isinstance(model, onnx.ModelProto) else model.to_proto()
    cached = packing.get("_cache")
    if cached and proto.ByteSize() <= PROTOBUF_LIMIT:  # (over 2 GB it cannot be serialized to compare)
        serialized = proto.SerializeToString(deterministic=True)
        if cached[0] == (coder, zlib.crc32(serialized), len(serialized)):
            return atomic_write_bytes(Path(path), cached[1])
    owned = not isinstance(model, onnx.ModelProto)  # to_proto() made it for us
    return atomic_write(Path(path), lambda out: pack_to(proto, out, coder, owned=owned))


def pack(in_path: str | os.PathLike, out_path: str | os.PathLike, coder: str = "auto") -> dict[str, Any]:
    """Pack an .onnx file (external data included) into .onnxc; returns the stats."""
    from onnxcomp.files import atomic_write
    from onnxcomp.model import load_proto

    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise OutputError(f"{out_path}: refusing to overwrite the input model")
    external: dict = {}  # main-graph weights in external data are read one at a time while packing
    proto = load_proto(in_path, defer=external)
    if coder not in coding.CODERS:
        raise InputError(f"unknown coder {coder!r} (choose one of: {', '.join(coding.CODERS)})")
    stats: dict[str, Any] = {}
    atomic_write(out_path, lambda out: stats.update(pack_to(proto, out, coder, owned=True, external=external)))
    stats["input_bytes"] = in_path.stat().st_size
    return stats


def unpack(in_path: str | os.PathLike, out_path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write an .onnxc file back as a plain .onnx (weights bit-identical).

    `external_data` (default: when the tensors pass 2 GB, which one protobuf cannot hold): the
    main-graph weights go to `<out>.data` beside it as they are decoded, one stream at a time,
    from a memory map of the packed file whose pages are let go once decoded; so neither the
    packed file nor the model is ever all in memory."""
    from onnxcomp.model import PROTOBUF_LIMIT, save

    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise InputError(f"{in_path}: no such file")
    if out_path.exists() and out_path.resolve() == in_path.resolve():
        raise OutputError(f"{out_path}: refusing to overwrite the input model")
    if external_data is None:
        external_data = in_path.stat().st_size > PROTOBUF_LIMIT // 8 and _declared_total(in_path) > PROTOBUF_LIMIT
    if not external_data:
        return save(read_packed_proto(in_path), out_path, source=in_path)
    return _unpack_to_external_data(in_path, out_path)


def _declared_total(path: Path) -> int:
    """The decoded tensor bytes the file's header declares (0 if it cannot be read)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(MAGIC) + 12)
            if head[:len(MAGIC)] != MAGIC:
                return 0
            header_len = struct.unpack("<HHII", head[len(MAGIC):])[2]
            h = Reader(fh.read(min(header_len, 64)), str(path))
            h.u8(), h.u64(), h.u64(), h.u32(), h.u64(), h.u32()
            return h.u64()
    except (OSError, struct.error, CorruptStream, InputError):
        return 0


def _unpack_to_external_data(in_path: Path, out_path: Path) -> Path:
    from onnxcomp.files import cannot_write
    from onnxcomp.model import EXTERNAL_DATA_ALIGN, EXTERNAL_DATA_MIN_BYTES, _external_tensors, _set_location

    folder = out_path.parent if str(out_path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{out_path}: the folder {folder} does not exist")
    data_name = out_path.name + ".data"
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=folder))
        data, release = _map_packed(in_path)
        written: set[str] = set()  # (protobuf hands out new wrapper objects: names, not ids)
        with open(staging / data_name, "wb") as out:
            def write(tensor: onnx.TensorProto, values: np.ndarray, initializer: bool) -> bool:
                if not initializer or values.nbytes < EXTERNAL_DATA_MIN_BYTES:
                    return False
                out.write(b"\0" * (-out.tell() % EXTERNAL_DATA_ALIGN))
                offset = out.tell()
                out.write(np.ascontiguousarray(values).view(np.uint8).data)
                _set_location(tensor, data_name, offset, values.nbytes)
                written.add(tensor.name)
                return True

            proto = unpack_bytes(data, str(in_path), sink=write, release=release)
        for tensor in _external_tensors(proto):  # the file's own references, as read_packed_proto refuses them
            if tensor.name not in written:
                raise InputError(f"{in_path}: tensor {tensor.name!r} points at an external file; a packed "
                                 "model holds all its data")
        (staging / out_path.name).write_bytes(proto.SerializeToString())
        os.replace(staging / data_name, folder / data_name)  # data first: the model never points at nothing
        os.replace(staging / out_path.name, out_path)
    except OSError as exc:
        raise OutputError(cannot_write(out_path, exc)) from exc
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return out_path


def session(path_or_bytes, providers=("cpu",), sess_options=None, threads: int | None = None):
    """An onnxruntime.InferenceSession for a packed model, built from memory (nothing unpacked
    is written to disk). The large initializers go to ORT as in-memory values, decoded straight
    into numpy arrays: the model protobuf ORT parses then holds only the graph (MiniLM fp32 is
    ready in about 0.38 s instead of 0.53 s), and models over 2 GB need it. With the caller's own
    `sess_options` that is done only over 2 GB, since it adds the values to those options.
    `threads`: intra-op threads of the options made here (ORT's default: every core)."""
    import onnxruntime as ort

    from onnxcomp.model import PROTOBUF_LIMIT, _initializer_bytes
    from onnxcomp.runtime import provider_name

    arrays: dict[str, np.ndarray] = {}
    proto = read_packed_proto(path_or_bytes, arrays)
    if sess_options is not None and _initializer_bytes(proto) + sum(a.nbytes for a in arrays.values()) \
            <= PROTOBUF_LIMIT:
        for tensor in proto.graph.initializer:  # the caller's options stay as they were
            if tensor.name in arrays:
                tensor.raw_data = arrays.pop(tensor.name).tobytes()
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    names = [provider_name(p) for p in providers]
    options = sess_options
    if options is None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
    keep = []
    if arrays:
        for tensor in proto.graph.initializer:  # ORT replaces these external tensors by the values
            if tensor.name in arrays:
                tensor.data_location = T.EXTERNAL
                entry = tensor.external_data.add()
                entry.key, entry.value = "location", "onnxcomp-in-memory"
        keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
        options.add_external_initializers(list(arrays), keep)
    try:
        sess = ort.InferenceSession(proto.SerializeToString(), sess_options=options, providers=names)
    except Exception as exc:
        from onnxcomp.runtime import CannotRun

        raise CannotRun(f"onnxruntime cannot load the packed model: {str(exc).strip().splitlines()[0][:300]}") from exc
    sess._onnxcomp_keep = (keep, arrays)  # ORT may read the arrays in place: they live as long as it
    return sess
