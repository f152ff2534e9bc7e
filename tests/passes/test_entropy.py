"""The entropy pass: marks the model for packed output, reports the packed size, edits no graph."""

from __future__ import annotations

import onnx

import onnxcomp
from onnxcomp.context import PassContext
from onnxcomp.registry import get


def test_entropy_pass_marks_the_model_and_save_writes_the_packed_file(mnist_path, tmp_path):
    result = onnxcomp.optimize(mnist_path, "entropy(coder=rans)", check=False)
    stats = result.report.passes[-1].stats
    assert result.model.packing["coder"] == "rans"
    onnxcomp.save(result.model, tmp_path / "m.onnxc")
    assert (tmp_path / "m.onnxc").stat().st_size == stats["packed_bytes"] < stats["plain_bytes"]
    back = onnx.load(mnist_path)
    packed = onnxcomp.io.container.read_packed_proto(tmp_path / "m.onnxc")
    assert {t.name: t.raw_data for t in packed.graph.initializer} == \
        {t.name: t.raw_data for t in onnxcomp.load(mnist_path).to_proto().graph.initializer}
    assert len(packed.graph.node) == len(back.graph.node)


def test_entropy_pass_leaves_the_graph_unchanged(mnist_path):
    model = onnxcomp.load(mnist_path)
    before = model.to_proto().SerializeToString()
    get("entropy")(coder="zstd", estimate=False).run(model, PassContext())
    assert model.to_proto().SerializeToString() == before


def test_entropy_pass_reports_changed_only_when_the_coder_mark_changes(mnist_path):
    model = onnxcomp.load(mnist_path)
    ctx = PassContext()
    assert get("entropy")(estimate=False).run(model, ctx).changed
    assert not get("entropy")(estimate=False).run(model, ctx).changed
    assert get("entropy")(coder="huffman", estimate=False).run(model, ctx).changed


def test_entropy_pass_spec_round_trips():
    pipeline = onnxcomp.Pipeline.parse("entropy(coder=rans)")
    assert str(pipeline) == "entropy(coder=rans)"
    assert onnxcomp.Pipeline.parse(str(pipeline)) == pipeline
