"""Tiling speed and quality on generated slides with known truth.

    python bench/tiling.py [--out bench/out] [--large-width 40000 --large-height 30000]

Writes a demo-sized cohort and one large 40x slide (default 40,000 x 30,000 px, pen-marked), tiles every
slide with default settings, and reports seconds per slide and per gigapixel plus the quality figures
(share of tiles under 25% tissue, recall of all-tissue grid cells, worst pen cover, mask IoU).
Generation time is not counted. Results go to ``<out>/tiling.json`` and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from wsiomics.io import open_store
from wsiomics.synth import CohortConfig, write_cohort
from wsiomics.synth.cohort import write_truth
from wsiomics.synth.geometry import random_layout, scale_to_pixels
from wsiomics.synth.pyramid import write_slide
from wsiomics.synth.render import rasterize
from wsiomics.synth.truth import load_truth, score_tiling
from wsiomics.tiling import tile_slide


def large_slide(folder: Path, width: int, height: int, mpp: float = 0.25) -> Path:
    path = folder / f"large_{width}x{height}.svs"
    if not path.exists():
        layout = random_layout(77, width * mpp, height * mpp, pen=True, n_fragments=4)
        geom = scale_to_pixels(layout, mpp, tissue_type=1)
        t = time.perf_counter()
        write_slide(path, geom, 77, fmt="svs")
        write_truth(path.with_suffix(".geojson"), geom)
        print(f"generated {path.name} in {time.perf_counter() - t:.0f} s")
    return path


def measure(slide: Path, truth_path: Path, out: Path, mpp: float | None = None) -> dict:
    t = time.perf_counter()
    result = tile_slide(slide, slide.stem, out / "tiles" / f"{slide.stem}.zarr", out / "qc" / f"{slide.stem}.png",
                        mpp_override=mpp)
    seconds = time.perf_counter() - t
    row = {"slide": slide.stem, "status": result.status, "n_tiles": result.n_tiles, "seconds": seconds}
    if result.status != "ok":
        return row
    store = open_store(out / "tiles" / f"{slide.stem}.zarr")
    a = store.attrs
    gigapixels = a["slide_width"] * a["slide_height"] / 1e9
    truth = load_truth(truth_path)
    score = score_tiling(truth, store["coords"][:], a["patch_size_level0"])
    mask = store["tissue_mask"][:].astype(bool)
    ds = sum(a["mask_downsample"]) / 2
    expected = rasterize(truth.tissue.difference(truth.pen), 0, 0, mask.shape[1], mask.shape[0], ds)
    iou = float((mask & expected).sum() / max(1, (mask | expected).sum()))
    row.update({"gigapixels": gigapixels, "s_per_gigapixel": seconds / gigapixels, "mpp": a["mpp"],
                "mostly_background": score.mostly_background, "full_cell_recall": score.full_cell_recall,
                "max_pen_fraction": score.max_pen_fraction, "mask_iou": iou})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/out"))
    p.add_argument("--large-width", type=int, default=40000)
    p.add_argument("--large-height", type=int, default=30000)
    p.add_argument("--workers", type=int, default=2, help="processes for generating the demo cohort")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cohort = args.out / "demo_cohort"
    if not (cohort / "samples.tsv").exists():
        write_cohort(cohort, CohortConfig(faults=False), workers=args.workers)
    rows = []
    for slide in sorted((cohort / "slides").iterdir()):
        rows.append(measure(slide, cohort / "truth" / f"{slide.stem}.geojson", args.out))
    big = large_slide(args.out, args.large_width, args.large_height)
    rows.append(measure(big, big.with_suffix(".geojson"), args.out))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    demo = [r for r in rows[:-1] if r["status"] == "ok"]
    summary = {
        "demo_slides": len(demo),
        "demo_s_per_slide": float(np.mean([r["seconds"] for r in demo])),
        "demo_s_per_gigapixel": float(sum(r["seconds"] for r in demo) / sum(r["gigapixels"] for r in demo)),
        "large": rows[-1],
        "worst_mostly_background": max(r["mostly_background"] for r in rows if "mostly_background" in r),
        "worst_full_cell_recall": min(r["full_cell_recall"] for r in rows if "full_cell_recall" in r),
        "worst_max_pen_fraction": max(r["max_pen_fraction"] for r in rows if "max_pen_fraction" in r),
        "worst_mask_iou": min(r["mask_iou"] for r in rows if "mask_iou" in r),
        "peak_rss_mb_including_generation": peak_mb,
    }
    (args.out / "tiling.json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=1))
    print("| slide | Gpx | tiles | s | s/Gpx | <25% tissue | full-cell recall | max pen | mask IoU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "gigapixels" in r:
            print(f"| {r['slide']} | {r['gigapixels']:.3f} | {r['n_tiles']} | {r['seconds']:.2f} | "
                  f"{r['s_per_gigapixel']:.1f} | {r['mostly_background']:.2%} | {r['full_cell_recall']:.2%} | "
                  f"{r['max_pen_fraction']:.2%} | {r['mask_iou']:.3f} |")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
