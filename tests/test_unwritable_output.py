"""An output the file system will not take (read-only file system, no permission) ends in one
line naming the path and the reason, exit 2: never an internal error, never a partial file,
never a changed input."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from onnxcomp.io import container

from .helpers import assert_one_line_error, run_cli_here, small_cnn


@contextlib.contextmanager
def _unwritable(folder: Path):
    """`folder` made unwritable: a read-only tmpfs mounted on it where this runs as root and may
    mount (EROFS, as on a read-only volume), else the folder's write permission taken away
    (EACCES); the reason the error line must give comes with it."""
    folder.mkdir()
    if os.geteuid() == 0:
        mount = shutil.which("mount")
        done = subprocess.run([mount, "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)],
                              capture_output=True, check=False) if mount else None
        if done is None or done.returncode != 0:
            pytest.skip("running as root without the right to mount: no way to make a folder unwritable")
        try:
            yield "Read-only file system"
        finally:
            subprocess.run(["umount", str(folder)], check=False)
        return
    folder.chmod(0o555)
    try:
        yield "Permission denied"
    finally:
        folder.chmod(0o755)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command, source_name, out_name, extra", [
    ("optimize", "model.onnx", "out.onnx", ["--preset", "lossless"]),
    ("optimize", "model.onnx", "out.onnxc", ["--preset", "lossless"]),
    ("pack", "model.onnx", "out.onnxc", []),
    ("unpack", "model.onnxc", "out.onnx", []),
])
def test_an_unwritable_output_folder_is_one_line_naming_the_path_and_the_reason(command, source_name, out_name,
                                                                                 extra, tmp_path):
    source = tmp_path / "in" / source_name
    source.parent.mkdir()
    source.write_bytes(container.pack_proto(small_cnn())[0] if source_name.endswith(".onnxc")
                       else small_cnn().SerializeToString())
    before = _snapshot(tmp_path / "in")
    with _unwritable(tmp_path / "out") as reason:
        target = tmp_path / "out" / out_name
        done = run_cli_here(command, source, "-o", target, *extra)
        assert done.returncode == 2, done.stderr
        assert_one_line_error(done, f"{target}: cannot write ({reason})")
        assert list((tmp_path / "out").iterdir()) == []
    assert _snapshot(tmp_path / "in") == before
