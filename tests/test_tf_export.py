"""TensorFlow front-end (the `tf` extra): a Keras model exports and matches TensorFlow on ORT.

scripts/setup installs the `tf` extra (about 15 s from the wheel cache), so CI runs these tests; CI
sets ONNXCOMP_CI=1, and there a missing extra is a failure, not a skip. Elsewhere they skip
without the extra.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if os.environ.get("ONNXCOMP_CI"):
    import keras  # noqa: F401 - in CI the extra must be there: an ImportError fails the run
    import tf2onnx  # noqa: F401
else:
    keras = pytest.importorskip("keras", reason="the tf extra (tensorflow-cpu, tf2onnx) is not installed")
    pytest.importorskip("tf2onnx", reason="the tf extra (tensorflow-cpu, tf2onnx) is not installed")

from onnxcomp.runtime import make_session, run  # noqa: E402
from onnxcomp.tf_export import export_tf  # noqa: E402

from .helpers import run_cli  # noqa: E402


def _small_keras_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(4, 3, activation="relu"),
                             keras.layers.Flatten(), keras.layers.Dense(3)])


def test_a_small_keras_model_matches_tensorflow_on_ort(tmp_path):
    model = _small_keras_model()
    result = export_tf(model, tmp_path / "k.onnx")
    assert result.max_abs_error < 1e-4
    x = np.random.default_rng(1).standard_normal((5, 8, 8, 1)).astype(np.float32)
    got = next(iter(run(make_session(tmp_path / "k.onnx"), {make_session(tmp_path / "k.onnx").get_inputs()[0].name: x}).values()))
    np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)


def test_cli_export_tf_converts_a_saved_model_folder(tmp_path):
    folder = tmp_path / "saved"
    _small_keras_model().export(str(folder), verbose=False)
    done = run_cli("export", "tf", folder, "-o", tmp_path / "k.onnx")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "k.onnx").exists()
