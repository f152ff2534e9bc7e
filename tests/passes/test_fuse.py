"""fuse: BatchNorm into Conv/ConvTranspose/Gemm, MatMul+Add into Gemm, Transpose/Reshape chains.

Also the end-to-end check on the real models: `fold, cleanup, fuse` gives fewer nodes and the
same outputs (1e-5) on ORT CPU.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxcomp.passes.fuse import Fuse

import onnxcomp
from onnxcomp.context import PassContext
from onnxcomp.model import Model
from onnxcomp.runtime import make_session
from onnxcomp.validate import generate_inputs

HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
RNG = np.random.default_rng(0)


def fuse(text: str, **weights):
    proto = onnx.parser.parse_model(HEADER + text)
    for name, value in weights.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.float32), name))
    model = Model.from_proto(proto)
    result = Fuse().run(model, PassContext())
    return proto, model, result


def close(before, after, feeds, atol=1e-5) -> bool:
    a = make_session(before, "cpu").run(None, feeds)
    b = make_session(after, "cpu").run(None, feeds)
    return all(x.shape == y.shape and np.allclose(x, y, rtol=1e-4, atol=atol) for x, y in zip(a, b))


def ops(model) -> list[str]:
    return [n.op for n in model.graph.nodes]


def bn_weights(c: int) -> dict:
    return {"scale": RNG.uniform(0.5, 2, c), "bias": RNG.standard_normal(c), "mean": RNG.standard_normal(c),
            "var": RNG.uniform(0.1, 2, c)}


def test_fuse_folds_batchnorm_into_the_preceding_conv():
    proto, model, result = fuse('''g (float[1,3,8,8] x) => (float[1,4,6,6] y) {
        c = Conv(x, W, B)
        y = BatchNormalization<epsilon = 0.001>(c, scale, bias, mean, var)
    }''', W=RNG.standard_normal((4, 3, 3, 3)), B=RNG.standard_normal(4), **bn_weights(4))
    assert result.changed and result.stats["batchnorm_folded"] == 1 and ops(model) == ["Conv"]
    assert close(proto, model.to_proto(), {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)})


def test_fuse_folds_batchnorm_into_a_grouped_convtranspose_without_bias():
    proto, model, result = fuse('''g (float[1,4,5,5] x) => (float[1,6,7,7] y) {
        c = ConvTranspose<group = 2>(x, W)
        y = BatchNormalization(c, scale, bias, mean, var)
    }''', W=RNG.standard_normal((4, 3, 3, 3)), **bn_weights(6))
    assert ops(model) == ["ConvTranspose"] and result.changed
    assert close(proto, model.to_proto(), {"x": RNG.standard_normal((1, 4, 5, 5)).astype(np.float32)})


def test_fuse_folds_batchnorm_into_a_gemm_with_transposed_weights():
    proto, model, result = fuse('''g (float[3,5] x) => (float[3,4] y) {
        c = Gemm<transB = 1, alpha = 0.5, beta = 2.0>(x, W, B)
        y = BatchNormalization(c, scale, bias, mean, var)
    }''', W=RNG.standard_normal((4, 5)), B=RNG.standard_normal(4), **bn_weights(4))
    assert ops(model) == ["Gemm"] and result.changed
    assert close(proto, model.to_proto(), {"x": RNG.standard_normal((3, 5)).astype(np.float32)})


def test_fuse_keeps_batchnorm_when_the_conv_output_has_another_consumer():
    _, model, result = fuse('''g (float[1,3,8,8] x) => (float[1,4,6,6] y, float[1,4,6,6] z) {
        c = Conv(x, W)
        y = BatchNormalization(c, scale, bias, mean, var)
        z = Relu(c)
    }''', W=RNG.standard_normal((4, 3, 3, 3)), **bn_weights(4))
    assert "BatchNormalization" in ops(model) and not result.changed


def test_fuse_turns_matmul_plus_add_into_gemm_for_2d_inputs():
    proto, model, result = fuse('''g (float[N,5] x) => (float[N,4] y) {
        m = MatMul(x, W)
        y = Add(B, m)
    }''', W=RNG.standard_normal((5, 4)), B=RNG.standard_normal(4))
    assert ops(model) == ["Gemm"] and result.stats["gemm_fused"] == 1
    assert close(proto, model.to_proto(), {"x": RNG.standard_normal((7, 5)).astype(np.float32)})


def test_fuse_keeps_matmul_plus_add_for_3d_inputs_or_widening_bias():
    _, model, _ = fuse('''g (float[2,3,5] x) => (float[2,3,4] y) {
        m = MatMul(x, W)
        y = Add(m, B)
    }''', W=RNG.standard_normal((5, 4)), B=RNG.standard_normal(4))
    assert ops(model) == ["MatMul", "Add"]
    _, model, result = fuse('''g (float[1,5] x) => (float[3,4] y) {
        m = MatMul(x, W)
        y = Add(m, B)
    }''', W=RNG.standard_normal((5, 4)), B=RNG.standard_normal((3, 4)))
    assert ops(model) == ["MatMul", "Add"] and not result.changed


def test_fuse_merges_transposes_and_drops_an_identity_pair():
    proto, model, result = fuse('''g (float[2,3,4] x) => (float[4,2,3] y, float[2,3,4] z) {
        a = Transpose<perm = [1, 0, 2]>(x)
        y = Transpose<perm = [2, 1, 0]>(a)
        b = Transpose<perm = [0, 2, 1]>(x)
        c = Transpose<perm = [0, 2, 1]>(b)
        z = Neg(c)
    }''')
    assert result.stats == {"transposes_merged": 1, "transposes_removed": 1}
    assert sorted(ops(model)) == ["Neg", "Transpose"]
    assert close(proto, model.to_proto(), {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)}, atol=0)


def test_fuse_merges_consecutive_reshapes():
    proto, model, result = fuse('''g (float[2,3,4] x) => (float[4,6] y) <int64[2] s1 = {6, 4}, int64[2] s2 = {4, -1}> {
        a = Reshape(x, s1)
        y = Reshape(a, s2)
    }''')
    assert ops(model) == ["Reshape"] and result.stats["reshapes_merged"] == 1
    assert close(proto, model.to_proto(), {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32)}, atol=0)


def test_fuse_merges_a_flatten_into_a_reshape_to_a_runtime_shape_but_not_into_other_runtime_targets():
    # the attention-mask pattern of BERT exports: flatten a gathered mask, reshape it like another tensor
    proto, model, result = fuse('''g (float[2,3,4] x, float[4,1,6] y, int64[1] t) => (float[4,1,6] z, float[?] w)
        <int64[1] flat = {-1}> {
        a = Reshape(x, flat)
        s = Shape(y)
        z = Reshape(a, s)
        b = Reshape(x, flat)
        w = Reshape(b, t)
    }''')
    assert result.stats["reshapes_merged"] == 1
    assert sorted(ops(model)) == ["Reshape", "Reshape", "Reshape", "Shape"]
    feeds = {"x": RNG.standard_normal((2, 3, 4)).astype(np.float32), "y": np.zeros((4, 1, 6), np.float32),
             "t": np.array([0], np.int64)}  # t's 0 copies the flattened length 24: merged, it would copy 2
    assert close(proto, model.to_proto(), feeds, atol=0)


def test_fuse_reports_unchanged_when_nothing_matches():
    _, model, result = fuse('''g (float[2,3] x) => (float[2,3] y) {
        a = Relu(x)
        y = Transpose<perm = [0, 1]>(a)
    }''')
    assert not result.changed and ops(model) == ["Relu", "Transpose"]


@pytest.mark.parametrize("fixture", ["ultraface_path", "mnist_path"])
def test_fold_cleanup_fuse_shrinks_a_real_model_and_keeps_its_outputs_within_1e_5(fixture, request):
    path = request.getfixturevalue(fixture)
    original = onnxcomp.load(path)
    before = len(original.graph.nodes)
    reference = original.to_proto()
    result = onnxcomp.optimize(path, "fold, cleanup, fuse", check=False)
    assert len(result.model.graph.nodes) < before
    assert [o.name for o in result.model.to_proto().graph.output] == [o.name for o in reference.graph.output]
    for feeds in generate_inputs(original, 2, seed=1):
        a = make_session(reference, "cpu").run(None, feeds)
        b = make_session(result.model, "cpu").run(None, feeds)
        assert all(np.allclose(x, y, rtol=0, atol=1e-5) for x, y in zip(a, b))


CONV_AFFINE = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1, 2, 5, 5] x) => (float[1, 3, 5, 5] y) {
    c = Conv<pads = [1, 1, 1, 1]>(x, w)
    a = Add(c, shift)
    y = Mul(a, scale)
}
"""


