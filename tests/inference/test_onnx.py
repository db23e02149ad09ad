"""ONNX export and the onnxruntime runtime: same tile and slide probabilities as torch (fp32) on phantoms, the card
inside the file, any batch size, `export` / `predict --runtime onnxruntime` / `score --runtime onnxruntime` from the
command line, one line naming the file for every bad input, and no torch on the runner's path."""

import csv
import hashlib
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch


def _require(module: str, why: str) -> None:
    """Skip this file, with the reason, where an ONNX package is missing; in CI (part of the test extra) fail."""
    try:
        importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is part of the test extra and must be installed in CI", pytrace=False)
        pytest.skip(f"{module} not installed ({why}; pip install 'calciscope[onnx]')", allow_module_level=True)


_require("onnxruntime", "the onnxruntime runtime")
_require("onnxscript", "the torch.export-based ONNX exporter")
_require("onnx", "ONNX export")

import calciscope  # noqa: E402
from calciscope.cli import main  # noqa: E402
from calciscope.data.slides import open_slide  # noqa: E402
from calciscope.data.synthetic import generate_dataset, generate_slide  # noqa: E402
from calciscope.data.tiling import TilingConfig, make_grid  # noqa: E402
from calciscope.data.tissue import TissueConfig, detect_tissue  # noqa: E402
from calciscope.errors import CalciscopeError, CheckpointError  # noqa: E402
from calciscope.inference import onnx_runtime  # noqa: E402
from calciscope.inference.batch import completed_result  # noqa: E402
from calciscope.inference.onnx_runtime import OnnxTileRunner, export_onnx  # noqa: E402
from calciscope.inference.predict import PredictConfig, Predictor  # noqa: E402
from calciscope.model import ModelCard, create_model, load_card, save_checkpoint  # noqa: E402
from calciscope.model.demo import demo_model_dir  # noqa: E402
from calciscope.model.precision import prepare_inputs  # noqa: E402

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


def cli(*args) -> tuple[int, str]:
    """The console entry point in-process: (exit code, stdout)."""
    buf = io.StringIO()
    try:
        with redirect_stdout(buf):
            main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, buf.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_checkpoint):
    """The demo model exported by ``calciscope export`` (its stdout kept), the tiny one by ``export_onnx``."""
    root = tmp_path_factory.mktemp("onnx")
    code, stdout = cli("export", "--model", "demo", "--format", "onnx", "--out", root / "demo.onnx")
    assert code == 0, stdout
    return {"demo": (demo_model_dir(), root / "demo.onnx"), "demo_stdout": stdout,
            "tiny": (tiny_checkpoint, export_onnx(tiny_checkpoint, root / "sub" / "tiny.onnx"))}


def torch_logits(predictor: Predictor, tiles: np.ndarray) -> np.ndarray:
    """The Predictor's own fp32 path: prepare_inputs -> BatchNorm-folded backbone -> head."""
    with torch.inference_mode():
        x = prepare_inputs(torch.from_numpy(tiles), predictor.tiles.mean, predictor.tiles.std, predictor.precision)
        return predictor.tiles.model.head(predictor.tiles.backbone(x)).float().numpy()


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
    want_probs = torch.sigmoid(torch.from_numpy(want) / predictor.tiles.temperature).numpy()
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
    with pytest.raises(CheckpointError, match=r"mil\.onnx: an attention-MIL export gives tile embeddings only"):
        Predictor(tmp_path / "mil.onnx", PredictConfig(runtime="onnxruntime"))


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


# -- the command line and the onnxruntime runtime in predict / score ----------------------------------------------


def _rows(path):
    return list(csv.DictReader(open(path, encoding="utf-8")))


def test_export_prints_the_file_it_wrote(exported):
    path = exported["demo"][1]
    assert exported["demo_stdout"].strip().splitlines()[-1] == str(path)
    assert OnnxTileRunner(path).card.to_dict() == load_card(demo_model_dir()).to_dict()


@pytest.fixture(scope="module")
def torch_fp32(tmp_path_factory, phantom):
    """The demo model on the 2048² phantom in torch fp32 (bf16 autocast would differ by ~1e-3), no saliency."""
    out = tmp_path_factory.mktemp("torch_fp32")
    calciscope.predict_slide(phantom.path, model="demo", out=out, workers=0, saliency="none", amp="off", device="cpu",
                             vessels="none")  # the export has no segmenter beside it: compare like with like
    return out / phantom.slide_id


