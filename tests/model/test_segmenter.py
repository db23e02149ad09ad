"""vessels.segment + train_segmenter: the U-Net trains on vessel outlines, saves without pickle, loads only what
its card describes, and segments a slide window by window (tissue windows only)."""

import json

import numpy as np
import pytest
import torch
import yaml

from calciscope.data.slides import open_slide
from calciscope.data.tissue import detect_tissue
from calciscope.errors import CalciscopeError, CheckpointError
from calciscope.model.segmenter import (
    CARD_FILE,
    WEIGHTS_FILE,
    SegmenterCard,
    VesselUNet,
    load_segmenter,
    save_segmenter,
    segment_slide,
)
from calciscope.training.train_segmenter import load_config, train_segmenter


@pytest.fixture(scope="module")
def trained(tmp_path_factory, vessel_phantoms):
    """60 steps on the two vessel phantoms (no validation split: 2 patients, both train)."""
    root = tmp_path_factory.mktemp("segmenter")
    manifest = root / "manifest.csv"
    manifest.write_text("slide_id,patient_id,path\n" + "".join(
        f"{s.slide_id},{s.patient_id},{s.path}\n" for s in vessel_phantoms))
    config = root / "vessels.yaml"
    config.write_text(yaml.safe_dump({"manifest": "manifest.csv", "out": str(root / "out"), "steps": 60,
                                      "batch_size": 4, "crop_px": 96, "widths": [8, 16, 24], "val_fraction": 0.0}))
    return train_segmenter(load_config(config))


def test_training_lowers_the_loss_and_writes_a_card(trained):
    card = json.loads((trained / CARD_FILE).read_text())
    assert card["metrics"]["train_loss_end"] < card["metrics"]["train_loss_start"]
    assert card["channels"] == ["vessel", "lumen", "calcium_artifact"] and card["mpp"] == 1.0
    assert len(card["weights_sha256"]) == 64


def test_save_then_load_gives_the_same_outputs(tmp_path, trained):
    model, card = load_segmenter(trained)
    x = torch.randn(1, 3, 64, 64)
    again, _ = load_segmenter(save_segmenter(tmp_path / "copy", model, card))
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_a_corrupt_or_mismatched_segmenter_is_refused_naming_the_file(tmp_path, trained):
    model, card = load_segmenter(trained)
    folder = save_segmenter(tmp_path / "s", model, card)
    blob = bytearray((folder / WEIGHTS_FILE).read_bytes())
    blob[-10] ^= 0xFF
    (folder / WEIGHTS_FILE).write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=f"{WEIGHTS_FILE}.*sha256"):
        load_segmenter(folder)
    other = save_segmenter(tmp_path / "t", VesselUNet((8, 16, 32)), SegmenterCard(widths=[8, 16, 32]))
    data = json.loads((other / CARD_FILE).read_text())
    data["widths"], data["weights_sha256"] = [8, 16, 24], ""
    (other / CARD_FILE).write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="do not match the architecture"):
        load_segmenter(other)
    (other / CARD_FILE).write_text(json.dumps({**data, "colour": "red"}))
    with pytest.raises(CheckpointError, match=f"{CARD_FILE}.*unknown keys"):
        load_segmenter(other)


def test_segment_slide_covers_the_tissue_at_the_card_resolution(trained, clean_phantom):
    model, card = load_segmenter(trained)
    with open_slide(clean_phantom.path) as slide:
        tissue = detect_tissue(slide)
        maps = segment_slide(slide, model, card, tissue)
        everywhere = segment_slide(slide, model, card)
    side = int(np.ceil(clean_phantom.size_px * slide.mpp / card.mpp))
    assert maps.maps["vessel"].shape == (side, side) and maps.maps["vessel"].dtype == np.uint8
    assert maps.downsample == pytest.approx(card.mpp / slide.mpp)
    ran = maps.maps["lumen"] > 0  # windows not run stay 0; the ones run match the all-windows map exactly
    assert np.array_equal(maps.maps["lumen"][ran], everywhere.maps["lumen"][ran])


