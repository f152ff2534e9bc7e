"""Layer Hessians from calibration data and the SparseGPT (OBS) pruning update.

Shared by the pruning passes (`prune`, `prune_channels`, `sensitivity`); not a pass itself.

For a layer y = W x (a MatMul / Gemm weight, or a Conv seen through im2col) the squared error
of its output when W changes is governed by H = 2·X·Xᵀ / n over the layer's calibration inputs
X. Optimal Brain Surgeon removes weight q at cost w_q² / [H⁻¹]_qq and moves the remaining
weights by -w_q / [H⁻¹]_qq · H⁻¹[q, :] to compensate. SparseGPT (Frantar & Alistarh, 2023) makes
that affordable: columns are processed left to right in lazy blocks of 128 with the upper
Cholesky factor of H⁻¹, so each pruned column's error is spread over the columns not yet
visited, and the block's accumulated update is applied to the rest in one matrix product.

Weights are viewed as `[groups, rows, cols]`: rows are outputs, cols the inputs one output
sees. For Conv the columns are ordered (kernel position, input channel), so runs of M
consecutive columns are M input channels at one kernel tap — the axis N:M sparsity uses
(NVIDIA's 2:4 groups channels at a fixed tap, the weight laid out as [K, R, S, C]).
Hessians are accumulated streaming, batch by batch (`onnxcomp.calibration.capture`); no layer's
activations are ever held for more than one calibration batch.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs
from scipy.linalg import cho_factor, cho_solve, solve_triangular

WEIGHT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
HESSIAN_OPS = ("Conv", "Gemm", "MatMul")  # ConvTranspose falls back to magnitude
MAX_ROWS_PER_BATCH = 2048  # im2col rows kept per calibration batch (a random, unbiased subset)


# ---- which tensors are prunable weights --------------------------------------------------
@dataclass
class WeightLayer:
    """One weight initializer of Conv/ConvTranspose/Gemm/MatMul and the nodes that use it."""

    weight: gs.Constant
    nodes: list[gs.Node] = field(default_factory=list)
    scope: str = ""  # "" in the main graph, else the subgraph's path (onnxcomp.subgraphs)
    stacked: bool = False  # inside a Loop/Scan body: its inputs are captured stacked per iteration

    @property
    def name(self) -> str:
        return self.weight.name

    @property
    def op(self) -> str:
        return self.nodes[0].op

    @property
    def size(self) -> int:
        return int(np.prod(self.weight.shape))

    @property
    def groups(self) -> int:
        return int(self.nodes[0].attrs.get("group", 1)) if self.op in ("Conv", "ConvTranspose") else 1

    @property
    def supports_hessian(self) -> bool:
        return self.op in HESSIAN_OPS and not self.stacked

    # The weight as [groups, rows, cols]: rows = outputs, cols = inputs, channel fastest.
    def to_rows(self, w: np.ndarray) -> np.ndarray:
        op, g = self.op, self.groups
        if op == "MatMul":
            return w.T[None]
        if op == "Gemm":
            return (w if self.nodes[0].attrs.get("transB", 0) else w.T)[None]
        if op == "Conv":
            o, cg = w.shape[:2]
            nd = w.ndim - 2
            per = w.reshape(g, o // g, cg, *w.shape[2:])
            return per.transpose(0, 1, *range(3, 3 + nd), 2).reshape(g, o // g, -1)
        # ConvTranspose [I, O/g, k...]: rows = (output channel, tap), cols = input channels
        i, og = w.shape[:2]
        nd = w.ndim - 2
        per = w.reshape(g, i // g, og, *w.shape[2:])
        return per.transpose(0, 2, *range(3, 3 + nd), 1).reshape(g, -1, i // g)

    def from_rows(self, m: np.ndarray) -> np.ndarray:
        op, g, shape = self.op, self.groups, tuple(self.weight.shape)
        if op == "MatMul":
            return m[0].T
        if op == "Gemm":
            return m[0] if self.nodes[0].attrs.get("transB", 0) else m[0].T
        nd = len(shape) - 2
        k = shape[2:]
        if op == "Conv":
            o, cg = shape[:2]
            per = m.reshape(g, o // g, *k, cg)
            return per.transpose(0, 1, 2 + nd, *range(2, 2 + nd)).reshape(shape)
        i, og = shape[:2]
        per = m.reshape(g, og, *k, i // g)
        return per.transpose(0, 2 + nd, 1, *range(2, 2 + nd)).reshape(shape)

    def nm_axis_size(self) -> int:
        """Length of the runs N:M groups must tile: input channels per group (Conv: per tap)."""
        shape = tuple(self.weight.shape)
        if self.op == "MatMul":
            return shape[0]
        if self.op == "Gemm":
            return shape[1] if self.nodes[0].attrs.get("transB", 0) else shape[0]
        if self.op == "Conv":
            return shape[1]
        return shape[0] // self.groups

    def activation(self, node: gs.Node) -> gs.Tensor:
        return node.inputs[0]

    def columns(self, node: gs.Node, x: np.ndarray) -> list[np.ndarray]:
        """The layer's inputs as OBS columns: one [n, cols] matrix per group."""
        if self.op == "MatMul":
            return [x.reshape(-1, x.shape[-1])]
        if self.op == "Gemm":
            x2 = x.reshape(x.shape[0], -1) if x.ndim != 2 else x
            return [x2.T if node.attrs.get("transA", 0) else x2]
        return im2col(x, node, tuple(self.weight.shape[2:]), self.groups)