def _conv_affine_model(shift_shape=(3, 1, 1), text=CONV_AFFINE):
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, value in (("w", rng.standard_normal((3, 2, 3, 3))), ("shift", rng.standard_normal(shift_shape)),
                        ("scale", rng.standard_normal((1, 3, 1, 1)))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.float32), name))
    return proto


def test_fuse_folds_per_channel_add_and_mul_after_a_conv_into_its_bias_and_weights():
    proto = _conv_affine_model()
    model = onnxcomp.load(proto)
    result = Fuse().run(model, PassContext())
    assert result.changed and result.stats == {"conv_add_folded": 1, "conv_mul_folded": 1}
    assert [n.op for n in model.graph.nodes] == ["Conv"]
    assert onnxcomp.validate(proto, model, tolerance=onnxcomp.Tolerance(atol=1e-5, rtol=1e-5)).passed


def test_fuse_leaves_a_scale_before_a_conv_output_so_outputs_stay_bit_identical_on_ort():
    # ORT folds Mul(Conv, k) into the Conv at load but not Mul(k, Conv): folding the latter moved
    # PP-OCR det's outputs by 6e-5, as the conv then rounds x*(W*k) instead of (x*W)*k
    proto = _conv_affine_model(text=CONV_AFFINE.replace("Mul(a, scale)", "Mul(scale, a)"))
    model = onnxcomp.load(proto)
    result = Fuse().run(model, PassContext())
    assert result.stats == {"conv_add_folded": 1}
    assert [n.op for n in model.graph.nodes] == ["Conv", "Mul"]
    feeds = {"x": RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)}
    assert close(proto, model.to_proto(), feeds, atol=0)


