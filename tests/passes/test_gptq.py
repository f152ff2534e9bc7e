"""gptq: error-compensated low-bit weights, their storage forms on ORT, and mixed precision."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxcomp import hessian as hs
from onnxcomp.context import PassContext
from onnxcomp.model import load
from onnxcomp.quant.gptq import factor, quantize
from onnxcomp.quant.mixed import Choice, choose
from onnxcomp.registry import get
from onnxcomp.runtime import make_session

MLP = """
<ir_version: 8, opset_import: ["" : 13]>
g (float[N,96] x, int64[N,5] ids) => (float[N,40] y, float[N,5,48] e) {
    h = MatMul(x, w1)
    r = Relu(h)
    y = Gemm <transB = 1> (r, w2, b)
    e = Gather(table, ids)
}
"""


def mlp():
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(MLP)
    weights = {"w1": rng.normal(0, 0.3, (96, 64)), "w2": rng.normal(0, 0.3, (40, 64)), "b": rng.normal(0, 0.3, 40),
               "table": rng.normal(0, 1.0, (500, 48))}
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items())
    return proto


def mlp_feeds(n=16):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(0, 1, (8, 96)).astype(np.float32), "ids": rng.integers(0, 500, (8, 5))} for _ in range(n)]


def run(proto, feed):
    return make_session(proto, "cpu").run(None, feed)


@pytest.fixture(scope="module")
def digits_layer():
    """The digits CNN's largest layer (a Gemm) with its Hessian from real calibration images."""
    from models import zoo

    entry = zoo.get("digits_cnn")
    model = load(str(entry.path))
    layer = max(hs.find_weight_layers(model, ("Gemm", "MatMul")), key=lambda x: x.size)
    h = hs.layer_hessians(model, [layer], entry.calibration(128))[layer.name][0]
    return layer.to_rows(np.asarray(layer.weight.values, np.float64))[0], h


def output_error(w, q, h):
    d = q - w
    return float(np.sum((d @ h) * d) / np.sum((w @ h) * w))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_has_less_output_error_than_rounding_on_a_real_layer(digits_layer, bits):
    w, h = digits_layer
    rtn = quantize(w, bits, 32).dequantized()
    gptq = quantize(w, bits, 32, h, percdamp=0.1)
    assert gptq.codes.max() < 2**bits and gptq.codes.dtype == np.uint8
    assert output_error(w, gptq.dequantized(), h) < 0.8 * output_error(w, rtn, h)


@pytest.mark.parametrize("bits", [2, 3])
def test_entropy_grid_has_less_output_error_at_the_same_coded_bytes_on_a_real_layer(digits_layer, bits):
    """The container entropy-codes the codes, so what a grid costs is its coded bytes: at the bytes
    the entropy grid spends, the min/max grids (interpolated between widths) err more."""
    from onnxcomp.quant.lowbit import coded_bytes, signed_codes

    w, h = digits_layer
    ours = quantize(w, bits, 0, h, percdamp=0.1, grid="entropy")
    signed = signed_codes(ours.codes, ours.zero)
    assert signed is not None and signed.dtype == np.int8 and ours.scale.shape == (w.shape[0], 1)
    our_bytes, our_error = coded_bytes([signed, ours.scale]), output_error(w, ours.dequantized(), h)
    curve = []
    for b in (2, 3, 4, 5):
        q = quantize(w, b, 128, h, percdamp=0.1)
        curve.append((coded_bytes([q.codes, q.zero, q.scale]), np.log(output_error(w, q.dequantized(), h))))
    xs, ys = zip(*curve)
    assert xs[0] < our_bytes < xs[-1]
    assert our_error < 0.75 * np.exp(np.interp(our_bytes, xs, ys))  # measured: 0.35x at 2 bits, 0.68x at 3


