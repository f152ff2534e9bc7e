"""Presets and the accuracy gate end to end on the digits CNN, from the command line."""

from __future__ import annotations

import json

import pytest

from .helpers import assert_one_line_error, run_cli


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The digits CNN with its calibration and (labelled) evaluation data as .npz files."""
    folder = tmp_path_factory.mktemp("digits")
    done = run_cli_models("build", "digits_cnn", "-o", folder / "digits.onnx", "--data")
    assert done.returncode == 0, done.stderr
    return folder


def run_cli_models(*args):
    import subprocess
    import sys

    from .helpers import REPO

    return subprocess.run([sys.executable, "-m", "models", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_deep_compression_makes_digits_12x_smaller_within_half_a_point(digits):
    out, report = digits / "dc.onnxc", digits / "dc.json"
    done = run_cli("optimize", digits / "digits.onnx", "-o", out, "--preset", "deep-compression",
                   "--calibration", digits / "digits.calibration.npz",
                   "--evaluation", digits / "digits.evaluation.npz", "--max-drop", "0.5", "--report", report)
    assert done.returncode == 0, done.stderr
    ratio = (digits / "digits.onnx").stat().st_size / out.stat().st_size
    assert ratio >= 12, f"only {ratio:.1f}x smaller"
    gate = json.loads(report.read_text())["gate"]
    assert gate["passed"] and gate["drop_points"] <= 0.5
    assert "passed the gate (metric drop <= 0.5 points) on" in " ".join(done.stdout.split())


def test_compact_makes_digits_over_11x_smaller_within_half_a_point_and_lists_its_bits(digits):
    out, report = digits / "compact.onnxc", digits / "compact.json"
    done = run_cli("optimize", digits / "digits.onnx", "-o", out, "--preset", "compact",
                   "--calibration", digits / "digits.calibration.npz",
                   "--evaluation", digits / "digits.evaluation.npz", "--max-drop", "0.5", "--report", report)
    assert done.returncode == 0, done.stderr
    ratio = (digits / "digits.onnx").stat().st_size / out.stat().st_size
    assert ratio >= 11, f"only {ratio:.1f}x smaller"
    data = json.loads(report.read_text())
    assert data["gate"]["passed"] and data["gate"]["drop_points"] <= 0.5
    gptq = next(p for p in data["passes"] if p["spec"].startswith("gptq"))
    assert set(gptq["stats"]["bits_per_layer"].values()) <= {2, 3, 4, 5, 6, 8}
    assert gptq["stats"]["weight_packed_bytes"] <= gptq["stats"]["weight_bytes_before"] / 8


def test_a_gate_broken_by_pruning_names_the_pass_and_backs_it_off(digits):
    done = run_cli("optimize", digits / "digits.onnx", "-o", digits / "p.onnx", "--pipeline",
                   "fold, prune(sparsity=0.99), cleanup", "--evaluation", digits / "digits.evaluation.npz",
                   "--min-cosine", "0.999", "--budget", "12", "--json")
    assert done.returncode == 0, done.stderr
    path = json.loads(done.stdout)["gate"]["path"]
    assert path[0]["culprit"] == "prune(sparsity=0.99)"
    assert path[0]["action"].startswith("backed off prune(sparsity=0.99) -> prune(sparsity=0.985)")
    assert path[-1]["passed"] and path[-1]["cosine"] >= 0.999


def test_every_preset_is_listed_with_its_spec():
    done = run_cli("passes", "--presets")
    assert done.returncode == 0
    for name in ("lossless", "int8", "dynamic", "deep-compression", "compact", "max"):
        assert name in done.stdout


def test_the_max_preset_without_data_is_refused_in_one_line(digits):
    assert_one_line_error(run_cli("optimize", digits / "digits.onnx", "-o", digits / "m.onnxc", "--preset", "max"),
                          "there is no data to check it on: give --calibration")
    assert not (digits / "m.onnxc").exists()
