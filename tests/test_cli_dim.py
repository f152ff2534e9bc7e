"""`optimize --dim NAME=SIZE`: sizes for symbolic input dimensions that must match the weights."""

from __future__ import annotations

import json

import onnx
import pytest

from .helpers import assert_one_line_error, run_cli_here

SIZES = ("--dim", "height=28", "--dim", "width=28")


@pytest.fixture
def dynamic_mnist(mnist_path, tmp_path):
    """The real MNIST CNN with its image height and width made symbolic: its Reshape to [1, 256]
    only works at 28x28, so inputs generated at the default size (32) cannot run."""
    proto = onnx.load(mnist_path)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    path = tmp_path / "dynamic.onnx"
    onnx.save(proto, path)
    return path


def test_validation_runs_at_the_given_sizes_and_the_model_stays_symbolic(dynamic_mnist, tmp_path):
    out = tmp_path / "out.onnx"
    unsized = run_cli_here("optimize", dynamic_mnist, "-o", out, "--pipeline", "fold, cleanup, fuse", "--json")
    assert unsized.returncode == 0, unsized.stderr
    validation = json.loads(unsized.stdout)["validation"]
    assert validation["passed"] is None and validation["summary"].startswith("not validated")

    sized = run_cli_here("optimize", dynamic_mnist, "-o", out, "--force", "--pipeline", "fold, cleanup, fuse",
                         "--json", *SIZES)
    assert sized.returncode == 0, sized.stderr
    validation = json.loads(sized.stdout)["validation"]
    assert validation["passed"] is True and validation["samples"] == 2, validation
    shape = onnx.load(out).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in shape[2:]] == ["height", "width"]


def test_a_lossy_run_without_data_is_refused_and_no_gate_measures_at_the_given_sizes(dynamic_mnist, tmp_path):
    out = tmp_path / "out.onnx"
    args = ("optimize", dynamic_mnist, "-o", out, "--pipeline", "prune(sparsity=0.3)")
    assert_one_line_error(run_cli_here(*args, *SIZES), "there is no data to check it on")
    assert not out.exists()
    done = run_cli_here(*args, "--no-gate", "--json", *SIZES)
    assert done.returncode == 0, done.stderr
    validation = json.loads(done.stdout)["validation"]
    assert validation["passed"] is None and validation["verdict"] == "NOT VALIDATED (--no-gate)"
    assert validation["data"].startswith("GENERATED inputs") and validation["samples"] == 2
    cosine = validation["providers"][0]["outputs"][0]["cosine"]
    assert 0.9 <= cosine < 1.0  # the pruned model really ran on 28x28 inputs
    assert onnx.load(out).metadata_props[-1].value == "NOT VALIDATED (--no-gate)"


@pytest.mark.parametrize("value, message", [
    ("foo", "expected NAME=SIZE"),
    ("height=abc", "expected NAME=SIZE"),
    ("height=-1", "expected NAME=SIZE"),
    ("height=0", "expected NAME=SIZE"),
    ("=28", "expected NAME=SIZE"),
    ("depth=28", "no input of the model has it (its symbolic dimensions: height, width)"),
])
def test_a_bad_dim_is_one_line_and_writes_nothing(value, message, dynamic_mnist, tmp_path):
    out = tmp_path / "out.onnx"
    before = dynamic_mnist.read_bytes()
    assert_one_line_error(run_cli_here("optimize", dynamic_mnist, "-o", out, "--pipeline", "fold", "--dim", value),
                          f"--dim {value!r}" if message.startswith("expected") else message)
    assert not out.exists()
    assert dynamic_mnist.read_bytes() == before


def test_validate_reads_dim_the_same_way(dynamic_mnist):
    assert run_cli_here("validate", dynamic_mnist, dynamic_mnist, *SIZES).returncode == 0
    assert_one_line_error(run_cli_here("validate", dynamic_mnist, dynamic_mnist, "--dim", "height=-1"),
                          "expected NAME=SIZE")


def test_registry_optimize_reads_dim_the_same_way():
    pytest.importorskip("mlflow", reason="registry optimize needs the mlflow extra")
    assert_one_line_error(run_cli_here("registry", "optimize", "--model", "m", "--version", "1", "--pipeline", "fold",
                                       "--dim", "height=abc"), "--dim 'height=abc'")
