"""ONNX export and the onnxruntime tile runner: same tile probabilities as torch on phantom tiles, the card inside
the file, any batch size, one CheckpointError line for a bad file, and no torch on the scoring path."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install onnxruntime)")
pytest.importorskip("onnxscript", reason="onnxscript not installed (the torch.export-based ONNX exporter needs it)")

from calciscope.data.slides import open_slide  # noqa: E402
from calciscope.data.synthetic import generate_slide  # noqa: E402
from calciscope.data.tiling import TilingConfig, make_grid  # noqa: E402
from calciscope.data.tissue import TissueConfig, detect_tissue  # noqa: E402
from calciscope.errors import CalciscopeError, CheckpointError  # noqa: E402
from calciscope.inference import onnx_runtime  # noqa: E402
from calciscope.inference.onnx_runtime import OnnxTileRunner, export_onnx  # noqa: E402
from calciscope.inference.predict import PredictConfig, Predictor  # noqa: E402
from calciscope.model import ModelCard, create_model, load_card, save_checkpoint  # noqa: E402
from calciscope.model.demo import demo_model_dir  # noqa: E402
from calciscope.training.engine import prepare_inputs  # noqa: E402

LABELS = ["medial_calcification", "small_vessel_calcification", "thrombosis", "vasculitis"]
TOL = 1e-4


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    """A 1024² phantom (0.5 µm/px) with every finding drawn."""
    return generate_slide(tmp_path_factory.mktemp("onnx_phantom"), "x", dict.fromkeys(LABELS, 1), size_px=1024,
                          seed=5)


def phantom_tiles(slide, tile_px: int, mpp: float) -> np.ndarray:
    """Every tissue tile of the phantom as the predictor reads them: uint8 (N, 3, tile_px, tile_px)."""
    with open_slide(slide.path) as s:
        grid = make_grid(s, detect_tissue(s, TissueConfig()), TilingConfig(mpp=mpp, tile_px=tile_px, min_tissue=0.25))
        tiles = np.stack([grid.read(s, i) for i in range(len(grid))])
    return np.ascontiguousarray(tiles.transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    model = create_model("tiny", LABELS).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them must be right
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    card = ModelCard(name="tiny-onnx", labels=LABELS, backbone="tiny", tile_px=64, mpp=1.0,
                     mean=[0.7, 0.5, 0.7], std=[0.15, 0.2, 0.1],
                     thresholds={"thrombosis": 0.4}, temperature={"vasculitis": 2.0, "thrombosis": 0.7})
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", model, card)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("onnx")
    return {"demo": (demo_model_dir(), export_onnx("demo", root / "demo.onnx")),
            "tiny": (tiny_checkpoint, export_onnx(tiny_checkpoint, root / "sub" / "tiny.onnx"))}


def torch_logits(predictor: Predictor, tiles: np.ndarray) -> np.ndarray:
    """The Predictor's own fp32 path: prepare_inputs -> BatchNorm-folded backbone -> head."""
    with torch.inference_mode():
        x = prepare_inputs(torch.from_numpy(tiles), predictor.mean, predictor.std, predictor.precision)
        return predictor.model.head(predictor.backbone(x)).float().numpy()


@pytest.mark.parametrize("name", ["demo", "tiny"])
def test_onnxruntime_matches_torch_on_phantom_tiles(name, exported, slide):
    checkpoint, path = exported[name]
    runner = OnnxTileRunner(path)
    predictor = Predictor(checkpoint, PredictConfig(device="cpu", amp="off", workers=0))
    tiles = phantom_tiles(slide, runner.tile_px, runner.mpp)
    assert len(tiles) >= 8

    want = torch_logits(predictor, tiles)
    got = runner(tiles)
    assert got.dtype == np.float32 and got.shape == (len(tiles), len(LABELS))
    assert np.abs(got - want).max() <= TOL
    probs = runner.probabilities(tiles)
    want_probs = torch.sigmoid(torch.from_numpy(want) / predictor.temperature).numpy()
    assert np.abs(probs - want_probs).max() <= TOL
    assert want.std() > 0.05  # real, varied outputs, not a constant compared with itself

    for n in (1, 7):  # the batch axis is dynamic, and a tile's output does not depend on its batch
        assert runner(tiles[:n]).shape == (n, len(LABELS))
        assert np.abs(runner(tiles[:n]) - got[:n]).max() <= 1e-5
    assert runner(tiles[:0]).shape == (0, len(LABELS))
    assert runner.export_check["max_scaled_abs_diff"] <= TOL