def _weight_slot(node: gs.Node) -> int:
    return 1


def find_weight_layers(model, ops: Iterable[str] = WEIGHT_OPS, include: Iterable[str] = (),
                       exclude: Iterable[str] = (), min_params: int = 0, subgraphs: bool = False) -> list[WeightLayer]:
    """Prunable weights: float Constants used only as the weight input of the given ops.

    An initializer that also feeds anything else (a Gather of tied embeddings, a Shape, a bias
    slot, a node inside a subgraph) is left alone; one shared by several weight slots is one
    layer (handled once). `subgraphs=True` also finds the weights of nodes inside If branches
    and Loop/Scan bodies (nested too); subgraph Constants sharing a name are renamed apart first.
    """
    from onnxcomp import subgraphs as sg

    ops = tuple(ops)
    include, exclude = tuple(include), tuple(exclude)
    graph = model.graph
    if subgraphs:
        sg.unique_weight_names(graph)
    all_scopes = sg.scopes(graph)
    walk = [(sc, n) for sc in (all_scopes if subgraphs else all_scopes[:1]) for n in sc.graph.nodes]
    users: dict[int, list[tuple[gs.Node, int]]] = {}
    for sc in all_scopes:  # every reader counts, wherever it is
        for node in sc.graph.nodes:
            for slot, tensor in enumerate(node.inputs):
                if isinstance(tensor, gs.Constant):
                    users.setdefault(id(tensor), []).append((node, slot))
    outputs = {id(t) for sc in all_scopes for t in sc.graph.outputs}
    layers: list[WeightLayer] = []
    seen: set[int] = set()
    for scope, node in walk:
        if node.op not in ops or (node.domain or "") not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        weight = node.inputs[_weight_slot(node)]
        if not isinstance(weight, gs.Constant) or id(weight) in seen or id(weight) in outputs:
            continue
        values = weight.values
        if not np.issubdtype(values.dtype, np.floating) or values.size == 0:
            continue
        if isinstance(node.inputs[0], gs.Constant):
            continue  # both operands constant: fold's job, not a layer
        if node.op == "MatMul" and values.ndim != 2:
            continue
        if node.op in ("Conv", "ConvTranspose") and values.ndim < 3:
            continue
        uses = users.get(id(weight), [])
        if any(u.op != node.op or s != 1 for u, s in uses):
            continue
        if node.op == "Gemm" and len({u.attrs.get("transB", 0) for u, _ in uses}) > 1:
            continue
        seen.add(id(weight))
        names = [weight.name] + [u.name for u, _ in uses]
        if include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in include):
            continue
        if exclude and any(fnmatch.fnmatchcase(n, p) for n in names for p in exclude):
            continue
        if values.size < min_params:
            continue
        layers.append(WeightLayer(weight, [u for u, _ in uses], scope.path, scope.in_loop))
    return layers


