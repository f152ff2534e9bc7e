"""Low-bit weights in the graph: which weights, how they are stored, what they cost in the packed file.

Two storage forms, both plain ONNX that ORT runs:
- `nbits`: MatMul(A, W) -> com.microsoft MatMulNBits(A, codes packed 2/4/8 bits, block scales,
  packed zero points): ORT keeps the weights low-bit in memory and runs its own kernels.
- `fold`: W -> (Cast(codes uint8) - Cast(zero uint8)) * scale [-> Reshape -> Slice], for every
  other weight (Conv, Gemm, embedding tables, the bit widths MatMulNBits lacks). Every node reads
  constants only, so ORT folds the float weight back at session load (measured here: a
  DequantizeLinear of a 30522x384 embedding table is not folded and costs 13 ms per run; this
  form costs nothing per run). The file holds the codes, which the packed container codes at
  their entropy (at most their bit width).
Scales and zero points are per row (output channel, embedding row) and per group of `group`
columns along K, the axis each output sums over.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp import hessian as hs
from onnxcomp.quant.gptq import ENTROPY_ZERO, Quantized
from onnxcomp.quant.qdq import NodeBuilder

NBITS_WIDTHS = (2, 4, 8)  # MatMulNBits `bits` values ORT's CPU kernels accept (onnxruntime 1.32 schema)


@dataclass
class Target:
    """One weight to quantize: a Conv/Gemm/MatMul layer (with a Hessian) or an embedding table."""

    layer: hs.WeightLayer | None  # None for an embedding table
    weight: gs.Constant
    gathers: list[gs.Node] = field(default_factory=list)  # the Gathers reading an embedding table

    @property
    def name(self) -> str:
        return self.weight.name

    @property
    def op(self) -> str:
        return self.layer.op if self.layer else "Gather"

    def to_rows(self, w: np.ndarray) -> np.ndarray:
        """[groups, rows, cols]: rows are outputs (embedding rows), cols what each one sums over."""
        return self.layer.to_rows(w) if self.layer else w[None]

    def from_rows(self, m: np.ndarray) -> np.ndarray:
        return self.layer.from_rows(m) if self.layer else m[0]

    @property
    def row_axis(self) -> int:
        """The axis of the stored weight that indexes rows."""
        if self.op == "MatMul" or (self.op == "Gemm" and not self.layer.nodes[0].attrs.get("transB", 0)):
            return 1
        return 0

    @property
    def cols(self) -> int:
        """K: the inputs each output sums over (to_rows' last axis), from the shape alone."""
        shape = tuple(self.weight.shape)
        if self.op == "Conv":
            return int(np.prod(shape[1:]))
        return int(shape[1] if self.row_axis == 0 else shape[0])

    def groupable(self) -> bool:
        """Groups along K are expressible for 2-D weights (Conv keeps one grid per output channel)."""
        return self.op in ("MatMul", "Gemm", "Gather")

    def nbits_ready(self, bits: int, group: int) -> bool:
        """Whether MatMulNBits can hold this weight: a plain MatMul/Gemm, block a power of two >= 16."""
        if bits not in NBITS_WIDTHS or self.op not in ("MatMul", "Gemm"):
            return False
        node = self.layer.nodes[0]
        if len(self.layer.nodes) != 1 or node.op == "Gemm" and (
                int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0
                or float(node.attrs.get("beta", 1.0)) != 1.0):
            return False
        k = self.cols
        return k >= 16 and (group == 0 or group >= k or (group >= 16 and not group & (group - 1)))


def block_size(group: int, k: int) -> int:
    """MatMulNBits block for a group of `group` columns (0 or >= k: one block, rounded up to 2**n)."""
    size = group if 0 < group < k else k
    return 1 << max(4, (size - 1).bit_length()) if size & (size - 1) or size < 16 else size


SMALL_BUT_LARGE_SHARE = 0.01  # a weight under min_size is still quantized when it holds this share of them all


def find_targets(model, ops: tuple[str, ...], exclude: tuple[str, ...], min_size: int) -> list[Target]:
    """Weights of Conv/Gemm/MatMul (onnxcomp.hessian's rules) and embedding tables read only by Gathers,
    of at least `min_size` elements or 1 % of all such weights (in a 6,000-weight MNIST a 200-weight
    first conv is 800 of the packed file's ~3,000 bytes when left in float)."""
    found = _find_targets(model, ops, exclude)
    total = sum(t.weight.values.size for t in found)
    return [t for t in found if t.weight.values.size >= max(1, min(min_size, SMALL_BUT_LARGE_SHARE * total))]


def _find_targets(model, ops: tuple[str, ...], exclude: tuple[str, ...]) -> list[Target]:
    layer_ops = tuple(op for op in ops if op in hs.HESSIAN_OPS)
    targets = [Target(layer, layer.weight) for layer in
               hs.find_weight_layers(model, layer_ops, exclude=exclude, min_params=1)] if layer_ops else []
    if "Gather" in ops:
        readers: dict[int, list[tuple[gs.Node, int]]] = {}
        for node in model.graph.nodes:
            for slot, t in enumerate(node.inputs):
                if isinstance(t, gs.Constant):
                    readers.setdefault(id(t), []).append((node, slot))
        tables: dict[int, Target] = {}
        for node in model.graph.nodes:
            if node.op != "Gather" or int(node.attrs.get("axis", 0)) != 0 or len(node.inputs) != 2:
                continue
            table, ids = node.inputs
            if not isinstance(table, gs.Constant) or isinstance(ids, gs.Constant) or id(table) in tables:
                continue
            if table in model.graph.outputs or any(n.op != "Gather" or s != 0 for n, s in readers[id(table)]):
                continue
            values = table.values
            if np.dtype(values.dtype) != np.float32 or values.ndim != 2 or values.size < 1:
                continue
            names = [table.name] + [n.name for n, _ in readers[id(table)]]
            if any(fnmatch.fnmatchcase(n or "", p) for n in names for p in exclude):
                continue
            tables[id(table)] = Target(None, table, [n for n, _ in readers[id(table)]])
        targets += list(tables.values())
    # float32 only: the decoded weight is float32 (a float16 model's weights stay as they are)
    return [t for t in targets if np.dtype(t.weight.values.dtype) == np.float32
            and np.isfinite(np.asarray(t.weight.values)).all()]


# ---- bit packing -------------------------------------------------------------------------
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis, `8 // bits` values per byte, the lower index in the lower bits."""
    per = 8 // bits
    pad = -values.shape[-1] % per
    v = np.concatenate([values, np.zeros(values.shape[:-1] + (pad,), np.uint8)], -1) if pad else values
    v = v.reshape(v.shape[:-1] + (-1, per)).astype(np.uint8)
    out = np.zeros(v.shape[:-1], np.uint8)
    for j in range(per):
        out |= (v[..., j] << (j * bits)).astype(np.uint8)
    return out


def nbits_arrays(q: Quantized, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(B uint8 [N, blocks, blob], scales float32 [N*blocks], zero points uint8, block) of MatMulNBits."""
    n = q.codes.shape[0]
    block = block_size(q.group, k)
    blocks = -(-k // block)
    codes = np.zeros((n, blocks * block), np.uint8)
    codes[:, :k] = q.codes
    scale, zero = q.scale, q.zero  # one grid per block: nbits_ready allows only groups that are blocks
    assert scale.shape == (n, blocks), "MatMulNBits needs one grid per block"
    packed = pack_bits(codes.reshape(n, blocks, block), q.bits)
    zeros = pack_bits(zero, q.bits).reshape(-1)
    return packed, scale.reshape(-1).astype(np.float32), zeros, block


def fold_arrays(target: Target, q: Quantized) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, ...]]:
    """(codes, zero, scale, final shape) of the `fold` form, codes and grids broadcastable as stored."""
    shape = tuple(target.weight.shape)
    if q.scale.shape[1] == 1:  # one grid per row: codes in the weight's own layout
        codes = target.from_rows(q.codes[None] if target.layer is None or target.layer.groups == 1
                                 else q.codes.reshape(target.layer.groups, -1, q.codes.shape[1]))
        grid = [1] * len(shape)
        grid[target.row_axis] = shape[target.row_axis]
        return codes, q.zero.reshape(grid), q.scale.reshape(grid), shape
    rows, k = q.codes.shape
    groups = q.scale.shape[1]
    assert groups * q.group == k, "the folded form needs groups that divide K"
    blocked = q.codes.reshape(rows, groups, q.group)
    if target.row_axis == 0:  # [rows, K]: [rows, G, group] with grids [rows, G, 1]
        return blocked, q.zero[:, :, None], q.scale[:, :, None], shape
    # [K, rows]: [G, group, rows] with grids [G, 1, rows]
    return blocked.transpose(1, 2, 0), q.zero.T[:, None, :], q.scale.T[:, None, :], shape


