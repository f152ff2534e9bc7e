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
