"""prune_channels: structured removal of Conv/Gemm output channels, consumers rewritten."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxcomp.passes.prune_channels import PruneChannels

import onnxcomp
from onnxcomp.context import PassContext
from onnxcomp.errors import SpecError
from onnxcomp.model import Model
from onnxcomp.runtime import make_session, run


def _model(body: str, shapes: dict, x="float[1,4,6,6] x", seed=0) -> Model:
    text = f'<ir_version: 8, opset_import: ["" : 17]>\ng ({x}) => (float[d0,d1,d2,d3] out) {{ {body} }}'
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name))
    onnx.checker.check_model(proto)
    return Model.from_proto(proto)


def _run(model_or_proto, feed):
    proto = model_or_proto.to_proto() if isinstance(model_or_proto, Model) else model_or_proto
    onnx.checker.check_model(proto, full_check=True)
    return run(make_session(proto), feed)["out"]


def _w(model: Model, name: str) -> np.ndarray:
    node = next(n for n in model.graph.nodes if n.name == name)
    return np.asarray(node.inputs[1].values)


X = {"x": np.random.default_rng(5).normal(size=(1, 4, 6, 6)).astype(np.float32)}

RESIDUAL = """
  a = Conv <pads = [1, 1, 1, 1]> (x, wa)
  ar = Relu(a)
  b = Conv <pads = [1, 1, 1, 1]> (ar, wb)
  s = Add(b, ar)
  sr = Relu(s)
  out = Conv(sr, wc)