def test_the_inference_segmenter_draws_the_same_maps(trained, clean_phantom):
    """BatchNorm folded and channels_last (what predict runs): the same uint8 maps, give or take one level, in fp32;
    in bf16 (predict's default on CPUs that have it) within a few levels of them."""
    from calciscope.model.precision import choose_precision
    from calciscope.model.segmenter import for_inference

    model, card = load_segmenter(trained)
    fast = for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    fp32, bf16 = choose_precision("off", True), choose_precision("bf16", True)
    with open_slide(clean_phantom.path) as slide:
        plain, folded = segment_slide(slide, model, card, precision=fp32), segment_slide(slide, fast, card,
                                                                                          precision=fp32)
        halved = segment_slide(slide, fast, card, precision=bf16)
    for channel in card.channels:
        diff = np.abs(plain.maps[channel].astype(int) - folded.maps[channel])
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, channel
        diff = np.abs(plain.maps[channel].astype(int) - halved.maps[channel])
        assert np.percentile(diff, 99.9) <= 8 and diff.mean() < 0.5, channel


def test_a_manifest_without_vessel_outlines_is_refused(tmp_path, cmu_svs):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path\n{cmu_svs}\n")
    config = tmp_path / "v.yaml"
    config.write_text(yaml.safe_dump({"manifest": str(manifest), "steps": 1}))
    with pytest.raises(CalciscopeError, match="no vessel outlines for CMU-1-Small-Region.svs"):
        train_segmenter(load_config(config))


def test_extra_manifests_add_slides_under_their_folders_name(tmp_path, vessel_phantoms):
    """Two phantom sets both count from phantom_0001: an extra manifest's slide and patient ids get its folder's
    name in front; the first manifest's stay as they are; one id twice is refused, naming it, and so is a
    vessel_sampling name no vessel has."""
    from calciscope.training.segmenter_data import load_slides

    for folder in ("first", "second"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "manifest.csv").write_text("slide_id,patient_id,path\n" + "".join(
            f"phantom_{n:04d},P{n},{s.path}\n" for n, s in enumerate(vessel_phantoms, start=1)))
    config = tmp_path / "v.yaml"
    config.write_text(yaml.safe_dump({"manifest": "first/manifest.csv", "extra_manifests": ["second/manifest.csv"]}))
    slides = load_slides(load_config(config), None, pixels=False)
    assert [(s.slide_id, s.patient_id) for s in slides] == [
        ("phantom_0001", "P1"), ("phantom_0002", "P2"), ("second/phantom_0001", "second/P1"),
        ("second/phantom_0002", "second/P2")]
    assert len(slides[2].vessels) == len(slides[0].vessels) > 0
    config.write_text(yaml.safe_dump({"manifest": "first/manifest.csv",
                                      "extra_manifests": ["second/manifest.csv", "second/manifest.csv"]}))
    with pytest.raises(CalciscopeError, match="slide id 'second/phantom_0001' appears twice"):
        load_slides(load_config(config), None, pixels=False)
    config.write_text(yaml.safe_dump({"manifest": "first/manifest.csv", "vessel_sampling": {"capilary": 3}}))
    with pytest.raises(CalciscopeError, match=r"vessel_sampling names \['capilary'\].*first[/\\]manifest.csv"):
        load_slides(load_config(config), None, pixels=False)  # a misspelt kind would otherwise change nothing
    config.write_text(yaml.safe_dump({"manifest": "first/manifest.csv", "extra_manifests": ["none/manifest.csv"]}))
    with pytest.raises(CalciscopeError, match=r"none[/\\]manifest.csv: no such manifest"):
        load_slides(load_config(config), None, pixels=False)


def _slide_data(slide_id, patient_id, hard_centres=np.zeros((0, 2))):
    from calciscope.training.segmenter_data import SlideData

    rgb = np.full((400, 400, 3), 230, np.uint8)
    target = np.zeros((3, 400, 400), np.uint8)
    return SlideData(slide_id, patient_id, None, rgb, target, np.ones((400, 400), np.uint8),
                      np.ones(3, np.float32), [], 0.5, 2.0, np.asarray(hard_centres, np.float64))


