"""Knowledge distillation: retrain a compressed ONNX student against its ONNX teacher.

    teacher (ORT) --soft targets--> loss <-- student (the ONNX graph run as a torch module)
    trained weights -> written back into the student's own initializers -> checked on ORT

The student graph is interpreted op by op in torch (`StudentModule`), with its compression
structure kept trainable but intact:
  pruned weights      W * mask, mask = (W != 0): zeros stay zero, their gradient is dropped;
  codebook weights    Gather(codebook, indices): the codebook is the parameter, so each centroid
                      receives the sum of its weights' gradients (Deep Compression's retraining);
                      a centroid pinned at 0 (keep_zero) stays 0;
  QDQ int8 weights    DequantizeLinear(q, scale, zp): a float shadow weight, fake-quantized in the
                      forward pass (round/clamp with a straight-through gradient), re-quantized
                      with the same scale and zero point at the end; q == zp stays there.
Activation QuantizeLinear/DequantizeLinear pairs run as fake quantization too, so the student
trains against the rounding it will see on ORT.

Why write the weights back instead of exporting the module again (onnxcomp/torch_export.py):
the graph, its names, opsets and compression structure stay exactly as the passes left them,
and nothing is re-clustered or re-quantized from scratch. Why a converter of our own instead of
onnx2torch: onnx2torch 1.5.15 imports torchvision, whose PyPI wheel does not load beside the
CPU torch 2.13 this project pins ("operator torchvision::nms does not exist"), installing it
pulls a CUDA torch, and it knows nothing of codebooks, masks or QDQ fake-quantization — which is
what this module is for. The op subset is what our zoo (CNNs, BERT-style encoders) needs.

Loss: temperature-scaled KL on rank-2 outputs (logits), teacher-normalised MSE on the others
(hidden states) and on named intermediate tensors (feature distillation); with labels, a
cross-entropy term on the first output weighted by `alpha`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp.errors import InputError, PassError
from onnxcomp.model import Model

WEIGHT_SLOTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}
BIAS_SLOTS = {"Conv": (2,), "Gemm": (2,), "LayerNormalization": (1, 2)}


@dataclass
class DistillConfig:
    epochs: int = 20
    steps: int = 0  # when > 0, the number of optimizer steps (overrides epochs)
    lr: float = 1e-3
    batch_size: int = 32
    temperature: float = 4.0
    alpha: float = 0.5  # weight of the hard-label term when labels are given
    loss: str = "auto"  # auto | kl | mse
    features: tuple[str, ...] = ()
    seed: int = 0
    device: str = "auto"
    threads: int = 1  # CPU threads for torch (0: torch's default); one is fastest on a shared machine

    def __post_init__(self):
        checks = [(self.epochs >= 1 or self.steps >= 1, "epochs or steps must be at least 1"),
                  (self.lr > 0, "the learning rate must be positive"), (self.batch_size >= 1, "batch size must be >= 1"),
                  (self.temperature > 0, "the temperature must be positive"), (0 <= self.alpha <= 1, "alpha must be in [0, 1]"),
                  (self.loss in ("auto", "kl", "mse"), "loss must be auto, kl or mse"),
                  (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda")]
        for ok, message in checks:
            if not ok:
                raise InputError(f"distill: {message}")


@dataclass
class DistillResult:
    steps: int
    loss_first: float  # mean loss over the first epoch (or first 10 % of steps)
    loss_last: float  # mean loss over the last one
    losses: list[float] = field(repr=False, default_factory=list)
    trained_tensors: int = 0
    device: str = "cpu"
    seconds: float = 0.0
    max_abs_vs_ort: float = 0.0

    def stats(self) -> dict[str, Any]:
        return {"steps": self.steps, "loss_first": round(self.loss_first, 6), "loss_last": round(self.loss_last, 6),
                "trained_tensors": self.trained_tensors, "device": self.device,
                "max_abs_vs_ort": float(f"{self.max_abs_vs_ort:.3g}")}


# ---- the student as a torch module ----------------------------------------------------------
def _torch_dtype(onnx_type: int):
    import torch

    np_type = onnx.helper.tensor_dtype_to_np_dtype(onnx_type)
    return torch.from_numpy(np.zeros(1, np_type)).dtype


def _qrange(dtype: np.dtype) -> tuple[int, int]:
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


def _per_axis(t, ref, axis: int):
    """A per-channel scale/zero point shaped to broadcast along `axis` of `ref`."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * ref.dim()
    shape[axis % ref.dim()] = -1
    return t.reshape(shape)


