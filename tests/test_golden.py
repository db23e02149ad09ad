"""The golden test: ``calciscope demo`` and ``predict`` on the CMU fixture with the demo model give the numbers they
gave when the golden files were recorded (``tests/fixtures/golden/``): every number of ``result.json`` (to 1e-6; fields may be added, none may go),
``tiles.csv`` and ``vessels.csv`` and the vessel count. A restructuring must leave them unchanged; a change that
means to move them (a retrained demo model) records them again, and says so in its commit:

    python tests/test_golden.py --record

The numbers depend on the arithmetic the CPU does: bf16 autocast where the CPU has native bf16, fp32 elsewhere.
The files record the precision they were made in; on a machine that computes in the other one the comparison
keeps its structure (same tiles, same vessels found, same calls) but allows the rounding bf16 brings (0.02).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import pytest
from helpers import run_cli

GOLDEN = Path(__file__).parent / "fixtures" / "golden"
CMU = Path(__file__).parent / "fixtures" / "CMU-1-Small-Region.svs"
STRICT, LOOSE = 1e-6, 0.02
# values that say when or how fast, not what was found
VOLATILE = {"created", "seconds", "tiles_per_second", "calciscope_version"}


def _precision() -> str:
    from calciscope.model.precision import choose_precision

    return choose_precision("auto", True).describe()


def _run(case: str, out: Path, capsys) -> Path:
    if case == "demo":
        code, _, err = run_cli(capsys, "demo", "--out", out)
        slide_dir = out / "demo_slide"
    else:
        code, _, err = run_cli(capsys, "predict", CMU, "--model", "demo", "--out", out)
        slide_dir = out / CMU.stem
    assert code == 0, err
    return slide_dir


def _leaves(obj, path=""):
    """(path, value) of every leaf of a JSON document, volatile keys left out."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key not in VOLATILE:
                yield from _leaves(value, f"{path}/{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{path}[{i}]")
    else:
        yield path, obj


def _rows(text: str) -> list[dict]:
    return list(csv.DictReader(io.StringIO(text)))


def _close(a, b, tol: float) -> bool:
    try:
        fa, fb = float(a), float(b)
    except (TypeError, ValueError):
        return a == b
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    return math.isclose(fa, fb, abs_tol=tol) or (math.isnan(fa) and math.isnan(fb))


def _record(case: str, slide_dir: Path) -> dict:
    return {
        "precision": _precision(),
        "result": dict(_leaves(json.loads((slide_dir / "result.json").read_text()))),
        "tiles.csv": (slide_dir / "tiles.csv").read_text(),
        "vessels.csv": (slide_dir / "vessels.csv").read_text(),
    }


@pytest.mark.parametrize("case", ["demo", "cmu"])
def test_outputs_match_the_golden_record(case, tmp_path, capsys):
    golden = json.loads((GOLDEN / f"{case}.json").read_text())
    now = _record(case, _run(case, tmp_path / case, capsys))
    tol = STRICT if now["precision"] == golden["precision"] else LOOSE

    want, got = golden["result"], now["result"]
    assert got.get("/vessels/n_vessels") == want.get("/vessels/n_vessels")
    missing = sorted(set(want) - set(got))  # fields may be added (e.g. the resolved settings), never lost
    assert not missing, f"result.json lost fields: {missing[:10]}"
    if tol == STRICT:
        bad = [(k, want[k], got[k]) for k in want if not _close(want[k], got[k], tol)]
    else:  # only numbers may move, and only by bf16 rounding; calls and ids stay
        bad = [(k, want[k], got[k]) for k in want
               if not _close(want[k], got[k], tol) and not isinstance(want[k], (int, float))]
    assert not bad, f"{len(bad)} result.json values differ (path, golden, now), e.g. {bad[:5]}"

    for name in ("tiles.csv", "vessels.csv"):
        want_rows, got_rows = _rows(golden[name]), _rows(now[name])
        assert len(got_rows) == len(want_rows), name
        assert list(got_rows[0]) == list(want_rows[0]) if want_rows else True, name
        bad = [(i, k, w[k], g[k]) for i, (w, g) in enumerate(zip(want_rows, got_rows)) for k in w
               if not _close(w[k], g[k], tol)]
        assert not bad, f"{name}: {len(bad)} values differ (row, column, golden, now), e.g. {bad[:5]}"


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    class _Capsys:  # run_cli's capsys, without pytest
        def readouterr(self):
            return type("C", (), {"out": "", "err": ""})()

    for case in ("demo", "cmu"):
        with tempfile.TemporaryDirectory() as tmp:
            record = _record(case, _run(case, Path(tmp) / case, _Capsys()))
        (GOLDEN / f"{case}.json").write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        print(f"recorded {case}: {record['precision']}, {len(record['result'])} result values")
