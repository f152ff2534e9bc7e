"""Loading and saving: every IR/opset we meet, external data, atomic writes, refusals."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp import InputError, OutputError
from onnxcomp.model import load_proto

from .helpers import point_external_data


LINEAR = """
<ir_version: 8, opset_import: ["" : 17]>
linear (float[1, 64] x) => (float[1, 32] y) {
    y = MatMul(x, w)
}
"""


def _linear_with_weight(seed: int = 0) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(LINEAR)  # the weight is added below as an initializer
    w = np.random.default_rng(seed).standard_normal((64, 32)).astype(np.float32)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(w, "w"))
    return proto


def test_ir3_mnist_round_trips_with_initializers_listed_as_inputs(mnist_path, tmp_path):
    out = onnxcomp.save(onnxcomp.load(mnist_path), tmp_path / "m.onnx")
    proto = onnx.load(out)
    assert proto.ir_version == 3 and proto.opset_import[0].version == 8
    inputs = {i.name for i in proto.graph.input}
    assert all(init.name in inputs for init in proto.graph.initializer)
    onnx.checker.check_model(proto)
    assert onnxcomp.validate(mnist_path, out, tolerance=onnxcomp.Tolerance.exact()).passed


def test_an_output_keeps_its_declared_shape_when_value_info_repeats_it_without_one():
    # ddddocr's value_info lists its output again, rankless; the output's own [1, seqlen] must stay
    proto = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[1, seqlen, 4] x) => (float[1, seqlen] y) {
        y = ReduceSum<keepdims = 0>(x, axes)
    }""")
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array([2], np.int64), "axes"))
    proto.graph.value_info.append(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None))
    out = onnxcomp.optimize(proto, "fold, cleanup, fuse", check=False).model.to_proto()
    dims = [d.dim_value or d.dim_param for d in out.graph.output[0].type.tensor_type.shape.dim]
    assert dims == [1, "seqlen"]
    onnx.checker.check_model(out)


def test_metadata_and_opset_imports_survive_a_round_trip(ultraface_path, tmp_path):
    original = onnx.load(ultraface_path)
    original.metadata_props.add(key="author", value="tests")
    saved = onnx.load(onnxcomp.save(onnxcomp.load(original), tmp_path / "u.onnx"))
    assert {(o.domain, o.version) for o in saved.opset_import} == {(o.domain, o.version) for o in original.opset_import}
    assert {p.key: p.value for p in saved.metadata_props} == {"author": "tests"}
    assert saved.producer_name == original.producer_name


def test_external_data_is_written_beside_the_model_and_read_back(tmp_path):
    proto = _linear_with_weight()
    out = onnxcomp.save(onnxcomp.load(proto), tmp_path / "ext.onnx", external_data=True)
    assert (tmp_path / "ext.onnx.data").stat().st_size == 64 * 32 * 4
    assert os.path.getsize(out) < 2000
    loaded = onnxcomp.load(out)
    weight = loaded.initializers()["w"].values
    np.testing.assert_array_equal(weight, onnx.numpy_helper.to_array(proto.graph.initializer[0]))


def test_saving_leaves_no_temporary_files_behind(tmp_path):
    onnxcomp.save(onnxcomp.load(_linear_with_weight()), tmp_path / "a.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "a.onnx.data"]


def test_saving_over_the_input_is_refused_unless_forced(tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(_linear_with_weight(), path)
    before = path.read_bytes()
    model = onnxcomp.load(path)
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        onnxcomp.save(model, path, source=path)
    assert path.read_bytes() == before
    onnxcomp.save(model, path, source=path, force=True)
    assert onnx.load(path).graph.node[0].op_type == "MatMul"


def _with_external_location(tmp_path, location: str) -> os.PathLike:
    proto = point_external_data(_linear_with_weight(), "w", location)
    path = tmp_path / "model" / "m.onnx"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["/etc/passwd", "../secret.bin", "sub/../../secret.bin"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64 * 32 * 4)
    with pytest.raises(InputError, match="escapes the model's folder"):
        load_proto(_with_external_location(tmp_path, location))


def test_external_data_through_a_symlink_out_of_the_folder_is_refused(tmp_path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64 * 32 * 4)
    path = _with_external_location(tmp_path, "link.bin")
    (path.parent / "link.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(InputError, match="escapes the model's folder"):
        load_proto(path)


def test_missing_and_short_external_data_are_named(tmp_path):
    path = _with_external_location(tmp_path, "w.bin")
    with pytest.raises(InputError, match="external data file 'w.bin' is missing"):
        load_proto(path)
    (path.parent / "w.bin").write_bytes(b"\0" * 100)
    with pytest.raises(InputError, match="shorter than declared"):
        load_proto(path)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"this is a text file, not a model\n", "not an ONNX model"),
    (bytes(range(256)) * 8, "not an ONNX model"),
])
def test_files_that_are_not_models_get_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message):
        onnxcomp.load(path)


def test_a_protobuf_that_is_not_a_model_is_refused(tmp_path):
    path = tmp_path / "tensor.onnx"
    path.write_bytes(onnx.numpy_helper.from_array(np.ones(100, np.float32), "t").SerializeToString())
    with pytest.raises(InputError, match="not an ONNX model"):
        onnxcomp.load(path)