def _round_ste(x):
    """round() whose gradient is the identity (straight-through estimator)."""
    return x.round().detach() + (x - x.detach())  # exactly round(x) forward: x - x.detach() is 0


def _roles(graph: gs.Graph) -> dict[str, str]:
    """Which constants train and how: weight (masked), bias, codebook, qweight (int, QDQ)."""
    roles: dict[str, str] = {}
    for node in graph.nodes:
        for slot in WEIGHT_SLOTS.get(node.op, ()):
            if slot < len(node.inputs):
                _mark_weight(node.inputs[slot], roles)
        for slot in BIAS_SLOTS.get(node.op, ()):
            if slot < len(node.inputs):
                t = node.inputs[slot]
                if isinstance(t, gs.Constant) and _is_float(t) and t.values.size > 1:
                    roles.setdefault(t.name, "bias")
                elif not isinstance(t, gs.Constant) and t.inputs and t.inputs[0].op == "DequantizeLinear":
                    _mark_weight(t, roles, role="qbias")
        if node.op == "Add" and any(not isinstance(t, gs.Constant) and t.inputs and t.inputs[0].op in WEIGHT_SLOTS
                                    for t in node.inputs):
            for t in node.inputs:  # the bias of a MatMul (transformers export Linear as MatMul + Add)
                if isinstance(t, gs.Constant) and _is_float(t) and t.values.size > 1:
                    roles.setdefault(t.name, "bias")
    return roles


def _is_float(t: gs.Constant) -> bool:
    return np.dtype(t.values.dtype) == np.float32


def _mark_weight(t, roles: dict[str, str], role: str = "weight") -> None:
    if isinstance(t, gs.Constant):
        if _is_float(t) and t.values.size > 1:
            roles[t.name] = role
        return
    producer = t.inputs[0] if t.inputs else None
    if producer is None:
        return
    if producer.op == "Gather" and isinstance(producer.inputs[0], gs.Constant) and _is_float(producer.inputs[0]):
        idx = producer.inputs[1]
        src = idx.inputs[0] if not isinstance(idx, gs.Constant) and idx.inputs else None
        if isinstance(idx, gs.Constant) or (src is not None and src.op == "Cast" and isinstance(src.inputs[0], gs.Constant)):
            roles[producer.inputs[0].name] = "codebook"
    elif producer.op == "DequantizeLinear" and isinstance(producer.inputs[0], gs.Constant) \
            and all(isinstance(x, gs.Constant) for x in producer.inputs[1:]):
        roles[producer.inputs[0].name] = "qweight" if role == "weight" else "qbias"


