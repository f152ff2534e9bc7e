"""TensorFlow/Keras front-end (the `tf` extra): SavedModel folders and Keras models via tf2onnx.

tf2onnx 1.17's `from_keras` fails on Keras 3 (KeyError on a keras_tensor), so Keras models go
through the SavedModel route: `model.export(folder)`, then tf2onnx's converter on the folder (run
as `python -m tf2onnx.convert`, its documented interface). The exported model is run on ORT and
compared with TensorFlow's own outputs before it is returned.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from onnxcomp.errors import InputError
from onnxcomp.model import load
from onnxcomp.torch_export import ExportError, ExportResult


def _tf():
    try:
        import tensorflow as tf
    except ImportError:
        raise InputError("the TensorFlow front-end needs the tf extra: pip install 'onnxcomp[tf]'") from None
    return tf


def _saved_model_signature(folder: Path):
    tf = _tf()
    try:
        loaded = tf.saved_model.load(str(folder))
    except Exception as exc:  # TF raises many kinds for a bad folder
        raise InputError(f"{folder}: not a readable SavedModel ({type(exc).__name__})") from exc
    signature = loaded.signatures.get("serving_default")
    if signature is None:
        raise InputError(f"{folder}: the SavedModel has no serving_default signature")
    return loaded, signature


def _example_feeds(signature, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, spec in signature.structured_input_signature[1].items():
        shape = [batch if d is None else d for d in spec.shape.as_list()]
        feeds[name] = rng.standard_normal(shape).astype(spec.dtype.as_numpy_dtype)
    return feeds


def export_tf(source: Any, path: str | Path | None = None, *, opset: int = 17,
              atol: float = 1e-4, rtol: float = 1e-3) -> ExportResult:
    """Export a Keras model or a SavedModel folder to ONNX; check it against TensorFlow on ORT."""
    tf = _tf()
    with tempfile.TemporaryDirectory(prefix="onnxcomp-tf-") as tmp:
        folder = Path(source) if isinstance(source, (str, Path)) else Path(tmp) / "saved_model"
        if not isinstance(source, (str, Path)):
            if not hasattr(source, "export"):
                raise InputError("export_tf needs a Keras model or a SavedModel folder")
            source.export(str(folder), verbose=False)
        elif not folder.is_dir():
            raise InputError(f"{folder}: no such SavedModel folder")
        _, signature = _saved_model_signature(folder)
        out = Path(tmp) / "model.onnx"
        done = subprocess.run([sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(folder),
                               "--output", str(out), "--opset", str(opset)], capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            last = [line for line in done.stderr.splitlines() if line.strip()][-1:] or ["no message"]
            raise ExportError(f"tf2onnx could not convert {folder}: {last[0][:300]}")
        model = load(out.read_bytes())
        feeds = _example_feeds(signature)
        expected = {k: v.numpy() for k, v in signature(**{k: tf.constant(v) for k, v in feeds.items()}).items()}
    from onnxcomp.runtime import make_session, run

    session = make_session(model, "cpu", threads=None)
    onnx_inputs = [i.name for i in session.get_inputs()]
    got = run(session, {name: feeds[key] for name, key in zip(onnx_inputs, feeds)})
    worst = 0.0
    for (name, e), g in zip(sorted(expected.items()), [got[k] for k in sorted(got)]):
        if e.shape != g.shape or not np.allclose(g, e, atol=atol, rtol=rtol):
            diff = float(np.max(np.abs(e - g))) if e.shape == g.shape else float("inf")
            raise ExportError(f"output {name}: ORT differs from TensorFlow by up to {diff:.3g}")
        worst = max(worst, float(np.max(np.abs(e - g))) if e.size else 0.0)
    if path is not None:
        from onnxcomp.model import save

        save(model, path)
    return ExportResult(model, "tf2onnx", "", worst)
