"""prune_channels: remove whole output channels of Conv/Gemm so the graph really shrinks.

    Conv(W[O,I,k,k]) -> BN -> Relu -> Conv(W'[O',O,k,k])   becomes   Conv(W[O-r,...]) -> ... -> Conv(W'[O',O-r,...])

Channels are followed forward from each producer (Conv with group=1, Gemm) through ops that
keep them apart — unary element-wise ops, BatchNormalization / InstanceNormalization, pools,
depthwise Conv (sliced along), element-wise ops with a per-channel constant (sliced), Concat on
the channel axis, Flatten/Reshape to [N, C·S] — to the consumers that absorb them (the input
channels of a Conv, the rows of a Gemm/MatMul weight). An element-wise op joining two channel
sets (a residual Add) unites their producers into one group pruned with the same channel set.
A group whose channels reach anything else (a graph output, Shape, Transpose, a grouped Conv,
a subgraph) is left whole. Nothing is edited until the whole graph has been analysed, so a
residual network can lose channels but never become inconsistent.

Criteria: `l1`/`l2` norms of the producers' filters (each producer's norms divided by their
mean, summed over a residual group); `hessian`: the group-OBS cost at the consumers, i.e. the
output error of each consumer when that channel's input columns are removed, tr(W_G [H⁻¹]_GG⁻¹
W_Gᵀ) / its output energy, from calibration Hessians — and the consumers' remaining weights get
the OBS compensation δW = -W_G [H⁻¹]_GG⁻¹ H⁻¹[G, :] (one-shot, per consumer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import flops
from onnxcomp import hessian as hs
from onnxcomp.base import Pass, PassResult, param
from onnxcomp.registry import register
from onnxcomp.subgraphs import has_subgraph, iter_nodes, reads_inside

UNARY = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "HardSigmoid", "HardSwish", "Elu", "Selu",
         "Softplus", "Softsign", "Identity", "Dropout", "Erf", "Neg", "Abs", "Mish", "Gelu", "ThresholdedRelu",
         "Celu", "Exp", "Sqrt", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Log"}
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "PRelu", "Pow", "Sum"}
NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}


class _Sets:
    """Union-find over producer group ids."""

    def __init__(self):
        self.parent: list[int] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass
class _Plan:
    sets: _Sets = field(default_factory=_Sets)
    size: dict[int, int] = field(default_factory=dict)              # group -> channel count
    producers: dict[int, list[gs.Node]] = field(default_factory=dict)
    lists: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # tensor -> (group, channel) per position
    actions: list[tuple] = field(default_factory=list)             # (kind, node, extra, positions)
    blocked: set[int] = field(default_factory=set)

    def block(self, positions) -> None:
        if positions is not None:
            self.blocked.update(int(g) for g in np.unique(positions[0]))


def _const_values(tensor) -> np.ndarray | None:
    """Values of a Constant, or of an Identity / Constant node fed by one."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1:
        node = tensor.inputs[0]
        if node.op == "Identity" and isinstance(node.inputs[0], gs.Constant):
            return np.asarray(node.inputs[0].values)
        if node.op == "Constant" and "value" in node.attrs and isinstance(node.attrs["value"], gs.Constant):
            return np.asarray(node.attrs["value"].values)
    return None


def _set_input(node: gs.Node, slot: int, values: np.ndarray, users: dict[str, int]) -> None:
    """Give the node's input `slot` the new values (a private Constant when shared)."""
    tensor = node.inputs[slot]
    if isinstance(tensor, gs.Constant) and users.get(tensor.name, 0) <= 1:
        tensor.values = np.ascontiguousarray(values)
        return
    node.inputs[slot] = gs.Constant(f"{node.name or 'node'}_{slot}_pruned_{id(node) % 100000}",
                                    np.ascontiguousarray(values))


def _conv_is_plain(node) -> bool:
    return node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and len(node.inputs) >= 2 \
        and isinstance(node.inputs[1], gs.Constant)