def student_module(model: Model, features: Sequence[str] = ()):
    """The student graph as a torch.nn.Module whose forward returns [outputs..., features...];
    `module.write_back()` puts the trained values into the graph's constants."""
    import torch

    graph = model.graph
    graph.toposort()
    roles = _roles(graph)
    tensors = graph.tensors()
    missing = [f for f in features if f not in tensors or isinstance(tensors[f], gs.Constant)]
    if missing:
        raise InputError(f"distill: feature tensor {missing[0]!r} is not an intermediate tensor of the student")
    unsupported = sorted({n.op for n in graph.nodes if n.op not in OPS or (n.domain or "") not in ("", "ai.onnx")})
    if unsupported:
        raise PassError(f"distill cannot train through {', '.join(unsupported)} (its op set: onnxcomp/distill.py); "
                        "place distill before the pass that introduced them")

    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.nodes = list(graph.nodes)
            self.input_names = [t.name for t in graph.inputs]
            self.output_names = [t.name for t in graph.outputs] + list(features)
            self.names: dict[str, str] = {}  # tensor name -> attribute name
            self.qinfo: dict[str, tuple] = {}  # quantized constant -> (axis, qmin, qmax, integer dtype)
            self.roles = {}
            dq = {n.inputs[0].name: n for n in graph.nodes if n.op == "DequantizeLinear"}
            for i, (name, t) in enumerate(sorted((k, v) for k, v in tensors.items() if isinstance(v, gs.Constant))):
                values = np.asarray(t.values)
                attr = f"c{i}"
                self.names[name] = attr
                role = roles.get(name)
                if role in ("qweight", "qbias"):
                    node = dq[name]
                    scale = np.asarray(node.inputs[1].values, np.float32)
                    zp = np.asarray(node.inputs[2].values) if len(node.inputs) > 2 else np.zeros((), values.dtype)
                    axis = int(node.attrs.get("axis", 1))
                    qmin, qmax = _qrange(values.dtype)
                    q = torch.from_numpy(values.astype(np.float32))
                    s = _per_axis(torch.from_numpy(scale.copy()), q, axis)
                    z = _per_axis(torch.from_numpy(zp.astype(np.float32)), q, axis)
                    self.register_buffer(attr + "_scale", s)
                    self.register_buffer(attr + "_zp", z)
                    # a weight at its zero point was pruned (or rounds to zero): it stays there
                    self.register_buffer(attr + "_mask", (q != z).float() if role == "qweight" else torch.ones_like(q))
                    self.qinfo[name] = (axis, qmin, qmax, values.dtype)
                    setattr(self, attr, torch.nn.Parameter((q - z) * s))
                elif role in ("weight", "bias", "codebook"):
                    w = torch.from_numpy(values.astype(np.float32).copy())
                    if role != "bias":
                        self.register_buffer(attr + "_mask", (w != 0).float())
                    setattr(self, attr, torch.nn.Parameter(w))
                else:
                    self.register_buffer(attr, torch.from_numpy(values.copy()) if values.dtype != np.bool_ or values.ndim
                                         else torch.tensor(bool(values)))
                if role:
                    self.roles[name] = role

        def constant(self, name: str):
            attr = self.names[name]
            value = getattr(self, attr)
            role = self.roles.get(name)
            if role in ("qweight", "qbias"):
                _, qmin, qmax, _ = self.qinfo[name]
                s, z = getattr(self, attr + "_scale"), getattr(self, attr + "_zp")
                q = torch.clamp(_round_ste(value / s) + z, qmin, qmax)
                return q * getattr(self, attr + "_mask") + z * (1 - getattr(self, attr + "_mask"))
            if role in ("weight", "codebook"):
                return value * getattr(self, attr + "_mask")
            return value

        def forward(self, *args, **kwargs):
            env = dict(zip(self.input_names, args))
            env.update(kwargs)
            device = next(iter(env.values())).device
            for node in self.nodes:
                ins = [None if (t is None or t.name == "") else
                       (self.constant(t.name) if isinstance(t, gs.Constant) else env[t.name]) for t in node.inputs]
                outs = OPS[node.op](node, ins)
                if not isinstance(outs, (list, tuple)):
                    outs = [outs]
                for t, v in zip(node.outputs, outs):
                    # shape arithmetic (Shape, Range, Constant...) is made on the CPU; keep one device
                    env[t.name] = v.to(device) if v.device != device else v
            return [env[n] for n in self.output_names]

        def write_back(self) -> int:
            """Copy the trained values into the student graph's constants; returns how many changed."""
            changed = 0
            for name in self.roles:
                const = tensors[name]
                with torch.no_grad():
                    value = self.constant(name).detach().cpu().numpy()
                old = np.asarray(const.values)
                new = np.rint(value).astype(self.qinfo[name][3]) if name in self.qinfo else value.astype(np.float32)
                if new.shape != old.shape:
                    new = new.reshape(old.shape)
                if not np.array_equal(new, old):
                    const.values = new
                    changed += 1
            return changed

    return Student()


# ---- op implementations (ONNX semantics, default domain) --------------------------------------
def _ints(t) -> list[int]:
    return [int(v) for v in t.reshape(-1).tolist()]


def _conv(node, ins):
    import torch.nn.functional as F

    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    dims = w.dim() - 2
    a = node.attrs
    pads = list(a.get("pads", [0] * 2 * dims))
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise PassError(f"distill: Conv {node.name}: auto_pad={a['auto_pad']} is not supported")
    stride, dil, groups = a.get("strides", [1] * dims), a.get("dilations", [1] * dims), a.get("group", 1)
    conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    if pads[:dims] == pads[dims:]:
        return conv(x, w, b, stride, pads[:dims], dil, groups)
    torch_pads = [p for i in reversed(range(dims)) for p in (pads[i], pads[i + dims])]
    return conv(F.pad(x, torch_pads), w, b, stride, 0, dil, groups)


