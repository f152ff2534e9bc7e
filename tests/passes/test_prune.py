"""prune: magnitude / global / N:M / Hessian (SparseGPT) pruning of weight initializers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxcomp.passes.prune import Prune

import onnxcomp
from onnxcomp.context import PassContext
from onnxcomp.errors import PassError, SpecError
from onnxcomp.model import Model
from onnxcomp.runtime import make_session, run

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,4,8,8] x) => (float[2,16] out) {
  c = Conv <pads = [1, 1, 1, 1]> (x, wc, bc)
  r = Relu(c)
  p = GlobalAveragePool(r)
  f = Flatten(p)
  g1 = Gemm <transB = 1> (f, wg, bg)
  m1 = MatMul(g1, ws)
  m2 = MatMul(m1, ws)
  t = MatMul(m2, wx)
  s = ReduceMean <keepdims = 0> (wx)
  out = Add(t, s)
}"""
SHAPES = {"wc": (8, 4, 3, 3), "bc": (8,), "wg": (16, 8), "bg": (16,), "ws": (16, 16), "wx": (16, 16)}


def _model(text=TEXT, shapes=SHAPES, seed=0, scale=None) -> Model:
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        values = rng.normal(size=shape).astype(np.float32) * (scale or {}).get(name, 1.0)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(values, name))
    onnx.checker.check_model(proto)
    return Model.from_proto(proto)


def _weights(model: Model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.values) for k, v in model.initializers().items()}


def _feeds(n=8, shape=(2, 4, 8, 8), name="x"):
    rng = np.random.default_rng(1)
    return [{name: rng.normal(size=shape).astype(np.float32)} for _ in range(n)]


def _zero_fraction(a: np.ndarray) -> float:
    return float(np.mean(a == 0))


def test_layer_scope_prunes_each_weight_to_the_exact_sparsity_and_reports_the_measured_one():
    model = _model()
    result = Prune(sparsity=0.5).run(model, PassContext())
    weights = _weights(model)
    assert set(result.stats["per_tensor"]) == {"wc", "wg", "ws"}
    for name, reported in result.stats["per_tensor"].items():
        assert reported == _zero_fraction(weights[name]) == 0.5
    zeros = sum(np.count_nonzero(weights[n] == 0) for n in ("wc", "wg", "ws"))
    assert result.stats["sparsity"] == zeros / sum(weights[n].size for n in ("wc", "wg", "ws"))


def test_biases_and_initializers_feeding_other_ops_are_never_pruned():
    model = _model()
    before = _weights(model)
    Prune(sparsity=0.9).run(model, PassContext())
    after = _weights(model)
    for name in ("bc", "bg", "wx"):
        assert np.array_equal(before[name], after[name])


def test_an_initializer_shared_by_two_matmuls_is_pruned_once():
    model = _model()
    result = Prune(sparsity=0.5, saliency="hessian").run(model, PassContext(calibration=onnxcomp.CalibrationData(_feeds(), "t")))
    assert list(result.stats["per_tensor"]).count("ws") == 1
    assert _zero_fraction(_weights(model)["ws"]) == 0.5


def test_zero_sparsity_changes_nothing_and_says_so():
    model = _model()
    before = _weights(model)
    result = Prune(sparsity=0.0).run(model, PassContext())
    assert result.changed is False
    assert all(np.array_equal(before[k], v) for k, v in _weights(model).items())
    assert Prune(sparsity=0.3).run(model, PassContext()).changed is True


def test_include_and_exclude_patterns_choose_the_tensors():
    model = _model()
    result = Prune(sparsity=0.5, include=("w[cg]",), exclude=("wg",)).run(model, PassContext())
    assert set(result.stats["per_tensor"]) == {"wc"}
    assert _zero_fraction(_weights(model)["wg"]) == 0.0


def test_global_scope_reaches_the_overall_sparsity_without_emptying_a_small_weight_layer():
    model = _model(scale={"wg": 1e-3})
    result = Prune(sparsity=0.6, scope="global", max_layer_sparsity=0.9).run(model, PassContext())
    weights = _weights(model)
    assert result.stats["sparsity"] == pytest.approx(0.6, abs=1 / result.stats["params"])
    assert 0.85 <= _zero_fraction(weights["wg"]) <= 0.9
    assert np.count_nonzero(weights["wg"]) > 0