def test_small_vessels_weigh_the_same_at_any_segmenter_mpp():
    """The small-vessel loss weight is set in µm: a 6 µm capillary and a 60 µm arteriole (level 0 at 0.25 µm/px)
    get the same weights, over the same µm² (their outline grown by 3 µm), whether the segmenter trains at 1 or
    0.5 µm/px: round(sqrt(400 µm² / 28 µm²)) = 4 for the capillary, 1 for the arteriole."""
    from calciscope.data.vessels.truth import Vessel
    from calciscope.training.segmenter_data import small_vessel_weight

    angles = np.linspace(0, 2 * np.pi, 64, endpoint=False)

    def circle(cx, cy, diameter_um):  # level-0 px at 0.25 µm/px: the radius is 2 × diameter_um px
        return np.column_stack([cx + 2 * diameter_um * np.cos(angles), cy + 2 * diameter_um * np.sin(angles)])

    vessels = [Vessel("cap", circle(200, 200, 6)), Vessel("art", circle(600, 600, 60))]
    areas = []
    for mpp in (1.0, 0.5):
        ds = mpp / 0.25
        weight = small_vessel_weight(vessels, (int(800 / ds), int(800 / ds)), ds, 8.0, mpp)
        cap, art = weight[: int(400 / ds)], weight[int(400 / ds):]
        assert cap.max() == 4 and art.max() == 1, mpp
        areas.append(np.count_nonzero(cap == 4) * mpp**2)  # rasterised: the edge pixels count whole
    assert areas == pytest.approx([np.pi * (3 + 3) ** 2] * 2, rel=0.2), areas


def test_hard_crops_are_centred_on_the_look_alikes():
    """hard_crop_fraction = 1: every crop holds the annotated look-alike (a dark dot drawn at the hard centre);
    0: crops land anywhere, and most miss it."""
    from calciscope.training.segmenter_data import random_crop

    s = _slide_data("a", "p", [[300.0, 90.0]])
    s.rgb[86:95, 296:305] = 0  # the look-alike, 9 px across
    rng = np.random.default_rng(0)
    hits = [(random_crop(s, rng, 96, 0.0, 1.0)[0] < 40).all(axis=2).any() for _ in range(50)]
    rng = np.random.default_rng(0)
    misses = [(random_crop(s, rng, 96, 0.0, 0.0)[0] < 40).all(axis=2).any() for _ in range(50)]
    assert sum(hits) >= 48 and sum(misses) <= 25


