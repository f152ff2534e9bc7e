"""cleanup: no-op and dead nodes go, duplicate initializers merge, outputs stay bit-identical."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxcomp.passes.cleanup import Cleanup

from onnxcomp.context import PassContext
from onnxcomp.model import Model
from onnxcomp.runtime import make_session

HEADER = '<ir_version: 8, opset_import: ["" : 17, "com.microsoft" : 1]>\n'
X = np.array([[-0.0, 1.5, -2.0, 3.25], [0.0, -1.0, 7.0, -0.5]], np.float32)


def cleanup(text: str):
    proto = onnx.parser.parse_model(HEADER + text)
    model = Model.from_proto(proto)
    result = Cleanup().run(model, PassContext())
    return proto, model, result


def same_outputs(before, after, feeds) -> bool:
    a = make_session(before, "cpu").run(None, feeds)
    b = make_session(after, "cpu").run(None, feeds)
    return all(x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b))


def ops(model) -> list[str]:
    return [n.op for n in model.graph.nodes]


NOOPS = {  # op -> (initializers, node)
    "Identity": ("", "t = Identity(r)"),
    "Dropout": ("", "t = Dropout<seed = 1>(r)"),
    "Cast": ("", "t = Cast<to = 1>(r)"),
    "Reshape": ("int64[2] s = {2, -1}", "t = Reshape(r, s)"),
    "Expand": ("int64[1] s = {4}", "t = Expand(r, s)"),
    "Transpose": ("", "t = Transpose<perm = [0, 1]>(r)"),
    "Pad": ("int64[4] p = {0, 0, 0, 0}", "t = Pad(r, p)"),
    "Slice": ("int64[2] a = {0, -9}, int64[2] b = {2, 100}", "t = Slice(r, a, b)"),
    "Concat": ("", "t = Concat<axis = 0>(r)"),
    "Mul": ("float[1] one = {1.0}", "t = Mul(one, r)"),
    "Div": ("float one = {1.0}", "t = Div(r, one)"),
    "Add": ("float[4] z = {-0.0, -0.0, -0.0, -0.0}", "t = Add(r, z)"),
    "Sub": ("float z = {0.0}", "t = Sub(r, z)"),
}


def graph(inits: str, body: str) -> str:
    return f'''g (float[2,4] x) => (float[2,4] y) {"<" + inits + ">" if inits else ""} {{
        r = Relu(x)
        {body}
        y = Neg(t)
    }}'''


@pytest.mark.parametrize("op", sorted(NOOPS))
def test_cleanup_removes_a_noop_and_keeps_outputs_bit_identical(op):
    proto, model, result = cleanup(graph(*NOOPS[op]))
    assert result.changed and result.stats[f"removed_{op}"] == 1
    assert ops(model) == ["Relu", "Neg"]
    assert same_outputs(proto, model.to_proto(), {"x": X})


@pytest.mark.parametrize("inits, body", [
    ("float z = {0.0}", "t = Add(r, z)"),                         # -0 + 0 = +0: not neutral
    ("float[3,1,1] one = {1.0, 1.0, 1.0}", "t = Mul(r, one)"),    # broadcasts to [3,2,4]
    ("", "t = Cast<to = 10>(r)"),
    ("int64[2] s = {4, 2}", "t = Reshape(r, s)"),
    ("", "t = Transpose<perm = [1, 0]>(r)"),
    ("int64[1] a = {1}, int64[1] b = {100}", "t = Slice(r, a, b)"),
])
def test_cleanup_keeps_nodes_that_only_look_like_noops(inits, body):
    op = body.split("= ")[1].split("(")[0].split("<")[0]
    _, model, result = cleanup(graph(inits, body).replace("float[2,4] y", "float y"))
    assert ops(model) == ["Relu", op, "Neg"] and not result.changed


def test_cleanup_removing_the_last_noop_keeps_the_graph_output_name():
    proto, model, result = cleanup('''g (float[2,4] x) => (float[2,4] y) {
        r = Relu(x)
        y = Identity(r)
    }''')
    out = model.to_proto()
    assert result.changed and ops(model) == ["Relu"]
    assert [o.name for o in out.graph.output] == ["y"]
    assert same_outputs(proto, out, {"x": X})


def test_cleanup_keeps_an_identity_from_a_graph_input_to_a_graph_output():
    _, model, result = cleanup('''g (float[2,4] x) => (float[2,4] y) {
        y = Identity(x)
    }''')
    assert ops(model) == ["Identity"] and not result.changed


def test_cleanup_keeps_dropout_in_training_mode():
    _, model, _ = cleanup('''g (float[2,4] x, bool t) => (float[2,4] y) {
        r = Dropout(x, , t)
        y = Neg(r)
    }'''.replace("r = Dropout(x, , t)", "ratio = Constant<value = float {0.5}>()\n r = Dropout(x, ratio, t)"))
    assert "Dropout" in ops(model)


def test_cleanup_merges_duplicate_initializers_and_removes_dead_nodes_but_keeps_graph_inputs():
    proto, model, result = cleanup('''g (float[4] x, float[4] unused) => (float[4] y)
        <float[4] a = {1.0, 2.0, 3.0, 4.0}, float[4] b = {1.0, 2.0, 3.0, 4.0}> {
        p = Mul(x, a)
        q = Mul(p, b)
        dead = Exp(x)
        y = Neg(q)
    }''')
    assert result.stats["initializers_merged"] == 1 and result.stats["dead_nodes_removed"] == 1
    assert ops(model) == ["Mul", "Mul", "Neg"]
    assert [t.name for t in model.graph.inputs] == ["x", "unused"]
    out = model.to_proto()
    assert len(out.graph.initializer) == 1
    feeds = {"x": X[0], "unused": X[1]}
    assert same_outputs(proto, out, feeds)


def test_cleanup_leaves_custom_domain_ops_alone():
    _, model, _ = cleanup('''g (float[4] x) => (float[4] y) {
        r = com.microsoft.Identity(x)
        y = Neg(r)
    }''')
    assert ops(model) == ["Identity", "Neg"] and model.graph.nodes[0].domain == "com.microsoft"


def test_cleanup_reports_unchanged_on_a_clean_graph():
    _, model, result = cleanup('''g (float[4] x) => (float[4] y) {
        r = Relu(x)
        y = Neg(r)
    }''')
    assert not result.changed and ops(model) == ["Relu", "Neg"]


def test_cleanup_merges_two_nodes_computing_the_same_thing():
    proto, model, result = cleanup('''g (float[4] x) => (float[4] y) <float[1] c = {3.0}> {
        a = Div(x, c)
        b = Div(x, c)
        y = Sub(a, b)
    }''')
    assert result.stats["duplicate_nodes_merged"] == 1 and ops(model) == ["Div", "Sub"]
    assert same_outputs(proto, model.to_proto(), {"x": X[0]})


def test_cleanup_removes_a_slice_to_int64_max_over_a_dimension_of_unknown_size():
    proto, model, result = cleanup('''g (float[2,N] x) => (float[2,N] y) <int64[1] s = {0}, int64[1] e = {9223372036854775807},
                                                      int64[1] a = {1}> {
        r = Relu(x)
        t = Slice(r, s, e, a)
        y = Neg(t)
    }''')
    assert result.changed and result.stats["removed_Slice"] == 1 and ops(model) == ["Relu", "Neg"]
    assert same_outputs(proto, model.to_proto(), {"x": X})


def test_cleanup_keeps_a_slice_of_unknown_size_that_may_cut():
    _, model, result = cleanup('''g (float[2,N] x) => (float[2,M] y) <int64[1] s = {0}, int64[1] e = {3}, int64[1] a = {1}> {
        r = Relu(x)
        t = Slice(r, s, e, a)
        y = Neg(t)
    }''')
    assert "Slice" in ops(model) and not result.stats.get("removed_Slice")


@pytest.mark.parametrize("chain", [
    "d = Slice(s, zero, one)",                                               # Shape(x)[0:1]
    "s32 = Cast<to = 6>(s)\n d32 = Slice(s32, zero, one)\n d = Cast<to = 7>(d32)",  # Paddle's int32 detour
])
def test_cleanup_makes_a_keep_the_batch_reshape_target_constant(chain):
    proto, model, result = cleanup(f'''g (float[N,3,2,2] x) => (float[N,12] y)
        <int64[1] zero = {{0}}, int64[1] one = {{1}}, int64[1] rest = {{12}}> {{
        s = Shape(x)
        {chain}
        t = Concat<axis = 0>(d, rest)
        y = Reshape(x, t)
    }}''')
    assert result.stats["reshape_targets_made_constant"] == 1 and ops(model) == ["Reshape"]
    assert gu_constant(model.graph.nodes[0].inputs[1]).tolist() == [0, 12]
    x = np.arange(5 * 12, dtype=np.float32).reshape(5, 3, 2, 2)
    assert same_outputs(proto, model.to_proto(), {"x": x})


def test_cleanup_turns_one_runtime_size_among_constants_into_minus_one():
    # jax2tf: the batch taken from another tensor's shape (z), or standing at another position
    proto, model, result = cleanup('''g (float[N,3,2,2] x, float[N,5] z) => (float[N,12] y, float[3,4,N] w)
        <int64[1] zero = {0}, int64[1] one = {1}, int64[1] rest = {12}, int64[2] tail = {3, 4}> {
        sz = Shape(z)
        dz = Slice(sz, zero, one)
        t = Concat<axis = 0>(dz, rest)
        y = Reshape(x, t)
        sx = Shape(x)
        dx = Slice(sx, zero, one)
        u = Concat<axis = 0>(tail, dx)
        w = Reshape(x, u)
    }''')
    assert result.stats["reshape_targets_made_constant"] == 2 and ops(model) == ["Reshape", "Reshape"]
    assert sorted(gu_constant(n.inputs[1]).tolist() for n in model.graph.nodes) == [[-1, 12], [3, 4, -1]]
    feeds = {"x": np.arange(5 * 12, dtype=np.float32).reshape(5, 3, 2, 2), "z": np.ones((5, 5), np.float32)}
    assert same_outputs(proto, model.to_proto(), feeds)


def test_cleanup_keeps_a_reshape_target_with_two_runtime_sizes_or_a_runtime_size_beside_a_copy():
    # -1 needs every other size known and positive: a copied dimension (0) may be 0 at run time
    _, model, result = cleanup('''g (float[N,M,12] x, float[N,M] z) => (float[N,M,12] y, float[N,M,12] w)
        <int64[1] zero = {0}, int64[1] one = {1}, int64[1] two = {2}, int64[1] rest = {12}> {
        sz = Shape(z)
        dn = Slice(sz, zero, one)
        dm = Slice(sz, one, two)
        t = Concat<axis = 0>(dn, dm, rest)
        y = Reshape(x, t)
        sx = Shape(x)
        dx = Slice(sx, zero, one)
        u = Concat<axis = 0>(dx, dm, rest)
        w = Reshape(x, u)
    }''')
    assert not result.stats.get("reshape_targets_made_constant") and ops(model).count("Shape") == 2


def gu_constant(tensor):
    return np.asarray(tensor.values)


def test_cleanup_knows_the_rank_after_a_reshape_to_a_runtime_target_and_removes_a_multiply_by_one():
    # onnx (Reshape before opset 14) infers nothing after Reshape(x, runtime target), as in PP-OCR
    # rec; the target's length is still the rank, and a rank-3 one then cannot broadcast the product
    text = '''<ir_version: 7, opset_import: ["" : 12]>
    g (float[N,120,H,W] x) => (float[N,120,M] y) <float[1,1,1] one = {1.0}> {
        s = Shape(x)
        st = Constant<value = int64[1] {0}>()
        en = Constant<value = int64[1] {2}>()
        n = Slice(s, st, en)
        m = Constant<value = int64[1] {-1}>()
        t = Concat<axis = 0>(n, m)
        r = Reshape(x, t)
        y = Mul(r, one)
    }'''
    proto = onnx.parser.parse_model(text)
    model = Model.from_proto(proto)
    Cleanup().run(model, PassContext())
    assert "Mul" not in ops(model)
    x = np.random.default_rng(0).standard_normal((2, 120, 3, 5)).astype(np.float32)
    assert same_outputs(proto, model.to_proto(), {"x": x})
