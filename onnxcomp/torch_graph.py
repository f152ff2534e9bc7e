"""An ONNX graph run op by op as a trainable torch module, with its compression structure kept
intact (the student side of onnxcomp.distill; see that module for why a converter of our own):

  pruned weights      W * mask, mask = (W != 0): zeros stay zero, their gradient is dropped;
  codebook weights    Gather(codebook, indices): the codebook is the parameter, so each centroid
                      receives the sum of its weights' gradients; a centroid pinned at 0 stays 0;
  QDQ int8 weights    DequantizeLinear(q, scale, zp): a float shadow weight, fake-quantized in the
                      forward pass (straight-through gradient), re-quantized with the same scale
                      and zero point when written back.

The op subset is what our zoo (CNNs, BERT-style encoders) needs, with ONNX semantics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp.errors import InputError, PassError
from onnxcomp.model import Model

WEIGHT_SLOTS = {"Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1)}
BIAS_SLOTS = {"Conv": (2,), "Gemm": (2,), "LayerNormalization": (1, 2)}


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
