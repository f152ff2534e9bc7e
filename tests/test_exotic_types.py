"""Types graphsurgeon and ORT's numpy bridge cannot carry on their own: optional/sequence values
and type attributes survive load -> save exactly, and bfloat16/float8/int4/int2 tensors run
through onnxcomp.runtime with real ONNX Runtime."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcomp.model import Model
from onnxcomp.runtime import make_session, run


def _optional_model() -> onnx.ModelProto:
    """OptionalHasElement on an optional input; an Optional built from a type attribute (empty)."""
    opt_float = helper.make_optional_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, [2]))
    seq = helper.make_sequence_type_proto(helper.make_tensor_type_proto(TensorProto.FLOAT, ["N"]))
    nodes = [
        helper.make_node("OptionalHasElement", ["x"], ["has"]),
        helper.make_node("Optional", [], ["empty"], type=helper.make_tensor_type_proto(TensorProto.FLOAT, [2])),
        helper.make_node("OptionalHasElement", ["empty"], ["empty_has"]),
        helper.make_node("SequenceLength", ["s"], ["n"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_value_info("x", opt_float), helper.make_value_info("s", seq)],
                              [helper.make_tensor_value_info("has", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("empty_has", TensorProto.BOOL, []),
                               helper.make_tensor_value_info("n", TensorProto.INT64, [])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def test_optional_and_sequence_types_and_type_attributes_survive_load_and_save():
    proto = _optional_model()
    before = str(proto)
    saved = Model.from_proto(proto).to_proto()
    assert str(proto) == before, "loading must not change the caller's proto"
    assert list(saved.graph.input) == list(proto.graph.input)  # element shapes and optional kept
    optional = next(n for n in saved.graph.node if n.op_type == "Optional")
    assert optional.attribute[0].type == onnx.AttributeProto.TYPE_PROTO
    onnx.checker.check_model(saved, full_check=True)
    session = make_session(saved, "cpu")
    out = run(session, {"x": np.ones(2, np.float32), "s": [np.ones(3, np.float32)] * 4})
    assert out["has"] and not out["empty_has"] and out["n"] == 4


@pytest.mark.parametrize("elem,dtype,values", [
    (TensorProto.BFLOAT16, ml_dtypes.bfloat16, [1.5, -2.25, 3e38, 0.0, 7.0]),
    (TensorProto.FLOAT8E4M3FN, ml_dtypes.float8_e4m3fn, [1.5, -2.25, 448.0, 0.0, 7.0]),
    (TensorProto.INT4, ml_dtypes.int4, [-8, 7, -1, 0, 3]),   # odd count: the last byte half-filled
    (TensorProto.UINT4, ml_dtypes.uint4, [15, 0, 1, 8, 3]),
    (TensorProto.INT2, ml_dtypes.int2, [-2, 1, -1, 0, 1]),
])
def test_exotic_element_types_cross_into_and_out_of_ort(elem, dtype, values):
    """x (exotic) -> Cast to float -> Cast back: both the input and the output cross the bridge."""
    nodes = [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT),
             helper.make_node("Cast", ["f"], ["y"], to=elem)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [5])],
                              [helper.make_tensor_value_info("f", TensorProto.FLOAT, [5]),
                               helper.make_tensor_value_info("y", elem, [5])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)], ir_version=11)
    x = np.array(values, np.float32).astype(dtype)
    out = run(make_session(proto, "cpu"), {"x": x})
    np.testing.assert_array_equal(out["f"], x.astype(np.float32))
    assert out["y"].dtype == x.dtype and out["y"].tobytes() == x.tobytes()