def _pool(node, ins, kind: str):
    import torch.nn.functional as F

    x, a = ins[0], node.attrs
    kernel = list(a["kernel_shape"])
    dims = len(kernel)
    pads = list(a.get("pads", [0] * 2 * dims))
    stride = a.get("strides", [1] * dims)
    ceil = bool(a.get("ceil_mode", 0))
    if pads[:dims] != pads[dims:]:
        raise PassError(f"distill: {node.op} {node.name}: asymmetric pads are not supported")
    if kind == "max":
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[dims - 1]
        return fn(x, kernel, stride, pads[:dims], a.get("dilations", [1] * dims), ceil)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[dims - 1]
    return fn(x, kernel, stride, pads[:dims], ceil, bool(a.get("count_include_pad", 0)))


def _gemm(node, ins):
    a, b = ins[0], ins[1]
    attrs = node.attrs
    if attrs.get("transA", 0):
        a = a.t()
    if attrs.get("transB", 0):
        b = b.t()
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(ins) > 2 and ins[2] is not None:
        y = y + attrs.get("beta", 1.0) * ins[2]
    return y


def _reshape(node, ins):
    x, shape = ins[0], _ints(ins[1])
    if not node.attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _slice(node, ins):
    x = ins[0]
    starts, ends = _ints(ins[1]), _ints(ins[2])
    axes = _ints(ins[3]) if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = _ints(ins[4]) if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    index = [slice(None)] * x.dim()
    for s, e, ax, st in zip(starts, ends, axes, steps):
        if st < 0:
            raise PassError(f"distill: Slice {node.name}: negative steps are not supported")
        size = x.shape[ax]
        s = max(0, min(size, s + size if s < 0 else s))
        e = max(0, min(size, e + size if e < 0 else e))
        index[ax] = slice(s, e, st)
    return x[tuple(index)]


def _gather(node, ins):
    import torch

    data, idx = ins[0], ins[1].long()
    axis = node.attrs.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = torch.index_select(data, axis, idx.reshape(-1))
    return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))


def _unsqueeze(node, ins):
    axes = _ints(ins[1]) if len(ins) > 1 else list(node.attrs["axes"])
    x = ins[0]
    rank = x.dim() + len(axes)
    for ax in sorted(a % rank for a in axes):
        x = x.unsqueeze(ax)
    return x


def _squeeze(node, ins):
    axes = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else list(node.attrs.get("axes", []))
    x = ins[0]
    if not axes:
        return x.squeeze()
    for ax in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(ax)
    return x


def _shape(node, ins):
    import torch

    dims = list(ins[0].shape)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64)


def _constant(node, ins):
    import torch

    value = node.attrs.get("value")
    if value is None:
        raise PassError(f"distill: Constant {node.name}: only the 'value' attribute is supported")
    return torch.from_numpy(np.array(value.values))


def _constant_of_shape(node, ins):
    import torch

    value = node.attrs.get("value")
    fill = np.array(value.values).reshape(-1) if value is not None else np.zeros(1, np.float32)
    return torch.full(_ints(ins[0]), fill[0].item(), dtype=torch.from_numpy(fill).dtype)


def _div(node, ins):
    import torch

    a, b = ins
    if not a.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _layer_norm(node, ins):
    import torch.nn.functional as F

    x, scale = ins[0], ins[1]
    bias = ins[2] if len(ins) > 2 else None
    axis = node.attrs.get("axis", -1) % x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), scale, bias, node.attrs.get("epsilon", 1e-5))


def _batch_norm(node, ins):
    import torch.nn.functional as F

    x, scale, bias, mean, var = ins[:5]
    return F.batch_norm(x, mean, var, scale, bias, False, 0.0, node.attrs.get("epsilon", 1e-5))


def _quantize(node, ins):
    import torch

    x, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 and ins[2] is not None else torch.zeros((), dtype=torch.uint8)
    qmin, qmax = _qrange(_np_dtype(zp))
    axis = node.attrs.get("axis", 1)
    s, z = _per_axis(scale, x, axis), _per_axis(zp.float(), x, axis)
    return torch.clamp(_round_ste(x / s) + z, qmin, qmax)  # integer values, kept in float


