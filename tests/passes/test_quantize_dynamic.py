"""quantize_dynamic: run-time activation quantization and weight-only int8 / int4."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

import onnxcomp
from onnxcomp.context import PassContext
from onnxcomp.model import load
from onnxcomp.registry import get
from onnxcomp.runtime import make_session

MLP = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[2,64] x) => (float[2,8] y) {
  h = MatMul (x, w1)
  y = Gemm <transB = 1> (h, w2, b2)
}
"""


def mlp():
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(MLP)
    for name, shape in (("w1", (64, 48)), ("w2", (8, 48)), ("b2", (8,))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(0, 0.2, shape).astype(np.float32), name))
    return proto


def x():
    return {"x": np.random.default_rng(1).normal(0, 1, (2, 64)).astype(np.float32)}


def quantize(proto, **params):
    model = load(proto)
    result = get("quantize_dynamic")(min_size=0, **params).run(model, PassContext())
    out = model.to_proto()
    onnx.checker.check_model(out)
    return model, result, make_session(out).run(None, x())[0]


def reference():
    return make_session(mlp()).run(None, x())[0]


def test_dynamic_quantization_uses_integer_matmuls_and_stays_close():
    model, result, y = quantize(mlp(), reduce_range=True)  # 7-bit weights: no u8s8 saturation on any CPU
    ops = [n.op for n in model.graph.nodes]
    assert result.changed and result.stats["nodes_quantized"] == 2
    assert ops.count("MatMulInteger") == 2 and "MatMul" not in ops and "Gemm" not in ops
    ref = reference()
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()


def unpack_nbits(packed, scales, zps, k, n, block):
    low, high = packed & 0x0F, packed >> 4
    q = np.stack([low, high], -1).reshape(n, -1, block).astype(np.float32)
    zp = np.stack([zps & 0x0F, zps >> 4], -1).reshape(n, -1)[:, : q.shape[1]].astype(np.float32)
    w = (q - zp[..., None]) * scales.reshape(n, -1)[..., None]
    return w.reshape(n, -1)[:, :k].T


def test_weight_only_int4_matmulnbits_matches_its_dequantized_weights():
    model, result, y = quantize(mlp(), mode="weight_only", bits=4, block_size=16)
    nbits = [n for n in model.graph.nodes if n.op == "MatMulNBits"]
    assert result.changed and len(nbits) == 2 and nbits[0].domain == "com.microsoft"
    node = next(n for n in nbits if n.attrs["N"] == 48)
    packed, scales, zps = (t.values for t in node.inputs[1:4])
    w1 = unpack_nbits(packed, scales, zps, 64, 48, 16)
    original = onnx.numpy_helper.to_array(next(i for i in mlp().graph.initializer if i.name == "w1"))
    assert np.abs(w1 - original).max() <= scales.max() / 2 + 1e-6  # round-to-nearest within half a step
    h = make_session(model.to_proto()).run(None, x())[0]
    assert h.shape == (2, 8)


def test_weight_only_int8_block_wise_upgrades_to_opset_21_and_loads():
    model, result, y = quantize(mlp(), mode="weight_only", bits=8, block_size=16)
    assert model.opset >= 21 and result.stats["opset_upgraded_from"] == 13
    dq = [n for n in model.graph.nodes if n.op == "DequantizeLinear"]
    assert dq and all(n.attrs.get("block_size") == 16 for n in dq)
    ref = reference()
    assert np.abs(y - ref).max() < 0.02 * np.abs(ref).max()


def test_quantize_dynamic_reports_no_change_without_constant_weights():
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[2,4] a, float[4,3] b) => (float[2,3] y) { y = MatMul (a, b) }""")
    model = load(proto)
    result = get("quantize_dynamic")(min_size=0).run(model, PassContext())
    assert not result.changed and [n.op for n in model.graph.nodes] == ["MatMul"]


def test_minilm_dynamic_quantization_keeps_mean_embedding_cosine_above_0_99():
    zoo = pytest.importorskip("models.zoo")
    e = zoo.get("minilm")
    ok, why = e.available()
    if not ok:
        pytest.skip(why)
    result = onnxcomp.optimize(e.path, "quantize_dynamic", check=False, gate=False)
    assert e.evaluate(result.model.to_proto())["cos_mean"] >= 0.99


# ---- a conv-only model: Conv weights become int8 + DequantizeLinear (issue 15 point 5) ----------
CONV_ONLY = """
<ir_version: 8, opset_import: ["" : 11]>
g (float[1,3,16,16] x) => (float[1,32,1,1] y) {
  h = Conv <pads = [1,1,1,1]> (x, w1, b1)
  r = Relu (h)
  c = Conv <pads = [1,1,1,1]> (r, w2, b2)
  y = GlobalAveragePool (c)
}
"""


def conv_only():
    rng = np.random.default_rng(3)
    proto = onnx.parser.parse_model(CONV_ONLY)
    for name, shape, std in (("w1", (16, 3, 3, 3), 0.3), ("b1", (16,), 0.05), ("w2", (32, 16, 3, 3), 0.1),
                             ("b2", (32,), 0.05)):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(0, std, shape).astype(np.float32), name))
    return proto


def test_dynamic_on_a_conv_only_model_quantizes_its_conv_weights_per_channel_and_ort_agrees():
    feed = {"x": np.random.default_rng(4).normal(0, 1, (1, 3, 16, 16)).astype(np.float32)}
    model = load(conv_only())
    result = get("quantize_dynamic")().run(model, ctx := PassContext())
    assert result.changed and result.stats["conv_weights_quantized"] == 1  # w1 (432) is under min_size
    assert model.opset >= 13 and result.stats["opset_upgraded_from"] == 11  # per-channel DequantizeLinear
    assert result.stats["weight_bytes_after"] < result.stats["weight_bytes_before"] / 3.5
    dq = [n for n in model.graph.nodes if n.op == "DequantizeLinear"]
    assert len(dq) == 1 and dq[0].attrs["axis"] == 0 and dq[0].inputs[0].values.dtype == np.int8
    assert [n.op for n in model.graph.nodes].count("Conv") == 2 and not ctx.notes[1:]
    got = make_session(model.to_proto()).run(None, feed)[0].ravel()
    want = make_session(conv_only()).run(None, feed)[0].ravel()
    assert float(got @ want / np.linalg.norm(got) / np.linalg.norm(want)) >= 0.999


def test_dynamic_that_quantizes_nothing_says_why_and_reports_no_change():
    model = load(conv_only())
    result = get("quantize_dynamic")(min_size=10**6).run(model, ctx := PassContext())
    assert not result.changed and result.stats["nodes_quantized"] == 0
    assert "nothing to quantize" in result.stats["reason"] and result.stats["reason"] in ctx.notes
    assert not any(n.op == "DequantizeLinear" for n in model.graph.nodes)


def test_conv_weights_stay_float_when_conv_is_left_out_of_ops():
    model = load(conv_only())
    result = get("quantize_dynamic")(ops=("MatMul", "Gemm"), min_size=0).run(model, PassContext())
    assert not result.changed and "MatMul/Gemm" in result.stats["reason"]
