"""Exact shape-arithmetic rewrites that make a Reshape's target a constant.

Exporters write "flatten but keep the batch" as Reshape(x, Concat(Shape(x)[0:1], [C])), often with
Casts to int32 and back around the slice (Paddle). With allowzero = 0 a 0 in the target copies
that dimension of x, so the target is the constant [0, C]: the same output for every input,
without the Shape/Slice/Cast/Concat chain, and with the output's rank known to shape inference
(a MatMul + Add after it can then become a Gemm).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import graph_utils as gu

# int32 <-> int64 casts of a dimension are identities for every size a tensor can have (< 2**31)
_INT_TYPES = {6, 7}  # TensorProto.INT32, INT64


def _producer(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The standard-domain node of this graph that makes `tensor` (not one of an outer scope)."""
    if isinstance(tensor, gs.Constant) or len(tensor.inputs) != 1:
        return None
    node = tensor.inputs[0]
    return node if gu.is_standard(node) and id(node) in _LOCAL.get(id(graph), ()) else None


_LOCAL: dict[int, set[int]] = {}  # id(graph) -> ids of its nodes, while constant_reshape_targets runs


def _const_ints(tensor: gs.Tensor, graph: gs.Graph) -> list[int] | None:
    value = gu.constant_value(tensor) if gu.is_constant(tensor, graph) else None
    return None if value is None or value.dtype.kind not in "iu" else [int(v) for v in value.reshape(-1)]


def _dim_of(tensor: gs.Tensor, graph: gs.Graph, opset: int) -> tuple[gs.Tensor, int] | None:
    """(x, i) when `tensor` is the one-element 1-D Shape(x)[i:i+1] (through int Casts), else None."""
    node = _producer(tensor, graph)
    while node is not None and node.op == "Cast" and int(node.attrs.get("to", 0)) in _INT_TYPES:
        node = _producer(node.inputs[0], graph)
    if node is None or node.op != "Slice":
        return None
    if opset >= 10:
        args = [_const_ints(t, graph) if t.name else None for t in node.inputs[1:]]
        starts, ends = args[0], args[1] if len(args) > 1 else None
        axes = args[2] if len(args) > 2 and node.inputs[3].name else [0]
        steps = args[3] if len(args) > 3 and node.inputs[4].name else [1]
    else:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes", [0]), [1]
    if None in (starts, ends, axes, steps) or len(starts) != 1 or axes != [0] or steps != [1]:
        return None
    start, end = starts[0], ends[0]
    if start < 0 or end != start + 1:
        return None
    shape = _producer(node.inputs[0], graph)
    while shape is not None and shape.op == "Cast" and int(shape.attrs.get("to", 0)) in _INT_TYPES:
        shape = _producer(shape.inputs[0], graph)
    if shape is None or shape.op != "Shape" or shape.attrs.get("start") or shape.attrs.get("end") is not None:
        return None
    return shape.inputs[0], start


def constant_reshape_targets(graph: gs.Graph, opset: int) -> int:
    """Reshape(x, Concat(parts)) -> Reshape(x, constant) where every part is a constant or
    Shape(x)[i:i+1] standing at position i (it becomes 0: copy dimension i). Returns how many."""
    changed = 0
    _LOCAL[id(graph)] = {id(n) for n in graph.nodes}
    try:
        changed = _rewrite(graph, opset)
    finally:
        _LOCAL.pop(id(graph), None)
    return changed


def _rewrite(graph: gs.Graph, opset: int) -> int:
    changed = 0
    for node in list(graph.nodes):
        if node.op != "Reshape" or not gu.is_standard(node) or len(node.inputs) != 2 or node.attrs.get("allowzero", 0):
            continue
        x, target = node.inputs
        concat = _producer(target, graph)
        if concat is None or concat.op != "Concat" or int(concat.attrs.get("axis", 0)) not in (0, -1):
            continue
        values: list[int] = []
        copies = 0
        for part in concat.inputs:
            known = _const_ints(part, graph)
            if known is not None:
                values += known
                continue
            dim = _dim_of(part, graph, opset)
            if dim is None or dim[0] is not x or dim[1] != len(values):
                break
            values.append(0)
            copies += 1
        else:
            if copies:
                node.inputs[1] = gs.Constant(gu.unique_name(graph, f"{node.name or 'reshape'}_shape"),
                                             np.array(values, np.int64))
                changed += 1
    return changed