def _np_dtype(t):
    import torch

    return {torch.int8: np.int8, torch.uint8: np.uint8, torch.int16: np.int16, torch.uint16: np.uint16,
            torch.int32: np.int32}[t.dtype]


def _dequantize(node, ins):
    x, scale = ins[0], ins[1]
    zp = ins[2] if len(ins) > 2 and ins[2] is not None else None
    axis = node.attrs.get("axis", 1)
    s = _per_axis(scale, x, axis)
    z = _per_axis(zp.float(), x, axis) if zp is not None else 0.0
    return (x.float() - z) * s


def _range(node, ins):
    import torch

    start, limit, delta = (v.item() for v in ins)
    return torch.arange(start, limit, delta, dtype=ins[0].dtype)


def _binary(fn):
    return lambda node, ins: fn(ins[0], ins[1])


def _unary(fn):
    return lambda node, ins: fn(ins[0])


def _op_table() -> dict[str, Callable]:
    import torch
    import torch.nn.functional as F

    return {
        "Conv": _conv, "Gemm": _gemm, "MatMul": _binary(torch.matmul),
        "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": _div,
        "Pow": _binary(torch.pow), "Max": lambda n, i: torch.stack(torch.broadcast_tensors(*i)).amax(0),
        "Min": lambda n, i: torch.stack(torch.broadcast_tensors(*i)).amin(0),
        "Relu": _unary(F.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
        "Erf": _unary(torch.erf), "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Log": _unary(torch.log),
        "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal),
        "Identity": _unary(lambda x: x), "Dropout": _unary(lambda x: x),
        "LeakyRelu": lambda n, i: F.leaky_relu(i[0], n.attrs.get("alpha", 0.01)),
        "Clip": lambda n, i: torch.clamp(i[0], i[1] if len(i) > 1 else None, i[2] if len(i) > 2 else None),
        "Gelu": lambda n, i: F.gelu(i[0], approximate="tanh" if n.attrs.get("approximate") == "tanh" else "none"),
        "Softmax": lambda n, i: torch.softmax(i[0], n.attrs.get("axis", -1)),
        "LogSoftmax": lambda n, i: torch.log_softmax(i[0], n.attrs.get("axis", -1)),
        "MaxPool": lambda n, i: _pool(n, i, "max"), "AveragePool": lambda n, i: _pool(n, i, "avg"),
        "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
        "GlobalMaxPool": _unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
        "BatchNormalization": _batch_norm, "LayerNormalization": _layer_norm,
        "Flatten": lambda n, i: i[0].reshape(int(np.prod(i[0].shape[:n.attrs.get("axis", 1)])), -1),
        "Reshape": _reshape, "Transpose": lambda n, i: i[0].permute(*(n.attrs.get("perm") or
                                                                      reversed(range(i[0].dim())))),
        "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Slice": _slice, "Gather": _gather,
        "Concat": lambda n, i: torch.cat(i, n.attrs["axis"]),
        "Shape": _shape, "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Range": _range,
        "Expand": lambda n, i: i[0].expand(torch.broadcast_shapes(tuple(i[0].shape), tuple(_ints(i[1])))),
        "Cast": lambda n, i: i[0].to(_torch_dtype(n.attrs["to"])),
        "Where": lambda n, i: torch.where(i[0].bool(), i[1], i[2]),
        "Equal": _binary(torch.eq), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
        "GreaterOrEqual": _binary(torch.ge), "LessOrEqual": _binary(torch.le),
        "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or), "Not": _unary(torch.logical_not),
        "ReduceMean": lambda n, i: _reduce(n, i, torch.mean), "ReduceSum": lambda n, i: _reduce(n, i, torch.sum),
        "QuantizeLinear": _quantize, "DequantizeLinear": _dequantize,
    }


def _reduce(node, ins, fn):
    axes = _ints(ins[1]) if len(ins) > 1 and ins[1] is not None else node.attrs.get("axes")
    keep = bool(node.attrs.get("keepdims", 1))
    if not axes:
        return fn(ins[0], dim=tuple(range(ins[0].dim())), keepdim=keep)
    return fn(ins[0], dim=tuple(axes), keepdim=keep)


class _Ops(dict):
    """The op table, built on first use (so importing this module does not import torch)."""

    def _fill(self):
        if not dict.__len__(self):
            self.update(_op_table())

    def __contains__(self, key):
        self._fill()
        return dict.__contains__(self, key)

    def __getitem__(self, key):
        self._fill()
        return dict.__getitem__(self, key)

    def __iter__(self):
        self._fill()
        return dict.__iter__(self)


OPS = _Ops()


# ---- data, teacher, loss, training ------------------------------------------------------------
def batches(feeds: list[dict[str, np.ndarray]], size: int) -> list[dict[str, np.ndarray]]:
    """Consecutive feeds of equal shapes concatenated along axis 0, at most `size` samples each."""
    out, group = [], []

    def flush():
        if group:
            out.append({k: np.concatenate([f[k] for f in group]) for k in group[0]})
            group.clear()

    for feed in feeds:
        signature = {k: (v.shape[1:], v.dtype) for k, v in feed.items()}
        if group and (len(group) >= size or signature != {k: (v.shape[1:], v.dtype) for k, v in group[0].items()}):
            flush()
        group.append(feed)
    flush()
    return out


def teacher_outputs(teacher, data: list[dict[str, np.ndarray]], names: list[str]) -> list[list[np.ndarray]]:
    """The teacher's outputs (and feature tensors) on ORT for every batch; per sample if it has a fixed batch."""
    from onnxcomp.calibration import with_extra_outputs
    from onnxcomp.model import load
    from onnxcomp.runtime import CannotRun, make_session, run

    proto = load(teacher).to_proto()
    known = {o for n in proto.graph.node for o in n.output}
    missing = [n for n in names if n not in known]
    if missing:
        raise InputError(f"distill: the teacher has no tensor named {missing[0]!r}")
    session = make_session(with_extra_outputs(proto, names, typed=False), "cpu", threads=None)
    result = []
    for feed in data:
        try:
            values = run(session, feed, names)
            result.append([values[n] for n in names])
        except CannotRun:  # a model with a fixed batch of one
            rows = [run(session, {k: v[i:i + 1] for k, v in feed.items()}, names) for i in range(len(next(iter(feed.values()))))]
            result.append([np.concatenate([r[n] for r in rows]) for n in names])
    return result


def distill_loss(student_out, teacher_out, labels, cfg: DistillConfig, kinds: list[str]):
    """Soft-target loss over outputs and features, plus the hard-label term when labels are given."""
    import torch.nn.functional as F

    soft = 0.0
    for s, t, kind in zip(student_out, teacher_out, kinds):
        s = s.float()
        if kind == "skip":
            continue
        if kind == "kl":
            T = cfg.temperature
            soft = soft + F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), reduction="batchmean",
                                   log_target=True) * T * T
        else:  # mean squared error relative to the teacher's energy: scale-free across outputs
            soft = soft + F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-12)
    if labels is None:
        return soft
    hard = F.cross_entropy(student_out[0].float().reshape(len(labels), -1), labels)
    return (1 - cfg.alpha) * soft + cfg.alpha * hard


