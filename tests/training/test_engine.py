"""training.engine: the one loop every trainer runs on (resume, early stopping, metrics.csv, config.yaml), and the
vessel trainers on it: a stopped run resumes to the weights an unbroken one ends with."""

import csv
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from calciscope.data.synthetic import generate_slide
from calciscope.training.engine import EpochStats, RunFolder, Trainer, load_state, run_epochs, run_steps

LABELS = ["medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis"]


class _Stop(Exception):
    pass


class _Toy(Trainer):
    """Fits y = 2x with SGD; the validation score is a fixed list, so early stopping is predictable."""

    def __init__(self, scores, patience=0, stop_at=None):
        torch.manual_seed(0)
        self.model = torch.nn.Linear(1, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: 1.0)
        self.scores, self.patience, self.stop_at, self.epochs = scores, patience, stop_at, len(scores)
        self.improved = []

    def train_epoch(self, epoch):
        if epoch == self.stop_at:
            raise _Stop
        x = torch.linspace(-1, 1, 8).view(-1, 1)

        def loss(step):
            return torch.nn.functional.mse_loss(self.model(x), 2 * x), len(x)

        return run_steps(range(3), loss, self.optimizer, self.scheduler)

    def validate(self, epoch, stats):
        return {"epoch": epoch + 1, "train_loss": stats.loss, "score": self.scores[epoch]}

    def on_improved(self, epoch):
        self.improved.append(epoch)

    def state(self):
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state(self, state):
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


def test_run_steps_steps_the_optimizer_every_accumulate_batches_and_at_the_end():
    model = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def loss(step):
        return model(torch.ones(2, 1)).sum(), 2

    stats = run_steps(range(10), loss, optimizer, scheduler, accumulate=4, n_batches=5)
    assert isinstance(stats, EpochStats) and stats.samples == 10 and len(stats.losses) == 5
    assert scheduler.last_epoch == 2  # after batch 4 and after the last (5th)


def test_early_stopping_keeps_the_best_and_writes_one_row_per_epoch(tmp_path):
    trainer = _Toy([0.5, 0.7, 0.6, 0.65, 0.9], patience=2)
    state = run_epochs(trainer, RunFolder(tmp_path))
    assert trainer.improved == [0, 1] and state["epoch"] == 3 and state["best"] == 0.7  # epoch 5 never runs
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2", "3", "4"] and "score" not in rows[0]
    assert load_state(tmp_path / "last" / "state.pt")["epoch"] == 3  # read back with weights_only=True


def test_a_stopped_loop_resumes_where_it_stopped_and_ends_like_an_unbroken_one(tmp_path):
    straight = _Toy([0.1, 0.2, 0.3, 0.4])
    run_epochs(straight, RunFolder(tmp_path / "a"))
    with pytest.raises(_Stop):
        run_epochs(_Toy([0.1, 0.2, 0.3, 0.4], stop_at=2), RunFolder(tmp_path / "b"))
    resumed = _Toy([0.1, 0.2, 0.3, 0.4])
    state = run_epochs(resumed, RunFolder(tmp_path / "b"))
    assert resumed.improved == [2, 3] and len(state["history"]) == 4
    assert torch.equal(straight.model.weight, resumed.model.weight)
    assert (tmp_path / "a" / "metrics.csv").read_text().count("\n") == 5


def _stop_at(prefix=None):
    """A progress callback that stops the run at the line starting with ``prefix`` (None: at the last step's)."""
    def progress(line):
        if line.startswith("step "):
            done, total = line.split()[1].split("/")
            if (prefix is None and done == total) or (prefix is not None and line.startswith(prefix)):
                raise _Stop

    return progress


def test_a_stopped_segmenter_run_resumes_to_the_weights_of_an_unbroken_one(tmp_path, vessel_phantoms):
    from calciscope.training.train_segmenter import load_config, train_segmenter

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("slide_id,patient_id,path\n" + "".join(
        f"{s.slide_id},{s.patient_id},{s.path}\n" for s in vessel_phantoms))
    settings = {"manifest": "manifest.csv", "steps": 60, "batch_size": 2, "crop_px": 64, "widths": [8, 16],
                "val_fraction": 0.0, "device": "cpu"}
    folders = {}
    for name, every in (("one_chunk", 500), ("straight", 20), ("stopped", 20)):
        config = tmp_path / f"{name}.yaml"
        config.write_text(yaml.safe_dump(settings | {"out": str(tmp_path / name), "checkpoint_every": every}))
        if name == "stopped":
            with pytest.raises(_Stop):  # dies in the third chunk: the state holds steps 1-40
                train_segmenter(load_config(config), _stop_at("step 50/"))
            assert load_state(tmp_path / name / "last" / "state.pt")["epoch"] == 1
            assert not (tmp_path / name / "segmenter.json").exists()
            folders[name] = train_segmenter(None, resume=tmp_path / name)
        else:
            folders[name] = train_segmenter(load_config(config))
    weights = {name: load_file(folder / "segmenter.safetensors") for name, folder in folders.items()}
    for name in ("straight", "stopped"):  # resume points do not change the random stream
        assert all(torch.equal(weights["one_chunk"][k], weights[name][k]) for k in weights["one_chunk"]), name
    folder = folders["stopped"]
    assert yaml.safe_load((folder / "config.yaml").read_text())["checkpoint_every"] == 20
    assert len(list(csv.DictReader(open(folder / "metrics.csv")))) == 3
    assert not (folder / "last").exists()  # the deliverable is written: no resume state left in it
    card = json.loads((folder / "segmenter.json").read_text())
    assert card["metrics"]["train_loss_end"] == json.loads(
        (folders["straight"] / "segmenter.json").read_text())["metrics"]["train_loss_end"]


@pytest.fixture(scope="module")
def classifier_manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier_resume")
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "patient_id", "path", *LABELS])
        for seed in (9301, 9302, 9303, 9304):
            labels = {k: seed % 2 for k in LABELS}
            slide = generate_slide(root, f"c{seed}", labels, size_px=1024, seed=seed, artifacts=False)
            w.writerow([slide.slide_id, slide.slide_id, slide.path.name, *labels.values()])
    return root / "manifest.csv"


def test_a_stopped_classifier_run_resumes_to_the_weights_of_an_unbroken_one(tmp_path, classifier_manifest):
    from calciscope.training.train_classifier import ClassifierTrainConfig, train_classifier

    def config(name):
        return ClassifierTrainConfig(manifests=[str(classifier_manifest)], out=str(tmp_path / name), segmenter=None,
                                     widths=[8, 16], crop={"crop_px": 32}, copies=2, epochs=3, batch_size=16,
                                     val_fraction=0.5, seed=3, device="cpu")

    straight = train_classifier(config("straight"))
    with pytest.raises(_Stop):  # the last step's line: epochs 1 and 2 are saved
        train_classifier(config("stopped"), _stop_at())
    assert load_state(tmp_path / "stopped" / "last" / "state.pt")["epoch"] == 1
    resumed = train_classifier(None, resume=tmp_path / "stopped")
    a, b = load_file(straight / "classifier.safetensors"), load_file(resumed / "classifier.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    cards = [json.loads((f / "classifier.json").read_text()) for f in (straight, resumed)]
    assert cards[0]["temperature"] == cards[1]["temperature"]
    rows = list(csv.DictReader(open(resumed / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2", "3", ""] and np.isfinite(float(rows[-1]["val_vessels_auroc_macro"]))
