"""Models with external data through fold, cleanup, prune, quantize_dynamic and pack, with the
weights streamed (issue 7 part 4). The same steps and checks as `python -m benchmarks.run large`,
which measures the peak memory; here only the results are checked.

The default run uses a 320 MB model (5 x 4096 x 4096 float32); the 2.7 GB one (10 x 8192 x 8192)
is marked `large` and deselected by default (see pyproject.toml): it needs about 14 GB of free
disk and took several minutes on the 2-core CI machine (run it with `pytest -m large`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from onnx_graphsurgeon.ir.tensor import LazyValues

from benchmarks import large as bench
from models import large
from onnxcomp.model import ExternalValues, load, save


def _run_chain(folder: Path, layers: int, width: int) -> None:
    need = large.weight_bytes(layers, width) * 5
    if shutil.disk_usage(folder).free < need:
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free disk in {folder}")
    original = large.build(folder / "original.onnx", layers, width)

    # Loading leaves the weights in their file, and a copy (rollback, gate snapshots) shares them.
    model = load(original)
    weights = {name: c for name, c in model.initializers().items() if name.startswith("W")}
    assert len(weights) == layers
    assert all(isinstance(c._values, ExternalValues) for c in weights.values())
    copied = model.copy().initializers()
    assert all(copied[name]._values is c._values for name, c in weights.items())
    del model, copied, weights

    for _, spec, src, dst in bench.STEPS:
        if spec.startswith("pack:"):
            spec = "pack:raw"  # the coders run at a few MB/s (see the entropy suite); the container streams alike
        bench.run_step(spec, folder / src, folder / dst)
        if dst.endswith(".onnx"):
            # Written with external data: the graph file is small, the weights are beside it.
            assert (folder / dst).stat().st_size < 2**20
            assert (folder / (dst + ".data")).stat().st_size > large.weight_bytes(layers, width) // 5

    fold = bench.check_fold(original, folder / "folded.onnx", width)
    assert fold["ok"], fold
    folded = load(folder / "folded.onnx")
    ops = [n.op for n in folded.graph.nodes]
    assert "Identity" not in ops and ops.count("Add") == layers  # bias Add(b, b) folded, Identity removed

    prune = bench.check_prune(folder / "pruned.onnx")
    assert prune["ok"] and prune["tensors"] == layers, prune

    quantized = bench.check_quantized(folder / "pruned.onnx", folder / "quantized.onnx", width)
    assert quantized["ok"], quantized
    ops = [n.op for n in load(folder / "quantized.onnx").graph.nodes]
    assert ops.count("MatMulInteger") == layers and "MatMul" not in ops

    for model_file, packed in (("quantized.onnx", "quantized.onnxc"), ("pruned.onnx", "pruned.onnxc")):
        result = bench.check_pack(folder / model_file, folder / packed)
        assert result["ok"], (packed, result)


@pytest.fixture
def big_folder(tmp_path):
    """tmp_path, emptied afterwards: pytest keeps the last runs' folders, and these hold GBs."""
    yield tmp_path
    for path in tmp_path.iterdir():
        path.unlink()


def test_external_data_model_streams_through_the_passes(big_folder):
    _run_chain(big_folder, layers=5, width=4096)


@pytest.mark.large
def test_2_5_gb_model_streams_through_the_passes(big_folder):
    _run_chain(big_folder, layers=10, width=8192)


def test_save_streams_weights_without_loading_them(tmp_path):
    """An unchanged weight is copied file to file on save: it is never loaded into the Constant."""
    original = large.build(tmp_path / "m.onnx", layers=2, width=256)
    model = load(original)
    save(model, tmp_path / "out.onnx", external_data=True)
    assert all(isinstance(c._values, (ExternalValues, LazyValues)) for c in model.initializers().values())
    assert bench.tensor_hashes_of_model(original) == bench.tensor_hashes_of_model(tmp_path / "out.onnx")


def test_saving_over_the_input_keeps_the_open_model_right(tmp_path):
    """Saved over its own file (force), a loaded model's unread weights read from the new file
    (whose offsets differ), not from stale offsets in the replaced one."""
    original = large.build(tmp_path / "m.onnx", layers=2, width=256)
    expected = bench.tensor_hashes_of_model(original)
    model = load(original)
    model.initializers()["b0_half"].values = model.initializers()["b0_half"].values * 2  # shifts the layout
    save(model, original, external_data=True, force=True, source=original)
    save(model, tmp_path / "again.onnx", external_data=True)
    again = bench.tensor_hashes_of_model(tmp_path / "again.onnx")
    assert again["b0_half"] != expected["b0_half"]
    assert {k: v for k, v in again.items() if k != "b0_half"} == {k: v for k, v in expected.items() if k != "b0_half"}
