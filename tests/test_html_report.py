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


# ---- the page says what was written, what each layer became, and the one verdict --------------------
DEEP = "fold, cleanup, fuse, prune(sparsity=0.7), codebook(bits=4), entropy"


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory):
    """mnist through pruning, a 4-bit codebook and entropy coding, written packed, with a report."""
    from .conftest import real_model

    mnist = real_model("mnist.onnx")
    folder = tmp_path_factory.mktemp("packed")
    page, out = folder / "report.html", folder / "mnist.onnxc"
    done = run_cli("optimize", mnist, "-o", out, "--pipeline", DEEP, "--no-gate", "--report", page)
    assert done.returncode == 0, done.stderr
    return mnist, out, page.read_text(), done.stdout


def _text(page: str) -> str:
    import html as html_module
    import re

    return " ".join(html_module.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_the_page_heads_with_the_written_files_bytes_and_ratio(packed_run):
    import re

    mnist, out, page, _ = packed_run
    headline = re.search(r"<p class=headline>(.*?)</p>", page).group(1)
    size, source = out.stat().st_size, mnist.stat().st_size
    assert f"{size:,} bytes" in headline and f"{source / size:.1f}× smaller than the input's {source:,} bytes" in headline
    assert page.index("class=headline") < page.index("<h2>")  # the first thing under the title


def test_each_layer_shows_its_real_bits_and_the_share_of_weights_that_decode_to_zero(packed_run):
    import re

    rows = re.findall(r"<tr><td>([^<]*)</td><td>(Conv|Gemm|MatMul)</td><td>([^<]*)</td><td>([^<]*)</td>"
                      r"<td>([^<]*)</td><td>([^<]*)%</td>", packed_run[2])
    coded = [r for r in rows if "codebook" in r[3]]
    assert coded, rows
    assert all(r[4] == "4" for r in coded)  # 4-bit codebook indices, though stored in uint8 before packing
    total = re.search(r"<td>all \d+ layers</td><td></td><td>[^<]*</td><td></td><td>([^<]*)</td><td>([^<]*)%</td>",
                      packed_run[2])
    assert float(total.group(2)) >= 69.0  # prune(sparsity=0.7) over every layer: not 0.0 %


def test_the_layers_decode_to_the_weights_ort_computes_with(packed_run):
    """The decoded view is the model's truth: the codebook layers' decoded weights hold the
    zeros and the 16 values the packed model holds."""
    import numpy as np

    import onnxcomp
    from onnxcomp.layers import layers

    found = [layer for layer in layers(onnxcomp.load(packed_run[1])) if "codebook" in layer.encoding]
    assert found
    for layer in found:
        assert len(np.unique(layer.values)) <= 16 and layer.bits == 4
        assert layer.zeros == pytest.approx(float(np.mean(layer.values == 0)))


def test_every_histogram_shows_the_layer_before_and_after(mnist_path):
    import onnxcomp
    from onnxcomp.html_report import histogram_pairs

    result = onnxcomp.optimize(mnist_path, DEEP, gate=False)
    pairs = histogram_pairs(onnxcomp.load(mnist_path), result.model)
    assert pairs and all(before is not None for _, before in pairs)
    assert all(after.values.shape == before.values.shape for after, before in pairs)


def test_the_outputs_section_says_the_same_verdict_and_figures_as_the_cli(packed_run):
    import re

    page, stdout = packed_run[2], packed_run[3]
    verdict = _text(re.search(r"<h2>Outputs vs the input model</h2>(<p class=\w+>.*?</p>)", page).group(1))
    line = " ".join(stdout.split()).split("validation on ORT: ", 1)[1]
    assert line.startswith(verdict), (verdict, line)
    assert "NOT VALIDATED" in verdict


def test_the_packed_run_renders_in_headless_chromium(packed_run, tmp_path):
    page = tmp_path / "page.html"
    page.write_text(packed_run[2])
    test_html_report_renders_in_headless_chromium(page, tmp_path)
