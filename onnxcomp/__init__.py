"""onnxcomp: an ONNX graph-level optimizer and compressor, validated on ONNX Runtime.

    import onnxcomp
    result = onnxcomp.optimize("model.onnx", "fold, cleanup, fuse")
    onnxcomp.save(result.model, "out.onnx")
    print(result.report.to_json())
"""

from onnxcomp.api import OptimizeResult, inspect, optimize
from onnxcomp.base import Pass, PassResult, param
from onnxcomp.calibration import CalibrationData, ImagePreprocess
from onnxcomp.context import PassContext, Tolerance
from onnxcomp.errors import GateFailed, InputError, OnnxcompError, OutputError, PassError, SpecError
from onnxcomp.model import Model, load, save
from onnxcomp.pipeline import Pipeline, PipelineResult
from onnxcomp.registry import all_passes, register
from onnxcomp.report import Report
from onnxcomp.validate import ValidationReport, generate_inputs, validate


def session(packed, providers=("cpu",), sess_options=None, threads=None):
    """An ORT InferenceSession straight from a packed .onnxc file or its bytes (nothing unpacked to disk)."""
    from onnxcomp.container import session as packed_session

    return packed_session(packed, providers=providers, sess_options=sess_options, threads=threads)


def export(module, example_inputs, path=None, **options):
    """Export a torch module to ONNX, verified on ORT (see onnxcomp.torch_export.export)."""
    from onnxcomp.torch_export import export as torch_export

    return torch_export(module, example_inputs, path, **options)


__version__ = "0.1.0"

__all__ = [
    "CalibrationData", "GateFailed", "ImagePreprocess", "InputError", "Model", "OnnxcompError",
    "OptimizeResult", "OutputError", "Pass", "PassContext", "PassError", "PassResult", "Pipeline",
    "PipelineResult", "Report", "SpecError", "Tolerance", "ValidationReport", "all_passes", "export",
    "generate_inputs", "inspect", "load", "optimize", "param", "register", "save", "session", "validate",
]
