"""Vessel-analysis outputs of a real predict run: vessels.geojson (QuPath), vessels.csv, the report's Vessels section
(rendered in headless Chromium: table, sorting, SVG outlines, the insufficient-sampling warning) and the CLI lines."""

import csv
import json
import shutil
import subprocess
from html.parser import HTMLParser

import cv2
import numpy as np
import pytest
from rich.console import Console

from browser import chromium as _chromium
from calciscope.cli.tables import summary_table, vessel_line
from calciscope.inference.export import VESSEL_POSITIVE, load_result
from calciscope.inference.predict import PredictConfig, Predictor

FINDINGS = {"medial_calcification": 1, "small_vessel_calcification": 1, "thrombosis": 1, "vasculitis": 0}
HOSTILE_FILE = "<img src=x onerror=alert(1)>&v.tiff"  # a file name that is an HTML injection attempt
HOSTILE_ID = "v<b>&\"q'"  # a slide id given through the Python API, unsanitised
FAST = {"saliency": "none", "workers": 0, "top_k": 1}




def _dom(url: str) -> str:
    run = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                          "--allow-file-access-from-files", "--dump-dom", url], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


class _Dom(HTMLParser):
    """Elements (tag, attributes, path of enclosing tags/ids) and the text of the rendered page."""

    def __init__(self, html: str):
        super().__init__()
        self.elements, self.stack, self.parts = [], [], []
        self.texts: dict[int, list[str]] = {}
        self.feed(html)
        self.text = " ".join("".join(self.parts).split())

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        element = (tag, attrs, [f"{t}#{a.get('id', '')}" for t, a in self.stack])
        self.elements.append(element)
        if tag not in ("image", "br", "img", "meta", "input"):  # void elements never close
            self.stack.append((tag, attrs))
            self.texts[len(self.elements) - 1] = []

    def handle_startendtag(self, tag, attrs):
        self.elements.append((tag, dict(attrs), [f"{t}#{a.get('id', '')}" for t, a in self.stack]))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        self.parts.append(data)

    def within(self, tag: str, container: str) -> list[dict]:
        return [a for t, a, path in self.elements if t == tag and container in path]


@pytest.fixture(scope="session")
def vessel_runs(tmp_path_factory):
    """The demo model (with its vessel segmenter) on a 2048² phantom, twice: the default adequacy minimum, and a
    minimum of 1000 small fat vessels, which no slide meets (the result a dermis-only biopsy gets)."""
    from calciscope.data.synthetic import generate_slide

    root = tmp_path_factory.mktemp("vessel_outputs")
    phantom = generate_slide(root / "slides", "vessels", FINDINGS, size_px=2048, seed=11, artifacts=False)
    hostile = root / "slides" / HOSTILE_FILE
    shutil.copyfile(phantom.path, hostile)
    predictor = Predictor("demo", PredictConfig(**FAST))
    assert predictor.vessel_stage.segmenter is not None, "the demo bundle ships a vessel segmenter (calciscope/model/demo/vessels)"
    result = predictor.predict_and_write(hostile, root / "out")
    sparse = Predictor("demo", PredictConfig(min_fat_vessels=1000, **FAST)).predict_and_write(phantom.path,
                                                                                              root / "out")
    return {"result": result, "doc": load_result(result.out_dir), "sparse": sparse,
            "sparse_doc": load_result(sparse.out_dir), "phantom": phantom, "root": root}


@pytest.fixture(scope="session")
def dom(vessel_runs):
    return _Dom(_dom((vessel_runs["result"].out_dir / "report.html").as_uri()))


