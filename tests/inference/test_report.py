"""report.html in a real browser (headless Chromium): it renders, shows result.json's numbers, escapes user text."""

import copy
import dataclasses
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import calciscope
from browser import chromium as _chromium
from calciscope.data.slides import safe_id
from calciscope.inference.report import render_report

HOSTILE_NAME = "<img src=x onerror=alert(1)>&co.png"




class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.parts.append(data)


@pytest.fixture(scope="module")
def report(tmp_path_factory, bad_inputs):
    """A report for a slide whose file name is an HTML injection attempt (a plain image at 1 µm/px)."""
    root = tmp_path_factory.mktemp("report")
    slide = root / HOSTILE_NAME
    shutil.copyfile(bad_inputs["no_mpp"], slide)
    result = calciscope.predict_slide(slide, model="demo", out=root / "out", workers=0, slide_mpp=1.0, top_k=2)
    return result, result.out_dir / "report.html"


def _run(browser, *args, timeout=120):
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--allow-file-access-from-files", *args], capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_chromium_with_the_numbers_of_result_json(report, tmp_path):
    browser = _chromium()
    result, html = report
    doc = json.loads((html.parent / "result.json").read_text())
    dom = _run(browser, "--dump-dom", html.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    parser = _Text()
    parser.feed(dom.stdout)
    text = " ".join(" ".join(parser.parts).split())
    assert "Decision support, not a diagnosis" in text and "synthetic demo, not for clinical use" in text
    assert f"{doc['cua_pattern']['score']:.3f}" in text
    for label, finding in doc["findings"].items():
        assert label in text and f"{finding['probability']:.3f}" in text and f"{finding['threshold']:.3f}" in text
    assert doc["slide"]["sha256"] in text and doc["model"]["sha256"] in text
    assert f"{doc['tiling']['n_tiles']} tiles" in text
    # the file name is shown as text, never interpreted: no script, no injected image element
    assert HOSTILE_NAME in text
    assert parser.tags.count("script") == 1  # ours (vessel-table sorting, allowed by the page's CSP), none injected
    n_images = 1 + len(doc["findings"]) + sum(len(v) for v in doc["top_tiles"]["by_finding"].values())
    assert parser.tags.count("img") == n_images  # thumbnail, heatmaps, top tiles: nothing more

    shot = tmp_path / "report.png"
    run = _run(browser, f"--screenshot={shot}", "--window-size=1200,1600", html.as_uri())
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (1600, 1200)
    background = np.all(np.abs(pixels - pixels[5, 5]) < 8, axis=-1)
    assert background.mean() < 0.9 and pixels.std() > 20  # text, tables and images, not a blank page


def test_report_is_self_contained(report):
    _, html = report
    page = html.read_text(encoding="utf-8")
    assert "http://" not in page and "https://" not in page  # nothing fetched: images are data URIs
    assert len(re.findall(r"<img [^>]*src=[\"']data:image/(png|jpeg);base64,", page)) == page.count("<img ")


def test_user_text_is_escaped_by_the_template_not_by_each_call_site(report):
    """A slide id, finding name and model name carrying markup render as text, in element text and in attributes
    alike: the template autoescapes everything it is given (no browser needed)."""
    result, _ = report
    injection = '<script>alert(1)</script>"onload=alert(2) x=\''
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;&#34;onload=alert(2) x=&#39;"
    old = result.labels[0]
    hostile = copy.copy(result)
    hostile.slide_id = injection
    hostile.card = dataclasses.replace(result.card, name=injection)
    hostile.labels = [injection, *result.labels[1:]]
    hostile.probabilities, hostile.thresholds, hostile.top_tiles = (
        {injection if k == old else k: v for k, v in d.items()}
        for d in (result.probabilities, result.thresholds, result.top_tiles))
    images = {"thumbnail.png": result.thumbnail,
              **{f"heatmap_{safe_id(label)}.png": result.thumbnail for label in hostile.labels}}
    page = render_report(hostile, images)
    assert "<script>alert(1)" not in page and '"onload=' not in page and "x='" not in page
    assert page.count("<script") == 1  # ours
    assert f"<title>calciscope report: {escaped}</title>" in page and f"<h1>calciscope report: {escaped}</h1>" in page
    assert f"<td>{escaped}</td>" in page  # the findings table
    assert f'alt="heatmap {escaped}"' in page and f"<h3>{escaped}</h3>" in page  # an attribute; the top tiles
    assert f"<td>{escaped} {result.card.version}</td>" in page  # the model table
