"""`onnxcomp pack` / `unpack` and `optimize ... entropy` to a .onnxc file, from the command line."""

from __future__ import annotations

import numpy as np
import onnx

import onnxcomp

from .helpers import assert_one_line_error, run_cli


def _initializer_bytes(path) -> dict[str, bytes]:
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in onnx.load(path).graph.initializer}


def test_pack_then_unpack_gives_back_bit_identical_weights(ultraface_path, tmp_path):
    packed, unpacked = tmp_path / "u.onnxc", tmp_path / "u.onnx"
    assert run_cli("pack", ultraface_path, "-o", packed).returncode == 0
    assert packed.stat().st_size < ultraface_path.stat().st_size
    assert run_cli("unpack", packed, "-o", unpacked).returncode == 0
    assert _initializer_bytes(unpacked) == _initializer_bytes(ultraface_path)


def test_optimize_with_entropy_writes_a_packed_file_that_runs_in_ort(mnist_path, tmp_path):
    out = tmp_path / "m.onnxc"
    done = run_cli("optimize", mnist_path, "-o", out, "--pipeline", "fold, cleanup, fuse, entropy(coder=auto)")
    assert done.returncode == 0, done.stderr
    session = onnxcomp.session(out)
    x = np.random.default_rng(0).uniform(0, 255, (1, 1, 28, 28)).astype(np.float32)
    reference = onnxcomp.runtime.make_session(mnist_path)
    np.testing.assert_allclose(session.run(None, {"Input3": x})[0], reference.run(None, {"Input3": x})[0], atol=1e-4)


def test_unpacking_a_file_that_is_not_packed_is_one_line(mnist_path, tmp_path):
    out = tmp_path / "x.onnx"
    assert_one_line_error(run_cli("unpack", mnist_path, "-o", out), "not a packed")
    assert not out.exists()
