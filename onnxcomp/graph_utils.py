"""Small graph helpers shared by passes: consumers, constants, tensor replacement, type facts.

Everything here works on onnx-graphsurgeon graphs and looks into subgraphs (If/Loop/Scan
bodies), which may refer to outer-scope tensors by object: replacing a tensor's uses must
reach them too.
"""

from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs

STANDARD_DOMAINS = ("", "ai.onnx")


def is_standard(node: gs.Node) -> bool:
    """True for ops of the default ONNX domain (custom-domain ops are never rewritten)."""
    return (node.domain or "") in STANDARD_DOMAINS


def has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) or (isinstance(v, (list, tuple)) and v and isinstance(v[0], gs.Graph))
               for v in node.attrs.values())


def subgraphs(node: gs.Node) -> list[gs.Graph]:
    """The node's graph attributes (If branches, Loop/Scan bodies, a custom op's graphs). Called for
    every node by each walk over the graph, so it looks at a list's first element only (a GRAPHS
    attribute holds graphs alone) and returns a list, not a generator."""
    found: list[gs.Graph] = []
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            found.append(value)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], gs.Graph):
            found.extend(value)
    return found


def iter_nodes(graph: gs.Graph) -> Iterator[gs.Node]:
    """Every node of the graph and of its subgraphs, outer first."""
    for node in graph.nodes:
        yield node
        if node.attrs:  # (most nodes have none: skip the scan)
            for sub in subgraphs(node):
                yield from iter_nodes(sub)


def toposort(graph: gs.Graph) -> gs.Graph:
    """Sort the nodes (and every subgraph's) topologically, in place; stable: among the nodes
    that are ready, the earlier one in the current order comes first.

    Hand-written (Kahn's algorithm over the producers of each node's inputs, including the outer
    tensors its subgraphs read) because graphsurgeon's recursive hierarchy-level sort took longer
    than all the lossless passes together on a 450-node model. A model with local functions is
    left to graphsurgeon, which sorts those too."""
    if graph.functions:
        return graph.toposort()
    nodes = list(graph.nodes)
    subs = [subgraphs(node) if node.attrs else () for node in nodes]
    for inner in subs:
        for sub in inner:
            toposort(sub)
    producer = {id(t): i for i, node in enumerate(nodes) for t in node.outputs if t.name}
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        reads = [t for t in node.inputs if t.name]
        for sub in subs[i]:  # outer tensors read inside a subgraph are inputs of the node
            reads += [t for inner in iter_nodes(sub) for t in inner.inputs if t.name]
        deps = {producer[id(t)] for t in reads if id(t) in producer}
        waiting[i] = len(deps)
        for d in deps:
            users[d].append(i)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for user in users[i]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes):
        raise ValueError("Cycle detected in the graph: a node depends on its own output")
    graph.nodes = [nodes[i] for i in order]
    return graph


def consumers_map(graph: gs.Graph) -> dict[int, list[gs.Node]]:
    """id(tensor) -> nodes (subgraph nodes included) that read it. Built once, used many times."""
    out: dict[int, list[gs.Node]] = defaultdict(list)
    for node in iter_nodes(graph):
        for tensor in node.inputs:
            out[id(tensor)].append(node)
    return out


def consumers_of(graph: gs.Graph, tensor: gs.Tensor) -> list[gs.Node]:
    return [n for n in iter_nodes(graph) if any(t is tensor for t in n.inputs)]


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.outputs)


