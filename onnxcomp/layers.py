"""What each layer's weights decode to, whatever format a pass left them in.

A layer is a Conv/ConvTranspose/Gemm/MatMul (or MatMulInteger, MatMulNBits, an embedding
Gather) whose weight input is computed from constants only. Its weight is followed back through
the decoding a pass put in front of it and decoded with numpy:

    W                                      float weights, bits = the dtype's width
    DequantizeLinear(q, scale, zero_point) int8/int4 QDQ, per tensor, per axis or per block
    Gather(codebook, Cast(indices))        k-means codebook: bits = ceil(log2(codebook size))
    MatMulInteger(a, q, a_zp, w_zp)        dynamic int8: decoded as q - w_zp times the weight
                                           scale when the Mul that applies it is found
    MatMulNBits(a, packed, scales, zps)    2/4/8-bit blocks (com.microsoft), lowest bits first
    (Cast(codes) - Cast(zero)) * scale     gptq's folded low-bit form: bits = the codes' width
    Cast / Identity / Reshape / Transpose  followed through

`bits` is the width each weight is stored at (a 4-bit codebook layer: 4, though its indices sit
in a uint8 tensor until the entropy coder packs them); `zeros` is the share of weights that
decode to exactly zero (pruned weights stay zero through every format above).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1, "MatMulInteger": 1, "MatMulNBits": 1,
                "Gather": 0}
_PASS_THROUGH = ("Cast", "Identity")


@dataclass
class Layer:
    node: str  # the consuming node's name
    op: str
    output: str  # the consuming node's first output (stable across most passes)
    weight: str  # the name of the tensor the layer reads (or of its stored form)
    values: np.ndarray | None  # decoded float weights (None: stored form known, values not)
    shape: tuple[int, ...]
    bits: float
    encoding: str
    zeros: float  # share of weights that decode to 0

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))


def layers(model) -> list[Layer]:
    """Every layer of the main graph whose weight is made of constants, decoded."""
    found = []
    for node in model.graph.nodes:
        index = WEIGHT_INPUT.get(node.op)
        if index is None or len(node.inputs) <= index or not node.outputs:
            continue
        if node.op == "Gather" and (not _is_constant(node.inputs[0]) or _is_constant(node.inputs[1])):
            continue  # an embedding lookup reads a constant table with run-time ids; a codebook is decoding
        if node.op in ("MatMul", "Gemm") and _is_constant(node.inputs[0]) and not _is_constant(node.inputs[1]):
            index = 0  # the constant is the left operand
        try:
            decoded = _decode_layer(node, index)
        except (ValueError, TypeError, IndexError, KeyError):  # a form this view does not know
            decoded = None
        if decoded is None:
            continue
        weight, values, shape, bits, encoding, zeros = decoded
        found.append(Layer(node.name, node.op, node.outputs[0].name, weight, values, tuple(shape), bits, encoding,
                           zeros))
    return found


_DECODING = ("Cast", "Identity", "Transpose", "Reshape", "DequantizeLinear", "Gather", "Sub", "Mul")


def _is_constant(tensor) -> bool:
    """A constant, or a chain of decoding ops over constants (followed no further than that)."""
    if isinstance(tensor, gs.Constant):
        return True
    producer = tensor.inputs[0] if tensor.inputs else None
    return producer is not None and producer.op in _DECODING and all(
        _is_constant(t) for t in producer.inputs if t.name)


def _values(tensor) -> np.ndarray:
    return np.asarray(tensor.values)


def _decode_layer(node: gs.Node, index: int):
    if node.op == "MatMulNBits":
        return _matmul_nbits(node)
    if node.op == "MatMulInteger":
        return _matmul_integer(node)
    decoded = _decode(node.inputs[index])
    if decoded is None:
        return None
    name, values, bits, encoding = decoded
    return name, values, values.shape, bits, encoding, float(np.mean(values == 0)) if values.size else 0.0


def _decode(tensor):
    """(name, float values, bits, encoding) of a tensor computed from constants, or None."""
    if isinstance(tensor, gs.Constant):
        values = _values(tensor)
        if values.dtype.kind not in "fiub":
            return None
        return tensor.name, values.astype(np.float32, copy=False), values.dtype.itemsize * 8, str(values.dtype)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None:
        return None
    if producer.op in _PASS_THROUGH:
        return _decode(producer.inputs[0])
    if producer.op == "Transpose":
        inner = _decode(producer.inputs[0])
        if inner is None:
            return None
        perm = producer.attrs.get("perm")
        return inner[0], np.transpose(inner[1], perm), *inner[2:]
    if producer.op == "Reshape" and isinstance(producer.inputs[1], gs.Constant):
        inner = _decode(producer.inputs[0])
        if inner is None:
            return None
        shape = [int(s) for s in _values(producer.inputs[1])]
        shape = [inner[1].shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return inner[0], inner[1].reshape(shape), *inner[2:]
    if producer.op == "DequantizeLinear":
        return _dequantize(producer)
    if producer.op == "Gather" and isinstance(producer.inputs[0], gs.Constant):
        return _codebook(producer)
    if producer.op == "Mul":
        return _lowbit(producer)
    return None


def _lowbit(node: gs.Node):
    """(Cast(codes) - Cast(zero)) * scale, the gptq pass's folded form."""
    sub = next((t.inputs[0] for t in node.inputs if t.inputs and t.inputs[0].op == "Sub"), None)
    scale = next((t for t in node.inputs if isinstance(t, gs.Constant)), None)
    if sub is None or scale is None:
        return None
    codes, zero = (_stored(t) for t in sub.inputs)
    if codes is None or zero is None:
        return None
    q = _values(codes)
    decoded = (q.astype(np.float32) - _values(zero).astype(np.float32)) * _values(scale).astype(np.float32)
    bits = max(1, math.ceil(math.log2(int(q.max()) + 1))) if q.size else 8
    return codes.name, decoded.astype(np.float32), bits, f"{bits}-bit grid (gptq)"


