"""Exact shape-arithmetic rewrites that make a Reshape's target a constant.

Exporters write "flatten but keep the batch" as Reshape(x, Concat(Shape(x)[0:1], [C])), often with
Casts to int32 and back around the slice (Paddle). With allowzero = 0 a 0 in the target copies
that dimension of x, so the target is the constant [0, C]: the same output for every input,
without the Shape/Slice/Cast/Concat chain, and with the output's rank known to shape inference
(a MatMul + Add after it can then become a Gemm).

A target with one runtime-computed entry among positive constants, e.g. Concat(batch, [512, 256])
from another tensor's shape (jax2tf), becomes [-1, 512, 256]: wherever the original runs, that
entry equals numel(x) / 512 / 256, which is what -1 computes (where it would not, the original
fails with a size mismatch).
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
    Shape(x)[i:i+1] standing at position i (it becomes 0: copy dimension i), or where one part is
    a one-element runtime value among positive constants (it becomes -1). Returns how many."""
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
        concat = _int_source(target, graph)
        if concat is None or concat.op != "Concat" or int(concat.attrs.get("axis", 0)) not in (0, -1):
            continue
        values = _target_values(concat, x, graph, opset)
        if values is not None:
            node.inputs[1] = gs.Constant(gu.unique_name(graph, f"{node.name or 'reshape'}_shape"),
                                         np.array(values, np.int64))
            changed += 1
    return changed


def _int_source(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The producer of `tensor`, looking through int32 <-> int64 Casts."""
    node = _producer(tensor, graph)
    while node is not None and node.op == "Cast" and int(node.attrs.get("to", 0)) in _INT_TYPES:
        node = _producer(node.inputs[0], graph)
    return node


def _target_values(concat: gs.Node, x: gs.Tensor, graph: gs.Graph, opset: int) -> list[int] | None:
    """The constant target equal to Concat(parts) for Reshape(x, .), or None (see the module doc)."""
    values: list[int] = []
    copies, free = 0, None
    for part in concat.inputs:
        known = _const_ints(part, graph)
        if known is not None:
            values += known
            continue
        dim = _dim_of(part, graph, opset)
        if dim is not None and dim[0] is x and dim[1] == len(values):
            values.append(0)
            copies += 1
        elif free is None and (dim is not None or _gathered_dim(part, graph, opset)):
            free = len(values)
            values.append(-1)
        else:
            return None
    if free is not None:
        # -1 is exact only beside known positive sizes: a copied or zero dimension could be 0
        others = values[:free] + values[free + 1:]
        return values if not copies and all(v >= 1 for v in others) else None
    return values if copies else None


def _gathered_dim(tensor: gs.Tensor, graph: gs.Graph, opset: int) -> bool:
    """Whether `tensor` is Unsqueeze(Gather(Shape(y), scalar index), [0]): one dimension of any y,
    a one-element 1-D tensor (the other such form, Shape(y)[i:i+1], is `_dim_of`'s)."""
    node = _int_source(tensor, graph)
    if node is None or node.op != "Unsqueeze":
        return False
    axes = node.attrs.get("axes") if opset < 13 else (_const_ints(node.inputs[1], graph) if len(node.inputs) > 1 else None)
    gather = _int_source(node.inputs[0], graph)
    if axes not in ([0], [-1]) or gather is None or gather.op != "Gather" or len(gather.inputs) != 2:
        return False
    index = gu.constant_value(gather.inputs[1]) if gu.is_constant(gather.inputs[1], graph) else None
    shape = _int_source(gather.inputs[0], graph)
    return index is not None and index.ndim == 0 and shape is not None and shape.op == "Shape"