def test_predict_with_onnxruntime_matches_torch_on_every_tile(exported, phantom, torch_fp32, tmp_path):
    onnx_path = exported["demo"][1]
    code, stdout = cli("predict", phantom.path, "--runtime", "onnxruntime", "--model", onnx_path, "--out", tmp_path,
                       "--workers", "2")
    assert code == 0, stdout
    folder = tmp_path / phantom.slide_id
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in torch_fp32.iterdir())  # every output

    got, want = _rows(folder / "tiles.csv"), _rows(torch_fp32 / "tiles.csv")
    p_columns = [c for c in want[0] if c.startswith("p_")]
    assert len(got) == len(want) > 30 and len(p_columns) == len(LABELS)
    for g, w in zip(got, want):
        assert {c: g[c] for c in g if c not in p_columns} == {c: w[c] for c in w if c not in p_columns}  # same tile
        for c in p_columns:
            assert abs(float(g[c]) - float(w[c])) <= TOL, (g["tile_index"], c)

    doc, ref = (json.loads((f / "result.json").read_text()) for f in (folder, torch_fp32))
    for label in LABELS:
        assert abs(doc["findings"][label]["probability"] - ref["findings"][label]["probability"]) <= TOL, label
        assert doc["findings"][label]["threshold"] == ref["findings"][label]["threshold"]
    assert abs(doc["cua_pattern"]["score"] - ref["cua_pattern"]["score"]) <= TOL
    assert (doc["model"]["runtime"], ref["model"]["runtime"]) == ("onnxruntime", "torch")
    assert doc["model"]["sha256"] == hashlib.sha256(onnx_path.read_bytes()).hexdigest()  # the file that scored
    assert doc["model"]["weights_sha256"] == ref["model"]["sha256"] == load_card(demo_model_dir()).weights_sha256
    assert doc["top_tiles"]["saliency_method"] == "none"
    assert "ONNX file sha256" in (folder / "report.html").read_text()


def test_score_with_onnxruntime_scores_a_batch(exported, tmp_path):
    onnx_path = exported["demo"][1]
    manifest = generate_dataset(tmp_path / "slides", 3, size_px=1024, seed=31, artifacts=False)
    out = tmp_path / "out"
    code, stdout = cli("score", manifest, "--runtime", "onnxruntime", "--model", onnx_path, "--out", out,
                       "--workers", "2", "--top-k", "1")
    assert code == 0 and "3 scored, 0 already done, 0 failed" in stdout, stdout
    summary = _rows(out / "summary.csv")
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["runtime"] == run["settings"]["runtime"] == "onnxruntime"
    assert run["settings"]["saliency"] == "none" and run["model"]["path"] == str(onnx_path)
    predictor = Predictor(onnx_path, PredictConfig(runtime="onnxruntime", workers=0, top_k=1))
    for row in summary:  # the worker processes score as the runtime does in this process
        assert row["status"] == "scored", row
        doc = json.loads((out / row["slide_id"] / "result.json").read_text())
        assert doc["model"]["runtime"] == "onnxruntime" and doc["model"]["sha256"] == run["model"]["sha256"]
        here = predictor.predict(row["path"])
        for label in LABELS:
            assert float(row[f"p_{label}"]) == pytest.approx(here.probabilities[label], abs=1e-6)
        # a rerun resumes it with this export; the torch checkpoint (another model file) would score it again
        assert completed_result(out, row["slide_id"], row["sha256"], predictor.model_sha256) is not None
        assert completed_result(out, row["slide_id"], row["sha256"], load_card(demo_model_dir()).weights_sha256) is None


@pytest.fixture
def blocker(tmp_path):
    path = tmp_path / "results.txt"
    path.write_text("a file, not a folder")
    return path