# ---- im2col ------------------------------------------------------------------------------
def conv_padding(node: gs.Node, spatial: tuple[int, ...], kernel: tuple[int, ...]) -> list[tuple[int, int]]:
    nd = len(spatial)
    strides = list(node.attrs.get("strides", [1] * nd))
    dil = list(node.attrs.get("dilations", [1] * nd))
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for s, k, st, d in zip(spatial, kernel, strides, dil):
            o = -(-s // st)
            total = max(0, (o - 1) * st + (k - 1) * d + 1 - s)
            small = total // 2
            out.append((small, total - small) if auto == "SAME_UPPER" else (total - small, small))
        return out
    if auto == "VALID":
        return [(0, 0)] * nd
    pads = list(node.attrs.get("pads", [0] * 2 * nd))
    return list(zip(pads[:nd], pads[nd:]))


def im2col(x: np.ndarray, node: gs.Node, kernel: tuple[int, ...], groups: int,
           max_rows: int | None = MAX_ROWS_PER_BATCH, seed: int = 0) -> list[np.ndarray]:
    """Conv input [N, C, *S] -> per group [rows, taps * C/g], columns ordered (tap, channel)."""
    nd = x.ndim - 2
    strides = list(node.attrs.get("strides", [1] * nd))
    dil = list(node.attrs.get("dilations", [1] * nd))
    pads = conv_padding(node, x.shape[2:], kernel)
    xp = np.pad(x, [(0, 0), (0, 0)] + pads)
    window = tuple((k - 1) * d + 1 for k, d in zip(kernel, dil))
    view = np.lib.stride_tricks.sliding_window_view(xp, window, axis=tuple(range(2, 2 + nd)))
    index = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides) \
        + tuple(slice(None, None, d) for d in dil)
    view = view[index]  # [N, C, *out, *k]
    n, c = view.shape[:2]
    out_size = int(np.prod(view.shape[2:2 + nd]))
    taps = int(np.prod(kernel))
    rows = n * out_size
    # [N, *out, *k, C] -> [rows, taps, C]
    perm = (0, *range(2, 2 + nd), *range(2 + nd, 2 + 2 * nd), 1)
    if max_rows and rows > max_rows:
        pick = np.sort(np.random.default_rng(seed).choice(rows, max_rows, replace=False))
        flat = view.transpose(perm).reshape(rows, taps, c) if rows * taps * c < 2**24 else None
        if flat is not None:
            cols = flat[pick]
        else:
            ni, oi = np.divmod(pick, out_size)
            out_idx = np.unravel_index(oi, view.shape[2:2 + nd])
            cols = view[(ni, slice(None)) + out_idx]  # [picked, C, *k]
            cols = cols.transpose(0, *range(2, 2 + nd), 1).reshape(len(pick), taps, c)
    else:
        cols = view.transpose(perm).reshape(rows, taps, c)
    cg = c // groups
    return [np.ascontiguousarray(cols[:, :, i * cg:(i + 1) * cg]).reshape(cols.shape[0], taps * cg)
            for i in range(groups)]


