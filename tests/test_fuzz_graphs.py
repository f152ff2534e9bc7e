"""Fuzzing (issue 7): random small graphs through the lossless passes, and corrupted model files
through the loader, with hypothesis.

Graphs: a random chain of steps (element-wise ops with constants or with other tensors,
MatMul + bias, Transpose and Reshape pairs, Concat, Conv + BatchNormalization + per-channel
Add/Mul, constant sub-expressions to fold, Shape-fed Reshapes, dead branches, duplicate
initializers, neutral constants, Identity/Flatten) over one input. Each graph is run on ORT with
its graph optimizations off (so ORT rewrites nothing behind our back), before and after:
  * `fold, cleanup` must give bit-identical outputs: folding evaluates each constant node with
    the very ORT kernel that would run it, and cleanup only removes no-ops and dead nodes;
  * `fuse` after them must also be bit-identical unless it made a rewrite that reassociates float
    arithmetic (BatchNormalization/Add/Mul into Conv weights, MatMul + Add into Gemm, constant
    chains merged); then outputs must agree within TOLERANCE (why that figure: see below).
Bounded: a fixed number of examples, no per-example deadline (ORT session start-up varies on a
loaded machine); the whole module runs in about 20 s on 2 cores.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import onnxcomp
from onnxcomp.errors import InputError
from onnxcomp.pipeline import Pipeline
from onnxcomp.runtime import make_session

from .conftest import REAL
from .helpers import assert_one_line_error, run_cli_here, small_cnn

OPSETS = {13: 7, 17: 8, 21: 10}  # default-domain opset -> the IR version it needs (every op used exists in all)
# Fusions compute e.g. x*(W*s) + ((b-mean)*s + beta) instead of ((x*W + b) - mean)*s + beta: each
# output element sees a few extra float32 roundings (eps = 1.2e-7) on terms of the size of the
# largest intermediate, and the generated graphs' dot products have at most 3*3*8 = 72 terms.
# Summed rounding errors of random sign grow like sqrt(n): about 1e-6 of the largest magnitude in
# the output; 1e-5 of it (and 1e-4 relative) leaves a 10x margin yet still catches any real
# mistake (a wrong channel, a missed epsilon, a bias added twice are all O(1e-1) or larger).
TOLERANCE_REL_TO_MAX = 1e-5
TOLERANCE_RTOL = 1e-4
STEPS = int(os.environ.get("ONNXCOMP_FUZZ_STEPS", "8"))  # steps per graph (raise it for a longer local hunt)
REASSOCIATING = {"batchnorm_folded", "conv_add_folded", "conv_mul_folded", "mul_chains_merged",
                 "add_chains_merged", "gemm_fused"}
FUZZ = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- a random graph, built step by step ---------------------------------------------------------------
class Builder:
    """Nodes and initializers of a graph under construction; `pool` holds (name, shape) of every
    float tensor computed so far (steps read from it)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.pool: list[tuple[str, tuple[int, ...]]] = []
        self.count = 0

    def fresh(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, values: np.ndarray, prefix: str = "c") -> str:
        name = self.fresh(prefix)
        self.initializers.append(onnx.numpy_helper.from_array(np.asarray(values), name))
        return name

    def weights(self, *shape: int, scale: float = 0.5) -> np.ndarray:
        return (self.rng.standard_normal(shape) * scale).astype(np.float32)

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...] | None, keep: bool = True, **attrs) -> str:
        out = self.fresh(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        if keep and shape is not None:
            self.pool.append((out, shape))
        return out


def _broadcast_shapes(shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Constant shapes that broadcast to `shape` without widening it."""
    options = [(), (1,), (shape[-1],), (1,) * (len(shape) - 1) + (shape[-1],), shape]
    if len(shape) == 4:
        options += [(shape[1], 1, 1), (1, shape[1], 1, 1)]  # per channel
    return options


def _operands(draw, a: str, c: str) -> list[str]:
    """[a, c] or [c, a]: rewrites must not assume the constant comes second."""
    return [c, a] if draw(st.booleans()) else [a, c]


# the steps; the fusion patterns (Conv + BN + affine, MatMul + bias) and what fold/cleanup/fuse act
# on appear more than once so that most examples exercise a rewrite
KINDS = (["conv_bn"] * 4 + ["matmul"] * 3 + ["transposes", "reshapes", "fold_me"] * 2
         + ["unary", "const_binary", "neutral", "noop_op", "pool_binary", "concat", "shape_reshape", "dead_branch",
            "duplicate_initializers", "duplicate_node", "constant_node", "flatten"])


def step(draw, b: Builder, x: tuple[str, tuple[int, ...]]) -> None:
    """One random step reading tensor `x` (more tensors from the pool as needed)."""
    name, shape = x
    kind = draw(st.sampled_from(KINDS))
    if kind == "unary":
        b.node(draw(st.sampled_from(["Relu", "Sigmoid", "Identity", "Neg"])), [name], shape)
    elif kind == "const_binary":
        cshape = draw(st.sampled_from(_broadcast_shapes(shape)))
        op = draw(st.sampled_from(["Add", "Mul", "Sub"]))
        b.node(op, _operands(draw, name, b.const(b.weights(*cshape))), shape)
    elif kind == "neutral":  # no-ops cleanup must remove without changing a bit
        op, value = draw(st.sampled_from([("Mul", 1.0), ("Div", 1.0), ("Sub", 0.0), ("Add", -0.0)]))
        b.node(op, [name, b.const(np.full(draw(st.sampled_from([(), (shape[-1],)])), value, np.float32))], shape)
    elif kind == "noop_op":  # ops that are no-ops only for these exact arguments: cleanup's riskier rules
        rank = len(shape)
        op = draw(st.sampled_from(["Cast", "Dropout", "Expand", "Slice", "Pad", "Concat", "Transpose", "Slice_part"]))
        if op == "Cast":
            b.node("Cast", [name], shape, to=TensorProto.FLOAT)
        elif op == "Dropout":
            b.node("Dropout", [name], shape)
        elif op == "Expand":  # to its own shape, or to a broadcastable smaller one: both leave x as is
            target = shape if draw(st.booleans()) else (1,) * rank
            b.node("Expand", [name, b.const(np.array(target, np.int64))], shape)
        elif op == "Slice":
            big = np.iinfo(np.int64).max
            b.node("Slice", [name, b.const(np.zeros(rank, np.int64)), b.const(np.full(rank, big, np.int64))], shape)
        elif op == "Slice_part":  # NOT a no-op: keeps a part (cleanup must keep it)
            axis = draw(st.integers(0, rank - 1))
            if shape[axis] > 1:
                out = tuple(d - 1 if i == axis else d for i, d in enumerate(shape))
                b.node("Slice", [name, b.const(np.array([1], np.int64)), b.const(np.array([shape[axis]], np.int64)),
                                 b.const(np.array([axis], np.int64))], out)
        elif op == "Pad":
            b.node("Pad", [name, b.const(np.zeros(2 * rank, np.int64))], shape)
        elif op == "Concat":
            b.node("Concat", [name], shape, axis=0)
        else:
            b.node("Transpose", [name], shape, perm=list(range(rank)))
    elif kind == "pool_binary":
        same = [t for t in b.pool if t[1] == shape]
        other = draw(st.sampled_from(same))[0]
        b.node(draw(st.sampled_from(["Add", "Mul", "Sub"])), [name, other], shape)
    elif kind == "matmul":
        if len(shape) != 2 and draw(st.booleans()):  # 2-D, so that MatMul + Add can become Gemm
            shape = (shape[0], int(np.prod(shape[1:])))
            name = b.node("Flatten", [name], shape)
        k = draw(st.integers(1, 6))
        out = b.node("MatMul", [name, b.const(b.weights(shape[-1], k))], shape[:-1] + (k,), keep=False)
        if draw(st.booleans()):  # MatMul + Add: Gemm when 2-D
            out_shape = shape[:-1] + (k,)
            bias = draw(st.sampled_from([s for s in [(k,), (1, k), out_shape, ()] if len(s) <= len(out_shape)]))
            b.node("Add", _operands(draw, out, b.const(b.weights(*bias))), shape[:-1] + (k,))
        else:
            b.pool.append((out, shape[:-1] + (k,)))
    elif kind == "transposes":
        perm = draw(st.permutations(range(len(shape))))
        t = b.node("Transpose", [name], tuple(shape[i] for i in perm), perm=list(perm))
        if draw(st.booleans()):
            perm2 = draw(st.permutations(range(len(shape))))
            b.node("Transpose", [t], tuple(shape[perm[i]] for i in perm2), perm=list(perm2))
    elif kind == "reshapes":
        size = int(np.prod(shape))
        first = (size,) if draw(st.booleans()) else (1, size)
        t = b.node("Reshape", [name, b.const(np.array(first, np.int64))], first)
        if draw(st.booleans()):  # back to the original shape, written with a -1
            target = list(shape)
            target[draw(st.integers(0, len(shape) - 1))] = -1
            b.node("Reshape", [t, b.const(np.array(target, np.int64))], shape)
    elif kind == "concat":
        axis = draw(st.integers(0, len(shape) - 1))
        other = draw(st.sampled_from([t for t in b.pool if t[1] == shape]))[0]
        out_shape = tuple(d * 2 if i == axis else d for i, d in enumerate(shape))
        b.node("Concat", [name, other], out_shape, axis=axis)
    elif kind == "conv_bn":
        if len(shape) != 4:  # seen as channels of a 1x1 image
            shape = (1, int(np.prod(shape)), 1, 1)
            name = b.node("Reshape", [name, b.const(np.array(shape, np.int64))], shape)
        cout, k = draw(st.integers(1, 8)), draw(st.sampled_from([1, 3]))
        inputs = [name, b.const(b.weights(cout, shape[1], k, k))]
        if draw(st.booleans()):
            inputs.append(b.const(b.weights(cout)))
        out_shape = (shape[0], cout, shape[2], shape[3])
        conv = b.node("Conv", inputs, out_shape, keep=False, pads=[k // 2] * 4)
        if draw(st.booleans()):
            conv = b.node("BatchNormalization", [conv, b.const(b.weights(cout) + 1), b.const(b.weights(cout)),
                                                 b.const(b.weights(cout)),
                                                 b.const(b.rng.uniform(0.5, 2, cout).astype(np.float32))],
                          out_shape, keep=False, epsilon=1e-5)
        if draw(st.booleans()):  # a per-channel affine the fuse pass folds into the Conv
            cshape = draw(st.sampled_from([(cout, 1, 1), (1, cout, 1, 1), (), (1,)]))
            conv = b.node(draw(st.sampled_from(["Add", "Mul"])),
                          _operands(draw, conv, b.const(b.weights(*cshape) + 1)), out_shape, keep=False)
        b.pool.append((conv, out_shape))
    elif kind == "fold_me":  # a constant sub-expression: fold must evaluate it exactly as ORT would
        a, c = b.const(b.weights(shape[-1])), b.const(b.weights(shape[-1]))
        folded = b.node(draw(st.sampled_from(["Add", "Mul", "Sub"])), [a, c], None)
        if draw(st.booleans()):
            folded = b.node(draw(st.sampled_from(["Relu", "Sigmoid", "Exp"])), [folded], None)
        b.node(draw(st.sampled_from(["Add", "Mul"])), [name, folded], shape)
    elif kind == "shape_reshape":  # Reshape(x, Shape(x)): a no-op once the shape is folded
        s = b.node("Shape", [name], None)
        b.node("Reshape", [name, s], shape)
    elif kind == "dead_branch":  # computed, never used: cleanup removes it
        dead = b.node("MatMul", [name, b.const(b.weights(shape[-1], 3))], None)
        b.node("Sigmoid", [dead], None)
    elif kind == "duplicate_initializers":  # equal bytes under two names: cleanup merges them
        values = b.weights(shape[-1])
        t = b.node("Add", [name, b.const(values)], shape)
        b.node("Mul", [t, b.const(values.copy())], shape)
    elif kind == "duplicate_node":  # the same op on the same input twice: cleanup merges the two nodes
        op = draw(st.sampled_from(["Relu", "Sigmoid", "Neg"]))
        first, second = b.node(op, [name], shape), b.node(op, [name], shape)
        if draw(st.booleans()):
            b.node("Add", [first, second], shape)
    elif kind == "constant_node":
        value = b.weights(shape[-1])
        c = b.node("Constant", [], None, value=onnx.numpy_helper.from_array(value, b.fresh("v")))
        b.node("Add", [name, c], shape)
    else:  # flatten
        b.node("Flatten", [name], (shape[0], int(np.prod(shape[1:]))))


@st.composite
def random_graphs(draw) -> onnx.ModelProto:
    b = Builder(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        shape = (1, draw(st.integers(1, 4)), draw(st.integers(2, 5)), draw(st.integers(2, 5)))
    else:
        shape = (draw(st.integers(1, 3)), draw(st.integers(2, 6)))
    b.pool.append(("x", shape))
    for _ in range(draw(st.integers(1, STEPS))):
        recent = b.pool[-3:]  # mostly extend the recent tensors, so the graph gets deep
        step(draw, b, draw(st.sampled_from(recent)))
    produced = [t for t in b.pool if t[0] != "x"] or [(b.node("Identity", ["x"], shape), shape)]
    outputs = [produced[-1]]
    if len(produced) > 1 and draw(st.booleans()):
        outputs.insert(0, draw(st.sampled_from(produced[:-1])))
    graph = helper.make_graph(
        b.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in dict(outputs).items()],
        b.initializers)
    opset = draw(st.sampled_from(sorted(OPSETS)))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=OPSETS[opset])
    onnx.checker.check_model(model, full_check=True)
    return model


# ---- running and comparing -------------------------------------------------------------------------------
def _outputs(model, feeds: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    session = make_session(model, optimize=False)  # ORT rewrites nothing: we compare our passes only
    return [session.run(None, feed) for feed in feeds]


def _feeds(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    rng = np.random.default_rng(0)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(2)]


def _assert_identical(reference, candidate, what: str) -> None:
    for ref_sample, cand_sample in zip(reference, candidate):
        for ref, cand in zip(ref_sample, cand_sample):
            assert ref.shape == cand.shape and ref.dtype == cand.dtype, what
            np.testing.assert_array_equal(cand, ref, err_msg=what)  # NaN equals NaN here


def _assert_close(reference, candidate, what: str) -> None:
    for ref_sample, cand_sample in zip(reference, candidate):
        for ref, cand in zip(ref_sample, cand_sample):
            assert ref.shape == cand.shape, what
            atol = TOLERANCE_REL_TO_MAX * max(1.0, float(np.nanmax(np.abs(ref), initial=0.0)))
            np.testing.assert_allclose(cand, ref, rtol=TOLERANCE_RTOL, atol=atol, err_msg=what)


def _run_passes(model: onnxcomp.Model, spec: str) -> dict:
    result = Pipeline.parse(spec).run(model)
    stats: dict = {}
    for record in result.report.passes:
        stats.update(record.stats)
    return stats


@FUZZ
@given(random_graphs())
def test_lossless_passes_keep_outputs_on_random_graphs(proto):
    feeds = _feeds(proto)
    reference = _outputs(proto, feeds)
    model = onnxcomp.load(proto)
    _run_passes(model, "fold, cleanup")
    after_exact = model.to_proto()
    onnx.checker.check_model(after_exact)
    _assert_identical(reference, _outputs(after_exact, feeds), "fold, cleanup changed the outputs")
    assert len(after_exact.graph.node) <= len(proto.graph.node)

    stats = _run_passes(model, "fuse")
    fused = model.to_proto()
    onnx.checker.check_model(fused)
    assert [o.name for o in fused.graph.output] == [o.name for o in proto.graph.output]
    if REASSOCIATING & set(stats):
        _assert_close(reference, _outputs(fused, feeds), f"fuse ({stats}) moved the outputs")
    else:
        _assert_identical(reference, _outputs(fused, feeds), f"fuse ({stats}) changed the outputs")


# ---- corrupted model files -------------------------------------------------------------------------------
def _model_bytes(name: str) -> bytes:
    if name == "small_cnn":
        return small_cnn().SerializeToString()
    path = REAL / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path.read_bytes()


@st.composite
def corruptions(draw, size: int):
    """A list of edits: flip bits, overwrite a run, cut the end, or insert junk."""
    edits = []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert"]))
        at = draw(st.integers(0, size - 1))
        edits.append((kind, at, draw(st.integers(0, 255)), draw(st.integers(1, 32))))
    return edits


def _corrupt(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for kind, at, byte, length in edits:
        at = min(at, max(len(buf) - 1, 0))
        if kind == "flip" and buf:
            buf[at] ^= 1 << (byte % 8)
        elif kind == "overwrite":
            buf[at:at + length] = bytes([byte]) * length
        elif kind == "truncate":
            del buf[at:]
        else:
            buf[at:at] = bytes([byte]) * length
    return bytes(buf)


@pytest.mark.parametrize("name", ["small_cnn", "mnist.onnx", "ultraface-rfb-320.onnx"])
def test_corrupted_model_files_load_or_fail_with_one_clean_line(name, tmp_path):
    """Flipped, overwritten, cut or padded model files: onnxcomp.load returns a model or raises one
    InputError line - no other exception (protobuf's DecodeError, graphsurgeon's, numpy's...)."""
    data = _model_bytes(name)
    path = tmp_path / "model.onnx"
    outcomes = {"loaded": 0, "refused": 0}

    @settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(corruptions(len(data)))
    def check(edits):
        path.write_bytes(_corrupt(data, edits))
        try:
            onnxcomp.load(path)
            outcomes["loaded"] += 1
        except InputError as exc:
            assert "\n" not in str(exc) and str(exc)
            outcomes["refused"] += 1

    check()
    assert outcomes["refused"] >= 10, outcomes  # the corruptions do reach the loader's checks


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(corruptions(len(small_cnn().SerializeToString())))
def test_the_cli_on_corrupted_files_never_crashes(edits):
    """Mutants that still load go through the lossless preset (flipped float bits make NaN/Inf
    weights): a result or one error line, never an internal error (exit 3) or a traceback."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        source, out = Path(folder) / "model.onnx", Path(folder) / "out.onnx"
        source.write_bytes(_corrupt(small_cnn().SerializeToString(), edits))
        done = run_cli_here("optimize", source, "-o", out, "--preset", "lossless")
        assert done.returncode in (0, 1, 2) and "Warning" not in done.stderr, done.stderr
        if done.returncode:
            assert_one_line_error(done)
        assert sorted(p.name for p in Path(folder).iterdir()) == sorted(["model.onnx"] + (
            ["out.onnx"] if done.returncode == 0 else []))
