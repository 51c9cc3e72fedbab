"""The cohort's per-slide status once tiling and feature extraction are done (``results/qc/slide_status.tsv``).

One row per slide of the sheet. ``status`` / ``reason`` are the slide's final word: the tiling status when
tiling did not succeed, else the feature store's (a slide whose tiles tiled fine but could not be read or
encoded at extraction reads ``unreadable`` here, not ``ok``); ``stage`` says which step set it. The tiling
columns follow (``n_tiles``, ``mpp``, ``mpp_source``, ...), then the feature store's ``encoder``,
``precision``, ``device``, ``feature_dim``, ``n_features`` and ``effective_mpp``, and for a slide imported from
the sheet's ``features_path`` (never tiled: stage ``imported``, no tiling columns but ``n_tiles`` and ``mpp``
from the imported store) the file it came from (``features_source``) and the encoder that file names
(``source_encoder``; '' when it does not say, as CLAM's h5 files do not).

One cohort, one encoder: the table is refused (:func:`mixing_report`, exit status 1) when its usable stores
differ in width, or its imported files name different encoders; the message names the files and the fix.

Feature precision: ``features.precision: auto`` is resolved by each job on its own node (bf16 on a GPU or a
bf16-capable CPU, fp32 elsewhere), so on a mixed cluster one cohort can hold stores of several precisions.
:func:`precision_report` names them; the status rule logs it as a warning and the workflow repeats it at the
end of the run.

``python -m wsiomics.status --slides slides.tsv --tiles-dir results/tiles --features-dir
results/features/<encoder> --out results/qc/slide_status.tsv`` (``slides.tsv``: ``slide_id``,
``patient_id``, optionally ``features_path``; the stores are ``<dir>/<slide_id>.zarr``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

log = logging.getLogger("wsiomics.status")

OK = "ok"
TILING = ["n_tiles", "mpp", "mpp_source", "vendor", "slide_width", "slide_height", "tissue_area_mm2", "seconds"]
FEATURES = ["encoder", "precision", "device", "feature_dim", "n_features", "effective_mpp"]
COLUMNS = ["slide_id", "patient_id", "status", "reason", "stage", "tiling_status", "tiling_reason",
           "features_status", "features_reason", *TILING, *FEATURES, "store", "features_store", "features_source",
           "source_encoder"]
IMPORTED = "imported"  # the stage of a slide whose features came from the sheet's features_path


class CohortMixError(ValueError):
    """The cohort's feature stores cannot be trained on together (different widths or encoders)."""


def slide_row(slide_id: str, patient_id: str, tiles: dict, features: dict | None, tiles_store: str,
              features_store: str) -> dict:
    """One row from a tiles store's and (if extracted) a feature store's attrs."""
    row = {"slide_id": slide_id, "patient_id": patient_id or tiles.get("patient_id", ""),
           "tiling_status": tiles.get("status", ""), "tiling_reason": tiles.get("reason", ""),
           **{k: tiles.get(k, "") for k in TILING}, "store": tiles_store, "features_store": features_store}
    feats = features or {}
    row.update({"features_status": feats.get("status", ""), "features_reason": feats.get("reason", ""),
                "encoder": feats.get("encoder", ""), "precision": feats.get("precision", ""),
                "device": feats.get("device", ""), "feature_dim": feats.get("feature_dim", ""),
                "n_features": feats.get("n_tiles", ""), "effective_mpp": feats.get("effective_mpp", ""),
                # a store imported from a store may carry its own h5 origin: the last step is the source
                "features_source": feats.get("source_store") or feats.get("source_h5") or "",
                # what an h5 file names (a store's own encoder was checked against the config at import)
                "source_encoder": "" if feats.get("source_store") else feats.get("source_encoder", "")})
    if not tiles_store:  # imported: never tiled
        row.update(n_tiles=feats.get("n_tiles", ""), mpp=feats.get("mpp", ""), mpp_source=IMPORTED if
                   feats.get("mpp") else "", status=row["features_status"], reason=row["features_reason"],
                   stage=IMPORTED)
    elif row["tiling_status"] != OK:
        row.update(status=row["tiling_status"], reason=row["tiling_reason"], stage="tiling")
    elif features is None:
        row.update(status=OK, reason="", stage="tiling")  # features not extracted (tiling-only status)
    else:
        row.update(status=row["features_status"], reason=row["features_reason"],
                   stage="features" if row["features_status"] != OK else "")
    return row