def test_a_truncated_model_is_refused(mnist_path, tmp_path):
    path = tmp_path / "cut.onnx"
    path.write_bytes(mnist_path.read_bytes()[:1000])
    with pytest.raises(InputError):
        onnxcomp.load(path)


# ---- repaired or flagged on load ------------------------------------------------------------------
def _mnist_with_duplicate_names(mnist_path) -> onnx.ModelProto:
    """mnist with its 2nd and 4th nodes renamed to the 1st node's name (ORT refuses it)."""
    proto = onnx.load(mnist_path)
    proto.graph.node[1].name = proto.graph.node[0].name  # "Times212_reshape1"
    proto.graph.node[3].name = proto.graph.node[0].name
    return proto


def test_ort_refuses_the_model_with_duplicate_node_names(mnist_path):
    import onnxruntime as ort

    with pytest.raises(Exception, match="two nodes with same node name"):
        ort.InferenceSession(_mnist_with_duplicate_names(mnist_path).SerializeToString())


def test_duplicate_node_names_are_renamed_on_load_said_in_one_note_and_ort_runs_the_saved_model(mnist_path, tmp_path):
    import onnxruntime as ort

    proto = _mnist_with_duplicate_names(mnist_path)
    before = proto.SerializeToString()
    model = onnxcomp.load(proto)
    assert model.load_notes == ["renamed 2 nodes whose name another node already had ('Times212_reshape1'): "
                                "ONNX Runtime refuses duplicate node names"]
    assert proto.SerializeToString() == before  # the caller's proto is not edited
    names = [n.name for n in model.graph.nodes]
    assert len(names) == len(set(names)) and "Times212_reshape1_1" in names and "Times212_reshape1_2" in names
    out = onnxcomp.save(model, tmp_path / "repaired.onnx")
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    expected = ort.InferenceSession(str(mnist_path), providers=["CPUExecutionProvider"]).run(None, {"Input3": x})
    np.testing.assert_array_equal(session.run(None, {"Input3": x})[0], expected[0])


def test_a_model_with_unique_node_names_gets_no_note(mnist_path):
    assert onnxcomp.load(mnist_path).load_notes == []


def test_optimize_repairs_duplicate_node_names_so_ort_runs_the_output(mnist_path, tmp_path):
    import onnxruntime as ort

    from .helpers import run_cli_here

    source = tmp_path / "dup.onnx"
    source.write_bytes(_mnist_with_duplicate_names(mnist_path).SerializeToString())
    before = source.read_bytes()
    done = run_cli_here("optimize", source, "-o", tmp_path / "out.onnx", "--preset", "lossless")
    assert done.returncode == 0, done.stderr
    ort.InferenceSession(str(tmp_path / "out.onnx"), providers=["CPUExecutionProvider"])
    assert source.read_bytes() == before


def test_nonfinite_initializers_names_the_weights_with_nan_or_inf(mnist_path):
    from onnxcomp.model import describe_nonfinite, nonfinite_initializers

    proto = onnx.load(mnist_path)
    for name, value in (("Parameter5", np.nan), ("Parameter193", np.inf)):
        tensor = next(t for t in proto.graph.initializer if t.name == name)
        array = onnx.numpy_helper.to_array(tensor).copy()
        array.flat[3] = value
        tensor.CopyFrom(onnx.numpy_helper.from_array(array, name))
    names = nonfinite_initializers(onnxcomp.load(proto))
    assert sorted(names) == ["Parameter193", "Parameter5"]
    assert describe_nonfinite(["Parameter5", "Parameter193"]) == (
        "2 weights hold NaN or Inf values ('Parameter5', 'Parameter193'): outputs that depend on them are not "
        "finite before or after optimization; the gate decides whether the result is usable")
    assert nonfinite_initializers(onnxcomp.load(mnist_path)) == []
    assert describe_nonfinite([]) is None
    bounds = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[4] x) => (float[4] y) <float lo = {0.0}, float hi = {inf}, float low = {-inf}, float w = {inf}> {
            c = Clip(x, lo, hi)
            m = Max(c, low)
            y = Mul(m, w)
        }""")
    assert nonfinite_initializers(onnxcomp.load(bounds)) == ["w"]  # an Inf as a clip bound or in Max is no value
    many = describe_nonfinite([f"w{i}" for i in range(7)])
    assert many.startswith("7 weights hold NaN or Inf values ('w0', 'w1', 'w2' and 4 more)")


def test_nonfinite_initializers_reads_weights_inside_subgraphs_and_external_data(tmp_path):
    from onnxcomp.model import nonfinite_initializers

    proto = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x, bool c) => (float[1, 4] y) {
            y = If (c) <
                then_branch = t () => (float[1, 4] a) { a = MatMul(x, inner) },
                else_branch = e () => (float[1, 4] b) { b = MatMul(x, outer) }
            >
        }""")
    inner = np.eye(4, dtype=np.float32)
    inner[1, 1] = -np.inf
    outer = np.ones((32, 32), np.float32)[:4, :4].copy()
    outer[0, 0] = np.nan
    proto.graph.node[0].attribute[0].g.initializer.append(onnx.numpy_helper.from_array(inner, "inner"))
    proto.graph.initializer.append(onnx.numpy_helper.from_array(outer, "outer"))
    path = onnxcomp.save(onnxcomp.load(proto), tmp_path / "m.onnx", external_data=True)
    assert sorted(nonfinite_initializers(onnxcomp.load(path))) == ["inner", "outer"]
