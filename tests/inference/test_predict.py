"""predict: every output per slide, numbers that agree with each other, the Python API, MIL models, bad input."""

import csv
import hashlib
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import calciscope
from calciscope.errors import CalciscopeError, CheckpointError, SlideError
from calciscope.inference.predict import PredictConfig, Predictor, check_writable
from calciscope.model import ModelCard, create_model, load_card, save_checkpoint
from calciscope.model.aggregate import slide_probabilities
from calciscope.model.cua import CUARule, cua_score
from calciscope.model.demo import demo_model_dir

LABELS = ["medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis"]


@pytest.fixture(scope="module")
def predicted(tmp_path_factory, phantom):
    """The demo model on the 2048² all-findings phantom, outputs written; decoded in 2 worker processes."""
    out = tmp_path_factory.mktemp("predict")
    result = calciscope.predict_slide(phantom.path, model="demo", out=out, workers=2, top_k=3)
    return result, out


def _rows(path):
    return list(csv.DictReader(open(path, encoding="utf-8")))


def test_predict_writes_every_output_and_nothing_else(predicted):
    result, out = predicted
    folder = out / result.slide_id
    assert result.out_dir == folder
    assert sorted(p.name for p in out.iterdir()) == [result.slide_id]  # no temporary folders left
    doc = json.loads((folder / "result.json").read_text())
    expected = {"result.json", "tiles.csv", "annotations.geojson", "report.html", "thumbnail.png", "saliency",
                *(f"heatmap_{label}.png" for label in LABELS)}
    if doc["vessels"] is not None:  # vessel analysis ran (the demo ships a segmenter)
        expected |= {"vessels.geojson", "vessels.csv"}
    assert {p.name for p in folder.iterdir()} == expected
    saliency = sorted(str(p.relative_to(folder)) for p in (folder / "saliency").rglob("*.png"))
    listed = sorted(t["saliency"] for tiles in doc["top_tiles"]["by_finding"].values() for t in tiles)
    assert len(listed) == 3 * len(LABELS) and sorted(set(listed)) == saliency
    assert all(Image.open(folder / name).size == (2 * 112 + 4, 112) for name in saliency)  # tile | overlay


def test_result_json_agrees_with_the_file_the_tiles_and_the_card(predicted, phantom):
    result, out = predicted
    doc = json.loads((out / result.slide_id / "result.json").read_text())
    card = load_card(demo_model_dir())
    assert doc["schema_version"] == 1 and "not a diagnosis" in doc["notice"]
    assert doc["slide"]["sha256"] == hashlib.sha256(phantom.path.read_bytes()).hexdigest()
    assert doc["slide"]["mpp"] == pytest.approx(0.5) and doc["slide"]["dimensions"] == [2048, 2048]
    assert doc["model"]["sha256"] == card.weights_sha256 and doc["model"]["synthetic_demo"] is True
    assert doc["tiling"]["mpp"] == card.mpp and doc["tiling"]["tile_px"] == card.tile_px
    assert doc["tiling"]["tile_size_level0"] == 224  # 112 px at 1 µm/px on a 0.5 µm/px slide

    rows = _rows(out / result.slide_id / "tiles.csv")
    assert doc["tiling"]["n_tiles"] == len(rows) == result.n_tiles > 30
    probs = np.array([[float(r[f"p_{label}"]) for label in LABELS] for r in rows])
    assert probs.min() >= 0 and probs.max() <= 1
    agg = doc["aggregation"]
    thresholds = card.thresholds
    if doc["sampling"] == "vessels":  # the demo's vessel classifier: the highest vessel probability, its slide map
        from calciscope.model.vessel_classifier import load_classifier
        from calciscope.model.vessel_classifier import slide_probabilities as from_vessels

        _, classifier = load_classifier(demo_model_dir() / "vessels" / "classifier")
        assert doc["vessel_classifier"] == {"weights_sha256": classifier.weights_sha256, "slide_probabilities": True,
                                            "synthetic_demo": True}
        assert len(doc["vessels"]["vessels"]) == len(result.vessels.vessels)
        vessels = np.array([[v.probabilities[k] for k in LABELS] for v in result.vessels.vessels])
        slide = from_vessels(vessels, classifier, LABELS)
        thresholds = {k: classifier.slide_thresholds.get(k, 0.5) for k in LABELS}
    else:
        slide = slide_probabilities(probs, card, method=agg["method"], k=agg["k"], quantile=agg["quantile"])
    for j, label in enumerate(LABELS):
        finding = doc["findings"][label]
        assert finding["probability"] == pytest.approx(slide[j], abs=1e-5)
        assert finding["threshold"] == pytest.approx(thresholds[label], abs=1e-6)
        assert finding["decision"] == ("positive" if finding["probability"] >= finding["threshold"] else "negative")
        top = doc["top_tiles"]["by_finding"][label]
        assert [t["rank"] for t in top] == [1, 2, 3]
        assert top[0]["probability"] == pytest.approx(probs[:, j].max(), abs=1e-5)
        for t in top:  # level-0 square of a row of tiles.csv, saliency peak inside it
            row = rows[t["tile_index"]]
            assert (int(row["x"]), int(row["y"]), int(row["w"])) == (t["x"], t["y"], t["w"])
            px, py = t["saliency_peak"]
            assert t["x"] <= px <= t["x"] + t["w"] and t["y"] <= py <= t["y"] + t["h"]

    cua = doc["cua_pattern"]
    expected = cua_score({label: doc["findings"][label]["probability"] for label in LABELS},
                         CUARule.from_dict(card.cua_rule))
    assert cua["status"] == "scored" and cua["score"] == pytest.approx(expected, abs=1e-5)
    assert set(cua["terms"]) == {"calcification", "occlusion", "no_exclusion"}
    assert set(doc["qc"]) >= {"flags", "tissue_area_mm2", "blurry_tile_fraction"}


