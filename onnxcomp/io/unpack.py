"""Reading a packed .onnxc file (the format: onnxcomp/io/format.py): every length, size and
checksum checked, streams decoded on threads, into a proto, numpy arrays or an external data file."""

from __future__ import annotations

import functools
import lzma
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcomp.errors import InputError, OutputError
from onnxcomp.io import coding
from onnxcomp.io.coding import tables as shared_tables
from onnxcomp.io.coding.io import CorruptStream, Reader, Writer
from onnxcomp.io.format import (
    BUNDLE_ROW,
    CODING_THREADS,
    FIELDS,
    MAGIC,
    MAX_DECODED,
    PACKED_FIXED,
    PLAIN_TYPES,
    READS,
    STORAGE,
    STORAGE_DTYPE,
    TABLES_CAP,
    T,
    _element_count,
    _in_order,
    _Member,
    _raw_nbytes,
    _Stream,
    all_tensors,
)


def unpack_bytes(data: bytes | memoryview, where: str = "packed model",
                 max_decoded: int = MAX_DECODED, arrays: dict | None = None, sink=None,
                 release=None) -> onnx.ModelProto:
    """Validate and decode .onnxc bytes into a ModelProto; every problem is one InputError.

    `arrays`: main-graph initializers (raw data of a plain numeric type, 1 KB or more) are put
    there as read-only numpy arrays (name -> array, shaped) instead of into the proto, whose
    tensors are left without data: for a session that takes them as in-memory values.
    `sink`, `release`: as for _unpack (unpack() writes tensors to a data file as they decode)."""
    # Decoding on threads paid off only into arrays (a 1.2 GB int4 model: 3.4 s on two threads,
    # 3.9 s on one); into the proto or a data file every tensor is copied under the GIL, and two
    # threads measured slower (7.0 s against 4.9 s, and 7.2-7.7 s against 4.8-6.3 s).
    workers = CODING_THREADS if arrays is not None else 1
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
                       sink, release, workers)
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
            sink=None, release=None, workers: int = 1) -> onnx.ModelProto:
    """`sink(tensor, values, is_main_initializer) -> bool`: offered each decoded raw-data tensor;
    True when it took it (the proto's tensor is then left without data). `release(offset, length)`:
    called once a stream's coded bytes are no longer needed. `workers`: threads decoding streams
    ahead of the one consumed (the decoders release the GIL)."""
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
    for stream, at, raw in _in_order(jobs, workers):
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
    from onnxcomp.files import staging_folder
    from onnxcomp.model import EXTERNAL_DATA_ALIGN, EXTERNAL_DATA_MIN_BYTES, _external_tensors, _set_location

    data_name = out_path.name + ".data"
    with staging_folder(out_path) as staging:
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
        os.replace(staging / data_name, out_path.parent / data_name)  # data first: the model never points at nothing
        os.replace(staging / out_path.name, out_path)
    return out_path