def _vessel_features(folder):
    doc = json.loads((folder / "vessels.geojson").read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection"
    by_class = {}
    for f in doc["features"]:
        by_class.setdefault(f["properties"]["classification"]["name"], []).append(f)
    return by_class


def test_vessels_geojson_has_one_closed_polygon_per_vessel_of_result_json(vessel_runs):
    result, doc = vessel_runs["result"], vessel_runs["doc"]
    listed = {v["id"]: v for v in doc["vessels"]["vessels"]}
    assert doc["vessels"]["n_vessels"] == len(listed) >= 1  # the phantom has vessels, the segmenter finds some
    features = _vessel_features(result.out_dir)
    vessels = features.get("vessel", [])
    assert sorted(f["properties"]["vessel_id"] for f in vessels) == sorted(listed)
    assert len(features.get("calcium_artifact", [])) == doc["vessels"]["qc"]["calcium_artifact_regions"]
    assert set(features) <= {"vessel", "calcium_artifact"}
    width, height = doc["slide"]["dimensions"]
    for f in features.get("vessel", []) + features.get("calcium_artifact", []):
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] == "annotation" and isinstance(f["id"], str)
        for ring in f["geometry"]["coordinates"]:
            assert len(ring) >= 4 and ring[0] == ring[-1]  # closed rings
            xy = np.array(ring, float)
            assert xy.min() >= 0 and (xy[:, 0] <= width).all() and (xy[:, 1] <= height).all()
    for f in vessels:
        props, rings = f["properties"], f["geometry"]["coordinates"]
        v = listed[props["vessel_id"]]
        assert props["name"] == f"vessel {v['id']}"
        assert (len(rings) == 2) == (v["lumen_diameter_um"] is not None)  # the lumen is the hole, when known
        if len(rings) == 2:  # the hole lies inside the outer wall
            outer = np.array(rings[0], np.float32)
            assert all(cv2.pointPolygonTest(outer, (x, y), True) >= -1.0 for x, y in rings[1])
        m = props["measurements"]
        assert all(isinstance(value, (int, float)) for value in m.values())  # QuPath: a flat name → number
        assert m["outer diameter µm"] == pytest.approx(v["outer_diameter_um"], abs=0.01)
        assert m["area µm²"] == pytest.approx(v["area_um2"], abs=0.1)
        assert ("lumen diameter µm" in m) == (v["lumen_diameter_um"] is not None)
        for label, p in v["probabilities"].items():
            assert m[f"p({label})"] == pytest.approx(p, abs=1e-6) and props["probabilities"][label] == p
        assert props["positive"] == [k for k, p in v["probabilities"].items() if p >= VESSEL_POSITIVE]
        assert (props["compartment"], props["size_band"], props["flags"]) == (v["compartment"], v["size_band"],
                                                                              v["flags"])
        # the outline is where result.json says the vessel is
        assert cv2.pointPolygonTest(np.array(rings[0], np.float32), tuple(v["centroid"]), True) > -5


def test_vessels_csv_has_one_row_per_vessel(vessel_runs):
    result, doc = vessel_runs["result"], vessel_runs["doc"]
    rows = list(csv.DictReader(open(result.out_dir / "vessels.csv", encoding="utf-8")))
    listed = doc["vessels"]["vessels"]
    assert len(rows) == len(listed)
    for row, v in zip(rows, listed):
        assert int(row["vessel_id"]) == v["id"]
        assert [float(row["centroid_x"]), float(row["centroid_y"])] == pytest.approx(v["centroid"], abs=0.06)
        assert float(row["outer_diameter_um"]) == pytest.approx(v["outer_diameter_um"], abs=0.006)
        assert (row["lumen_diameter_um"] == "") == (v["lumen_diameter_um"] is None)
        assert (row["compartment"], row["size_band"]) == (v["compartment"], v["size_band"])
        assert row["flags"] == ";".join(v["flags"])
        for label, p in v["probabilities"].items():
            assert float(row[f"p_{label}"]) == pytest.approx(p, abs=1e-6)


def test_report_shows_the_vessel_table_and_outlines_in_chromium(vessel_runs, dom):
    result, doc = vessel_runs["result"], vessel_runs["doc"]
    listed = doc["vessels"]["vessels"]
    ids = [str(v["id"]) for v in listed]
    positive = {str(v["id"]): any(p >= VESSEL_POSITIVE for p in v["probabilities"].values()) for v in listed}
    rows = dom.within("tr", "table#vessel-table")
    assert [r["data-id"] for r in rows if "data-id" in r] == ids  # one row per vessel, in id order
    assert {r["data-id"]: r["class"] == "vpos" for r in rows if "data-id" in r} == positive
    tables = [a for t, a, _ in dom.elements if t == "table" and a.get("id") == "vessel-table"]
    assert tables[0].get("data-sortable") == "ready"  # the sorting script ran (the page's CSP allows it)
    outlines = [a for a in dom.within("path", "svg#vessel-overlay") if "vessel" in a.get("class", "").split()]
    assert sorted(a["data-id"] for a in outlines) == sorted(ids)  # one outline per vessel
    assert all(("vpos" in a["class"]) == positive[a["data-id"]] for a in outlines)
    artifacts = [a for a in dom.within("path", "svg#vessel-overlay") if a.get("class") == "artifact"]
    assert len(artifacts) == doc["vessels"]["qc"]["calcium_artifact_regions"]
    images = dom.within("image", "svg#vessel-overlay")
    assert len(images) == 1 and images[0]["href"].startswith("data:image/jpeg;base64,")
    # outlines are in thumbnail pixels: inside the thumbnail's viewBox
    th, tw = result.thumbnail.shape[:2]
    svg = [a for t, a, _ in dom.elements if t == "svg" and a.get("id") == "vessel-overlay"][0]
    assert svg["viewbox"] == f"0 0 {tw} {th}"  # (the parser lower-cases attribute names)
    for a in outlines:
        xy = np.array([p.split(",") for p in a["d"].replace("M", " ").replace("L", " ").replace("Z", " ").split()],
                      float)
        assert xy.min() >= 0 and (xy[:, 0] <= tw + 0.1).all() and (xy[:, 1] <= th + 0.1).all()
    adequacy = doc["vessels"]["adequacy"]
    assert f"{adequacy['n_vessels']} vessel" in dom.text
    assert f"Small vessels (< {adequacy['small_max_um']:g} µm) in subcutaneous fat: {adequacy['small_fat_vessels']}" \
           in dom.text
    assert "Sampling of small subcutaneous vessels: sufficient" in dom.text or adequacy["status"] != "sufficient"


