"""The editable model: an onnx-graphsurgeon Graph plus the model-level facts it lacks.

Protobuf appears only here (load/save) and in the packed container. Loading checks the file
before trusting it (empty, not a protobuf, not a model, unsafe or missing external data), and
saving is atomic: everything is written to a temporary folder beside the target and renamed
into place only when complete, so no half-written output is ever left behind.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from onnxcomp.errors import InputError, OutputError
from onnxcomp.files import staging_folder
from onnxcomp.graph_utils import iter_nodes, toposort
from onnxcomp.io.external_data import (  # noqa: F401 (re-exported: model.X was their home)
    COPY_CHUNK,
    MAPPABLE,
    ExternalValues,
    _attach_external_values,
    _declared_nbytes,
    _external_tensors,
    _itemsize,
    _walk_constants,
    external_fields,
    load_external_data_safely,
    refuse_external_references,
)
from onnxcomp.repair import describe_nonfinite, nonfinite_initializers, unique_node_names  # noqa: F401 (API)
from onnxcomp.value_types import (
    restore_type_attributes,
    restore_types,
    type_attributes_as_strings,
    types_to_keep,
    untyped_for_export,
)

# graphsurgeon logs warnings to the terminal; onnxcomp reports problems itself, in one line.
G_LOGGER.severity = G_LOGGER.CRITICAL + 10

# Protobuf cannot serialize a message over 2 GiB; above this many initializer bytes we save
# the weights as external data. Kept a little under 2 GiB to leave room for the graph itself.
PROTOBUF_LIMIT = 2**31 - 64 * 2**20
EXTERNAL_DATA_MIN_BYTES = 1024
EXTERNAL_DATA_ALIGN = 4096  # tensor offsets in written data files: page-aligned, so readers can map them


@dataclass
class Model:
    """One model being optimized: the graph and what ModelProto holds around it."""

    graph: gs.Graph
    ir_version: int
    opset_imports: dict[str, int]
    metadata: dict[str, str] = field(default_factory=dict)
    producer_name: str = ""
    producer_version: str = ""
    domain: str = ""
    model_version: int = 0
    doc_string: str = ""
    source_path: Path | None = None
    # IR >= 4 graph inputs that also have an initializer (a default value): kept as inputs on export
    initializer_inputs: set[str] = field(default_factory=set)
    packing: dict | None = None  # set by the entropy pass: save(..., "x.onnxc") packs with this coder
    # one line per repair made while loading (e.g. duplicate node names renamed): the caller says them
    load_notes: list[str] = field(default_factory=list)
    # optional/map/nested-sequence types graphsurgeon cannot write back, by value name (value_types.py)
    kept_types: dict[str, bytes] = field(default_factory=dict)

    # ---- conversions -------------------------------------------------------------------
    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, source_path: Path | None = None) -> Model:
        check_structure(proto)
        try:
            with type_attributes_as_strings(proto):
                graph = gs.import_onnx(proto)
            toposort(graph)
        except Exception as exc:  # graphsurgeon raises many kinds on malformed graphs
            if "Cycle" in str(exc):
                raise InputError("the graph has a cycle: a node depends on its own output") from exc
            raise InputError(f"cannot read the graph: {type(exc).__name__}: {exc}") from exc
        renamed = unique_node_names(graph)
        _keep_declared_io_shapes(graph, proto.graph)
        return cls(
            graph=graph,
            ir_version=proto.ir_version,
            opset_imports={o.domain: o.version for o in proto.opset_import},
            metadata={p.key: p.value for p in proto.metadata_props},
            producer_name=proto.producer_name,
            producer_version=proto.producer_version,
            domain=proto.domain,
            model_version=proto.model_version,
            doc_string=proto.doc_string,
            source_path=source_path,
            initializer_inputs=({i.name for i in proto.graph.input} & {t.name for t in proto.graph.initializer}
                                if proto.ir_version >= 4 else set()),
            load_notes=[renamed] if renamed else [],
            kept_types=types_to_keep(proto),
        )

    def to_proto(self, weights: bool = True) -> onnx.ModelProto:
        """Export to a ModelProto (topologically sorted), keeping IR version, opsets and metadata.

        `weights=False` leaves the data of initializers of 1 KiB or more out (they are exported
        as external data that points nowhere): enough for shape inference, without a copy of
        every weight."""
        if not weights:
            with _weights_as_stubs(self, lambda const, stub: _point_nowhere(stub, const)):
                return self._export()
        # The weights go into the exported proto once, by hand: graphsurgeon's export copies each
        # one twice (into the graph, then the graph into the model), a third of the time
        # `fold, cleanup, fuse` took on MiniLM.
        stubbed: dict[str, gs.Constant] = {}
        with _weights_as_stubs(self, lambda const, stub: stubbed.setdefault(const.name, const)):
            proto = self._export()
        for tensor in proto.graph.initializer:
            const = stubbed.get(tensor.name)
            if const is not None:
                tensor.ClearField("data_location")
                del tensor.external_data[:]
                tensor.raw_data = _data_bytes(const)
        return proto

    def _export(self) -> onnx.ModelProto:
        """graphsurgeon's export of the graph, with the model's own fields restored."""
        toposort(self.graph)
        _detach_renamed_constants(self.graph)
        opsets = dict(self.opset_imports)
        opsets[""] = self.graph.opset  # a pass may have upgraded the default-domain opset
        self.graph.import_domains = [onnx.helper.make_opsetid(d, v) for d, v in opsets.items()]
        with untyped_for_export(self.graph, self.kept_types):
            proto = gs.export_onnx(self.graph, do_type_check=False)
        restore_types(proto, self.kept_types)
        restore_type_attributes(proto)
        proto.ir_version = self.ir_version
        proto.producer_name = self.producer_name
        proto.producer_version = self.producer_version
        proto.domain = self.domain
        proto.model_version = self.model_version
        proto.doc_string = self.doc_string
        del proto.metadata_props[:]
        for key, value in self.metadata.items():
            proto.metadata_props.add(key=key, value=value)
        _drop_shadowing_initializers(proto.graph, set())
        if self.ir_version < 4:
            _list_initializers_as_inputs(proto.graph)
        elif self.initializer_inputs:
            _hoist_initializers(proto.graph, self.initializer_inputs - {t.name for t in proto.graph.initializer})
            _list_initializers_as_inputs(proto.graph, only=self.initializer_inputs)
        return proto

    def copy(self) -> Model:
        """A copy of the graph that shares the weights: used to roll a failed pass back and for
        the gate's snapshots, so it must stay cheap for models of several GB. Sharing is safe
        because passes give a Constant new values (`const.values = new`) and never edit an
        array in place; external weights stay in their file until a pass reads them."""
        return dataclasses.replace(
            self, graph=self.graph.copy(), opset_imports=dict(self.opset_imports), metadata=dict(self.metadata),
            initializer_inputs=set(self.initializer_inputs), packing=dict(self.packing) if self.packing else None,
            load_notes=list(self.load_notes))

    # ---- facts --------------------------------------------------------------------------
    @property
    def opset(self) -> int:
        return int(self.graph.opset)

    def initializers(self) -> dict[str, gs.Constant]:
        """Every Constant tensor of the main graph by name, as graphsurgeon's `graph.tensors()` finds
        them (graph inputs, nodes' inputs and outputs, graph outputs; a later tensor of the same
        name wins), without building its map of every tensor: the pipeline asks twice per pass."""
        graph = self.graph

        def walk():
            yield from graph.inputs
            for node in graph.nodes:
                yield from node.inputs
                yield from node.outputs
            yield from graph.outputs

        return {t.name: t for t in walk() if isinstance(t, gs.Constant) and t.name}

    def summary(self) -> dict[str, int]:
        """Counts used by the per-pass report: nodes, initializers and parameter bytes."""
        consts = self.initializers().values()
        return {
            "nodes": len(self.graph.nodes),
            "initializers": len(consts),
            "param_bytes": int(sum(constant_nbytes(c) for c in consts)),
        }


def check_structure(proto: onnx.ModelProto) -> None:
    """Refuse what no pass can work on safely: unknown opsets, tensors written twice."""
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise InputError(f"opset {opset.version} is newer than this onnx supports ({newest}); upgrade onnx")
    produced = {i.name for i in proto.graph.input} | {i.name for i in proto.graph.initializer}
    for node in proto.graph.node:
        for name in node.output:
            if not name:
                continue
            if name in produced:
                raise InputError(f"tensor {name!r} is written by more than one node (or is also an input)")
            produced.add(name)


def constant_nbytes(const: gs.Constant) -> int:
    """Size of a constant's values without loading lazy (possibly external) data."""
    values = const._values if hasattr(const, "_values") else const.values
    return int(getattr(values, "nbytes", 0))