def test_fuse_folds_a_per_channel_add_after_a_conv_transpose_into_its_bias():
    proto = onnx.parser.parse_model(HEADER + '''g (float[1, 2, 4, 4] x) => (float[1, 6, 8, 8] y) {
        c = ConvTranspose<strides = [2, 2], group = 2>(x, w)
        y = Add(c, shift)
    }''')
    for name, value in (("w", RNG.standard_normal((2, 3, 2, 2))), ("shift", RNG.standard_normal((6, 1, 1)))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(value.astype(np.float32), name))
    model = onnxcomp.load(proto)
    result = Fuse().run(model, PassContext())
    assert result.stats == {"conv_add_folded": 1}
    assert [n.op for n in model.graph.nodes] == ["ConvTranspose"]
    assert close(proto, model.to_proto(), {"x": RNG.standard_normal((1, 2, 4, 4)).astype(np.float32)})


def test_fuse_leaves_an_add_that_is_not_per_channel():
    model = onnxcomp.load(_conv_affine_model(shift_shape=(1, 3, 5, 5)))
    result = Fuse().run(model, PassContext())
    assert result.stats.get("conv_add_folded") is None
    assert [n.op for n in model.graph.nodes] == ["Conv", "Add", "Mul"]
    assert not result.changed


MUL_CHAIN = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y) {
    a = Mul(x, k1)
    y = Mul(k2, a)
}
"""


def test_fuse_merges_a_chain_of_constant_multiplications():
    proto = onnx.parser.parse_model(MUL_CHAIN)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(np.float32(0.5), "k1"),
                                    onnx.numpy_helper.from_array(np.arange(3, dtype=np.float32), "k2")])
    model = onnxcomp.load(proto)
    result = Fuse().run(model, PassContext())
    assert result.stats == {"mul_chains_merged": 1}
    assert [n.op for n in model.graph.nodes] == ["Mul"]
    assert onnxcomp.validate(proto, model, tolerance=onnxcomp.Tolerance(atol=1e-6, rtol=1e-6)).passed


def test_fuse_folds_per_channel_mul_and_add_after_batchnorms_of_a_shared_conv():
    """inception_v2's pattern: one Conv read by several BN -> Mul -> Add branches; the BNs cannot
    fold into the shared Conv, but each branch's Mul and Add fold into its BN."""
    proto, model, result = fuse('''g (float[1,3,8,8] x) => (float[1,4,6,6] y1, float[1,4,6,6] y2) {
        c = Conv(x, W, B)
        b1 = BatchNormalization(c, scale, bias, mean, var)
        m1 = Mul(b1, k)
        y1 = Add(m1, a)
        b2 = BatchNormalization(c, scale2, bias2, mean, var)
        y2 = Mul(k1, b2)
    }''', W=RNG.standard_normal((4, 3, 3, 3)), B=RNG.standard_normal(4), k=RNG.uniform(-2, 2, (4, 1, 1)),
                                 a=RNG.standard_normal((1, 4, 1, 1)), k1=np.array([1.5]), scale2=RNG.uniform(0.5, 2, 4),
                                 bias2=RNG.standard_normal(4), **bn_weights(4))
    assert result.stats["batchnorm_mul_folded"] == 2 and result.stats["batchnorm_add_folded"] == 1
    assert sorted(ops(model)) == ["BatchNormalization", "BatchNormalization", "Conv"]
    assert close(proto, model.to_proto(), {"x": RNG.standard_normal((1, 3, 8, 8)).astype(np.float32)})