# ---- Hessian accumulation ----------------------------------------------------------------
class HessianSum:
    """Streaming H = 2·X·Xᵀ / n (float64), one matrix per conv group.

    Rows are buffered and folded in with one float64 product per ~`flush_rows` rows: cheaper
    than a product per small batch, and memory stays bounded by the buffer.
    """

    def __init__(self, flush_rows: int = 4096):
        self.xtx: list[np.ndarray] | None = None
        self.rows = 0
        self.flush_rows = flush_rows
        self._buffer: list[list[np.ndarray]] = []
        self._buffered = 0

    def add(self, columns: list[np.ndarray]) -> None:
        self._buffer.append(columns)
        self._buffered += columns[0].shape[0]
        self.rows += columns[0].shape[0]
        if self._buffered >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        groups = len(self._buffer[0])
        if self.xtx is None:
            self.xtx = [np.zeros((c.shape[1], c.shape[1])) for c in self._buffer[0]]
        for g in range(groups):
            x = np.concatenate([b[g] for b in self._buffer]).astype(np.float64)
            self.xtx[g] += x.T @ x
        self._buffer, self._buffered = [], 0

    def value(self) -> np.ndarray:
        """[groups, cols, cols]."""
        self._flush()
        if self.xtx is None or self.rows == 0:
            raise ValueError("no calibration rows reached this layer")
        return np.stack(self.xtx) * (2.0 / self.rows)


def _limited(feeds: Iterable[dict[str, np.ndarray]], samples: int | None):
    for i, feed in enumerate(feeds):
        if samples and i >= samples:
            return
        yield feed


def _input_key(layer: WeightLayer, node: gs.Node) -> tuple:
    """Nodes that see the same input the same way share one Hessian (Q, K, V projections)."""
    attrs = tuple(sorted((k, str(v)) for k, v in node.attrs.items() if k != "transB"))
    return (node.inputs[0].name, layer.op, tuple(layer.weight.shape[2:]) if layer.op == "Conv" else (), attrs)


def layer_hessians(model, layers: list[WeightLayer], feeds: Iterable[dict[str, np.ndarray]],
                   samples: int | None = None, threads: int | None = None) -> dict[str, np.ndarray]:
    """{weight name: H [groups, cols, cols]} from one streaming pass over the calibration feeds.

    A weight shared by several nodes gets the row-weighted sum of their Hessians.
    """
    from onnxcomp.calibration import capture

    graph_inputs = {t.name for t in model.graph.inputs}
    keyed: dict[tuple, tuple[WeightLayer, gs.Node]] = {}
    for layer in layers:
        if layer.supports_hessian:
            for node in layer.nodes:
                keyed.setdefault(_input_key(layer, node), (layer, node))
    wanted = sorted({key[0] for key in keyed})
    to_capture = [n for n in wanted if n not in graph_inputs]
    sums = {key: HessianSum() for key in keyed}
    for batch, (feed, values) in enumerate(capture(model, to_capture, _limited(feeds, samples),
                                                   threads=threads, typed=False)):
        for key, (layer, node) in keyed.items():
            name = node.inputs[0].name
            if name not in graph_inputs and name not in values:
                continue  # inside an If branch that did not run on this feed
            x = np.asarray(feed[name] if name in graph_inputs else values[name], dtype=np.float32)
            cols = im2col(x, node, tuple(layer.weight.shape[2:]), layer.groups, seed=batch) \
                if layer.op == "Conv" else layer.columns(node, x)
            sums[key].add(cols)
    out: dict[str, np.ndarray] = {}
    for layer in layers:
        if not layer.supports_hessian:
            continue
        parts = [sums[_input_key(layer, node)] for node in layer.nodes]
        rows = sum(p.rows for p in parts)
        if rows:
            out[layer.name] = sum(p.value() * p.rows for p in parts if p.rows) / rows
    return out