def test_report_escapes_the_file_name_and_the_slide_id(vessel_runs, dom, tmp_path):
    assert HOSTILE_FILE in dom.text  # shown as text, never interpreted
    assert not any(t == "img" and a.get("src") == "x" for t, a, _ in dom.elements)
    scripts = [a for t, a, _ in dom.elements if t == "script"]
    assert len(scripts) == 1  # the sorting script, nothing injected
    # a slide id given through the Python API (not sanitised by a file name) is escaped too
    result = vessel_runs["result"]
    result.slide_id = HOSTILE_ID
    try:
        from calciscope.inference.export import write_outputs

        folder = write_outputs(result, tmp_path)
    finally:
        result.slide_id = vessel_runs["doc"]["slide"]["id"]
    page = _Dom(_dom((folder / "report.html").as_uri()))
    assert f"calciscope report: {HOSTILE_ID}" in page.text
    assert not page.within("b", "h1#") and [t for t, _, _ in page.elements].count("script") == 1


def test_sorting_a_column_orders_numbers_numerically(vessel_runs):
    """``#sort=<column>[:desc]`` runs the same sort a header click does: numbers by value, not as text."""
    result, doc = vessel_runs["result"], vessel_runs["doc"]
    listed = doc["vessels"]["vessels"]
    page = _Dom(_dom((result.out_dir / "report.html").as_uri() + "#sort=outer:desc"))
    order = [r["data-id"] for r in page.within("tr", "table#vessel-table") if "data-id" in r]
    expected = [str(v["id"]) for v in sorted(listed, key=lambda v: -v["outer_diameter_um"])]
    assert len(order) == len(listed) and order == expected
    headers = [a for a in page.within("th", "table#vessel-table") if a.get("data-key") == "outer"]
    assert headers[0].get("aria-sort") == "descending"


def test_insufficient_sampling_is_shown_as_a_warning(vessel_runs):
    doc, sparse = vessel_runs["sparse_doc"], vessel_runs["sparse"]
    adequacy = doc["vessels"]["adequacy"]
    assert adequacy["status"] == "insufficient" and adequacy["min_small_fat_vessels"] == 1000
    cua = doc["cua_pattern"]
    assert cua["status"] == "insufficient_sampling" and cua["reason"] == adequacy["reason"]
    page = _Dom(_dom((sparse.out_dir / "report.html").as_uri()))
    warnings = [a for t, a, _ in page.elements if a.get("id") in ("cua-insufficient", "vessel-adequacy")]
    assert len(warnings) == 2 and all("warn" in a["class"] for a in warnings)
    assert "Status: insufficient sampling (insufficient_sampling)" in page.text
    assert " ".join(adequacy["reason"].split()) in page.text
    assert "The CUA pattern cannot be judged on this slide, and the absence of vasculitis cannot be concluded" \
           in page.text
    assert "not interpretable: insufficient sampling" in page.text
    # and the terminal says so
    line = vessel_line(sparse)
    assert f"{adequacy['n_vessels']} vessel" in line and "sampling insufficient" in line
    console = Console(width=200, record=True)
    console.print(summary_table([vessel_runs["result"], sparse]))
    assert "(insufficient sampling)" in console.export_text()


def test_cli_line_and_no_vessel_analysis(vessel_runs, tmp_path):
    result, doc = vessel_runs["result"], vessel_runs["doc"]
    adequacy = doc["vessels"]["adequacy"]
    assert vessel_line(result) == (f"{result.slide_id}: {adequacy['n_vessels']} vessel"
                                    f"{'' if adequacy['n_vessels'] == 1 else 's'}, {adequacy['small_fat_vessels']} "
                                    f"small in subcutaneous fat ({adequacy['min_small_fat_vessels']} needed): "
                                    f"sampling {adequacy['status']}"
                                    + ("" if adequacy["status"] == "sufficient" else
                                       " - the CUA pattern and the absence of vasculitis cannot be judged"))
    # without a segmenter: no vessel files, result.json says null, the report says so in one line
    plain = Predictor("demo", PredictConfig(vessels="none", **FAST)).predict_and_write(
        vessel_runs["phantom"].path, tmp_path)
    assert plain.vessels is None and vessel_line(plain) is None
    names = {p.name for p in plain.out_dir.iterdir()}
    assert "vessels.geojson" not in names and "vessels.csv" not in names and "report.html" in names
    plain_doc = load_result(plain.out_dir)
    assert plain_doc["vessels"] is None and plain_doc["cua_pattern"]["status"] == "scored"
    page = (plain.out_dir / "report.html").read_text(encoding="utf-8")
    assert "Vessel analysis was not run for this slide" in page and "vessel-table" not in page
