"""Scale / zero-point math and QuantizeLinear / DequantizeLinear node building.

Conventions (the ones ONNX Runtime's integer kernels expect):
- weights: int8, symmetric (zero point 0), per tensor or per channel along `axis`;
  `reduce_range` keeps them in [-64, 63] so AVX2's u8*s8 pair sums cannot saturate int16;
- activations: uint8 asymmetric by default (the fast u8s8 path on x86), or int8, or symmetric;
- biases: int32 with scale = input scale * weight scale and zero point 0.
Real zero is always exactly representable, so zero padding and ReLU stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

QRANGE = {"uint8": (0, 255), "int8": (-128, 127), "int32": (-(2**31), 2**31 - 1),
          "int4": (-8, 7), "uint4": (0, 15)}
NP_TYPE = {"uint8": np.uint8, "int8": np.int8, "int32": np.int32}


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one tensor: scale (scalar or per channel), zero point, axis."""

    scale: np.ndarray  # float32, shape () or (C,)
    zero_point: np.ndarray  # qtype, same shape as scale
    axis: int | None = None

    @property
    def qtype(self) -> str:
        return str(self.zero_point.dtype)


def scale_zero_point(rmin: float, rmax: float, qtype: str = "uint8", symmetric: bool = False) -> QParams:
    """Affine parameters for the real range [rmin, rmax] (widened to include 0)."""
    qmin, qmax = QRANGE[qtype]
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if not np.isfinite(rmin) or not np.isfinite(rmax):
        raise ValueError(f"range [{rmin}, {rmax}] is not finite")
    if symmetric:
        absmax = max(abs(rmin), abs(rmax))
        scale = absmax / ((qmax - qmin) / 2.0) if absmax > 0 else 1.0
        zp = 0 if qmin < 0 else (qmin + qmax + 1) // 2
    else:
        scale = (rmax - rmin) / (qmax - qmin) if rmax > rmin else 1.0
        zp = int(np.clip(round(qmin - rmin / scale), qmin, qmax))
    scale = max(scale, np.finfo(np.float32).tiny * 2**20)
    return QParams(np.array(scale, np.float32), np.array(zp, NP_TYPE[qtype]))


def weight_params(w: np.ndarray, axis: int | None, qtype: str = "int8", reduce_range: bool = False) -> QParams:
    """Symmetric weight parameters, per tensor (axis None) or per channel along `axis`."""
    qmin, qmax = QRANGE[qtype]
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2
    half = (qmax - qmin) / 2.0
    if axis is None:
        absmax = np.array(np.abs(w).max() if w.size else 0.0, np.float64)
    else:
        axis = axis % w.ndim
        absmax = np.abs(w).max(axis=tuple(i for i in range(w.ndim) if i != axis)).astype(np.float64)
    scale = np.where(absmax > 0, absmax / half, 1.0).astype(np.float32)
    return QParams(scale, np.zeros(scale.shape, NP_TYPE[qtype]), axis)


def _broadcast(values: np.ndarray, axis: int | None, ndim: int) -> np.ndarray:
    if axis is None or values.ndim == 0:
        return values
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def quantize_array(x: np.ndarray, params: QParams, reduce_range: bool = False) -> np.ndarray:
    """Round-half-to-even quantization, as QuantizeLinear does."""
    qmin, qmax = QRANGE[params.qtype]
    if reduce_range:
        qmin, qmax = qmin // 2, qmax // 2
    scale = _broadcast(params.scale.astype(np.float64), params.axis, x.ndim)
    zp = _broadcast(params.zero_point.astype(np.float64), params.axis, x.ndim)
    q = np.rint(x.astype(np.float64) / scale) + zp
    return np.clip(q, qmin, qmax).astype(NP_TYPE[params.qtype])


def dequantize_array(q: np.ndarray, params: QParams) -> np.ndarray:
    scale = _broadcast(params.scale, params.axis, q.ndim)
    zp = _broadcast(params.zero_point.astype(np.int64), params.axis, q.ndim)
    return ((q.astype(np.int64) - zp) * scale).astype(np.float32)


def bias_params(input_scale: np.ndarray, w_params: QParams) -> QParams:
    """int32 bias parameters: scale = input scale * weight scale, zero point 0."""
    scale = (np.asarray(input_scale, np.float32) * w_params.scale).astype(np.float32)
    axis = 0 if scale.ndim == 1 else None
    return QParams(scale, np.zeros(scale.shape, np.int32), axis)


def quantize_bias(b: np.ndarray, params: QParams) -> np.ndarray:
    q = np.rint(b.astype(np.float64) / np.broadcast_to(params.scale.astype(np.float64), b.shape))
    return np.clip(q, *QRANGE["int32"]).astype(np.int32)


# ---- nodes ------------------------------------------------------------------------------
class NodeBuilder:
    """Makes uniquely named Q/DQ nodes and constants in one graph."""

    def __init__(self, graph: gs.Graph, prefix: str = "q", taken: set[str] | None = None):
        """`taken`: names already used anywhere in the model (shared and updated, so builders of
        several subgraphs never reuse a name); by default the names of `graph` and its subgraphs."""
        from onnxcomp.subgraphs import NameSpace

        self.graph = graph
        self.prefix = prefix
        self._names = taken if taken is not None else NameSpace(graph).taken
        self.added_nodes = 0

    def unique(self, base: str) -> str:
        from onnxcomp.subgraphs import unique_name

        return unique_name(self._names, base)

    def release(self, name: str) -> None:
        """Make a name free again (its node is leaving the graph and a new one takes it over)."""
        self._names.discard(name)

    def const(self, base: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.unique(base), np.asarray(values))

    def node(self, op: str, inputs: list, outputs: list, attrs: dict | None = None, domain: str | None = None,
             base: str | None = None) -> gs.Node:
        node = gs.Node(op, self.unique(base or f"{self.prefix}_{op}"), attrs=attrs or {}, inputs=inputs,
                       outputs=outputs, domain=domain)
        self.graph.nodes.append(node)
        self.added_nodes += 1
        return node

    def _params(self, base: str, params: QParams):
        return self.const(f"{base}_scale", params.scale), self.const(f"{base}_zero_point", params.zero_point)

    def quantize(self, x: gs.Variable, params: QParams, base: str, consts=None) -> gs.Variable:
        """x (float) -> QuantizeLinear -> returned quantized Variable."""
        scale, zp = consts or self._params(base, params)
        out = gs.Variable(self.unique(f"{base}_quantized"), dtype=params.zero_point.dtype)
        attrs = {"axis": int(params.axis)} if params.axis is not None else {}
        self.node("QuantizeLinear", [x, scale, zp], [out], attrs, base=f"{base}_QuantizeLinear")
        return out

    def dequantize(self, q, params: QParams, base: str, out: gs.Variable | None = None, consts=None) -> gs.Variable:
        """q (quantized Variable or Constant) -> DequantizeLinear -> float Variable."""
        scale, zp = consts or self._params(base, params)
        out = out if out is not None else gs.Variable(self.unique(f"{base}_dequantized"), dtype=np.float32)
        attrs = {"axis": int(params.axis)} if params.axis is not None else {}
        self.node("DequantizeLinear", [q, scale, zp], [out], attrs, base=f"{base}_DequantizeLinear")
        return out

    def qdq(self, x: gs.Variable, params: QParams, base: str, out: gs.Variable | None = None) -> gs.Variable:
        """Q -> DQ reading one scale and zero point (two copies would cost the file two more tensors)."""
        consts = self._params(base, params)
        return self.dequantize(self.quantize(x, params, base, consts), params, base, out, consts)
