"""Self-contained HTML report and its figures (jimray.io.report)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jimray.io.report import plot_cluster_sizes, plot_fsc, plot_gallery, png_data_uri, write_html_report


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.tables = 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
        self.tables += tag == "table"


def _check_image(src: str, folder: Path) -> None:
    if src.startswith("data:"):
        header, payload = src.split(",", 1)
        assert header == "data:image/png;base64"
        assert base64.b64decode(payload).startswith(b"\x89PNG\r\n\x1a\n")
    else:
        assert (folder / src).is_file(), f"report image {src} missing"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    freq = np.arange(9) / (16 * 10.0)
    curves = {"class_001": (freq, np.linspace(1, 0, 9)), "class_002": (freq, np.linspace(1, 0.3, 9))}
    figures = [
        ("FSC", plot_fsc(out / "fsc.png", curves, 0.143, {"class_001": 35.0, "class_002": 20.0})),
        ("Gallery", plot_gallery(out / "gallery.png", {"a": rng.random((16, 16, 16)), "b": rng.random((16, 16, 16))})),
        ("Sizes", plot_cluster_sizes(out / "sizes.png", {"class_001": 10, "class_002": 7})),
    ]
    rows = [{"class": "class_001", "particles": 10, "resolution (A)": 35.0}, {"class": "<b>2</b>", "particles": 7}]
    path = write_html_report(out / "report.html", "test report", {"box": "16 voxels"}, rows, figures)
    return path


def test_report_parses_and_every_image_loads(report):
    parser = _Images()
    parser.feed(report.read_text())
    assert len(parser.sources) == 3 and parser.tables == 1
    for src in parser.sources:
        _check_image(src, report.parent)
    assert "&lt;b&gt;2&lt;/b&gt;" in report.read_text()  # cell text is escaped


def test_png_data_uri_rejects_non_png(tmp_path):
    fake = tmp_path / "x.png"
    fake.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="not a PNG"):
        png_data_uri(fake)


def test_report_renders_in_headless_chromium(report, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no chromium on this machine (apt-get install chromium) to render report.html headless")
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,1400", report.resolve().as_uri()], check=True, timeout=120,
                   capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1400, 1000)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005  # not a blank page: text and figures drawn
