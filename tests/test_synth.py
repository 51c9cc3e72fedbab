"""The synthetic cohort generator: formats OpenSlide reads, GDC layout, labels, determinism."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pandas as pd
import pytest

from wsiomics.samples import load_sample_sheet, patients, slides
from wsiomics.synth import CohortConfig, plan_cohort
from wsiomics.synth.__main__ import main as synth_main
from wsiomics.synth.cohort import label_for
from wsiomics.synth.expression import GDC_COLUMNS, STAR_SUMMARY_ROWS
from wsiomics.synth.geometry import random_layout, scale_to_pixels
from wsiomics.synth.render import render_region


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "cohort"
    rc = synth_main(["--out", str(out), "--n-patients", "4", "--slide-width-um", "1600", "--slide-height-um", "1200",
                     "--n-genes", "300", "--seed", "3"])
    assert rc == 0
    return out


def test_sheet_follows_the_contract(cohort):
    sheet = load_sample_sheet(cohort / "samples.tsv")  # raises on any contract violation
    per_patient = patients(sheet)
    assert len(per_patient) == 4
    assert (~per_patient.has_slide).sum() == 1 and (~per_patient.has_expression).sum() == 1
    assert slides(sheet).mpp.ne("").sum() == 1  # the no-metadata slide that the sheet overrides


def test_slides_open_in_openslide_with_metadata(cohort):
    sheet = slides(load_sample_sheet(cohort / "samples.tsv"))
    plan = json.loads((cohort / "cohort.json").read_text())["slides"]
    by_id = {s["slide_id"]: s for s in plan}
    for slide_id, row in sheet.iterrows():
        spec = by_id[slide_id]
        if spec["truncate"]:
            with pytest.raises(openslide.OpenSlideError):
                openslide.OpenSlide(row.slide_path).read_region((0, 0), 0, (4000, 4000))
            continue
        slide = openslide.OpenSlide(row.slide_path)
        vendor = slide.properties["openslide.vendor"]
        assert vendor == ("aperio" if spec["fmt"] == "svs" else "generic-tiff")
        assert slide.level_count >= 2
        if spec["mpp_metadata"]:
            assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(spec["mpp"], rel=1e-3)
        else:
            assert "openslide.mpp-x" not in slide.properties
        if spec["fmt"] == "svs":
            assert slide.properties["openslide.objective-power"] in ("20", "40")
            assert "thumbnail" in slide.associated_images


def test_gdc_counts_layout(cohort):
    files = sorted((cohort / "expression").glob("*.tsv"))
    assert len(files) == 3
    text = files[0].read_text().splitlines()
    assert text[0].startswith("# gene-model:")
    assert text[1].split("\t") == GDC_COLUMNS
    table = pd.read_csv(files[0], sep="\t", comment="#")
    assert list(table.gene_id[:4]) == STAR_SUMMARY_ROWS
    genes = table.iloc[4:]
    assert genes.gene_id.str.match(r"ENSG\d{11}\.\d+$").all()
    assert genes.unstranded.ge(0).all() and genes.unstranded.dtype.kind in "if"
    assert genes.tpm_unstranded.sum() == pytest.approx(1e6, rel=1e-3)
    assert table.iloc[:4].tpm_unstranded.isna().all()


def test_annotations_are_qupath_geojson(cohort):
    ann = sorted((cohort / "annotations").glob("*.geojson"))
    assert ann
    data = json.loads(ann[0].read_text())
    feature = data["features"][0]
    assert data["type"] == "FeatureCollection" and feature["geometry"]["type"] in ("Polygon", "MultiPolygon")
    assert feature["properties"]["classification"]["name"] == "Tumor"


@pytest.mark.parametrize("signal,n_classes", [("image", 2), ("genes", 2), ("both", 4), ("xor", 2)])
def test_label_signal_modes(signal, n_classes):
    table, _ = plan_cohort(CohortConfig(n_patients=16, signal=signal))
    assert table.label.nunique() == n_classes
    assert table.groupby("label").size().min() >= 16 // n_classes // 2  # balanced-ish
    if signal == "xor":  # neither modality alone predicts the label
        for column in ("tissue_type", "programme"):
            assert table.groupby(column).label.nunique().eq(2).all()
    with pytest.raises(ValueError, match="unknown signal"):
        label_for("colour", 0, 0)


# Digests of plan_cohort (patient table and slide specs) computed at f0fa1d5, before the ``shared`` mode existed:
# adding a mode must not move any draw of the existing ones.
PLAN_DIGESTS = {"image": "294a7bb64022ed6a", "genes": "5f45f017020ecb4a", "both": "57e460c359c1e9ec",
                "xor": "726a9e8a3d7782bb"}


@pytest.mark.parametrize("signal", sorted(PLAN_DIGESTS))
def test_existing_signal_modes_plan_the_same_cohort_as_before(signal):
    import hashlib
    from dataclasses import asdict

    table, slides = plan_cohort(CohortConfig(n_patients=24, seed=3, signal=signal, latent_factors=2,
                                             unlabelled_fraction=0.25))
    blob = json.dumps([table.round(9).to_dict("records"), [asdict(s) for s in slides]], sort_keys=True, default=str)
    assert hashlib.sha256(blob.encode()).hexdigest()[:16] == PLAN_DIGESTS[signal]


@pytest.mark.parametrize("factors,n_classes", [(1, 2), (2, 4)])
def test_shared_label_follows_the_latent_factors_both_modalities_see(factors, n_classes):
    table, slides = plan_cohort(CohortConfig(n_patients=400, seed=5, signal="shared", latent_factors=factors))
    assert table.label.nunique() == n_classes
    assert table.groupby("label").size().min() >= 0.15 * len(table)  # balanced enough (uniform factors)
    for i in range(factors):  # the label is the sign of each factor: it shows in the stain and the latent genes
        hi = table.label.str.contains(f"factor{i}hi")
        assert (table[f"latent{i}"][hi] >= 0).all() and (table[f"latent{i}"][~hi] < 0).all()
    # and it is the only thing the mode changes: patients, factors and slides are the default mode's
    both_table, both_slides = plan_cohort(CohortConfig(n_patients=400, seed=5, latent_factors=factors))
    pd.testing.assert_frame_equal(table.drop(columns="label"), both_table.drop(columns="label"))
    assert slides == both_slides
    with pytest.raises(ValueError, match="latent_factors"):
        plan_cohort(CohortConfig(n_patients=8, signal="shared"))  # no factors: nothing shared to follow


def test_image_carries_tissue_type():
    """Tissue type 1 has denser nuclei: visibly more hematoxylin, so the image can carry class signal."""
    layout = random_layout(5, 1500, 1500, tumour=False)
    means = []
    for tissue_type in (0, 1):
        geom = scale_to_pixels(layout, 0.5, tissue_type)
        c = geom.tissue.representative_point()
        patch = render_region(geom, c.x - 112, c.y - 112, 224, 224, 1.0, seed=1).astype(float)
        means.append(patch[..., 1].mean())  # green is what hematoxylin absorbs most
    assert means[1] < means[0] - 5


def test_generation_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--n-patients", "4", "--slide-width-um", "800", "--slide-height-um", "600", "--n-genes", "50",
            "--no-faults"]
    synth_main(["--out", str(a), *args])
    synth_main(["--out", str(b), *args])
    assert (a / "samples.tsv").read_text() == (b / "samples.tsv").read_text()
    for f in (a / "expression").iterdir():
        assert f.read_text() == (b / "expression" / f.name).read_text()
    s1 = openslide.OpenSlide(str(next((a / "slides").iterdir())))
    s2 = openslide.OpenSlide(str(b / "slides" / next((a / "slides").iterdir()).name))
    assert np.array_equal(np.asarray(s1.read_region((0, 0), 1, (200, 200))),
                          np.asarray(s2.read_region((0, 0), 1, (200, 200))))


def test_latent_factors_drive_stain_and_a_gene_set_and_default_is_unchanged():
    from wsiomics.synth.expression import gene_model, sample_counts

    base_p, base_s = plan_cohort(CohortConfig(n_patients=12, seed=3))
    lat_p, lat_s = plan_cohort(CohortConfig(n_patients=12, seed=3, latent_factors=2))
    assert [s.slide_id for s in base_s] == [s.slide_id for s in lat_s]
    assert (base_p[["latent0", "latent1"]] == 0).all().all()  # no factors: nothing shared
    z = lat_p.set_index("patient_id")[["latent0", "latent1"]]
    good = [s for s in lat_s if not s.blank and s.mpp_metadata and not s.truncate]
    h = np.array([s.stain[0] for s in good])
    zs = np.array([z.loc[s.patient_id, "latent0"] for s in good])
    assert np.corrcoef(h, zs)[0, 1] > 0.99
    model = gene_model(500, 3)
    genes0 = model.latent_genes[0]
    assert len(genes0) > 10 and not set(genes0) & (set(model.programmes[0]) | set(model.programmes[1]))
    rng = np.random.default_rng(0)
    hi = np.mean([sample_counts(model, 0, rng, latent=(1.0, 0.0))[genes0].sum() for _ in range(20)])
    lo = np.mean([sample_counts(model, 0, rng, latent=(-1.0, 0.0))[genes0].sum() for _ in range(20)])
    assert hi / lo > 8  # log2 fold change 2 per unit: 2**4 between -1 and +1


def test_unlabelled_fraction_withholds_labels_as_the_feature_generator_does(tmp_path):
    """The slide generator's sheet withholds the labels of round(fraction * n) patients (the truth keeps them),
    the same patients `python -m wsiomics.synth features` withholds for the same seed and size, and nothing
    else of the plan moves."""
    from wsiomics.synth.features import FeatureCohortConfig, write_feature_cohort

    base_p, base_s = plan_cohort(CohortConfig(n_patients=8, seed=5, faults=False))
    part_p, part_s = plan_cohort(CohortConfig(n_patients=8, seed=5, faults=False, unlabelled_fraction=0.25))
    assert base_p.labelled.all() and (~part_p.labelled).sum() == 2
    assert base_p.drop(columns="labelled").equals(part_p.drop(columns="labelled"))
    assert [s.seed for s in base_s] == [s.seed for s in part_s]

    out = tmp_path / "slides"
    assert synth_main(["--out", str(out), "--n-patients", "8", "--slide-width-um", "1200", "--slide-height-um",
                       "1000", "--n-genes", "300", "--seed", "5", "--no-faults", "--unlabelled-fraction",
                       "0.25"]) == 0
    sheet = patients(load_sample_sheet(out / "samples.tsv"))
    unlabelled = set(sheet.index[sheet.label == ""])
    truth = pd.read_csv(out / "patients_truth.tsv", sep="\t").set_index("patient_id")
    assert unlabelled == set(truth.index[~truth.labelled]) and len(unlabelled) == 2
    assert (sheet.label[sheet.label != ""] == truth.label[sheet.index[sheet.label != ""]]).all()

    features = write_feature_cohort(tmp_path / "features", FeatureCohortConfig(
        patients=8, seed=5, unlabelled_fraction=0.25, n_genes=300, feature_dim=16, tiles=16), progress=False)
    feature_sheet = patients(load_sample_sheet(features))
    assert set(feature_sheet.index[feature_sheet.label == ""]) == unlabelled
    with pytest.raises(ValueError, match="unlabelled_fraction"):
        plan_cohort(CohortConfig(n_patients=8, unlabelled_fraction=1.0))


def test_missing_modality_fractions_leave_each_patient_one_modality_and_keep_the_rest():
    """fraction_no_expression / fraction_no_slide (a deployment cohort): disjoint patients lose RNA or slides;
    every other patient, slide and label is what the same seed gives without them."""
    base = CohortConfig(n_patients=40, seed=5, faults=False)
    plain, plain_slides = plan_cohort(base)
    cfg = CohortConfig(n_patients=40, seed=5, faults=False, fraction_no_expression=0.25, fraction_no_slide=0.2)
    pts, specs = plan_cohort(cfg)
    assert (~pts.has_expression).sum() == 10 and (~pts.has_slide).sum() == 8
    assert not (~pts.has_expression & ~pts.has_slide).any()  # nobody is left without either modality
    assert pts.label.tolist() == plain.label.tolist()
    kept = {p for p in pts.patient_id[pts.has_slide]}
    assert [s for s in plain_slides if s.patient_id in kept] == specs
    with pytest.raises(ValueError, match="fraction"):
        plan_cohort(CohortConfig(n_patients=8, faults=False, fraction_no_expression=0.6, fraction_no_slide=0.6))


@pytest.mark.parametrize("seed", range(12))
def test_faults_with_missing_modality_fractions_never_leave_a_patient_without_both(seed):
    """The faults' expression-only and slide-only patients are not also drawn to lose their other modality."""
    pts, specs = plan_cohort(CohortConfig(n_patients=32, seed=seed, fraction_no_expression=0.15,
                                          fraction_no_slide=0.15))
    assert not (~pts.has_expression & ~pts.has_slide).any()
    assert (~pts.has_expression).sum() >= 5 and (~pts.has_slide).sum() >= 5
    with_slides = {s.patient_id for s in specs}
    assert with_slides == set(pts.patient_id[pts.has_slide])


def test_fractions_that_cannot_spare_the_fault_patients_are_refused():
    with pytest.raises(ValueError, match="faults"):
        plan_cohort(CohortConfig(n_patients=8, fraction_no_expression=0.5, fraction_no_slide=0.5))


def test_genome_seed_gives_another_cohort_the_same_genome(tmp_path):
    """A deployment cohort (another seed) must share the training cohort's genes and programmes."""
    from wsiomics.synth.cohort import write_cohort

    common = dict(n_patients=4, slide_width_um=600, slide_height_um=500, n_genes=200, faults=False)
    a = write_cohort(tmp_path / "a", CohortConfig(seed=0, **common), progress=False)
    b = write_cohort(tmp_path / "b", CohortConfig(seed=1, genome_seed=0, **common), progress=False)
    c = write_cohort(tmp_path / "c", CohortConfig(seed=1, **common), progress=False)

    def genes(sheet):
        path = sorted((sheet.parent / "expression").glob("*.tsv"))[0]
        table = pd.read_csv(path, sep="\t", comment="#")
        return table[table["gene_id"].str.startswith("ENSG")][["gene_id", "gene_type"]]

    assert genes(a).equals(genes(b))
    assert not genes(a).equals(genes(c))