def peek_values(const: gs.Constant) -> np.ndarray:
    """A constant's values without keeping them loaded in the Constant (lazy ones are read again
    on each call): to read every weight once (hashing...) without holding them all in memory."""
    values = const._values
    if not isinstance(values, LazyValues):
        return values
    tensor = values.tensor
    try:
        if tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL and \
                tensor.data_type in _NATIVE_DTYPES and np.little_endian:
            # a read-only view of the protobuf's bytes: no copy (numpy_helper.to_array copies every weight)
            return np.frombuffer(tensor.raw_data, _NATIVE_DTYPES[tensor.data_type]).reshape(tuple(tensor.dims))
        return values.load()
    except ValueError as exc:  # numpy's "cannot reshape array of size 10 into shape (1000,)"
        raise InputError(f"tensor {const.name!r}: its data does not fill its shape {list(tensor.dims)} ({exc})") from None


_NATIVE_DTYPES = {t: np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t)) for t in (
    onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.INT8,
    onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16, onnx.TensorProto.INT32,
    onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64)}


def _drop_shadowing_initializers(graph: onnx.GraphProto, outer: set[str]) -> None:
    """graphsurgeon exports an outer-scope Constant read by a subgraph as an initializer of the
    subgraph too, under the same name; a name defined twice breaks ORT (e.g. when it inlines an If
    with a constant condition). Keep the outer one: subgraphs see outer-scope initializers."""
    keep = [t for t in graph.initializer if t.name not in outer]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
    visible = outer | {t.name for t in graph.initializer}
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                _drop_shadowing_initializers(sub, visible)


