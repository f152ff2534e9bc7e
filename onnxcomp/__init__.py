"""onnxcomp: an ONNX graph-level optimizer and compressor, validated on ONNX Runtime.

    import onnxcomp
    result = onnxcomp.optimize("model.onnx", "fold, cleanup, fuse")
    onnxcomp.save(result.model, "out.onnx")
    print(result.report.to_json())

The public names are imported on first use (PEP 562), so `import onnxcomp` and the CLI's start
cost no onnx/numpy import until one is needed: a Ctrl-C in the CLI's first second is then caught
by its entry function (onnxcomp.entry) instead of ending in a traceback from this file.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: importing typing costs the CLI's first 20 ms

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "OptimizeResult": "api", "inspect": "api", "optimize": "api",
    "Pass": "base", "PassResult": "base", "param": "base",
    "CalibrationData": "calibration", "ImagePreprocess": "calibration",
    "PassContext": "context", "Tolerance": "context",
    "Gate": "gate",
    "GateFailed": "errors", "InputError": "errors", "OnnxcompError": "errors", "OutputError": "errors",
    "PassError": "errors", "SpecError": "errors",
    "Model": "model", "load": "model", "save": "model",
    "Pipeline": "pipeline", "PipelineResult": "pipeline",
    "all_passes": "registry", "register": "registry",
    "Report": "report",
    "ValidationReport": "validate", "generate_inputs": "validate", "validate": "validate",
}

__all__ = [
    "CalibrationData", "Gate", "GateFailed", "ImagePreprocess", "InputError", "Model", "OnnxcompError",
    "OptimizeResult", "OutputError", "Pass", "PassContext", "PassError", "PassResult", "Pipeline",
    "PipelineResult", "Report", "SpecError", "Tolerance", "ValidationReport", "all_passes", "export",
    "generate_inputs", "inspect", "load", "optimize", "param", "register", "save", "session", "validate",
]

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from onnxcomp.api import OptimizeResult, inspect, optimize
    from onnxcomp.base import Pass, PassResult, param
    from onnxcomp.calibration import CalibrationData, ImagePreprocess
    from onnxcomp.context import PassContext, Tolerance
    from onnxcomp.gate import Gate
    from onnxcomp.errors import GateFailed, InputError, OnnxcompError, OutputError, PassError, SpecError
    from onnxcomp.model import Model, load, save
    from onnxcomp.pipeline import Pipeline, PipelineResult
    from onnxcomp.registry import all_passes, register
    from onnxcomp.report import Report
    from onnxcomp.validate import ValidationReport, generate_inputs, validate


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxcomp' has no attribute {name!r}")
    __import__(f"onnxcomp.{module}")
    value = getattr(sys.modules[f"onnxcomp.{module}"], name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__():
    return sorted({*globals(), *__all__})


class _Package(type(sys)):
    """`onnxcomp.validate` is the function, as it was when this file imported it eagerly: the
    import system sets the package attribute to the submodule onnxcomp/validate.py when that is
    first imported, and this keeps the function in its place (the submodule stays importable)."""

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, type(sys)) and value.__name__ == f"onnxcomp.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
if "onnxcomp.validate" in sys.modules:  # (only when this file is re-run by importlib.reload)
    globals()["validate"] = sys.modules["onnxcomp.validate"].validate


def session(packed, providers=("cpu",), sess_options=None, threads=None):
    """An ORT InferenceSession straight from a packed .onnxc file or its bytes (nothing unpacked to disk)."""
    from onnxcomp.io.container import session as packed_session

    return packed_session(packed, providers=providers, sess_options=sess_options, threads=threads)


def export(module, example_inputs, path=None, **options):
    """Export a torch module to ONNX, verified on ORT (see onnxcomp.torch_export.export)."""
    from onnxcomp.torch_export import export as torch_export

    return torch_export(module, example_inputs, path, **options)