def test_heatmaps_show_the_tile_probabilities_over_the_thumbnail(predicted):
    result, out = predicted
    folder = out / result.slide_id
    thumb = np.asarray(Image.open(folder / "thumbnail.png"))
    j = LABELS.index("thrombosis")
    heat = np.asarray(Image.open(folder / "heatmap_thrombosis.png"))
    assert heat.shape[1] == thumb.shape[1] and heat.shape[0] > thumb.shape[0]  # thumbnail + colour bar
    scale = thumb.shape[1] / 2048
    side = int(224 * scale)
    order = np.argsort(result.tile_scores[:, j])
    low, high = order[0], order[-1]

    def patch(i):  # the inside of a tile's square, away from the outline drawn on top tiles
        x, y = (int(v * scale) for v in result.grid.xy[i])
        return (slice(y + 4, y + side - 4), slice(x + 4, x + side - 4))

    change_low = np.abs(heat[patch(low)].astype(int) - thumb[patch(low)]).mean()
    change_high = np.abs(heat[patch(high)].astype(int) - thumb[patch(high)]).mean()
    assert change_high > change_low + 5  # a high-probability tile is painted more strongly


def test_annotations_geojson_is_what_qupath_imports(predicted):
    result, out = predicted
    doc = json.loads((out / result.slide_id / "annotations.geojson").read_text())
    assert doc["type"] == "FeatureCollection"
    tiles = [f for f in doc["features"] if f["properties"]["objectType"] == "tile"]
    contours = [f for f in doc["features"] if f["properties"]["objectType"] == "annotation"]
    assert len(tiles) == result.n_tiles
    rows = _rows(out / result.slide_id / "tiles.csv")
    for feature, row in zip(tiles, rows):
        ring = np.array(feature["geometry"]["coordinates"][0])
        assert ring[0].tolist() == ring[-1].tolist()  # closed ring, level-0 pixels
        assert ring[:, 0].min() == int(row["x"]) and ring[:, 0].max() == int(row["x"]) + int(row["w"])
        assert feature["properties"]["measurements"]["p_thrombosis"] == pytest.approx(float(row["p_thrombosis"]),
                                                                                          abs=1e-5)
    classified = [f for f in tiles if "classification" in f["properties"]]
    assert classified and all(f["properties"]["classification"]["name"] in LABELS for f in classified)
    assert all(len(f["properties"]["classification"]["color"]) == 3 for f in classified)
    assert contours and {f["properties"]["classification"]["name"] for f in contours} <= set(LABELS)
    for f in contours:  # each contour lies on the slide and encloses at least one tile's area
        ring = np.array(f["geometry"]["coordinates"][0], np.float32)
        assert ring.min() >= 0 and ring.max() <= 2048
        assert cv2.contourArea(ring) >= 0.5 * 224 ** 2
    assert len({f["id"] for f in doc["features"]}) == len(doc["features"])


