"""The bad-input matrix (issue 7): every hostile or odd input against every command.

Each row builds one input model (or packed file) in a folder of its own; each command runs on it
through the CLI's entry point. Whatever the row, a run must end either in one line on stderr
naming the problem with a non-zero exit, or in a correct result (checked on ORT) - never a
traceback, never a partial or temporary file left in the output folder, never a changed input.

Commands run in this process through `onnxcomp.cli.main` (the same code path as
`python -m onnxcomp`, ten times faster); one test repeats a few rows through a real subprocess,
and the path-traversal rows are also run under an audit hook that records every file opened.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp.io import container
from onnxcomp.pipeline import LOSSLESS_TOLERANCE
from onnxcomp.validate import generate_inputs

from .helpers import (
    REPO,
    assert_one_line_error,
    point_external_data,
    run_cli,
    run_cli_here,
    small_cnn,
    small_cnn_weights,
    with_initializers,
)

NEWEST_OPSET = onnx.defs.onnx_opset_version()
DIMS = {"C": 3, "H": 8, "W": 8}  # sizes for the dynamic-shapes row (its weights fix C at 3)


# ---- the rows: each writes its input into `folder` and returns the path --------------------------
def _write(folder: Path, content: bytes | onnx.ModelProto, name: str = "model.onnx") -> Path:
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.SerializeToString())
    return path


def _parse(text: str, arrays: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A model from ONNX text, not checked (several rows are invalid on purpose)."""
    return with_initializers(onnx.parser.parse_model(text), arrays or {})


def _valid(text: str, arrays: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    proto = _parse(text, arrays)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _weights(*shape: int, seed: int = 0, scale: float = 0.2) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def empty(folder):
    return _write(folder, b"")


def truncated(folder):
    data = small_cnn().SerializeToString()
    return _write(folder, data[: len(data) // 2])


def random_bytes(folder):
    return _write(folder, np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def text_file(folder):
    return _write(folder, b"name,value\nweights,1\nthis is a CSV file, not a model\n")


def tensor_protobuf(folder):
    """A valid protobuf message, but a TensorProto, not a ModelProto."""
    return _write(folder, onnx.numpy_helper.from_array(np.ones(100, np.float32), "t").SerializeToString())


def graph_protobuf(folder):
    """A GraphProto saved on its own (a common mistake): a protobuf, not a model."""
    return _write(folder, small_cnn().graph.SerializeToString())


def ir_too_new(folder):
    proto = small_cnn()
    proto.ir_version = onnx.IR_VERSION + 1
    return _write(folder, proto)


def opset_too_new(folder):
    proto = small_cnn()
    proto.opset_import[0].version = NEWEST_OPSET + 1
    return _write(folder, proto)


def checker_undefined_input(folder):
    """onnx.checker: 'ghost' is neither an input, an initializer nor a node output."""
    return _write(folder, _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { y = Add(x, ghost) }"""))


def checker_unknown_op(folder):
    """onnx.checker: no op 'Frobnicate' in the default domain."""
    return _write(folder, _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { a = Relu(x)  y = Frobnicate(a) }"""))


def checker_bad_attribute(folder):
    """onnx.checker: Transpose's perm is an int list, here a string."""
    return _write(folder, _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 4] x) => (float[4, 2] y) { y = Transpose <perm = "1,0"> (x) }"""))


def cycle(folder):
    return _write(folder, _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { a = Add(x, b)  b = Relu(a)  y = Identity(b) }"""))


def duplicate_outputs(folder):
    return _write(folder, _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x) => (float[1, 4] y) { a = Relu(x)  a = Sigmoid(x)  y = Add(a, a) }"""))


def _external(folder: Path, location: str) -> Path:
    return _write(folder, point_external_data(small_cnn(), "w2", location))


def external_missing(folder):
    return _external(folder, "weights.bin")


def external_short(folder):
    (folder / "weights.bin").write_bytes(b"\0" * 1000)  # w2 needs 32,768 bytes
    return _external(folder, "weights.bin")


def _secret(folder: Path) -> Path:
    """A file outside the model's folder that a traversal would read (full size, so only the
    location check can stop it)."""
    secret = folder.parent / "secret.bin"
    secret.write_bytes(b"\1" * 512 * 16 * 4)
    return secret


def external_absolute(folder):
    return _external(folder, str(_secret(folder)))


def external_dotdot(folder):
    _secret(folder)
    return _external(folder, "../secret.bin")


def external_symlink(folder):
    (folder / "weights.bin").symlink_to(_secret(folder))
    return _external(folder, "weights.bin")


def _external_field(folder: Path, key: str, value: str) -> Path:
    """w2's data in weights.bin (in full), its `key` entry rewritten to `value`."""
    proto = small_cnn()
    w2 = next(t for t in proto.graph.initializer if t.name == "w2")
    (folder / "weights.bin").write_bytes(onnx.numpy_helper.to_array(w2).tobytes())
    proto = point_external_data(proto, "w2", "weights.bin")
    w2 = next(t for t in proto.graph.initializer if t.name == "w2")
    next(e for e in w2.external_data if e.key == key).value = value
    return _write(folder, proto)


