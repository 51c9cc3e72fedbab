"""A TCGA-sized synthetic cohort of patch features, without rendering a slide: TRIDENT h5 files, GDC STAR counts
and a ``samples.tsv`` with ``features_path``.

The patients are the slide generator's (:func:`wsiomics.synth.cohort.plan_cohort` with the same config: the
same tissue types, programmes, labels, latent factors and slide ids for one seed), and so are their count
files (the same gene model and draws). Only the image side changes: instead of pixels, each slide's tiles
get features from a fixed random "encoder geometry":

- **tissue type, seen in the image only**: a minority of tiles (the tumour region, 5-30% of a slide, a
  spatial blob) come from the tissue type's own prototypes; the other tiles from prototypes shared by all.
  A tile classifier or attention pooling finds the type easily, mean pooling dilutes it;
- **programme, seen in the genes only** (as in the slide generator);
- **latent factors, seen by both**: the slide generator's stain strengths become a shift of every tile
  along one fixed direction per factor (what stain does to a foundation model's features), while the
  same factors drive a latent gene set in the counts;
- nuisance: a per-slide offset (scanner/site batch) and per-tile noise.

``signal`` is the slide generator's (the labels come from the shared patient plan): with ``shared`` the
label is the signs of the latent factors, so it shows as the stain shift and in the latent gene set.

``unlabelled_fraction`` withholds the label of a seeded share of patients (the truth table keeps it), and
``survival`` adds the slide generator's follow-up (:func:`wsiomics.synth.cohort.follow_up`).

``python -m wsiomics.synth features --patients 1000 --out DIR``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from wsiomics.synth.cohort import CohortConfig, SlideSpec, follow_up, plan_cohort
from wsiomics.synth.expression import gene_model, sample_counts, write_gdc_counts

TARGET_MAGNIFICATION = 20
PATCH_SIZE = 256  # px at the target magnification, as TRIDENT's default
SHARED_PROTOTYPES = 8  # tile kinds every slide has (stroma, lymphocytes, ...)
TYPE_PROTOTYPES = 4  # tumour tile kinds per tissue type


@dataclass(frozen=True)
class FeatureCohortConfig:
    patients: int = 1000
    seed: int = 0
    signal: str = "both"  # what the label follows (wsiomics.synth.cohort.SIGNALS)
    latent_factors: int = 2  # factors seen by both modalities (0-2)
    unlabelled_fraction: float = 0.0  # share of patients whose label is withheld in the sheet
    survival: bool = False  # follow-up columns time and event
    fraction_second_slide: float = 0.25
    n_genes: int = 2000
    feature_dim: int = 256
    tiles: int = 256  # mean tiles per slide (log-normal, at least 16)
    tumour_fraction_min: float = 0.05
    tumour_fraction_max: float = 0.3
    tissue_signal: float = 8.0  # distance of a type's tumour prototype from the common one (tile-noise units)
    stain_shift: float = 1.0  # shift along a factor's direction per unit of the factor
    slide_noise: float = 0.3  # per-slide offset (batch) per dimension
    tile_noise: float = 1.0  # per-tile noise per dimension
    encoder: str = "synthetic"  # the name TRIDENT's files carry (features_<encoder>/, attr encoder)


@dataclass(frozen=True)
class FeatureGeometry:
    """The fixed "encoder": prototypes and stain directions, the same for every slide of a seed."""

    shared: np.ndarray  # (SHARED_PROTOTYPES, D)
    tumour: np.ndarray  # (2, TYPE_PROTOTYPES, D): per tissue type
    stain: np.ndarray  # (2, D) orthonormal directions, one per latent factor


def feature_geometry(cfg: FeatureCohortConfig) -> FeatureGeometry:
    rng = np.random.default_rng([cfg.seed, 17])
    dim = cfg.feature_dim
    shared = rng.standard_normal((SHARED_PROTOTYPES, dim))
    base = rng.standard_normal((TYPE_PROTOTYPES, dim))  # tumour morphology common to both types
    offsets = rng.standard_normal((2, TYPE_PROTOTYPES, dim))
    offsets *= cfg.tissue_signal / np.linalg.norm(offsets, axis=-1, keepdims=True)  # the same at any width
    tumour = base[None] + offsets
    stain, _ = np.linalg.qr(rng.standard_normal((dim, 2)))
    return FeatureGeometry(shared, tumour, stain.T.copy())


def _blob(n: int, rng: np.random.Generator) -> np.ndarray:
    """Grid cells (col, row) of a compact tissue region of n tiles: the n cells nearest a jittered centre."""
    side = int(np.ceil(np.sqrt(n * 1.6))) + 2
    cols, rows = np.meshgrid(np.arange(side), np.arange(side))
    cells = np.stack([cols.ravel(), rows.ravel()], 1)
    centre = side / 2 + rng.normal(0, 0.5, 2)
    stretch = rng.uniform(0.6, 1.6)  # elliptical tissue
    dist = ((cells[:, 0] - centre[0]) * stretch) ** 2 + ((cells[:, 1] - centre[1]) / stretch) ** 2
    keep = np.sort(np.argsort(dist + rng.uniform(0, 2.0, len(dist)), kind="stable")[:n])
    return cells[keep]


def slide_features(spec: SlideSpec, geometry: FeatureGeometry, cfg: FeatureCohortConfig,
                   latent: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features (N, D) float32, grid cells (N, 2), tumour mask (N,)) of one slide, from its own seed."""
    rng = np.random.default_rng([spec.seed, 23])
    n = max(16, int(round(cfg.tiles * np.exp(rng.normal(-0.125, 0.5)))))  # log-normal, mean ~cfg.tiles
    cells = _blob(n, rng)
    fraction = rng.uniform(cfg.tumour_fraction_min, cfg.tumour_fraction_max)
    seed_cell = cells[rng.integers(n)]
    near = np.argsort(((cells - seed_cell) ** 2).sum(1), kind="stable")[:max(1, int(round(fraction * n)))]
    tumour = np.zeros(n, bool)
    tumour[near] = True
    mix = rng.dirichlet(np.ones(SHARED_PROTOTYPES))  # this slide's mixture of shared tile kinds
    kinds = rng.choice(SHARED_PROTOTYPES, n, p=mix)
    feats = geometry.shared[kinds]
    type_kinds = rng.integers(0, TYPE_PROTOTYPES, int(tumour.sum()))
    feats[tumour] = geometry.tumour[spec.tissue_type][type_kinds]
    # the stain strengths the slide generator draws (0.975 + 0.2 x factor + noise) as a feature shift
    factors = (np.asarray(spec.stain) - 0.975) / 0.2 if cfg.latent_factors else np.zeros(2)
    offset = cfg.stain_shift * factors @ geometry.stain + cfg.slide_noise * rng.standard_normal(cfg.feature_dim)
    feats = feats + offset + cfg.tile_noise * rng.standard_normal(feats.shape)
    return feats.astype(np.float32), cells, tumour


