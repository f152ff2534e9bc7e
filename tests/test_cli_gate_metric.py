"""`optimize --gate-metric MODULE:FUNCTION`: the CLI holds a task metric of the user's, as Gate(metric=...) does."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import onnxcomp
from onnxcomp.runtime import make_session, run

from .fixtures import gate_metrics
from .helpers import REPO, assert_one_line_error, run_cli, run_cli_here

METRICS_FILE = REPO / "tests" / "fixtures" / "gate_metrics.py"


@pytest.fixture
def evaluation(mnist_path, tmp_path):
    """8 held-out inputs for the real MNIST CNN, with its own logits for each as `labels`."""
    images = np.random.default_rng(7).uniform(0, 255, (8, 1, 1, 28, 28)).astype(np.float32)
    session = make_session(mnist_path)
    logits = np.stack([run(session, {"Input3": x})["Plus214_Output_0"] for x in images])
    path = tmp_path / "eval.npz"
    np.savez(path, Input3=images.reshape(8, 1, 28, 28), labels=logits.reshape(8, 10))
    return path


def test_a_metric_the_result_meets_passes_the_gate_and_is_the_one_measured(mnist_path, evaluation, tmp_path):
    out = tmp_path / "out.onnx"
    done = run_cli_here("optimize", mnist_path, "-o", out, "--pipeline", "prune(sparsity=0.5)",
                        "--evaluation", evaluation, "--max-drop", "2", "--gate-metric",
                        f"{METRICS_FILE}:logit_cosine", "--json")
    assert done.returncode == 0, done.stderr
    gate = json.loads(done.stdout)["gate"]
    assert gate["passed"] and gate["reference_metric"] == pytest.approx(1.0)
    assert 0.98 <= gate["metric"] < 1.0  # pruning changed the logits, within 2 points
    # the figure is the user's function on the written model's outputs
    feeds = [{"Input3": x[None]} for x in np.load(evaluation)["Input3"]]
    session = onnxcomp.runtime.make_session(onnx.load(out))
    outputs = [run(session, feed) for feed in feeds]
    assert gate["metric"] == pytest.approx(gate_metrics.logit_cosine(outputs, np.load(evaluation)["labels"]))


def test_a_metric_the_result_fails_refuses_it_and_writes_nothing(mnist_path, evaluation, tmp_path):
    out = tmp_path / "out.onnx"
    done = run_cli_here("optimize", mnist_path, "-o", out, "--pipeline", "prune(sparsity=0.5)",
                        "--evaluation", evaluation, "--max-drop", "2", "--budget", "1",
                        "--gate-metric", "tests.fixtures.gate_metrics:bit_exact_rate")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "still fails after 1 back-offs, at pass prune(sparsity=0.25): metric 0.0000 vs 1.0000 (drop 100.00 points)" in done.stderr
    assert not out.exists()


def test_batch_mode_workers_load_a_metric_from_a_file(mnist_path, evaluation, tmp_path):
    outdir = tmp_path / "out"
    outdir.mkdir()
    done = run_cli("optimize", mnist_path, "-o", outdir, "--pipeline", "prune(sparsity=0.5)", "--jobs", "1",
                   "--evaluation", evaluation, "--max-drop", "2", "--gate-metric", f"{METRICS_FILE}:logit_cosine")
    assert done.returncode == 0, done.stderr
    assert (outdir / "mnist.onnx").exists()


@pytest.mark.parametrize("target, message", [
    ("no_such_module:f", "cannot import no_such_module (ModuleNotFoundError"),
    ("tests/fixtures/no_such_file.py:f", "no_such_file.py: no such file"),
    ("tests.fixtures.gate_metrics", "expected MODULE:FUNCTION or FILE.py:FUNCTION"),
    (f"{METRICS_FILE}:no_such_function", "gate_metrics has no function no_such_function"),
    ("tests.fixtures.gate_metrics:NOT_A_FUNCTION", "NOT_A_FUNCTION is not a function (its type: int)"),
    ("tests.fixtures.gate_metrics:broken_metric",
     "the gate metric broken_metric failed: ValueError: labels are missing the face boxes"),
    ("tests.fixtures.gate_metrics:nan_metric", "nan_metric returned nan; it must return a finite number"),
])
def test_a_bad_metric_is_one_line_and_writes_nothing(target, message, mnist_path, evaluation, tmp_path):
    out = tmp_path / "out.onnx"
    done = run_cli_here("optimize", mnist_path, "-o", out, "--pipeline", "prune(sparsity=0.5)",
                        "--evaluation", evaluation, "--max-drop", "2", "--gate-metric", target)
    assert_one_line_error(done, message)
    assert not out.exists()


def test_a_metric_without_max_drop_is_refused(mnist_path, tmp_path):
    out = tmp_path / "out.onnx"
    done = run_cli_here("optimize", mnist_path, "-o", out, "--pipeline", "cleanup", "--min-cosine", "0.9",
                        "--gate-metric", "tests.fixtures.gate_metrics:logit_cosine")
    assert_one_line_error(done, "give --max-drop POINTS too")
    assert not out.exists()


def test_registry_optimize_loads_the_metric_the_same_way():
    pytest.importorskip("mlflow", reason="registry optimize needs the mlflow extra")
    done = run_cli_here("registry", "optimize", "--model", "m", "--version", "1", "--pipeline", "fold",
                        "--max-drop", "1", "--gate-metric", "no_such_module:f")
    assert_one_line_error(done, "cannot import no_such_module")