def external_negative_offset(folder):
    return _external_field(folder, "offset", "-4096")


def external_text_length(folder):
    return _external_field(folder, "length", "32k")


def huge_input_dim(folder):
    """The batch dimension declared as 2^63-1: describable and packable, but no input of that
    size can be generated for validation."""
    proto = small_cnn()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**63 - 1
    return _write(folder, proto)


def short_weight(folder):
    """A weight whose raw data holds 10 of the 1,000 floats its shape declares."""
    proto = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1000] x) => (float[1000] y) { y = Add(x, w) }""")
    weight = onnx.numpy_helper.from_array(np.ones(10, np.float32), "w")
    weight.dims[:] = [1000]
    proto.graph.initializer.append(weight)
    return _write(folder, proto)


def nan_inf(folder):
    """NaN and +-Inf in a weight and in a bias: the affected output columns are NaN/Inf, the others finite."""
    weights = small_cnn_weights()
    weights["w2"][0, 3] = np.nan
    weights["w2"][5, 4] = np.inf
    weights["b2"][[0, 1, 2]] = [np.nan, np.inf, -np.inf]
    return _write(folder, small_cnn(**weights))


def zero_weights(folder):
    """Every weight zero: quantization scales come out 0 and must not divide by zero."""
    zeros = {k: np.zeros_like(v) for k, v in small_cnn_weights().items() if k in ("w", "b", "w2", "b2")}
    return _write(folder, small_cnn(**zeros))


def empty_tensors(folder):
    """An empty initializer concatenated (a no-op), and an empty tensor as an output."""
    return _write(folder, _valid("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 32] x) => (float[1, 32] y, float[0] z) {
            c = Concat <axis = 1> (x, e)
            m = MatMul(c, w)
            y = Relu(m)
            z = Identity(e0)
        }""", {"e": np.zeros((1, 0), np.float32), "e0": np.zeros((0,), np.float32), "w": _weights(32, 32)}))


def zero_size_dims(folder):
    """A batch of zero rows through MatMul, Add and Relu."""
    return _write(folder, _valid("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[0, 32] x) => (float[0, 32] y) { m = MatMul(x, w)  a = Add(m, b)  y = Relu(a) }""",
                                 {"w": _weights(32, 32), "b": _weights(32, seed=1)}))


def dynamic_shapes(folder):
    """Every input and output dimension symbolic, a Reshape fed by Shape (nothing static to fold)."""
    return _write(folder, _valid("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, C, H, W] x) => (float[N, K] y) {
            c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
            n = BatchNormalization (c, scale, bias, mean, var)
            r = Relu (n)
            p = GlobalAveragePool (r)
            s = Shape (p)
            two = Constant <value = int64[1] {2}> ()
            keep = Slice (s, zero, two)
            f = Reshape (p, keep)
            m = MatMul (f, w2)
            y = Add (m, b2)
        }""", {"w": _weights(8, 3, 3, 3), "b": _weights(8, seed=1), "scale": np.ones(8, np.float32),
               "bias": _weights(8, seed=2), "mean": _weights(8, seed=3), "var": np.ones(8, np.float32),
               "zero": np.array([0], np.int64), "w2": _weights(8, 16, seed=4), "b2": _weights(16, seed=5)}))


def custom_op(folder):
    """An op of a custom domain ORT has no kernel for, between standard ops."""
    return _write(folder, _valid("""
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[1, 32] x) => (float[1, 32] y) {
            one = Constant <value = float {1.0}> ()
            s = Mul(one, one)
            a = MatMul(x, w)
            b = com.example.Mystery(a)
            t = Add(b, s)
            y = Relu(t)
        }""", {"w": _weights(32, 32)}))


def subgraph_if(folder):
    """Both If branches read an outer weight; one has constants to fold, the other an Identity."""
    return _write(folder, _valid("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 32] x, bool[1] cond) => (float[1, 32] y) {
            y = If (cond) <
                then_branch = then_g () => (float[1, 32] t) {
                    two = Constant <value = float {2.0}> ()
                    four = Mul(two, two)
                    m = MatMul(x, w)
                    t = Add(m, four)
                },
                else_branch = else_g () => (float[1, 32] e) {
                    i = Identity(x)
                    m2 = MatMul(i, w)
                    e = Relu(m2)
                }
            >
        }""", {"w": _weights(32, 32)}))