def stages(model, layers: list[WeightLayer]) -> list[list[WeightLayer]]:
    """Layers grouped by how many weight layers lie upstream of their input (sequential order).

    Layers of one stage do not feed each other (Q, K and V projections share a stage), so one
    capture pass of the partly pruned model serves the whole stage.
    """
    weight_nodes = {id(n) for layer in layers for n in layer.nodes}
    level: dict[str, int] = {}
    graph = model.graph
    graph.toposort()
    for node in graph.nodes:
        here = max((level.get(t.name, 0) for t in node.inputs if not isinstance(t, gs.Constant)), default=0)
        for out in node.outputs:
            level[out.name] = here + (1 if id(node) in weight_nodes else 0)
    by_stage: dict[int, list[WeightLayer]] = {}
    for layer in layers:
        s = min(level.get(n.inputs[0].name, 0) for n in layer.nodes)
        by_stage.setdefault(s, []).append(layer)
    return [by_stage[k] for k in sorted(by_stage)]


# ---- OBS / SparseGPT ---------------------------------------------------------------------
def dampened(h: np.ndarray, percdamp: float) -> np.ndarray:
    """H + λI with λ = percdamp · mean(diag H); dead inputs (zero diagonal) get 1 on the diagonal."""
    h = h.copy()
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    h[np.diag_indices_from(h)] += percdamp * (mean if mean > 0 else 1.0)
    return h


