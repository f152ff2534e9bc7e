"""quantize_dynamic: int8 weights with activations quantized at run time, or weight-only int8/int4.

mode=dynamic (MatMul / Gemm with a constant weight), the pattern ORT fuses into
DynamicQuantizeMatMul (com.microsoft) on its CPU EP:
    A -> MatMul(W) -> Y
      => DynamicQuantizeLinear(A) -> (a_q, a_scale, a_zp)
         MatMulInteger(a_q, W int8, a_zp, w_zp) -> Cast(float) -> Mul(a_scale * w_scale) [-> Add(bias)] -> Y
mode=weight_only (no activation quantization, only smaller weights):
    bits=8: W int8 -> DequantizeLinear (per channel, opset 13; or block-wise with block_size, opset 21)
    bits=4: MatMul(A, W) -> com.microsoft MatMulNBits(A, W packed 4-bit, block scales)  (ORT CPU/CUDA)
Conv (either mode): its weight becomes int8 -> DequantizeLinear (per output channel), the Conv
stays float: the weights shrink 4x and ORT runs it as before (ORT has no dynamic conv kernel).
Weights inside If branches and Loop/Scan bodies (nested too) are quantized in place, in the
graph that reads them. Models older than the opset a format needs are upgraded with
onnx.version_converter (noted).
"""

from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from onnxcomp.base import Pass, PassResult, param
from onnxcomp.errors import PassError
from onnxcomp.model import Model, upgrade_opset
from onnxcomp.quant.lowbit import pack_bits
from onnxcomp.quant.placement import name_nodes
from onnxcomp.quant.qdq import NodeBuilder, quantize_array, weight_params
from onnxcomp.registry import register
from onnxcomp.subgraphs import NameSpace, Scope, node_scopes


