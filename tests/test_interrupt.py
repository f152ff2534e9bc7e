"""Nothing lost: an interrupted run (SIGINT or SIGTERM in the middle of a pass) leaves no output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import REPO

SLOW_PASS = '''
import time
from pathlib import Path
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


# ---- a Ctrl-C while the CLI is still importing: the same one line and exit 130 -------------------------
ANNOUNCED_RUN = r'''
import runpy, sys

module, entry, args = sys.argv[1], sys.argv[2], sys.argv[3:]


class Announce:
    """Prints a line when `module` starts importing, so the test can interrupt that import."""

    done = False

    def find_spec(self, name, path=None, target=None):
        if name == module and not self.done:
            self.done = True
            print("importing " + name, flush=True)
        return None


sys.meta_path.insert(0, Announce())
if entry == "-m":  # as `python -m onnxcomp` does
    sys.argv = ["onnxcomp", *args]
    runpy.run_module("onnxcomp", run_name="__main__", alter_sys=True)
else:  # the installed console script itself
    sys.argv = [entry, *args]
    runpy.run_path(entry, run_name="__main__")
'''

CONSOLE_SCRIPT = Path(sys.executable).with_name("onnxcomp")


def _entries():
    yield "-m"
    if CONSOLE_SCRIPT.exists():
        yield str(CONSOLE_SCRIPT)


# typer: the CLI module's first import; onnx and ml_dtypes: the slow first second; onnxruntime: later
@pytest.mark.parametrize("module", ["typer", "onnx", "ml_dtypes", "onnxruntime"])
@pytest.mark.parametrize("entry", list(_entries()), ids=lambda e: "python -m" if e == "-m" else "console script")
def test_a_ctrl_c_while_the_cli_imports_is_one_line_and_exit_130(module, entry, mnist_path, tmp_path):
    out = tmp_path / "out.onnx"
    before = mnist_path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", ANNOUNCED_RUN, module, entry, "optimize", str(mnist_path),
                             "-o", str(out), "--preset", "lossless"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while f"importing {module}" not in proc.stdout.readline() and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert stderr.strip() == "error: interrupted; no output was written"
    assert proc.returncode == 130  # not killed by SIGINT, whatever eval()/exec() the interrupt cut short
    assert list(tmp_path.iterdir()) == []
    assert mnist_path.read_bytes() == before


def test_importing_onnxcomp_imports_no_onnx_until_a_name_is_used():
    """The package is light to import (its names load on first use), so the CLI's own Ctrl-C
    handling is in place before the slow imports start; the public names still all resolve, and
    `onnxcomp.validate` stays the function after the submodule of the same name is imported."""
    code = ("import sys, onnxcomp; heavy = [m for m in ('onnx', 'numpy', 'typer') if m in sys.modules]; "
            "assert not heavy, heavy; import onnxcomp.validate as _; import onnxcomp.api; "
            "assert callable(onnxcomp.validate) and onnxcomp.validate.__module__ == 'onnxcomp.validate'; "
            "assert all(getattr(onnxcomp, n) is not None for n in onnxcomp.__all__); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_ctrl_c_lost_in_a_callback_python_cannot_raise_from_is_delivered_again():
    """A KeyboardInterrupt inside a weakref callback (importlib's module-lock one, in CI) is printed
    as 'Exception ignored in ...' and lost: the entry point's unraisable hook delivers it again."""
    code = ("import sys, time, weakref; from onnxcomp import entry; sys.unraisablehook = entry._redeliver_lost_interrupt\n"
            "class A: pass\n"
            "def cb(ref): raise KeyboardInterrupt\n"
            "a = A(); r = weakref.ref(a, cb)\n"
            "try:\n    del a\n    time.sleep(2)\n    print('lost')\n"
            "except KeyboardInterrupt:\n    print('delivered again')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "delivered again" and done.stderr == "", done.stderr