def is_graph_input(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    return any(t is tensor for t in graph.inputs)


def is_constant(tensor: gs.Tensor, graph: gs.Graph | None = None) -> bool:
    """A Constant (initializer) that users cannot override through a graph input."""
    if not isinstance(tensor, gs.Constant):
        return False
    return graph is None or not is_graph_input(graph, tensor)


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def replace_tensor_uses(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> int:
    """Make every node (subgraphs included) read `new` instead of `old`; returns the count."""
    count = 0
    for node in iter_nodes(graph):
        for i, tensor in enumerate(node.inputs):
            if tensor is old:
                node.inputs[i] = new
                count += 1
    return count


def remove_node_keep_output_names(graph: gs.Graph, node: gs.Node, keep_input: int = 0) -> bool:
    """Bypass a one-output node whose output equals its input `keep_input`.

    Graph output names never change: when the output is a graph output, the input tensor takes
    the output's name, which is only safe when that input is an inner tensor of this graph
    (produced by a node of this graph, not a graph input, constant, other graph output or a
    tensor of an outer scope when `graph` is a subgraph). Otherwise the node
    is kept and False is returned.
    """
    source, result = node.inputs[keep_input], node.outputs[0]
    if is_graph_output(graph, result):
        if (isinstance(source, gs.Constant) or is_graph_input(graph, source) or is_graph_output(graph, source)
                or not source.inputs or sum(t is result for t in graph.outputs) != 1
                or not any(n is source.inputs[0] for n in graph.nodes)):  # (an outer-scope tensor)
            return False
        if source.dtype is None and result.dtype is not None:
            source.dtype = result.dtype
        if result.shape is not None:
            source.shape = result.shape
        name = result.name
        result.name = unique_name(graph, name + "_removed")
        source.name = name
        graph.outputs = [source if t is result else t for t in graph.outputs]
    replace_tensor_uses(graph, result, source)
    node.inputs.clear()
    node.outputs.clear()
    return True


_counter = itertools.count()


def unique_name(graph: gs.Graph, base: str) -> str:
    taken = set(graph.tensors().keys())
    if base not in taken:
        return base
    while True:
        name = f"{base}_{next(_counter)}"
        if name not in taken:
            return name


# ---- type facts from onnx shape inference ----------------------------------------------------
def infer_types(proto: onnx.ModelProto) -> dict[str, tuple[int, tuple | None]]:
    """Main-graph tensor name -> (onnx elem_type, shape) from onnx shape inference.

    Shapes are tuples whose entries are ints (static) or None (unknown); the shape is None when
    even the rank is unknown. Declared output shapes and intermediate value_info are dropped
    before inference so a wrong declaration in the file cannot be trusted as a fact.
    """
    work = onnx.ModelProto()
    work.CopyFrom(proto)
    del work.graph.value_info[:]
    for out in work.graph.output:
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    inferred = _infer(work)
    if inferred is not None and _declare_missing(work, inferred):
        inferred = _infer(work) or inferred
    facts: dict[str, tuple[int, tuple | None]] = {}
    source = inferred.graph if inferred is not None else work.graph
    for vi in itertools.chain(source.input, source.value_info, source.output):
        facts[vi.name] = _fact(vi.type)
    for init in proto.graph.initializer:
        facts[init.name] = (init.data_type, tuple(int(d) for d in init.dims))
    return {k: v for k, v in facts.items() if v is not None}


def _fact(tp: onnx.TypeProto):
    if not tp.HasField("tensor_type"):
        return None
    tt = tp.tensor_type
    if not tt.HasField("shape"):
        return (tt.elem_type, None)
    dims = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
    return (tt.elem_type, dims)


def _infer(work: onnx.ModelProto) -> onnx.ModelProto | None:
    for data_prop in (True, False):
        try:
            return onnx.shape_inference.infer_shapes(work, check_type=False, strict_mode=False, data_prop=data_prop)
        except Exception:  # inference may reject odd models; then we know only what is declared  # noqa: BLE001, S112 - onnx/ORT raise many exception types
            continue
    return None


def _declare_missing(work: onnx.ModelProto, inferred: onnx.ModelProto) -> int:
    """Declare, in `work`, what onnx inference left unknown but the node's definition fixes, so
    one more inference carries it on (onnx infers nothing after an unknown tensor):
    - the rank of a Reshape output whose target has a known length but a run-time value
      (Reshape before opset 14; PP-OCR rec's attention): the rank is the target's length;
    - the outputs of ORT's DynamicQuantizeLSTM (com.microsoft, no onnx schema; ddddocr), shaped
      as LSTM's: Y [seq, directions, batch, hidden], Y_h and Y_c [directions, batch, hidden]."""
    known = {vi.name: vi.type for vi in itertools.chain(inferred.graph.input, inferred.graph.value_info,
                                                         inferred.graph.output)}
    for init in work.graph.initializer:
        known.setdefault(init.name, onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims)))

    def fact(name):
        return _fact(known[name]) if name in known else None

    outputs = {out.name: out for out in work.graph.output if out.type.HasField("tensor_type")}
    added = 0
    for node in work.graph.node:
        if not node.output or (node.output[0] in known and known[node.output[0]].tensor_type.HasField("shape")):
            continue
        declared = []
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx") and len(node.input) >= 2:
            target, data = fact(node.input[1]), fact(node.input[0])
            if target and data and target[1] and len(target[1]) == 1 and target[1][0] is not None:
                declared = [(node.output[0], data[0], [None] * target[1][0])]
        elif node.op_type == "DynamicQuantizeLSTM" and node.domain == "com.microsoft":
            declared = _lstm_outputs(node, fact(node.input[0]))
        for name, elem, dims in declared:
            if not name:
                continue
            output = outputs.get(name)
            if output is not None:  # a graph output's type is its declaration (cleared above)
                output.type.CopyFrom(onnx.helper.make_tensor_type_proto(elem, dims))
            else:
                work.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem, dims))
            added += 1
    return added


def _lstm_outputs(node: onnx.NodeProto, x) -> list:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if x is None or x[1] is None or len(x[1]) != 3 or "hidden_size" not in attrs or attrs.get("layout", 0) != 0:
        return []
    directions = 2 if attrs.get("direction", b"forward") == b"bidirectional" else 1
    seq, batch, hidden = x[1][0], x[1][1], int(attrs["hidden_size"])
    shapes = ([seq, directions, batch, hidden], [directions, batch, hidden], [directions, batch, hidden])
    return [(name, x[0], dims) for name, dims in zip(node.output, shapes)]


def static_shape(facts: dict, tensor: gs.Tensor) -> tuple[int, ...] | None:
    """The fully static shape of a tensor, or None."""
    if isinstance(tensor, gs.Constant):
        return tuple(int(d) for d in tensor.shape)
    fact = facts.get(tensor.name)
    if fact is None or fact[1] is None or any(d is None or d < 0 for d in fact[1]):
        return None
    return fact[1]


def elem_type(facts: dict, tensor: gs.Tensor) -> int | None:
    if isinstance(tensor, gs.Constant):
        try:
            return onnx.helper.np_dtype_to_tensor_dtype(np.asarray(tensor.values).dtype)
        except Exception:  # noqa: BLE001 - onnx/ORT raise many exception types
            return None
    fact = facts.get(tensor.name)
    return fact[0] if fact and fact[0] else None


def rank(facts: dict, tensor: gs.Tensor) -> int | None:
    if isinstance(tensor, gs.Constant):
        return len(tensor.shape)
    fact = facts.get(tensor.name)
    return None if fact is None or fact[1] is None else len(fact[1])