def analyse(model, shapes: dict[str, tuple]) -> _Plan:
    """Follow every producer's channels to their consumers; nothing is edited."""
    plan = _Plan()
    graph = model.graph
    graph.toposort()
    for node in graph.nodes:
        ins = [plan.lists.get(t.name) if isinstance(t, gs.Variable) else None for t in node.inputs]
        carried = [i for i, x in enumerate(ins) if x is not None]
        out = None
        op = node.op
        if has_subgraph(node):  # channels read inside (nested) subgraphs stay whole
            for i in carried:
                plan.block(ins[i])
            for t in reads_inside(node):
                plan.block(plan.lists.get(t.name))
        elif carried:
            out = _follow(plan, node, ins, carried, shapes)
        if out is not None:
            plan.lists[node.outputs[0].name] = out
        if _conv_is_plain(node) or (op == "Gemm" and len(node.inputs) >= 2 and isinstance(node.inputs[1], gs.Constant)):
            w = np.asarray(node.inputs[1].values)
            channels = w.shape[0] if op == "Conv" or node.attrs.get("transB", 0) else w.shape[1]
            gid = plan.sets.new()
            plan.size[gid] = int(channels)
            plan.producers[gid] = [node]
            plan.actions.append(("out", node, None, (np.full(channels, gid), np.arange(channels))))
            plan.lists[node.outputs[0].name] = (np.full(channels, gid), np.arange(channels))
    for t in graph.outputs:
        plan.block(plan.lists.get(t.name))
    # a blocked group blocks everything it is united with
    roots_blocked = {plan.sets.find(g) for g in plan.blocked}
    plan.blocked = {g for g in plan.size if plan.sets.find(g) in roots_blocked}
    return plan


def _follow(plan: _Plan, node: gs.Node, ins, carried, shapes) -> tuple | None:
    """The (group, channel) list of the node's output, recording the edits it needs."""
    op = node.op
    first = ins[carried[0]]
    n = len(first[0])
    if carried != [0] and op not in BINARY and op != "Concat":
        for i in carried:
            plan.block(ins[i])
        return None
    if op in UNARY and len(node.outputs) >= 1:
        if op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            plan.block(first)
            return None
        return first
    if op in NORMS:
        values = [_const_values(node.inputs[i]) if i < len(node.inputs) else None for i in NORMS[op]]
        if all(v is not None and v.shape == (n,) for v in values):
            plan.actions.append(("norm", node, NORMS[op], first))
            return first
    elif op in POOLS:
        if len(node.outputs) == 1 or not node.outputs[1].outputs:
            return first
    elif op in BINARY:
        variables = [i for i, t in enumerate(node.inputs) if not isinstance(t, gs.Constant)
                     and _const_values(t) is None]
        if set(variables) == set(carried):
            others = [ins[i] for i in carried[1:]]
            if all(len(o[0]) == n for o in others):
                if all(np.array_equal(o[0], first[0]) and np.array_equal(o[1], first[1]) for o in others):
                    return first
                if all(np.array_equal(o[1], first[1]) for o in others) and _unite(plan, first, others):
                    return first
        elif len(carried) == 1 and len(variables) == 1:
            rank = len(shapes.get(node.outputs[0].name, ()) or shapes.get(node.inputs[0].name, ()) or ())
            slices = []
            ok = rank >= 2
            for i, t in enumerate(node.inputs):
                if i == carried[0] or not ok:
                    continue
                v = _const_values(t)
                axis = 1 - (rank - v.ndim)
                if axis < 0 or v.shape[axis] == 1:
                    continue
                if v.shape[axis] == n:
                    slices.append((i, axis))
                else:
                    ok = False
            if ok:
                if slices:
                    plan.actions.append(("bcast", node, slices, first))
                return first
    elif op == "Concat":
        rank = len(shapes.get(node.outputs[0].name, ()) or ())
        axis = int(node.attrs.get("axis", 0))
        if rank and axis < 0:
            axis += rank
        if axis == 1:
            parts = []
            for i, t in enumerate(node.inputs):
                if ins[i] is not None:
                    parts.append(ins[i])
                    continue
                shape = shapes.get(t.name)
                if not shape or len(shape) < 2:
                    break
                gid = plan.sets.new()  # channels from elsewhere: a fixed, blocked group
                plan.size[gid] = int(shape[1])
                plan.blocked.add(gid)
                plan.producers[gid] = []
                parts.append((np.full(shape[1], gid), np.arange(shape[1])))
            else:
                return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    elif op == "Flatten":
        shape = shapes.get(node.inputs[0].name)
        if int(node.attrs.get("axis", 1)) == 1 and shape and len(shape) >= 2 and shape[1] == n:
            spatial = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            return (np.repeat(first[0], spatial), np.repeat(first[1], spatial))
    elif op == "Reshape":
        shape = shapes.get(node.inputs[0].name)
        target = _const_values(node.inputs[1])
        if shape and len(shape) >= 2 and shape[1] == n and target is not None and target.shape == (2,) \
                and target[1] in (-1, int(np.prod(shape[1:]))) and target[0] in (0, -1, shape[0]) \
                and not (target[0] == -1 and target[1] == -1):
            spatial = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            if target[1] != -1:
                plan.actions.append(("reshape", node, spatial, first))
            return (np.repeat(first[0], spatial), np.repeat(first[1], spatial))
    elif op == "Conv" and len(node.inputs) >= 2 and isinstance(node.inputs[1], gs.Constant):
        w = np.asarray(node.inputs[1].values)
        group = int(node.attrs.get("group", 1))
        if group == 1 and w.shape[1] == n:
            plan.actions.append(("in_conv", node, None, first))
            return None
        if group == n and w.shape[0] == n and w.shape[1] == 1:  # depthwise, multiplier 1
            plan.actions.append(("depthwise", node, None, first))
            return first
    elif op in ("Gemm", "MatMul") and len(node.inputs) >= 2 and isinstance(node.inputs[1], gs.Constant):
        w = np.asarray(node.inputs[1].values)
        rank = len(shapes.get(node.inputs[0].name, ()) or ())
        trans_a = op == "Gemm" and node.attrs.get("transA", 0)
        k_axis = (1 if node.attrs.get("transB", 0) else 0) if op == "Gemm" else 0
        if rank == 2 and not trans_a and w.ndim == 2 and w.shape[k_axis] == n:
            plan.actions.append(("in_matrix", node, k_axis, first))
            return None
    plan.block(first)
    for i in carried[1:]:
        plan.block(ins[i])
    return None


