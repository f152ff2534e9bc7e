"""Multiply-accumulate and parameter counts of a model (Conv, ConvTranspose, Gemm, MatMul).

Shapes come from ONNX shape inference with every symbolic dimension set to 1 (batch 1), so
the count is per sample. Ops whose shapes cannot be inferred are left out and counted in
`unknown`; FLOPs are reported as 2 · MACs.
"""

from __future__ import annotations

import numpy as np
import onnx


def _static_proto(model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> onnx.ModelProto:
    """A copy with static input shapes (from `input_shapes`, else symbolic dims set to 1), inferred."""
    from onnxcomp.model import Model

    proto = model.to_proto() if isinstance(model, Model) else model
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    inits = {i.name for i in copy.graph.initializer}
    for inp in copy.graph.input:
        if inp.name in inits:
            continue
        given = (input_shapes or {}).get(inp.name)
        if given is not None and len(given) == len(inp.type.tensor_type.shape.dim):
            for dim, value in zip(inp.type.tensor_type.shape.dim, given):
                dim.Clear()
                dim.dim_value = int(value)
            continue
        for dim in inp.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = 1
    del copy.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(copy, strict_mode=False)


def _shapes(proto: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    out = {}
    g = proto.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            out[vi.name] = tuple(d.dim_value for d in t.shape.dim)
    for init in g.initializer:
        out[init.name] = tuple(init.dims)
    return out


def count(model, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[str, float]:
    """{'macs', 'flops', 'params', 'unknown'} for inputs of `input_shapes` (default: dynamic dims = 1)."""
    proto = _static_proto(model, input_shapes)
    shapes = _shapes(proto)
    macs, unknown = 0, 0
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        ins = [shapes.get(n) for n in node.input]
        out = shapes.get(node.output[0])
        if out is None or any(s is None for s in ins[:2]):
            unknown += 1
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            w = ins[1]
            macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            w = ins[1]
            macs += int(np.prod(ins[0])) * int(np.prod(w[1:]))
        elif node.op_type == "Gemm":
            a = ins[0]
            k = a[0] if attrs.get("transA", 0) else a[-1]
            macs += int(np.prod(out)) * int(k)
        else:
            k = ins[0][-1] if len(ins[0]) else 1
            macs += int(np.prod(out)) * int(k)
    params = sum(int(np.prod(i.dims)) for i in proto.graph.initializer
                 if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                    onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16))
    return {"macs": float(macs), "flops": 2.0 * macs, "params": float(params), "unknown": float(unknown)}
