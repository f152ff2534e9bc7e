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
from onnxcomp.gate import Gate, GateChecker, check_disjoint, run_gated
from onnxcomp.model import Model, constant_nbytes, load
from onnxcomp.pipeline import LOSSLESS_TOLERANCE, Pipeline, as_pipeline
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
             gate: Gate | None = None, dims: dict[str, int] | None = None) -> OptimizeResult:
    """Run a pipeline over a model and return the new model and its report.

    `model_or_path` may also be a torch.nn.Module (with `example_inputs`): it is exported first.
    `calibration` / `evaluation`: an .npz path, an image folder (with `preprocess`) or an
    iterable of {input_name: array} dicts. With `check`, the result is compared with the input
    on ORT (on `evaluation` data, or generated inputs) and the figures go in the report.
    `dims` sizes the symbolic input dimensions of generated inputs ({"batch": 4}); the model
    itself keeps them symbolic.
    """
    if type(model_or_path).__module__.startswith("torch") or hasattr(model_or_path, "state_dict"):
        from onnxcomp.torch_export import export

        if example_inputs is None:
            from onnxcomp.errors import InputError

            raise InputError("optimizing a torch module needs example_inputs")
        model_or_path = export(model_or_path, example_inputs).model
    source = load(model_or_path)
    check_model(source)  # passes assume a well-formed graph; refuse one that is not, naming why
    check_dims(source, dims or {})
    original = source.copy() if check else None
    pipeline = as_pipeline(spec_or_pipeline)
    if verify_each:
        pipeline.verify_each = True
    pipeline.on_failure = on_failure
    input_names = [t.name for t in source.graph.inputs]
    ctx = PassContext(
        calibration=CalibrationData.from_source(calibration, preprocess, input_names),
        evaluation=CalibrationData.from_source(evaluation, preprocess, input_names),
        providers=list(providers) if isinstance(providers, (list, tuple)) else
        ([p for p in providers.split(",")] if providers else ["cpu"]),
        tolerance=tolerance or Tolerance(),
        seed=seed,
        dims=dict(dims or {}),
        progress=progress,
    )
    if gate is not None and gate.active:
        result = _run_with_gate(pipeline, source, ctx, gate)
    else:
        result = pipeline.run(source, ctx)
    if check and original is not None:
        from onnxcomp.validate import validate

        # Lossless pipelines are held to float rounding; lossy ones to the user's tolerance
        # when one is given, and otherwise only report what they changed.
        gate_on = gate is not None and gate.active
        gate = pipeline.lossless or (tolerance is not None and not gate_on)
        tol = tolerance or LOSSLESS_TOLERANCE
        report = validate(original, result.model, ctx.evaluation, ctx.providers, tol, dims=ctx.dims)
        result.report.validation = report.to_dict()
        result.report.validation["summary"] = report.worst()
        result.report.validation["gate"] = gate
        if not report.ran_any:
            # Custom ops ORT cannot run are not an error for the passes: say it plainly.
            result.report.validation["summary"] = "not validated: " + report.worst()
        if not gate or not report.ran_any:
            result.report.validation["passed"] = None
    return OptimizeResult(result.model, result.report)


def optimize_file(model: str | Path, output: str | Path, spec_or_pipeline: str | Pipeline | Sequence[Pass], *,
                  force: bool = False, progress=None, **options: Any) -> OptimizeResult:
    """The per-model job of `onnxcomp optimize`, shared by the one-model command and batch mode
    (local processes or Ray tasks): optimize `model`, refuse a result outside tolerance (nothing is
    written; the GateFailed carries the report), then save atomically to `output` (.onnxc packs).
    `options` are those of `optimize`."""
    from onnxcomp.errors import GateFailed
    from onnxcomp.model import save

    result = optimize(model, spec_or_pipeline, progress=progress, **options)
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


def _run_with_gate(pipeline: Pipeline, source: Model, ctx: PassContext, gate: Gate):
    """Hold the pipeline to the gate on held-out data, bisecting and backing off as needed."""
    from onnxcomp.errors import GateFailed
    from onnxcomp.validate import generate_inputs

    if ctx.evaluation is None and ctx.calibration is not None and len(ctx.calibration) >= 2:
        ctx.calibration, ctx.evaluation = ctx.calibration.split(0.5)
        ctx.note(f"held out {len(ctx.evaluation)} of the calibration samples for the gate")
    check_disjoint(ctx.calibration, ctx.evaluation)
    feeds = list(ctx.evaluation) if ctx.evaluation is not None else \
        generate_inputs(source, 8, seed=ctx.seed + 1, dims=ctx.dims)
    checker = GateChecker(gate, source, feeds)
    try:
        result, path = run_gated(pipeline, source, ctx, checker)
    except GateFailed as exc:
        exc.report = Report(pipeline=str(pipeline), gate={"gate": gate.describe(), "passed": False,
                                                           "path": getattr(exc, "path", [])})
        raise
    result.report.gate = {"gate": gate.describe(), "passed": True, "path": path, **{
        k: v for k, v in path[-1].items() if k not in ("attempt", "pipeline", "passed")}}
    if len(path) > 1:
        ctx.note(f"accuracy gate: {len(path) - 1} back-off(s); final pipeline: {path[-1]['pipeline']}")
        result.report.notes.append(ctx.notes[-1])
    return result


def inspect(model_or_path) -> dict[str, Any]:
    """Facts about a model: opsets, inputs/outputs, op histogram, parameter bytes by dtype, sparsity."""
    model = load(model_or_path)
    graph = model.graph
    ops = Counter((f"{n.domain}::" if n.domain else "") + n.op for n in graph.nodes)
    by_dtype: Counter = Counter()
    zeros = total = 0
    for const in model.initializers().values():
        values = const.values
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


def check_model(model: Model) -> None:
    """onnx.checker on the model as onnxcomp exports it (sorted, so an unsorted input is fine);
    a failure is one InputError line. Skipped past 2 GB of weights: the checker needs the whole
    model in one protobuf message, and ORT's validation of the result still runs."""
    from onnxcomp.errors import InputError
    from onnxcomp.model import PROTOBUF_LIMIT

    if model.summary()["param_bytes"] > PROTOBUF_LIMIT:
        return
    try:
        onnx.checker.check_model(model.to_proto())
    except onnx.checker.ValidationError as exc:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        first = lines[0] if lines else type(exc).__name__
        undefined = re.search(r"must be topologically sorted, however input '([^']*)'", first)
        if undefined:  # the export is sorted, so the checker's complaint means a tensor nothing defines
            first = f"tensor {undefined.group(1)!r} is read but never defined (no input, initializer or node makes it)"
        raise InputError(f"the model fails onnx.checker: {first}") from exc


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


__all__ = ["OptimizeResult", "optimize", "optimize_file", "inspect", "check_model", "check_dims", "feeds_from"]