def _unite(plan: _Plan, first, others) -> bool:
    """Residual join: position p of every input is the same channel -> one group."""
    for other in others:
        a_groups, b_groups = np.unique(first[0]), np.unique(other[0])
        if len(a_groups) != 1 or len(b_groups) != 1:
            # several groups per side (Concat then Add): each position pair must line up group-wise
            pairs = {(int(a), int(b)) for a, b in zip(first[0], other[0])}
            if len({a for a, _ in pairs}) != len(pairs) or len({b for _, b in pairs}) != len(pairs):
                plan.block(first)
                plan.block(other)
                return False
        for a, b in {(int(a), int(b)) for a, b in zip(first[0], other[0])}:
            if plan.size.get(a) != plan.size.get(b):
                plan.block(first)
                plan.block(other)
                return False
            plan.sets.union(a, b)
    return True


@register
class PruneChannels(Pass):
    """Remove whole Conv/Gemm output channels and shrink every consumer (structured pruning)."""

    name = "prune_channels"
    lossless = False

    @dataclass(frozen=True)
    class Config:
        sparsity: float = param(0.5, "fraction of each prunable group's output channels removed", min=0.0, max=0.99)
        criterion: str = param("l1", "channel importance: filter norm, or Hessian (group OBS at the consumers, "
                               "with their weights compensated)", choices=("l1", "l2", "hessian"))
        min_channels: int = param(1, "never leave a layer with fewer channels", min=1)
        include: tuple[str, ...] = param((), "only producers with these node/weight names (fnmatch patterns)")
        exclude: tuple[str, ...] = param((), "never producers with these node/weight names (fnmatch patterns)")
        samples: int = param(64, "hessian: calibration samples used", min=1)
        damp: float = param(0.01, "hessian: dampening, a fraction of the mean Hessian diagonal", min=0.0, max=1.0)

    def backoff(self, shortfall: float = 1.0):
        """For the accuracy gate: remove fewer channels (a third fewer each time)."""
        sparsity = self.config.sparsity * 2 / 3
        return None if sparsity < 0.05 else self.with_params(sparsity=round(sparsity, 4))

    def run(self, model, ctx) -> PassResult:
        import fnmatch

        cfg = self.config
        data = ctx.calibration or ctx.evaluation
        sample = next(iter(data), None) if data is not None else None
        input_shapes = {k: tuple(np.shape(v)) for k, v in sample.items()} if sample else None
        before = flops.count(model, input_shapes)
        shapes = flops._shapes(flops._static_proto(model, input_shapes))
        plan = analyse(model, shapes)
        roots: dict[int, list[int]] = {}
        for g in plan.size:
            roots.setdefault(plan.sets.find(g), []).append(g)

        def named(node) -> list[str]:
            return [node.name or "", node.inputs[1].name]

        prunable = {}
        for root, members in roots.items():
            if any(g in plan.blocked for g in members):
                continue
            nodes = [n for g in members for n in plan.producers[g]]
            names = [x for n in nodes for x in named(n)]
            if cfg.include and not any(fnmatch.fnmatchcase(x, p) for x in names for p in cfg.include):
                continue
            if cfg.exclude and any(fnmatch.fnmatchcase(x, p) for x in names for p in cfg.exclude):
                continue
            size = plan.size[root]
            remove = min(int(np.floor(cfg.sparsity * size)), size - cfg.min_channels)
            if remove > 0:
                prunable[root] = remove
        total_groups = len(roots)
        if not prunable:
            return PassResult(False, {"groups": total_groups, "groups_pruned": 0, "channels_removed": 0,
                                      "flops_before": before["flops"], "flops_after": before["flops"],
                                      "params_before": before["params"], "params_after": before["params"]})
        sinks = [a for a in plan.actions if a[0] in ("in_conv", "in_matrix")]
        hessians = {}
        if cfg.criterion == "hessian":
            feeds = ctx.require_calibration(self.name)
            layers = [hs.WeightLayer(a[1].inputs[1], [a[1]]) for a in sinks if _touches(plan, a[3], prunable)]
            hessians = hs.layer_hessians(model, layers, feeds, cfg.samples)
        scores = self._scores(plan, roots, prunable, sinks, hessians)
        keep: dict[int, np.ndarray] = {}  # root -> boolean mask over channels
        for root, remove in prunable.items():
            order = np.argsort(scores[root], kind="stable")
            mask = np.ones(plan.size[root], dtype=bool)
            mask[order[:remove]] = False
            keep[root] = mask
        removed = self._apply(model, plan, keep, hessians)
        for t in model.graph.tensors().values():  # shapes of intermediate tensors are stale now
            if isinstance(t, gs.Variable) and t not in model.graph.inputs and t not in model.graph.outputs:
                t.shape = None
        model.graph.cleanup()
        after = flops.count(model, input_shapes)
        return PassResult(True, {
            "groups": total_groups, "groups_pruned": len(keep), "channels_removed": removed,
            "flops_before": before["flops"], "flops_after": after["flops"],
            "params_before": before["params"], "params_after": after["params"],
            "flops_ratio": after["flops"] / before["flops"] if before["flops"] else 1.0,
        })

    # ---- importance ----------------------------------------------------------------------
    def _scores(self, plan, roots, prunable, sinks, hessians) -> dict[int, np.ndarray]:
        cfg = self.config
        scores = {}
        for root in prunable:
            total = np.zeros(plan.size[root])
            if cfg.criterion in ("l1", "l2"):
                for g in roots[root]:
                    for node in plan.producers[g]:
                        w = np.asarray(node.inputs[1].values, dtype=np.float64)
                        if node.op == "Gemm" and not node.attrs.get("transB", 0):
                            w = w.T
                        w = w.reshape(w.shape[0], -1)
                        norm = np.abs(w).sum(1) if cfg.criterion == "l1" else np.sqrt((w ** 2).sum(1))
                        total += norm / max(norm.mean(), 1e-30)
            scores[root] = total
        if cfg.criterion != "hessian":
            return scores
        for kind, node, extra, positions in sinks:
            name = node.inputs[1].name
            if name not in hessians:
                continue
            layer = hs.WeightLayer(node.inputs[1], [node])
            rows = layer.to_rows(np.asarray(node.inputs[1].values, dtype=np.float64))[0]
            h = hessians[name][0]
            hinv = hs.damped_inverse(h, cfg.damp)
            energy = max(hs.output_energy(rows, h), 1e-30)
            taps = rows.shape[1] // len(positions[0])
            for root in prunable:
                member = np.array([plan.sets.find(int(g)) == root for g in positions[0]])
                if not member.any():
                    continue
                for c in range(plan.size[root]):
                    pos = np.nonzero(member & (positions[1] == c))[0]
                    if len(pos):
                        cols = (np.arange(taps)[:, None] * len(positions[0]) + pos[None, :]).ravel()
                        scores[root][c] += hs.group_obs_loss(rows, hinv, cols) / energy
        return scores

    # ---- edits ---------------------------------------------------------------------------
    def _apply(self, model, plan, keep, hessians) -> int:
        cfg = self.config
        users: dict[str, int] = {}
        for node in iter_nodes(model.graph):  # readers inside subgraphs too: a shared weight gets a copy
            for t in node.inputs:
                users[t.name] = users.get(t.name, 0) + 1

        def kept(positions) -> np.ndarray | None:
            """Boolean keep mask over the positions, or None when no pruned group is there."""
            roots = np.array([plan.sets.find(int(g)) for g in positions[0]])
            if not any(r in keep for r in np.unique(roots)):
                return None
            mask = np.ones(len(roots), dtype=bool)
            for r in np.unique(roots):
                if r in keep:
                    at = roots == r
                    mask[at] = keep[r][positions[1][at]]
            return mask

        for kind, node, extra, positions in plan.actions:
            mask = kept(positions)
            if mask is None:
                continue
            idx = np.nonzero(mask)[0]
            if kind == "out":
                w = np.asarray(node.inputs[1].values)
                axis = 1 if node.op == "Gemm" and not node.attrs.get("transB", 0) else 0
                _set_input(node, 1, np.take(w, idx, axis=axis), users)
                if len(node.inputs) > 2 and _const_values(node.inputs[2]) is not None:
                    b = _const_values(node.inputs[2])
                    if b.ndim >= 1 and b.shape[-1] == len(mask) and (node.op == "Gemm" or b.ndim == 1):
                        _set_input(node, 2, np.take(b, idx, axis=b.ndim - 1), users)
            elif kind == "norm":
                for slot in extra:
                    _set_input(node, slot, _const_values(node.inputs[slot])[idx], users)
            elif kind == "bcast":
                for slot, axis in extra:
                    _set_input(node, slot, np.take(_const_values(node.inputs[slot]), idx, axis=axis), users)
            elif kind == "reshape":
                target = _const_values(node.inputs[1]).copy()
                target[1] = len(idx)
                _set_input(node, 1, target, users)
            elif kind == "depthwise":
                w = np.asarray(node.inputs[1].values)
                _set_input(node, 1, w[idx], users)
                if len(node.inputs) > 2 and _const_values(node.inputs[2]) is not None:
                    _set_input(node, 2, _const_values(node.inputs[2])[idx], users)
                node.attrs["group"] = len(idx)
            elif kind in ("in_conv", "in_matrix"):
                w = np.asarray(node.inputs[1].values)
                name = node.inputs[1].name
                if name in hessians:  # OBS: the kept inputs take over what the removed ones did
                    layer = hs.WeightLayer(node.inputs[1], [node])
                    rows = layer.to_rows(w.astype(np.float64))
                    taps = rows.shape[2] // len(mask)
                    gone = np.nonzero(~mask)[0]
                    cols = (np.arange(taps)[:, None] * len(mask) + gone[None, :]).ravel()
                    rows[0] = hs.group_obs_remove(rows[0], hessians[name][0], cols, cfg.damp)
                    w = layer.from_rows(rows).astype(w.dtype)
                axis = 1 if kind == "in_conv" else extra
                _set_input(node, 1, np.take(w, idx, axis=axis), users)
        return int(sum((~m).sum() for m in keep.values()))


def _touches(plan, positions, prunable) -> bool:
    return any(plan.sets.find(int(g)) in prunable for g in np.unique(positions[0]))
