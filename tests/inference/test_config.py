"""PredictConfig: one option set for predict and score, read from YAML or the command line, recorded whole."""

import dataclasses
import json

import pytest
import typer.main
from helpers import run_cli

from calciscope.cli import app
from calciscope.errors import CalciscopeError
from calciscope.inference.config import PredictConfig


def _options(command_name: str) -> set[str]:
    group = typer.main.get_command(app)
    command = group.commands[command_name]
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def _flags() -> set[str]:
    return {f.metadata.get("flag", "--" + f.name.replace("_", "-")) for f in dataclasses.fields(PredictConfig)}


def test_predict_and_score_offer_every_predictconfig_field_as_one_option():
    flags = _flags()
    assert flags <= _options("predict")
    assert flags - {"--workers"} <= _options("score")  # score's --workers counts slides, not tile decoders
    assert "--config" in _options("predict") and "--config" in _options("score")


def test_a_yaml_config_sets_predict_and_the_command_line_wins(capsys, tmp_path, phantom):
    config = tmp_path / "predict.yaml"
    config.write_text("top_k: 2\nsaliency: none\nmin_fat_vessels: 1\nworkers: 0\n")
    code, _, err = run_cli(capsys, "predict", phantom.path, "--out", tmp_path / "out", "--config", config,
                           "--top-k", "1", "--vessels", "none")
    assert code == 0, err
    settings = json.loads((tmp_path / "out" / phantom.slide_id / "result.json").read_text())["settings"]
    assert settings == {**dataclasses.asdict(PredictConfig(workers=0)), "top_k": 1, "saliency": "none",
                        "min_fat_vessels": 1, "workers": 0, "vessels": "none"}


def test_a_bad_key_or_value_in_a_predict_config_is_one_line_naming_the_file(tmp_path):
    config = tmp_path / "predict.yaml"
    config.write_text("top_k: 2\nsaliency_method: ig\n")
    with pytest.raises(CalciscopeError, match=r"predict\.yaml.*saliency_method"):
        PredictConfig.from_yaml(config)
    config.write_text("batch_size: many\n")
    with pytest.raises(CalciscopeError, match=r"predict\.yaml.*batch_size"):
        PredictConfig.from_yaml(config)


def test_install_demo_refuses_a_model_not_marked_synthetic_demo(capsys, tmp_path):
    from calciscope.model.demo import demo_model_dir

    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("model.safetensors", "model.json"):
        (mine / name).write_bytes((demo_model_dir() / name).read_bytes())
    card = json.loads((mine / "model.json").read_text())
    (mine / "model.json").write_text(json.dumps({**card, "synthetic_demo": False}))
    code, _, err = run_cli(capsys, "install-demo", "model", mine)
    assert code == 1 and "synthetic_demo" in err and len(err.strip().splitlines()) == 1


def test_install_demo_names_a_bad_measured_figure_before_it_writes_anything(capsys, tmp_path):
    from calciscope.model.demo import demo_model_dir

    before = (demo_model_dir() / "model.json").read_bytes()
    code, _, err = run_cli(capsys, "install-demo", "model", demo_model_dir(), "--measured", "second_renderer")
    assert code == 1 and "--measured second_renderer: give NAME=FILE" in err
    missing = tmp_path / "transfer.json"
    code, _, err = run_cli(capsys, "install-demo", "model", demo_model_dir(), "--measured", f"second_renderer={missing}")
    assert code == 1 and str(missing) in err and "metrics['second_renderer']" in err
    assert (demo_model_dir() / "model.json").read_bytes() == before