def _hoist_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    """An input with a default value that only subgraphs read is exported by graphsurgeon as an
    initializer of those subgraphs: move it back to the main graph, where it stays an input the
    user can feed (the subgraphs then see the outer one)."""
    if not names:
        return
    found: dict[str, onnx.TensorProto] = {}

    def take(sub: onnx.GraphProto) -> None:
        for init in sub.initializer:
            if init.name in names and init.name not in found:
                found[init.name] = onnx.TensorProto()
                found[init.name].CopyFrom(init)
        keep = [t for t in sub.initializer if t.name not in names]
        if len(keep) != len(sub.initializer):
            del sub.initializer[:]
            sub.initializer.extend(keep)
        for node in sub.node:
            for attr in node.attribute:
                for inner in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                    take(inner)

    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                take(sub)
    graph.initializer.extend(found[name] for name in sorted(found))


def _list_initializers_as_inputs(graph: onnx.GraphProto, only: set[str] | None = None) -> None:
    """IR < 4 requires every initializer to also be a graph input, and at IR >= 4 an input with an
    initializer is an input with a default value; graphsurgeon drops both from the inputs."""
    listed = {i.name for i in graph.input}
    for init in graph.initializer:
        if init.name not in listed and (only is None or init.name in only):
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))


# ---- loading --------------------------------------------------------------------------
def load(source: str | os.PathLike | onnx.ModelProto | bytes | Model) -> Model:
    """Load a model from a path, bytes, a ModelProto or a Model (returned as is)."""
    return load_with_proto(source)[0]


