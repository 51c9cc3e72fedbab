"""Command line of the feature stage.

``python -m wsiomics.features extract --tiles T.zarr [T2.zarr ...] --out F.zarr [F2.zarr ...] --encoder NAME``
encodes slides (the model is loaded once for all of them; finished, current stores are skipped);
``import-h5`` / ``export-h5`` convert CLAM/TRIDENT h5 feature files to and from our zarr stores; ``import``
brings one slide's h5 file or feature store in as the configured encoder's store (the workflow's rule
``import_features``, for the sample sheet's ``features_path``);
``presets`` lists the named encoders.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from wsiomics.cli import add_dataclass_options, configure_logging, dataclass_from_args
from wsiomics.encoders import PRESETS, WeightsError, build_encoder
from wsiomics.features.extract import EncodingCache, ExtractParams, FeatureError, extract_slide
from wsiomics.features.interop import add_cli as add_interop_cli

log = logging.getLogger("wsiomics.features")


def _extract(args: argparse.Namespace) -> int:
    if len(args.tiles) != len(args.out):
        print(f"error: {len(args.tiles)} --tiles stores but {len(args.out)} --out stores", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    params = dataclass_from_args(ExtractParams, args)
    started = time.perf_counter()
    try:
        encoder = build_encoder(args.encoder, pretrained=args.pretrained, weights=args.weights or None, seed=args.seed)
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if encoder.weights.source == "random":
        log.warning("encoder %s has RANDOM weights (features.pretrained: false): fine for a demo or a test, "
                    "meaningless for science", args.encoder)
    log.info("encoder %s (%d-d, weights: %s %s, sha256 %s) ready in %.1f s", args.encoder, encoder.feature_dim,
             encoder.weights.source, encoder.weights.name, encoder.weights.sha256, time.perf_counter() - started)
    failed = 0
    encodings = EncodingCache()  # the encoder prepared on the device once for all slides
    for tiles, out in zip(args.tiles, args.out, strict=True):
        try:
            extract_slide(tiles, out, encoder, params, strict=args.strict, force=args.force,
                          progress=not args.no_progress, encodings=encodings)
        except (FeatureError, FileNotFoundError, RuntimeError) as e:
            log.error("%s", e)
            failed += 1
        except Exception:  # whatever breaks one slide must not lose the others of the job
            log.exception("%s: extraction failed (damaged tiles store? delete it to re-tile the slide)", tiles)
            failed += 1
    if failed and args.keep_going:
        log.warning("%d of %d slides failed (no store written for them); the others are done", failed, len(args.out))
        return 0
    return 1 if failed else 0


def _presets(_: argparse.Namespace) -> int:
    for name, preset in PRESETS.items():
        print(f"{name:16s} {preset.feature_dim:5d}-d  {preset.arch:32s} hub: {preset.hub}  {preset.description}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wsiomics.features", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ext = sub.add_parser("extract", help="encode the tiles of one or more slides")
    ext.add_argument("--tiles", required=True, nargs="+", type=Path, help="tiles store(s) from the tiling stage")
    ext.add_argument("--out", required=True, nargs="+", type=Path, help="feature store(s) to write, one per --tiles")
    ext.add_argument("--encoder", required=True, help=f"a preset ({', '.join(PRESETS)}) or any timm model name")
    ext.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=True,
                     help="--no-pretrained: seeded random weights (demo/tests only)")
    ext.add_argument("--weights", default="", help="local checkpoint path or hub name (default: the preset's hub)")
    ext.add_argument("--seed", type=int, default=0, help="seed for random weights")
    ext.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ext.add_argument("--strict", action="store_true", help="fail on unreadable tiles instead of recording them")
    ext.add_argument("--force", action="store_true", help="recompute stores that are already current")
    ext.add_argument("--no-progress", action="store_true", help="no progress bar")
    ext.add_argument("--keep-going", action="store_true",
                     help="with several slides: a slide that fails is logged and gets no store, the job still "
                          "succeeds (the workflow's batches use it, so one bad slide does not fail its batch)")
    add_dataclass_options(ext, ExtractParams)
    ext.set_defaults(func=_extract)
    sub.add_parser("presets", help="list the named encoders").set_defaults(func=_presets)
    add_interop_cli(sub)
    args = parser.parse_args(argv)
    configure_logging()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