def test_python_api_matches_the_written_result_and_is_deterministic(predicted, phantom):
    result, _ = predicted
    again = calciscope.predict_slide(phantom.path, model="demo", workers=0, top_k=3)
    assert again.out_dir is None
    np.testing.assert_allclose(again.tile_probs, result.tile_probs, atol=1e-6)
    assert again.probabilities == pytest.approx(result.probabilities, abs=1e-6)
    for label in LABELS:
        assert [(t.x, t.y) for t in again.top_tiles[label]] == [(t.x, t.y) for t in result.top_tiles[label]]
        assert [t.saliency_peak for t in again.top_tiles[label]] == [t.saliency_peak for t in result.top_tiles[label]]


def test_integrated_gradients_and_no_saliency(phantom, tmp_path):
    result = calciscope.predict_slide(phantom.path, model="demo", out=tmp_path, workers=0, top_k=1, saliency="ig",
                                      ig_steps=8)
    maps = list(result.saliency_maps.values())
    assert len(maps) == len(LABELS) and all(m.shape == (112, 112) and m.max() == 1.0 for m in maps)
    assert len(list((tmp_path / result.slide_id / "saliency").rglob("*.png"))) == len(LABELS)
    plain = calciscope.predict_slide(phantom.path, model="demo", out=tmp_path / "plain", workers=0, saliency="none")
    assert not plain.saliency_maps and not (tmp_path / "plain" / plain.slide_id / "saliency").exists()
    assert plain.probabilities == pytest.approx(result.probabilities, abs=1e-6)


@pytest.fixture(scope="module")
def mil_checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    model = create_model("tiny", LABELS, head="mil", mil_hidden_dim=16).eval()
    card = ModelCard(name="tiny-mil", labels=LABELS, backbone="tiny", tile_px=64, mpp=2.0, head="mil",
                     head_config=dict(model.head_config), embed_dim=model.feature_dim,
                     thresholds={label: 0.5 for label in LABELS})
    return save_checkpoint(tmp_path_factory.mktemp("mil") / "model", model, card)


def test_mil_model_scores_with_its_attention_head(mil_checkpoint, phantom, tmp_path):
    result = calciscope.predict_slide(phantom.path, model=mil_checkpoint, out=tmp_path, workers=0, top_k=2)
    assert result.aggregation == {"method": "attention"} and np.isnan(result.tile_probs).all()
    assert result.tile_scores.max(axis=0) == pytest.approx(np.ones(len(LABELS)))  # attention scaled to 1 per finding
    # the slide probability is what the attention head says about the bag of tile embeddings
    from calciscope.data.datasets import GridTilesWithQC
    from calciscope.model import load_checkpoint

    model, card = load_checkpoint(mil_checkpoint)
    tiles = torch.from_numpy(np.stack([GridTilesWithQC(phantom.path, None, result.grid)[i][0]
                                       for i in range(result.n_tiles)])).permute(0, 3, 1, 2)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (card.mean, card.std))
    with torch.no_grad():
        logits, _ = model((tiles.float() / 255 - mean) / std)
    np.testing.assert_allclose([result.probabilities[label] for label in LABELS], torch.sigmoid(logits).numpy(),
                               atol=2e-2)  # bf16 autocast in predict on CPUs that have it
    rows = _rows(tmp_path / result.slide_id / "tiles.csv")
    assert "attention_thrombosis" in rows[0] and "p_thrombosis" not in rows[0]
    doc = json.loads((tmp_path / result.slide_id / "result.json").read_text())
    assert doc["top_tiles"]["score"] == "attention"


def test_real_scanner_slide_end_to_end(cmu_svs, tmp_path):
    result = calciscope.predict_slide(cmu_svs, model="demo", out=tmp_path, workers=0, top_k=2)
    folder = tmp_path / "CMU-1-Small-Region"
    doc = json.loads((folder / "result.json").read_text())
    assert doc["slide"]["backend"] == "openslide" and doc["slide"]["mpp"] == pytest.approx(0.499)
    assert doc["tiling"]["n_tiles"] == result.n_tiles > 30  # 48 tissue tiles of 224 level-0 px
    assert (folder / "report.html").stat().st_size > 50_000
    assert len(list((folder / "saliency").rglob("*.png"))) == 2 * len(LABELS)


