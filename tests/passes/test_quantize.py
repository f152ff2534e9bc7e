"""quantize: static QDQ placement, parameters, opset upgrade, fallback, latency gate, real models."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

import onnxcomp
from onnxcomp.context import PassContext
from onnxcomp.calibration import CalibrationData
from onnxcomp.errors import PassError
from onnxcomp.model import load
from onnxcomp.registry import get
from onnxcomp.runtime import make_session

CONV_RELU = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[1,3,16,16] x) => (float[1,8,16,16] y) {
  h = Conv <pads = [1,1,1,1]> (x, w1, b1)
  r = Relu (h)
  y = Conv <pads = [1,1,1,1]> (r, w2, b2)
}
"""


def conv_model(opset: int = 13):
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(CONV_RELU.replace('"" : 13', f'"" : {opset}'))
    for name, shape in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (8, 8, 3, 3)), ("b2", (8,))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name))
    return proto


def feeds(n=4, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 3, 16, 16)).astype(np.float32)} for _ in range(n)]


def run_pass(proto_or_model, feeds_, **params):
    model = load(proto_or_model)
    ctx = PassContext(calibration=CalibrationData(feeds_, "test"))
    result = get("quantize")(**params).run(model, ctx)
    return model, result, ctx


def fused_ops(model) -> Counter:
    import onnxruntime as ort

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(model.to_proto().SerializeToString(), options, providers=["CPUExecutionProvider"])
        return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def test_quantize_places_qdq_that_ort_fuses_into_qlinearconv_and_absorbs_relu():
    model, result, _ = run_pass(conv_model(), feeds(), latency_check=False)
    assert result.changed and result.stats["relu_absorbed"] == 1
    ops = fused_ops(model)
    assert ops["QLinearConv"] == 2 and ops["Relu"] == 0 and ops["Conv"] == 0


def test_quantize_biases_are_int32_with_input_scale_times_weight_scale():
    model, _, _ = run_pass(conv_model(), feeds(), per_channel=True, latency_check=False)
    nodes = {n.name: n for n in model.graph.nodes}
    conv = next(n for n in model.graph.nodes if n.op == "Conv")
    x_dq, w_dq, b_dq = (t.inputs[0] for t in conv.inputs)
    assert b_dq.inputs[0].values.dtype == np.int32
    expected = x_dq.inputs[1].values * w_dq.inputs[1].values
    np.testing.assert_allclose(b_dq.inputs[1].values, expected, rtol=1e-6)
    assert w_dq.inputs[0].values.dtype == np.int8 and w_dq.attrs["axis"] == 0
    assert nodes  # the graph still has its nodes


def test_quantize_output_stays_close_to_float_on_ort():
    model, _, _ = run_pass(conv_model(), feeds(8), latency_check=False)
    ref, cand = make_session(conv_model()), make_session(model)
    x = feeds(1, seed=9)[0]
    a, b = ref.run(None, x)[0].ravel(), cand.run(None, x)[0].ravel()
    assert np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b) > 0.995


def test_per_channel_quantize_upgrades_an_old_opset_model_and_says_so():
    model, result, ctx = run_pass(conv_model(opset=9), feeds(), per_channel=True, latency_check=False)
    assert model.opset == 13 and result.stats["opset_upgraded_from"] == 9
    assert any("opset 9 to 13" in note for note in ctx.notes)
    proto = model.to_proto()
    onnx.checker.check_model(proto)
    make_session(proto)


