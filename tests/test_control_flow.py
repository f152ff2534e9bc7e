"""Control flow through every lossy pass: weights inside If branches and Loop bodies (nested).

The model (models/vad.py) is silero-VAD shaped: a 0-d `sr`, a `state` whose batch
axis is 1, an If on the sample rate whose branches hold every weight, a nested If reading a
branch value, a Loop whose body reads a value from outside. Every test runs the real model on
ONNX Runtime on held-out feeds of both sample rates and compares with the original.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxcomp.calibration import CalibrationData, capture
from onnxcomp.context import PassContext
from onnxcomp.model import load
from onnxcomp.registry import get
from onnxcomp.runtime import make_session
from onnxcomp.subgraphs import scopes
from models.vad import SUBGRAPH_WEIGHTS, vad_feeds, vad_model

HELD_OUT = vad_feeds(16, seed=7)  # 8 at 16 kHz, 8 at 8 kHz; DC offsets of both signs (both inner branches)
BRANCHES = ("sample_rate_if/then_branch", "sample_rate_if/else_branch", "sample_rate_if/else_branch/lo_loop/body",
            "sample_rate_if/then_branch/hi_inner_if/then_branch", "sample_rate_if/then_branch/hi_inner_if/else_branch")


@pytest.fixture(scope="module")
def proto():
    return vad_model()


@pytest.fixture(scope="module")
def reference(proto):
    session = make_session(proto)
    return [session.run(None, f) for f in HELD_OUT]


def agreement(reference, model) -> tuple[float, float, float]:
    """(cosine of the centred speech probabilities over the held-out set, worst per-sample cosine
    of stateN, max abs error of the probability)."""
    proto = model.to_proto()
    onnx.checker.check_model(proto)
    session = make_session(proto)
    got = [session.run(None, f) for f in HELD_OUT]
    p_ref = np.array([r[0].item() for r in reference]) - 0.5
    p_got = np.array([g[0].item() for g in got]) - 0.5

    def cos(a, b):
        a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    state = min(cos(r[1], g[1]) for r, g in zip(reference, got))
    return cos(p_ref, p_got), state, float(np.abs(p_ref - p_got).max())


def run_pass(proto, name, feeds=None, **params):
    model = load(proto)
    ctx = PassContext(calibration=CalibrationData(feeds or vad_feeds(8), "test feeds"))
    result = get(name)(**params).run(model, ctx)
    return model, result, ctx


def test_the_test_model_takes_both_sample_rates_and_both_inner_branches(proto):
    rates = {int(f["sr"]) for f in HELD_OUT}
    signs = {bool(f["input"].sum() > 0) for f in HELD_OUT if int(f["sr"]) == 16000}
    assert rates == {16000, 8000} and signs == {True, False}
    paths = [s.path for s in scopes(load(proto).graph)]
    assert paths[0] == "" and set(paths[1:]) == set(BRANCHES)
    assert all(paths.index(p.rsplit("/", 2)[0]) < paths.index(p) for p in paths[1:] if p.count("/") > 1)


def test_capture_returns_branch_tensors_only_when_their_branch_ran_and_loop_tensors_stacked(proto):
    names = ["hi_c1", "hi_ya", "hi_mb", "lo_c1", "lb_m", "input"]
    for feed, values in capture(proto, names, HELD_OUT[:4]):
        fast = int(feed["sr"]) == 16000
        assert ("hi_c1" in values) == fast and ("lo_c1" in values) != fast
        if fast:
            assert ("hi_ya" in values) == bool(feed["input"].sum() > 0) != ("hi_mb" in values)
            assert values["hi_c1"].shape == (1, 16, 64)
        else:
            assert values["lb_m"].shape == (2, 1, 64)  # two Loop iterations, stacked
        assert values["input"].shape == (1, 512)


@pytest.mark.parametrize("saliency", ["magnitude", "hessian"])
def test_prune_zeroes_weights_in_every_branch_nested_if_and_loop_body(proto, reference, saliency):
    model, result, _ = run_pass(proto, "prune", sparsity=0.2, saliency=saliency)
    assert result.changed
    assert result.stats["subgraph_tensors_pruned"] == len(SUBGRAPH_WEIGHTS) == result.stats["pruned_tensors"]
    assert set(result.stats["per_subgraph"]) == set(BRANCHES)
    assert all(v["sparsity"] == pytest.approx(0.2, abs=0.02) for v in result.stats["per_subgraph"].values())
    prob, state, _ = agreement(reference, model)
    assert prob >= 0.99 and state >= 0.99, (prob, state)


def test_prune_says_unchanged_when_every_weight_is_excluded(proto):
    _, result, _ = run_pass(proto, "prune", sparsity=0.3, exclude=("*",))
    assert not result.changed and result.stats["pruned_tensors"] == 0


def test_codebook_clusters_weights_inside_subgraphs_and_ort_runs_it(proto, reference):
    model, result, _ = run_pass(proto, "codebook", bits=5, min_size=0)
    assert result.changed and result.stats["subgraph_layers"] == len(SUBGRAPH_WEIGHTS)
    assert set(result.stats["per_subgraph"]) == set(BRANCHES)
    gathers = {s.path for s in scopes(model.graph) if any(n.op == "Gather" and "codebook" in n.name
                                                          for n in s.graph.nodes)}
    assert gathers == set(BRANCHES)  # decoded in the graph that reads the weight
    prob, state, _ = agreement(reference, model)
    assert prob >= 0.99 and state >= 0.99, (prob, state)


@pytest.mark.parametrize("params", [{}, {"mode": "weight_only"}, {"mode": "weight_only", "bits": 4, "block_size": 16}])
def test_quantize_dynamic_reaches_matmuls_gemms_and_convs_inside_subgraphs(proto, reference, params):
    model, result, _ = run_pass(proto, "quantize_dynamic", min_size=0, **params)
    assert result.changed and result.stats["subgraph_nodes_quantized"] == len(SUBGRAPH_WEIGHTS)
    assert result.stats["conv_weights_quantized"] == 4
    assert result.stats["weight_bytes_after"] < result.stats["weight_bytes_before"] / 3.5
    prob, state, _ = agreement(reference, model)
    assert prob >= 0.99 and state >= 0.99, (prob, state)


def test_static_quantize_places_qdq_in_both_branches_when_calibrated_on_both_rates(proto, reference):
    model, result, _ = run_pass(proto, "quantize", latency_check=False, per_channel=True)
    assert result.changed
    assert result.stats["subgraph_weights_quantized"] == result.stats["weights_quantized"] == len(SUBGRAPH_WEIGHTS)
    assert result.stats["subgraphs_not_calibrated"] == []
    assert set(result.stats["per_subgraph"]) == set(BRANCHES)
    for scope in scopes(model.graph)[1:]:
        ops = [n.op for n in scope.graph.nodes]
        assert "DequantizeLinear" in ops, scope.path
    prob, state, _ = agreement(reference, model)
    assert prob >= 0.99 and state >= 0.99, (prob, state)


def test_static_quantize_keeps_a_branch_no_calibration_sample_ran_in_float(proto, reference):
    model, result, ctx = run_pass(proto, "quantize", feeds=vad_feeds(6, rates=(16000,)), latency_check=False)
    assert result.changed
    assert result.stats["subgraphs_not_calibrated"] == ["sample_rate_if/else_branch",
                                                        "sample_rate_if/else_branch/lo_loop/body"]
    slow = [s for s in scopes(model.graph) if s.path.startswith("sample_rate_if/else_branch")]
    assert all(n.op not in ("QuantizeLinear", "DequantizeLinear") for s in slow for n in s.graph.nodes)
    assert any("no calibration sample ran them" in note for note in ctx.notes)
    prob, state, _ = agreement(reference, model)
    assert prob >= 0.99 and state >= 0.99


def test_static_quantize_fallback_keeps_subgraph_nodes_in_float_until_the_error_holds(proto, reference):
    _, result, _ = run_pass(proto, "quantize", latency_check=False, max_error=1e-5)
    assert result.changed and result.stats["kept_float"]
    assert result.stats["error"] <= 1e-5 < result.stats["error_all_quantized"]
    assert result.stats["weights_quantized"] == len(SUBGRAPH_WEIGHTS) - len(result.stats["kept_float"])


def test_a_quantized_vad_model_packs_and_unpacks_bit_exactly_with_its_subgraph_initializers(proto):
    from onnxcomp.io.container import pack_proto, read_packed_proto

    model, _, _ = run_pass(proto, "quantize_dynamic", min_size=0)
    exported = model.to_proto()
    packed, _ = pack_proto(exported)
    assert read_packed_proto(packed).SerializeToString() == exported.SerializeToString()


# ---- prune_channels: channels read inside a (nested) subgraph stay whole --------------------
CHANNELS_THROUGH_IF = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[1,3,8,8] x, bool c) => (float[1,4,8,8] y) {
  h = Conv <pads = [1,1,1,1]> (x, w1)
  r = Relu (h)
  y = If (c) <
    then_branch = t () => (float[1,4,8,8] yt) {
      yt = If (c) <
        then_branch = tt () => (float[1,4,8,8] ytt) { ytt = Conv (r, w2) },
        else_branch = te () => (float[1,4,8,8] yte) { yte = Conv (r, w3) }
      >
    },
    else_branch = e () => (float[1,4,8,8] ye) { ye = Conv <pads = [1,1,1,1]> (x, w4) }
  >
}
"""


