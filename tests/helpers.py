"""Small shared helpers for tests: run the CLI in a subprocess, build models from ONNX text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m onnxcomp ARGS` as a user runs it; returns the finished process (text output)."""
    return subprocess.run([sys.executable, "-m", "onnxcomp", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout)


def run_cli_here(*args: str) -> subprocess.CompletedProcess:
    """The same as run_cli, through onnxcomp.cli.main in this process (about 10x faster: no start-up).

    Warnings are printed to the captured stderr as a separate process would print them, and
    what native code (ONNX Runtime's logger) writes to file descriptor 2 is captured too, so a
    stray line fails the one-line checks here as it would in a shell.
    """
    import contextlib
    import io
    import os
    import signal
    import tempfile
    import warnings

    from onnxcomp.cli import main

    argv = [str(a) for a in args]
    stdout, stderr = io.StringIO(), io.StringIO()
    code, sigterm = 0, signal.getsignal(signal.SIGTERM)  # main() installs its own SIGTERM handler
    native, saved_fd = tempfile.TemporaryFile(), os.dup(2)
    os.dup2(native.fileno(), 2)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            try:
                main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
    with native:
        native.seek(0)
        native_lines = native.read().decode("utf-8", "replace")
    return subprocess.CompletedProcess(["onnxcomp", *argv], code, stdout.getvalue(), stderr.getvalue() + native_lines)


def model_from_text(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A user error: non-zero exit, one line on stderr starting with 'error:', no traceback."""
    assert proc.returncode != 0, proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---- small models built in code (no download), shared by the bad-input matrix and the fuzz tests --
SMALL_CNN = """
<ir_version: 8, opset_import: ["" : 17]>
small_cnn (float[1, 3, 8, 8] x) => (float[1, 16] y) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    n = BatchNormalization (c, scale, bias, mean, var)
    r = Relu (n)
    f = Flatten (r)
    m = MatMul (f, w2)
    y = Add (m, b2)
}
"""


def small_cnn_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Weights for SMALL_CNN; w2 has 8,192 elements, above quantize_dynamic's min_size."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return {"w": normal(8, 3, 3, 3, scale=0.3), "b": normal(8, scale=0.1),
            "scale": rng.uniform(0.5, 1.5, 8).astype(np.float32), "bias": normal(8, scale=0.1),
            "mean": normal(8, scale=0.1), "var": rng.uniform(0.5, 1.5, 8).astype(np.float32),
            "w2": normal(512, 16, scale=0.05), "b2": normal(16, scale=0.1)}


def with_initializers(proto: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`proto` with `arrays` added as main-graph initializers (in place; returned for chaining)."""
    for name, value in arrays.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    return proto


def small_cnn(seed: int = 0, **overrides: np.ndarray) -> onnx.ModelProto:
    """Conv + BatchNormalization + Relu + MatMul + Add: something every lossless pass has work on."""
    weights = {**small_cnn_weights(seed), **overrides}
    proto = with_initializers(onnx.parser.parse_model(SMALL_CNN), weights)
    onnx.checker.check_model(proto)
    return proto


def point_external_data(proto: onnx.ModelProto, name: str, location: str) -> onnx.ModelProto:
    """Make initializer `name` external at `location` (offset 0, its full length); nothing is written."""
    tensor = next(t for t in proto.graph.initializer if t.name == name)
    length = len(tensor.raw_data) or onnx.numpy_helper.to_array(tensor).nbytes
    onnx.external_data_helper.set_external_data(tensor, location=location, offset=0, length=length)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    return proto
