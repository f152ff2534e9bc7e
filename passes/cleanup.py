"""cleanup: no-op nodes, dead nodes and duplicate initializers removed; topological order.

Rewrites (every one leaves outputs bit-identical)
    Identity(x)                                  -> x
    Dropout(x) in inference, mask unused         -> x
    Cast(x, to=type(x)), CastLike(x, like x)     -> x
    Reshape(x, s) where s resolves to shape(x)   -> x
    Reshape(x, Concat(Shape(x)[i:i+1] at i, consts)) -> Reshape(x, [.., 0 at i, ..])  (shape_rules.py)
    Reshape(x, Concat(one runtime size, positive consts)) -> Reshape(x, [.., -1, ..])  (shape_rules.py)
    Expand(x, s) where broadcast(shape(x), s) == shape(x) -> x
    Transpose(x, perm=identity), Concat(x)       -> x
    Pad(x, pads=0...), Slice(x) over the full range  -> x   (start 0, end >= 2**62: any size)
    Mul(x, 1), Div(x, 1), Add(x, -0.0), Sub(x, +0.0) (ints: 0) where the constant broadcasts
        without changing shape(x)                -> x     (+0.0 is not neutral for Add: -0 + 0 = +0)
    nodes whose outputs nobody reads             -> removed
    Constants with equal dtype, shape and bytes  -> one Constant
    two nodes with the same op, attributes and inputs (deterministic) -> one node

Every graph is cleaned: the main graph and every If/Loop/Scan subgraph (nested too), with types
from one shape inference of the whole model. A subgraph output that passes an outer-scope tensor
or a graph input through an Identity keeps its Identity (the subgraph must produce it); merged
initializers keep names unique model-wide; inputs with a default value are never merged.
Graph inputs are kept (users feed them); graph output names never change. Ops of custom domains
are left untouched. Shapes and types come from onnx shape inference, run only when a candidate
needs them.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import graph_utils as gu
from onnxcomp import subgraph_fold as sf
from onnxcomp.base import Pass, PassResult, param
from onnxcomp.model import peek_values
from onnxcomp.registry import register
from onnxcomp.shape_rules import constant_reshape_targets
from onnxcomp.subgraphs import scopes, unique_weight_names

NOOP_CANDIDATES = {"Identity", "Dropout", "Cast", "CastLike", "Reshape", "Expand", "Transpose", "Pad", "Slice",
                   "Concat", "Mul", "Div", "Add", "Sub"}
NEEDS_FACTS = NOOP_CANDIDATES - {"Identity", "Dropout", "Concat"}


@register
class Cleanup(Pass):
    """Remove no-op and dead nodes, merge duplicate initializers, sort topologically."""

    name = "cleanup"
    lossless = True
    exact = True

    @dataclass(frozen=True)
    class Config:
        noops: bool = param(True, "remove no-op nodes (Identity, inference Dropout, Cast to the same type, ...)")
        merge_duplicates: bool = param(True, "merge initializers with equal dtype, shape and bytes, and nodes "
                                             "computing the same op on the same inputs")

    def run(self, model, ctx) -> PassResult:
        graph = model.graph
        stats: Counter = Counter()
        counts_before = sf.node_counts(graph)
        if self.config.noops:
            self._remove_noops(model, stats)
            stats["reshape_targets_made_constant"] = sum(constant_reshape_targets(s.graph, model.opset)
                                                         for s in scopes(graph))
        if self.config.merge_duplicates:
            if counts_before[1]:
                stats["weights_renamed"] = unique_weight_names(graph)  # merging must not bring two names together
            stats["initializers_merged"] = _merge_duplicates(graph, model.initializer_inputs)
            gu.toposort(graph)  # (every graph: the merges cascade in topological order)
            stats["duplicate_nodes_merged"] = sum(_merge_duplicate_nodes(s.graph) for s in scopes(graph))
        before = [id(n) for n in graph.nodes]
        total_before = sum(counts_before) - stats["noops_removed"]
        graph.cleanup(remove_unused_graph_inputs=False)  # (subgraphs included)
        counts_after = sf.node_counts(graph)
        stats["dead_nodes_removed"] = max(0, total_before - sum(counts_after))
        gu.toposort(graph)
        after = {id(n) for n in graph.nodes}
        reordered = [id(n) for n in graph.nodes] != [i for i in before if i in after]
        stats["dead_nodes_removed"] = max(0, stats["dead_nodes_removed"] - stats["duplicate_nodes_merged"])
        changed = bool(stats["noops_removed"] or stats["initializers_merged"] or stats["dead_nodes_removed"]
                       or stats["duplicate_nodes_merged"] or stats["weights_renamed"]
                       or reordered)
        if counts_before[1] or counts_after[1]:
            stats["subgraph_nodes_before"], stats["subgraph_nodes_after"] = counts_before[1], counts_after[1]
        return PassResult(changed=changed, stats={k: v for k, v in stats.items() if v or k.startswith("subgraph")})

    def _remove_noops(self, model, stats: Counter) -> None:
        graph = model.graph
        work = [(s.graph, [n for n in s.graph.nodes if n.op in NOOP_CANDIDATES and gu.is_standard(n)])
                for s in scopes(graph)]
        work = [(g, nodes) for g, nodes in work if nodes]
        if not work:
            return
        needs = any(n.op in NEEDS_FACTS for _, nodes in work for n in nodes)
        facts = sf.model_facts(model) if needs else {}
        for scope_graph, candidates in work:
            known = facts.get(id(scope_graph), {})
            for node in candidates:
                try:
                    keep = _noop_input(node, known, scope_graph, graph.opset)
                except (ValueError, TypeError, IndexError, KeyError):
                    keep = None
                if keep is not None and gu.remove_node_keep_output_names(scope_graph, node, keep):
                    stats["noops_removed"] += 1
                    stats[f"removed_{node.op}"] += 1


def _const(tensor) -> np.ndarray | None:
    return gu.constant_value(tensor) if isinstance(tensor, gs.Constant) else None


def _unused(tensor, graph) -> bool:
    """No node reads it (graphsurgeon keeps `tensor.outputs` in step with every edit, subgraph
    readers included: no consumers map rebuilt after each removal) and it is no graph output."""
    return tensor.name == "" or (not tensor.outputs and not gu.is_graph_output(graph, tensor))


def _noop_input(node: gs.Node, facts: dict, graph: gs.Graph, opset: int) -> int | None:
    """The index of the input a no-op node passes through unchanged, or None."""
    op, ins = node.op, node.inputs
    if len(node.outputs) < 1 or not ins or ins[0].name == "":
        return None
    if any(not _unused(t, graph) for t in node.outputs[1:]):
        return None
    x = ins[0]
    if op == "Identity":
        return 0
    if op == "Concat":
        return 0 if len(ins) == 1 else None
    if op == "Dropout":
        if opset < 7:
            return 0 if node.attrs.get("is_test", 0) == 1 else None
        if opset >= 12 and len(ins) > 2 and ins[2].name:
            mode = _const(ins[2])
            return 0 if mode is not None and not bool(mode.reshape(-1)[0]) else None
        return 0
    if op == "Cast":
        return 0 if gu.elem_type(facts, x) == node.attrs.get("to") else None
    if op == "CastLike":
        t = gu.elem_type(facts, x)
        return 0 if t is not None and t == gu.elem_type(facts, ins[1]) else None
    shape = gu.static_shape(facts, x)
    if op == "Transpose":
        perm = node.attrs.get("perm")
        if perm is None:
            r = gu.rank(facts, x)
            return 0 if r is not None and r <= 1 else None
        return 0 if list(perm) == list(range(len(perm))) else None
    if op == "Pad":
        pads = node.attrs.get("pads") if opset < 11 else _const(ins[1]) if len(ins) > 1 else None
        return 0 if pads is not None and not np.any(np.asarray(pads)) else None
    if op in ("Mul", "Div", "Add", "Sub"):
        return _neutral_operand(node, facts)
    if op == "Slice":
        r = gu.rank(facts, x)
        return 0 if r is not None and _full_slice(node, shape or (None,) * r, opset) else None
    if shape is None:
        return None
    if op == "Reshape" and opset >= 5 and len(ins) > 1:
        target = _const(ins[1])
        return 0 if target is not None and _resolve_reshape(shape, target, node.attrs.get("allowzero", 0)) == shape \
            else None
    if op == "Expand":
        target = _const(ins[1])
        return 0 if target is not None and tuple(np.broadcast_shapes(shape, tuple(target.tolist()))) == shape \
            else None
    return None


def _resolve_reshape(shape: tuple, target: np.ndarray, allowzero: int) -> tuple | None:
    dims = [int(d) for d in target.reshape(-1)]
    out = [shape[i] if d == 0 and not allowzero and i < len(shape) else d for i, d in enumerate(dims)]
    if out.count(-1) == 1:
        known = int(np.prod([d for d in out if d != -1], dtype=np.int64))
        if known == 0:
            return None
        out[out.index(-1)] = int(np.prod(shape, dtype=np.int64)) // known
    return tuple(out)


def _full_slice(node: gs.Node, shape: tuple, opset: int) -> bool:
    """True when the slice keeps every element; an unknown dimension (None) counts as full only
    for start 0 and an end of at least 2**62 (INT64_MAX in exports), step 1."""
    ins = node.inputs
    if opset < 10:
        starts, ends = node.attrs.get("starts"), node.attrs.get("ends")
        axes, steps = node.attrs.get("axes"), None
    else:
        given = [ins[i] if len(ins) > i and ins[i].name else None for i in range(1, 5)]
        vals = [None if t is None else _const(t) for t in given]
        if any(t is not None and v is None for t, v in zip(given, vals)):
            return False  # a slice parameter computed at run time
        starts, ends, axes, steps = vals
    if starts is None or ends is None:
        return False
    starts, ends = [int(s) for s in np.reshape(starts, -1)], [int(e) for e in np.reshape(ends, -1)]
    axes = list(range(len(starts))) if axes is None else [int(a) for a in np.reshape(axes, -1)]
    steps = [1] * len(starts) if steps is None else [int(s) for s in np.reshape(steps, -1)]
    if len({a % len(shape) if shape else a for a in axes}) != len(axes) or any(not -len(shape) <= a < len(shape)
                                                                              for a in axes):
        return False  # a bad axis: ORT refuses the node, and so must the model
    for start, end, axis, step in zip(starts, ends, axes, steps):
        dim = shape[axis]
        if step != 1:
            return False
        if dim is None:
            if start != 0 or end < 2**62:
                return False
            continue
        start = min(max(start + dim if start < 0 else start, 0), dim)
        end = min(max(end + dim if end < 0 else end, 0), dim)
        if start != 0 or end != dim:
            return False
    return True


def _neutral_operand(node: gs.Node, facts: dict) -> int | None:
    """Mul/Div by 1, Add -0.0 / Sub +0.0 (or integer 0): the index of the passed-through input."""
    a, b = node.inputs[0], node.inputs[1]
    op = node.op
    sides = [(1, a, b)] if op in ("Div", "Sub") else [(1, a, b), (0, b, a)]
    for const_index, x, c in sides:
        value = _const(c)
        if value is None:
            continue
        if value.dtype.kind not in "iuf" or not _neutral(op, value) or not _keeps_shape(facts, x, value):
            continue
        return 1 - const_index
    return None


def _neutral(op: str, value: np.ndarray) -> bool:
    if op in ("Mul", "Div"):
        return bool(np.all(value == 1))
    if value.dtype.kind != "f":
        return bool(np.all(value == 0))
    negative = np.signbit(value)
    return bool(np.all(value == 0) and (np.all(negative) if op == "Add" else not np.any(negative)))


def _keeps_shape(facts: dict, x: gs.Tensor, value: np.ndarray) -> bool:
    if gu.elem_type(facts, x) != gu.elem_type(facts, gs.Constant("_probe", value)):
        return False
    r = gu.rank(facts, x)
    if r is None:
        return False
    if value.size == 1 and value.ndim <= r:
        return True
    shape = gu.static_shape(facts, x)
    return shape is not None and value.ndim <= r and tuple(np.broadcast_shapes(shape, value.shape)) == shape


def _merge_duplicates(graph: gs.Graph, default_inputs: set[str] | frozenset = frozenset()) -> int:
    """Make every node read one Constant per distinct (dtype, shape, bytes); returns merges.
    Inputs with a default value (`default_inputs`, overridable by users) are never merged."""
    replace: dict[int, gs.Constant] = {}
    protected = {id(t) for t in graph.inputs} | {id(t) for t in graph.outputs}
    by_shape: dict[tuple, dict[int, gs.Constant]] = {}
    for node in gu.iter_nodes(graph):
        for tensor in node.inputs:
            if (not isinstance(tensor, gs.Constant) or id(tensor) in protected
                    or tensor.name in default_inputs):
                continue
            try:  # dtype and shape come from the header: no weight is read here
                key = (np.dtype(tensor.dtype).str, tuple(tensor.shape))
            except Exception:  # noqa: BLE001, S112 - an ONNX-only dtype numpy lacks (float8...)
                continue
            if key[0][1] in "biufc":
                by_shape.setdefault(key, {})[id(tensor)] = tensor
    for group in by_shape.values():  # only constants that share a dtype and shape can be equal
        keep: dict[str, gs.Constant] = {}
        for tensor in group.values() if len(group) > 1 else ():
            try:
                value = np.asarray(peek_values(tensor))  # (ascontiguousarray would turn scalars into 1-D)
            except Exception:  # noqa: BLE001, S112 - onnx/ORT raise many exception types
                continue
            # hashed in place (tobytes() would copy each weight: GBs on a large model)
            digest = hashlib.sha1(np.ascontiguousarray(value).reshape(-1).view(np.uint8)).hexdigest()
            first = keep.setdefault(digest, tensor)
            if first is not tensor:
                replace[id(tensor)] = first
    if not replace:
        return 0
    for node in gu.iter_nodes(graph):
        for i, tensor in enumerate(node.inputs):
            if id(tensor) in replace:
                node.inputs[i] = replace[id(tensor)]
    return len(replace)


def _merge_duplicate_nodes(graph: gs.Graph) -> int:
    """Common subexpressions: a node equal to an earlier one (op, domain, attributes, input
    tensors) is dropped and its outputs' readers read the earlier node's outputs."""
    from onnxcomp.passes.fold import NONDETERMINISTIC

    seen: dict[tuple, gs.Node] = {}
    merged = 0
    outputs = {id(t) for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op in NONDETERMINISTIC or gu.has_subgraph(node) or not gu.is_standard(node) or not node.outputs:
            continue
        attrs = node.attrs.items()
        if any(not isinstance(v, (int, float, str, bytes, list, tuple)) for _, v in attrs):
            continue  # tensor-valued attributes: compared by nobody, kept apart
        key = (node.op, node.domain, tuple(id(t) for t in node.inputs), repr(sorted(attrs)), len(node.outputs))
        first = seen.setdefault(key, node)
        if first is node or any(id(t) in outputs for t in node.outputs):
            continue
        for mine, theirs in zip(node.outputs, first.outputs):
            gu.replace_tensor_uses(graph, mine, theirs)
        node.inputs.clear()
        node.outputs.clear()
        merged += 1
    return merged