@register
class QuantizeDynamic(Pass):
    """Dynamic int8 (weights int8, activations at run time) or weight-only int8/int4 for MatMul/Gemm."""

    name = "quantize_dynamic"
    lossless = False

    @dataclass(frozen=True)
    class Config:
        mode: str = param("dynamic", "dynamic activations, or weight-only", choices=("dynamic", "weight_only"))
        per_channel: bool = param(True, "one weight scale per output column")
        bits: int = param(8, "weight bits (weight_only: 8 or 4)", choices=(8, 4))
        block_size: int = param(0, "weight_only: block size along K (0: per channel for 8 bits, 32 for 4)",
                                min=0, max=4096)
        ops: tuple[str, ...] = param(("MatMul", "Gemm", "Conv"), "op types to quantize (Conv: weight-only int8)")
        exclude: tuple[str, ...] = param((), "node names or op types (fnmatch) kept in float")
        min_size: int = param(1024, "weights with fewer elements stay in float", min=0)
        reduce_range: bool | None = param(None, "7-bit weights for mode=dynamic, avoiding the int16 saturation of "
                                          "AVX2's u8*s8 kernels (default: on for x86 CPUs without VNNI)")

    def backoff(self, shortfall: float = 1.0):
        """For the accuracy gate: per-channel scales, then 8 bits; nothing weaker after that."""
        if not self.config.per_channel:
            return self.with_params(per_channel=True)
        if self.config.bits == 4:
            return self.with_params(bits=8)
        return None

    def run(self, model: Model, ctx) -> PassResult:
        cfg = self.config
        started = time.perf_counter()
        if cfg.mode == "dynamic" and cfg.bits != 8:
            raise PassError("quantize_dynamic: mode=dynamic supports bits=8 only (use mode=weight_only for 4 bits)")
        need = 11
        if cfg.mode == "weight_only" and cfg.bits == 8:
            need = 21 if cfg.block_size else 13
        if cfg.per_channel and any(n.op == "Conv" for _, n, _ in _targets(model.graph, cfg)):
            need = max(need, 13)  # per-channel DequantizeLinear (axis)
        stats: dict = {}
        if model.opset < need:
            upgraded = upgrade_opset(model, need)
            ctx.note(f"quantize_dynamic: upgraded the model from opset {model.opset} to {need}")
            stats["opset_upgraded_from"] = model.opset
            model.graph, model.opset_imports, model.ir_version = (upgraded.graph, upgraded.opset_imports,
                                                                  upgraded.ir_version)
        name_nodes(model.graph)
        names = NameSpace(model.graph)
        builders: dict[int, NodeBuilder] = {}
        per_subgraph: dict[str, int] = {}
        convs: dict[tuple[int, int], gs.Variable] = {}  # (weight, graph) -> its DequantizeLinear output
        done = conv_done = 0
        weight_bytes_before = weight_bytes_after = 0
        for scope, node, (w, trans_b) in _targets(model.graph, cfg):
            build = builders.setdefault(id(scope.graph), NodeBuilder(scope.graph, "dq", names.taken))
            if node.op == "Conv" and (id(w), id(scope.graph)) in convs:  # a weight shared by several Convs
                node.inputs[1] = convs[(id(w), id(scope.graph))]
                continue
            stored = w._values
            values = np.asarray(w.values, np.float32)
            if isinstance(stored, LazyValues):
                w.values = stored  # not kept loaded: a large model's float weights stay in their file
            if not np.isfinite(values).all():  # no int scale represents NaN/Inf: this node stays float
                stats["skipped_nan_inf"] = stats.get("skipped_nan_inf", 0) + 1
                continue
            if trans_b:
                values = values.T
            weight_bytes_before += values.nbytes
            if node.op == "Conv":
                nbytes, convs[(id(w), id(scope.graph))] = self._conv_weight(build, node, values)
                weight_bytes_after += nbytes
                conv_done += 1
            elif cfg.mode == "dynamic":
                weight_bytes_after += self._dynamic(build, node, values)
            elif cfg.bits == 8:
                weight_bytes_after += self._weight_only_int8(build, node, values)
            else:
                weight_bytes_after += self._matmul_nbits(build, node, values, model)
            done += 1
            if scope.path:
                per_subgraph[scope.path] = per_subgraph.get(scope.path, 0) + 1
            del values
        if done and cfg.mode == "weight_only" and cfg.bits == 4:
            model.opset_imports.setdefault("com.microsoft", 1)
        model.graph.cleanup().toposort()
        stats.update({"nodes_quantized": done, "weight_bytes_before": weight_bytes_before,
                      "weight_bytes_after": weight_bytes_after, "mode": cfg.mode, "bits": cfg.bits,
                      "quantize_s": round(time.perf_counter() - started, 3)})
        if conv_done:
            stats["conv_weights_quantized"] = conv_done  # weight-only int8: ORT has no dynamic conv
        if per_subgraph:
            stats["subgraph_nodes_quantized"] = sum(per_subgraph.values())
            stats["per_subgraph"] = per_subgraph
        if not done:
            stats["reason"] = (f"quantize_dynamic: nothing to quantize: no {'/'.join(cfg.ops)} node with a constant "
                               f"float32 weight of at least {cfg.min_size} elements")
            ctx.note(stats["reason"])
        return PassResult(done > 0, stats)

    # ---- rewrites ----------------------------------------------------------------------------
    def _gemm_bias(self, node):
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].name:
            return node.inputs[2]
        return None

    def _finish(self, build, node, y_float, bias):
        """Route y_float (+ Gemm bias) to the node's output and drop the node."""
        out = node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        if bias is not None:
            build.node("Add", [y_float, bias], [out], base=f"{node.name}_bias")
        else:
            producer = y_float.inputs[0]
            producer.outputs[producer.outputs.index(y_float)] = out

    def _dynamic(self, build, node, w: np.ndarray) -> int:
        reduce = self.config.reduce_range if self.config.reduce_range is not None else cpu_saturates_u8s8()
        wp = weight_params(w, 1 if self.config.per_channel else None, reduce_range=reduce)
        wq = build.const(f"{node.name}_W_quantized", quantize_array(w, wp, reduce))
        a = node.inputs[0]
        aq = gs.Variable(build.unique(f"{node.name}_A_quantized"), dtype=np.uint8)
        a_scale = gs.Variable(build.unique(f"{node.name}_A_scale"), dtype=np.float32)
        a_zp = gs.Variable(build.unique(f"{node.name}_A_zero_point"), dtype=np.uint8)
        build.node("DynamicQuantizeLinear", [a], [aq, a_scale, a_zp], base=f"{node.name}_DynamicQuantizeLinear")
        acc = gs.Variable(build.unique(f"{node.name}_int32"), dtype=np.int32)
        w_zp = build.const(f"{node.name}_W_zero_point", wp.zero_point)
        build.node("MatMulInteger", [aq, wq, a_zp, w_zp], [acc], base=f"{node.name}_MatMulInteger")
        accf = gs.Variable(build.unique(f"{node.name}_int32_float"), dtype=np.float32)
        build.node("Cast", [acc], [accf], {"to": 1}, base=f"{node.name}_Cast")
        scale = gs.Variable(build.unique(f"{node.name}_scale"), dtype=np.float32)
        build.node("Mul", [a_scale, build.const(f"{node.name}_W_scale", wp.scale)], [scale],
                   base=f"{node.name}_scale_Mul")
        y = gs.Variable(build.unique(f"{node.name}_float"), dtype=np.float32)
        build.node("Mul", [accf, scale], [y], base=f"{node.name}_Mul")
        self._finish(build, node, y, self._gemm_bias(node))
        return wq.values.nbytes + wp.scale.nbytes

    def _weight_only_int8(self, build, node, w: np.ndarray) -> int:
        bs = self.config.block_size
        if bs:
            k = w.shape[0]
            blocks = -(-k // bs)
            padded = np.zeros((blocks * bs, w.shape[1]), np.float32)
            padded[:k] = w
            absmax = np.abs(padded.reshape(blocks, bs, -1)).max(axis=1)
            scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
            q = np.clip(np.rint(w / np.repeat(scale, bs, axis=0)[:k]), -127, 127).astype(np.int8)
            wq = build.const(f"{node.name}_W_quantized", q)
            out = gs.Variable(build.unique(f"{node.name}_W_dequantized"), dtype=np.float32)
            build.node("DequantizeLinear", [wq, build.const(f"{node.name}_W_scale", scale),
                                            build.const(f"{node.name}_W_zero_point", np.zeros_like(scale, np.int8))],
                       [out], {"axis": 0, "block_size": int(bs)}, base=f"{node.name}_W_DequantizeLinear")
            nbytes = q.nbytes + scale.nbytes
        else:
            wp = weight_params(w, 1 if self.config.per_channel else None)
            wq = build.const(f"{node.name}_W_quantized", quantize_array(w, wp))
            out = build.dequantize(wq, wp, f"{node.name}_W")
            nbytes = wq.values.nbytes + wp.scale.nbytes
        y = gs.Variable(build.unique(f"{node.name}_float"), dtype=np.float32)
        build.node("MatMul", [node.inputs[0], out], [y], base=f"{node.name}_MatMul")
        self._finish(build, node, y, self._gemm_bias(node))
        return nbytes

    def _conv_weight(self, build, node, w: np.ndarray) -> tuple[int, gs.Variable]:
        """Conv(X, W) -> Conv(X, DequantizeLinear(W int8)): weight-only, per output channel."""
        wp = weight_params(w, 0 if self.config.per_channel else None)
        wq = build.const(f"{node.name}_W_quantized", quantize_array(w, wp))
        out = build.dequantize(wq, wp, f"{node.name}_W")
        out.shape = list(w.shape)
        node.inputs[1] = out
        return wq.values.nbytes + wp.scale.nbytes, out

    def _matmul_nbits(self, build, node, w: np.ndarray, model: Model) -> int:
        packed, scales, zps, bs = pack_nbits(w, self.config.block_size or 32)
        k, n = w.shape
        y = gs.Variable(build.unique(f"{node.name}_float"), dtype=np.float32)
        build.node("MatMulNBits", [node.inputs[0], build.const(f"{node.name}_W_packed", packed),
                                   build.const(f"{node.name}_W_scales", scales),
                                   build.const(f"{node.name}_W_zero_points", zps)],
                   [y], {"K": int(k), "N": int(n), "bits": 4, "block_size": int(bs)}, domain="com.microsoft",
                   base=f"{node.name}_MatMulNBits")
        self._finish(build, node, y, self._gemm_bias(node))
        return packed.nbytes + scales.nbytes + zps.nbytes


def cpu_saturates_u8s8() -> bool:
    """True on x86 CPUs without VNNI, where ORT's u8*s8 int8 kernels (vpmaddubsw) add pairs of
    products in int16 and can saturate with full-range weights (measured here: 7 % output
    error on a small MLP instead of 1 %); 7-bit weights cannot saturate."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return True
    return not any(f in flags.split() for f in ("avx512_vnni", "avx_vnni", "amx_int8"))


NBITS_CHUNK = 1024  # output columns quantized at a time: the float temporaries stay a slice of W


def pack_nbits(w: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """4-bit asymmetric block quantization of W [K, N] in MatMulNBits layout.

    Returns (B uint8 [N, blocks, block_size/2], scales float32 [N*blocks], zero points uint8
    [N * ceil(blocks/2)], block_size); two values per byte, the lower index in the low nibble.
    The columns go NBITS_CHUNK at a time (a 32000-wide lm_head made ~4 float copies of itself).
    """
    k, n = w.shape
    blocks = -(-k // block_size)
    packed = np.empty((n, blocks, block_size // 2), np.uint8)
    scales = np.empty((n, blocks), np.float32)
    zps = np.empty((n, -(-blocks // 2)), np.uint8)
    for start in range(0, n, NBITS_CHUNK):
        stop = min(n, start + NBITS_CHUNK)
        padded = np.zeros((stop - start, blocks * block_size), np.float32)
        padded[:, :k] = w[:, start:stop].T
        wb = padded.reshape(stop - start, blocks, block_size)  # column-major blocks along K
        lo = np.minimum(wb.min(-1), 0.0)
        hi = np.maximum(wb.max(-1), 0.0)
        scale = np.where(hi > lo, (hi - lo) / 15.0, 1.0).astype(np.float32)
        zp = np.clip(np.rint(-lo / scale), 0, 15).astype(np.uint8)
        wb /= scale[..., None]
        np.rint(wb, out=wb)
        wb += zp[..., None]
        np.clip(wb, 0, 15, out=wb)
        packed[start:stop] = pack_bits(wb.astype(np.uint8), 4)
        scales[start:stop], zps[start:stop] = scale, pack_bits(zp, 4)
    return packed, scales.reshape(-1), zps.reshape(-1), block_size


def _targets(graph: gs.Graph, cfg) -> list[tuple[Scope, gs.Node, tuple[gs.Constant, bool]]]:
    """(scope, node, (weight, transposed)) for every node to quantize, in every graph of the model."""
    return [(scope, n, hit) for scope, n in node_scopes(graph) if (hit := _target(n, cfg))]


def _target(node: gs.Node, cfg) -> tuple[gs.Constant, bool] | None:
    """(weight, transposed) when the node is a MatMul/Gemm with a constant 2-D float weight, or a
    Conv with a constant float weight."""
    if node.op not in cfg.ops or node.op not in ("MatMul", "Gemm", "Conv") or node.domain not in ("", None):
        return None
    if any(fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(node.op, p) for p in cfg.exclude):
        return None
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant) or isinstance(node.inputs[0], gs.Constant):
        return None
    w = node.inputs[1]
    try:  # type and shape without loading the values
        dtype, shape = np.dtype(w.dtype), tuple(w.shape)
    except TypeError:  # a type numpy lacks (bfloat16...): graphsurgeon converts it when loading
        dtype, shape = np.dtype(w.values.dtype), w.values.shape
    if node.op == "Conv":
        ok = dtype == np.float32 and len(shape) >= 3 and int(np.prod(shape)) >= cfg.min_size
        return (w, False) if ok else None
    if dtype != np.float32 or len(shape) != 2 or int(np.prod(shape)) < cfg.min_size:
        return None
    trans_b = False
    if node.op == "Gemm":
        if int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1.0)) != 1.0 \
                or float(node.attrs.get("beta", 1.0)) != 1.0:
            return None
        trans_b = bool(int(node.attrs.get("transB", 0)))
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and bias.name and not isinstance(bias, gs.Constant):
            return None
    if cfg.mode == "weight_only" and cfg.bits == 4 and shape[1 if trans_b else 0] < 16:
        return None
    return w, trans_b