def _loss_kinds(cfg: DistillConfig, outputs: list[np.ndarray], n_outputs: int) -> list[str]:
    kinds = []
    for i, value in enumerate(outputs):
        if not np.issubdtype(value.dtype, np.floating):
            kinds.append("skip")  # integer outputs (class ids, masks) carry no gradient
        elif i >= n_outputs:
            kinds.append("mse")  # features
        elif cfg.loss != "auto":
            kinds.append(cfg.loss)
        else:
            kinds.append("kl" if value.ndim == 2 and value.shape[1] > 1 else "mse")
    return kinds


def _device(choice: str):
    import torch

    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("distill: device=cuda but torch sees no CUDA device")
    return torch.device(choice)


def distill(student: Model, teacher, feeds: Sequence[dict[str, np.ndarray]], cfg: DistillConfig,
            labels: np.ndarray | None = None,
            progress: Callable[[int, int, float], None] | None = None) -> DistillResult:
    """Train `student` (edited in place) to match `teacher` (a Model, proto or path) on `feeds`.

    `labels` (one per sample) add the hard-label term. `progress(step, total, loss)` is called
    after each optimizer step. Deterministic for a given seed on one device and thread count.
    """
    try:
        import torch
    except ImportError:
        raise InputError("distillation needs PyTorch: pip install onnxcomp[torch]") from None
    started = time.perf_counter()
    feeds = list(feeds)
    if not feeds:
        raise InputError("distill: no training data")
    if labels is not None and len(labels) != sum(len(next(iter(f.values()))) for f in feeds):
        raise InputError(f"distill: {len(labels)} labels for {len(feeds)} samples")
    input_names = [t.name for t in student.graph.inputs]
    feeds = [{k: v for k, v in f.items() if k in input_names} for f in feeds]
    absent = [n for n in input_names if n not in feeds[0]]
    if absent:
        raise InputError(f"distill: the data has no input named {absent[0]!r}")
    data = batches(feeds, cfg.batch_size)
    names = [t.name for t in student.graph.outputs] + list(cfg.features)
    targets = teacher_outputs(teacher, data, names)
    kinds = _loss_kinds(cfg, targets[0], len(student.graph.outputs))

    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(student, data, targets, kinds, labels, cfg, progress, started)
    finally:
        torch.set_num_threads(threads)