def test_fuse_keeps_a_mul_after_batchnorm_that_is_not_per_channel():
    """(4, 1) on a rank-3 output [1, 4, 6] scales rows of the last two axes: no BN scale expresses it."""
    _, model, result = fuse('''g (float[1,4,6] x) => (float[1,4,6] y) {
        b = BatchNormalization(x, scale, bias, mean, var)
        y = Mul(b, k)
    }''', k=RNG.standard_normal((4, 6)), **bn_weights(4))
    assert not result.changed and ops(model) == ["BatchNormalization", "Mul"]


@pytest.mark.parametrize("a1,a2", [([0], [0]), ([0, 2], [1]), ([1], [0, 3]), ([0], [2, 4]), ([3], [0])])
def test_fuse_merges_consecutive_unsqueezes_into_one_with_the_same_output(a1, a2):
    proto, model, result = fuse(f'''g (float[2,3,4] x) => (float y) {{
        u = Unsqueeze(x, a1)
        y = Unsqueeze(u, a2)
    }}''')
    for name, axes in (("a1", a1), ("a2", a2)):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(axes, np.int64), name))
    model = Model.from_proto(proto)
    result = Fuse().run(model, PassContext())
    assert result.stats["unsqueezes_merged"] == 1 and ops(model) == ["Unsqueeze"]
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32)
    before, after = (make_session(m, "cpu").run(None, {"x": x})[0] for m in (proto, model.to_proto()))
    assert before.shape == after.shape and np.array_equal(before, after)
