"""QDQ placement in every graph of a model: the main graph, If branches, Loop/Scan bodies (nested).

Each graph gets its own plan (onnxcomp.quant.placement) and its own Q/DQ nodes, so a subgraph
never reads a DequantizeLinear it cannot see; a tensor read in several graphs (an outer-scope
input read inside a branch) gets one Q/DQ pair per graph that quantizes a reader, with the same
parameters (ranges are by tensor name, and names are unique model-wide). A subgraph none of
whose tensors got a calibration range (a branch no sample ran, or an If branch inside a loop
body, which capture cannot route out) is left in float and listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from onnxcomp.quant.insert import InsertResult, QuantOptions, apply_plan
from onnxcomp.quant.placement import ANCHORS, Plan, make_plan
from onnxcomp.subgraphs import NameSpace, Scope, local_tensors, scopes


@dataclass
class ScopedResult:
    plan: Plan  # every graph's plan merged (nodes, weights, skipped...)
    inserted: InsertResult  # counts summed over the graphs
    per_subgraph: dict[str, dict[str, int]] = field(default_factory=dict)  # path -> figures
    not_calibrated: list[str] = field(default_factory=list)  # subgraphs left float: no sample ran them


def candidate_tensors(graph: gs.Graph, ops: tuple[str, ...]) -> list[str]:
    """Names of the float tensors around candidate ops in every graph (what calibration captures)."""
    names: dict[str, None] = {}
    for scope in scopes(graph):
        for node in scope.graph.nodes:
            if node.op in ops:
                for t in list(node.inputs) + list(node.outputs):
                    if isinstance(t, gs.Variable) and t.name:
                        names.setdefault(t.name)
    return list(names)


def reached(scope: Scope, ranges: dict) -> bool:
    """True when calibration saw a tensor this graph defines (for the main graph: always)."""
    if scope.is_main:
        return True
    mine = local_tensors(scope)
    return any(id(t) in mine and t.name in ranges for t in scope.graph.tensors().values())


def _has_anchor(scope: Scope, ops: tuple[str, ...]) -> bool:
    return any(n.op in ANCHORS and n.op in ops for n in scope.graph.nodes)


def quantize_graphs(graph: gs.Graph, ranges: dict[str, tuple[float, float]], opts: QuantOptions, *,
                    ops: tuple[str, ...], exclude: tuple[str, ...], per_channel: bool,
                    symmetric: bool) -> ScopedResult:
    """Plan and insert Q/DQ in the main graph, then in every subgraph calibration reached."""
    names = NameSpace(graph)
    merged, total = Plan(), InsertResult()
    out = ScopedResult(merged, total)
    for scope in scopes(graph):
        if not _has_anchor(scope, ops) and not scope.is_main:
            continue
        if not reached(scope, ranges):
            out.not_calibrated.append(scope.path)
            for node in scope.graph.nodes:
                if node.op in ANCHORS and node.op in ops:
                    merged.skipped[node.name] = "in a branch no calibration sample ran (kept float)"
            continue
        plan = make_plan(scope.graph, set(ranges), ops=ops, exclude=exclude, per_channel=per_channel,
                         symmetric_activations=symmetric)
        inserted = apply_plan(scope.graph, plan, ranges, opts, taken=names.taken)
        merged.nodes += plan.nodes
        merged.activations += plan.activations
        merged.weights += plan.weights
        merged.biases += plan.biases
        merged.absorbed += plan.absorbed
        merged.skipped.update(plan.skipped)
        total.activations.update(inserted.activations)
        total.weights += inserted.weights
        total.biases += inserted.biases
        total.absorbed += inserted.absorbed
        total.nodes_added += inserted.nodes_added
        total.per_channel |= inserted.per_channel
        total.per_tensor_kept += inserted.per_tensor_kept
        if not scope.is_main and plan.nodes:
            out.per_subgraph[scope.path] = {"quantized_anchors": len(plan.anchors()),
                                            "weights_quantized": inserted.weights,
                                            "activations_quantized": len(inserted.activations)}
    graph.cleanup().toposort()
    return out
