"""minify: a smaller file that ORT runs bit-identically, the model's inputs and outputs kept by name."""

from __future__ import annotations

import numpy as np
import onnx
from onnxcomp.passes.minify import Minify

import onnxcomp
from onnxcomp.context import PassContext
from onnxcomp.model import Model
from onnxcomp.io.container import pack_proto
from onnxcomp.runtime import make_session


def run_both(before: onnx.ModelProto, after: onnx.ModelProto, feeds: list[dict]) -> bool:
    a, b = make_session(before, "cpu", threads=1), make_session(after, "cpu", threads=1)
    assert [o.name for o in a.get_outputs()] == [o.name for o in b.get_outputs()]
    assert [i.name for i in a.get_inputs()] == [i.name for i in b.get_inputs()]
    return all(np.array_equal(x, y) for f in feeds for x, y in zip(a.run(None, f), b.run(None, f)))


def test_minify_shrinks_a_quantized_real_mnist_and_keeps_its_outputs_bit_identical(mnist_path):
    # the compact preset's form: low-bit codes decoded by Cast/Sub/Mul nodes, IR 3 (CNTK export)
    quantized = onnxcomp.optimize(mnist_path, "fold, cleanup, fuse, gptq(bits=3, form=fold)",
                                  calibration=[{"Input3": np.random.default_rng(i).random((1, 1, 28, 28), np.float32)}
                                               for i in range(8)], check=False).model
    before = quantized.to_proto()
    result = Minify().run(quantized, PassContext())
    after = quantized.to_proto()
    onnx.checker.check_model(after, full_check=True)
    assert result.stats["ir_version_raised"] == 1 and before.ir_version == 3 and after.ir_version == 4
    assert len(before.graph.input) > 1 and [i.name for i in after.graph.input] == ["Input3"]  # weights not inputs
    assert before.graph.value_info and not after.graph.value_info
    assert all(not n.name for n in after.graph.node) and all(len(t.name) <= 3 for t in after.graph.initializer)
    assert len(after.SerializeToString()) < len(before.SerializeToString())
    feeds = [{"Input3": np.random.default_rng(10 + i).random((1, 1, 28, 28), np.float32)} for i in range(4)]
    assert run_both(before, after, feeds)
    packed_before = len(pack_proto(before, "auto")[0])
    packed_after = len(pack_proto(after, "auto")[0])
    assert packed_after < packed_before - 200  # the skeleton is the part that shrinks


def test_minify_renames_across_if_branches_that_read_outer_tensors():
    text = '''<ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, bool c) => (float[2] y) <float[2] k = {2.0, 4.0}> {
        outer_scaled_value = Mul(x, k)
        y = If(c) <then_branch = g1 () => (float[2] then_result) {
                       then_result = Add(outer_scaled_value, k) },
                   else_branch = g2 () => (float[2] else_result) {
                       else_result = Sub(outer_scaled_value, x) }>
    }'''
    proto = onnx.parser.parse_model(text)
    model = Model.from_proto(proto)
    result = Minify().run(model, PassContext())
    after = model.to_proto()
    onnx.checker.check_model(after, full_check=True)
    assert result.stats["tensors_renamed"] >= 4 and result.stats["ir_version_raised"] == 0
    names = [o for n in after.graph.node for o in n.output] + [t.name for t in after.graph.initializer]
    assert "outer_scaled_value" not in names and "k" not in names
    assert [t.name for t in proto.graph.initializer] == ["k"]  # the caller's model is left as it was
    x = np.array([1.5, -2.25], np.float32)
    assert run_both(proto, after, [{"x": x, "c": np.array(True)}, {"x": x, "c": np.array(False)}])


def test_minify_keeps_an_input_with_a_default_value_feedable():
    text = '''<ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x, float[2] bias) => (float[2] y) <float[2] bias = {1.0, 2.0}> {
        t = Relu(x)
        y = Add(t, bias)
    }'''
    proto = onnx.parser.parse_model(text)
    model = Model.from_proto(proto)
    Minify().run(model, PassContext())
    after = model.to_proto()
    assert [i.name for i in after.graph.input] == ["x", "bias"]
    x = np.array([1.5, -2.25], np.float32)
    assert run_both(proto, after, [{"x": x}, {"x": x, "bias": np.array([5.0, 6.0], np.float32)}])


def test_minify_never_gives_a_name_that_an_unvisited_subgraph_tensor_still_has():
    # the Loop body has no node: its inputs (named like minify's own names) are left as they are
    text = '''<ir_version: 8, opset_import: ["" : 17]>
    g (float[2] x) => (float[2] y) {
        long_intermediate_name = Relu(x)
        n = Constant<value = int64 {2}>()
        go = Constant<value = bool {1}>()
        y = Loop(n, go, long_intermediate_name) <body = body (int64 _1, bool _2, float[2] _0) => (bool _2, float[2] _0) {}>
    }'''
    proto = onnx.parser.parse_model(text)
    model = Model.from_proto(proto)
    Minify().run(model, PassContext())
    after = model.to_proto()
    main_names = {o for n in after.graph.node for o in n.output} | {t.name for t in after.graph.initializer}
    assert not main_names & {"_0", "_1", "_2"}
    x = np.array([1.5, -2.25], np.float32)
    assert run_both(proto, after, [{"x": x}])
