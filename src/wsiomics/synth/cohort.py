"""A whole synthetic cohort in the sample-sheet contract: slides, annotations, expression, labels.

Each patient has a tissue type (seen in the image) and an expression programme (seen in the genes).
``signal`` decides which of them the label follows:

- ``image``: label = tissue type; ``genes``: label = programme;
- ``both``: four classes, tissue type x programme, so only a model using both reaches full accuracy;
- ``xor``: two classes, tissue type XOR programme: neither modality alone beats chance;
- ``shared``: the label follows what both modalities see, the latent factors (below; needs ``latent_factors``
  >= 1): the sign of each factor, so 2 classes with one factor and 4 (the quadrants) with two. As in real
  cohorts where the tumour type drives both morphology and expression, the label shows in the slides' stain
  and in the latent gene set, each noisily (stain noise, count noise), and patients near a factor's zero sit
  near the class boundary. Tissue type and programme are still drawn, but carry none of this label.

``latent_factors`` > 0 adds what contrastive image-gene pretraining learns from: per-patient continuous
factors, independent of the label (except with ``shared``), that set the slides' stain (hematoxylin and eosin
strength) and the expression of a latent gene set (each gene loading on one factor). Only paired image and expression
reveal which slide belongs to which expression profile.

``unlabelled_fraction`` withholds the label of a seeded share of patients in the sheet (the truth table keeps
it, column ``labelled`` says whose): the unlabelled patients of :mod:`wsiomics.splits`, which pretraining
uses and fine-tuning does not. The feature-cohort generator withholds the same patients for the same seed.

With ``faults`` the cohort also holds what real cohorts hold: a slide without MPP metadata that the
sheet overrides, one without MPP and no override, a blank slide, a truncated slide, a patient with
expression only and one without expression.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from shapely.geometry import mapping

from wsiomics.synth.expression import gene_model, sample_counts, write_gdc_counts
from wsiomics.synth.geometry import SlideGeometry, polygons, random_layout, scale_to_pixels
from wsiomics.synth.pyramid import write_slide

SIGNALS = ("image", "genes", "both", "xor", "shared")


@dataclass(frozen=True)
class CohortConfig:
    n_patients: int = 12
    seed: int = 0
    signal: str = "both"
    slide_width_um: float = 4000.0
    slide_height_um: float = 3000.0
    mpp_20x: float = 0.5  # microns per pixel of the 20x scans
    mpp_40x: float = 0.25  # microns per pixel of the 40x scans
    fraction_40x: float = 0.15
    fraction_second_slide: float = 0.25  # share of patients with a second slide
    fraction_pen: float = 0.3
    n_genes: int = 2000
    faults: bool = True
    latent_factors: int = 0  # shared image/expression factors per patient (0: none; at most 2)
    survival: bool = False  # follow-up columns time (days) and event in the sheet
    unlabelled_fraction: float = 0.0  # share of patients whose label is withheld in the sheet (truth keeps it)
    # A cohort to deploy a trained model to: shares of patients without RNA / without slides (disjoint sets,
    # drawn from their own random stream, so every other patient, slide and label is the same seed's)
    fraction_no_expression: float = 0.0
    fraction_no_slide: float = 0.0
    # The synthetic genome (gene ids and types, the programme and latent gene sets) follows this seed; -1: seed.
    # A second cohort of the same disease (to deploy a model to): another seed with the first's genome_seed.
    genome_seed: int = -1


# Log-hazard of the synthetic follow-up: the latent factors are seen by both modalities (stain, a gene set),
# the tissue type by the image only and the programme by the genes only, so a model of both ranks best.
SURVIVAL_WEIGHTS = {"latent0": 2.0, "latent1": 2.0, "tissue_type": 1.0, "programme": 1.0}
BASELINE_DAYS = 900.0  # mean event time at zero log-hazard
CENSOR_DAYS = (400.0, 3000.0)  # uniform end of follow-up


def follow_up(patients: pd.DataFrame, seed: int) -> pd.DataFrame:
    """``time`` (days, rounded) and ``event`` (1 = event, 0 = censored) per patient, from its own stream."""
    rng = np.random.default_rng([seed, 11])
    log_hazard = sum(w * patients[k].to_numpy(float) for k, w in SURVIVAL_WEIGHTS.items())
    event_time = rng.exponential(BASELINE_DAYS * np.exp(-log_hazard))
    censor = rng.uniform(*CENSOR_DAYS, len(patients))
    return pd.DataFrame({"time": np.maximum(1.0, np.round(np.minimum(event_time, censor))),
                         "event": (event_time <= censor).astype(int)}, index=patients.index)


@dataclass
class SlideSpec:
    slide_id: str
    patient_id: str
    fmt: str
    mpp: float
    seed: int
    tissue_type: int
    pen: bool = False
    blank: bool = False
    mpp_metadata: bool = True
    mpp_override: float | None = None
    truncate: bool = False
    stain: tuple[float, float] = field(default=(1.0, 1.0))


def label_for(signal: str, tissue_type: int, programme: int, latent: tuple[float, ...] = ()) -> str:
    """The label ``signal`` gives a patient; ``latent``: its factors in use (``shared`` only: one per factor)."""
    if signal == "image":
        return f"tissue{tissue_type}"
    if signal == "genes":
        return f"programme{programme}"
    if signal == "both":
        return f"tissue{tissue_type}_programme{programme}"
    if signal == "xor":
        return "concordant" if tissue_type == programme else "discordant"
    if signal == "shared":
        if not latent:
            raise ValueError("signal 'shared' follows the latent factors: set latent_factors to 1 or 2")
        return "_".join(f"factor{i}{'hi' if v >= 0 else 'lo'}" for i, v in enumerate(latent))
    raise ValueError(f"unknown signal {signal!r}; choose one of {', '.join(SIGNALS)}")


def withheld_labels(patient_ids: np.ndarray, fraction: float, seed: int) -> set[str]:
    """The ``round(fraction * n)`` patients whose label the sheet withholds, from their own seeded stream (so
    both generators withhold the same patients, and nothing else they draw moves)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"unlabelled_fraction must be in [0, 1); got {fraction}")
    n = int(round(fraction * len(patient_ids)))
    return {str(p) for p in np.random.default_rng([seed, 13]).choice(patient_ids, n, replace=False)}


