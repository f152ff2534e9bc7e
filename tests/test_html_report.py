"""The HTML report: self-contained, with the report's figures, and it renders in headless Chromium."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from .helpers import run_cli


@pytest.fixture
def html_report(mnist_path, tmp_path):
    page = tmp_path / "report.html"
    done = run_cli("optimize", mnist_path, "-o", tmp_path / "out.onnx", "--pipeline", "fold, cleanup, fuse",
                   "--report", page, "--report", tmp_path / "report.json")
    assert done.returncode == 0, done.stderr
    return page


def test_html_report_is_one_file_with_plots_and_the_pipeline(html_report, tmp_path):
    text = html_report.read_text()
    assert "fold, cleanup, fuse" in text
    assert text.count("data:image/png;base64,") >= 2  # waterfall and histograms embedded
    assert "src=\"http" not in text and "href=\"http" not in text  # nothing fetched from outside
    assert "Latency" in text and "Outputs vs the input model" in text
    assert (tmp_path / "report.json").exists()


def test_html_report_renders_in_headless_chromium(html_report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("chromium is not installed (.ci/run installs Debian's chromium)")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2000",
                    html_report.as_uri()], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 10_000
    from PIL import Image

    with Image.open(shot) as image:
        colours = image.convert("L").getextrema()
    assert colours[0] < 100 and colours[1] > 200, "the screenshot is blank"
