"""fp16: the model runs in float16 on ORT's CPU EP with float32 inputs and outputs, normalizations
kept in float32, schema-fixed float32 inputs respected, and the default gate judging the result."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import onnxcomp
from onnxcomp.model import Model
from onnxcomp.runtime import make_session, run


def _fp16_stats(result):
    return next(p.stats for p in result.report.passes if "nodes_fp16" in p.stats)


def test_ultraface_runs_in_float16_on_the_cpu_ep_under_the_default_gate(ultraface_path):
    from models.real import _ultraface_feeds

    feeds = _ultraface_feeds()[0][:8]
    source = onnx.load(str(ultraface_path))
    result = onnxcomp.optimize(source, "fold, cleanup, fuse, fp16", calibration=feeds)
    proto = result.model.to_proto()
    assert result.report.gate["passed"] and _fp16_stats(result)["nodes_fp16"] > 100
    # the interface is unchanged: float32 inputs and outputs under the same names
    assert [(i.name, i.type.tensor_type.elem_type) for i in proto.graph.input] == \
        [(i.name, TensorProto.FLOAT) for i in source.graph.input]
    assert [(o.name, o.type.tensor_type.elem_type) for o in proto.graph.output] == \
        [(o.name, TensorProto.FLOAT) for o in source.graph.output]
    weights = {t.data_type for t in proto.graph.initializer if len(t.dims) > 1}
    assert weights == {TensorProto.FLOAT16}
    assert proto.ByteSize() < 0.55 * source.ByteSize()
    got = run(make_session(proto), feeds[0])
    want = run(make_session(source), feeds[0])
    assert all(np.allclose(got[k], want[k], atol=2e-2) for k in want)


def test_minilm_keeps_layernorm_and_softmax_in_float32_and_clips_the_mask_constant():
    from models import zoo

    entry = zoo.get("minilm")
    ok, why = entry.available()
    if not ok:
        pytest.skip(why)
    result = onnxcomp.optimize(onnx.load(str(entry.path)), "fold, cleanup, fuse, fp16", calibration=entry.calibration(8))
    stats = _fp16_stats(result)
    assert result.report.gate["passed"] and stats["values_clipped"] >= 1  # the -3.4e38 attention mask
    kept = {n.op for n in result.model.graph.nodes if n.op in ("LayerNormalization", "Softmax")}
    proto = result.model.to_proto()
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*inferred.value_info, *inferred.output)}
    for node in proto.graph.node:
        if node.op_type in kept:
            assert types.get(node.output[0]) == TensorProto.FLOAT, node.op_type


def test_an_input_the_schema_fixes_to_float32_stays_float32():
    """Resize's scales are tensor(float) only: the node runs in float16, its scales do not."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Resize", ["r", "", "scales"], ["y"], mode="nearest")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 8, 8])],
                              [helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    result = onnxcomp.optimize(proto, "fp16", gate=False)
    out = result.model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    resize = next(n for n in out.graph.node if n.op_type == "Resize")
    scales = next(t for t in out.graph.initializer if t.name == resize.input[2])
    assert scales.data_type == TensorProto.FLOAT
    x = np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run(make_session(out), {"x": x})["y"], run(make_session(proto), {"x": x})["y"],
                               atol=1e-2)


def test_a_model_with_subgraphs_is_left_as_it_is_and_says_so():
    from models.vad import vad_model

    model = Model.from_proto(vad_model())
    result = onnxcomp.optimize(model, "fp16", gate=False)
    stats = _fp16_stats(result) if any("nodes_fp16" in p.stats for p in result.report.passes) else \
        result.report.passes[-1].stats
    assert not result.report.passes[-1].changed and "subgraphs" in stats.get("skipped", "")


@pytest.mark.cuda
def test_the_float16_ultraface_agrees_on_the_cuda_ep_too(ultraface_path):
    """Where ORT has its CUDA EP (skipped elsewhere): the gate holds the fp16 model on CPU and CUDA."""
    from models.real import _ultraface_feeds

    feeds = _ultraface_feeds()[0][:8]
    result = onnxcomp.optimize(onnx.load(str(ultraface_path)), "fold, cleanup, fuse, fp16", calibration=feeds,
                               providers="cpu,cuda")
    assert result.report.gate["passed"] and result.report.validation["passed"]
    assert any(p["provider"] == "cuda" and not p.get("skipped") for p in result.report.validation["providers"])


def test_a_graph_output_also_read_inside_the_graph_stays_float32_and_its_readers_are_served():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),       # h: a graph output, read again below
             helper.make_node("Relu", ["h"], ["r"]),             # float16 reader
             helper.make_node("Softmax", ["h"], ["s"], axis=-1)]  # float32 reader (kept op)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 8]) for n in ("h", "r", "s")],
                              [onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8))
                                                            .astype(np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    out = onnxcomp.optimize(proto, "fp16", gate=False).model.to_proto()
    onnx.checker.check_model(out, full_check=True)
    assert [(o.name, o.type.tensor_type.elem_type) for o in out.graph.output] == \
        [(n, TensorProto.FLOAT) for n in ("h", "r", "s")]
    casts = [n for n in out.graph.node if n.op_type == "Cast"]
    assert len(casts) == 4  # x in, h out, h for Softmax, r out
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    got, want = run(make_session(out), {"x": x}), run(make_session(proto), {"x": x})
    assert all(np.allclose(got[k], want[k], atol=2e-2) for k in want)