def signed_codes(codes: np.ndarray, zero: np.ndarray) -> np.ndarray | None:
    """The codes as int8 when every zero point is the entropy grid's middle one (128): stored so,
    the weight is Cast(codes) * scale, no zero point array and no Sub."""
    if not np.all(zero == ENTROPY_ZERO):
        return None
    return (codes.astype(np.int16) - ENTROPY_ZERO).astype(np.int8)


def stored_arrays(target: Target, q: Quantized, form: str) -> list[np.ndarray]:
    if form == "nbits":
        return list(nbits_arrays(q, q.codes.shape[1])[:3])
    codes, zero, scale, _ = fold_arrays(target, q)
    signed = signed_codes(codes, zero)
    return [codes, zero, scale] if signed is None else [signed, scale]


def coded_bytes(arrays: list[np.ndarray], coder: str = "auto") -> int:
    """Bytes the packed container's coder spends on these arrays (each coded alone: no shared
    tables). (rANS alone would measure 2.4x faster on a 64-layer detector, but it misjudged the
    sparse choices enough to cost Ultraface a face at the same target: kept at auto.)"""
    from onnxcomp.io import coding

    total = 0
    for a in arrays:
        a = np.ascontiguousarray(a)
        kind, itemsize = coding.layout(onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.dtype)
        unsigned = a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]).ravel()
        stream, _ = coding.encode_tensor(unsigned, kind, itemsize, a.shape, coder, slow=False)
        total += min(len(stream), a.nbytes)
    return total


