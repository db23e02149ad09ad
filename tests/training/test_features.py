"""calciscope features → attention-MIL on the cache → predict, with a small timm ViT whose random weights are saved in
a publisher's layout (UNI's: timm names in pytorch_model.bin); and bad input is one line with nothing written."""

import csv
import dataclasses
import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from calciscope.cli import main
from calciscope.data.synthetic import generate_dataset
from calciscope.model.backbones import register_encoder_backbone
from calciscope.model.encoders import ENCODERS
from calciscope.training.config import load_config
from calciscope.training.train import fit

timm = pytest.importorskip("timm")

TINY = {"img_size": 64, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "init_values": 1e-5,
        "num_classes": 0, "dynamic_img_size": True}


@pytest.fixture(scope="module")
def tiny_uni(tmp_path_factory):
    """A 2-block ViT registered as encoder 'tiny-uni' (UNI's layout and preprocessing, 64 px), its random weights
    saved as the publisher saves UNI's: a torch state dict with timm's names."""
    spec = register_encoder_backbone(dataclasses.replace(
        ENCODERS["uni"], name="tiny-uni", arch="vit_small_patch16_224", timm_kwargs=TINY, embed_dim=32,
        input_px=64, resize_px=64, mpp=1.0))
    torch.manual_seed(0)
    net = timm.create_model(spec.arch, pretrained=False, **TINY)
    folder = tmp_path_factory.mktemp("tiny_uni")
    torch.save(net.state_dict(), folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin"


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    out = tmp_path_factory.mktemp("feature_phantoms")
    return generate_dataset(out, 8, size_px=768, seed=11, artifacts=False, slides_per_patient=1, style="classic",
                            prevalence={"thrombosis": 0.5, "medial_calcification": 0.5,
                                        "small_vessel_calcification": 0.5, "vasculitis": 0.5})


def run_cli(args, capsys) -> tuple[int, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_features_then_mil_then_predict_end_to_end(tmp_path, slides, tiny_uni, capsys):
    feats = tmp_path / "features"
    args = ["features", str(slides), "--encoder", "tiny-uni", "--weights", str(tiny_uni), "--out", str(feats),
            "--mpp", "1.0", "--tile-px", "64", "--workers", "0", "--device", "cpu"]
    code, text = run_cli(args, capsys)
    assert code == 0, text
    assert "features: 8/8 slides" in text
    files = sorted(feats.glob("*.safetensors"))
    held = json.loads((feats / "features.json").read_text())
    assert len(files) == 8 and held["encoder"] == "tiny-uni" and held["embed_dim"] == 32
    rows = list(csv.DictReader(open(feats / "index.csv")))
    assert [r["slide_id"] for r in rows] == [f"phantom_{i:04d}" for i in range(1, 9)]
    bag = load_file(feats / rows[0]["file"])
    assert bag["embeddings"].shape[1] == 32 and bag["level0_xy"].shape == (len(bag["embeddings"]), 2)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert run_cli(args, capsys)[0] == 0  # a rerun resumes: every slide is cached, nothing is rewritten
    assert {f: f.stat().st_mtime_ns for f in files} == stamps

    config = {"out": str(tmp_path / "run"), "seed": 1,
              "data": {"source": "slide_labels", "manifest": str(slides), "encoder": "tiny-uni",
                       "encoder_weights": str(tiny_uni), "cache_dir": str(feats), "mpp": 1.0, "tile_px": 64},
              "split": {"val_fraction": 0.25}, "optim": {"epochs": 3, "batch_size": 4, "workers": 0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run = fit(load_config(tmp_path / "run.yaml"), show_progress=False)
    card = json.loads((run / "model" / "model.json").read_text())
    assert card["backbone"] == "tiny-uni" and card["head"] == "mil"
    assert card["head_config"]["encoder_weights"] == str(tiny_uni.resolve())
    assert card["extra"]["encoder"]["input_px"] == 64 and card["mean"] == list(ENCODERS["uni"].mean)
    assert not any(k.startswith("backbone.") for k in load_file(run / "model" / "model.safetensors"))
    assert sorted(feats.glob("*.safetensors")) == files  # training read the cache, it encoded nothing

    import calciscope

    slide = slides.parent / "phantom_0001.tiff"
    result = calciscope.predict_slide(slide, model=run / "model", out=tmp_path / "pred", workers=0, saliency="none",
                                      vessels="none")
    assert set(result.probabilities) == set(card["labels"])
    tiles = list(csv.DictReader(open(tmp_path / "pred" / "phantom_0001" / "tiles.csv")))
    assert tiles and "attention_thrombosis" in tiles[0]
    assert (tmp_path / "pred" / "phantom_0001" / "heatmap_thrombosis.png").is_file()


def test_bad_encoder_input_is_one_line_and_writes_nothing(tmp_path, slides, tiny_uni, capsys):
    out = tmp_path / "f"
    base = ["features", str(slides), "--out", str(out), "--mpp", "1.0", "--tile-px", "64", "--workers", "0"]
    cases = [
        (["--encoder", "uni", "--weights", str(tiny_uni)], "does not hold uni weights"),
        (["--encoder", "tiny-uni", "--weights", str(tmp_path / "nowhere.bin")], "weights for encoder 'tiny-uni' not found"),
        (["--encoder", "unii", "--weights", str(tiny_uni)], "unknown"),
    ]
    for extra, message in cases:
        code, text = run_cli(base + extra, capsys)
        assert code == 1 and message in text and len(text.strip().splitlines()) == 1, text
        assert not out.exists()


def test_a_cache_written_by_another_encoder_is_refused(tmp_path, slides, tiny_uni, capsys):
    out = tmp_path / "f"
    first = list(csv.DictReader(open(slides)))[0]["path"]
    args = ["features", str(slides.parent / first), "--out", str(out), "--mpp", "1.0", "--tile-px", "64",
            "--workers", "0", "--encoder", "tiny-uni"]
    assert run_cli(args + ["--weights", str(tiny_uni)], capsys)[0] == 0
    other = tmp_path / "other.bin"
    state = torch.load(tiny_uni, weights_only=True)
    torch.save({k: v + 1 for k, v in state.items()}, other)
    before = sorted(p.name for p in out.iterdir())
    code, text = run_cli(args + ["--weights", str(other)], capsys)
    assert code == 1 and "features.json: this cache was written by encoder 'tiny-uni'" in text
    assert sorted(p.name for p in out.iterdir()) == before


def test_an_mlp_tile_head_trains_on_the_frozen_encoders_cached_embeddings(tmp_path, slides, tiny_uni):
    import cv2

    from calciscope.data.slides import open_slide
    from calciscope.data.tiling import TilingConfig, make_grid
    from calciscope.model import load_checkpoint

    root = tmp_path / "tiles"
    for row in csv.DictReader(open(slides)):
        cls = "thrombus_slide" if row["thrombosis"] == "1" else "other_slide"
        (root / cls).mkdir(parents=True, exist_ok=True)
        with open_slide(slides.parent / row["path"]) as slide:
            grid = make_grid(slide, None, TilingConfig(mpp=1.0, tile_px=64))
            for i in range(0, len(grid), 4):
                cv2.imwrite(str(root / cls / f"{row['slide_id']}_{i}.png"), grid.read(slide, i)[..., ::-1])
    config = {"out": str(tmp_path / "run"), "data": {"source": "tiles", "tiles": str(root), "encoder": "tiny-uni",
                                                      "encoder_weights": str(tiny_uni), "mpp": 1.0, "tile_px": 64},
              "model": {"hidden_dim": 16}, "optim": {"epochs": 2, "batch_size": 16, "workers": 0}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run = fit(load_config(tmp_path / "run.yaml"), show_progress=False)
    assert len(list((run / "embeddings").glob("tiles-*.safetensors"))) == 1  # every tile embedded once
    model, card = load_checkpoint(run / "model")
    assert card.backbone == "tiny-uni" and card.head == "tile" and card.head_config["tile_hidden_dim"] == 16
    assert model(torch.rand(3, 3, 64, 64)).shape == (3, 2)  # the saved model embeds tiles with the encoder