def _bad_cases(tmp_path, blocker, onnx_path, slide_path):
    """(arguments, the text naming the bad input, the reason) per bad input."""
    not_a_model = tmp_path / "weights"
    not_a_model.mkdir()
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model\n" * 10)
    out = tmp_path / "out"
    predict = ("predict", slide_path, "--out", out, "--workers", "0")
    return {
        "export_bad_model": (("export", "--model", not_a_model, "--out", tmp_path / "m.onnx"),
                             not_a_model / "model.json", "not a calciscope checkpoint"),
        "export_bad_format": (("export", "--model", "demo", "--format", "tflite", "--out", tmp_path / "m.tflite"),
                              "--format tflite", "unsupported export format; supported: onnx"),
        "export_unwritable": (("export", "--model", "demo", "--out", blocker / "m.onnx"),
                              blocker / "m.onnx", "is a file, not a folder"),
        "export_onto_a_folder": (("export", "--model", "demo", "--out", not_a_model),
                                 not_a_model, "is a directory; give the ONNX file to write"),
        "onnx_runtime_with_the_demo_checkpoint": ((*predict, "--runtime", "onnxruntime"),
                                                  "demo", "calciscope export --model demo --format onnx"),
        "onnx_runtime_folder_without_export": ((*predict, "--runtime", "onnxruntime", "--model", not_a_model),
                                               not_a_model, "no model.onnx in this folder"),
        "onnx_runtime_garbage_file": ((*predict, "--runtime", "onnxruntime", "--model", garbage),
                                      garbage, "not a readable ONNX model"),
        "onnx_runtime_missing_file": ((*predict, "--runtime", "onnxruntime", "--model", tmp_path / "gone.onnx"),
                                      tmp_path / "gone.onnx", "ONNX model not found"),
        "onnx_runtime_gradcam": ((*predict, "--runtime", "onnxruntime", "--model", onnx_path, "--saliency", "gradcam"),
                                 "saliency 'gradcam'", "needs gradients"),
        "torch_runtime_onnx_file": ((*predict, "--model", onnx_path),
                                    onnx_path, "score it with the onnxruntime runtime (--runtime onnxruntime)"),
        "score_onnx_runtime_ig": (("score", slide_path.parent, "--out", out, "--runtime", "onnxruntime",
                                   "--model", onnx_path, "--saliency", "ig"), "saliency 'ig'", "needs gradients"),
    }


BAD_CASES = ["export_bad_model", "export_bad_format", "export_unwritable", "export_onto_a_folder",
             "onnx_runtime_with_the_demo_checkpoint", "onnx_runtime_folder_without_export", "onnx_runtime_garbage_file",
             "onnx_runtime_missing_file", "onnx_runtime_gradcam", "torch_runtime_onnx_file", "score_onnx_runtime_ig"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_naming_it(case, capsys, tmp_path, blocker, exported, phantom):
    args, named, reason = _bad_cases(tmp_path, blocker, exported["demo"][1], phantom.path)[case]
    code, stdout = cli(*args)
    stderr = capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code == 1 and len(lines) == 1, stderr
    assert lines[0].startswith("calciscope: error:") and str(named) in lines[0] and reason in lines[0], lines[0]
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert not list(tmp_path.rglob("*m.onnx*")) and not list(tmp_path.rglob("*.tflite"))  # no export left behind


def test_export_without_the_onnx_packages_says_how_to_install_them(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as if not installed
    code, _ = cli("export", "--model", "demo", "--out", tmp_path / "m.onnx")
    stderr = capsys.readouterr().err
    assert code == 1 and len(stderr.strip().splitlines()) == 1, stderr
    assert "needs onnxscript (not installed): pip install 'calciscope[onnx]'" in stderr
    assert list(tmp_path.iterdir()) == []


def test_runtime_settings_and_where_the_export_is_found(exported, tmp_path):
    assert PredictConfig().saliency == "guided-gradcam" and PredictConfig(runtime="onnxruntime").saliency == "none"
    with pytest.raises(CalciscopeError, match="unknown runtime 'tensorrt'; choose one of: torch, onnxruntime"):
        PredictConfig(runtime="tensorrt")
    with pytest.raises(CalciscopeError, match="the onnxruntime runtime runs on the CPU"):
        PredictConfig(runtime="onnxruntime", device="cuda")
    with pytest.raises(CalciscopeError, match="the onnxruntime runtime computes in fp32"):
        PredictConfig(runtime="onnxruntime", amp="bf16")
    folder = tmp_path / "checkpoint"  # a checkpoint folder with its export beside the weights
    folder.mkdir()
    shutil.copyfile(exported["demo"][1], folder / "model.onnx")
    predictor = Predictor(folder, PredictConfig(runtime="onnxruntime", workers=0))
    assert predictor.model_path == folder / "model.onnx" and predictor.tiles.model is None
    assert predictor.tiles.runner.threads == torch.get_num_threads()
    assert predictor.card.to_dict() == load_card(demo_model_dir()).to_dict()