def test_the_card_travels_inside_the_onnx_file(exported):
    checkpoint, path = exported["tiny"]
    runner = OnnxTileRunner(path, threads=1)
    card = load_card(checkpoint)
    assert runner.output == "logits" and runner.threads == 1
    assert runner.labels == card.labels and runner.tile_px == 64 and runner.mpp == 1.0
    assert runner.mean == card.mean and runner.std == card.std
    assert runner.temperature.tolist() == pytest.approx([1.0, 1.0, 0.7, 2.0])
    assert runner.thresholds == {"medial_calcification": 0.5, "small_vessel_calcification": 0.5,
                                 "thrombosis": 0.4, "vasculitis": 0.5}
    assert runner.card.to_dict() == card.to_dict()  # the full, validated ModelCard, weights hash included
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.onnx"]  # one file, no temporary left behind


def test_a_mil_model_exports_tile_embeddings(tmp_path, slide):
    torch.manual_seed(0)
    model = create_model("tiny", LABELS, head="mil").eval()
    checkpoint = save_checkpoint(tmp_path / "mil", model,
                                 ModelCard(name="mil", labels=LABELS, backbone="tiny", tile_px=64, mpp=1.0, head="mil"))
    runner = OnnxTileRunner(export_onnx(checkpoint, tmp_path / "mil.onnx"))
    tiles = phantom_tiles(slide, 64, 1.0)[:7]
    with torch.inference_mode():
        mean, std = torch.tensor(runner.mean).view(1, 3, 1, 1), torch.tensor(runner.std).view(1, 3, 1, 1)
        want = model.embed((torch.from_numpy(tiles).float() / 255 - mean) / std).numpy()
    assert runner.output == "embeddings"
    got = runner(tiles)
    assert got.shape == (7, 64) and np.abs(got - want).max() <= TOL
    with pytest.raises(CalciscopeError, match="embeddings"):
        runner.probabilities(tiles)


def test_the_runner_refuses_wrong_tiles(exported):
    runner = OnnxTileRunner(exported["tiny"][1])
    for bad in (np.zeros((2, 3, 64, 64), np.float32), np.zeros((2, 3, 32, 32), np.uint8),
                np.zeros((2, 64, 64, 3), np.uint8)):
        with pytest.raises(CalciscopeError, match=r"expected uint8 tiles \(N, 3, 64, 64\)"):
            runner(bad)


def test_a_bad_onnx_file_is_one_checkpoint_error_naming_it(tmp_path, exported):
    onnx = pytest.importorskip("onnx")
    data = exported["tiny"][1].read_bytes()
    cases = {"missing.onnx": None, "folder.onnx": "dir", "garbage.onnx": b"not a model\n" * 10,
             "empty.onnx": b"", "truncated.onnx": data[: len(data) // 2]}
    plain = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["tiles"], ["logits"])], "g",
        [onnx.helper.make_tensor_value_info("tiles", onnx.TensorProto.FLOAT, [1, 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 4])]))
    cases["not_calciscope.onnx"] = plain.SerializeToString()
    for name, content in cases.items():
        path = tmp_path / name
        if content == "dir":
            path.mkdir()
        elif content is not None:
            path.write_bytes(content)
        with pytest.raises(CheckpointError) as info:
            OnnxTileRunner(path)
        message = str(info.value)
        assert message.startswith(str(path)) and "\n" not in message, message
    assert "not a calciscope ONNX export" in message  # the last case: valid ONNX, no card


def test_export_errors(tmp_path, tiny_checkpoint, monkeypatch):
    with pytest.raises(CheckpointError, match="not found"):
        export_onnx(tmp_path / "nope", tmp_path / "x.onnx")
    with pytest.raises(CalciscopeError, match="is a directory"):
        export_onnx(tiny_checkpoint, tmp_path)
    with pytest.raises(CalciscopeError, match="opset"):
        export_onnx(tiny_checkpoint, tmp_path / "x.onnx", opset=0)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnxscript", None)  # as if not installed
        with pytest.raises(CalciscopeError, match="needs onnxscript"):
            export_onnx(tiny_checkpoint, tmp_path / "x.onnx")
    monkeypatch.setattr(onnx_runtime, "TOLERANCE", -1.0)  # any difference at all now counts as a mismatch
    with pytest.raises(CalciscopeError, match="does not reproduce torch"):
        export_onnx(tiny_checkpoint, tmp_path / "x.onnx")
    assert list(tmp_path.iterdir()) == []  # nothing written by any failed export


def test_the_runtime_path_imports_no_torch(exported):
    path = exported["tiny"][1]
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from calciscope.inference.onnx_runtime import OnnxTileRunner
        runner = OnnxTileRunner({str(path)!r})
        tiles = np.random.default_rng(0).integers(0, 256, (3, 3, 64, 64), dtype=np.uint8)
        logits, probs = runner(tiles), runner.probabilities(tiles)
        print(json.dumps({{"shape": list(logits.shape), "p_ok": bool(((probs > 0) & (probs < 1)).all()),
                          "torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"shape": [3, 4], "p_ok": True, "torch": []}