def _train(student, data, targets, kinds, labels, cfg, progress, started) -> DistillResult:
    import torch

    torch.manual_seed(cfg.seed)
    device = _device(cfg.device)
    module = student_module(student, cfg.features).to(device)
    _check_against_ort(module, student, data[0], device, "before training")
    params = [p for p in module.parameters()]
    if not params:
        raise PassError("distill: the student has no trainable weights (Conv/Gemm/MatMul)")
    label_batches, start = [], 0
    for feed in data:
        n = len(next(iter(feed.values())))
        label_batches.append(None if labels is None else torch.as_tensor(np.asarray(labels[start:start + n]),
                                                                         dtype=torch.long, device=device))
        start += n
    steps = cfg.steps or cfg.epochs * len(data)
    optimizer = torch.optim.Adam(params, lr=cfg.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / steps)))
    generator = torch.Generator().manual_seed(cfg.seed)
    to_dev = [[torch.from_numpy(np.asarray(v)).to(device) for v in t] for t in targets]
    inputs = [{k: torch.from_numpy(np.asarray(v)).to(device) for k, v in f.items()} for f in data]
    losses: list[float] = []
    module.train()
    order: list[int] = []
    for step in range(steps):
        if not order:
            order = torch.randperm(len(data), generator=generator).tolist()
        i = order.pop()
        optimizer.zero_grad(set_to_none=True)
        loss = distill_loss(module(**inputs[i]), to_dev[i], label_batches[i], cfg, kinds)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step + 1, steps, losses[-1])
    module.eval()
    window = max(1, min(len(data), steps // 10 or 1))
    changed = module.write_back()
    error = _check_against_ort(module, student, data[0], device, "after training")
    return DistillResult(steps=steps, loss_first=float(np.mean(losses[:window])), loss_last=float(np.mean(losses[-window:])),
                         losses=losses, trained_tensors=changed, device=device.type,
                         seconds=time.perf_counter() - started, max_abs_vs_ort=error)


def _check_against_ort(module, student: Model, feed: dict[str, np.ndarray], device, when: str) -> float:
    """The torch interpretation must agree with ORT on the (written-back) student graph."""
    import torch

    from onnxcomp.runtime import make_session, run

    # graph optimizations off: ORT then runs QuantizeLinear/DequantizeLinear as written, not fused integer
    # kernels. Even so, an activation within float rounding of a half step can round the other way on
    # ORT's vectorised kernel and the flip propagates: with activation quantization, agreement is judged
    # by cosine instead.
    session = make_session(student, "cpu", threads=None, optimize=False)
    quantized = any(n.op == "QuantizeLinear" for n in student.graph.nodes)
    expected = run(session, feed)
    with torch.no_grad():
        got = module(**{k: torch.from_numpy(np.asarray(v)).to(device) for k, v in feed.items()})
    worst = 0.0
    for (name, ref), value in zip(expected.items(), got):
        value = value.detach().cpu().numpy().astype(np.float64)
        diff = float(np.max(np.abs(value - ref))) if ref.size else 0.0
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        a, b = value.ravel(), ref.astype(np.float64).ravel()
        cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)) if ref.size else 1.0
        if not (diff <= 1e-3 * max(scale, 1.0) or (quantized and cos >= 0.99)):
            raise PassError(f"distill: the torch copy of the student disagrees with ORT {when} on {name!r} "
                            f"(max abs {diff:.3g}, cosine {cos:.6f}); please report this model")
        worst = max(worst, diff)
    return worst