def inverse_cholesky(h: np.ndarray, percdamp: float) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor U of H⁻¹ with H⁻¹ = UᵀU, diag of H⁻¹), retrying with more damping.

    With P the order-reversing permutation and PHP = L̃L̃ᵀ, U = P·L̃⁻¹·P is upper triangular and
    UᵀU = H⁻¹: one Cholesky and one triangular inverse, instead of inverting and factoring again.
    """
    eye = np.eye(len(h))
    damp = percdamp
    for _ in range(8):
        try:
            low = np.linalg.cholesky(dampened(h, damp)[::-1, ::-1])
            u = np.ascontiguousarray(solve_triangular(low, eye, lower=True)[::-1, ::-1])
            return u, np.einsum("ij,ij->j", u, u)
        except np.linalg.LinAlgError:
            damp = damp * 10 if damp > 0 else 1e-6
    raise np.linalg.LinAlgError("the layer Hessian stays singular after damping")


def obs_scores(w: np.ndarray, h: np.ndarray, percdamp: float = 0.01) -> np.ndarray:
    """OBS saliency w_q² / [H⁻¹]_qq of every weight, as a fraction of the layer's output energy.

    `w` [rows, cols], `h` [cols, cols]. Comparable across layers (used for global allocation).
    """
    _, hinv_diag = inverse_cholesky(h, percdamp)
    energy = output_energy(w, h)
    return (w ** 2 / hinv_diag[None, :]) / max(energy, 1e-30)


def sparsegpt(w: np.ndarray, h: np.ndarray, prune_count: int = 0, n: int = 0, m: int = 0,
              blocksize: int = 128, percdamp: float = 0.01) -> np.ndarray:
    """Prune `w` [rows, cols] with the SparseGPT OBS update; return the new weights.

    Unstructured: exactly `prune_count` weights are zeroed, spread over the column blocks in
    proportion to their width and chosen within each block by w² / diag(U)². With `m`, every
    run of `m` consecutive columns keeps at most `n` non-zeros per row (N:M).
    """
    w = np.array(w, dtype=np.float64)
    rows, cols = w.shape
    dead = np.diag(h) <= 0
    w[:, dead] = 0.0
    u, _ = inverse_cholesky(h, percdamp)
    if m:
        blocksize = max(m, (blocksize // m) * m)
    total = int(prune_count)
    row_index = np.arange(rows)[:, None]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].copy()
        q1 = np.zeros_like(w1)
        err1 = np.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        d = np.diag(u1)
        mask = np.zeros(w1.shape, dtype=bool)
        if not m:
            k = round(total * i2 / cols) - round(total * i1 / cols)
            if k > 0:
                score = (w1 ** 2 / (d[None, :] ** 2)).ravel()
                mask.flat[np.argpartition(score, k - 1)[:k]] = True
        for i in range(count):
            if m and i % m == 0:
                zeros = m - n
                score = w1[:, i:i + m] ** 2 / (d[None, i:i + m] ** 2)
                pick = np.argpartition(score, zeros - 1, axis=1)[:, :zeros]
                mask[row_index, i + pick] = True
            col = w1[:, i]
            q = np.where(mask[:, i], 0.0, col)
            q1[:, i] = q
            e = (col - q) / d[i]
            w1[:, i:] -= np.outer(e, u1[i, i:])
            err1[:, i] = e
        q1[mask] = 0.0
        w[:, i1:i2] = q1
        if i2 < cols:
            w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w


def group_obs_remove(w: np.ndarray, h: np.ndarray, remove: np.ndarray, percdamp: float = 0.01) -> np.ndarray:
    """Zero the columns `remove` of w [rows, cols] and compensate the others (group OBS).

    OBS gives δW = -W_G ([H⁻¹]_GG)⁻¹ H⁻¹[G, :]; the same update, written as the least-squares
    refit of the kept columns K, is W_K += W_G H_GK H_KK⁻¹ — one Cholesky of the (smaller)
    kept block instead of a full inverse.
    """
    w = np.array(w, dtype=np.float64)
    if len(remove) == 0:
        return w
    hd = dampened(h, percdamp)
    kept = np.setdiff1d(np.arange(len(h)), remove)
    if len(kept):
        factor = cho_factor(hd[np.ix_(kept, kept)])
        # W_G H_GK H_KK⁻¹ = (H_KK⁻¹ H_KG W_Gᵀ)ᵀ
        w[:, kept] += cho_solve(factor, hd[np.ix_(kept, remove)] @ w[:, remove].T).T
    w[:, remove] = 0.0
    return w


def group_obs_loss(w: np.ndarray, hinv: np.ndarray, group: np.ndarray) -> float:
    """Output-error cost of removing the columns `group` alone: tr(W_G ([H⁻¹]_GG)⁻¹ W_Gᵀ)."""
    wg = w[:, group]
    block = hinv[np.ix_(group, group)]
    return float(np.sum((wg @ np.linalg.inv(block)) * wg))


def damped_inverse(h: np.ndarray, percdamp: float = 0.01) -> np.ndarray:
    """(H + λI)⁻¹ through its Cholesky factor (LAPACK potrf + potri)."""
    from scipy.linalg import lapack

    c, info = lapack.dpotrf(dampened(h, percdamp), lower=1)
    if info != 0:
        raise np.linalg.LinAlgError("the layer Hessian is not positive definite")
    inv, info = lapack.dpotri(c, lower=1)
    inv = np.tril(inv)
    return inv + np.tril(inv, -1).T


def output_energy(w: np.ndarray, h: np.ndarray) -> float:
    """‖W X‖² / n for H = 2·X·Xᵀ / n: the layer's mean squared output."""
    return float(np.sum((w @ h) * w)) / 2.0


def magnitude_mask(rows: np.ndarray, prune_count: int = 0, n: int = 0, m: int = 0) -> np.ndarray:
    """Boolean mask (True = prune) over [groups, rows, cols]: the smallest |w|, or N:M groups."""
    mask = np.zeros(rows.shape, dtype=bool)
    if m:
        g, r, c = rows.shape
        blocks = np.abs(rows).reshape(g, r, c // m, m)
        pick = np.argpartition(blocks, m - n - 1, axis=3)[..., :m - n]
        sub = np.zeros(blocks.shape, dtype=bool)
        np.put_along_axis(sub, pick, True, axis=3)
        return sub.reshape(rows.shape)
    if prune_count > 0:
        flat = np.abs(rows).ravel()
        mask.flat[np.argpartition(flat, prune_count - 1)[:prune_count]] = True
    return mask
