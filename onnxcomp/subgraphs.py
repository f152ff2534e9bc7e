"""Control flow for the lossy passes: every graph of a model, and subgraph tensors made visible to ORT.

A model's weights may live inside `If` branches and `Loop`/`Scan` bodies (nested to any depth),
as initializers of those subgraphs; their nodes may read outer-scope tensors by name (in
graphsurgeon: by object, so an outer tensor's `outputs` lists subgraph readers too).

- `scopes(graph)`: the main graph and every subgraph, outer first, each with a readable path
  (`sample_rate_if/then_branch/hi_inner_if/else_branch`) used in the passes' per-subgraph stats.
- `NameSpace`: model-wide unique names for new tensors and nodes. graphsurgeon exports a tensor
  wherever it is read and onnxcomp's export drops a subgraph initializer that shadows an outer
  one, so a new name must be unique across every graph, not only the one being edited.
- `expose(proto, names)`: ORT returns main-graph outputs only. A tensor inside a subgraph is
  routed out level by level: an `If` branch outputs it (through an Identity) and its sibling
  branch outputs an empty placeholder of the same type, the If gets a matching output; a
  `Loop`/`Scan` body outputs it as an extra scan output (values stacked per iteration). The
  returned aliases map each requested name to the main-graph output that carries it; a value
  of size 0 means "that branch did not run" (see `onnxcomp.calibration.capture`). Not routed:
  tensors of an If branch inside a loop body (the branch taken may change per iteration, and a
  placeholder cannot be stacked with real values) and of subgraphs of other ops.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxcomp.graph_utils import has_subgraph, iter_nodes  # noqa: F401  (re-exported for the passes)
from onnxcomp.graph_utils import subgraphs as node_subgraphs

LOOPS = ("Loop", "Scan")


@dataclass
class Scope:
    """One graph of the model: the main graph (node None) or a subgraph attribute of `node`."""

    graph: gs.Graph
    path: str  # "" for the main graph
    node: gs.Node | None = None
    parent: Scope | None = None

    @property
    def is_main(self) -> bool:
        return self.node is None

    @property
    def in_loop(self) -> bool:
        """True inside a Loop/Scan body (at any depth): its tensors are captured stacked per iteration."""
        scope = self
        while scope is not None and scope.node is not None:
            if scope.node.op in LOOPS:
                return True
            scope = scope.parent
        return False

    @property
    def label(self) -> str:
        return self.path or "main"


# common standard ops whose attributes are never graphs (the walk below runs for every node, often)
NO_GRAPH_ATTRIBUTES = frozenset({"Conv", "ConvTranspose", "Gemm", "MaxPool", "AveragePool", "Transpose", "Concat",
                                 "Gather", "Reshape", "Cast", "Squeeze", "Unsqueeze", "Slice", "Softmax", "Resize",
                                 "BatchNormalization", "LayerNormalization", "Constant", "Split", "ReduceMean",
                                 "Flatten", "LeakyRelu", "Clip", "Pad", "ConstantOfShape", "Shape"})


def scopes(graph: gs.Graph) -> list[Scope]:
    """The main graph, then every subgraph (depth first, outer before inner)."""
    out: list[Scope] = []

    def walk(scope: Scope) -> None:
        out.append(scope)
        for node in scope.graph.nodes:
            if not node.attrs or (node.op in NO_GRAPH_ATTRIBUTES and node.domain in ("", "ai.onnx")):
                continue
            for key, value in node.attrs.items():
                subs = [value] if isinstance(value, gs.Graph) else list(value) \
                    if isinstance(value, (list, tuple)) and value and isinstance(value[0], gs.Graph) else []
                for i, sub in enumerate(subs):
                    name = f"{node.name or node.op}/{key}" + (f"[{i}]" if len(subs) > 1 else "")
                    walk(Scope(sub, f"{scope.path}/{name}" if scope.path else name, node, scope))

    walk(Scope(graph, ""))
    return out


def node_scopes(graph: gs.Graph) -> Iterator[tuple[Scope, gs.Node]]:
    """(scope, node) for every node of every graph."""
    for scope in scopes(graph):
        for node in list(scope.graph.nodes):
            yield scope, node


def local_tensors(scope: Scope) -> set[int]:
    """ids of the tensors this graph defines: its inputs and its nodes' outputs (not outer ones)."""
    return {id(t) for t in scope.graph.inputs} | {id(t) for n in scope.graph.nodes for t in n.outputs}


def reads_inside(node: gs.Node) -> Iterator[gs.Tensor]:
    """Every tensor read by the nodes of `node`'s subgraphs, at any depth."""
    for sub in node_subgraphs(node):
        for inner in sub.nodes:
            yield from (t for t in inner.inputs if t is not None)
            yield from reads_inside(inner)


class NameSpace:
    """Unique names across every graph of the model (tensors and nodes)."""

    def __init__(self, graph: gs.Graph):
        self.taken: set[str] = set()
        for scope in scopes(graph):
            self.taken.update(scope.graph.tensors().keys())
            self.taken.update(t.name for t in scope.graph.inputs)
            self.taken.update(n.name for n in scope.graph.nodes if n.name)

    def unique(self, base: str) -> str:
        return unique_name(self.taken, base)


