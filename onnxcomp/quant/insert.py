"""Apply a placement plan: absorb Relus, insert Q/DQ pairs, store int8 weights and int32 biases."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.quant.placement import Plan
from onnxcomp.quant.qdq import (
    NodeBuilder,
    QParams,
    bias_params,
    quantize_array,
    quantize_bias,
    scale_zero_point,
    weight_params,
)


@dataclass
class QuantOptions:
    activation_type: str = "uint8"
    symmetric_activations: bool = False
    weight_type: str = "int8"
    reduce_range: bool = False
    per_tensor: frozenset[str] = frozenset()  # weights kept at one scale though per_channel is asked


@dataclass
class InsertResult:
    activations: dict[str, QParams] = field(default_factory=dict)
    weights: int = 0
    biases: int = 0
    absorbed: int = 0
    nodes_added: int = 0
    per_channel: bool = False
    per_tensor_kept: int = 0  # weights asked per channel that kept one scale (per_tensor_below)


def activation_params(plan: Plan, ranges: dict[str, tuple[float, float]], opts: QuantOptions) -> dict[str, QParams]:
    """One QParams per planned activation; grouped tensors share the union of their ranges."""
    merged = {name: ranges[name] for name in plan.activations if name in ranges}
    for group in plan.groups:
        known = [merged[n] for n in group if n in merged]
        if not known:
            continue
        lo, hi = min(r[0] for r in known), max(r[1] for r in known)
        for name in group:
            if name in merged:
                merged[name] = (lo, hi)
    clip_bounds = {}
    for node in plan.absorbed:
        if node.op == "Clip":
            hi = node.attrs.get("max")
            if hi is None and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
                hi = float(np.asarray(node.inputs[2].values))
            if hi is not None:
                clip_bounds[node.outputs[0].name] = float(hi)
    out = {}
    for name, (lo, hi) in merged.items():
        if name in clip_bounds:
            hi = min(hi, clip_bounds[name])
        out[name] = scale_zero_point(lo, hi, opts.activation_type, opts.symmetric_activations)
    return out


def apply_plan(graph: gs.Graph, plan: Plan, ranges: dict[str, tuple[float, float]], opts: QuantOptions,
               taken: set[str] | None = None) -> InsertResult:
    """Edit `graph` (the main graph or one subgraph) as planned. Only this graph's nodes are
    rewired: a subgraph reading one of its tensors keeps the float tensor (it gets its own plan).
    `taken`: names used anywhere in the model (see NodeBuilder)."""
    result = InsertResult()
    build = NodeBuilder(graph, taken=taken)
    params = activation_params(plan, ranges, opts)

    # 1. Relu / Clip(0, x) after a quantized node: the output Q's saturation does their work
    for node in plan.absorbed:
        x, y = node.inputs[0], node.outputs[0]
        if y.name not in params:
            continue
        producer = x.inputs[0]
        producer.outputs[producer.outputs.index(x)] = y
        node.inputs.clear()
        node.outputs.clear()
        result.absorbed += 1
    graph.nodes = [n for n in graph.nodes if n.outputs]

    # 2. one Q/DQ pair per activation; every reader (quantized or not) reads the DQ output
    tensors = graph.tensors()
    graph_outputs = {id(t) for t in graph.outputs}
    local = {id(n) for n in graph.nodes}
    for name, p in params.items():
        t = tensors.get(name)
        if not isinstance(t, gs.Variable):
            continue
        readers = [r for r in t.outputs if id(r) in local]
        if id(t) in graph_outputs and t.inputs and id(t.inputs[0]) in local:
            # keep the output's name on the DQ result; the producer writes a new tensor
            pre = gs.Variable(build.unique(f"{name}_float"), dtype=t.dtype, shape=t.shape)
            producer = t.inputs[0]
            producer.outputs[producer.outputs.index(t)] = pre
            build.qdq(pre, p, name, out=t)
        else:
            dq = build.qdq(t, p, name)
            dq.shape = t.shape
            for reader in readers:
                for i, inp in enumerate(reader.inputs):
                    if inp is t:
                        reader.inputs[i] = dq
        result.activations[name] = p

    # 3. weights: int8 constants behind DequantizeLinear (shared weights quantized once)
    done: dict[tuple[str, int | None], tuple[gs.Variable, QParams]] = {}
    weight_of: dict[tuple[str, int], QParams] = {}
    for use in plan.weights:
        w = use.node.inputs[use.index]
        if not isinstance(w, gs.Constant):
            continue
        values = np.asarray(w.values, np.float32)
        axis = use.axis
        if axis is not None and w.name in opts.per_tensor:
            axis = None
        key = (w.name, axis)
        if key not in done:
            wp = weight_params(values, axis, opts.weight_type, opts.reduce_range)
            q = build.const(f"{w.name}_quantized", quantize_array(values, wp, opts.reduce_range))
            out = build.dequantize(q, wp, w.name)
            out.shape = list(values.shape)
            done[key] = (out, wp)
            result.weights += 1
            result.per_channel |= axis is not None
            result.per_tensor_kept += int(axis is None and use.axis is not None)
        out, wp = done[key]
        use.node.inputs[use.index] = out
        weight_of[(use.node.name, use.index)] = wp

    # 4. biases: int32, scale = input scale * weight scale
    for node, index, x_name, use in plan.biases:
        b = node.inputs[index]
        wp = weight_of.get((node.name, use.index))
        if wp is None or x_name not in params or not isinstance(b, gs.Constant):
            continue
        bp = bias_params(params[x_name].scale, wp)
        if bp.scale.ndim == 1 and bp.scale.shape[0] != b.values.shape[0]:
            continue
        qb = build.const(f"{b.name}_quantized", quantize_bias(np.asarray(b.values), bp))
        out = build.dequantize(qb, bp, b.name)
        out.shape = list(b.values.shape)
        node.inputs[index] = out
        result.biases += 1
    result.nodes_added = build.added_nodes
    graph.cleanup().toposort()
    return result
