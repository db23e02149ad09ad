"""The shipped demo model: a small CNN trained on phantom slides (``configs/demo.yaml``). Synthetic demo, not for
clinical use.

    calciscope train --config configs/demo.yaml
    calciscope synth --out data/held_out --n-slides 24 --size 2048 --seed 90210
    calciscope evaluate --model runs/demo/model --data data/held_out/manifest.csv --out runs/demo/held_out
    python -m calciscope.model.demo install runs/demo/model runs/demo/held_out/metrics.json
"""

from __future__ import annotations

import json
import shutil
import sys
from importlib.resources import files
from pathlib import Path

from calciscope.errors import CalciscopeError
from calciscope.model.checkpoint import CARD_FILE, WEIGHTS_FILE, load_checkpoint, save_checkpoint

MAX_BYTES = 15 * 1024 * 1024


def demo_model_dir() -> Path:
    """Where the demo checkpoint lives inside the installed package."""
    path = Path(str(files("calciscope.model") / "demo"))
    if not (path / CARD_FILE).is_file():
        raise CalciscopeError(f"{path}: the demo model is missing from this installation")
    return path


def resolve_model(spec: str | Path) -> Path:
    """``"demo"`` → the shipped demo checkpoint; anything else is a checkpoint directory (or its model.json)."""
    return demo_model_dir() if str(spec) == "demo" else Path(spec)


def install(source: str | Path, held_out: str | Path | None = None) -> Path:
    """Copy a trained checkpoint into the package as the demo model, after checking it loads and is small.

    ``held_out``: a ``calciscope evaluate`` metrics.json on phantoms never used in training; it goes into the
    card as ``metrics["held_out"]`` so the card carries what the model scored on unseen data.
    """
    source = Path(source)
    model, card = load_checkpoint(source)
    if not card.synthetic_demo:
        raise CalciscopeError(f"{source}: its card is not marked synthetic_demo; the demo model must be")
    target = Path(str(files("calciscope.model"))) / "demo"
    if held_out is not None:
        card.metrics = {**card.metrics, "held_out": json.loads(Path(held_out).read_text())}
        save_checkpoint(target, model, card)
    else:
        target.mkdir(exist_ok=True)
        for name in (WEIGHTS_FILE, CARD_FILE):
            shutil.copyfile(source / name, target / name)
    size = sum((target / name).stat().st_size for name in (WEIGHTS_FILE, CARD_FILE))
    if size > MAX_BYTES:
        raise CalciscopeError(f"{source}: {size / 2**20:.1f} MiB is over the {MAX_BYTES / 2**20:.0f} MiB demo budget")
    return target


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "install":
        sys.exit("usage: python -m calciscope.model.demo install RUN_DIR/model [HELD_OUT_METRICS.json]")
    print(install(*sys.argv[2:]))