def test_blurred_crops_are_out_of_focus_and_sharp_ones_keep_their_random_stream():
    """blur_fraction = 1: every crop is smoothed (a sharp checkerboard loses most of its edge contrast); 0: no
    extra random draw, so a recipe without blur gets exactly the crops it got before blur existed."""
    from calciscope.training.segmenter_data import random_crop

    s = _slide_data("a", "p")
    s.rgb[:] = np.where((np.add.outer(np.arange(400), np.arange(400)) // 4) % 2 == 0, 40, 220)[..., None]

    def edges(img):
        return np.abs(np.diff(img.astype(np.float32), axis=1)).mean()

    sharp = [random_crop(s, np.random.default_rng(i), 96, 0.0)[0] for i in range(5)]
    blurred = [random_crop(s, np.random.default_rng(i), 96, 0.0, 0.0, 1.0, (2.0, 3.0))[0] for i in range(5)]
    unblurred = [random_crop(s, np.random.default_rng(i), 96, 0.0, 0.0, 0.0, (2.0, 3.0))[0] for i in range(5)]
    assert all(edges(b) < 0.3 * edges(a) for a, b in zip(sharp, blurred))
    assert all(np.array_equal(a, b) for a, b in zip(sharp, unblurred))
    rng_a, rng_b = np.random.default_rng(7), np.random.default_rng(7)
    random_crop(s, rng_a, 96, 0.0), random_crop(s, rng_b, 96, 0.0, 0.0, 0.0)
    assert rng_a.random() == rng_b.random()


def test_vessel_sampling_favours_the_named_kinds_and_findings(tmp_path):
    """A capillary weighted 3 and an inflamed venule weighted 4 (its finding outweighs its kind) beside an unweighted
    arteriole: vessel-centred crops land on them about 3 : 4 : 1, and 1 : 1 : 1 without weights; a weight that is
    not a positive number is refused naming the config file."""
    from calciscope.data.vessels.truth import Vessel
    from calciscope.training.segmenter_data import random_crop, vessel_draw_p

    def ring(x, y):
        t = np.linspace(0, 2 * np.pi, 12, endpoint=False)
        return np.c_[x + 8 * np.cos(t), y + 8 * np.sin(t)]

    vessels = [Vessel("0", ring(100, 100), kind="capillary"), Vessel("1", ring(700, 100), kind="venule",
               findings=("vasculitis",)), Vessel("2", ring(100, 700), kind="arteriole")]
    p = vessel_draw_p(vessels, {"Capillary": 3, "venule": 2, "vasculitis": 4})
    np.testing.assert_allclose(p, [3 / 8, 4 / 8, 1 / 8])
    assert vessel_draw_p(vessels, {}) is None
    def shares(vessel_p):
        s = _slide_data("a", "p")
        s.vessels, s.vessel_p = vessels, vessel_p
        for v, value in zip(vessels, (60, 120, 180)):  # each centre painted its own grey (map px = level 0 / 2)
            c = (v.polygon.mean(axis=0) / 2).astype(int)
            s.rgb[c[1] - 3 : c[1] + 4, c[0] - 3 : c[0] + 4] = value
        rng, counts = np.random.default_rng(1), np.zeros(3)
        for _ in range(400):
            crop = random_crop(s, rng, 48, 1.0)[0].astype(int)
            counts += [np.abs(crop - value).max(axis=2).min() <= 25 for value in (60, 120, 180)]
        return counts / counts.sum()

    np.testing.assert_allclose(shares(p), [3 / 8, 4 / 8, 1 / 8], atol=0.06)
    np.testing.assert_allclose(shares(None), [1 / 3, 1 / 3, 1 / 3], atol=0.06)
    bad = tmp_path / "run.yaml"
    bad.write_text(yaml.safe_dump({"manifest": "m.csv", "vessel_sampling": {"capillary": -1}}))
    with pytest.raises(CalciscopeError, match=r"run\.yaml.*vessel_sampling"):
        load_config(bad)


def test_a_device_this_machine_lacks_is_refused_naming_the_config(tmp_path):
    bad = tmp_path / "run.yaml"
    for device, message in (("cuda:99", "is not available here"), ("gpu please", "is not a device"),
                            ("mps", "is not supported")):
        bad.write_text(yaml.safe_dump({"manifest": "m.csv", "device": device}))
        with pytest.raises(CalciscopeError, match=rf"run\.yaml: device '{device}' {message}"):
            load_config(bad)


def test_a_continued_run_keeps_its_inits_validation_patients():
    from calciscope.training.segmenter_data import split_patients

    slides = [_slide_data(f"s{i}", f"p{i // 2}") for i in range(16)]
    fresh = [split_patients(slides, 0.25, seed)[1] for seed in range(4)]
    assert len({tuple(v) for v in fresh}) > 1  # the seed moves a fresh split ...
    kept = [split_patients(slides, 0.25, seed, ["s2", "s9"])[1] for seed in range(4)]
    assert all(v == [2, 3, 8, 9] for v in kept)  # ... never a continued one: s2, s9 and their patients' slides
    assert split_patients(slides, 0.25, 0, ["elsewhere"]) == split_patients(slides, 0.25, 0)  # an init from other slides: fresh


def test_evaluate_vessels_reports_detection_at_each_filter_setting(capsys, tmp_path, vessel_phantoms):
    """The shipped segmenter (a copy) on two unseen 2048² phantoms: one segmentation, figures per
    min_mean_probability; --apply writes the balanced one into the copy's card, which still loads."""
    import shutil

    from calciscope.cli import main
    from calciscope.data.vessels.truth import read_vessels
    from calciscope.model.demo import demo_model_dir

    mine = tmp_path / "mine"
    shutil.copytree(demo_model_dir() / "vessels", mine)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("slide_id,patient_id,path\n" + "".join(
        f"{s.slide_id},{s.patient_id},{s.path}\n" for s in vessel_phantoms))
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate-vessels", "--segmenter", str(mine), "--data", str(manifest), "--out", str(tmp_path / "ev"),
              "--min-mean-probability", "0", "--min-mean-probability", "0.6", "--apply"])
    assert exit_.value.code == 0
    assert str(tmp_path / "ev" / "detection.json") in capsys.readouterr().out
    report = json.loads((tmp_path / "ev" / "detection.json").read_text())
    loose, shipped = report["by_min_mean_probability"]["0"], report["by_min_mean_probability"]["0.6"]
    n_true = sum(len(read_vessels(s.vessels_path)) for s in vessel_phantoms)
    assert loose["vessels_true"] == shipped["vessels_true"] == n_true > 10
    assert [r["slide_id"] for r in shipped["per_slide"]] == [s.slide_id for s in vessel_phantoms]
    assert shipped["vessels_detected"] <= loose["vessels_detected"]
    assert shipped["recall"] >= 0.6 and shipped["precision"] >= 0.6, shipped
    assert shipped["median_diameter_error"] <= 0.15
    balanced = max(("0", loose), ("0.6", shipped), key=lambda kv: min(kv[1]["recall"], kv[1]["precision"]))[0]
    assert load_segmenter(mine)[1].instance == {"min_mean_probability": float(balanced)}


