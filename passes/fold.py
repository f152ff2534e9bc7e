"""fold: constant folding, shape subgraphs included.

Rewrites
    Op(const, const, ...)                -> const            (evaluated on ONNX Runtime)
    Shape(x), Size(x)  with x's shape static -> const        (shapes from onnx shape inference)
    Gather(Shape(x), const) with the gathered dims static -> const  (the other dims may be unknown)
    Shape -> Gather -> Concat -> Reshape(x, .)  -> Reshape(x, const)   (by the above, repeated)
    If(const cond) {then} {else}         -> the taken branch's nodes   (the other branch dropped)

Every graph is folded: the main graph and every If/Loop/Scan subgraph (nested too), in one ORT
session per round. Inside a subgraph a Constant of an outer scope is a constant; the inputs of
every graph (loop counters, carried values, scan slices), outer tensors computed at run time and
main-graph inputs with a default value (an initializer listed as an input) are not. Folding a
Shape that feeds an If condition lets ORT (or us) inline that If, and ORT's strict shape inference
may then refuse the inlined branch: after such a rewrite the model is loaded on ORT once, and if
it is refused, folding starts again with If conditions left alone (stat
`if_inlining_refused_by_ort`). Stats `subgraph_nodes_before`/`_after` count subgraph nodes.

Why our own folder instead of graphsurgeon's `Graph.fold_constants`: we need (1) a size limit on
*growth* (a ConstantOfShape/Expand/Tile of a few bytes into megabytes stays a node; graphsurgeon's
`size_threshold` is an absolute cap applied after the fact), (2) bit-identical results — every
constant node is evaluated by the very ORT CPU kernel that would run it, with graph
optimizations off (graphsurgeon optimizes the folding session and silently substitutes its own
numpy shape logic), (3) an explicit, logged fallback node by node and then to onnx's
ReferenceEvaluator, and (4) honest counts of what was folded and what was skipped and why.

Never folded: nondeterministic ops (Random*, Multinomial, Bernoulli), ops of custom domains,
nodes with subgraph attributes (If/Loop/Scan; their bodies are folded, and an If with a constant
condition is replaced by its branch), sequence/optional ops, and results whose dtype
cannot be stored as a plain initializer (strings, bfloat16, float8, int4).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp import graph_utils as gu
from onnxcomp import subgraph_fold as sf
from onnxcomp.base import Pass, PassResult, param
from onnxcomp.model import constant_nbytes
from onnxcomp.registry import register
from onnxcomp.subgraphs import scopes

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
        before = sf.node_counts(model.graph)
        has_if = any(n.op == "If" for n in gu.iter_nodes(model.graph))
        snapshot = model.graph.copy() if has_if else None
        stats = self._run(model, guard_ifs=False)
        if has_if and (stats["ifs_inlined"] or stats["if_condition_nodes_folded"]) and not sf.loads_on_ort(model):
            # ORT refuses the result (strict shape inference on an inlined branch): start again,
            # leaving If conditions as they were (ORT would inline those Ifs and refuse them too)
            model.graph = snapshot
            stats = self._run(model, guard_ifs=True)
            stats["if_inlining_refused_by_ort"] = 1
        after = sf.node_counts(model.graph)
        if before[1] or after[1]:
            stats["subgraph_nodes_before"], stats["subgraph_nodes_after"] = before[1], after[1]
        changed = stats["nodes_folded"] + stats["shape_nodes_folded"] + stats["ifs_inlined"] > 0
        new_keys = ("ifs_inlined", "if_condition_nodes_folded")
        return PassResult(changed=changed, stats={k: v for k, v in stats.items() if v or k not in new_keys})

    def _run(self, model, guard_ifs: bool) -> Counter:
        stats: Counter = Counter()
        limit = int(self.config.max_growth_mb * 2**20)
        self._kept: dict[int, str] = {}  # node id -> why it stays (decided once, not re-evaluated)
        # Constant nodes first, read from their attributes (no ORT): a Gather's indices or a Slice's
        # starts are then known to the first shape round, which saves a second one (silero, PP-OCR det)
        for scope in scopes(model.graph):
            nodes = [n for n in scope.graph.nodes
                     if n.op == "Constant" and gu.is_standard(n) and n.outputs and id(n) not in self._kept]
            values = {id(n.outputs[0]): v for n in nodes if (v := _constant_node_value(n)) is not None}
            self._apply(scope.graph, [n for n in nodes if id(n.outputs[0]) in values], values, limit, stats)
        for _ in range(self.config.max_rounds):
            progress = 0
            graph = model.graph
            if self.config.shapes and any(n.op in ("Shape", "Size") and gu.is_standard(n) for n in gu.iter_nodes(graph)):
                progress += self._fold_shapes(model, stats, guard_ifs)
            progress += self._fold_constants(model, limit, stats)
            if not guard_ifs:
                inlined = sf.inline_constant_ifs(graph, model.initializer_inputs)
                stats["ifs_inlined"] += inlined
                progress += inlined
            stats["rounds"] += 1
            if not progress:
                break
        stats.update(Counter(self._kept.values()))
        return stats

    # ---- Shape / Size of statically shaped tensors --------------------------------------
    def _fold_shapes(self, model, stats: Counter, guard_ifs: bool) -> int:
        graph = model.graph
        facts = sf.model_facts(model)  # shapes only: no copy of the weights
        guarded = _if_condition_ancestors(graph)
        runtime = sf.overridable(graph, model.initializer_inputs)
        total = 0
        for scope in scopes(graph):
            known = facts.get(id(scope.graph))
            if known is None:
                continue
            done = []
            for node in scope.graph.nodes:
                if node.op not in ("Shape", "Size", "Gather", "Slice") or not gu.is_standard(node) or not node.inputs:
                    continue
                if not node.outputs or isinstance(node.outputs[0], gs.Constant):
                    continue
                value = _shape_value(node, known, runtime)
                if value is None:
                    continue
                if id(node) in guarded:
                    # An If whose condition turns constant is inlined by ORT, and ORT's strict shape
                    # inference then rejects branches that ran fine (e.g. Range of 1-element tensors).
                    if guard_ifs:
                        stats["shape_nodes_kept_for_if"] += 1
                        continue
                    stats["if_condition_nodes_folded"] += 1
                node.outputs[0].to_constant(value)
                node.outputs.clear()
                node.inputs.clear()
                done.append(node)
            _drop(scope.graph, done)
            total += len(done)
        stats["shape_nodes_folded"] += total
        return total

    # ---- nodes whose inputs are all constant -------------------------------------------
    def _fold_constants(self, model, limit: int, stats: Counter) -> int:
        runtime = sf.overridable(model.graph, model.initializer_inputs)
        work = [(scope.graph, _foldable_nodes(scope.graph, runtime, self._kept)) for scope in scopes(model.graph)]
        work = [(g, nodes) for g, nodes in work if nodes]
        if not work:
            return 0
        names = [t.name for _, nodes in work for n in nodes for t in n.outputs if t.name]
        if len(set(names)) == len(names):  # one ORT session for every graph
            values = _evaluate(model, [n for _, nodes in work for n in nodes], stats)
        else:  # a name used in two sibling graphs: one session per graph
            values = {}
            for _, nodes in work:
                values.update(_evaluate(model, nodes, stats))
        return sum(self._apply(g, nodes, values, limit, stats) for g, nodes in work)

    def _apply(self, graph: gs.Graph, foldable: list, values: dict, limit: int, stats: Counter) -> int:
        # Decide, from the consumers' side, which folded tensors become initializers and which
        # nodes stay (their result is too large or could not be computed or stored).
        produced = {id(t) for n in foldable for t in n.outputs if t.name}
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


def _foldable_nodes(graph: gs.Graph, runtime: set[int], kept: dict) -> list[gs.Node]:
    """Nodes of `graph` (in order) whose inputs are constants of this or an outer graph, or
    results of earlier foldable nodes; never an input of any graph (known at run time only)."""
    foldable: list[gs.Node] = []
    produced: set[int] = set()
    for node in graph.nodes:  # topologically sorted by the pipeline / to_proto
        if not _foldable_op(node) or id(node) in kept:
            continue
        if all(sf.is_known(t, runtime) or t.name == "" or id(t) in produced for t in node.inputs):
            foldable.append(node)
            produced.update(id(t) for t in node.outputs if t.name)
    return foldable


def _shape_value(node: gs.Node, facts: dict, runtime: set[int]) -> np.ndarray | None:
    """The value of Shape(x)/Size(x) with x's shape static, or of Gather(Shape(x), const) or
    Slice(Shape(x), const...) whose selected dimensions are static (the others may be unknown);
    Shape(x) may be seen through an integer Cast (paddle2onnx casts shapes to int32 first)."""
    if node.op in ("Gather", "Slice"):
        return _part_of_shape(node, facts, runtime)
    shape = gu.static_shape(facts, node.inputs[0])
    if shape is None:
        return None
    if node.op == "Shape":
        start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
        return np.array(shape[start:end], dtype=np.int64)  # python slicing clamps like ONNX
    return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)


def _part_of_shape(node: gs.Node, facts: dict, runtime: set[int]) -> np.ndarray | None:
    source = node.inputs[0]
    dims, dtype = _shape_dims(source, facts)
    # by position: an omitted optional input ("") is None, so Slice's steps never pass for its axes
    params = [(sf.is_known(t, runtime) and np.asarray(t.values)) if t.name else None for t in node.inputs[1:]]
    if dims is None or not params or params[0] is None or \
            any(p is False or (p is not None and p.dtype.kind not in "iu") for p in params):
        return None
    if node.op == "Gather":
        idx = params[0]
        if node.attrs.get("axis", 0) not in (0, -1) or idx.size == 0:
            return None
        flat = [int(i) + len(dims) if int(i) < 0 else int(i) for i in idx.reshape(-1)]
        if any(i < 0 or i >= len(dims) for i in flat):
            return None
        picked, out_shape = [dims[i] for i in flat], idx.shape
    else:  # Slice with 1-D starts, ends (axes 0, steps 1 or more)
        given = params + [None] * (4 - len(params))
        starts, ends = given[0].reshape(-1), given[1].reshape(-1) if given[1] is not None else None
        axes = given[2].reshape(-1) if given[2] is not None else np.zeros(1, np.int64)
        steps = given[3].reshape(-1) if given[3] is not None else np.ones(1, np.int64)
        if ends is None or not (starts.size == ends.size == axes.size == steps.size == 1) or \
                int(axes[0]) not in (0, -1) or int(steps[0]) < 1:
            return None
        picked = dims[slice(int(starts[0]), int(ends[0]), int(steps[0]))]  # python clamps like ONNX for step > 0
        out_shape = (len(picked),)
    if any(d is None or d < 0 for d in picked):
        return None
    if dtype == np.int32 and any(d >= 2**31 for d in picked):
        return None
    return np.array(picked, dtype=dtype).reshape(out_shape)


def _shape_dims(tensor: gs.Tensor, facts: dict) -> tuple[list | None, type]:
    """x's dims (None where unknown) when `tensor` is Shape(x) or an integer Cast of it, with the dtype."""
    dtype = np.int64
    producer = tensor.inputs[0] if not isinstance(tensor, gs.Constant) and len(tensor.inputs) == 1 else None
    if producer is not None and producer.op == "Cast" and gu.is_standard(producer):
        dtype = {6: np.int32, 7: np.int64}.get(int(producer.attrs.get("to", 0)))
        source = producer.inputs[0] if producer.inputs else None
        producer = source.inputs[0] if source is not None and len(source.inputs) == 1 else None
    if producer is None or dtype is None or producer.op != "Shape" or not gu.is_standard(producer) or not producer.inputs:
        return None, np.int64
    x = producer.inputs[0]
    full = tuple(int(d) for d in x.shape) if isinstance(x, gs.Constant) else facts.get(x.name, (None, None))[1]
    if full is None:
        return None, np.int64
    full = [d if isinstance(d, int) else None for d in full]
    return full[producer.attrs.get("start", 0):producer.attrs.get("end", None)], dtype


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
    values = {id(n.outputs[0]): v for n in nodes if (v := _constant_node_value(n)) is not None}
    nodes = [n for n in nodes if id(n.outputs[0]) not in values]  # (paddle2onnx: 60 % Constant nodes)
    targets = [t for n in nodes for t in n.outputs if t.name]
    if not nodes:
        return values
    inputs = {id(t) for n in nodes for t in n.inputs}
    try:
        results = _run_ort(model, nodes, targets, {k: v for k, v in values.items() if k in inputs})
        stats["ort_batches"] += 1
        return values | {id(t): v for t, v in zip(targets, results)}
    except Exception:  # noqa: BLE001 - onnx/ORT raise many exception types
        stats["batch_fallbacks"] += 1
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


_PLAIN_KINDS = "biuf"  # numpy dtypes that numpy_helper.from_array writes exactly (not bfloat16, float8, int4)


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    """The value of a Constant node read from its attribute, without ORT, for plain tensor types
    (a sparse, string or bfloat16/float8/int4 value is left to ORT, which knows their encodings)."""
    if node.op != "Constant" or not gu.is_standard(node) or len(node.outputs) != 1 or len(node.attrs) != 1:
        return None
    (key, attr), = node.attrs.items()
    if key == "value" and isinstance(attr, gs.Constant):
        dtype = attr.dtype
        if isinstance(dtype, np.dtype) and dtype.kind in _PLAIN_KINDS and getattr(attr, "export_dtype", dtype) == dtype:
            return np.asarray(attr.values)
        return None
    plain = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64, "value_ints": np.int64}
    return np.array(attr, dtype=plain[key]) if key in plain else None


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
