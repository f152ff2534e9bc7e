"""PyTorch front-end: exports match torch on ORT; dynamic batch works; optimize takes modules."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

import onnxcomp  # noqa: E402
from onnxcomp.runtime import make_session, run  # noqa: E402

from .fixtures.small_torch import tiny_net  # noqa: E402
from .helpers import assert_one_line_error, run_cli  # noqa: E402


def test_export_of_a_small_module_with_dynamic_batch_matches_torch_on_ort(tmp_path):
    module = tiny_net()
    result = onnxcomp.export(module, torch.randn(2, 3, 16, 16), tmp_path / "tiny.onnx",
                             dynamic_axes={"input": {0: "batch"}})
    assert result.max_abs_error < 1e-4
    session = make_session(tmp_path / "tiny.onnx")
    x = torch.randn(7, 3, 16, 16)
    got = run(session, {"input": x.numpy()})
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(next(iter(got.values())), expected, atol=1e-4)


def test_cli_export_torch_writes_a_verified_model(tmp_path):
    out = tmp_path / "tiny.onnx"
    done = run_cli("export", "torch", "tests.fixtures.small_torch:tiny_net", "--input-shape", "1x3x16x16",
                   "--dynamic-batch", "-o", out)
    assert done.returncode == 0, done.stderr
    batch = onnx.load(out).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param, "the batch axis should be dynamic"


def test_cli_export_with_a_bad_factory_is_one_line(tmp_path):
    done = run_cli("export", "torch", "tests.fixtures.small_torch:no_such_factory", "--input-shape", "1x3x8x8",
                   "-o", tmp_path / "x.onnx")
    assert_one_line_error(done, "cannot import")
    assert not (tmp_path / "x.onnx").exists()


def test_optimize_accepts_a_torch_module_with_example_inputs():
    result = onnxcomp.optimize(tiny_net(), "cleanup", example_inputs=torch.randn(1, 3, 16, 16))
    assert result.report.validation["passed"]


def test_cli_export_torch_of_resnet18_matches_torch_within_1e_4(tmp_path):
    # torchvision cannot be imported beside the pinned CPU torch; models.torch_archs is the same architecture
    out = tmp_path / "resnet18.onnx"
    done = run_cli("export", "torch", "models.torch_archs:resnet18", "--input-shape", "1x3x64x64",
                   "--dynamic-batch", "-o", out)
    assert done.returncode == 0, done.stderr
    assert "ORT matches torch within" in done.stdout
    from models.torch_archs import resnet18

    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        expected = resnet18()(x).numpy()
    got = next(iter(run(make_session(out), {"input": x.numpy()}).values()))
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
