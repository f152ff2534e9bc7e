"""Writing a packed .onnxc file (the format: onnxcomp/io/format.py): every tensor worth it coded
in its own stream, small ones in bundles, one tensor in memory at a time."""

from __future__ import annotations

import functools
import io
import lzma
import os
import shutil
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx

from onnxcomp.errors import InputError, OutputError
from onnxcomp.io import coding
from onnxcomp.io.coding import tables as shared_tables
from onnxcomp.io.coding.io import Writer
from onnxcomp.io.format import (
    BUNDLE_CAP,
    BUNDLE_MAX,
    BUNDLE_ROW,
    CODING_AHEAD,
    CODING_THREADS,
    FIELDS,
    FIT_STREAMS,
    MAGIC,
    RANS_MARGIN,
    RECODE_MAX,
    SECTION_BROTLI_MAX,
    SLOW_CODERS_MAX,
    STORAGE_CODE,
    UNSIGNED,
    VERSION,
    T,
    _element_count,
    _in_order,
    _Member,
    _payload,
    _Stream,
    _varint_size,
    all_tensors,
)


def pack_proto(proto: onnx.ModelProto, coder: str = "auto") -> tuple[bytes, dict[str, Any]]:
    """Pack a ModelProto into .onnxc bytes; returns (bytes, stats)."""
    out = io.BytesIO()
    stats = pack_to(proto, out, coder)
    return out.getvalue(), stats


def _tables_section(shared: np.ndarray) -> bytes:
    """The shared tables section: a method byte (0 raw, 1 xz as raw LZMA2, 3 brotli), the tables."""
    method, tables = _compress_section(shared_tables.write(shared), (0, 2, 3), xz=coding.tensor.xz_compress)
    return bytes([{0: 0, 2: 1, 3: 3}[method]]) + tables


def _compress_section(data: bytes, methods=(0, 1, 2, 3), xz=None) -> tuple[int, bytes]:
    """(method, bytes) of the smallest of raw (0), zstd (1), xz (2, the .xz format unless `xz` is
    given) and brotli (3) for the skeleton or the tables; xz is weighed by its slow decoding as for
    tensors, brotli (slow to encode) is tried up to SECTION_BROTLI_MAX bytes."""
    coders = {0: bytes, 1: coding.tensor.zstd_compress,
              2: xz or (lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)), 3: coding.tensor.brotli_compress}
    options = [(m, coders[m](data)) for m in methods if m != 3 or len(data) <= SECTION_BROTLI_MAX]
    return min(options, key=lambda o: coding.tensor.weighed(coding.tensor.XZ if o[0] == 2 else 0, len(o[1])))


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
        for result in _in_order(jobs, CODING_THREADS, CODING_AHEAD):
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