def subgraph_loop(folder):
    """A Loop body with a MatMul by an outer weight, a foldable constant and an Identity."""
    return _write(folder, _valid("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 32] x) => (float[1, 32] y) {
            n = Constant <value = int64 {3}> ()
            go = Constant <value = bool {1}> ()
            y = Loop (n, go, x) <body = body (int64 i, bool cond_in, float[1, 32] acc) => (bool cond_out, float[1, 32] acc_out) {
                cond_out = Identity(cond_in)
                half = Constant <value = float {0.5}> ()
                h = Add(half, half)
                m = MatMul(acc, w)
                s = Mul(m, h)
                acc_out = Tanh(s)
            }>
        }""", {"w": _weights(32, 32)}))


def subgraph_scan(folder):
    """A Scan over 5 steps (axis 1: axis 0 is the batch) whose body multiplies by an outer weight."""
    return _write(folder, _valid("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 32] init, float[1, 5, 32] xs) => (float[1, 32] final, float[1, 5, 32] ys) {
            final, ys = Scan (init, xs) <num_scan_inputs = 1, scan_input_axes = [1], scan_output_axes = [1],
                body = body (float[1, 32] s, float[1, 32] xt) => (float[1, 32] s_out, float[1, 32] yt) {
                    a = Add(s, xt)
                    m = MatMul(a, w)
                    s_out = Tanh(m)
                    yt = Identity(s_out)
                }>
        }""", {"w": _weights(32, 32)}))


# packed (.onnxc) inputs, for `unpack` (and every other command: they all read .onnxc too)
def _packed(proto: onnx.ModelProto) -> bytes:
    return container.pack_proto(proto)[0]


def packed_empty(folder):
    return _write(folder, b"", "model.onnxc")