def _drop_modalities(cfg: CohortConfig, patients: list[dict]) -> None:
    """Mark round(fraction x n) patients without expression and others without slides (in place).

    With ``faults`` the last patient will lose its slides and the one before it its expression
    (:func:`plan_cohort`): neither is drawn to lose its other modality, so no patient is left with neither.
    Patients are taken in one seeded order, skipping those, so a cohort that drew neither is unchanged."""
    n = cfg.n_patients
    n_rna, n_slide = round(cfg.fraction_no_expression * n), round(cfg.fraction_no_slide * n)
    if min(cfg.fraction_no_expression, cfg.fraction_no_slide) < 0 or n_rna + n_slide > n:
        raise ValueError(f"fraction_no_expression ({cfg.fraction_no_expression}) + fraction_no_slide "
                         f"({cfg.fraction_no_slide}) must be >= 0 and sum to at most 1: a patient keeps one modality")
    slide_only, expression_only = (n - 2, n - 1) if cfg.faults else (-1, -1)  # the faults' patients
    order = [int(i) for i in np.random.default_rng([cfg.seed, 11]).permutation(n)]
    no_rna = [i for i in order if i != expression_only][:n_rna]
    no_slide = [i for i in order if i not in no_rna and i != slide_only][:n_slide]
    if len(no_slide) < n_slide:
        raise ValueError(f"fraction_no_expression ({cfg.fraction_no_expression}) + fraction_no_slide "
                         f"({cfg.fraction_no_slide}) of {n} patients leave no room for the faults' expression-only "
                         "and slide-only patients: lower the fractions or set faults: false")
    for i in no_rna:
        patients[i]["has_expression"] = False
    for i in no_slide:
        patients[i]["has_slide"] = False