"""


def _named(model: Model) -> Model:
    for node in model.graph.nodes:
        node.name = node.outputs[0].name
    return model


def test_a_residual_add_prunes_both_branches_with_the_same_channels():
    original = _named(_model(RESIDUAL, {"wa": (8, 4, 3, 3), "wb": (8, 8, 3, 3), "wc": (3, 8, 1, 1)}))
    wa, wb = _w(original, "a"), _w(original, "b")
    model = original.copy()
    result = PruneChannels(sparsity=0.5).run(model, PassContext())
    assert result.changed and result.stats["channels_removed"] == 4
    pa, pb, pc = _w(model, "a"), _w(model, "b"), _w(model, "out")
    assert pa.shape[0] == pb.shape[0] == pc.shape[1] == 4 and pc.shape[0] == 3
    kept = [int(np.argmin([np.abs(row - r).sum() for r in wa])) for row in pa]
    gone = np.setdiff1d(np.arange(8), kept)
    # same outputs as the original with those channels silenced in both branches
    ref = original.copy()
    for name, w in (("a", wa), ("b", wb)):
        silenced = w.copy()
        silenced[gone] = 0
        next(n for n in ref.graph.nodes if n.name == name).inputs[1].values = silenced
    assert np.allclose(_run(model, X), _run(ref, X), atol=1e-4)
    assert np.array_equal(pb, wb[np.ix_(kept, kept)])


def test_channels_reaching_a_graph_output_are_never_pruned():
    model = _named(_model("out = Conv(x, wa)", {"wa": (8, 4, 1, 1)}))
    result = PruneChannels(sparsity=0.5).run(model, PassContext())
    assert result.changed is False and _w(model, "out").shape == (8, 4, 1, 1)


def test_channels_reaching_an_unknown_op_are_left_alone():
    body = "a = Conv(x, wa)  t = Transpose <perm = [0, 2, 3, 1]> (a)  out = MatMul(t, wm)"
    model = _named(_model(body, {"wa": (8, 4, 1, 1), "wm": (8, 2)}))
    assert PruneChannels(sparsity=0.5).run(model, PassContext()).changed is False


def test_concat_and_batchnorm_and_bias_follow_the_kept_channels():
    body = """
      a = Conv(x, wa, ba)
      an = BatchNormalization(a, s, o, m, v)
      b = Conv(x, wb)
      c = Concat <axis = 1> (an, b)
      out = Conv(c, wc)
    """
    shapes = {"wa": (4, 4, 1, 1), "ba": (4,), "s": (4,), "o": (4,), "m": (4,), "v": (4,), "wb": (6, 4, 1, 1), "wc": (5, 10, 1, 1)}
    model = _named(_model(body, shapes))
    proto = model.to_proto()
    for init in proto.graph.initializer:  # a valid variance
        if init.name == "v":
            init.CopyFrom(onnx.numpy_helper.from_array(np.ones(4, np.float32), "v"))
    model = _named(Model.from_proto(proto))
    PruneChannels(sparsity=0.5).run(model, PassContext())
    assert _w(model, "a").shape[0] == 2 and _w(model, "b").shape[0] == 3
    assert _w(model, "out").shape[1] == 5
    bn = next(n for n in model.graph.nodes if n.op == "BatchNormalization")
    assert all(np.asarray(t.values).shape == (2,) for t in bn.inputs[1:])
    assert _run(model, X).shape == (1, 5, 6, 6)


def test_a_depthwise_conv_is_sliced_along_with_its_input_channels():
    body = """
      a = Conv(x, wa)
      d = Conv <group = 8, pads = [1, 1, 1, 1]> (a, wd, bd)
      out = Conv(d, wc)
    """
    model = _named(_model(body, {"wa": (8, 4, 1, 1), "wd": (8, 1, 3, 3), "bd": (8,), "wc": (3, 8, 1, 1)}))
    PruneChannels(sparsity=0.5).run(model, PassContext())
    depthwise = next(n for n in model.graph.nodes if n.attrs.get("group", 1) > 1)
    assert depthwise.attrs["group"] == 4 and tuple(depthwise.inputs[1].shape) == (4, 1, 3, 3)
    assert _w(model, "out").shape[1] == 4
    assert _run(model, X).shape == (1, 3, 6, 6)


def test_bad_sparsity_fails_at_parse_time_with_one_line():
    with pytest.raises(SpecError) as info:
        onnxcomp.Pipeline.parse("prune_channels(sparsity=1.5)")
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def digits():
    from models import zoo

    return zoo.get("digits_cnn")


def test_digits_cnn_at_half_really_has_half_the_conv_channels_and_fewer_flops(digits):
    result = onnxcomp.optimize(digits.path, "prune_channels(sparsity=0.5)", check=False, gate=False)
    stats = result.report.passes[0].stats
    convs = [tuple(n.inputs[1].shape) for n in result.model.graph.nodes if n.op == "Conv"]
    assert convs == [(8, 1, 3, 3), (16, 8, 3, 3)]
    assert stats["flops_after"] < 0.5 * stats["flops_before"] and stats["params_after"] < stats["params_before"]
    last = [n for n in result.model.graph.nodes if n.op == "Gemm"][-1]
    assert np.asarray(last.inputs[1].values).shape[0] == 10  # the logits keep their 10 classes
    assert digits.evaluate(result.model.to_proto())["test_acc"] > 0.5


def test_hessian_criterion_keeps_the_digits_cnn_more_accurate_than_l1(digits):
    acc = {}
    for criterion in ("l1", "hessian"):
        result = onnxcomp.optimize(digits.path, f"prune_channels(sparsity=0.5, criterion={criterion})",
                                   calibration=digits.calibration(64), check=False, gate=False)
        acc[criterion] = digits.evaluate(result.model.to_proto())["test_acc"]
    assert acc["hessian"] > acc["l1"] + 0.05, acc


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.75])
def test_resnet18_stays_valid_and_runs_after_channel_pruning(sparsity):
    from models import zoo

    entry = zoo.get("resnet18", image_size=64)
    result = onnxcomp.optimize(entry.path, f"prune_channels(sparsity={sparsity})", check=False, gate=False)
    proto = result.model.to_proto()
    onnx.checker.check_model(proto, full_check=True)
    out = run(make_session(proto), entry.evaluation(1)[0])
    assert all(np.all(np.isfinite(v)) for v in out.values())
    before = [n.inputs[1].shape[0] for n in onnxcomp.load(entry.path).graph.nodes if n.op == "Conv"]
    after = [n.inputs[1].shape[0] for n in result.model.graph.nodes if n.op == "Conv"]
    assert sum(after) <= (1 - sparsity + 0.02) * sum(before)