def status_table(slides: pd.DataFrame, tiles_dir: str | Path, features_dir: str | Path | None) -> pd.DataFrame:
    """The table for ``slides`` (columns slide_id, patient_id and optionally features_path: the slides imported
    instead of tiled), reading ``<dir>/<slide_id>.zarr`` attrs."""
    from wsiomics.io import open_store

    rows = []
    imported = slides["features_path"] if "features_path" in slides else pd.Series("", index=slides.index)
    for slide_id, patient_id, source in zip(slides["slide_id"], slides["patient_id"], imported, strict=True):
        features_store = Path(features_dir) / f"{slide_id}.zarr" if features_dir else None
        feats = dict(open_store(features_store).attrs) if features_store else None
        if source:
            if feats is None:
                raise ValueError(f"slide {slide_id} is imported from {source}: give --features-dir")
            rows.append(slide_row(slide_id, patient_id, {}, feats, "", str(features_store)))
            continue
        tiles_store = Path(tiles_dir) / f"{slide_id}.zarr"
        tiles = dict(open_store(tiles_store).attrs)
        rows.append(slide_row(slide_id, patient_id, tiles, feats, str(tiles_store),
                              str(features_store) if features_store else ""))
    return pd.DataFrame(rows, columns=COLUMNS)


def _groups(table: pd.DataFrame, column: str) -> str:
    """'value: n (first files ...)' per distinct value of ``column``."""
    files = table["features_source"].where(table["features_source"] != "", table["features_store"])
    groups = files.groupby(table[column].astype(str)).apply(list)
    return "; ".join(f"{value}: {len(fs)} ({', '.join(fs[:3])}{', ...' if len(fs) > 3 else ''})"
                     for value, fs in groups.items())


def mixing_report(table: pd.DataFrame) -> str | None:
    """None when the usable stores have one width and the imported files name at most one encoder; else the
    error, naming the files of each group and the fix."""
    used = table[(table["status"] == OK) & (table["feature_dim"].astype(str) != "")]
    if used["feature_dim"].astype(str).nunique() > 1:
        return (f"the cohort's features differ in width ({_groups(used, 'feature_dim')}): they come from different "
                "encoders, and one model cannot read them together. Fix: give every slide features of the one "
                "encoder in features.encoder (re-export the odd files, or drop their features_path to extract them)")
    named = used[(used["stage"] == IMPORTED) & (used["source_encoder"].astype(str) != "")]
    if named["source_encoder"].str.lower().nunique() > 1:
        return (f"the imported feature files name different encoders ({_groups(named, 'source_encoder')}); one "
                "cohort cannot mix encoders, even of one width. Fix: import the files of one encoder only")
    return None


def precision_report(table: pd.DataFrame) -> str | None:
    """None when every usable feature store has the same precision, else a warning naming them and the fix."""
    used = table[(table["status"] == OK) & (table["precision"].astype(str) != "")]
    groups = used.groupby("precision")["slide_id"].apply(list)
    if len(groups) < 2:
        return None
    parts = "; ".join(f"{p}: {len(ids)} ({', '.join(ids[:3])}{', ...' if len(ids) > 3 else ''})"
                      for p, ids in groups.items())
    return (f"feature stores of this cohort were computed at different precisions ({parts}), because "
            "features.precision: auto is decided on each job's node. Fix: set features.precision (e.g. bf16) "
            "and re-run; stores of another precision are then recomputed.")


def main(argv: list[str] | None = None) -> int:
    from wsiomics.cli import configure_logging
    from wsiomics.io import write_text

    parser = argparse.ArgumentParser(prog="python -m wsiomics.status", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", required=True, type=Path, help="TSV with slide_id and patient_id")
    parser.add_argument("--tiles-dir", required=True, type=Path, help="folder of <slide_id>.zarr tiles stores")
    parser.add_argument("--features-dir", type=Path, default=None,
                        help="folder of <slide_id>.zarr feature stores (omit for a tiling-only table)")
    parser.add_argument("--out", required=True, type=Path, help="status table to write (TSV)")
    args = parser.parse_args(argv)
    configure_logging()
    slides = pd.read_csv(args.slides, sep="\t", dtype=str, keep_default_na=False)
    try:
        table = status_table(slides, args.tiles_dir, args.features_dir)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if (mixed := mixing_report(table)) is not None:
        print(f"error: {mixed}", file=sys.stderr)
        return 1
    write_text(args.out, table.to_csv(sep="\t", index=False))
    counts = table["status"].value_counts().to_dict() if len(table) else {}
    log.info("%d slides: %s", len(table), counts)
    if (table["stage"] == IMPORTED).any():
        log.info("%d slides imported from the sheet's features_path", int((table["stage"] == IMPORTED).sum()))
    for stage in ("tiling", "features", IMPORTED):
        failed = table[(table["status"] != OK) & (table["stage"] == stage)]
        if len(failed):
            log.warning("%d slides not usable after %s: %s", len(failed), stage, ", ".join(failed["slide_id"][:10]))
    if (report := precision_report(table)) is not None:
        log.warning("%s", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
