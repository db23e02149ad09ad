"""The shipped demo model: a small CNN trained on phantom slides (``configs/demo.yaml``). Synthetic demo, not for
clinical use.

    calciscope train --config configs/demo.yaml
    calciscope synth --out data/held_out --n-slides 24 --size 2048 --seed 90210
    calciscope evaluate --model runs/demo/model --data data/held_out/manifest.csv --out runs/demo/held_out
    python -m calciscope.model.demo install runs/demo/model runs/demo/held_out/metrics.json

Stage 2 (``configs/demo_vessels.yaml``) fine-tunes that model on grid plus vessel-centred tiles, and
``configs/vessels.yaml`` trains the vessel segmenter that ships beside it in ``demo/vessels/``:

    python -m calciscope.model.demo install runs/demo_vessels/model runs/demo_vessels/held_out/metrics.json \
        --segmenter runs/vessels
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


def install(source: str | Path, held_out: str | Path | None = None, segmenter: str | Path | None = None) -> Path:
    """Copy a trained checkpoint into the package as the demo model, after checking it loads and is small.

    ``held_out``: a ``calciscope evaluate`` metrics.json on phantoms never used in training; it goes into the
    card as ``metrics["held_out"]`` so the card carries what the model scored on unseen data. ``segmenter``: a
    ``calciscope train-vessels`` folder, copied to ``demo/vessels/`` (it must load and be a synthetic demo).
    """
    from calciscope.vessels.segment import CARD_FILE as SEG_CARD
    from calciscope.vessels.segment import WEIGHTS_FILE as SEG_WEIGHTS
    from calciscope.vessels.segment import load_segmenter

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
    if segmenter is not None:
        _, seg_card = load_segmenter(segmenter)
        if not seg_card.synthetic_demo:
            raise CalciscopeError(f"{segmenter}: its card is not marked synthetic_demo; the demo segmenter must be")
        (target / "vessels").mkdir(exist_ok=True)
        for name in (SEG_WEIGHTS, SEG_CARD):
            shutil.copyfile(Path(segmenter) / name, target / "vessels" / name)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    if size > MAX_BYTES:
        raise CalciscopeError(f"{source}: {size / 2**20:.1f} MiB is over the {MAX_BYTES / 2**20:.0f} MiB demo budget")
    return target


if __name__ == "__main__":
    args = sys.argv[1:]
    seg = None
    if "--segmenter" in args:
        i = args.index("--segmenter")
        seg = args[i + 1] if i + 1 < len(args) else None
        args = args[:i] + args[i + 2 :]
    if len(args) not in (2, 3) or args[0] != "install" or ("--segmenter" in sys.argv and seg is None):
        sys.exit("usage: python -m calciscope.model.demo install RUN_DIR/model [HELD_OUT_METRICS.json] "
                 "[--segmenter SEGMENTER_DIR]")
    print(install(*args[1:], segmenter=seg))
