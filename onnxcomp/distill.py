"""Knowledge distillation: retrain a compressed ONNX student against its ONNX teacher.

    teacher (ORT) --soft targets--> loss <-- student (the ONNX graph run as a torch module)
    trained weights -> written back into the student's own initializers -> checked on ORT

The student graph is interpreted op by op in torch (onnxcomp.torch_graph), with its compression
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

from onnxcomp.errors import InputError, PassError
from onnxcomp.model import Model

from onnxcomp.torch_graph import student_module


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
    scalars = [t.name for t in model.graph.inputs if t.shape is not None and len(t.shape) == 0]
    if scalars:  # training batches samples along axis 0, which a 0-d input (a sample rate) lacks
        raise InputError(f"distill trains on batches along axis 0, and input {scalars[0]!r} is 0-d: "
                         "distillation of this model is not supported (its compression still is, gated)")
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