def plan_cohort(cfg: CohortConfig) -> tuple[pd.DataFrame, list[SlideSpec]]:
    """Decide every patient and slide (no I/O): patient table (with ``labelled``: the sheet shows the label)
    and slide specs."""
    if cfg.n_patients < 4:
        raise ValueError("a synthetic cohort needs at least 4 patients (one per tissue type x programme)")
    label_for(cfg.signal, 0, 0, (0.0,) * cfg.latent_factors)  # validates the signal name (and shared's factors)
    rng = np.random.default_rng(cfg.seed)
    combos = np.arange(cfg.n_patients) % 4  # balanced tissue type x programme
    rng.shuffle(combos)
    if not 0 <= cfg.latent_factors <= 2:
        raise ValueError("latent_factors must be 0, 1 or 2 (they drive the two stain strengths)")
    latent_rng = np.random.default_rng([cfg.seed, 7])
    latent = latent_rng.uniform(-1.0, 1.0, (cfg.n_patients, 2))
    latent[:, cfg.latent_factors:] = 0.0
    patients, slides = [], []
    for i, combo in enumerate(combos):
        pid = f"TCGA-SY-{i + 1:04d}"
        tissue_type, programme = int(combo // 2), int(combo % 2)
        patients.append({"patient_id": pid, "tissue_type": tissue_type, "programme": programme,
                         "label": label_for(cfg.signal, tissue_type, programme,
                                            tuple(float(v) for v in latent[i, :cfg.latent_factors])),
                         "has_expression": True,
                         "has_slide": True, "latent0": float(latent[i, 0]), "latent1": float(latent[i, 1])})
        n_slides = 2 if rng.random() < cfg.fraction_second_slide else 1
        for k in range(n_slides):
            forty = rng.random() < cfg.fraction_40x
            slides.append(SlideSpec(
                slide_id=f"{pid}-01Z-00-DX{k + 1}", patient_id=pid, fmt="svs" if rng.random() < 0.6 else "tiff",
                mpp=cfg.mpp_40x if forty else cfg.mpp_20x, seed=int(rng.integers(2**31)),
                tissue_type=tissue_type, pen=bool(rng.random() < cfg.fraction_pen),
                stain=_stain(rng, latent[i], cfg.latent_factors)))
    _drop_modalities(cfg, patients)
    no_slide = {p["patient_id"] for p in patients if not p["has_slide"]}
    slides = [s for s in slides if s.patient_id not in no_slide]
    if cfg.faults:
        # Faults go to patients that keep at least one good slide, except the expression-only patient.
        last = cfg.n_patients - 1
        patients[last]["has_slide"] = False
        slides = [s for s in slides if s.patient_id != patients[last]["patient_id"]]
        patients[last - 1]["has_expression"] = False
        first = slides[0]
        extra = dict(patient_id=first.patient_id, tissue_type=first.tissue_type, fmt="tiff", mpp=cfg.mpp_20x)
        slides += [
            SlideSpec(slide_id=f"{first.patient_id}-01Z-00-DX7", seed=101, mpp_metadata=False,
                      mpp_override=cfg.mpp_20x, **extra),
            SlideSpec(slide_id=f"{first.patient_id}-01Z-00-DX8", seed=102, mpp_metadata=False, **extra),
            SlideSpec(slide_id=f"{first.patient_id}-01Z-00-DX9", seed=103, blank=True, **extra),
            SlideSpec(slide_id=f"{first.patient_id}-01Z-00-DX6", seed=104, truncate=True, **extra),
        ]
    table = pd.DataFrame(patients)
    neither = table.patient_id[~table.has_slide & ~table.has_expression].tolist()
    if neither:  # the draws above must not allow it; a patient with no data would break every stage
        raise AssertionError(f"synthetic patients {neither} have neither slides nor expression")
    withheld = withheld_labels(table.patient_id.to_numpy(), cfg.unlabelled_fraction, cfg.seed)
    return table.assign(labelled=~table.patient_id.isin(withheld)), slides


def _stain(rng: np.random.Generator, latent: np.ndarray, n_factors: int) -> tuple[float, float]:
    """(hematoxylin, eosin) strengths: random per slide, or set by the patient's factors (plus a little noise)."""
    h, e = float(rng.uniform(0.85, 1.1)), float(rng.uniform(0.85, 1.1))
    if n_factors:
        h, e = 0.975 + 0.2 * latent[0] + 0.01 * (h - 0.975), 0.975 + 0.2 * latent[1] + 0.01 * (e - 0.975)
    return h, e


def slide_geometry(spec: SlideSpec, cfg: CohortConfig) -> SlideGeometry:
    layout = random_layout(spec.seed, cfg.slide_width_um, cfg.slide_height_um, blank=spec.blank, pen=spec.pen)
    return scale_to_pixels(layout, spec.mpp, spec.tissue_type, spec.stain)


def _feature(geom, name: str, colour: list[int], extra: dict | None = None) -> dict:
    return {"type": "Feature", "geometry": mapping(geom),
            "properties": {"objectType": "annotation", "classification": {"name": name, "color": colour},
                           **(extra or {})}}


def write_truth(path: Path, geom: SlideGeometry) -> None:
    """Ground truth (level-0 px) for tests and benchmarks: tissue, tumour and each pen stroke."""
    feats = [_feature(geom.tissue, "Tissue", [0, 160, 0])] if not geom.tissue.is_empty else []
    feats += [_feature(p, "Tumor", [200, 0, 0]) for p in polygons(geom.tumour)]
    feats += [_feature(g, "Pen", [0, 0, 200], {"ink": c}) for c, g in geom.pens if not g.is_empty]
    meta = {"width": geom.width, "height": geom.height, "mpp": geom.mpp, "tissue_type": geom.tissue_type}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats, "slide": meta}))


