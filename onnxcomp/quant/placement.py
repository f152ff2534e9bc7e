"""Where Q/DQ pairs go so that ONNX Runtime's CPU EP turns them into integer kernels.

ORT's QDQ transformer fuses a node with its DequantizeLinear inputs and QuantizeLinear output:
  DQ(x), DQ(w int8), DQ(b int32) -> Conv -> Q            => QLinearConv
  DQ(a), DQ(b) -> MatMul -> Q                            => QLinearMatMul
  DQ(a), DQ(b) -> MatMul  (float out)                    => MatMulIntegerToFloat
  DQ(a), DQ(b), DQ(c int32) -> Gemm [-> Q]               => QGemm
  DQ, DQ -> Add|Mul -> Q                                 => QLinearAdd / QLinearMul
  DQ... -> Concat -> Q                                   => QLinearConcat
  DQ -> AveragePool|GlobalAveragePool|Sigmoid|LeakyRelu -> Q => QLinear<op>
  DQ -> MaxPool|Reshape|Transpose|... -> Q (same scale)  => the op on uint8, Q/DQ dropped
and a Relu (or Clip(0, x)) between a quantized node and its output Q is absorbed by the Q's
saturation when the output range starts at 0 (asymmetric activations).

So: the *anchor* ops (Conv, MatMul, Gemm) are always quantized when their weights allow; the
*follower* ops are quantized only when every float input comes from a quantized node and at
least one consumer is quantized (otherwise their Q/DQ would only add work); Conv always gets
an output Q (QLinearConv needs it); MatMul/Gemm only when a consumer is quantized (else they
keep a float output, which ORT runs as MatMulIntegerToFloat / QGemm with float output).
Tensors whose parameters must match (the input and output of MaxPool/Reshape/..., every input
and the output of Concat) are grouped so that they share one scale and zero point.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

ANCHORS = ("Conv", "MatMul", "Gemm")
BINARY = ("Add", "Mul")
OWN_KERNEL = ("AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu")
SAME_SCALE = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Resize", "Slice")
REMOVABLE = ("Relu", "Clip")
DEFAULT_OPS = ANCHORS + BINARY + ("Concat",) + OWN_KERNEL + SAME_SCALE + REMOVABLE


@dataclass
class WeightUse:
    node: gs.Node
    index: int  # input index
    axis: int | None  # per-channel axis (None: per tensor)


@dataclass
class Plan:
    nodes: list[gs.Node] = field(default_factory=list)  # quantized nodes (anchors + followers)
    activations: list[str] = field(default_factory=list)  # tensors that get one Q/DQ pair
    weights: list[WeightUse] = field(default_factory=list)
    biases: list[tuple[gs.Node, int, str, WeightUse]] = field(default_factory=list)  # node, index, input act, weight
    absorbed: list[gs.Node] = field(default_factory=list)  # Relu/Clip folded into the producer's Q
    groups: list[set[str]] = field(default_factory=list)  # tensors sharing one scale/zero point
    skipped: dict[str, str] = field(default_factory=dict)  # node name -> why it stays float

    def anchors(self) -> list[gs.Node]:
        return [n for n in self.nodes if n.op in ANCHORS]


def _is_float_const(t) -> bool:
    return isinstance(t, gs.Constant) and np.dtype(t.values.dtype) == np.float32


def _matches(node: gs.Node, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(node.op, p) for p in patterns)


def _has_subgraph(node: gs.Node) -> bool:
    return any(isinstance(v, gs.Graph) for v in node.attrs.values())


def weight_axis(node: gs.Node, index: int, ndim: int, per_channel: bool) -> int | None:
    """The output-channel axis of a weight input, or None for per-tensor."""
    if not per_channel or ndim < 1:
        return None
    if node.op == "Conv" and index == 1:
        return 0
    if node.op == "Gemm" and index == 1:
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul" and index == 1 and ndim >= 2:
        return ndim - 1
    return None


def fold_batchnorm(model) -> int:
    """Conv -> BatchNormalization (inference, constant statistics) => Conv with scaled weights.

    ORT cannot run BatchNormalization on integers, so a BN left between a Conv and its output Q
    would cost a DQ -> BN -> Q round trip; folded, the Conv fuses into QLinearConv. The folding
    itself is the `fuse` pass's, with its other rewrites turned off.
    """
    from onnxcomp.context import PassContext
    from onnxcomp.passes.fuse import Fuse

    only_bn = Fuse(gemm=False, transposes=False, reshapes=False, conv_affine=False)
    return int(only_bn.run(model, PassContext()).stats.get("batchnorm_folded", 0))


def name_nodes(graph: gs.Graph) -> int:
    """Give every unnamed or duplicate-named node a unique name, in the graph and its subgraphs
    (plans and fallback refer to nodes by name, model-wide)."""
    from onnxcomp.subgraphs import scopes

    seen: set[str] = set()
    renamed = 0
    for scope in scopes(graph):
        for i, node in enumerate(scope.graph.nodes):
            if not node.name or node.name in seen:
                base = f"{node.op}_{i}" if scope.is_main else f"{scope.path.replace('/', '_')}_{node.op}_{i}"
                name, k = base, 1
                while name in seen:
                    name, k = f"{base}_{k}", k + 1
                node.name = name
                renamed += 1
            seen.add(node.name)
    return renamed


def make_plan(graph: gs.Graph, float_tensors: set[str], *, ops: tuple[str, ...] = DEFAULT_OPS,
              exclude: tuple[str, ...] = (), per_channel: bool = False, symmetric_activations: bool = False,
              quantize_biases: bool = True) -> Plan:
    """Decide which nodes run quantized and which tensors get Q/DQ (the graph is not edited)."""
    plan = Plan()
    graph.toposort()
    outputs = {t.name for t in graph.outputs}
    quantized: dict[str, gs.Node] = {}
    absorbed: dict[str, gs.Node] = {}

    def act(t) -> bool:  # a float activation we may quantize
        return isinstance(t, gs.Variable) and t.name in float_tensors

    def producer(t):
        return t.inputs[0] if isinstance(t, gs.Variable) and len(t.inputs) == 1 else None

    def from_quantized(t) -> bool:
        p = producer(t)
        return p is not None and (p.name in quantized or p.name in absorbed)

    for node in graph.nodes:
        if node.op not in ops or node.domain not in ("", None, "ai.onnx") or _has_subgraph(node):
            continue
        if _matches(node, exclude):
            plan.skipped[node.name] = "excluded"
            continue
        inputs = [t for t in node.inputs if t is not None and t.name]
        if any(producer(t) is not None and producer(t).op in ("DequantizeLinear", "QuantizeLinear")
               for t in inputs):
            plan.skipped[node.name] = "already quantized"
            continue
        if node.op in ANCHORS:
            why = _anchor_problem(node, act)
            if why:
                plan.skipped[node.name] = why
                continue
            quantized[node.name] = node
        elif node.op in REMOVABLE:
            p = producer(node.inputs[0])
            if (not symmetric_activations and p is not None and p.name in quantized and p.op in ANCHORS + BINARY
                    and len(node.inputs[0].outputs) == 1 and node.inputs[0].name not in outputs
                    and _clip_starts_at_zero(node) and act(node.outputs[0])):
                absorbed[node.name] = node
        elif node.op in BINARY + ("Concat",):
            if inputs and all(act(t) and from_quantized(t) for t in inputs):
                quantized[node.name] = node
        elif node.op in OWN_KERNEL + SAME_SCALE:
            if inputs and act(inputs[0]) and from_quantized(inputs[0]) and act(node.outputs[0]):
                quantized[node.name] = node

    # followers whose result no quantized node reads would only add Q/DQ work: drop them
    for node in reversed(graph.nodes):
        if node.name in quantized and node.op not in ANCHORS:
            readers = [c for c in node.outputs[0].outputs]
            if not any(c.name in quantized or c.name in absorbed for c in readers):
                del quantized[node.name]
                plan.skipped[node.name] = "no quantized consumer"

    plan.nodes = [n for n in graph.nodes if n.name in quantized]
    plan.absorbed = [n for n in graph.nodes if n.name in absorbed]
    chosen: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name not in seen:
            seen.add(name)
            chosen.append(name)

    absorbed_after = {n.inputs[0].name: n for n in plan.absorbed}
    for node in plan.nodes:
        for i, t in enumerate(node.inputs):
            if t is None or not t.name:
                continue
            if act(t):
                if node.op in SAME_SCALE + OWN_KERNEL and i > 0:
                    continue
                add(t.name)
            elif _is_float_const(t) and node.op in ANCHORS:
                if i == 2 and node.op in ("Conv", "Gemm"):
                    continue
                plan.weights.append(WeightUse(node, i, weight_axis(node, i, t.values.ndim, per_channel)))
        out = node.outputs[0]
        readers = out.outputs
        wants_output = node.op == "Conv" or any(c.name in quantized or c.name in absorbed for c in readers)
        if wants_output and act(out):
            add(absorbed_after[out.name].outputs[0].name if out.name in absorbed_after else out.name)
    plan.activations = chosen

    # biases: int32 with scale = input scale * weight scale (needs a quantized input and weight)
    if quantize_biases:
        for use in plan.weights:
            node = use.node
            if node.op not in ("Conv", "Gemm") or use.index != 1 or len(node.inputs) < 3:
                continue
            bias, x = node.inputs[2], node.inputs[0]
            if not _is_float_const(bias) or bias.values.ndim != 1 or x.name not in seen:
                continue
            if node.op == "Gemm" and (float(node.attrs.get("alpha", 1.0)) != 1.0
                                      or float(node.attrs.get("beta", 1.0)) != 1.0
                                      or int(node.attrs.get("transA", 0))):
                continue
            plan.biases.append((node, 2, x.name, use))

    plan.groups = _groups(plan, seen)
    return plan


def _anchor_problem(node: gs.Node, act) -> str:
    inputs = node.inputs
    if len(inputs) < 2 or inputs[0] is None or inputs[1] is None:
        return "missing input"
    a, b = inputs[0], inputs[1]
    if any(_is_float_const(t) and not np.isfinite(t.values).all() for t in inputs):
        return "a weight holds NaN or Inf (no int8 scale represents it)"
    if node.op == "Conv":
        if not _is_float_const(b):
            return "Conv weight is not a float32 constant"
        if not act(a):
            return "input is not a float32 activation"
        return ""
    if node.op == "Gemm" and int(node.attrs.get("transA", 0)):
        return "Gemm with transA"
    if not (act(a) or _is_float_const(a)) or not (act(b) or _is_float_const(b)):
        return "inputs are not float32"
    if _is_float_const(a) and _is_float_const(b):
        return "both inputs are constant (fold first)"
    return ""


def _clip_starts_at_zero(node: gs.Node) -> bool:
    if node.op == "Relu":
        return True
    lo = node.attrs.get("min")
    if lo is None and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        lo = float(np.asarray(node.inputs[1].values))
    return lo is not None and float(lo) == 0.0


def _groups(plan: Plan, chosen: set[str]) -> list[set[str]]:
    """Union-find over tensors that must share quantization parameters."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        parent[find(a)] = find(b)

    for node in plan.nodes:
        out = node.outputs[0].name
        if node.op in SAME_SCALE and out in chosen and node.inputs[0].name in chosen:
            union(node.inputs[0].name, out)
        elif node.op == "Concat" and out in chosen:
            for t in node.inputs:
                if t.name in chosen:
                    union(t.name, out)
    members: dict[str, set[str]] = {}
    for name in parent:
        members.setdefault(find(name), set()).add(name)
    return [m for m in members.values() if len(m) > 1]