def test_entropy_grid_writes_signed_codes_and_a_scale_per_row_that_ort_runs():
    proto = mlp()
    model = load(proto)
    result = get("gptq")(bits=3, grid="entropy").run(model, PassContext(calibration=mlp_feeds()))
    assert result.stats["layers"] == 3 and all(v["form"] == "fold" for v in result.stats["per_layer"].values())
    out = model.to_proto()
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    assert {inits[f"{n}_codes"].dtype for n in ("w1", "w2", "table")} == {np.dtype(np.int8)}
    assert not any(name.endswith("_zero") for name in inits)
    assert not any(n.op_type == "Sub" for n in out.graph.node)
    assert inits["w1_scale"].size == 64 and inits["table_scale"].size == 500  # one step per output row
    feed = mlp_feeds(1)[0]
    for ref, got in zip(run(proto, feed), run(out, feed)):
        assert np.sum(ref * got) / np.linalg.norm(ref) / np.linalg.norm(got) > 0.98


def test_half_bit_widths_sit_between_whole_ones_on_the_entropy_grid_and_need_it():
    from onnxcomp.errors import SpecError

    model = load(mlp())
    step = get("gptq")(choices=(2, 2.5, 3), sparsities=(0, 0.5), target_ratio=10, grid="entropy")
    measured = step.run(model, PassContext(calibration=mlp_feeds())).stats["measured"]
    for name, table in measured.items():
        assert "2.5b/0" in table and "2.5b/0.5" not in table  # half widths: dense only
        assert table["2b/0"]["bytes"] < table["2.5b/0"]["bytes"] < table["3b/0"]["bytes"], name
        assert table["2b/0"]["error"] > table["2.5b/0"]["error"] > table["3b/0"]["error"], name
    with pytest.raises(SpecError, match="grid=entropy"):
        get("gptq")(choices=(2, 2.5), target_ratio=10)


def test_joint_pruning_hits_the_sparsity_keeps_zeros_and_compensates(digits_layer):
    w, h = digits_layer
    f = factor(h, True, 0.1)
    q = quantize(w, 4, 0, h, percdamp=0.1, sparsity=0.5, factored=f).dequantized()
    assert abs(np.mean(q == 0) - 0.5) < 0.02
    again = quantize(q, 4, 0, h, percdamp=0.1, factored=f).dequantized()
    assert np.all(again[q == 0] == 0), "weights already zero must stay exactly zero"
    naive = np.where(np.abs(w) < np.quantile(np.abs(w), 0.5), 0.0, w)
    assert output_error(w, q, h) < output_error(w, naive, h)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matmulnbits_and_the_folded_form_give_ort_the_same_weights(bits):
    """MatMulNBits (2/4/8 bits) and the constant-only Cast/Sub/Mul form hold the same quantized
    weights: ORT's outputs agree, and the Gather table, Gemm and MatMul all change form."""
    feeds = mlp_feeds()
    outs, forms = [], []
    for form in ("auto", "fold"):
        model = load(mlp())
        result = get("gptq")(bits=bits, group_size=32, form=form, min_size=0).run(model, PassContext(calibration=feeds))
        forms.append({name: v["form"] for name, v in result.stats["per_layer"].items()})
        proto = model.to_proto()
        onnx.checker.check_model(proto)
        assert not {"w1", "w2", "table"} & {t.name for t in proto.graph.initializer}
        outs.append(run(proto, feeds[0]))
    assert forms[1] == {"w1": "fold", "w2": "fold", "table": "fold"}
    assert forms[0]["w1"] == ("nbits" if bits in (2, 4, 8) else "fold") and forms[0]["table"] == "fold"
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    reference = run(mlp(), feeds[0])
    cos = float(np.sum(outs[0][0] * reference[0]) / np.linalg.norm(outs[0][0]) / np.linalg.norm(reference[0]))
    assert cos > {2: 0.8, 3: 0.95, 4: 0.99, 8: 0.9999}[bits]


def test_more_bits_less_error_on_every_output():
    feeds = mlp_feeds()
    reference = run(mlp(), feeds[0])
    errors = []
    for bits in (3, 5, 8):
        model = load(mlp())
        get("gptq")(bits=bits, min_size=0).run(model, PassContext(calibration=feeds))
        out = run(model.to_proto(), feeds[0])
        errors.append([float(np.abs(a - r).max()) for a, r in zip(out, reference)])
    for output in zip(*errors):
        assert output[0] > output[1] > output[2]


def brute_force(table, budget):
    names = list(table)
    best = None
    for combo in itertools.product(*(table[n] for n in names)):
        if sum(c.nbytes for c in combo) <= budget:
            error = sum(c.error for c in combo)
            best = error if best is None else min(best, error)
    return best


