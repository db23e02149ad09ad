"""calciscope.training.train: the recipe runs, learns, writes its files, resumes exactly, refuses bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from calciscope.cli import main
from calciscope.data.synthetic import generate_dataset
from calciscope.errors import CalciscopeError
from calciscope.training.config import load_config
from calciscope.training.train import fit


@pytest.fixture(scope="module")
def small_manifest(tmp_path_factory) -> Path:
    """12 phantoms of 1024² (0.5 × 0.5 mm), 2 per patient, every finding present in some slides."""
    out = tmp_path_factory.mktemp("train_phantoms")
    return generate_dataset(out, 12, size_px=1024, seed=5, artifacts=False,
                            prevalence={"medial_calcification": 0.5, "small_vessel_calcification": 0.5,
                                        "thrombosis": 0.5, "vasculitis": 0.5})


def write_config(tmp_path: Path, manifest: Path, **overrides) -> Path:
    config = {
        "out": str(tmp_path / "run"),
        "seed": 3,
        "data": {"source": "slides", "manifest": str(manifest), "mpp": 1.0, "tile_px": 64, "min_tissue": 0.3},
        "split": {"val_fraction": 0.34},
        "model": {"backbone": "tiny"},
        "optim": {"epochs": 3, "batch_size": 32, "lr": 0.003, "workers": 0, "patience": 0},
        "augment": {"hed_jitter": 0.03, "blur_prob": 0.0, "jpeg_prob": 0.0},
    }
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_short_run_learns_and_writes_its_files(tmp_path, small_manifest):
    run = fit(load_config(write_config(tmp_path, small_manifest, **{"optim.epochs": 4})), show_progress=False)
    history = list(csv.DictReader(open(run / "metrics.csv")))
    losses = [float(row["train_loss"]) for row in history]
    assert len(history) == 4 and losses[-1] < losses[0]
    for name in ("config.yaml", "splits.json", "metrics.json", "roc.png", "reliability.png",
                 "model/model.safetensors", "model/model.json", "last/state.pt"):
        assert (run / name).is_file(), name
    card = json.loads((run / "model" / "model.json").read_text())
    assert card["labels"] == ["medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis"]
    assert set(card["thresholds"]) == set(card["labels"]) and set(card["temperature"]) == set(card["labels"])
    assert card["tile_px"] == 64 and card["mpp"] == 1.0 and card["backbone"] == "tiny"
    assert card["training"]["data_hashes"]["manifest"]
    ood = card["ood_reference"]  # the training tiles' reference, calibrated on the validation slides' tiles
    assert ood["unit"] == "tile" and ood["dim"] == card["embed_dim"] and ood["fit"]["n_validation_slides"] == 4
    report = json.loads((run / "metrics.json").read_text())["folds"][0]["val"]
    assert {"examples", "slides"} <= set(report)
    assert "cua_pattern" in report["slides"]
    splits = json.loads((run / "splits.json").read_text())
    patients = {row["slide_id"]: row["patient_id"] for row in csv.DictReader(open(small_manifest))}
    train_p = {patients[s] for s in splits["folds"][0]["train"]}
    val_p = {patients[s] for s in splits["folds"][0]["val"]}
    assert train_p and val_p and not train_p & val_p


def test_resume_after_a_killed_run_ends_with_the_same_weights(tmp_path, small_manifest):
    config = {"optim.epochs": 3, "optim.batch_size": 8}
    straight = fit(load_config(write_config(tmp_path / "a", small_manifest, **config)), show_progress=False)

    cfg = write_config(tmp_path / "b", small_manifest, **config)
    proc = subprocess.Popen([sys.executable, "-m", "calciscope", "train", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # kill it as soon as the first epoch is saved: it dies inside epoch 2
        if line.startswith("epoch 1:"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    run = tmp_path / "b" / "run"
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model").exists()
    fit(None, resume=run, show_progress=False)

    for name in ("last", "model"):
        if name == "last":
            import torch

            a = torch.load(straight / "last" / "state.pt", weights_only=True)["model"]
            b = torch.load(run / "last" / "state.pt", weights_only=True)["model"]
        else:
            a, b = load_file(straight / "model" / "model.safetensors"), load_file(run / "model" / "model.safetensors")
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k].float().numpy(), b[k].float().numpy()) for k in a), name


def test_evaluate_writes_the_same_metric_files(tmp_path, small_manifest, capsys):
    run = fit(load_config(write_config(tmp_path, small_manifest, **{"optim.epochs": 1})), show_progress=False)
    try:
        main(["evaluate", "--model", str(run / "model"), "--data", str(small_manifest), "--out", str(tmp_path / "ev"),
              "--workers", "0"])
    except SystemExit as exc:
        assert exc.code == 0
    report = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert report["slides"]["n_slides"] == 12
    assert (tmp_path / "ev" / "roc.png").is_file() and (tmp_path / "ev" / "reliability.png").is_file()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.backbone": "resnet9000"}, "unknown backbone 'resnet9000'"),
        ({"data.labels": ["thrombosis", "calcinosis_cutis"]}, "unknown label"),
        ({"optim.amp": "fp8"}, "optim.amp"),
        ({"optim.epochs": 0}, "epochs"),
        ({"optim.lr": "fast"}, "optim.lr"),
        ({"optim.learning_rate": 0.1}, "unknown key"),
    ],
)
def test_bad_configs_give_one_clear_message(tmp_path, small_manifest, overrides, message):
    with pytest.raises(CalciscopeError, match=message):
        fit(load_config(write_config(tmp_path, small_manifest, **overrides)), show_progress=False)


def test_a_manifest_naming_a_missing_slide_is_refused(tmp_path, small_manifest):
    rows = list(csv.DictReader(open(small_manifest)))
    rows[3]["path"] = "gone.tiff"
    bad = small_manifest.parent / "bad_manifest.csv"
    with open(bad, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(CalciscopeError, match=r"bad_manifest.csv row 5: slide file .*gone.tiff does not exist"):
        fit(load_config(write_config(tmp_path, bad)), show_progress=False)


def test_fixed_splits_that_share_a_patient_are_refused(tmp_path, small_manifest):
    rows = list(csv.DictReader(open(small_manifest)))
    for i, row in enumerate(rows):
        row["split"] = "train" if i % 2 == 0 else "val"  # each patient's 2 slides land in train and val
    bad = small_manifest.parent / "overlap_manifest.csv"
    with open(bad, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=rows[0].keys())
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(CalciscopeError, match="P0001"):
        fit(load_config(write_config(tmp_path, bad)), show_progress=False)


def test_a_new_run_never_overwrites_an_old_one(tmp_path, small_manifest):
    config = write_config(tmp_path, small_manifest, **{"optim.epochs": 1})
    fit(load_config(config), show_progress=False)
    with pytest.raises(CalciscopeError, match="already holds a run"):
        fit(load_config(config), show_progress=False)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="torchrun needs a POSIX system")
def test_ddp_with_two_gloo_processes(tmp_path, small_manifest):
    cfg = write_config(tmp_path, small_manifest, **{"optim.epochs": 2})
    result = subprocess.run(
        # --standalone: the rendezvous takes a free port (a fixed one collides with whatever else holds it)
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "calciscope", "train", "--config", str(cfg), "--quiet"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "run"
    history = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(history) == 2
    assert (run / "model" / "model.safetensors").is_file()


def test_k_fold_cross_validation_reports_mean_and_sd(tmp_path, small_manifest):
    run = fit(load_config(write_config(tmp_path, small_manifest, **{"optim.epochs": 1, "split.folds": 2})),
              show_progress=False)
    summary = json.loads((run / "metrics.json").read_text())
    assert len(summary["folds"]) == 2 and summary["model_from_fold"] in (0, 1)
    auroc = summary["cross_validation"]["examples"]["macro"]["auroc"]
    assert set(auroc) == {"mean", "sd", "n"} and auroc["n"] == 2
    assert (run / "fold0" / "model" / "model.json").is_file() and (run / "model" / "model.json").is_file()


def test_slide_labels_train_an_attention_mil_model(tmp_path, small_manifest):
    run = fit(load_config(write_config(tmp_path, small_manifest, **{
        "data.source": "slide_labels", "data.encoder": "tiny", "optim.epochs": 2, "optim.batch_size": 4})),
        show_progress=False)
    from calciscope.model import load_checkpoint

    model, card = load_checkpoint(run / "model")
    assert card.head == "mil" and card.backbone == "tiny"
    assert card.ood().fit["n_validation_slides"] >= 1  # from the cached bag embeddings, one bag per slide
    assert len(list((run / "embeddings").glob("*.safetensors"))) == 12  # one cached bag per slide
    report = json.loads((run / "metrics.json").read_text())["folds"][0]["val"]
    assert report["examples"]["per_label"]["thrombosis"]["n"] == len(json.loads((run / "splits.json").read_text())["folds"][0]["val"])


def test_tiles_already_cut_train_a_multiclass_model(tmp_path, small_manifest):
    import cv2

    from calciscope.data.slides import open_slide
    from calciscope.data.tiling import TilingConfig, make_grid

    root = tmp_path / "tiles"
    rows = list(csv.DictReader(open(small_manifest)))
    for row in rows:  # a public-dataset-like ImageFolder: tiles of thrombosis-positive vs negative slides
        cls = "thrombus_slide" if row["thrombosis"] == "1" else "other_slide"
        (root / cls).mkdir(parents=True, exist_ok=True)
        with open_slide(small_manifest.parent / row["path"]) as slide:
            grid = make_grid(slide, None, TilingConfig(mpp=1.0, tile_px=64))
            for i in range(0, len(grid), 3):
                cv2.imwrite(str(root / cls / f"{row['slide_id']}_{i}.png"), grid.read(slide, i)[..., ::-1])
    run = fit(load_config(write_config(tmp_path, small_manifest, **{
        "data.source": "tiles", "data.tiles": str(root), "data.labels": ["other_slide", "thrombus_slide"],
        "optim.epochs": 1})), show_progress=False)
    card = json.loads((run / "model" / "model.json").read_text())
    assert card["labels"] == ["other_slide", "thrombus_slide"]
    assert card["ood_reference"]["slide_threshold"] == 0.25  # tiles without slides: the floor
    assert json.loads((run / "splits.json").read_text())["data"]["multiclass"] is True


def test_hard_negative_mining_picks_the_top_scored_negatives_of_the_training_slides(tmp_path, small_manifest):
    import torch

    from calciscope.data.slides import open_slide
    from calciscope.model import IMAGENET_MEAN, IMAGENET_STD, create_model
    from calciscope.model.precision import choose_precision
    from calciscope.training.data import load_data
    from calciscope.training.train import mine_hard_negatives

    config = load_config(write_config(tmp_path, small_manifest, **{
        "data.negatives_per_slide": 4, "mining.epochs": [2], "mining.top_fraction": 0.1}))
    data = load_data(config)
    examples = data.examples
    units = np.arange(8)
    torch.manual_seed(0)
    model = create_model("tiny", data.labels).eval()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    mined = mine_hard_negatives(model, data, units, config, choose_precision("off", False), mean, std)

    # score every tile of the 8 slides independently, straight from the slide files
    pool = examples.tiles_of(units)
    images = []
    for m in pool:
        s = examples.slide_index[m]
        with open_slide(examples.slides[s].path) as slide:
            images.append(examples.grids[s].read(slide, int(examples.tile_index[m])))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255)
    with torch.no_grad():
        scores = model((x - mean) / std).numpy()
    expected = set()
    for j in range(len(data.labels)):
        negatives = pool[examples.labels[pool, j] == 0]
        n = int(np.ceil(0.1 * len(negatives)))
        top = negatives[np.argsort(-scores[np.searchsorted(pool, negatives), j], kind="stable")[:n]]
        expected |= set(top.tolist())
    assert set(mined.tolist()) == expected and len(mined) >= 4
    assert not examples.trainable[mined].all()  # negatives dropped by negatives_per_slide come back when hard


def test_mining_and_slide_calibration_in_a_run_are_reproducible_and_land_in_the_card(tmp_path, small_manifest):
    import torch

    overrides = {"optim.epochs": 3, "data.negatives_per_slide": 4, "mining.epochs": [2], "mining.top_fraction": 0.1,
                 "mining.weight": 3.0, "calibration.slide": True}
    runs = [fit(load_config(write_config(tmp_path / name, small_manifest, **overrides)), show_progress=False)
            for name in ("a", "b")]
    states = [torch.load(run / "last" / "state.pt", weights_only=True) for run in runs]
    assert states[0]["mined"] == states[1]["mined"] and len(states[0]["mined"]) > 0
    a, b = (load_file(run / "model" / "model.safetensors") for run in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((runs[0] / "model" / "model.json").read_text())
    assert set(card["slide_calibration"]) == set(card["labels"])
    assert all(p["a"] > 0 for p in card["slide_calibration"].values())
    assert set(card["extra"]["tile_thresholds"]) == set(card["labels"])  # card thresholds are now slide thresholds
    assert (runs[0] / "reliability_slides.png").is_file()
    assert card["training"]["config"]["mining"]["epochs"] == [2]


def test_vessel_sampling_trains_on_tiles_centred_on_every_vessel(tmp_path, small_manifest):
    """data.sampling vessels: one tile per vessel that fits a tile, labelled with the vessel's own findings;
    "both" adds them to the grid; model.init starts from a checkpoint's weights."""
    from calciscope.data.vessels.truth import read_vessels
    from calciscope.training.sources import build_tile_examples, read_manifest

    config = load_config(write_config(tmp_path, small_manifest, **{"data.sampling": "vessels"}))
    records = read_manifest(small_manifest, config.data.labels)
    examples = build_tile_examples(records[:3], config)
    labels = config.data.labels
    for s, record in enumerate(records[:3]):
        vessels = read_vessels(record.vessels)
        grid = examples.grids[s]
        centre = np.flatnonzero(grid.colrow[:, 1] == 0)
        assert len(centre) == len(vessels)
        for m, v in zip(centre, vessels):
            y = examples.labels[examples.slide_index == s][m]
            assert all(y[labels.index(f)] == 1 for f in v.findings if f in labels)
    both = build_tile_examples(records[:3], load_config(write_config(tmp_path / "b", small_manifest,
                                                                       **{"data.sampling": "both"})))
    assert len(both.labels) > len(examples.labels)
    run = fit(load_config(write_config(tmp_path / "c", small_manifest, **{"optim.epochs": 1})), show_progress=False)
    tuned = fit(load_config(write_config(tmp_path / "d", small_manifest, **{
        "optim.epochs": 1, "optim.lr": 1e-9, "optim.warmup_epochs": 0.0, "data.sampling": "both",
        "model.init": str(run / "model")})), show_progress=False)
    before, after = load_file(run / "model" / "model.safetensors"), load_file(tuned / "model" / "model.safetensors")
    convs = [k for k in before if k.startswith("backbone.") and k.endswith("weight") and before[k].ndim == 4]
    assert convs and all(np.allclose(before[k].numpy(), after[k].numpy(), atol=1e-5) for k in convs)
    fresh = load_file(fit(load_config(write_config(tmp_path / "e", small_manifest, **{
        "optim.epochs": 1, "optim.lr": 1e-9, "optim.warmup_epochs": 0.0})), show_progress=False)
        / "model" / "model.safetensors")
    assert not all(np.allclose(before[k].numpy(), fresh[k].numpy(), atol=1e-5) for k in convs)


def test_vessel_sampling_without_vessel_outlines_is_refused(tmp_path, small_manifest):
    rows = list(csv.DictReader(open(small_manifest)))
    for row in rows[1:]:
        row["path"] = str((small_manifest.parent / row["path"]).resolve())
        row["annotations"] = str((small_manifest.parent / row["annotations"]).resolve())
    rows[0]["path"] = str((small_manifest.parent / rows[0]["path"]).resolve())
    copy_dir = tmp_path / "elsewhere"
    copy_dir.mkdir()
    import shutil

    shutil.copy(rows[0]["path"], copy_dir / "lonely.tiff")
    rows = [{**rows[0], "path": str(copy_dir / "lonely.tiff"), "slide_id": "lonely",
             "annotations": str((small_manifest.parent / rows[0]["annotations"]).resolve())}] + rows[1:]
    bad = tmp_path / "manifest.csv"
    with open(bad, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(CalciscopeError, match="lonely.tiff: data.sampling 'vessels' needs vessel outlines"):
        fit(load_config(write_config(tmp_path, bad, **{"data.sampling": "vessels"})), show_progress=False)