def packed_truncated(folder):
    data = _packed(small_cnn())
    return _write(folder, data[: len(data) // 2], "model.onnxc")


def packed_random_bytes(folder):
    return _write(folder, np.random.default_rng(8).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "model.onnxc")


def packed_text(folder):
    return _write(folder, b"ONNXC is a packed format; this is only text about it\n", "model.onnxc")


def packed_plain_onnx(folder):
    """A plain .onnx model under the packed name."""
    return _write(folder, small_cnn(), "model.onnxc")


def packed_newer_version(folder):
    """A packed file from a future onnxcomp: the version field after the magic is raised."""
    data = bytearray(_packed(small_cnn()))
    data[len(container.MAGIC):len(container.MAGIC) + 2] = (container.VERSION + 1).to_bytes(2, "little")
    return _write(folder, bytes(data), "model.onnxc")


def packed_external_reference(folder):
    """A well-formed packed file whose skeleton still points a weight at a file outside its folder:
    reading it must not follow the reference (nor unpacking write it out)."""
    return _write(folder, _packed(point_external_data(small_cnn(), "w2", str(_secret(folder)))), "model.onnxc")


def _packed_row(build: Callable[[Path], Path]) -> Callable[[Path], Path]:
    """The packed form of another row's (parseable) model."""
    def packed(folder):
        plain = build(folder)
        data = _packed(onnx.load(plain))
        plain.unlink()
        return _write(folder, data, "model.onnxc")
    return packed


# ---- what each row must give ----------------------------------------------------------------------
COMMANDS = ("optimize", "validate", "inspect", "pack")


@dataclass
class Row:
    build: Callable[[Path], Path]
    error: str | None = None  # the one-line error every command must give (None: every command succeeds)
    errors: dict[str, str | None] = field(default_factory=dict)  # per-command overrides (None: succeeds)
    lossy: tuple[str, ...] = ()  # extra `optimize` pipelines whose result must run on ORT
    lossy_errors: dict[str, str] = field(default_factory=dict)  # ... or end in this one-line error
    comparable: bool = True  # False: no input can be made for the model, so results are not compared on ORT

    def expected(self, command: str) -> str | None:
        return self.errors.get(command, self.error)


UNREADABLE = "not an ONNX model"
ESCAPES = "escapes the model's folder"
DESCRIBED = {"inspect": None, "pack": None}
LOSSY = ("fold, cleanup, fuse, quantize_dynamic", "fold, cleanup, fuse, quantize", "prune(sparsity=0.5)")

ROWS: dict[str, Row] = {
    "empty": Row(empty, "the file is empty"),
    "truncated": Row(truncated, UNREADABLE),
    "random-bytes": Row(random_bytes, UNREADABLE),
    "text-file": Row(text_file, UNREADABLE),
    "tensor-protobuf": Row(tensor_protobuf, UNREADABLE),
    "graph-protobuf": Row(graph_protobuf, UNREADABLE),
    "ir-too-new": Row(ir_too_new, f"IR version {onnx.IR_VERSION + 1} is newer"),
    "opset-too-new": Row(opset_too_new, f"opset {NEWEST_OPSET + 1} is newer", errors={"pack": None}),
    # inspect describes a model as it is and pack stores it byte for byte (checked by unpacking):
    # both are correct results for models that parse but that no pass should touch
    "checker-undefined-input": Row(checker_undefined_input, "tensor 'ghost' is read but never defined",
                                   errors={**DESCRIBED, "validate": "'ghost' is not a graph input"}),
    "checker-unknown-op": Row(checker_unknown_op, "No Op registered for Frobnicate", errors=DESCRIBED),
    "checker-bad-attribute": Row(checker_bad_attribute, "Mismatched attribute type in ' : perm'", errors={
        **DESCRIBED, "validate": "perm"}),
    "cycle": Row(cycle, "the graph has a cycle", errors={"pack": None}),
    "duplicate-outputs": Row(duplicate_outputs, "tensor 'a' is written by more than one node", errors={"pack": None}),
    "external-missing": Row(external_missing, "external data file 'weights.bin' is missing"),
    "external-short": Row(external_short, "shorter than declared"),
    "external-absolute": Row(external_absolute, ESCAPES),
    "external-dotdot": Row(external_dotdot, ESCAPES),
    "external-symlink": Row(external_symlink, ESCAPES),
    "external-negative-offset": Row(external_negative_offset,
                                    "tensor 'w2': external data offset '-4096' is not a whole number >= 0"),
    "external-text-length": Row(external_text_length, "tensor 'w2': external data length '32k' is not a whole number >= 0"),
    # a lossless run writes its result "not validated", naming the input it could not generate
    "huge-input-dim": Row(huge_input_dim, "input 'x': a generated input of shape 9223372036854775807x3x8x8 (float32) "
                          "is too large", errors={**DESCRIBED, "optimize": None}, comparable=False),
    "short-weight": Row(short_weight, "tensor 'w': its data does not fill its shape [1000]", errors={
        "pack": None, "validate": "raw_data size (40 bytes) does not match expected size"}),
    "nan-inf": Row(nan_inf, lossy=LOSSY + ("quantize_dynamic(mode=weight_only, bits=4)", "codebook(bits=4)")),
    "zero-weights": Row(zero_weights, lossy=LOSSY + ("fold, cleanup, fuse, quantize(per_channel=true)",
                                                     "quantize_dynamic(mode=weight_only, bits=4, min_size=0)",
                                                     "codebook(bits=2, min_size=0)")),
    "empty-tensors": Row(empty_tensors, lossy=LOSSY),
    "zero-size-dims": Row(zero_size_dims, lossy=("fold, cleanup, fuse, quantize_dynamic", "prune(sparsity=0.5)")),
    "dynamic-shapes": Row(dynamic_shapes, lossy=LOSSY),
    "custom-op": Row(custom_op, lossy=LOSSY, lossy_errors={  # calibration has to run the model
        "fold, cleanup, fuse, quantize": "quantize: onnxruntime cannot load the model"}),
    "subgraph-if": Row(subgraph_if, lossy=LOSSY),
    "subgraph-loop": Row(subgraph_loop, lossy=LOSSY),
    "subgraph-scan": Row(subgraph_scan, lossy=LOSSY),
}

NOT_PACKED = "not a packed onnxcomp model"
PACKED_ROWS: dict[str, Row] = {  # `pack` reads .onnx: a packed file is not one (or, renamed, it is)
    "packed-empty": Row(packed_empty, NOT_PACKED, errors={"pack": "the file is empty"}),
    "packed-truncated": Row(packed_truncated, "truncated", errors={"pack": UNREADABLE}),
    "packed-random-bytes": Row(packed_random_bytes, NOT_PACKED, errors={"pack": UNREADABLE}),
    "packed-text": Row(packed_text, NOT_PACKED, errors={"pack": UNREADABLE}),
    "packed-plain-onnx": Row(packed_plain_onnx, NOT_PACKED, errors={"pack": None}),
    "packed-newer-version": Row(packed_newer_version, f"packed format version {container.VERSION + 1} is not supported",
                                errors={"pack": UNREADABLE}),
    "packed-external-reference": Row(packed_external_reference, "points at an external file",
                                     errors={"pack": UNREADABLE}),
    "packed-cycle": Row(_packed_row(cycle), "the graph has a cycle", errors={"pack": UNREADABLE, "unpack": None}),
    "packed-subgraphs": Row(_packed_row(subgraph_loop), errors={"pack": UNREADABLE}),
    "packed-nan-inf": Row(_packed_row(nan_inf), errors={"pack": UNREADABLE}),
}


# ---- running one cell and checking what must hold whatever the outcome ------------------------------
def _snapshot(folder: Path) -> dict[str, str]:
    """name -> sha256 of every file in the folder (links as their target path, not followed)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            found[key] = "link:" + os.readlink(path)
        elif path.is_file():
            found[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


@dataclass
class Cell:
    source: Path
    out_dir: Path
    done: subprocess.CompletedProcess


def _run(tmp_path: Path, row: Row, *args: str, out_name: str | None = None, runner=run_cli_here) -> Cell:
    model_dir, out_dir = tmp_path / "model", tmp_path / "out"
    model_dir.mkdir(exist_ok=True)
    out_dir.mkdir(exist_ok=True)
    source = next(model_dir.glob("model.*"), None) or row.build(model_dir)
    before_in, before_out = _snapshot(tmp_path / "model"), _snapshot(out_dir)
    before_around = _snapshot(tmp_path)
    argv = [a.replace("{in}", str(source)).replace("{out}", str(out_dir / (out_name or ""))) for a in args]
    done = runner(*argv)
    assert "Traceback" not in done.stderr and "Warning" not in done.stderr, done.stderr
    assert _snapshot(model_dir) == before_in, "the input folder changed"
    # nothing new anywhere else either (no stray temporary file beside the secret, no copy of it)
    after_around = {k: v for k, v in _snapshot(tmp_path).items() if not k.startswith("out")}
    assert after_around == {k: v for k, v in before_around.items() if not k.startswith("out")}
    if done.returncode != 0:
        assert _snapshot(out_dir) == before_out, f"a failed run left files: {_snapshot(out_dir)}"
    return Cell(source, out_dir, done)


def _assert_outcome(cell: Cell, expected_error: str | None) -> None:
    if expected_error is not None:
        assert_one_line_error(cell.done, expected_error)
    else:
        assert cell.done.returncode == 0, cell.done.stderr + cell.done.stdout
        assert cell.done.stderr == "", cell.done.stderr  # not even ONNX Runtime's own log lines


def _proto(source: Path) -> onnx.ModelProto:
    """The model a row's file holds (a packed one decoded), without following external data."""
    if source.suffix == ".onnxc":
        return container.read_packed_proto(source)
    return onnx.load(source, load_external_data=False)


def _feeds(source: Path, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Two generated inputs; the symbolic channel count gets the value the weights need."""
    return generate_inputs(_proto(source), 2, seed=seed, dims=DIMS)


def _ort_runs(source: Path) -> bool:
    from onnxcomp.runtime import CannotRun, make_session

    try:
        make_session(_proto(source))
        return True
    except CannotRun:
        return False


def _check_same_outputs(source: Path, result: Path, tolerance) -> None:
    """The result computes what the source does on ORT (or, where ORT cannot run the source,
    still holds every node ORT cannot run)."""
    if not _ort_runs(source):
        def custom(proto):
            return {(n.domain, n.op_type) for n in proto.graph.node if n.domain not in ("", "ai.onnx")}
        assert custom(_proto(source)) <= custom(onnx.load(result))
        return
    check = onnxcomp.validate(_proto(source), result, _feeds(source), tolerance=tolerance)
    assert check.passed, check.worst()


# ---- the matrix: every row x every command ----------------------------------------------------------------
EVERY_ROW = {**ROWS, **PACKED_ROWS}


@pytest.mark.parametrize("row_name", EVERY_ROW)
def test_optimize_lossless(row_name, tmp_path):
    row = EVERY_ROW[row_name]
    cell = _run(tmp_path, row, "optimize", "{in}", "-o", "{out}", "--preset", "lossless", out_name="out.onnx")
    _assert_outcome(cell, row.expected("optimize"))
    if cell.done.returncode == 0:
        assert sorted(p.name for p in cell.out_dir.iterdir()) == ["out.onnx"]
        onnx.checker.check_model(onnx.load(cell.out_dir / "out.onnx"), full_check=False)
        if row.comparable:
            _check_same_outputs(cell.source, cell.out_dir / "out.onnx", LOSSLESS_TOLERANCE)
        else:  # written, and the line says why it is not validated
            assert "not validated" in cell.done.stdout and "is too large" in cell.done.stdout, cell.done.stdout


@pytest.mark.parametrize("row_name", EVERY_ROW)
def test_validate(row_name, tmp_path):
    row = EVERY_ROW[row_name]
    cell = _run(tmp_path, row, "validate", "{in}", "{in}", "--dim", "C=3", "--dim", "H=8", "--dim", "W=8")
    expected = row.expected("validate")
    if expected is None and not _ort_runs(cell.source):
        expected = "no execution provider could run the models"
    _assert_outcome(cell, expected)


@pytest.mark.parametrize("row_name", EVERY_ROW)
def test_inspect(row_name, tmp_path):
    row = EVERY_ROW[row_name]
    cell = _run(tmp_path, row, "inspect", "{in}", "--json")
    _assert_outcome(cell, row.expected("inspect"))
    if cell.done.returncode == 0:
        info = json.loads(cell.done.stdout)
        proto = _proto(cell.source)
        assert info["nodes"] == len(proto.graph.node)
        assert [i["name"] for i in info["inputs"]] == [i.name for i in proto.graph.input]


@pytest.mark.parametrize("row_name", EVERY_ROW)
def test_pack(row_name, tmp_path):
    row = EVERY_ROW[row_name]
    cell = _run(tmp_path, row, "pack", "{in}", "-o", "{out}", out_name="out.onnxc")
    _assert_outcome(cell, row.expected("pack"))
    if cell.done.returncode == 0:  # stored byte for byte
        assert sorted(p.name for p in cell.out_dir.iterdir()) == ["out.onnxc"]
        unpacked = container.read_packed_proto(cell.out_dir / "out.onnxc")
        assert unpacked.SerializeToString(deterministic=True) == \
            onnx.load(cell.source).SerializeToString(deterministic=True)


@pytest.mark.parametrize("row_name", PACKED_ROWS)
def test_unpack(row_name, tmp_path):
    row = PACKED_ROWS[row_name]
    cell = _run(tmp_path, row, "unpack", "{in}", "-o", "{out}", out_name="out.onnx")
    _assert_outcome(cell, row.expected("unpack"))
    if cell.done.returncode == 0:  # the model that was packed, byte for byte
        assert sorted(p.name for p in cell.out_dir.iterdir()) == ["out.onnx"]
        assert onnx.load(cell.out_dir / "out.onnx").SerializeToString(deterministic=True) == \
            _proto(cell.source).SerializeToString(deterministic=True)


LOSSY_CELLS = [(name, spec) for name, row in ROWS.items() for spec in row.lossy]


@pytest.mark.parametrize("row_name, spec", LOSSY_CELLS)
def test_optimize_lossy(row_name, spec, tmp_path):
    """Quantize / prune / codebook on odd but valid models: a model ORT runs, close to the source."""
    row = ROWS[row_name]
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    source = row.build(model_dir)
    extra = []
    if re.search(r"\bquantize\b(?!_)", spec):  # static quantization needs calibration data
        calibration = tmp_path / "calibration.npz"
        feeds = _feeds(source, seed=1)
        np.savez(calibration, **{k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]})
        extra = ["--calibration", str(calibration)]
    # --no-gate: this test compares the result with the source itself, with its own tolerances
    cell = _run(tmp_path, row, "optimize", "{in}", "-o", "{out}", "--pipeline", spec, "--no-gate", *extra,
                out_name="out.onnx")
    _assert_outcome(cell, row.lossy_errors.get(spec))
    if cell.done.returncode != 0:
        return
    result = cell.out_dir / "out.onnx"
    if _ort_runs(source):
        # NaN/Inf only where the source has them, and close in direction; a model of zeros stays exactly zero
        tolerance = onnxcomp.Tolerance.exact() if row_name == "zero-weights" else onnxcomp.Tolerance(
            atol=np.inf, rtol=0, min_cosine=0.9 if "prune" not in spec else 0.5)
        check = onnxcomp.validate(source, result, _feeds(source), tolerance=tolerance)
        assert check.passed, check.worst()


# ---- path traversal: refused before any file outside the model's folder is opened -----------------------
AUDITED_RUN = r'''
import json, os, sys
from pathlib import Path

watched = {Path(p).resolve() for p in json.loads(sys.argv[1])}  # files outside the models' folders
events = []

def _watched(path):
    try:
        return isinstance(path, (str, os.PathLike)) and Path(path).resolve() in watched
    except OSError:
        return False

def hook(event, args):  # every open() in Python, numpy and onnx's Python side raises "open"
    if event == "open" and args and _watched(args[0]):
        mode, flags = args[1], args[2] if len(args) > 2 else 0
        writes = bool(mode and any(c in mode for c in "wax+")) or bool(flags & (os.O_WRONLY | os.O_RDWR))
        events.append({"open": str(args[0]), "writes": writes})
    elif event == "os.rename" and _watched(args[1]):  # os.replace raises it too
        events.append({"renamed_onto": str(args[1])})

sys.addaudithook(hook)
from onnxcomp.cli import main

results = []
for argv in json.loads(sys.argv[2]):
    before = len(events)
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    results.append({"argv": argv, "code": code, "events": events[before:]})
print(json.dumps(results))
'''


def _audited(watched: list[Path], commands: list[list[str]]) -> tuple[list[dict], str]:
    """Run CLI commands in one fresh process under an audit hook; per command: exit code and
    what it did to the watched files (opened, for writing or not; renamed onto). Returns
    (results, stderr)."""
    done = subprocess.run([sys.executable, "-c", AUDITED_RUN, json.dumps([str(p) for p in watched]),
                           json.dumps(commands)], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


TRAVERSALS = {"external-absolute": external_absolute, "external-dotdot": external_dotdot,
              "external-symlink": external_symlink, "packed-external-reference": packed_external_reference}


def test_traversal_is_refused_before_the_outside_file_is_opened(tmp_path):
    """Every traversal row x every command, in a real process under an audit hook: each ends in
    one error line, and the file outside the model's folder is never opened."""
    commands, secrets, outs = [], [], []
    for name, build in TRAVERSALS.items():
        folder = tmp_path / name / "model"
        folder.mkdir(parents=True)
        source = build(folder)
        secrets.append(folder.parent / "secret.bin")
        out = folder.parent / "out"
        out.mkdir()
        outs.append(out)
        commands += [["optimize", str(source), "-o", str(out / "o.onnx"), "--preset", "lossless"],
                     ["validate", str(source), str(source)], ["inspect", str(source)],
                     ["pack", str(source), "-o", str(out / "o.onnxc")], ["unpack", str(source), "-o", str(out / "u.onnx")]]
    results, stderr = _audited(secrets, commands)
    for result in results:
        assert result["code"] == 2 and result["events"] == [], result
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == len(commands) and all(line.startswith("error: ") for line in errors), stderr
    assert sum(ESCAPES in line or "points at an external file" in line for line in errors) == 3 * 4 + 4
    assert all(list(out.iterdir()) == [] for out in outs)


def test_the_audit_hook_does_see_the_outside_file_when_it_is_read(tmp_path):
    """The hook above is not blind: reading a model whose external data is the watched file
    shows that file opened."""
    folder = tmp_path / "model"
    folder.mkdir()
    onnxcomp.save(onnxcomp.load(small_cnn()), folder / "model.onnx", external_data=True)
    results, stderr = _audited([folder / "model.onnx.data"], [["inspect", str(folder / "model.onnx")]])
    assert results[0]["code"] == 0 and results[0]["events"], stderr
    assert not any(e.get("writes") for e in results[0]["events"])


# ---- writing over the input: only with --force, and only once the new file is complete ------------------
@pytest.mark.parametrize("command, source_name, extra", [
    ("optimize", "model.onnx", ["--preset", "lossless"]),
    ("pack", "model.onnxc", []),
    ("unpack", "model.onnxc", []),
])
def test_writing_over_the_input_is_refused_without_force(command, source_name, extra, tmp_path):
    source = tmp_path / source_name
    source.write_bytes(_packed(small_cnn()) if source_name.endswith(".onnxc") else small_cnn().SerializeToString())
    before = _snapshot(tmp_path)
    assert_one_line_error(run_cli_here(command, source, "-o", source, *extra), "refusing to overwrite the input")
    assert _snapshot(tmp_path) == before


def test_force_replaces_the_input_only_by_renaming_the_finished_file_over_it(tmp_path):
    """In a real process under an audit hook: with --force the input is never opened for writing
    (so never truncated or half-written); the finished file is renamed onto it. A run that fails
    with --force leaves the input as it was."""
    source = tmp_path / "model.onnx"
    source.write_bytes(small_cnn().SerializeToString())
    original = source.read_bytes()
    failing = ["optimize", str(source), "-o", str(source), "--force", "--pipeline", "fold, quantize"]  # no data
    working = ["optimize", str(source), "-o", str(source), "--force", "--preset", "lossless"]
    results, stderr = _audited([source], [failing, working])
    assert results[0]["code"] == 2 and "there is no data to check it on" in stderr
    assert not any(e.get("writes") or "renamed_onto" in e for e in results[0]["events"])
    assert results[1]["code"] == 0, stderr
    assert not any(e.get("writes") for e in results[1]["events"]), results[1]["events"]
    assert any("renamed_onto" in e for e in results[1]["events"]), results[1]["events"]
    assert source.read_bytes() != original and len(onnx.load(source).graph.node) < len(small_cnn().graph.node)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_pack_and_unpack_with_force_rename_the_finished_file_onto_the_input(tmp_path):
    packed = tmp_path / "model.onnxc"
    packed.write_bytes(_packed(small_cnn()))
    plain = tmp_path / "model.onnx"
    plain.write_bytes(small_cnn().SerializeToString())
    results, stderr = _audited([packed, plain], [["unpack", str(packed), "-o", str(packed), "--force"],
                                                 ["pack", str(plain), "-o", str(plain), "--force"]])
    for result in results:
        assert result["code"] == 0, stderr
        assert not any(e.get("writes") for e in result["events"]), result
        assert any("renamed_onto" in e for e in result["events"]), result
    # (unpack's output format follows the output's name, so .onnxc comes out packed again)
    assert container.read_packed_proto(packed).graph == small_cnn().graph
    assert container.read_packed_proto(plain).graph == small_cnn().graph  # packed in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnxc"]


# ---- the same entry point as a user's shell: a few rows through `python -m onnxcomp` --------------------
@pytest.mark.parametrize("row_name, command", [("truncated", "optimize"), ("cycle", "inspect"),
                                               ("external-symlink", "pack"), ("packed-text", "unpack"),
                                               ("subgraph-if", "optimize")])
def test_rows_through_a_real_process(row_name, command, tmp_path):
    row = EVERY_ROW[row_name]
    args = {"optimize": ("optimize", "{in}", "-o", "{out}", "--preset", "lossless"), "inspect": ("inspect", "{in}"),
            "pack": ("pack", "{in}", "-o", "{out}"), "unpack": ("unpack", "{in}", "-o", "{out}")}[command]
    out_name = {"pack": "out.onnxc"}.get(command, "out.onnx")
    cell = _run(tmp_path, row, *args, out_name=out_name, runner=run_cli)
    _assert_outcome(cell, row.expected(command))