# ---- the `onnxcomp distill` job ----------------------------------------------------------------
def agreement(model, feeds: list[dict[str, np.ndarray]], reference: list[np.ndarray],
              labels: np.ndarray | None = None) -> dict[str, float]:
    """First output of `model` on ORT vs `reference` (the teacher's, per feed): cosine, top-1
    agreement when it is [N, C], and accuracy against `labels`."""
    from onnxcomp.runtime import make_session, run

    session = make_session(model, "cpu", threads=1)
    got = [next(iter(run(session, f).values())) for f in feeds]
    a = np.concatenate([g.reshape(len(g), -1) for g in got]).astype(np.float64)
    b = np.concatenate([r.reshape(len(r), -1) for r in reference]).astype(np.float64)
    cos = np.sum(a * b, 1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    out = {"cosine": float(np.mean(cos))}
    if a.shape[1] > 1 and got[0].ndim == 2:
        out["top1_agree"] = float(np.mean(a.argmax(1) == b.argmax(1)))
        if labels is not None:
            out["accuracy"] = float(np.mean(a.argmax(1) == labels))
    return out


def read_labels(path) -> np.ndarray:
    """Labels from .npy, or from .npz (an array named `labels`, or its only array)."""
    from pathlib import Path

    path = Path(path)
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False).reshape(-1)
        with np.load(path, allow_pickle=False) as npz:
            if "labels" in npz.files:
                return npz["labels"].reshape(-1)
            if len(npz.files) == 1:
                return npz[npz.files[0]].reshape(-1)
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read labels ({exc})") from exc
    raise InputError(f"{path}: no array named 'labels'")


def distill_file(teacher, student, output, data, cfg: DistillConfig, *, labels=None, evaluation=None,
                 force: bool = False, progress=None) -> dict[str, Any]:
    """`onnxcomp distill`: train STUDENT against TEACHER on `data` and save the result to `output`
    (.onnxc: entropy-coded). Agreement with the teacher (and accuracy, with labels in the
    evaluation data) is measured on ORT before and after, on `evaluation` or else on `data`."""
    from onnxcomp.calibration import CalibrationData
    from onnxcomp.context import PassContext
    from onnxcomp.gate import split_labels
    from onnxcomp.model import load, save

    teacher_model, model = load(teacher), load(student)
    names = [t.name for t in model.graph.inputs]
    if [t.name for t in teacher_model.graph.inputs] != names:
        raise InputError("the teacher and the student have different inputs")
    train = list(CalibrationData.from_source(data, input_names=names))
    train, data_labels = split_labels(train, set(names))
    labels = read_labels(labels) if labels is not None else data_labels
    if labels is not None and len(labels) != len(train):
        raise InputError(f"distill: {len(labels)} labels for {len(train)} training samples")
    held = list(CalibrationData.from_source(evaluation, input_names=names)) if evaluation is not None else None
    eval_feeds, eval_labels = split_labels(held, set(names)) if held else (train, labels)
    eval_feeds = batches(eval_feeds, 256)
    first = [t.name for t in teacher_model.graph.outputs][:1]
    reference = [t[0] for t in teacher_outputs(teacher_model, eval_feeds, first)]
    before = agreement(model, eval_feeds, reference, eval_labels)
    result = distill(model, teacher_model, train, cfg, labels=labels, progress=progress)
    after = agreement(model, eval_feeds, reference, eval_labels)
    summary = {"before": before, "after": after, **result.stats(), "seconds": round(result.seconds, 2),
               "labels": labels is not None, "evaluated_on": "evaluation" if held else "training data"}
    if eval_labels is not None:
        summary["teacher"] = agreement(teacher_model, eval_feeds, reference, eval_labels)
    if str(output).endswith(".onnxc"):
        from onnxcomp.pipeline import Pipeline

        model = Pipeline.parse("entropy").run(model, PassContext()).model
    save(model, output, force=force, source=student)
    return summary