def test_evaluate_vessels_will_not_write_into_the_shipped_demo(capsys, tmp_path):
    from calciscope.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["evaluate-vessels", "--data", str(tmp_path / "m.csv"), "--out", str(tmp_path), "--apply"])
    assert exit_.value.code != 0 and "copy the demo segmenter" in capsys.readouterr().err


def test_the_balanced_filter_setting_is_chosen():
    from calciscope.training.train_segmenter import best_min_mean_probability

    def fig(recall, precision, count_error):
        return {"recall": recall, "precision": precision, "count_error": count_error}

    report = {"by_min_mean_probability": {"0": fig(0.9, 0.6, 0.4), "0.5": fig(0.85, 0.8, 0.05),
                                          "0.6": fig(0.8, 0.85, -0.05), "0.7": fig(0.7, 0.95, -0.3)}}
    assert best_min_mean_probability(report) == 0.5  # 0.5 and 0.6 tie on min(recall, precision): the lower
    report["by_min_mean_probability"]["0.6"] = fig(0.8, 0.85, -0.01)
    assert best_min_mean_probability(report) == 0.6  # ... unless the other counts closer to the truth


def test_evaluate_vessels_names_a_missing_segmenter(tmp_path, vessel_phantoms):
    from calciscope.training.train_segmenter import evaluate_segmenter

    with pytest.raises(CheckpointError, match="nowhere"):
        evaluate_segmenter(tmp_path / "nowhere", tmp_path / "manifest.csv")


def test_the_segmenter_cards_instance_settings_drive_vessel_analysis(tmp_path, clean_phantom):
    """The instance filter a segmenter was tuned with lives in its card: a stricter one there, fewer vessels in
    predict; an unknown setting is refused naming the card."""
    import shutil

    from calciscope.inference.predict import PredictConfig, Predictor
    from calciscope.model.demo import demo_model_dir

    strict = tmp_path / "strict"
    shutil.copytree(demo_model_dir() / "vessels", strict)
    card = json.loads((strict / CARD_FILE).read_text())
    assert card["instance"] == {"min_mean_probability": 0.6}  # the demo's, tuned on unseen phantoms
    card["instance"] = {"min_mean_probability": 0.97}
    (strict / CARD_FILE).write_text(json.dumps(card))
    counts = {}
    for name, folder in (("demo", "auto"), ("strict", str(strict))):
        predictor = Predictor("demo", PredictConfig(workers=0, saliency="none", top_k=0, vessels=folder))
        counts[name] = len(predictor.predict(clean_phantom.path).vessels.vessels)
    assert 0 < counts["strict"] < counts["demo"], counts
    card["instance"] = {"min_mean_prob": 0.5}
    (strict / CARD_FILE).write_text(json.dumps(card))
    with pytest.raises(CheckpointError, match=f"{CARD_FILE}.*unknown instance settings"):
        load_segmenter(strict)