NM_CASES = {
    # op text, weight shape, how to lay the weight out so input channels run along the last axis
    "conv": ("y = Conv <pads = [1, 1, 1, 1]> (x, w)", "float[2,8,5,5] x", (6, 8, 3, 3), lambda w: w.transpose(0, 2, 3, 1)),
    "gemm_transB": ("y = Gemm <transB = 1> (x, w)", "float[3,8] x", (6, 8), lambda w: w),
    "gemm": ("y = Gemm (x, w)", "float[3,8] x", (8, 6), lambda w: w.T),
    "matmul": ("y = MatMul(x, w)", "float[2,3,8] x", (8, 6), lambda w: w.T),
}


@pytest.mark.parametrize("saliency", ["magnitude", "hessian"])
@pytest.mark.parametrize("case", list(NM_CASES))
def test_two_four_pattern_keeps_two_of_every_four_input_channels(case, saliency):
    body, x, shape, layout = NM_CASES[case]
    text = f'<ir_version: 8, opset_import: ["" : 17]>\ng ({x}) => (float y) {{ {body} }}'
    model = _model(text, {"w": shape})
    x_shape = tuple(int(d) for d in x.split("[")[1].split("]")[0].split(","))
    ctx = PassContext(calibration=onnxcomp.CalibrationData(_feeds(4, x_shape), "t"))
    result = Prune(pattern="2:4", saliency=saliency).run(model, ctx)
    w = layout(_weights(model)["w"])
    groups = (w != 0).reshape(-1, 4).sum(-1)
    assert groups.max() <= 2 and result.stats["sparsity"] == _zero_fraction(w) == 0.5


def test_two_four_pattern_skips_weights_whose_input_channels_do_not_tile():
    text = '<ir_version: 8, opset_import: ["" : 17]>\ng (float[2,3,5,5] x) => (float y) { y = Conv(x, w) }'
    model = _model(text, {"w": (4, 3, 3, 3)})
    result = Prune(pattern="2:4").run(model, PassContext())
    assert result.changed is False and "w" in result.stats["skipped"]


@pytest.mark.parametrize("spec, needle", [
    ("prune(sparsity=1.5)", "out of range"),
    ("prune(pattern=3:2)", "N:M"),
    ("prune(pattern=two-four)", "N:M"),
    ("prune(pattern=2:4, sparsity=0.9)", "fixes the sparsity"),
    ("prune(scope=wide)", "not allowed"),
    ("prune(ops=[Conv, Relu])", "Relu"),
])
def test_bad_parameters_fail_at_parse_time_with_one_line(spec, needle):
    with pytest.raises(SpecError) as info:
        onnxcomp.Pipeline.parse(spec)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_hessian_saliency_without_calibration_is_a_one_line_error():
    with pytest.raises(PassError) as info:
        Prune(saliency="hessian").run(_model(), PassContext())
    assert "calibration" in str(info.value)


def test_pruned_model_passes_the_checker_and_runs_on_ort():
    model = _model()
    Prune(sparsity=0.7, scope="global").run(model, PassContext())
    proto = model.to_proto()
    onnx.checker.check_model(proto)
    out = run(make_session(proto), _feeds(1)[0])["out"]
    assert out.shape == (2, 16) and np.all(np.isfinite(out))


@pytest.fixture(scope="module")
def digits():
    from models import zoo

    return zoo.get("digits_cnn")


def test_hessian_pruning_beats_magnitude_on_the_digits_cnn_at_70_percent(digits):
    cal = digits.calibration(128)
    acc = {}
    for saliency in ("magnitude", "hessian"):
        result = onnxcomp.optimize(digits.path, f"prune(sparsity=0.7, saliency={saliency})", calibration=cal, check=False, gate=False)
        assert result.report.passes[0].stats["sparsity"] == pytest.approx(0.7, abs=1e-3)
        acc[saliency] = digits.evaluate(result.model.to_proto())["test_acc"]
    assert acc["hessian"] > acc["magnitude"] + 0.03, acc