def test_prune_channels_never_shrinks_channels_read_inside_a_nested_subgraph():
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(CHANNELS_THROUGH_IF)
    for name, shape in (("w1", (8, 3, 3, 3)), ("w2", (4, 8, 1, 1)), ("w3", (4, 8, 1, 1)), ("w4", (4, 3, 3, 3))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name))
    model = load(proto)
    result = get("prune_channels")(sparsity=0.5).run(model, PassContext())
    assert not result.changed
    session = make_session(model.to_proto())
    feed = {"x": rng.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)}
    for c in (True, False):
        want = make_session(proto).run(None, {**feed, "c": np.array(c)})[0]
        np.testing.assert_allclose(session.run(None, {**feed, "c": np.array(c)})[0], want, rtol=1e-5, atol=1e-6)


# ---- Scan: a recurrent cell whose weight lives in the Scan body ---------------------------------
def scan_rnn():
    """h, ys = Scan(h0, xs) with s2 = Tanh(x @ wx + s @ wh) per step; wx, wh initializers of the body."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)
    weights = [onnx.numpy_helper.from_array(((rng.standard_normal((16, 4)) @ rng.standard_normal((4, 16)) / 4
                                              + rng.laplace(0, 0.3, (16, 16))) / 4).astype(np.float32), name)
               for name in ("wx", "wh")]
    vi = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wx"], ["xs2"], name="step_x"),
         helper.make_node("MatMul", ["s", "wh"], ["hs"], name="step_h"),
         helper.make_node("Add", ["xs2", "hs"], ["a"], name="step_add"),
         helper.make_node("Tanh", ["a"], ["s2"], name="step_tanh"),
         helper.make_node("Identity", ["s2"], ["y"], name="step_y")], "step",
        [vi("s", TensorProto.FLOAT, [1, 16]), vi("x", TensorProto.FLOAT, [1, 16])],
        [vi("s2", TensorProto.FLOAT, [1, 16]), vi("y", TensorProto.FLOAT, [1, 16])], weights)
    graph = helper.make_graph(
        [helper.make_node("Scan", ["h0", "xs"], ["h", "ys"], name="rnn", num_scan_inputs=1, body=body)], "g",
        [vi("h0", TensorProto.FLOAT, [1, 16]), vi("xs", TensorProto.FLOAT, [6, 1, 16])],
        [vi("h", TensorProto.FLOAT, [1, 16]), vi("ys", TensorProto.FLOAT, [6, 1, 16])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def scan_feeds(count, seed):
    rng = np.random.default_rng(seed)
    return [{"h0": np.tanh(rng.normal(0, 0.5, (1, 16))).astype(np.float32),
             "xs": np.sin(np.cumsum(rng.normal(0, 0.4, (6, 1, 16)), 0)).astype(np.float32)} for _ in range(count)]


def test_capture_stacks_a_scan_body_tensor_per_iteration():
    (_, values), = list(capture(scan_rnn(), ["xs2", "s"], scan_feeds(1, 0)))
    assert values["xs2"].shape == (6, 1, 16) and values["s"].shape == (6, 1, 16)


@pytest.mark.parametrize("name, params", [("quantize", {"latency_check": False}),
                                          ("quantize_dynamic", {"min_size": 0}), ("prune", {"sparsity": 0.2})])
def test_lossy_passes_reach_the_weights_of_a_scan_body(name, params):
    proto = scan_rnn()
    model = load(proto)
    result = get(name)(**params).run(model, PassContext(calibration=CalibrationData(scan_feeds(6, 1), "scan")))
    assert result.changed and set(result.stats["per_subgraph"]) == {"rnn/body"}
    held = scan_feeds(4, 2)
    want = [make_session(proto).run(None, f)[1] for f in held]
    got = [make_session(model.to_proto()).run(None, f)[1] for f in held]
    for w, g in zip(want, got):
        assert float(w.ravel() @ g.ravel() / np.linalg.norm(w) / np.linalg.norm(g)) >= 0.99


def test_an_if_inside_a_loop_body_is_not_routed_out_and_its_branch_stays_float():
    """The branch an If takes may change per iteration, so its tensors cannot be stacked: capture
    leaves them out, and quantize keeps that branch in float (and says so) instead of failing."""
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    w = onnx.numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.3, (8, 8)).astype(np.float32), "w_in_if")
    then = helper.make_graph([helper.make_node("MatMul", ["h", "w_in_if"], ["t_out"], name="t_mm")], "t", [],
                             [vi("t_out", TensorProto.FLOAT, [1, 8])], [w])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["e_out"], name="e_neg")], "e", [],
                              [vi("e_out", TensorProto.FLOAT, [1, 8])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond"], ["cond_out"], name="b_cond"),
         helper.make_node("Cast", ["i"], ["i_f"], name="b_cast", to=TensorProto.FLOAT),
         helper.make_node("Mod", ["i", "two"], ["odd"], name="b_mod"),
         helper.make_node("Cast", ["odd"], ["odd_b"], name="b_bool", to=TensorProto.BOOL),
         helper.make_node("If", ["odd_b"], ["h2"], name="b_if", then_branch=then, else_branch=other),
         helper.make_node("Tanh", ["h2"], ["h_out"], name="b_tanh")], "body",
        [vi("i", TensorProto.INT64, []), vi("cond", TensorProto.BOOL, []), vi("h", TensorProto.FLOAT, [1, 8])],
        [vi("cond_out", TensorProto.BOOL, []), vi("h_out", TensorProto.FLOAT, [1, 8])],
        [onnx.numpy_helper.from_array(np.array(2, np.int64), "two")])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)], "g",
        [vi("x", TensorProto.FLOAT, [1, 8])], [vi("y", TensorProto.FLOAT, [1, 8])],
        [onnx.numpy_helper.from_array(np.array(3, np.int64), "trips")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"x": np.random.default_rng(i).normal(0, 1, (1, 8)).astype(np.float32)} for i in range(3)]
    (_, values), = list(capture(proto, ["t_out", "h_out", "h"], feeds[:1]))
    assert "t_out" not in values and values["h_out"].shape == (3, 1, 8)
    model = load(proto)
    result = get("quantize")(latency_check=False).run(model, ctx := PassContext(calibration=CalibrationData(feeds, "f")))
    assert not result.changed and result.stats["subgraphs_not_calibrated"] == ["loop/body/b_if/then_branch"]
    assert any("If inside a loop body" in note for note in ctx.notes)