def test_quantize_reports_no_change_on_a_model_without_conv_matmul_or_gemm():
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 13]>
    g (float[1,4] x) => (float[1,4] y) { s = Sigmoid (x)  y = Add (s, x) }""")
    model, result, _ = run_pass(proto, [{"x": np.ones((1, 4), np.float32)}])
    assert not result.changed
    assert [n.op for n in model.graph.nodes] == ["Sigmoid", "Add"]


def test_quantize_keeps_excluded_nodes_in_float():
    proto = conv_model()
    proto.graph.node[2].name = "last_conv"
    model, _, _ = run_pass(proto, feeds(), exclude=["last_conv"], latency_check=False)
    ops = fused_ops(model)
    assert ops["QLinearConv"] == 1 and ops["Conv"] == 1


def test_quantize_without_calibration_data_is_a_user_error():
    with pytest.raises(PassError, match="calibration"):
        get("quantize")().run(load(conv_model()), PassContext())


def test_latency_gate_reports_timings_and_require_speedup_fails_when_slower(monkeypatch):
    from onnxcomp.quant import latency

    _, result, _ = run_pass(conv_model(), feeds())
    assert result.stats["float_ms"] > 0 and result.stats["quantized_ms"] > 0
    # the gate's decision, with timings forced to "slower" (ORT still builds and runs both)
    real = latency.gate
    monkeypatch.setattr(latency, "gate", lambda *a, **k: {**real(*a, **k), "speedup": 0.5, "quantized_ms": 2.0,
                                                          "float_ms": 1.0})
    with pytest.raises(PassError, match="require_speedup"):
        run_pass(conv_model(), feeds(), require_speedup=True)
    _, result, ctx = run_pass(conv_model(), feeds())
    assert result.stats["slower_than_float"] and any("SLOWER" in n for n in ctx.notes)


def test_fallback_keeps_the_most_sensitive_nodes_in_float_until_the_error_holds():
    model, result, ctx = run_pass(conv_model(), feeds(6), max_error=1e-7, metric="mse", latency_check=False)
    kept = result.stats["kept_float"]
    assert kept and all("error_if_only_this_quantized" in k for k in kept)
    assert result.stats["error"] <= 1e-7 or len(kept) == 2
    assert any("kept" in note for note in ctx.notes)
    model2, result2, _ = run_pass(conv_model(), feeds(6), max_error=1.0, metric="mse", latency_check=False)
    assert result2.stats["kept_float"] == []


# ---- real models --------------------------------------------------------------------------
zoo = pytest.importorskip("models.zoo")


def entry(name):
    e = zoo.get(name)
    ok, why = e.available()
    if not ok:
        pytest.skip(why)
    return e


def test_per_channel_quantize_on_ultraface_loads_and_keeps_output_cosine_above_0_999():
    e = entry("ultraface")
    result = onnxcomp.optimize(e.path, "quantize(per_channel=true, latency_check=false)",
                               calibration=e.calibration(), check=False, gate=False)
    assert result.model.opset == 13
    metrics = e.evaluate(result.model.to_proto())
    assert metrics["cos_min"] >= 0.999


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantize_on_the_digits_cnn_loses_at_most_half_a_percent_accuracy(per_channel):
    e = entry("digits_cnn")
    base = e.evaluate(e.path)["test_acc"]
    result = onnxcomp.optimize(e.path, f"quantize(per_channel={str(per_channel).lower()}, latency_check=false)",
                               calibration=e.calibration(64), check=False, gate=False)
    assert e.evaluate(result.model.to_proto())["test_acc"] >= base - 0.005


LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
HEAVY_LIGHT = {"light_vgg19.onnx", "light_zfnet512.onnx", "light_bvlc_alexnet.onnx"}  # 100+ MB weights made at run time


def every_model():
    for name in ("digits_cnn", "mnist", "ultraface", "resnet18", "mobilenet_v2", "minilm"):
        yield pytest.param(("zoo", name), id=name)
    for path in sorted(LIGHT.glob("*.onnx")):
        marks = [pytest.mark.slow] if path.name in HEAVY_LIGHT else []
        yield pytest.param(("light", path), id=path.stem, marks=marks)


@pytest.mark.parametrize("which", list(every_model()))
def test_quantize_output_passes_the_checker_and_loads_on_ort(which):
    kind, what = which
    if kind == "zoo":
        e = entry(what)
        source, data = e.path, e.calibration(2)
    else:
        from onnxcomp.validate import generate_inputs

        source = str(what)
        data = generate_inputs(load(source).to_proto(), 1)
    result = onnxcomp.optimize(source, "quantize(per_channel=true, latency_check=false)", calibration=data, check=False, gate=False)
    proto = result.model.to_proto()
    onnx.checker.check_model(proto)
    make_session(proto)


EMBED_MATMUL = """
<ir_version: 8, opset_import: ["" : 13]>
g (int64[1,12] ids) => (float[1,12,16] y) {
  e = Gather <axis = 0> (table, ids)
  y = MatMul (e, w)
}
"""


def test_embedding_tables_become_int8_rows_with_a_scale_each_and_stay_accurate():
    rng = np.random.default_rng(3)
    proto = onnx.parser.parse_model(EMBED_MATMUL)
    # rows of very different magnitudes: one scale for the whole table would flatten the small ones
    table = (rng.normal(0, 1, (500, 64)) * rng.uniform(0.01, 3, (500, 1))).astype(np.float32)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(table, "table"),
                                    onnx.numpy_helper.from_array(rng.normal(0, 0.2, (64, 16)).astype(np.float32), "w")])
    data = [{"ids": rng.integers(0, 500, (1, 12)).astype(np.int64)} for _ in range(6)]
    model, result, _ = run_pass(proto, data, latency_check=False)
    assert result.changed and result.stats["embeddings_quantized"] == 1
    assert result.stats["embedding_bytes_after"] < 0.3 * result.stats["embedding_bytes_before"]
    out = model.to_proto()
    tables = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert any(v.dtype == np.int8 and v.shape == (500, 64) for v in tables.values())
    assert not any(v.dtype == np.float32 and v.shape == (500, 64) for v in tables.values())
    # the MatMul's activations are quantized per tensor in both runs (rows 300x apart in size
    # cost that quantization ~0.5 % cosine): the int8 table itself must add almost nothing to it
    float_table, _, _ = run_pass(proto, data, latency_check=False, embeddings=False)
    before, after, reference = make_session(proto), make_session(out), make_session(float_table.to_proto())
    cosine = lambda a, b: (a.ravel() @ b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b)  # noqa: E731
    for feed in data:
        ref, got, same_matmul = before.run(None, feed)[0], after.run(None, feed)[0], reference.run(None, feed)[0]
        assert cosine(same_matmul, got) > 0.9995
        assert cosine(ref, got) > cosine(ref, same_matmul) - 0.001


def test_embedding_rows_are_within_half_a_step_of_their_own_scale():
    rng = np.random.default_rng(5)
    proto = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (int64[1,12] ids) => (float[1,12,64] y) {
  y = Gather <axis = 0> (table, ids)
}
""")
    table = (rng.normal(0, 1, (300, 64)) * rng.uniform(0.001, 5, (300, 1))).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(table, "table"))
    data = [{"ids": np.arange(i * 12, i * 12 + 12, dtype=np.int64)[None]} for i in range(25)]
    model, result, _ = run_pass(proto, data, latency_check=False)
    assert result.stats["embeddings_quantized"] == 1
    session = make_session(model.to_proto())
    for feed in data:
        rows = table[feed["ids"][0]]
        step = np.abs(rows).max(axis=1, keepdims=True) / 127
        assert (np.abs(session.run(None, feed)[0][0] - rows) <= step / 2 * 1.0001).all()


