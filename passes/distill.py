"""distill: retrain the compressed model against the pipeline's input model (knowledge distillation).

    student weights  <-  argmin  KL(teacher/T || student/T)·T²   (logits; MSE for other outputs)

The teacher is the pipeline's input model (as it was before the first pass, in memory or from a
file), or the file `teacher`.
It runs on ONNX Runtime over the calibration data, which needs no labels: the teacher labels it.
When the calibration feeds carry a `labels` array, a cross-entropy term weighted by `alpha` is
added. The compression structure is kept: pruned zeros stay zero, codebook layers keep their
indices and train their shared values, int8 QDQ weights keep their scales (see onnxcomp/distill.py).
Place it after the lossy passes it should repair, before `entropy`; Deep Compression retrains
twice: `prune(...), distill, codebook(...), distill, entropy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxcomp.base import Pass, PassResult, param
from onnxcomp.errors import PassError
from onnxcomp.registry import register


@register
class Distill(Pass):
    """Knowledge distillation: train the compressed weights to match the input model's outputs."""

    name = "distill"
    lossless = False

    @dataclass(frozen=True)
    class Config:
        teacher: str = param("", "teacher .onnx path; empty: the pipeline's input model")
        epochs: int = param(20, "passes over the calibration data", min=1, max=10000)
        steps: int = param(0, "optimizer steps instead of epochs (0: use epochs)", min=0)
        lr: float = param(3e-3, "Adam learning rate (cosine decay to zero)", min=0.0, max=1.0)
        batch_size: int = param(32, "samples per step", min=1)
        temperature: float = param(4.0, "softmax temperature of the soft targets", min=0.01, max=100.0)
        alpha: float = param(0.5, "weight of the hard-label term when the calibration data carry labels",
                             min=0.0, max=1.0)
        loss: str = param("auto", "auto: KL on [N, C] logits, MSE elsewhere; or force kl/mse",
                          choices=("auto", "kl", "mse"))
        features: tuple[str, ...] = param((), "intermediate tensors (same name in both models) also matched by MSE")
        device: str = param("auto", "where torch trains: auto (CUDA when available), cpu or cuda",
                            choices=("auto", "cpu", "cuda"))

    @property
    def needs_input_model(self) -> bool:
        return not self.config.teacher

    def run(self, model, ctx) -> PassResult:
        from onnxcomp.distill import DistillConfig, distill
        from onnxcomp.gate import LABELS_KEY

        cfg = self.config
        if cfg.teacher:
            teacher = Path(cfg.teacher)
            if not teacher.is_file():
                raise PassError(f"distill: teacher {teacher} does not exist")
        elif ctx.input_model is not None:
            teacher = ctx.input_model
        else:  # run outside a Pipeline: nothing recorded the model before the passes
            raise PassError("distill: no teacher: run it in a Pipeline (the input model teaches) "
                            "or give distill(teacher=PATH)")
        feeds = list(ctx.require_calibration(self.name))
        labels = None
        if all(LABELS_KEY in f for f in feeds):
            labels = np.concatenate([np.asarray(f[LABELS_KEY]).reshape(-1) for f in feeds])

        def progress(step: int, total: int, loss: float) -> None:
            if ctx.progress and (step == total or step % max(1, total // 100) == 0):
                ctx.progress(f"distill: step {step}/{total}, loss {loss:.4f}", step / total)

        result = distill(model, teacher, feeds, DistillConfig(
            epochs=cfg.epochs, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, temperature=cfg.temperature,
            alpha=cfg.alpha, loss=cfg.loss, features=cfg.features, seed=ctx.seed, device=cfg.device),
            labels=labels, progress=progress)
        stats = result.stats()
        stats["labels"] = labels is not None
        return PassResult(result.trained_tensors > 0, stats)
