"""The two smallest wheel models of the real-model gauntlet through the CLI with a lossy preset.

The promise under test: given `--calibration`, `onnxcomp optimize --preset int8` either exits 0
with a model that agrees with the original on a held-out set (measured here, independently, on
ORT: cosine >= 0.99 per output over all held-out samples), or exits non-zero with one line on
stderr and writes nothing. The models come from PyPI wheels (models.gauntlet); without network
and with an empty cache the test skips, saying so.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.gauntlet import ROOT, THRESHOLD, agreement, load_runnable, outputs
from models import gauntlet

SMALLEST = [m.name for m in gauntlet.smallest(2)]
PRESET = "int8"


def _model_or_skip(name: str):
    entry = gauntlet.get(name)
    try:
        return entry, entry.fetch(timeout=120)
    except gauntlet.GauntletUnavailable as exc:
        pytest.skip(f"gauntlet model {name} unavailable: {exc}")


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALLEST)
def test_lossy_preset_on_a_real_model_is_gated_or_refused_in_one_line(name, tmp_path):
    entry, path = _model_or_skip(name)
    cal = gauntlet.write_npz(entry.feeds("calibration", 8), tmp_path / "cal.npz")
    held = entry.feeds("heldout", 4)
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "onnxcomp", "optimize", str(path), "-o", str(out),
                           "--preset", PRESET, "--calibration", str(cal)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    stderr = [line for line in proc.stderr.splitlines() if line.strip()]
    if proc.returncode == 0:
        measured = agreement(outputs(str(path), held), outputs(load_runnable(out), held))
        assert measured["cosine"] >= THRESHOLD, (
            f"{name}: exit 0 but held-out cosine {measured['cosine']:.4f} < {THRESHOLD} (per output "
            f"{[round(c, 4) for c in measured['cosine_per_output']]})")
    else:
        assert len(stderr) == 1, f"{name}: exit {proc.returncode}, {len(stderr)} stderr lines:\n{proc.stderr[-2000:]}"
        assert not out.exists(), f"{name}: exit {proc.returncode} but {out.name} was written"


def test_gauntlet_splits_never_share_a_sample():
    entry, _ = _model_or_skip(SMALLEST[0])
    cal, held = entry.feeds("calibration", 8), entry.feeds("heldout", 4)
    cal_bytes = {b"".join(v.tobytes() for v in f.values()) for f in cal}
    assert not any(b"".join(v.tobytes() for v in f.values()) in cal_bytes for f in held)


def test_gauntlet_npz_holds_one_complete_feed_per_sample(tmp_path):
    entry, _ = _model_or_skip(SMALLEST[0])
    feeds = entry.feeds("calibration", 3)
    back = gauntlet.read_npz(gauntlet.write_npz(feeds, tmp_path / "cal.npz"))
    assert len(back) == 3
    for a, b in zip(feeds, back):
        assert a.keys() == b.keys()
        assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)


@pytest.mark.slow
def test_hessian_pruning_fitted_on_eight_files_still_reads_the_files_it_never_saw():
    # Magika (one-hot bytes through a MatMul) pruned to 55 % on 8 files: SparseGPT's 0.01 damping
    # fitted the kept weights to those files, and an unseen Python file fell to cosine 0.37
    import numpy as np

    import onnxcomp

    entry, path = _model_or_skip("magika")
    result = onnxcomp.optimize(path, "fold, cleanup, fuse, prune(sparsity=0.55, scope=global, saliency=hessian)",
                               calibration=entry.feeds("calibration", 8), check=False, gate=False)
    held = entry.feeds("heldout", 32)
    before, after = outputs(str(path), held), outputs(result.model.to_proto(), held)
    cosines = [agreement([a], [b])["cosine"] for a, b in zip(before, after)]
    assert min(cosines) >= 0.95 and np.mean(cosines) >= 0.99, [round(c, 3) for c in cosines]
