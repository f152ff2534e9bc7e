"""fold: constant folding, shape subgraphs included.

Rewrites
    Op(const, const, ...)                -> const            (evaluated on ONNX Runtime)
    Shape(x), Size(x)  with x's shape static -> const        (shapes from onnx shape inference)
    Shape -> Gather -> Concat -> Reshape(x, .)  -> Reshape(x, const)   (by the two above, repeated)

Why our own folder instead of graphsurgeon's `Graph.fold_constants`: we need (1) a size limit on
*growth* (a ConstantOfShape/Expand/Tile of a few bytes into megabytes stays a node; graphsurgeon's
`size_threshold` is an absolute cap applied after the fact), (2) bit-identical results — every
constant node is evaluated by the very ORT CPU kernel that would run it, with graph
optimizations off (graphsurgeon optimizes the folding session and silently substitutes its own
numpy shape logic), (3) an explicit, logged fallback node by node and then to onnx's
ReferenceEvaluator, and (4) honest counts of what was folded and what was skipped and why.

Never folded: nondeterministic ops (Random*, Multinomial, Bernoulli), ops of custom domains,
nodes with subgraph attributes (If/Loop/Scan), sequence/optional ops, and results whose dtype
cannot be stored as a plain initializer (strings, bfloat16, float8, int4).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp import graph_utils as gu
from onnxcomp.base import Pass, PassResult, param
from onnxcomp.model import constant_nbytes
from onnxcomp.registry import register

NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                    "Bernoulli", "Dropout"}  # Dropout: folding it would fix its mask in training mode
NON_TENSOR = {"SplitToSequence", "ConcatFromSequence", "Optional", "OptionalGetElement", "OptionalHasElement"}
STORABLE_KINDS = "biuf"  # bool, ints, floats (numpy's own float16/32/64 only)


def _foldable_op(node: gs.Node) -> bool:
    op = node.op
    return (gu.is_standard(node) and op not in NONDETERMINISTIC and op not in NON_TENSOR
            and not op.startswith("Sequence") and not gu.has_subgraph(node))


def _storable(value) -> bool:
    return (isinstance(value, np.ndarray) and value.dtype.kind in STORABLE_KINDS
            and value.dtype.type.__module__ == "numpy")


def _nbytes(tensor: gs.Tensor, values: dict) -> int:
    if isinstance(tensor, gs.Constant):
        return constant_nbytes(tensor)
    value = values.get(id(tensor))
    return int(value.nbytes) if isinstance(value, np.ndarray) else 0


@register
class Fold(Pass):
    """Constant folding: evaluate constant nodes and static shape subgraphs, within a size limit."""

    name = "fold"
    lossless = True
    exact = True

    @dataclass(frozen=True)
    class Config:
        max_growth_mb: float = param(1.0, "a folded tensor that would grow the model by more than this (MiB) "
                                          "stays a node (Expand/Tile/ConstantOfShape of a small constant)", min=0.0)
        shapes: bool = param(True, "fold Shape/Size of tensors whose shapes are static (onnx shape inference)")
        max_rounds: int = param(8, "repeat shape folding and constant folding at most this many times", min=1)

    def run(self, model, ctx) -> PassResult:
        stats: Counter = Counter()
        graph = model.graph
        limit = int(self.config.max_growth_mb * 2**20)
        self._kept: dict[int, str] = {}  # node id -> why it stays (decided once, not re-evaluated)
        for _ in range(self.config.max_rounds):
            progress = 0
            if self.config.shapes and any(n.op in ("Shape", "Size") and gu.is_standard(n) for n in graph.nodes):
                progress += self._fold_shapes(model, stats)
            progress += self._fold_constants(model, limit, stats)
            stats["rounds"] += 1
            if not progress:
                break
        stats.update(Counter(self._kept.values()))
        changed = stats["nodes_folded"] + stats["shape_nodes_folded"] > 0
        return PassResult(changed=changed, stats=dict(stats))

    # ---- Shape / Size of statically shaped tensors --------------------------------------
    def _fold_shapes(self, model, stats: Counter) -> int:
        facts = gu.infer_types(model.to_proto(weights=False))  # shapes only: no copy of the weights
        graph, done = model.graph, []
        guarded = _if_condition_ancestors(graph)
        for node in graph.nodes:
            if node.op not in ("Shape", "Size") or not gu.is_standard(node) or not node.inputs:
                continue
            if id(node) in guarded:
                # An If whose condition turns constant is inlined by ORT, and ORT's strict shape
                # inference then rejects branches that ran fine (e.g. Range of 1-element tensors).
                stats["shape_nodes_kept_for_if"] += 1
                continue
            shape = gu.static_shape(facts, node.inputs[0])
            if shape is None or not node.outputs:
                continue
            if node.op == "Shape":
                start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
                value = np.array(shape[start:end], dtype=np.int64)  # python slicing clamps like ONNX
            else:
                value = np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
            out = node.outputs[0]
            out.to_constant(value)
            node.outputs.clear()
            node.inputs.clear()
            done.append(node)
        _drop(graph, done)
        stats["shape_nodes_folded"] += len(done)
        return len(done)

    # ---- nodes whose inputs are all constant -------------------------------------------
    def _fold_constants(self, model, limit: int, stats: Counter) -> int:
        graph = model.graph
        foldable: list[gs.Node] = []
        produced: set[int] = set()
        for node in graph.nodes:  # topologically sorted by the pipeline / to_proto
            if not _foldable_op(node) or id(node) in self._kept:
                continue
            if all(gu.is_constant(t, graph) or t.name == "" or id(t) in produced for t in node.inputs):
                foldable.append(node)
                produced.update(id(t) for t in node.outputs if t.name)
        if not foldable:
            return 0
        values = _evaluate(model, foldable, stats)

        # Decide, from the consumers' side, which folded tensors become initializers and which
        # nodes stay (their result is too large or could not be computed or stored).
        members = {id(n) for n in foldable}
        consumers = gu.consumers_map(graph)
        outputs = {id(t) for t in graph.outputs}
        frontier = [t for n in foldable for t in n.outputs if t.name and
                    (id(t) in outputs or any(id(c) not in members for c in consumers.get(id(t), [])))]
        keep: set[int] = set()
        materialize: dict[int, gs.Tensor] = {}
        seen: set[int] = set()
        while frontier:
            tensor = frontier.pop()
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            producer = tensor.inputs[0]
            value = values.get(id(tensor))
            growth = _nbytes(tensor, values) - sum(_nbytes(t, values) for t in producer.inputs)
            if _storable(value) and growth <= limit:
                materialize[id(tensor)] = tensor
                continue
            if id(producer) not in keep:
                self._kept[id(producer)] = "skipped_too_large" if _storable(value) else "skipped_cannot_evaluate"
                keep.add(id(producer))
                frontier.extend(t for t in producer.inputs if id(t) in produced)
        removed = [n for n in foldable if id(n) not in keep]
        if not removed:
            return 0
        for tensor in materialize.values():
            tensor.to_constant(values[id(tensor)])
        for node in removed:
            node.outputs.clear()
            node.inputs.clear()
        _drop(graph, removed)
        stats["nodes_folded"] += len(removed)
        return len(removed)


def _if_condition_ancestors(graph: gs.Graph) -> set[int]:
    """ids of the nodes an If condition (of this graph or a subgraph) is computed from."""
    seen: set[int] = set()
    stack = [n.inputs[0] for n in gu.iter_nodes(graph) if n.op == "If" and n.inputs]
    while stack:
        tensor = stack.pop()
        for producer in tensor.inputs:
            if id(producer) not in seen:
                seen.add(id(producer))
                stack.extend(producer.inputs)
    return seen


def _drop(graph: gs.Graph, nodes: list[gs.Node]) -> None:
    gone = {id(n) for n in nodes}
    graph.nodes = [n for n in graph.nodes if id(n) not in gone]


# ---- evaluation ---------------------------------------------------------------------------
def _evaluate(model, nodes: list[gs.Node], stats: Counter) -> dict[int, np.ndarray]:
    """Values of every output of `nodes` (id(tensor) -> array): one ORT session for the batch,
    then node by node (ORT, then the reference evaluator) for whatever the batch could not do."""
    targets = [t for n in nodes for t in n.outputs if t.name]
    try:
        results = _run_ort(model, nodes, targets, {})
        stats["ort_batches"] += 1
        return {id(t): v for t, v in zip(targets, results)}
    except Exception:  # noqa: BLE001 - onnx/ORT raise many exception types
        stats["batch_fallbacks"] += 1
    values: dict[int, np.ndarray] = {}
    for node in nodes:
        inputs = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
        if any(id(t) not in values for t in inputs):
            continue  # an input could not be computed: neither can this node
        outs = [t for t in node.outputs if t.name]
        feeds = {id(t): values[id(t)] for t in inputs}
        try:
            results = _run_ort(model, [node], outs, feeds)
            stats["ort_nodes"] += 1
        except Exception:  # noqa: BLE001 - onnx/ORT raise many exception types
            try:
                results = _run_reference(model, node, outs, feeds)
                stats["reference_nodes"] += 1
            except Exception:  # noqa: BLE001 - onnx/ORT raise many exception types
                stats["nodes_not_evaluable"] += 1
                continue
        values.update({id(t): np.asarray(v) if v is not None else v for t, v in zip(outs, results)})
    return values


def _subgraph_proto(model, nodes, targets, feeds) -> onnx.ModelProto:
    """A model made of `nodes`, their constant inputs as initializers, `targets` as outputs;
    tensors in `feeds` (id -> array) are given as initializers too."""
    sub = gs.Graph(nodes=list(nodes), inputs=[], outputs=[], opset=model.graph.opset,
                   import_domains=model.graph.import_domains)
    proto = gs.export_onnx(sub, do_type_check=False)
    names = {t.name for t in targets}
    by_id = {id(t): t for n in nodes for t in n.inputs}
    for key, value in feeds.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(value, by_id[key].name))
    # Drop anything the exporter listed as an output or value_info; we ask for exactly `targets`.
    del proto.graph.output[:]
    del proto.graph.value_info[:]
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in [t.name for t in targets] if n in names)
    opsets = dict(model.opset_imports)
    opsets[""] = model.graph.opset
    del proto.opset_import[:]
    proto.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets.items())
    try:
        minimum = onnx.helper.find_min_ir_version_for(list(proto.opset_import), ignore_unknown=True)
    except Exception:  # noqa: BLE001 - onnx/ORT raise many exception types
        minimum = 4
    proto.ir_version = max(model.ir_version, minimum, 4)
    return proto


def _run_ort(model, nodes, targets, feeds) -> list:
    from onnxcomp.runtime import make_session

    proto = _subgraph_proto(model, nodes, targets, feeds)
    import onnxruntime as ort

    session = make_session(proto, "cpu", threads=1, optimize=False)
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failed batch is expected and handled: no ERROR lines
    return session.run([t.name for t in targets], {}, quiet)


def _run_reference(model, node, targets, feeds) -> list:
    from onnx.reference import ReferenceEvaluator

    proto = _subgraph_proto(model, [node], targets, feeds)
    return ReferenceEvaluator(proto).run([t.name for t in targets], {})