def test_embedding_quantization_can_be_turned_off():
    rng = np.random.default_rng(4)
    proto = onnx.parser.parse_model(EMBED_MATMUL)
    proto.graph.initializer.extend([onnx.numpy_helper.from_array(rng.normal(0, 1, (500, 64)).astype(np.float32), "table"),
                                    onnx.numpy_helper.from_array(rng.normal(0, 0.2, (64, 16)).astype(np.float32), "w")])
    data = [{"ids": rng.integers(0, 500, (1, 12)).astype(np.int64)} for _ in range(4)]
    model, result, _ = run_pass(proto, data, latency_check=False, embeddings=False)
    assert "embeddings_quantized" not in result.stats
    assert any(t.name == "table" for t in model.to_proto().graph.initializer)


def test_per_tensor_below_keeps_one_scale_where_it_moves_nothing_and_packs_smaller_on_ultraface():
    from onnxcomp.io import container

    e = entry("ultraface")
    sizes, kept, cos = {}, {}, {}
    for bound in (0.0, 1e-4):
        spec = f"quantize(per_channel=true, per_tensor_below={bound}, latency_check=false)"
        result = onnxcomp.optimize(e.path, spec, calibration=e.calibration(), check=False, gate=False)
        proto = result.model.to_proto()
        sizes[bound] = len(container.pack_proto(proto, "auto")[0])
        kept[bound] = result.report.passes[-1].stats["per_tensor_kept"]
        cos[bound] = e.evaluate(proto)["face_prob_cos"]
    assert kept[0.0] == 0 and kept[1e-4] > 40
    assert sizes[1e-4] < 0.8 * sizes[0.0]
    assert cos[1e-4] >= cos[0.0] - 0.001


def test_a_weight_whose_channels_differ_widely_stays_per_channel():
    """w1's channels 4-7 are 1000x smaller and w2 reads them 1000x larger (as BatchNormalization
    folding can leave a net): one scale for w1 rounds those channels away, which moves the
    outputs, so the measured choice keeps w1 per channel."""
    proto = conv_model()
    arrays = {t.name: onnx.numpy_helper.to_array(t).copy() for t in proto.graph.initializer}
    arrays["w1"][4:] *= 1e-3
    arrays["b1"][4:] *= 1e-3
    arrays["w2"][:, 4:] *= 1e3
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v, k) for k, v in arrays.items())
    model, result, _ = run_pass(proto, feeds(8), per_channel=True, per_tensor_below=1e-4, latency_check=False)
    axes = {n.inputs[0].name: n.attrs.get("axis") for n in model.graph.nodes
            if n.op == "DequantizeLinear" and n.inputs[0].name.endswith("_quantized") and n.inputs[0].name[0] == "w"}
    assert axes["w1_quantized"] == 0, "w1 must keep a scale per channel"
    assert result.stats["per_tensor_kept"] <= 1
