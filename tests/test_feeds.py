"""Calibration and evaluation data for any model ORT runs (onnxcomp.feeds): 0-d and constant
inputs, a state whose batch axis is not 0, per-sample .npz layouts, folders, Python iterables,
ORT CalibrationDataReader objects, carried state, --shape; and one line for a bad file."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest

import onnxcomp
from models import vad
from onnxcomp.errors import InputError
from onnxcomp.feeds import CalibrationData, input_specs
from onnxcomp.runtime import make_session, run

from .helpers import assert_one_line_error, run_cli_here


@pytest.fixture(scope="module")
def vad_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vad") / "vad.onnx"
    onnx.save(vad.vad_model(), path)
    return path


def _specs(path):
    return input_specs(onnx.load(path))


def test_a_stacked_npz_with_a_0d_rate_and_a_fixed_state_gives_one_complete_feed_per_sample(vad_path, tmp_path):
    chunks = np.concatenate([f["input"] for f in vad.vad_feeds(6)])  # [6, 512]: samples on axis 0
    np.savez(tmp_path / "cal.npz", input=chunks, sr=np.array(16000), state=np.zeros((2, 1, 64), np.float32))
    data = CalibrationData.from_source(tmp_path / "cal.npz", specs=_specs(vad_path))
    assert len(data) == 6
    first = data.feeds[0]
    assert first["input"].shape == (1, 512) and first["sr"].shape == () and first["state"].shape == (2, 1, 64)
    session = make_session(vad_path)
    assert all(run(session, feed)["output"].shape == (1, 1) for feed in data)  # ORT takes every feed


def test_the_per_sample_layout_expresses_anything_and_plain_keys_are_shared(vad_path, tmp_path):
    arrays = {"state": np.zeros((2, 1, 64), np.float32)}
    for i, feed in enumerate(vad.vad_feeds(3, seed=1, rates=(16000,)) + vad.vad_feeds(2, seed=2, rates=(8000,))):
        arrays[f"sample_{i}/input"] = feed["input"]
        arrays[f"sample_{i}/sr"] = feed["sr"]
    np.savez(tmp_path / "cal.npz", **arrays)
    data = CalibrationData.from_source(tmp_path / "cal.npz", specs=_specs(vad_path))
    assert [int(f["sr"]) for f in data] == [16000, 16000, 16000, 8000, 8000]
    assert all(f["state"].shape == (2, 1, 64) for f in data)


def test_a_folder_of_npz_files_is_one_feed_per_file_and_npy_files_feed_a_one_input_model(vad_path, mnist_path,
                                                                                         tmp_path):
    folder = tmp_path / "feeds"
    folder.mkdir()
    for i, feed in enumerate(vad.vad_feeds(4)):
        np.savez(folder / f"{i:03d}.npz", **feed)
    assert len(CalibrationData.from_source(folder, specs=_specs(vad_path))) == 4
    digits = tmp_path / "digits"
    digits.mkdir()
    for i in range(3):
        np.save(digits / f"{i}.npy", np.full((1, 28, 28), i, np.float32))  # no batch axis: one is added
    data = CalibrationData.from_source(digits, specs=_specs(mnist_path))
    assert [f["Input3"].shape for f in data] == [(1, 1, 28, 28)] * 3


def test_python_iterables_and_ort_calibration_data_readers_are_taken_as_they_are(vad_path):
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # what a user migrating from ORT's quantizer already has
        def __init__(self):
            self.items = iter(vad.vad_feeds(5))

        def get_next(self):
            return next(self.items, None)

    from_reader = CalibrationData.from_source(Reader(), specs=_specs(vad_path))
    from_generator = CalibrationData.from_source((f for f in vad.vad_feeds(5)), specs=_specs(vad_path))
    assert len(from_reader) == len(from_generator) == 5
    assert all(np.array_equal(a["input"], b["input"]) for a, b in zip(from_reader, from_generator))


def test_carried_state_is_what_the_input_model_output_on_the_previous_sample(vad_path):
    given = vad.vad_feeds(4)
    data = CalibrationData.from_source([dict(f) for f in given], specs=_specs(vad_path))
    data.carry_state(onnx.load(vad_path), {"stateN": "state"})
    session = make_session(vad_path)
    for previous, current in zip(data.feeds, data.feeds[1:]):
        np.testing.assert_array_equal(current["state"], run(session, previous)["stateN"])
    np.testing.assert_array_equal(data.feeds[0]["state"], given[0]["state"])  # the first keeps its own


@pytest.mark.parametrize("arrays, message", [
    ({"input": np.zeros((3, 512), np.float32), "state": np.zeros((1, 64), np.float32), "sr": np.array(16000)},
     "sample 0: input 'state' expects float32 [2, 1, 64], got float32 [1, 64]"),
    ({"input": np.zeros((3, 512), np.float32), "state": np.zeros((2, 1, 64), np.float32), "sr": np.array(1.5)},
     "input 'sr' expects int64 [], got float64 []"),
    ({"input": np.zeros((3, 512), np.float32), "sr": np.array(16000)},
     "sample 0: input 'state' (float32 [2, 1, 64]) is missing"),
    ({"input": np.zeros((3, 512), np.float32), "state": np.zeros((2, 1, 64), np.float32), "sr": np.array(8000),
      "stat": np.zeros(3)}, "'stat' is not an input of the model"),
])
def test_a_bad_calibration_file_is_one_line_naming_the_input_and_expected_vs_got(arrays, message, vad_path, tmp_path):
    np.savez(tmp_path / "bad.npz", **arrays)
    out = tmp_path / "out.onnx"
    done = run_cli_here("optimize", vad_path, "-o", out, "--preset", "lossless", "--calibration", tmp_path / "bad.npz")
    assert_one_line_error(done, message)
    assert not out.exists()


def test_a_calibration_file_that_is_not_a_zip_or_holds_pickles_is_one_line(vad_path, tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    np.savez(tmp_path / "objects.npz", feeds=np.array([{"input": 1}], dtype=object))
    for name, message in (("text.npz", "not an .npz file"), ("objects.npz", "use the per-sample layout")):
        done = run_cli_here("optimize", vad_path, "-o", tmp_path / "o.onnx", "--preset", "lossless",
                            "--calibration", tmp_path / name)
        assert_one_line_error(done, message)
        assert done.returncode == 2


def test_lossless_validation_runs_on_the_users_data_and_says_so(vad_path, tmp_path):
    arrays = {f"sample_{i}/{k}": v for i, f in enumerate(vad.vad_feeds(3)) for k, v in f.items()}
    np.savez(tmp_path / "cal.npz", **arrays)
    done = run_cli_here("optimize", vad_path, "-o", tmp_path / "o.onnx", "--preset", "lossless",
                        "--calibration", tmp_path / "cal.npz", "--carry-state", "stateN=state", "--json")
    assert done.returncode == 0, done.stderr
    validation = json.loads(done.stdout)["validation"]
    assert validation["passed"] is True and validation["samples"] == 3
    assert "cal.npz" in validation["data"] and "state carried: stateN->state" in validation["data"]


def test_shape_sizes_an_input_whose_dims_have_no_name(mnist_path, tmp_path):
    proto = onnx.load(mnist_path)
    for dim in proto.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.Clear()  # unknown and unnamed: --dim cannot size it, the default 32 breaks the Reshape
    onnx.save(proto, tmp_path / "unnamed.onnx")
    args = ("optimize", tmp_path / "unnamed.onnx", "-o", tmp_path / "o.onnx", "--preset", "lossless", "--json")
    unsized = json.loads(run_cli_here(*args).stdout)["validation"]
    assert unsized["passed"] is None and unsized["summary"].startswith("not validated")
    sized = run_cli_here(*args, "--force", "--shape", "Input3=1x1x28x28")
    validation = json.loads(sized.stdout)["validation"]
    assert validation["passed"] is True and validation["data"].startswith("GENERATED inputs")
    assert_one_line_error(run_cli_here(*args, "--force", "--shape", "Input3=1x28x28"),
                          "--shape Input3=1x28x28: the input is float32 [1, 1, ?, ?]")


def test_the_python_api_refuses_a_bad_feed_in_one_line(vad_path):
    with pytest.raises(InputError, match=re.escape("from Python, sample 0: input 'sr' (int64 []) is missing")):
        onnxcomp.optimize(vad_path, "fold", calibration=[{"input": np.zeros((1, 512), np.float32),
                                                          "state": np.zeros((2, 1, 64), np.float32)}])
