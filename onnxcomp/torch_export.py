"""PyTorch front-end: export a module to ONNX and prove the export on ONNX Runtime.

The torch.export-based exporter (`dynamo=True`) is tried first; when it fails, the TorchScript
exporter is used and the reason is kept in the result (and printed by the CLI). Either way the
exported model is run on ORT and compared with the module's own outputs before it is returned,
also at a second batch size when the batch axis is dynamic.
"""

from __future__ import annotations

import importlib
import io
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from onnxcomp.errors import InputError, OnnxcompError
from onnxcomp.model import Model, load


class ExportError(OnnxcompError):
    """The module could not be exported, or its export disagrees with the module."""


@dataclass
class ExportResult:
    model: Model
    exporter: str  # "dynamo" or "torchscript"
    fallback_reason: str
    max_abs_error: float


def _as_tuple(example_inputs: Any) -> tuple:
    import torch

    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return tuple(torch.as_tensor(x) if isinstance(x, np.ndarray) else x for x in items)


def _flatten(outputs: Any) -> list[np.ndarray]:
    import torch

    if isinstance(outputs, torch.Tensor):
        return [outputs.detach().cpu().numpy()]
    if isinstance(outputs, dict):
        outputs = list(outputs.values())
    flat: list[np.ndarray] = []
    for item in outputs:
        flat.extend(_flatten(item))
    return flat


def _export_bytes(module, args: tuple, exporter: str, input_names, output_names, dynamic_axes, opset) -> bytes:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            program = torch.onnx.export(module, args, dynamo=True, input_names=input_names,
                                        output_names=output_names, dynamic_axes=dynamic_axes,
                                        opset_version=opset, verbose=False)
            return program.model_proto.SerializeToString()
        buffer = io.BytesIO()
        torch.onnx.export(module, args, buffer, dynamo=False, input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset or 17)
        return buffer.getvalue()


def check_export(module, model: Model, args: tuple, input_names: list[str], atol: float, rtol: float) -> float:
    """Max abs error between the module and ORT on `args`; raises ExportError beyond tolerance."""
    import torch

    from onnxcomp.runtime import make_session, run

    with torch.no_grad():
        expected = _flatten(module(*args))
    session = make_session(model, "cpu", threads=None)
    names = [i.name for i in session.get_inputs()]
    feeds = {name: a.detach().cpu().numpy() for name, a in zip(names, args)}
    got = list(run(session, feeds).values())
    if len(got) != len(expected):
        raise ExportError(f"the export has {len(got)} outputs, the module {len(expected)}")
    worst = 0.0
    for i, (e, g) in enumerate(zip(expected, got)):
        if e.shape != g.shape:
            raise ExportError(f"output {i}: shape {g.shape} on ORT, {e.shape} in torch")
        diff = float(np.max(np.abs(e.astype(np.float64) - g))) if e.size else 0.0
        worst = max(worst, diff)
        if not np.allclose(g, e, atol=atol, rtol=rtol):
            raise ExportError(f"output {i}: ORT differs from torch by up to {diff:.3g} (atol {atol}, rtol {rtol})")
    return worst


def export(module, example_inputs: Any, path: str | Path | None = None, *,
           dynamic_axes: dict[str, dict[int, str]] | None = None, input_names: Sequence[str] | None = None,
           output_names: Sequence[str] | None = None, opset: int | None = None, exporter: str = "auto",
           atol: float = 1e-4, rtol: float = 1e-3) -> ExportResult:
    """Export `module` called on `example_inputs`; verify on ORT; optionally save to `path`.

    `dynamic_axes` uses torch.onnx's form: {"input": {0: "batch"}}. `exporter`: auto|dynamo|torchscript.
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise InputError("export needs a torch.nn.Module")
    module = module.eval()
    args = _as_tuple(example_inputs)
    input_names = list(input_names) if input_names else [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    output_names = list(output_names) if output_names else None
    order = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    if any(e not in ("dynamo", "torchscript") for e in order):
        raise InputError(f"exporter must be auto, dynamo or torchscript, not {exporter!r}")
    fallback_reason = ""
    for choice in order:
        try:
            data = _export_bytes(module, args, choice, input_names, output_names, dynamic_axes, opset)
            model = load(data)
            error = check_export(module, model, args, input_names, atol, rtol)
            if dynamic_axes and any(0 in axes for axes in dynamic_axes.values()):
                doubled = tuple(torch.cat([a, a]) if isinstance(a, torch.Tensor) and a.dim() else a for a in args)
                error = max(error, check_export(module, model, doubled, input_names, atol, rtol))
            break
        except Exception as exc:  # each exporter fails in its own way; keep the reason, try the next
            reason = f"{choice} exporter failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
            if choice == order[-1]:
                raise ExportError(reason if not fallback_reason else f"{fallback_reason}; {reason}") from exc
            fallback_reason = reason
    model.producer_name = model.producer_name or "onnxcomp"
    if path is not None:
        from onnxcomp.model import save

        save(model, path)
    return ExportResult(model, choice, fallback_reason, error)


def load_factory(target: str):
    """'pkg.module:factory' -> the module the factory builds (the current folder is importable)."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise InputError(f"{target!r}: expected PKG.MODULE:FACTORY")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise InputError(f"{target!r}: cannot import ({exc})") from exc
    built = factory() if callable(factory) and not _is_module(factory) else factory
    if not _is_module(built):
        raise InputError(f"{target!r} did not give a torch.nn.Module")
    return built


def _is_module(obj: Any) -> bool:
    import torch

    return isinstance(obj, torch.nn.Module)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--input-shape {text!r}: expected e.g. 1x3x224x224") from None
