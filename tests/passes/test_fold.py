"""fold: constant nodes and static shape subgraphs become initializers, bit-identically."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnxcomp.passes.fold import Fold

from onnxcomp.context import PassContext
from onnxcomp.model import Model
from onnxcomp.runtime import make_session

HEADER = '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>\n'


def fold(text: str, **params):
    proto = onnx.parser.parse_model(HEADER + text)
    model = Model.from_proto(proto)
    result = Fold(**params).run(model, PassContext())
    return proto, model, result


def outputs(proto, feeds):
    return make_session(proto, "cpu").run(None, feeds)


def ops(model) -> list[str]:
    return [n.op for n in model.graph.nodes]


def test_fold_turns_arithmetic_on_constants_into_one_initializer_with_identical_outputs():
    proto, model, result = fold('''g (float[2,3] x) => (float[2,3] y) {
        a = Constant<value = float[3] {1.5, -2.0, 0.25}>()
        b = Constant<value = float[3] {3.0, 0.5, 7.0}>()
        c = Mul(a, b)
        d = Sqrt(b)
        e = Add(c, d)
        y = Add(x, e)
    }''')
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    assert result.changed and result.stats["nodes_folded"] == 5
    assert ops(model) == ["Add"]
    assert outputs(model.to_proto(), {"x": x})[0].tobytes() == outputs(proto, {"x": x})[0].tobytes()


def test_fold_resolves_a_shape_gather_concat_reshape_chain_when_shapes_are_static():
    proto, model, result = fold('''g (float[2,3,4] x) => (float[6,4] y) {
        s = Shape(x)
        i = Constant<value = int64[2] {0, 1}>()
        ab = Gather<axis = 0>(s, i)
        n = ReduceProd<keepdims = 1>(ab)
        c = Constant<value = int64[1] {4}>()
        t = Concat<axis = 0>(n, c)
        y = Reshape(x, t)
    }''')
    assert result.changed and result.stats["shape_nodes_folded"] == 1
    assert ops(model) == ["Reshape"]
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert np.array_equal(outputs(model.to_proto(), {"x": x})[0], outputs(proto, {"x": x})[0])


def test_fold_keeps_shape_of_a_tensor_with_a_dynamic_dimension():
    _, model, result = fold('''g (float[N,4] x) => (float[M] y) {
        s = Shape(x)
        y = Reshape(x, Constant<value = int64[1] {-1}>())
        z = Identity(s)
    }'''.replace("y = Reshape(x, Constant<value = int64[1] {-1}>())",
                 "m = Constant<value = int64[1] {-1}>()\n        y = Reshape(x, m)"))
    assert "Shape" in ops(model)
    assert result.stats.get("shape_nodes_folded", 0) == 0


def test_fold_leaves_a_large_constantofshape_as_a_node_and_folds_it_when_allowed():
    text = '''g (float[1024,512] x) => (float[1024,512] y) {
        s = Constant<value = int64[2] {1024, 512}>()
        c = ConstantOfShape<value = float[1] {0.5}>(s)
        y = Mul(x, c)
    }'''
    _, model, result = fold(text)
    assert ops(model) == ["ConstantOfShape", "Mul"] and result.stats["skipped_too_large"] == 1
    _, model, result = fold(text, max_growth_mb=4.0)
    assert ops(model) == ["Mul"] and result.changed


def test_fold_never_evaluates_random_ops():
    _, model, result = fold('''g (float[2] x) => (float[2] y) {
        r = RandomNormal<shape = [2], dtype = 1>()
        y = Add(x, r)
    }''')
    assert ops(model) == ["RandomNormal", "Add"]
    assert not result.changed


def test_fold_leaves_custom_domain_ops_with_constant_inputs_untouched():
    _, model, result = fold('''g (float[2] x) => (float[2] y) {
        a = Constant<value = float[2] {1.0, 2.0}>()
        b = com.microsoft.Gelu(a)
        y = Add(x, b)
    }''')
    assert ops(model) == ["Gelu", "Add"]
    assert model.graph.nodes[0].domain == "com.microsoft"
    assert result.stats["nodes_folded"] == 1  # only the Constant node


def test_fold_keeps_the_name_of_a_graph_output_that_becomes_constant():
    _, model, result = fold('''g (float[2] x) => (float[2] y, int64[1] n) {
        y = Relu(x)
        n = Shape(x)
    }''')
    out = model.to_proto()
    assert [o.name for o in out.graph.output] == ["y", "n"]
    assert ops(model) == ["Relu"] and result.changed
    x = np.array([-1.0, 2.0], np.float32)
    assert outputs(out, {"x": x})[1].tolist() == [2]


def test_fold_reports_unchanged_when_no_input_is_constant():
    _, model, result = fold('''g (float[N] x) => (float[N] y) {
        r = Relu(x)
        y = Neg(r)
    }''')
    assert not result.changed and ops(model) == ["Relu", "Neg"]


@pytest.mark.parametrize("op", ["If"])
def test_fold_leaves_nodes_with_subgraphs_alone(op):
    _, model, _ = fold('''g (float[2] x, bool c) => (float[2] y) {
        y = If(c) <then_branch = g1 () => (float[2] a) { a = Neg(x) },
                   else_branch = g2 () => (float[2] b) { b = Abs(x) }>
    }''')
    assert op in ops(model)


def test_fold_leaves_an_input_with_a_default_value_alone():
    proto, model, result = fold('''g (float[2] x, float[2] w) => (float[2] y) <float[2] w = {1.0, 2.0}> {
        s = Neg(w)
        y = Mul(x, s)
    }''')
    assert not result.changed and ops(model) == ["Neg", "Mul"]
    x, w = np.array([1.5, -2.0], np.float32), np.array([3.0, 0.5], np.float32)
    assert outputs(model.to_proto(), {"x": x, "w": w})[0].tobytes() == outputs(proto, {"x": x, "w": w})[0].tobytes()


def test_shape_facts_are_reused_after_a_lazy_read_and_renewed_when_a_value_changes():
    from onnxcomp import subgraph_fold as sf

    proto = onnx.parser.parse_model(HEADER + '''g (float[2,6] x) => (float[A,B] y) <int64[2] t = {3, 4}> {
        y = Reshape(x, t)
    }''')
    model = Model.from_proto(proto)
    facts = sf.model_facts(model)
    assert facts[id(model.graph)]["y"][1] == (3, 4)
    target = model.graph.nodes[0].inputs[1]
    np.asarray(target.values)  # a pass reads it: graphsurgeon swaps its lazy value for an array
    assert sf.model_facts(model) is facts  # nothing shape inference reads has changed: no new export
    target.values = np.array([4, 3], np.int64)
    assert sf.model_facts(model)[id(model.graph)]["y"][1] == (4, 3)


def test_fold_reads_constant_nodes_from_their_attributes_without_an_ort_session():
    proto, model, result = fold('''g (float[2] x, int64[2] i, float16[2] h) => (float[2] y, int64[2] j, float16[2] z) {
        a = Constant<value = float[2] {1.5, -0.1}>()
        b = Constant<value_float = 0.3>()
        c = Constant<value_ints = [7, -9]>()
        d = Constant<value = float16[2] {2, 3}>()
        s = Add(x, a)
        y = Mul(s, b)
        j = Add(i, c)
        z = Add(h, d)
    }''')
    assert result.stats["nodes_folded"] == 4 and not result.stats.get("ort_batches")
    feeds = {"x": np.array([0.7, -2.5], np.float32), "i": np.array([1, 2], np.int64), "h": np.array([1, 2], np.float16)}
    before, after = outputs(proto, feeds), outputs(model.to_proto(), feeds)
    assert all(np.array_equal(u, v) for u, v in zip(before, after))


def test_fold_resolves_the_static_part_of_a_shape_sliced_after_an_int32_cast():
    # paddle2onnx casts shapes to int32 before slicing them; the batch stays unknown
    proto, model, result = fold('''g (float[N,3,4] x) => (float[N,12] y) {
        s = Shape(x)
        c = Cast<to = 6>(s)
        st = Constant<value = int64[1] {1}>()
        en = Constant<value = int64[1] {3}>()
        hw = Slice(c, st, en)
        hw64 = Cast<to = 7>(hw)
        n = ReduceProd<keepdims = 1>(hw64)
        m = Constant<value = int64[1] {-1}>()
        t = Concat<axis = 0>(m, n)
        y = Reshape(x, t)
    }''')
    assert result.changed and not {"Slice", "ReduceProd", "Concat"} & set(ops(model))
    assert isinstance(model.graph.nodes[-1].inputs[1], gs.Constant)  # the Reshape's target
    for batch in (2, 0):
        x = np.arange(batch * 12, dtype=np.float32).reshape(batch, 3, 4)
        assert outputs(model.to_proto(), {"x": x})[0].tobytes() == outputs(proto, {"x": x})[0].tobytes()


def test_fold_keeps_a_shape_slice_that_reaches_an_unknown_dimension():
    _, model, _ = fold('''g (float[N,3,4] x) => (int64[2] y) {
        s = Shape(x)
        st = Constant<value = int64[1] {0}>()
        en = Constant<value = int64[1] {2}>()
        y = Slice(s, st, en)
    }''')
    assert "Slice" in ops(model)


def test_fold_knows_the_shape_of_ort_dynamic_quantize_lstm_outputs(tmp_path):
    # ORT's DynamicQuantizeLSTM (com.microsoft, what quantize_dynamic makes of an LSTM; ddddocr)
    # has no onnx schema: onnx infers nothing after it. Its outputs are shaped as LSTM's.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    hidden, size = 8, 16
    text = f'''<ir_version: 8, opset_import: ["" : 14]>
    g (float[T,1,{size}] x) => (float[T,2,1,{hidden}] y, int64[1] h) {{
        y = LSTM<direction = "bidirectional", hidden_size = {hidden}>(x, w, r, b)
        s = Shape(y)
        i = Constant<value = int64[1] {{3}}>()
        h = Gather<axis = 0>(s, i)
    }}'''
    proto = onnx.parser.parse_model(text)
    for name, shape in (("w", (2, 4 * hidden, size)), ("r", (2, 4 * hidden, hidden)), ("b", (2, 8 * hidden))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.save(proto, tmp_path / "lstm.onnx")
    quantize_dynamic(tmp_path / "lstm.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8)
    quantized = onnx.load(tmp_path / "q.onnx")
    assert [n.op_type for n in quantized.graph.node if n.domain == "com.microsoft"] == ["DynamicQuantizeLSTM"]
    model = Model.from_proto(quantized)
    Fold().run(model, PassContext())
    h = model.graph.outputs[1]
    assert isinstance(h, gs.Constant) or (h.inputs and h.inputs[0].op == "Identity"
                                          and isinstance(h.inputs[0].inputs[0], gs.Constant))
    x = rng.standard_normal((5, 1, size)).astype(np.float32)
    before, after = outputs(quantized, {"x": x}), outputs(model.to_proto(), {"x": x})
    assert after[1].tolist() == [hidden] and all(a.tobytes() == b.tobytes() for a, b in zip(before, after))


def test_fold_reads_a_shape_slice_s_steps_in_their_place_when_its_axes_are_omitted():
    # Slice(Shape(x), [2], [0], "", [-1]) is [x.dim2, x.dim1] = [4, 3]; read as axes, the -1 would
    # have made a forward slice of nothing
    proto, model, _ = fold('''g (float[N,3,4] x) => (int64[2] y) {
        s = Shape(x)
        st = Constant<value = int64[1] {2}>()
        en = Constant<value = int64[1] {0}>()
        sp = Constant<value = int64[1] {-1}>()
        y = Slice(s, st, en, , sp)
    }''')
    x = np.zeros((2, 3, 4), np.float32)
    assert outputs(model.to_proto(), {"x": x})[0].tolist() == outputs(proto, {"x": x})[0].tolist() == [4, 3]
