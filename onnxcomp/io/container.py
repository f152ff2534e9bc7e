"""The packed model file (.onnxc), as a whole: pack and unpack files, load and save models, and
an ORT session straight from a packed file. The format is in onnxcomp/io/format.py, the writer
in onnxcomp/io/pack.py, the reader in onnxcomp/io/unpack.py; their public names are here too."""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcomp.errors import InputError, OutputError
from onnxcomp.io import coding
from onnxcomp.io.format import (  # noqa: F401 (API)
    BUNDLE_MAX,
    FIELDS,
    MAGIC,
    PLAIN_TYPES,
    RANS_MARGIN,
    RECODE_MAX,
    UNSIGNED,
    VERSION,
    T,
    all_tensors,
)
from onnxcomp.io.pack import pack_proto, pack_to  # noqa: F401 (API)
from onnxcomp.io.unpack import _declared_total, read_packed_proto, unpack, unpack_bytes  # noqa: F401 (API)


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


SESSION_VIA_FILE = 512 << 20  # decoded tensor bytes from which session() goes through an unpacked file


def session(path_or_bytes, providers=("cpu",), sess_options=None, threads: int | None = None):
    """An onnxruntime.InferenceSession for a packed model, built from memory (nothing unpacked
    is written to disk). The large initializers go to ORT as in-memory values, decoded straight
    into numpy arrays: the model protobuf ORT parses then holds only the graph (MiniLM fp32 is
    ready in about 0.38 s instead of 0.53 s), and models over 2 GB need it. With the caller's own
    `sess_options` that is done only over 2 GB, since it adds the values to those options.
    `threads`: intra-op threads of the options made here (ORT's default: every core).

    A packed file of SESSION_VIA_FILE decoded bytes or more is instead unpacked, one stream at a
    time, to a temporary external-data model that ORT loads and that is removed once the session
    is ready: ORT keeps its own copy of every weight (and a prepacked one of MatMulNBits weights),
    so arrays handed to it in memory were a second copy. A 29 GB decoder's 4-bit file peaked at
    9.9-11.6 GiB through memory, 4.4 GiB through the file."""
    import onnxruntime as ort

    from onnxcomp.model import PROTOBUF_LIMIT, _initializer_bytes
    from onnxcomp.runtime import provider_name

    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    names = [provider_name(p) for p in providers]
    options = sess_options
    if options is None:
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
    if not isinstance(path_or_bytes, (bytes, bytearray, memoryview)) and \
            _declared_total(Path(path_or_bytes)) >= SESSION_VIA_FILE:
        return _session_through_file(Path(path_or_bytes), options, names)
    arrays: dict[str, np.ndarray] = {}
    proto = read_packed_proto(path_or_bytes, arrays)
    if sess_options is not None and _initializer_bytes(proto) + sum(a.nbytes for a in arrays.values()) \
            <= PROTOBUF_LIMIT:
        for tensor in proto.graph.initializer:  # the caller's options stay as they were
            if tensor.name in arrays:
                tensor.raw_data = arrays.pop(tensor.name).tobytes()
    keep = []
    if arrays:
        for tensor in proto.graph.initializer:  # ORT replaces these external tensors by the values
            if tensor.name in arrays:
                tensor.data_location = T.EXTERNAL
                entry = tensor.external_data.add()
                entry.key, entry.value = "location", "onnxcomp-in-memory"
        keep = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays.values()]
        options.add_external_initializers(list(arrays), keep)
    sess = _ort_session(proto.SerializeToString(), options, names)
    sess._onnxcomp_keep = (keep, arrays)  # ORT may read the arrays in place: they live as long as it
    return sess


def _session_through_file(path: Path, options, names: list[str]):
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="onnxcomp-session-"))
    try:
        model = unpack(path, folder / "model.onnx", external_data=True)
        return _ort_session(str(model), options, names)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # (ORT has read the weights into its own memory)


def _ort_session(model: bytes | str, options, names: list[str]):
    import onnxruntime as ort

    try:
        return ort.InferenceSession(model, sess_options=options, providers=names)
    except Exception as exc:
        from onnxcomp.runtime import CannotRun

        raise CannotRun(f"onnxruntime cannot load the packed model: {str(exc).strip().splitlines()[0][:300]}") from exc