def write_annotation(path: Path, geom: SlideGeometry) -> None:
    """Tumour polygons as QuPath exports them (GeoJSON FeatureCollection, level-0 pixels)."""
    feats = [_feature(p, "Tumor", [200, 0, 0]) for p in polygons(geom.tumour)]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))


def _write_one(args: tuple[SlideSpec, CohortConfig, str]) -> str:
    spec, cfg, out = args
    out_dir = Path(out)
    geom = slide_geometry(spec, cfg)
    path = out_dir / "slides" / f"{spec.slide_id}.{spec.fmt}"
    write_slide(path, geom, spec.seed, fmt=spec.fmt, mpp_metadata=spec.mpp_metadata)
    if spec.truncate:  # a transfer cut short: the header survives, the tile data does not
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    write_truth(out_dir / "truth" / f"{spec.slide_id}.geojson", geom)
    if not geom.tumour.is_empty:
        write_annotation(out_dir / "annotations" / f"{spec.slide_id}.geojson", geom)
    return spec.slide_id


def write_cohort(out_dir: str | Path, cfg: CohortConfig, workers: int = 1, progress: bool = True) -> Path:
    """Write the cohort under ``out_dir``; returns the path of its ``samples.tsv`` (written last)."""
    from tqdm import tqdm

    out = Path(out_dir)
    for sub in ("slides", "truth", "annotations", "expression"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    patients, slides = plan_cohort(cfg)

    model = gene_model(cfg.n_genes, cfg.seed if cfg.genome_seed < 0 else cfg.genome_seed)
    rng = np.random.default_rng(cfg.seed + 1)
    expression_paths = {}
    for p in patients.itertuples():
        counts = sample_counts(model, p.programme, rng, latent=(p.latent0, p.latent1))
        if p.has_expression:
            name = f"{p.patient_id}.rna_seq.augmented_star_gene_counts.tsv"
            write_gdc_counts(out / "expression" / name, model, counts, rng)
            expression_paths[p.patient_id] = f"expression/{name}"

    jobs = [(s, cfg, str(out)) for s in slides]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            list(tqdm(pool.map(_write_one, jobs), total=len(jobs), desc="slides", disable=not progress))
    else:
        for job in tqdm(jobs, desc="slides", disable=not progress):
            _write_one(job)

    label = {p.patient_id: p.label if p.labelled else "" for p in patients.itertuples()}
    if cfg.survival:
        patients = patients.join(follow_up(patients, cfg.seed))
    outcome = {p.patient_id: {"time": f"{p.time:.0f}", "event": str(p.event)} for p in patients.itertuples()
               } if cfg.survival else {}
    rows = []
    for s in slides:
        has_annotation = (out / "annotations" / f"{s.slide_id}.geojson").exists()
        rows.append({"patient_id": s.patient_id, "slide_id": s.slide_id, "slide_path": f"slides/{s.slide_id}.{s.fmt}",
                     "label": label[s.patient_id], "mpp": "" if s.mpp_override is None else f"{s.mpp_override}",
                     "annotation_path": f"annotations/{s.slide_id}.geojson" if has_annotation else "",
                     "expression_path": expression_paths.get(s.patient_id, ""), **outcome.get(s.patient_id, {})})
    for p in patients.itertuples():
        if not p.has_slide:
            rows.append({"patient_id": p.patient_id, "slide_id": "", "slide_path": "", "label": label[p.patient_id],
                         "mpp": "",
                         "annotation_path": "", "expression_path": expression_paths.get(p.patient_id, ""),
                         **outcome.get(p.patient_id, {})})
    patients.to_csv(out / "patients_truth.tsv", sep="\t", index=False)
    (out / "cohort.json").write_text(json.dumps(
        {"config": asdict(cfg), "slides": [asdict(s) for s in slides]}, indent=1))
    sheet = out / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return sheet