# ---- graph rewrites ----------------------------------------------------------------------
def write_nbits(build: NodeBuilder, target: Target, q: Quantized) -> None:
    """Replace the target's MatMul/Gemm with MatMulNBits (+ Add of a Gemm's bias)."""
    node = target.layer.nodes[0]
    n, k = q.codes.shape
    packed, scale, zeros, block = nbits_arrays(q, k)
    base = node.name or target.name
    out = node.outputs[0]
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
    y = gs.Variable(build.unique(f"{base}_nbits"), dtype=np.float32) if bias is not None else out
    inputs = [node.inputs[0], build.const(f"{target.name}_Q{q.bits}", packed), build.const(f"{target.name}_scale", scale),
              build.const(f"{target.name}_zp", zeros)]
    node.inputs.clear()
    node.outputs.clear()
    node.name = ""  # the MatMulNBits takes over its name (short names: the file is no larger than ORT's own)
    build.release(base)
    build.node("MatMulNBits", inputs, [y], {"K": int(k), "N": int(n), "bits": int(q.bits), "block_size": int(block)},
               domain="com.microsoft", base=base)
    if bias is not None:
        build.node("Add", [y, bias], [out], base=f"{base}_bias")


def write_fold(build: NodeBuilder, target: Target, q: Quantized) -> gs.Variable:
    """The weight as constant-only nodes ORT folds at load; every reader now reads their output."""
    codes, zero, scale, shape = fold_arrays(target, q)
    name = target.name
    signed = signed_codes(codes, zero)
    parts = ((codes, "codes"), (zero, "zero")) if signed is None else ((signed, "codes"),)
    as_float = []
    for part, tag in parts:
        f = gs.Variable(build.unique(f"{name}_{tag}_float"), dtype=np.float32)
        build.node("Cast", [build.const(f"{name}_{tag}", part)], [f], {"to": onnx.TensorProto.FLOAT},
                   base=f"{name}_{tag}_Cast")
        as_float.append(f)
    centred = as_float[0]
    if signed is None:
        centred = gs.Variable(build.unique(f"{name}_centred"), dtype=np.float32)
        build.node("Sub", as_float, [centred], base=f"{name}_Sub")
    out = gs.Variable(build.unique(f"{name}_lowbit"), dtype=np.float32)
    build.node("Mul", [centred, build.const(f"{name}_scale", scale)], [out], base=f"{name}_Mul")
    if codes.shape != shape:  # grouped: back to the weight's 2-D shape (groups divide K: no padding)
        flat = gs.Variable(build.unique(f"{name}_grouped"), dtype=np.float32)
        build.node("Reshape", [out, build.const(f"{name}_shape", np.array(shape, np.int64))], [flat],
                   base=f"{name}_Reshape")
        out = flat
    out.shape = list(shape)
    readers = target.gathers if target.layer is None else target.layer.nodes
    for node in readers:
        node.inputs[0 if target.layer is None else 1] = out
    return out