def test_settings_are_checked_before_any_work():
    with pytest.raises(CalciscopeError, match="unknown saliency 'cam'"):
        PredictConfig(saliency="cam")
    with pytest.raises(CalciscopeError, match="unknown aggregation 'mean'"):
        PredictConfig(aggregation="mean")
    with pytest.raises(CalciscopeError, match="batch size"):
        PredictConfig(batch_size=0)
    with pytest.raises(CalciscopeError, match=r"^device 'cuda:99' is not available here \(CUDA devices: \d+\)"):
        PredictConfig(device="cuda:99")
    with pytest.raises(CalciscopeError, match="^device 'mps' is not supported"):
        PredictConfig(device="mps")
    assert PredictConfig(device="cpu:0").device == "cpu:0"


def test_the_vessel_networks_run_where_the_tile_model_runs():
    """Segmenter, vessel classifier and calcium-artifact classifier sit on the predict device (the tile model's),
    not on the CPU whatever the device: on a GPU machine the vessel analysis runs on the GPU too."""
    from calciscope.model.precision import device_of

    predictor = Predictor("demo", PredictConfig(workers=0, saliency="none"))
    device = predictor.precision.device
    assert device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stage = predictor.vessel_stage
    nets = [stage.segmenter[0], stage.vessel_classifier[0], stage.artifact_classifier[0]]
    assert [device_of(net).type for net in nets] == [device.type] * 3
    cpu = Predictor("demo", PredictConfig(workers=0, saliency="none", device="cpu"))
    assert device_of(cpu.vessel_stage.segmenter[0]) == torch.device("cpu")


def test_the_vessel_networks_run_in_the_tile_models_precision():
    """One precision path for every network: the vessel stage takes the tile model's (bf16 autocast where the CPU
    has it, channels_last), and ``amp off`` turns it off for all of them."""
    predictor = Predictor("demo", PredictConfig(workers=0, saliency="none"))
    assert predictor.vessel_stage.precision == predictor.precision
    off = Predictor("demo", PredictConfig(workers=0, saliency="none", amp="off"))
    assert off.vessel_stage.precision.dtype is None and off.vessel_stage.precision.channels_last


def test_progress_follows_windows_vessels_and_tiles_to_the_end(vessel_phantoms):
    """``predict(progress=...)`` reports where it is: the tile count from the start, segmenter windows as they run,
    vessels as the classifiers judge them, tiles as they are scored; the share of the work done only grows within
    a step and ends at 1 with every count complete."""
    from calciscope.inference.progress import SlideProgress

    predictor = Predictor("demo", PredictConfig(workers=0, saliency="none", top_k=0))
    seen: list[SlideProgress] = []
    result = predictor.predict(vessel_phantoms[0].path, progress=seen.append)
    first, last = seen[0], seen[-1]
    assert first.tiles == (0, result.n_tiles) and first.fraction == 0.0
    assert last.tiles == (result.n_tiles, result.n_tiles) and last.fraction == pytest.approx(1.0)
    assert last.windows[0] == last.windows[1] > 0 and last.vessels[0] == last.vessels[1] >= len(result.vessels.vessels)
    moved = [[what for what in ("windows", "vessels", "tiles") if getattr(s, what) != getattr(p, what)]
             for p, s in zip(seen, seen[1:])]
    order = [what for step in moved for what in step]
    assert order.index("tiles") > max(i for i, what in enumerate(order) if what in ("windows", "vessels"))
    done = [s.windows[0] for s in seen]
    assert done == sorted(done) and [s.tiles[0] for s in seen] == sorted(s.tiles[0] for s in seen)
    assert "windows" in last.describe() and f"tiles {result.n_tiles}/{result.n_tiles}" in last.describe()


