"""Nothing lost: an interrupted run (SIGINT or SIGTERM in the middle of a pass) leaves no output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .helpers import REPO

SLOW_PASS = '''
import time
from onnxcomp.base import Pass, PassResult
from onnxcomp.registry import register


@register
class Slow(Pass):
    """Sleeps, so a test can interrupt a run in the middle of a pass."""

    name = "test_slow"

    def run(self, model, ctx):
        print("pass started", flush=True)
        time.sleep(60)
        return PassResult(False)
'''


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_optimize_leaves_no_output_and_the_input_intact(sig, mnist_path, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slow.py").write_text(SLOW_PASS)
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    before = mnist_path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "onnxcomp", "optimize", str(mnist_path), "-o", str(out),
                             "--pipeline", "cleanup, test_slow"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "ONNXCOMP_PASS_PATH": str(plugins)})
    deadline = time.time() + 60
    while "pass started" not in proc.stdout.readline() and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert stderr.strip() == "error: interrupted; no output was written"
    assert list(out.parent.iterdir()) == []
    assert mnist_path.read_bytes() == before
