"""The lossless passes inside control flow: facts per graph, outer-scope constants, If inlining.

`If` branches and `Loop`/`Scan` bodies (nested to any depth) are graphs of their own whose nodes
read outer-scope tensors by name (in graphsurgeon: by object). fold, cleanup and fuse run their
rewrites on every graph of `onnxcomp.subgraphs.scopes(graph)`; this module holds what they share:

- `overridable(graph)`: tensors whose value is not known when the model is built (the inputs of
  every graph: a main-graph initializer listed as an input, a loop's iteration count and carried
  values). A Constant of an outer scope is a constant inside the subgraph too; these are not.
- `scoped_facts(proto, graph)`: onnx shape inference once for the whole model, types and shapes
  of every graph's tensors (the outer scopes' facts visible inside, as names are), keyed by graph.
- `inline_constant_ifs(graph)`:  If(const cond){then}{else} -> the taken branch's nodes.
- `node_counts(graph)` for the passes' per-subgraph stats.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp import graph_utils as gu
from onnxcomp.model import EXTERNAL_DATA_MIN_BYTES, constant_nbytes
from onnxcomp.subgraphs import NameSpace, scopes

_counter = itertools.count()


def has_control_flow(graph: gs.Graph) -> bool:
    return any(gu.has_subgraph(n) for n in graph.nodes)


def node_counts(graph: gs.Graph) -> tuple[int, int]:
    """(nodes of the main graph, nodes of every subgraph at any depth)."""
    total = sum(1 for _ in gu.iter_nodes(graph))
    return len(graph.nodes), total - len(graph.nodes)


def overridable(graph: gs.Graph, default_inputs: set[str] | frozenset = frozenset()) -> set[int]:
    """ids of the inputs of every graph of the model: their values come at run time. Main-graph
    initializers named in `default_inputs` (`Model.initializer_inputs`: IR >= 4 inputs with a
    default value, which graphsurgeon leaves out of `graph.inputs`) are inputs too."""
    every = scopes(graph)
    ids = {id(t) for scope in every for t in scope.graph.inputs}
    if default_inputs:  # (read in the main graph or, by outer-scope name, in a subgraph only)
        ids |= {id(t) for scope in every for n in scope.graph.nodes for t in n.inputs
                if isinstance(t, gs.Constant) and t.name in default_inputs}
    return ids


def is_known(tensor: gs.Tensor, runtime: set[int]) -> bool:
    """A Constant of this graph or an outer one that no graph input can override."""
    return isinstance(tensor, gs.Constant) and id(tensor) not in runtime


# ---- types and shapes of every graph ------------------------------------------------------
def _clear_declared(graph: onnx.GraphProto, main: bool) -> None:
    del graph.value_info[:]
    for out in graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _clear_declared(sub, False)


def _local_facts(graph: onnx.GraphProto) -> dict:
    facts = {}
    for vi in itertools.chain(graph.input, graph.value_info, graph.output):
        fact = gu._fact(vi.type)
        if fact is not None:
            facts[vi.name] = fact
    for init in graph.initializer:
        facts[init.name] = (init.data_type, tuple(int(d) for d in init.dims))
    return facts


def model_facts(model) -> dict[int, dict]:
    """`scoped_facts` of the model as it is now, kept on the model and reused while nothing that
    shape inference reads has changed: fold's last round, cleanup and fuse often ask about the
    same graph, and each answer costs an export (a third of the lossless passes' time)."""
    key = _fingerprint(model)
    cached = getattr(model, "_facts_cache", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    facts = scoped_facts(model.to_proto(weights=False), model.graph)
    model._facts_cache = (key, facts)
    return facts


def _fingerprint(model) -> tuple:
    """Everything onnx shape inference reads, by identity and value: opsets; each graph's inputs,
    outputs and nodes in order; each node's op, attributes and tensors; each tensor's name, type,
    shape and (constants) value, see `_value_key`."""
    parts: list = [tuple(sorted(model.opset_imports.items())), model.graph.opset, model.ir_version]
    tensors: dict[int, gs.Tensor] = {}

    def attribute(value):
        if isinstance(value, gs.Graph):
            return id(value)
        if isinstance(value, gs.Tensor):
            tensors[id(value)] = value
            return id(value)
        return value if isinstance(value, (int, float, str, bytes)) else repr(value)

    for scope_graph in (s.graph for s in scopes(model.graph)):
        for t in (*scope_graph.inputs, *scope_graph.outputs):
            tensors[id(t)] = t
        parts.append((id(scope_graph), tuple(map(id, scope_graph.inputs)), tuple(map(id, scope_graph.outputs))))
        for node in scope_graph.nodes:
            ins, outs = node.inputs, node.outputs
            for t in ins:
                tensors[id(t)] = t
            for t in outs:
                tensors[id(t)] = t
            parts.append((id(node), node.op, node.domain, tuple(map(id, ins)), tuple(map(id, outs)),
                          tuple((k, attribute(v)) for k, v in node.attrs.items()) if node.attrs else ()))
    for key, t in tensors.items():
        shape = t.shape
        parts.append((key, t.name, t.dtype, tuple(shape) if shape is not None else None, _value_key(t)))
    return tuple(parts)


def _value_key(tensor: gs.Tensor):
    """What of a constant's value shape inference can read. Small constants (shapes, axes, pads)
    by content: graphsurgeon swaps a lazily loaded value for an array the first time a pass reads
    it, so identity would change with nothing changed (nudenet: every round re-inferred). Large ones
    by size only: `to_proto(weights=False)` exports them as stubs, and onnx infers shapes from the
    data of shape-like inputs only, which are small."""
    if not isinstance(tensor, gs.Constant):
        return None
    nbytes = constant_nbytes(tensor)
    if nbytes >= EXTERNAL_DATA_MIN_BYTES:
        return nbytes
    return np.asarray(tensor.values).tobytes()


def scoped_facts(proto: onnx.ModelProto, graph: gs.Graph) -> dict[int, dict]:
    """id(graph or subgraph) -> {tensor name: (elem_type, shape)} visible in that graph.

    `proto` must be the export of `graph` (same node order, as `Model.to_proto` makes it). The
    main graph's facts are those of `graph_utils.infer_types(proto)`. A subgraph whose exported
    nodes do not line up with the graph's gets no facts (its rewrites that need them are skipped)."""
    if not has_control_flow(graph):
        return {id(graph): gu.infer_types(proto)}
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    _clear_declared(work.graph, True)
    inferred = work
    for data_prop in (True, False):
        try:
            inferred = onnx.shape_inference.infer_shapes(work, check_type=False, strict_mode=False,
                                                         data_prop=data_prop)
            break
        except Exception:  # noqa: BLE001, S112 - inference may reject odd models
            continue

    def walk(g: gs.Graph, p: onnx.GraphProto, visible: dict) -> None:
        if len(g.nodes) != len(p.node):
            return
        for node, pnode in zip(g.nodes, p.node):
            if node.op != pnode.op_type:
                return
            if not gu.has_subgraph(node):
                continue
            by_name = {a.name: a for a in pnode.attribute}
            for key, value in node.attrs.items():
                subs = [value] if isinstance(value, gs.Graph) else \
                    [v for v in value if isinstance(v, gs.Graph)] if isinstance(value, (list, tuple)) else []
                attr = by_name.get(key)
                if not subs or attr is None:
                    continue
                psubs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub, psub in zip(subs, psubs):
                    facts = {**visible, **_local_facts(psub)}
                    out[id(sub)] = facts
                    walk(sub, psub, facts)

    out = {id(graph): {**_local_facts(inferred.graph), **_local_facts(proto.graph)}}
    out[id(graph)].update({i.name: (i.data_type, tuple(int(d) for d in i.dims)) for i in proto.graph.initializer})
    walk(graph, inferred.graph, out[id(graph)])
    return out


# ---- If with a constant condition ---------------------------------------------------------
def _constant_condition(node: gs.Node, runtime: set[int]) -> bool | None:
    if node.op != "If" or not gu.is_standard(node) or not node.inputs or not is_known(node.inputs[0], runtime):
        return None
    try:
        value = np.asarray(node.inputs[0].values)
    except Exception:  # noqa: BLE001 - lazily loaded values may fail to read
        return None
    if value.dtype != np.bool_ or value.size != 1:
        return None  # ORT refuses anything else at run time: keep the node and its error
    return bool(value.reshape(-1)[0])


def inline_constant_ifs(graph: gs.Graph, default_inputs: set[str] | frozenset = frozenset(),
                        names: NameSpace | None = None) -> int:
    """If(cond) with a constant cond -> the taken branch's nodes, in every graph; returns the count.

    Exact: the taken branch's nodes run on the same values with the same kernels; its outputs
    become the If's outputs (through an Identity where the If output's name must stay: a graph
    output, or a branch output that is not a tensor the branch computes)."""
    done = 0
    names = names or NameSpace(graph)
    while True:
        runtime = overridable(graph, default_inputs)
        hit = next(((scope, node, taken) for scope in scopes(graph) for node in scope.graph.nodes
                    if (taken := _constant_condition(node, runtime)) is not None), None)
        if hit is None or not _inline(hit[0].graph, hit[1], hit[2], names):
            return done
        done += 1


def _inline(parent: gs.Graph, node: gs.Node, taken: bool, names: NameSpace) -> bool:
    branch = node.attrs.get("then_branch" if taken else "else_branch")
    if not isinstance(branch, gs.Graph) or branch.inputs or len(branch.outputs) < len(node.outputs):
        return False
    moved = {id(n) for n in branch.nodes}
    at = next(i for i, n in enumerate(parent.nodes) if n is node)
    parent_outputs = {id(t) for t in parent.outputs}
    sources = [t for t in branch.outputs]
    repeated = {id(t) for t in sources if sum(s is t for s in sources) > 1}
    new_nodes = list(branch.nodes)
    pairs = list(zip(sources, node.outputs))
    node.inputs.clear()
    node.outputs.clear()
    for src, dst in pairs:
        if dst.name == "":
            continue
        computed = len(src.inputs) == 1 and id(src.inputs[0]) in moved and not isinstance(src, gs.Constant)
        if computed and id(dst) not in parent_outputs and id(src) not in repeated:
            gu.replace_tensor_uses(parent, dst, src)
            if src.dtype is None and dst.dtype is not None:
                src.dtype = dst.dtype
        else:  # dst keeps its name (a graph output) and object
            new_nodes.append(gs.Node("Identity", name=names.unique(f"{node.name or 'If'}_inlined_{len(new_nodes)}"),
                                     inputs=[src], outputs=[dst]))
    parent.nodes[at:at + 1] = new_nodes
    branch.nodes.clear()
    for identity in new_nodes[len(moved):]:  # the branch's result takes the If output's name where it can
        if gu.remove_node_keep_output_names(parent, identity):
            parent.nodes = [n for n in parent.nodes if n is not identity]
    return True


# ---- does ORT still load it? -----------------------------------------------------------------
def loads_on_ort(model) -> bool:
    """True when ORT builds a session (default optimizations, which inline constant Ifs and run
    strict shape inference on the result). Used after rewrites that ORT's checks may refuse."""
    try:
        from onnxcomp.runtime import make_session

        make_session(model.to_proto(), "cpu", threads=1, optimize=True)
        return True
    except Exception:  # noqa: BLE001 - onnx/ORT raise many exception types
        return False