def test_a_folder_that_is_not_a_checkpoint_is_named(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(CheckpointError, match=r"weights.*model\.json not found"):
        Predictor(tmp_path / "weights")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        Predictor(tmp_path / "nowhere")


def test_a_slide_coarser_than_the_model_is_refused(bad_inputs, tmp_path):
    with pytest.raises(SlideError, match=r"no_mpp\.png: resolution 4 µm/px is coarser than the 1 µm/px"):
        calciscope.predict_slide(bad_inputs["no_mpp"], model="demo", out=tmp_path, workers=0, slide_mpp=4.0)
    assert list(tmp_path.iterdir()) == []


def test_an_output_path_that_cannot_hold_results(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(CalciscopeError, match=r"a_file/out: output directory is not writable"):
        check_writable(blocker / "out")


def test_guided_gradcam_explains_models_with_in_place_relus():
    """torchvision's ResNets reuse in-place ReLUs, which guided backprop's hooks cannot take: the map comes from an
    out-of-place copy, the model itself is left as it was, and the map is the one the same model without in-place
    ReLUs gives."""
    from calciscope.inference.saliency import saliency_maps

    torch.manual_seed(0)
    model = create_model("resnet18", LABELS).eval()
    tiles = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    targets = np.array([0, 2])
    maps = saliency_maps(model, tiles, targets, (0.5,) * 3, (0.25,) * 3)
    assert all(m.inplace for m in model.modules() if isinstance(m, torch.nn.ReLU))
    for m in model.modules():
        if isinstance(m, torch.nn.ReLU):
            m.inplace = False
    reference = saliency_maps(model, tiles, targets, (0.5,) * 3, (0.25,) * 3)
    assert maps.shape == (2, 64, 64) and maps.max() == 1.0
    np.testing.assert_allclose(maps, reference, atol=1e-5)


def test_grid_tiles_cut_from_the_segmenters_windows_are_the_tiles_read_on_their_own(phantom, cmu_svs):
    """One decode for both networks (issue 19): every grid tile of a phantom lies in a segmenter window with the same
    pixels, and predict's tile probabilities, tile QC and OOD feature rows (in grid order) are those of the tiles
    streamed on their own. A slide whose grid and windows do not share a pixel lattice (the CMU scan, 0.499 µm/px)
    has its tiles read on their own."""
    from calciscope.data.slides import open_slide
    from calciscope.data.tiling import make_grid
    from calciscope.data.tissue import TissueConfig, detect_tissue
    from calciscope.model.segmenter import plan_windows, read_window, tiles_in_windows

    predictor = Predictor("demo", PredictConfig(workers=0, saliency="none"))
    segmenter_card = predictor.vessel_stage.segmenter[1]
    with open_slide(cmu_svs) as slide:
        mask = detect_tissue(slide, TissueConfig())
        grid = make_grid(slide, mask, predictor.tiling)
        plan = plan_windows(slide, segmenter_card, mask)
        assert len(grid) > 0 and tiles_in_windows(grid, plan, slide.level_downsamples[plan.level]) == {}
    with open_slide(phantom.path) as slide:
        mask = detect_tissue(slide, TissueConfig())
        grid = make_grid(slide, mask, predictor.tiling)
        plan = plan_windows(slide, segmenter_card, mask)
        where = tiles_in_windows(grid, plan, slide.level_downsamples[plan.level])
        listed = sorted(i for tiles in where.values() for i, _, _ in tiles)
        assert listed == list(range(len(grid)))  # every tile, once
        for (x, y), tiles in where.items():
            window = read_window(slide, plan, x, y)
            for i, col, row in tiles:
                assert np.array_equal(window[row : row + 112, col : col + 112], grid.read(slide, i))
        predictor.ood.start()
        shared = predictor.tiles.window_tiles(grid, slide.level_downsamples[grid.level], predictor.ood.take_tile_rows,
                                              None)
        predictor.vessel_stage.run(slide, mask, predictor.score_tiles, predictor.tiling, on_windows=shared)
    probs, qc, rows = shared.finish(phantom.path, None)
    predictor.ood.tiles_start()
    streamed, streamed_qc = predictor.tiles.stream(phantom.path, None, grid, None)
    streamed_rows = predictor.ood.taps["tile_model"].take()
    np.testing.assert_allclose(probs, streamed, atol=1e-5)
    assert np.array_equal(qc, streamed_qc)
    assert rows.shape == streamed_rows.shape
    np.testing.assert_allclose(rows, streamed_rows, rtol=1e-2, atol=1e-2)
    assert np.corrcoef(rows.ravel(), streamed_rows.ravel())[0, 1] > 0.9999
