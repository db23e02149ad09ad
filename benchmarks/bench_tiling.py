"""Tiling throughput and memory, measured side by side in one run.

1. tiles/s of the full tiling path (`tile_slide`: tissue mask, grid, decode, per-tile QC, tiles.csv, qc.json,
   thumbnail) ÷ tiles/s of a bare decode of the same tiles (same level, same size) by the slide reader, which
   decodes a tiled TIFF's tiles directly (``data.tiff_tiles``): target ≥ 0.8; and ÷ a bare OpenSlide decode.
2. Peak RSS of the tile job (in a fresh process each) on a phantom and on one with 4× the area: target ≤ 1.2×.

    python benchmarks/bench_tiling.py [--size 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openslide

from calciscope.data.slides import open_slide
from calciscope.data.synthetic import generate_slide
from calciscope.data.tile_export import tile_slide
from calciscope.data.tiling import make_grid
from calciscope.data.tissue import detect_tissue

FINDINGS = {"medial_calcification": 1, "small_vessel_calcification": 1, "thrombosis": 1, "vasculitis": 0}

# VmHWM, not ru_maxrss: ru_maxrss keeps the parent's peak across fork + exec, VmHWM starts afresh.
_RSS_CHILD = """
import json, sys
from calciscope.data.tile_export import tile_slide
result = tile_slide(sys.argv[1], sys.argv[2], workers=0)
hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"n_tiles": result.n_tiles, "peak_rss_mb": hwm_kb / 1024}))
"""


def raw_decode_rates(path: Path, repeats: int) -> tuple[float, float, int]:
    """Tiles/s of a bare decode of the grid's tiles (no QC, no files): through OpenSlide, and through the slide
    reader, which decodes a tiled TIFF's tiles directly (``data.tiff_tiles``)."""
    with open_slide(path) as slide:
        grid = make_grid(slide, detect_tissue(slide))
    raw = openslide.OpenSlide(str(path))
    direct = open_slide(path)
    rates = []
    for read in (lambda xy: raw.read_region(xy, grid.level, (grid.read_px, grid.read_px)),
                 lambda xy: direct.read_region(xy, grid.level, (grid.read_px, grid.read_px))):
        best = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            for x, y in grid.xy:
                read((int(x), int(y)))
            best = max(best, len(grid) / (time.perf_counter() - start))
        rates.append(best)
    return rates[0], rates[1], len(grid)


def pipeline_rate(path: Path, out: Path, repeats: int, workers: int) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        result = tile_slide(path, out, workers=workers)
        best = max(best, result.n_tiles / (time.perf_counter() - start))
    return best


def peak_rss(path: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(path), str(out)], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=8192, help="side of the smaller phantom in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_tiling_"))
    small = generate_slide(work, "small", FINDINGS, size_px=args.size, seed=1).path
    large = generate_slide(work, "large", FINDINGS, size_px=args.size * 2, seed=1).path

    # Throughput on the larger slide (more tiles, so per-slide fixed costs weigh as they do on real slides).
    raw, direct, n = raw_decode_rates(large, args.repeats)
    single = pipeline_rate(large, work / "out", args.repeats, workers=0)
    multi = pipeline_rate(large, work / "out", args.repeats, workers=2)
    rss_small = peak_rss(small, work / "rss")
    rss_large = peak_rss(large, work / "rss")

    print(f"phantom {args.size * 2}² ({n} tissue tiles of 224 px at 0.5 µm/px); best of {args.repeats}")
    print(f"raw OpenSlide decode, 1 process      : {raw:8.1f} tiles/s")
    print(f"raw direct tile decode, 1 process    : {direct:8.1f} tiles/s  (the slide reader; {direct / raw:.2f}× OpenSlide)")
    print(f"full tiling path, 1 process          : {single:8.1f} tiles/s  ratio {single / direct:.2f} to the direct decode "
          f"(target ≥ 0.80), {single / raw:.2f} to OpenSlide's")
    print(f"full tiling path, 2 decode workers   : {multi:8.1f} tiles/s  ratio {multi / direct:.2f}, {multi / raw:.2f}")
    print(f"peak RSS {args.size}²   : {rss_small['peak_rss_mb']:7.1f} MB ({rss_small['n_tiles']} tiles)")
    print(f"peak RSS {args.size * 2}²   : {rss_large['peak_rss_mb']:7.1f} MB ({rss_large['n_tiles']} tiles)")
    print(f"RSS ratio 4× area     : {rss_large['peak_rss_mb'] / rss_small['peak_rss_mb']:.2f} (target ≤ 1.20)")


if __name__ == "__main__":
    main()