def unique_name(taken: set[str], base: str) -> str:
    """`base`, or `base_1`, `base_2`, ... the first one not in `taken`, which is then taken."""
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def unique_weight_names(graph: gs.Graph) -> int:
    """Rename subgraph Constants whose name another Constant (in another graph) also has.

    Passes key weights by name; two branches may both hold a "weight". Nodes refer to tensors by
    object, so a rename keeps the model's meaning. Returns how many were renamed."""
    seen: dict[str, int] = {}
    renamed = 0
    names = NameSpace(graph)
    for scope in scopes(graph):
        for tensor in scope.graph.tensors().values():
            if not isinstance(tensor, gs.Constant):
                continue
            if seen.setdefault(tensor.name, id(tensor)) != id(tensor):
                tensor.name = names.unique(f"{tensor.name}_{scope.path.replace('/', '_')}")
                seen[tensor.name] = id(tensor)
                renamed += 1
    return renamed


def scope_of_nodes(graph: gs.Graph) -> dict[int, Scope]:
    """id(node) -> the scope whose graph holds it."""
    return {id(node): scope for scope, node in node_scopes(graph)}


def per_scope(counts: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Sum figures by scope label, main graph included (for pass stats)."""
    out: dict[str, float] = {}
    for label, value in counts:
        out[label] = out.get(label, 0) + value
    return out


# ---- exposing subgraph tensors to ORT (protobuf level) -----------------------------------------
@dataclass
class _Where:
    graph: onnx.GraphProto
    chain: list[tuple[onnx.NodeProto, str, onnx.GraphProto]]  # (owner node, attr name, owner's graph), outer first


def _index(graph: onnx.GraphProto, chain: list, out: dict[str, _Where], types: dict[str, onnx.TypeProto]) -> None:
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.HasField("tensor_type"):
            types.setdefault(vi.name, vi.type)
    if chain:
        for vi in graph.input:
            out.setdefault(vi.name, _Where(graph, chain))
    for node in graph.node:
        if chain:
            for name in node.output:
                if name:
                    out.setdefault(name, _Where(graph, chain))
        for attr in node.attribute:
            subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subs:
                _index(sub, chain + [(node, attr.name, graph)], out, types)


def _all_names(graph: onnx.GraphProto, taken: set[str]) -> None:
    taken.update(vi.name for vi in graph.input)
    taken.update(t.name for t in graph.initializer)
    for node in graph.node:
        taken.update(node.output)
        taken.add(node.name)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _all_names(sub, taken)


def _placeholder(graph: onnx.GraphProto, name: str, tp: onnx.TypeProto | None) -> None:
    """A Constant node making an empty tensor of the type (and rank, when known) of `tp`."""
    elem = tp.tensor_type.elem_type if tp is not None and tp.tensor_type.elem_type else onnx.TensorProto.FLOAT
    rank = len(tp.tensor_type.shape.dim) if tp is not None and tp.tensor_type.HasField("shape") else 1
    empty = np.zeros((0,) * max(rank, 1), dtype=helper.tensor_dtype_to_np_dtype(elem))
    graph.node.append(helper.make_node("Constant", [], [name], name=name, value=onnx.numpy_helper.from_array(empty)))
    graph.output.add(name=name)


def expose(proto: onnx.ModelProto, names: Iterable[str], types: dict[str, onnx.TypeProto] | None = None
           ) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of the model whose main graph outputs the named tensors, wherever they live.

    Returns (model, aliases): aliases[name] is the main-graph output carrying `name` (itself for a
    main-graph tensor). A name that cannot be routed out (a subgraph of an op other than If, Loop
    or Scan) is left out of the aliases."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    where: dict[str, _Where] = {}
    found_types: dict[str, onnx.TypeProto] = {}
    _index(out.graph, [], where, found_types)
    types = {**found_types, **(types or {})}
    taken: set[str] = set()
    _all_names(out.graph, taken)

    def fresh(base: str) -> str:
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    existing = {o.name for o in out.graph.output}
    aliases: dict[str, str] = {}
    for name in dict.fromkeys(names):
        loc = where.get(name)
        if loc is None:  # a main-graph tensor (or an unknown name: ORT will say so)
            if name not in existing:
                vi = out.graph.output.add(name=name)
                if name in types:
                    vi.type.CopyFrom(types[name])
                existing.add(name)
            aliases[name] = name
            continue
        ops = [owner.op_type for owner, _, _ in loc.chain]
        if any(op not in ("If",) + LOOPS for op in ops):
            continue
        if any(op in LOOPS for op in ops) and "If" in ops[next(i for i, op in enumerate(ops) if op in LOOPS):]:
            continue  # an If inside a loop body may take either branch per iteration: not stackable
        current, graph = name, loc.graph
        for owner, attr_name, parent in reversed(loc.chain):
            routed = fresh(f"{name}__out")
            graph.node.append(helper.make_node("Identity", [current], [routed], name=routed))
            graph.output.add(name=routed)
            if owner.op_type == "If":
                sibling = next(a.g for a in owner.attribute if a.type == onnx.AttributeProto.GRAPH
                               and a.name != attr_name)
                _placeholder(sibling, fresh(f"{name}__not_run"), types.get(name))
            elif owner.op_type == "Scan":
                for attr in owner.attribute:
                    if attr.name in ("scan_output_axes", "scan_output_directions"):
                        attr.ints.append(0)
            current = fresh(f"{name}__from_{owner.name or owner.op_type}")
            owner.output.append(current)
            graph = parent
        out.graph.output.add(name=current)
        aliases[name] = current
    return out, aliases
