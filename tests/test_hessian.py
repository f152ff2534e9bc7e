"""onnxcomp.hessian: im2col, streaming Hessians, SparseGPT and group OBS."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcomp import hessian as hs
from onnxcomp.model import Model
from onnxcomp.runtime import make_session, run

CONV_CASES = [
    {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 1},
    {"strides": [2, 2], "pads": [0, 1, 2, 1], "dilations": [1, 1], "group": 1},
    {"strides": [1, 2], "pads": [2, 2, 2, 2], "dilations": [2, 2], "group": 2},
    {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "group": 4},  # depthwise
]


def _conv_model(case, cin=4, cout=8, k=3):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, cin, 9, 10])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = np.random.default_rng(0).normal(size=(cout, cin // case["group"], k, k)).astype(np.float32)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], **case)
    graph = onnx.helper.make_graph([node], "g", [x], [y], [onnx.numpy_helper.from_array(w, "w")])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case", CONV_CASES, ids=["same", "strided-asym-pads", "dilated-grouped", "depthwise"])
def test_im2col_columns_times_weight_rows_reproduce_the_conv_output(case):
    proto = _conv_model(case)
    model = Model.from_proto(proto)
    layer = hs.find_weight_layers(model)[0]
    x = np.random.default_rng(1).normal(size=(1, 4, 9, 10)).astype(np.float32)
    y = run(make_session(proto), {"x": x})["y"]
    cols = hs.im2col(x, layer.nodes[0], (3, 3), layer.groups, max_rows=None)
    rows = layer.to_rows(np.asarray(layer.weight.values))
    out = np.concatenate([cols[g] @ rows[g].T for g in range(layer.groups)], axis=1)  # [positions, O]
    assert np.allclose(out, y[0].reshape(y.shape[1], -1).T, atol=1e-4)


def test_weight_rows_round_trip_for_every_op_layout():
    proto = _conv_model(CONV_CASES[2])
    layer = hs.find_weight_layers(Model.from_proto(proto))[0]
    w = np.asarray(layer.weight.values)
    assert np.array_equal(layer.from_rows(layer.to_rows(w)), w)


def test_streaming_hessian_equals_the_hessian_of_all_rows_at_once():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(n, 6)) for n in (3, 5000, 7)]
    acc = hs.HessianSum(flush_rows=100)
    for b in batches:
        acc.add([b])
    x = np.concatenate(batches)
    assert np.allclose(acc.value()[0], 2 * x.T @ x / len(x))


def _correlated_problem(rows=16, cols=64, n=2000, seed=0):
    """Inputs like real activations: a few latent factors plus noise (strongly correlated)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)) @ rng.normal(size=(16, cols)) + 0.3 * rng.normal(size=(n, cols))
    w = rng.normal(size=(rows, cols))
    return w, x, 2 * x.T @ x / n


def test_sparsegpt_zeroes_exactly_the_requested_count():
    w, _, h = _correlated_problem()
    out = hs.sparsegpt(w, h, prune_count=700, blocksize=16)
    assert np.count_nonzero(out == 0) == 700


def test_sparsegpt_output_error_is_lower_than_magnitude_pruning():
    w, x, h = _correlated_problem()
    k = w.size // 2
    obs = hs.sparsegpt(w, h, prune_count=k)
    mag = np.where(hs.magnitude_mask(w[None], k)[0], 0.0, w)
    err = lambda v: np.sum((x @ (v - w).T) ** 2)
    assert err(obs) < 0.5 * err(mag)


def test_sparsegpt_two_four_keeps_two_of_every_four_columns_per_row():
    w, _, h = _correlated_problem()
    out = hs.sparsegpt(w, h, n=2, m=4)
    nonzero = (out != 0).reshape(w.shape[0], -1, 4).sum(-1)
    assert nonzero.max() <= 2 and np.count_nonzero(out == 0) == w.size // 2


def test_group_obs_removal_is_the_least_squares_refit_of_the_kept_columns():
    w, x, h = _correlated_problem()
    remove = np.arange(0, 64, 3)
    out = hs.group_obs_remove(w, h, remove, percdamp=0.0)
    kept = np.setdiff1d(np.arange(64), remove)
    best, *_ = np.linalg.lstsq(x[:, kept], x @ w.T, rcond=None)
    assert np.all(out[:, remove] == 0)
    assert np.allclose(out[:, kept], best.T, atol=1e-6)


def test_bias_and_batchnorm_parameters_are_not_weight_layers():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,2,4,4] x) => (float[1,3,4,4] z) { y = Conv(x, w, b)  z = BatchNormalization(y, s, o, m, v) }"""
    proto = onnx.parser.parse_model(text)
    for name, shape in {"w": (3, 2, 1, 1), "b": (3,), "s": (3,), "o": (3,), "m": (3,), "v": (3,)}.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(shape, np.float32), name))
    model = Model.from_proto(proto)
    assert [layer.name for layer in hs.find_weight_layers(model)] == ["w"]
