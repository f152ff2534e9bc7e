"""The library entry points behind `onnxcomp.optimize` and `onnxcomp.inspect`."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from onnxcomp.base import Pass
from onnxcomp.calibration import CalibrationData, ImagePreprocess
from onnxcomp.context import PassContext, Tolerance
from onnxcomp.gate import DEFAULT_MIN_COSINE, Gate
from onnxcomp.model import Model, constant_nbytes, load, load_with_proto, peek_values
from onnxcomp.pipeline import Pipeline, as_pipeline
from onnxcomp.report import Report


@dataclass
class OptimizeResult:
    model: Model
    report: Report

    def save(self, path: str | Path, **kwargs: Any) -> Path:
        from onnxcomp.model import save

        return save(self.model, path, **kwargs)


def optimize(model_or_path, spec_or_pipeline: str | Pipeline | Sequence[Pass],
             calibration: Any = None, providers: str | list[str] | None = None, *,
             evaluation: Any = None, preprocess: ImagePreprocess | str | None = None,
             verify_each: bool = False, on_failure: str = "stop", tolerance: Tolerance | None = None,
             check: bool = True, seed: int = 0, progress=None, example_inputs: Any = None,
             gate: Gate | bool | None = None, dims: dict[str, int] | None = None,
             shapes: dict[str, tuple[int, ...]] | None = None,
             carry_state: dict[str, str] | None = None) -> OptimizeResult:
    """Run a pipeline over a model and return the new model and its report.

    `model_or_path` may also be a torch.nn.Module (with `example_inputs`): it is exported first.
    `calibration` / `evaluation`: an .npz path, a folder of .npz/.npy files or of images (with
    `preprocess`), an iterable of {input_name: array} dicts, or a reader with get_next() (layouts:
    onnxcomp.feeds). `carry_state` ({output: input}) feeds a stateful model the state it output
    on the previous sample.

    The gate (onnxcomp.checking): a lossy pipeline is held to `gate`, by default `Gate.default()`
    (cosine >= 0.99 per output, score-map decisions agree >= 0.95), on the evaluation data or a
    held-out part of the calibration data, and is refused without either; `gate=False` runs it
    unchecked (NOT VALIDATED in the report and the model's metadata). A lossless pipeline is
    compared with the input on the data given, else on generated inputs (`check=False` skips it).
    `dims` sizes symbolic dimensions of generated inputs ({"batch": 4}) and `shapes` whole input
    shapes ({"input": (1, 512)}); the model itself keeps them symbolic.
    """
    from onnxcomp import checking
    from onnxcomp.feeds import input_specs

    if type(model_or_path).__module__.startswith("torch") or hasattr(model_or_path, "state_dict"):
        from onnxcomp.torch_export import export

        if example_inputs is None:
            from onnxcomp.errors import InputError

            raise InputError("optimizing a torch module needs example_inputs")
        model_or_path = export(model_or_path, example_inputs).model
    source, given = load_with_proto(model_or_path)
    # the graph, weights left out, read twice below: outlined from the protobuf as given, which
    # costs no export of the Model (a third of `fold, cleanup, fuse` on small models)
    graph_only = _outline(given) if given is not None else source.to_proto(weights=False)
    specs = input_specs(graph_only)
    check_model(source, graph_only)  # passes assume a well-formed graph; refuse one that is not, naming why
    from onnxcomp.repair import describe_nonfinite, nonfinite_initializers

    warnings = list(source.load_notes) + [w for w in [describe_nonfinite(nonfinite_initializers(source))] if w]
    check_dims(source, dims or {})
    check_shapes(source, shapes or {})
    pipeline = as_pipeline(spec_or_pipeline)
    if verify_each:
        pipeline.verify_each = True
    pipeline.on_failure = on_failure

    def data(where):
        found = CalibrationData.from_source(where, preprocess, [s.name for s in specs], specs=specs)
        return found.carry_state(source.to_proto(), carry_state) if found is not None and carry_state else found

    ctx = PassContext(
        calibration=data(calibration),
        evaluation=data(evaluation),
        providers=list(providers) if isinstance(providers, (list, tuple)) else
        ([p for p in providers.split(",")] if providers else ["cpu"]),
        tolerance=tolerance or Tolerance(),
        seed=seed,
        dims=dict(dims or {}),
        shapes=dict(shapes or {}),
        progress=progress,
    )
    held_to = checking.gate_for(pipeline, gate)
    if held_to is not None and tolerance is None:
        # --verify-each holds each lossy pass to the gate's agreement with the model before it,
        # not to float rounding (which every lossy pass breaks by design)
        ctx.tolerance = Tolerance(atol=float("inf"), rtol=0.0, min_cosine=held_to.min_cosine or DEFAULT_MIN_COSINE)
    # the model as given, for the verdict (a lossless run with check=False has none to make)
    original = source.copy() if (held_to is not None or not pipeline.lossless or check) else None
    if held_to is not None:
        checking.hold_out(pipeline, ctx)
        result = checking.run_with_gate(pipeline, source, ctx, held_to)
    else:
        result = pipeline.run(source, ctx)
    result.report.notes[:0] = warnings  # what loading repaired or found, first
    checking.say_when_nothing_lossy_changed(result.report)
    if held_to is not None:
        checking.report_gated(result, held_to, original, ctx)
    elif not pipeline.lossless:
        checking.report_unchecked(result, original, ctx, tolerance, check)
    elif check:
        checking.report_lossless(result, original, ctx, tolerance)
    return OptimizeResult(result.model, result.report)


def optimize_file(model: str | Path, output: str | Path, spec_or_pipeline: str | Pipeline | Sequence[Pass], *,
                  force: bool = False, progress=None, keep_failed: str | Path | None = None,
                  **options: Any) -> OptimizeResult:
    """The per-model job of `onnxcomp optimize`, shared by the one-model command and batch mode
    (local processes or Ray tasks): optimize `model`, refuse a result outside tolerance (nothing is
    written, the GateFailed carries the report; only with `keep_failed` is the attempt nearest the
    gate written there), then save atomically to `output` (.onnxc packs). `options` are those of
    `optimize`."""
    from onnxcomp.errors import GateFailed
    from onnxcomp.model import save

    try:
        result = optimize(model, spec_or_pipeline, progress=progress, **options)
    except GateFailed as exc:
        best = getattr(exc, "best_model", None)
        if keep_failed is None or best is None:
            raise
        best.metadata["onnxcomp.validation"] = "FAILED the accuracy gate: " + str(exc)
        save(best, keep_failed, force=force, source=model)
        kept = GateFailed(f"{exc} (the attempt nearest the gate was written to {keep_failed}, as asked)")
        kept.__dict__.update(exc.__dict__)
        raise kept from exc
    validation = result.report.validation
    if validation and validation["passed"] is False:
        failed = GateFailed("the result is outside tolerance, nothing was written: " + validation["summary"])
        failed.report = result.report
        raise failed
    if progress:
        progress("saving…", 1.0)
    output = Path(output)
    if getattr(result.model, "packing", None) and output.suffix != ".onnxc":
        result.report.notes.append(f"the pipeline ends with entropy coding but {output.name} is not .onnxc: "
                                   "the weights were saved unpacked")
    save(result.model, output, force=force, source=model)
    return result


def inspect(model_or_path) -> dict[str, Any]:
    """Facts about a model: opsets, inputs/outputs, op histogram, parameter bytes by dtype, sparsity."""
    model = load(model_or_path)
    graph = model.graph
    ops = Counter((f"{n.domain}::" if n.domain else "") + n.op for n in graph.nodes)
    by_dtype: Counter = Counter()
    zeros = total = 0
    for const in model.initializers().values():
        values = np.asarray(peek_values(const))  # (read once, not kept; a short one is one error line)
        by_dtype[str(np.dtype(values.dtype)) if values.dtype is not None else "other"] += constant_nbytes(const)
        if values.size and np.issubdtype(values.dtype, np.number):
            zeros += int(np.count_nonzero(values == 0))
            total += int(values.size)

    def describe(tensors):
        return [{"name": t.name, "dtype": str(np.dtype(t.dtype)) if t.dtype is not None else None,
                 "shape": list(t.shape) if t.shape is not None else None} for t in tensors]

    info = {
        "ir_version": model.ir_version,
        "opsets": dict(model.opset_imports),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "inputs": describe(graph.inputs),
        "outputs": describe(graph.outputs),
        **model.summary(),
        "parameters": total,
        "param_bytes_by_dtype": dict(by_dtype),
        "sparsity": zeros / total if total else 0.0,
        "ops": dict(ops.most_common()),
    }
    if model.source_path is not None and Path(model.source_path).exists():
        info["file_bytes"] = Path(model.source_path).stat().st_size
    return info


def check_model(model: Model, graph_only: onnx.ModelProto | None = None) -> None:
    """onnx.checker on the model as onnxcomp exports it (sorted, so an unsorted input is fine);
    a failure is one InputError line. Skipped past 2 GB of weights: the checker needs the whole
    model in one protobuf message, and ORT's validation of the result still runs."""
    from onnxcomp.errors import InputError
    from onnxcomp.model import PROTOBUF_LIMIT

    if model.summary()["param_bytes"] > PROTOBUF_LIMIT:
        return
    proto = _one_element_weights(graph_only if graph_only is not None else model.to_proto(weights=False))
    for info in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
        if info.type.HasField("tensor_type") and not info.type.tensor_type.HasField("shape"):
            # a tensor typed without any shape (older exporters write these; ORT runs them): the
            # checker wants the field, so this checked copy gets an empty one
            info.type.tensor_type.shape.SetInParent()
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        if graph_only is not None and graph_only.graph.name == OUTLINE:
            # the input as given may fail only for what the export repairs (node order, names)
            return check_model(model)
        lines = [line for line in str(exc).splitlines() if line.strip()]
        first = lines[0] if lines else type(exc).__name__
        undefined = re.search(r"must be topologically sorted, however input '([^']*)'", first)
        if undefined:  # the export is sorted, so the checker's complaint means a tensor nothing defines
            first = f"tensor {undefined.group(1)!r} is read but never defined (no input, initializer or node makes it)"
        raise InputError(f"the model fails onnx.checker: {first}") from exc


OUTLINE = "(outline of the input)"


def _outline(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model as given, in the form `Model.to_proto(weights=False)` has (initializers of 1 KiB or
    more, or external, become stubs that point nowhere; check_model's `_one_element_weights` does
    the rest), everything else copied by protobuf: input_specs and check_model need no export."""
    from onnxcomp.model import EXTERNAL_DATA_MIN_BYTES, NOT_LOADED, _declared_nbytes

    out = onnx.ModelProto(ir_version=proto.ir_version, producer_name=proto.producer_name)
    out.opset_import.extend(proto.opset_import)
    out.functions.extend(proto.functions)
    graph, given = out.graph, proto.graph
    graph.name = OUTLINE
    for field in ("node", "input", "output", "value_info", "sparse_initializer"):
        getattr(graph, field).extend(getattr(given, field))
    for tensor in given.initializer:
        # the size its dims declare, as the export's stubs are chosen by (ByteSize() serializes the
        # tensor to measure it: a sixth of MiniLM's `fold, cleanup, fuse` time)
        size = _declared_nbytes(tensor)
        if tensor.data_location != onnx.TensorProto.EXTERNAL and \
                (size if size is not None else tensor.ByteSize()) < EXTERNAL_DATA_MIN_BYTES:
            graph.initializer.append(tensor)
            continue
        stub = graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims,
                                     data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value=NOT_LOADED)
    return out


def _one_element_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The weights-left-out export made fit for onnx.checker (which reads no weight, but wants each
    initializer's data to match its dims): every left-out weight becomes one zero element of its
    rank. Serializing the real weights for the checker took longer than all lossless passes."""
    from onnxcomp.model import NOT_LOADED

    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and \
                any(e.key == "location" and e.value == NOT_LOADED for e in tensor.external_data):
            tensor.data_location = onnx.TensorProto.DEFAULT
            del tensor.external_data[:]
            tensor.dims[:] = [1] * len(tensor.dims)
            tensor.raw_data = b"\0" * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return proto


def check_shapes(model: Model, shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse a shape for an input the model does not have, or one that contradicts its rank or
    fixed sizes."""
    from onnxcomp.errors import InputError
    from onnxcomp.feeds import input_specs

    specs = {s.name: s for s in input_specs(model)} if shapes else {}
    for name, shape in shapes.items():
        spec = specs.get(name)
        if spec is None:
            raise InputError(f"--shape {name}: the model has no input {name!r} (its inputs: {', '.join(specs) or 'none'})")
        if spec.dims is not None and (len(shape) != len(spec.dims) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.dims, shape))):
            raise InputError(f"--shape {name}={'x'.join(map(str, shape)) or 'scalar'}: the input is {spec.describe()}")


def check_dims(model: Model, dims: dict[str, int]) -> None:
    """Refuse a size for a dimension no input has, or a size below 1: a typo would otherwise be
    ignored and the generated inputs keep their default sizes."""
    from onnxcomp.errors import InputError

    symbolic = {d for t in model.graph.inputs for d in (t.shape or ()) if isinstance(d, str)}
    for name, size in dims.items():
        if name not in symbolic:
            raise InputError(f"dimension {name!r}: no input of the model has it (its symbolic dimensions: "
                             f"{', '.join(sorted(symbolic)) or 'none'})")
        if not isinstance(size, (int, np.integer)) or size < 1:
            raise InputError(f"dimension {name!r}: the size must be a whole number >= 1, not {size!r}")


def feeds_from(data: Any) -> list[dict[str, np.ndarray]] | None:
    source = CalibrationData.from_source(data)
    return list(source) if source is not None else None


__all__ = ["OptimizeResult", "optimize", "optimize_file", "inspect", "check_model", "check_dims", "check_shapes", "feeds_from"]