def test_knapsack_meets_the_budget_near_the_exact_optimum():
    rng = np.random.default_rng(4)
    for _ in range(20):
        table = {}
        for layer in range(5):
            size = int(rng.integers(100, 1000))
            table[f"l{layer}"] = [Choice(b, int(size * b / 8), float(rng.uniform(0.5, 2) * size * 4.0 ** -b))
                                  for b in (2, 3, 4, 6, 8)]
        full = sum(max(c.nbytes for c in cs) for cs in table.values())
        budget = int(full * rng.uniform(0.3, 0.7))
        picked = choose(table, budget)
        assert sum(c.nbytes for c in picked.values()) <= budget
        exact = brute_force(table, budget)
        assert sum(c.error for c in picked.values()) <= 4 * exact + 1e-12


def test_error_bound_gives_the_fewest_bytes_within_it():
    table = {"a": [Choice(8, 100, 0.0), Choice(4, 50, 0.01), Choice(2, 25, 0.2)],
             "b": [Choice(8, 100, 0.0), Choice(4, 50, 0.001), Choice(2, 25, 0.004)]}
    picked = choose(table, max_error=0.02)
    assert (picked["a"].bits, picked["b"].bits) == (4, 2)


def test_mixed_precision_on_the_digits_cnn_meets_its_byte_target_and_reports_every_layer():
    from models import zoo

    entry = zoo.get("digits_cnn")
    model = load(str(entry.path))
    before = entry.evaluate(str(entry.path))["test_acc"]
    step = get("gptq")(choices=(2, 3, 4, 6, 8), target_ratio=10)
    result = step.run(model, PassContext(calibration=entry.calibration(128)))
    stats = result.stats
    assert stats["weight_packed_bytes"] <= stats["weight_bytes_before"] / 10
    assert set(stats["bits_per_layer"]) == set(stats["measured"]) and len(stats["bits_per_layer"]) >= 3
    for name, bits in stats["bits_per_layer"].items():
        assert bits in (2, 3, 4, 6, 8) and len(stats["measured"][name]) == 5
    assert entry.evaluate(model.to_proto())["test_acc"] >= before - 0.01
    assert str(step.backoff()) == "gptq(choices=[2, 3, 4, 6, 8], target_ratio=8.8)"


def test_a_far_miss_backs_off_by_the_bits_it_needs():
    step = get("gptq")(choices=(2, 3, 4), target_ratio=16)  # ~2 bits a weight
    assert step.backoff().config.target_ratio == 14.08  # the 12 % step
    assert step.backoff(16.0).config.target_ratio == 8.0  # 16x the allowed error: log4(16) = 2 more bits
    assert step.backoff(1.2).config.target_ratio == 14.08  # never less than the 12 % step


def test_choices_without_a_target_is_a_spec_error():
    from onnxcomp.errors import SpecError

    with pytest.raises(SpecError, match="target_ratio or max_error"):
        get("gptq")(choices=(2, 4))


def test_float16_weights_are_left_alone():
    proto = onnx.parser.parse_model("""
<ir_version: 8, opset_import: ["" : 13]>
g (float16[N,64] x) => (float16[N,32] y) { y = MatMul(x, w) }
""")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(
        np.random.default_rng(0).normal(0, 1, (64, 32)).astype(np.float16), "w"))
    model = load(proto)
    feeds = [{"x": np.random.default_rng(1).normal(0, 1, (4, 64)).astype(np.float16)} for _ in range(4)]
    result = get("gptq")(bits=4, min_size=0).run(model, PassContext(calibration=feeds))
    assert not result.changed and result.stats["layers"] == 0


@pytest.mark.parametrize("grid", ["minmax", "entropy"])
def test_rows_of_denormal_weights_quantize_without_dividing_by_zero(grid):
    # PP-OCR's recognizer has rows of ~1e-44 weights: their step underflowed float32 to 0
    import warnings

    w = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    w[1], w[2] = 1e-44, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a divide-by-zero RuntimeWarning fails the test
        q = quantize(w, 3, 0, np.eye(64), grid=grid)
    restored = q.dequantized()
    assert np.isfinite(restored).all() and np.abs(restored[1:]).max() < 1e-30
    assert np.abs(restored[0] - w[0]).max() < 0.5