def _stored(tensor) -> gs.Constant | None:
    """The constant a tensor is a plain (Cast/Identity) copy of."""
    while not isinstance(tensor, gs.Constant):
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None or producer.op not in _PASS_THROUGH:
            return None
        tensor = producer.inputs[0]
    return tensor


def _int_bits(dtype) -> int:
    name = np.dtype(dtype).name
    return 4 if name in ("int4", "uint4") else np.dtype(dtype).itemsize * 8


def _dequantize(node: gs.Node):
    q = _stored(node.inputs[0])
    if q is None:
        return None
    values = _values(q)
    scale = _values(node.inputs[1]).astype(np.float32)
    zero = _values(node.inputs[2]).astype(np.float32) if len(node.inputs) > 2 and node.inputs[2].name else \
        np.zeros_like(scale)
    x = values.astype(np.float32)
    axis = int(node.attrs.get("axis", 1))
    block = int(node.attrs.get("block_size", 0) or 0)
    if scale.size > 1:
        axis %= x.ndim
        if block:
            scale = np.repeat(scale, block, axis=axis).take(range(x.shape[axis]), axis=axis)
            zero = np.repeat(zero, block, axis=axis).take(range(x.shape[axis]), axis=axis)
        else:
            view = [1] * x.ndim
            view[axis] = -1
            scale, zero = scale.reshape(view), zero.reshape(view)
    decoded = (x - zero) * scale
    return q.name, decoded.astype(np.float32), _int_bits(values.dtype), f"{np.dtype(values.dtype).name} QDQ"


def _codebook(node: gs.Node):
    indices = _stored(node.inputs[1])
    if indices is None:
        return None
    book = _values(node.inputs[0]).astype(np.float32)
    if book.ndim != 1 or int(node.attrs.get("axis", 0)) != 0:
        return None  # an embedding lookup, not a codebook
    decoded = book[_values(indices).astype(np.int64)]
    bits = max(1, math.ceil(math.log2(max(book.size, 2))))
    return indices.name, decoded, bits, f"{book.size}-entry codebook"


def _matmul_integer(node: gs.Node):
    q = _stored(node.inputs[1])
    if q is None:
        return None
    values = _values(q)
    zero = _values(node.inputs[3]).astype(np.float32) if len(node.inputs) > 3 and node.inputs[3].name else 0.0
    levels = values.astype(np.float32) - zero
    scale = _integer_scale(node)
    decoded = levels * scale if scale is not None else None
    zeros = float(np.mean(levels == 0)) if levels.size else 0.0
    return q.name, decoded, values.shape, _int_bits(values.dtype), f"{np.dtype(values.dtype).name} dynamic", zeros


def _integer_scale(node: gs.Node):
    """The weight scale of MatMulInteger -> Cast -> Mul(acc, Mul(a_scale, w_scale)), or None."""
    out = node.outputs[0]
    for cast in out.outputs:
        if cast.op != "Cast":
            continue
        for mul in cast.outputs[0].outputs:
            if mul.op != "Mul":
                continue
            other = mul.inputs[1] if mul.inputs[0] is cast.outputs[0] else mul.inputs[0]
            maker = other.inputs[0] if other.inputs else None
            if maker is not None and maker.op == "Mul":
                consts = [t for t in maker.inputs if isinstance(t, gs.Constant)]
                if len(consts) == 1:
                    return _values(consts[0]).astype(np.float32)
    return None


def _matmul_nbits(node: gs.Node):
    packed, scales = _stored(node.inputs[1]), _stored(node.inputs[2])
    if packed is None or scales is None:
        return None
    k, n, bits = int(node.attrs["K"]), int(node.attrs["N"]), int(node.attrs.get("bits", 4))
    block = int(node.attrs["block_size"])
    data = _values(packed).reshape(n, -1)
    q = _unpack(data, bits)  # lowest bits first
    blocks = q.shape[1] // block
    q = q[:, :blocks * block].reshape(n, blocks, block).astype(np.float32)
    scale = _values(scales).astype(np.float32).reshape(n, blocks)
    zp_tensor = _stored(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    if zp_tensor is not None:
        zp = _unpack(_values(zp_tensor).reshape(n, -1), bits)[:, :blocks].astype(np.float32)
    else:
        zp = np.full((n, blocks), float(2 ** (bits - 1)), np.float32)
    levels = q - zp[..., None]
    decoded = (levels * scale[..., None]).reshape(n, -1)[:, :k].T  # W [K, N] as MatMul reads it
    zeros = float(np.mean(decoded == 0)) if decoded.size else 0.0
    return packed.name, decoded.astype(np.float32), (k, n), bits, f"{bits}-bit blocks (MatMulNBits)", zeros


def _unpack(data: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [rows, bytes] -> values [rows, bytes * 8 // bits], the lowest bits first."""
    per = 8 // bits
    parts = [(data >> (j * bits)) & ((1 << bits) - 1) for j in range(per)]
    return np.stack(parts, axis=-1).reshape(data.shape[0], -1)