def load_with_proto(source) -> tuple[Model, onnx.ModelProto | None]:
    """`load`, and the protobuf the Model was read from (None for a Model given as is): its
    graph is the input as given, so facts about the input need no export of the Model."""
    if isinstance(source, Model):
        return source, None
    if isinstance(source, onnx.ModelProto):
        return Model.from_proto(source), source
    if isinstance(source, (bytes, bytearray)):
        proto = parse_model_bytes(bytes(source), "the given bytes")
        refuse_external_references(proto, "the given bytes")
        return Model.from_proto(proto), proto
    path = Path(source)
    if str(path).endswith(".onnxc"):
        from onnxcomp.io import container  # the packed format lives in its own module

        proto = container.read_packed_proto(path)
        refuse_external_references(proto, str(path))
        return Model.from_proto(proto, path), proto
    deferred: dict[str, tuple[Path, int, int]] = {}
    proto = load_proto(path, defer=deferred)
    model = Model.from_proto(proto, path)
    if deferred:
        _attach_external_values(model, proto, deferred)
    return model, proto


def load_proto(path: Path, defer: dict | None = None) -> onnx.ModelProto:
    """Read and sanity-check an .onnx file, with its external data loaded safely.

    With `defer` (a dict), the data of main-graph initializers of plain numeric types is
    checked but not read: `defer` receives name -> (file, offset, length) for each."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not an ONNX model file")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty")
    proto = parse_model_bytes(path.read_bytes(), str(path))
    load_external_data_safely(proto, path.parent, defer)
    return proto


def parse_model_bytes(data: bytes, where: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise InputError(f"{where}: not an ONNX model (the protobuf cannot be parsed: {exc})") from exc
    # Random bytes sometimes parse as a protobuf; a real model has an IR version and a graph.
    if proto.ir_version <= 0 or not proto.HasField("graph") or not proto.opset_import and proto.ir_version >= 3:
        raise InputError(f"{where}: not an ONNX model (no IR version, graph or opset import)")
    if proto.ir_version > onnx.IR_VERSION:
        raise InputError(
            f"{where}: IR version {proto.ir_version} is newer than this onnx supports ({onnx.IR_VERSION})"
        )
    return proto


# ---- saving ---------------------------------------------------------------------------
def save(model: Model | onnx.ModelProto, path: str | os.PathLike, *, external_data: bool | None = None,
         force: bool = False, source: str | os.PathLike | None = None) -> Path:
    """Save atomically. Weights go to `<name>.data` beside the model when they would not fit
    in one protobuf (over 2 GB) or when `external_data=True`.

    `source` is the input path: writing over it is refused unless `force=True`, and even then
    the input is replaced only once the new file is complete.
    """
    path = Path(path)
    if source is not None and not force and path.exists() and path.resolve() == Path(source).resolve():
        raise OutputError(f"{path}: refusing to overwrite the input model (use --force)")
    if str(path).endswith(".onnxc"):
        from onnxcomp.io import container

        return container.save_packed(load(model) if isinstance(model, onnx.ModelProto) else model, path)
    if isinstance(model, onnx.ModelProto):
        # its external data (if any) was never loaded: the saved model would point at a file
        # that is not beside it, or anywhere (a packed file's skeleton, say)
        refuse_external_references(model, str(source or "the model"))
        proto = onnx.ModelProto()
        proto.CopyFrom(model)  # moving weights to external data edits the proto: not the caller's
        if external_data is None:
            external_data = _initializer_bytes(proto) > PROTOBUF_LIMIT
    else:
        if external_data is None:
            external_data = model.summary()["param_bytes"] > PROTOBUF_LIMIT
        # With external data a Model's weights are streamed to the file one by one (below).
        proto = None if external_data else model.to_proto()
    folder = path.parent if str(path.parent) else Path(".")
    with staging_folder(path) as staging:
        staged = staging / path.name
        data_name = path.name + ".data"
        moved: list = []  # (Constant, offset, length) of weights copied from their file unread
        if external_data and proto is None:
            with open(staging / data_name, "wb") as data:
                proto = _export_streaming(model, data, data_name, moved)
        elif external_data:
            _typed_fields_to_raw_data(proto)
            external_data_helper.convert_model_to_external_data(
                proto, all_tensors_to_one_file=True, location=data_name, size_threshold=EXTERNAL_DATA_MIN_BYTES
            )
            external_data_helper.write_external_data_tensors(proto, str(staging))
        with open(staged, "wb") as fh:
            fh.write(proto.SerializeToString())
        # Data first, then the model file that refers to it: the model never points at nothing.
        if external_data and (staging / data_name).exists() and (staging / data_name).stat().st_size:
            os.replace(staging / data_name, folder / data_name)
            # Those weights now read from the new file: the one they came from may just have been
            # replaced (saving over the input with force), and its offsets differ.
            for const, offset, length in moved:
                if isinstance(const._values, ExternalValues):
                    const._values = ExternalValues(const._values._meta, (folder / data_name).resolve(), offset, length)
        os.replace(staged, path)
    return path


class _Stub(LazyValues):
    """Stands in for a Constant's values during an export: graphsurgeon embeds `tensor` as it
    is, and this one holds no data, only where the data is."""

    def __init__(self, meta: onnx.TensorProto, values):
        self.tensor, self.shape, self.dtype, self.nbytes = meta, values.shape, values.dtype, int(values.nbytes)


def _tensor_meta(const: gs.Constant) -> onnx.TensorProto | None:
    """Name, type and shape of a Constant whose bytes _write_data can write as they are, else None."""
    from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx

    values = const._values
    if isinstance(values, ExternalValues):
        data_type = values._meta.data_type
    elif isinstance(values, LazyValues):
        tensor = values.tensor
        if not isinstance(tensor, onnx.TensorProto) or not tensor.HasField("raw_data") or \
                tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        data_type = tensor.data_type
    elif isinstance(values, np.ndarray) and values.dtype.kind in "biuf" and values.dtype.type.__module__ == "numpy":
        data_type = dtype_to_onnx(values.dtype)
        if dtype_to_onnx(const.export_dtype) != data_type:
            return None  # graphsurgeon converts these on export
    else:
        return None
    return onnx.TensorProto(name=const.name, data_type=data_type, dims=[int(d) for d in values.shape])


def _data_bytes(const: gs.Constant) -> bytes:
    """The raw little-endian bytes of a Constant that _tensor_meta accepts."""
    values = const._values
    if isinstance(values, ExternalValues):
        return values.read_bytes()
    if isinstance(values, LazyValues):
        return values.tensor.raw_data
    return np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()


def _write_data(const: gs.Constant, out) -> None:
    values = const._values
    if isinstance(values, ExternalValues):
        values.copy_to(out)
    elif isinstance(values, LazyValues):
        out.write(values.tensor.raw_data)
    else:
        array = np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<"))
        out.write(array.reshape(-1).view(np.uint8).data)


def _keep_declared_io_shapes(graph: gs.Graph, declared: onnx.GraphProto) -> None:
    """graphsurgeon takes a tensor's type from value_info before the graph's own input/output
    declaration; a model whose value_info repeats an output without its shape (ddddocr) would lose
    the shape it declares for that output. The declaration wins."""
    for tensors, infos in ((graph.inputs, declared.input), (graph.outputs, declared.output)):
        shapes = {vi.name: vi.type.tensor_type.shape for vi in infos
                  if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
        for tensor in tensors:
            if isinstance(tensor, gs.Variable) and tensor.shape is None and tensor.name in shapes:
                tensor.shape = [d.dim_value if d.HasField("dim_value") else d.dim_param or None
                                for d in shapes[tensor.name].dim]


def _detach_renamed_constants(graph: gs.Graph) -> None:
    """graphsurgeon exports a Constant still backed by the TensorProto it was read from by
    renaming that very proto: a Constant renamed since (minify, unique weight names) would rename
    the initializer of the caller's own model, which then no longer loads. Such a Constant gets a
    copy of its proto first (once: the copy then carries the new name)."""
    for node in iter_nodes(graph):
        for const in node.inputs:
            values = getattr(const, "_values", None)
            if type(values) is LazyValues and values.tensor.name != const.name:
                own = onnx.TensorProto()
                own.CopyFrom(values.tensor)
                own.name = const.name
                const._values = LazyValues(own)  # (a new one: a model copy may share the old)


@contextmanager
def _weights_as_stubs(model: Model, place):
    """Within the block, main-graph initializers of EXTERNAL_DATA_MIN_BYTES or more export
    without their data; `place(const, meta)` says (in meta) where the data is, writing it
    if it must. Each Constant gets its own values back afterwards."""
    swapped = []
    try:
        for const in model.initializers().values():
            meta = _tensor_meta(const) if constant_nbytes(const) >= EXTERNAL_DATA_MIN_BYTES else None
            if meta is None:
                continue
            place(const, meta)
            swapped.append((const, const._values))
            const._values = _Stub(meta, const._values)
        yield
    finally:
        for const, values in swapped:
            const._values = values


def _set_location(meta: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    meta.data_location = onnx.TensorProto.EXTERNAL
    del meta.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        meta.external_data.add(key=key, value=value)


NOT_LOADED = "(not loaded)"  # the location of a weight `to_proto(weights=False)` leaves out


def _point_nowhere(meta: onnx.TensorProto, const: gs.Constant) -> None:
    _set_location(meta, NOT_LOADED, 0, constant_nbytes(const))


def _export_streaming(model: Model, data, data_name: str, moved: list) -> onnx.ModelProto:
    """Export `model` with its weights written to the open file `data`, one tensor at a time,
    so no protobuf (and no second copy of the weights) ever holds them all. `moved` receives
    (Constant, offset, length) for each ExternalValues weight copied."""

    def place(const, meta):
        data.write(b"\0" * (-data.tell() % EXTERNAL_DATA_ALIGN))
        offset = data.tell()
        _write_data(const, data)
        _set_location(meta, data_name, offset, data.tell() - offset)
        if isinstance(const._values, ExternalValues):
            moved.append((const, offset, data.tell() - offset))

    with _weights_as_stubs(model, place):
        proto = model.to_proto()
    # What is left inline (subgraph initializers, Constant node values) goes to the same file.
    _typed_fields_to_raw_data(proto)
    for tensor in external_data_helper._get_all_tensors(proto):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_DATA_MIN_BYTES:
            data.write(b"\0" * (-data.tell() % EXTERNAL_DATA_ALIGN))
            offset = data.tell()
            data.write(tensor.raw_data)
            tensor.ClearField("raw_data")
            _set_location(tensor, data_name, offset, data.tell() - offset)
    return proto


def _typed_fields_to_raw_data(proto: onnx.ModelProto) -> None:
    """onnx only moves raw_data to external files; old exporters (CNTK...) wrote float_data."""
    for tensor in external_data_helper._get_all_tensors(proto):
        if tensor.HasField("raw_data") or tensor.data_type == onnx.TensorProto.STRING:
            continue
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue
        values = onnx.numpy_helper.to_array(tensor)
        if values.nbytes >= EXTERNAL_DATA_MIN_BYTES:
            tensor.CopyFrom(onnx.numpy_helper.from_array(values, tensor.name))


def _initializer_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) or t.ByteSize() for t in external_data_helper._get_all_tensors(proto))


def serialize(model: Model) -> bytes:
    """Model bytes for an in-memory ORT session (under 2 GB)."""
    return model.to_proto().SerializeToString()


def upgrade_opset(model: Model, version: int) -> Model:
    """A copy of `model` converted to default-domain opset `version` by onnx.version_converter.

    Opset imports of domains no node uses are dropped first (the converter refuses some of
    them), and the IR version is raised to the lowest one that allows the new opset. A model
    already at or above `version` is returned as is. Raises InputError when the conversion fails.
    """
    if model.opset >= version:
        return model
    from onnx import version_converter

    proto = model.to_proto()
    used = {n.domain or "" for n in proto.graph.node} | {""}
    kept = [o for o in proto.opset_import if (o.domain or "") in used]
    del proto.opset_import[:]
    proto.opset_import.extend(kept)
    try:
        converted = version_converter.convert_version(proto, version)
    except Exception as exc:  # the converter raises several kinds on unsupported patterns
        raise InputError(f"cannot upgrade the model from opset {model.opset} to {version}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
    min_ir = onnx.helper.find_min_ir_version_for(list(converted.opset_import), ignore_unknown=True)
    converted.ir_version = max(converted.ir_version, min_ir, 7)
    upgraded = Model.from_proto(converted, model.source_path)
    upgraded.metadata = dict(model.metadata)
    return upgraded