def write_trident_h5(path: Path, feats: np.ndarray, coords: np.ndarray, *, slide_id: str, level0_mag: int,
                     encoder: str) -> None:
    """One slide as TRIDENT writes it: ``features`` (N, D) float32 and ``coords`` (N, 2) int64 level-0 x, y, with
    TRIDENT's patching attrs on ``coords`` and its name/folder/encoder attrs on ``features``."""
    folder = str(path.parent)
    with h5py.File(path, "w") as f:
        data = f.create_dataset("features", data=feats)
        data.attrs.update({"name": slide_id, "savetodir": folder, "encoder": encoder})
        c = f.create_dataset("coords", data=coords.astype(np.int64))
        c.attrs.update({"patch_size": PATCH_SIZE, "patch_size_level0": PATCH_SIZE * level0_mag // TARGET_MAGNIFICATION,
                        "level0_magnification": level0_mag, "target_magnification": TARGET_MAGNIFICATION,
                        "overlap": 0, "name": slide_id, "savetodir": folder})


def write_feature_cohort(out_dir: str | Path, cfg: FeatureCohortConfig, progress: bool = True) -> Path:
    """Write the cohort under ``out_dir``; returns its ``samples.tsv`` (written last)."""
    from tqdm import tqdm

    slide_cfg = CohortConfig(n_patients=cfg.patients, seed=cfg.seed, signal=cfg.signal, n_genes=cfg.n_genes,
                             faults=False, latent_factors=cfg.latent_factors,
                             fraction_second_slide=cfg.fraction_second_slide, survival=cfg.survival,
                             unlabelled_fraction=cfg.unlabelled_fraction)
    patients, slides = plan_cohort(slide_cfg)
    out = Path(out_dir)
    feature_dir = out / f"features_{cfg.encoder}"
    for sub in (feature_dir, out / "expression"):
        sub.mkdir(parents=True, exist_ok=True)

    # Expression exactly as the slide generator writes it (same model, same draws in the same order).
    model = gene_model(cfg.n_genes, cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    expression_paths = {}
    for p in tqdm(patients.itertuples(), total=len(patients), desc="expression", disable=not progress):
        counts = sample_counts(model, p.programme, rng, latent=(p.latent0, p.latent1))
        name = f"{p.patient_id}.rna_seq.augmented_star_gene_counts.tsv"
        write_gdc_counts(out / "expression" / name, model, counts, rng)
        expression_paths[p.patient_id] = f"expression/{name}"

    geometry = feature_geometry(cfg)
    latent = dict(zip(patients.patient_id, zip(patients.latent0, patients.latent1, strict=True), strict=True))
    records = []
    for spec in tqdm(slides, desc="slides", disable=not progress):
        feats, cells, tumour = slide_features(spec, geometry, cfg, latent[spec.patient_id])
        level0_mag = 40 if spec.mpp <= slide_cfg.mpp_40x else 20
        step = PATCH_SIZE * level0_mag // TARGET_MAGNIFICATION
        path = feature_dir / f"{spec.slide_id}.h5"
        write_trident_h5(path, feats, cells * step, slide_id=spec.slide_id, level0_mag=level0_mag,
                         encoder=cfg.encoder)
        records.append({"slide_id": spec.slide_id, "patient_id": spec.patient_id, "n_tiles": len(feats),
                        "tumour_tiles": int(tumour.sum()), "level0_magnification": level0_mag})

    if cfg.survival:
        patients = patients.join(follow_up(patients, cfg.seed))
    rows = []
    for spec in slides:
        p = patients.loc[patients.patient_id == spec.patient_id].iloc[0]
        row = {"patient_id": spec.patient_id, "slide_id": spec.slide_id, "slide_path": "",
               "label": p.label if p.labelled else "", "expression_path": expression_paths[spec.patient_id],
               "features_path": f"{feature_dir.name}/{spec.slide_id}.h5"}
        if cfg.survival:
            row.update(time=f"{p.time:.0f}", event=str(p.event))
        rows.append(row)
    patients.to_csv(out / "patients_truth.tsv", sep="\t", index=False)
    pd.DataFrame(records).to_csv(out / "slides_truth.tsv", sep="\t", index=False)
    (out / "cohort.json").write_text(json.dumps({"config": asdict(cfg), "kind": "features"}, indent=1))
    sheet = out / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return sheet
