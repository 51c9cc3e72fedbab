"""Expression stage: readers and their errors, the cohort table, leakage-free normalisation, the rules.

Fixtures are small files written into tmp_path (GDC files by the synthetic generator, in GDC's exact layout).
One integration test runs the three rules through Snakemake on an expression-only cohort.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import yaml

from wsiomics.expression import (
    CohortParams,
    ExpressionInputError,
    NormalizeParams,
    apply_fitted,
    build_cohort,
    choose_samples,
    fit,
    normalize_fold,
    patient_of,
    read_gdc_star,
    write_anndata,
)
from wsiomics.expression.readers import plan_genes
from wsiomics.samples import load_sample_sheet
from wsiomics.samples import patients as patient_table
from wsiomics.splits import SplitParams, make_splits
from wsiomics.synth.expression import gene_model, sample_counts, write_gdc_counts

REPO = Path(__file__).resolve().parents[1]
N_GENES = 300


@pytest.fixture(scope="module")
def model():
    return gene_model(N_GENES, seed=3)


def gdc_cohort(folder: Path, model, n: int = 12, labels=("a", "b")) -> Path:
    """n patients, one GDC file each, expression-only sheet rows; returns the sheet."""
    rng = np.random.default_rng(7)
    rows = []
    for i in range(n):
        pid = f"TCGA-AA-{i:04d}"
        path = write_gdc_counts(folder / f"{pid}.tsv", model, sample_counts(model, i % 2, rng), rng)
        rows.append({"patient_id": pid, "slide_id": "", "slide_path": "", "label": labels[i % len(labels)],
                     "expression_path": path.name})
    sheet = folder / "samples.tsv"
    pd.DataFrame(rows).to_csv(sheet, sep="\t", index=False)
    return sheet


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory, model) -> Path:
    folder = tmp_path_factory.mktemp("gdc")
    gdc_cohort(folder, model)
    return folder


@pytest.fixture(scope="module")
def cohort(cohort_dir) -> ad.AnnData:
    return build_cohort(load_sample_sheet(cohort_dir / "samples.tsv"), CohortParams())


def edit_line(path: Path, line: int, fn) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = fn(lines[line - 1])
    path.write_text("\n".join(lines) + "\n")


def set_cell(line: str, col: int, value: str) -> str:
    cells = line.split("\t")
    cells[col] = value
    return "\t".join(cells)


# ------------------------------------------------------------------------------------------------ readers


def test_gdc_parser_on_the_real_layout(tmp_path, model):
    rng = np.random.default_rng(0)
    counts = sample_counts(model, 0, rng)
    path = write_gdc_counts(tmp_path / "x.tsv", model, counts, rng)
    text = path.read_text().splitlines()
    assert text[0].startswith("# gene-model") and text[2].startswith("N_unmapped") and len(text[1].split("\t")) == 9
    f = read_gdc_star(path)
    assert f.first_line == 3 and len(f.values) == N_GENES + 4
    blank = np.array([""] * 4, dtype=object)
    plan = plan_genes(path, f.id_array(), np.r_[blank, model.gene_name], np.r_[blank, model.gene_type],
                      first_line=f.first_line)
    assert plan.report["star_summary_rows"] == 4 and (plan.genes["gene_name"] == model.gene_name).all()
    assert list(plan.genes.index[:2]) == [g.split(".")[0] for g in model.gene_id[:2]]  # versions stripped
    np.testing.assert_array_equal(plan.apply(f.values), counts)
    tpm = read_gdc_star(path, "tpm_unstranded").values[4:]
    np.testing.assert_allclose(tpm, pd.read_csv(path, sep="\t", skiprows=1)["tpm_unstranded"].to_numpy()[4:])


def test_cohort_table_from_gdc_files(cohort, model):
    assert cohort.n_obs == 12 and cohort.n_vars == N_GENES and cohort.X is None
    assert cohort.layers["counts"].dtype.kind == "i"
    assert list(cohort.obs.columns[:3]) == ["sample", "sample_type", "source"]
    assert cohort.obs["has_expression"].all() and set(cohort.obs["label"]) == {"a", "b"}
    assert (cohort.var["gene_name"].to_numpy() == model.gene_name).all()
    assert cohort.uns["expression"]["values"] == "counts"


def test_gene_type_filter_and_value_column(cohort_dir, model):
    sheet = load_sample_sheet(cohort_dir / "samples.tsv")
    coding = build_cohort(sheet, CohortParams(gene_types=("protein_coding",)))
    assert coding.n_vars == int((model.gene_type == "protein_coding").sum())
    assert set(coding.var["gene_type"]) == {"protein_coding"}
    tpm = build_cohort(sheet, CohortParams(gdc_column="tpm_unstranded"))
    assert "raw" in tpm.layers and "counts" not in tpm.layers and tpm.uns["expression"]["values"] == "tpm"


def test_par_y_rows_and_duplicates(tmp_path):
    ids = np.array(["N_unmapped", "ENSG00000000001.5", "ENSG00000000001.5_PAR_Y", "ENSG00000000002.1",
                    "ENSG00000000002.3", "ENSG00000000003.1"], dtype=object)
    values = np.array([9.0, 1.0, 0.0, 2.0, 3.0, 4.0])
    with pytest.raises(ExpressionInputError, match=r"1 duplicated gene IDs.*ENSG00000000002' \(line 6\)"):
        plan_genes(tmp_path / "f.tsv", ids, None, None, first_line=2)
    summed = plan_genes(tmp_path / "f.tsv", ids, None, None, duplicates="sum")
    assert list(summed.genes.index) == ["ENSG00000000001", "ENSG00000000002", "ENSG00000000003"]
    np.testing.assert_array_equal(summed.apply(values), [1.0, 5.0, 4.0])
    assert summed.report["par_y_rows"] == 1 and summed.report["star_summary_rows"] == 1
    np.testing.assert_array_equal(plan_genes("f", ids, None, None, duplicates="first").apply(values), [1, 2, 4])
    np.testing.assert_array_equal(plan_genes("f", ids, None, None, duplicates="mean").apply(values[None])[0],
                                  [1.0, 2.5, 4.0])


@pytest.mark.parametrize(
    ("line", "col", "value", "expected"),
    [
        (2, 3, "counts", r"line 2: header is .* expected the GDC STAR layout"),
        (9, 3, "many", r"line 9: value 'many' in column 'unstranded' is not a number"),
        (9, 3, "-4", r"line 9: value '-4' in column 'unstranded' is negative"),
        (9, 3, "", r"line 9: value .* is missing"),
        (10, 3, "NaN", r"line 10: value .* is missing"),
        (9, 3, "2.5", r"line 9: value .* is not a whole number"),
    ],
)
def test_bad_gdc_files_name_file_and_line(tmp_path, model, line, col, value, expected):
    rng = np.random.default_rng(1)
    path = write_gdc_counts(tmp_path / "bad.tsv", model, sample_counts(model, 0, rng), rng)
    edit_line(path, line, lambda text: set_cell(text, col, value))
    with pytest.raises(ExpressionInputError, match=expected) as err:
        read_gdc_star(path)
    assert "bad.tsv" in str(err.value)


def test_gene_sets_that_differ_between_files(tmp_path, model):
    sheet = gdc_cohort(tmp_path, model, n=4)
    victim = tmp_path / "TCGA-AA-0002.tsv"
    lines = victim.read_text().splitlines()
    victim.write_text("\n".join(lines[:10] + lines[13:]) + "\n")  # 3 genes missing in one file
    table = build_cohort(load_sample_sheet(sheet), CohortParams())
    assert table.n_vars == N_GENES - 3
    assert table.uns["expression"]["report"]["genes_dropped_not_in_every_file"] == 3
    with pytest.raises(ExpressionInputError, match=r"(?s)1 of 4 expression files .*TCGA-AA-0002.tsv: 3 genes"):
        build_cohort(load_sample_sheet(sheet), CohortParams(strict=True))


def test_patient_barcodes_and_sample_choice():
    assert patient_of("TCGA-A1-A0SB-01A-11R-A144-07") == ("TCGA-A1-A0SB", "01", "A")
    assert patient_of("TCGA-A1-A0SB-11") == ("TCGA-A1-A0SB", "11", "")
    assert patient_of("P-17") == ("P-17", "", "")
    samples = pd.Index(["TCGA-A1-A0SB-11A", "TCGA-A1-A0SB-01B", "TCGA-A1-A0SB-01A-11R", "TCGA-ZZ-0000-01",
                        "TCGA-A2-0001-06A", "TCGA-A3-0001-11A", "P-17"])
    df = choose_samples(samples, {"TCGA-A1-A0SB", "TCGA-A2-0001", "TCGA-A3-0001", "P-17"}, ("01", "06")).set_index(
        "sample")
    assert df.loc[df["chosen"]].index.tolist() == ["TCGA-A1-A0SB-01A-11R", "TCGA-A2-0001-06A", "P-17"]
    assert df.loc["TCGA-ZZ-0000-01", "reason"] == "no patient of the sample sheet"
    assert df.loc["TCGA-A3-0001-11A", "reason"].startswith("sample type not in")


def xena(tmp_path: Path) -> tuple[pd.DataFrame, Path]:
    """A Xena-like genes x samples log matrix and a sheet of 6 patients (one patient has two samples)."""
    rng = np.random.default_rng(2)
    pids = [f"TCGA-XE-{i:04d}" for i in range(6)]
    samples = [f"{p}-01" for p in pids] + ["TCGA-XE-0000-11", "TCGA-NO-SUCH-01"]
    genes = [f"GENE{i}" for i in range(40)]
    matrix = pd.DataFrame(rng.gamma(2, 2, (40, len(samples))).round(4), index=pd.Index(genes, name="sample"),
                          columns=samples)
    pd.DataFrame({"patient_id": pids, "slide_id": "", "slide_path": "", "label": ["a", "b"] * 3,
                  "expression_path": ""}).assign(slide_id=[f"s{i}" for i in range(6)],
                                                 slide_path="s.svs").to_csv(tmp_path / "samples.tsv", sep="\t",
                                                                            index=False)
    (tmp_path / "s.svs").write_bytes(b"")
    return matrix, tmp_path / "samples.tsv"


def test_xena_matrix_in_both_orientations(tmp_path):
    matrix, sheet_path = xena(tmp_path)
    matrix.to_csv(tmp_path / "HiSeqV2", sep="\t")
    matrix.T.to_csv(tmp_path / "wide.csv")
    sheet = load_sample_sheet(sheet_path)
    a = build_cohort(sheet, CohortParams(matrix=str(tmp_path / "HiSeqV2"), matrix_values="log"))
    b = build_cohort(sheet, CohortParams(matrix=str(tmp_path / "wide.csv"), matrix_values="log"))
    assert a.n_obs == 6 and a.n_vars == 40 and list(a.obs["sample"]) == [f"TCGA-XE-{i:04d}-01" for i in range(6)]
    np.testing.assert_array_equal(a.layers["raw"], b.layers["raw"])
    np.testing.assert_allclose(a.layers["raw"][0], matrix["TCGA-XE-0000-01"].to_numpy(), rtol=1e-6)
    assert a.uns["expression"]["report"]["samples_without_patient"] == 1
    write_anndata(a, tmp_path / "xena.zarr")
    back = ad.read_zarr(tmp_path / "xena.zarr")
    assert back.uns["expression"]["values"] == "log" and back.obs.loc["TCGA-XE-0000", "sample"] == "TCGA-XE-0000-01"
    with pytest.raises(ExpressionInputError, match=r"HiSeqV2: 1 of 8 samples match no patient.*TCGA-NO-SUCH-01"):
        build_cohort(sheet, CohortParams(matrix=str(tmp_path / "HiSeqV2"), matrix_values="log", strict=True))


def test_bad_matrices(tmp_path):
    matrix, sheet_path = xena(tmp_path)
    sheet = load_sample_sheet(sheet_path)
    bad = matrix.astype(object)
    bad.iloc[4, 2] = "oops"
    bad.to_csv(tmp_path / "bad.tsv", sep="\t")
    with pytest.raises(ExpressionInputError, match=r"bad.tsv, line 6: value 'oops' in column 'TCGA-XE-0002-01'"):
        build_cohort(sheet, CohortParams(matrix=str(tmp_path / "bad.tsv"), matrix_values="log"))
    neg = matrix.copy()
    neg.iloc[7, 1] = -1.0
    neg.to_csv(tmp_path / "neg.tsv", sep="\t")
    with pytest.raises(ExpressionInputError, match=r"neg.tsv, line 9: .* is negative"):
        build_cohort(sheet, CohortParams(matrix=str(tmp_path / "neg.tsv"), matrix_values="tpm"))
    build_cohort(sheet, CohortParams(matrix=str(tmp_path / "neg.tsv"), matrix_values="log"))  # log may be < 0
    twice = matrix.rename(columns={"TCGA-XE-0003-01": "TCGA-XE-0002-01"})
    twice.to_csv(tmp_path / "twice.tsv", sep="\t")
    with pytest.raises(ExpressionInputError, match=r"twice.tsv, line 1: column label 'TCGA-XE-0002-01' appears twice"):
        build_cohort(sheet, CohortParams(matrix=str(tmp_path / "twice.tsv"), matrix_values="log"))
    stranger = matrix.rename(columns=lambda c: c.replace("XE", "QQ"))
    stranger.to_csv(tmp_path / "other.tsv", sep="\t")
    with pytest.raises(ExpressionInputError, match=r"other.tsv: neither the row labels .* match any patient"):
        build_cohort(sheet, CohortParams(matrix=str(tmp_path / "other.tsv"), matrix_values="log"))
    with pytest.raises(ExpressionInputError, match=r"none of its 8 samples .* matches a patient"):
        build_cohort(sheet, CohortParams(matrix=str(tmp_path / "other.tsv"), matrix_values="log",
                                         matrix_orientation="genes_by_samples"))


def test_h5ad_input_and_two_sources(tmp_path, cohort_dir):
    matrix, sheet_path = xena(tmp_path)
    counts = np.round(np.exp(matrix.T.to_numpy()))
    h5 = ad.AnnData(X=np.zeros_like(counts), layers={"counts": counts},
                    obs=pd.DataFrame(index=matrix.columns), var=pd.DataFrame(index=matrix.index))
    h5.write_h5ad(tmp_path / "c.h5ad")
    table = build_cohort(load_sample_sheet(sheet_path), CohortParams(matrix=str(tmp_path / "c.h5ad"),
                                                                     h5ad_layer="counts"))
    assert table.n_obs == 6 and "counts" in table.layers
    with pytest.raises(ExpressionInputError, match="two expression sources"):
        build_cohort(load_sample_sheet(cohort_dir / "samples.tsv"), CohortParams(matrix=str(tmp_path / "c.h5ad")))


# ------------------------------------------------------------------------------------------------ normalize


def folds_for(adata: ad.AnnData, n_folds=3, test_fraction=0.25) -> pd.DataFrame:
    return make_splits(adata.obs[["label"]], SplitParams(n_folds=n_folds, test_fraction=test_fraction))


def test_normalisation_equals_an_independent_numpy_reference(cohort):
    """CPM over every gene, natural log1p, z-scores with training means and (n-1) stds, written out in numpy."""
    folds = folds_for(cohort)
    out = normalize_fold(cohort, folds, 1, NormalizeParams(n_top_genes=60))
    train = (out.obs["role"] == "train").to_numpy()
    assert list(out.obs_names) == list(cohort.obs_names) and 2 <= train.sum() < len(train)
    counts = np.asarray(cohort.layers["counts"], dtype=np.float64)
    lognorm = np.log(1.0 + counts / counts.sum(axis=1, keepdims=True) * 1e6)
    cols = cohort.var_names.get_indexer(out.var_names)
    mean = lognorm[train][:, cols].mean(axis=0)
    std = lognorm[train][:, cols].std(axis=0, ddof=1)
    std[std < 1e-6] = 1.0
    np.testing.assert_allclose(out.layers["lognorm"], lognorm[:, cols], rtol=1e-6)
    np.testing.assert_allclose(out.var["mean"], mean, rtol=1e-9)
    np.testing.assert_allclose(out.var["std"], std, rtol=1e-9)
    np.testing.assert_allclose(out.X, (lognorm[:, cols] - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[train].X.mean(axis=0), 0, atol=1e-5)
    # gene selection: seurat_v3 (a loess fit, no short numpy twin) on the training patients' raw counts only
    hvg = ad.AnnData(X=counts[train], var=pd.DataFrame(index=cohort.var_names))
    sc.pp.highly_variable_genes(hvg, flavor="seurat_v3", n_top_genes=60)
    assert list(out.var_names) == list(hvg.var_names[hvg.var["highly_variable"]])
    assert out.uns["normalization"]["train_patients"] == list(out.obs_names[train])


def test_hvg_on_log2_values_picks_the_genes_of_the_same_counts(cohort_dir, cohort, tmp_path):
    """The cohort's own CPM given as a Xena-style log2(x+1) matrix: scanpy's seurat flavour must undo log2, not
    ln, or every dispersion is skewed (before expression.log_base only ~60-70% of the genes agreed)."""
    counts = np.asarray(cohort.layers["counts"], dtype=np.float64)
    cpm = counts / counts.sum(axis=1, keepdims=True) * 1e6
    matrix = pd.DataFrame(np.log2(cpm + 1).T, index=pd.Index(cohort.var_names, name="sample"),
                          columns=cohort.obs_names)
    matrix.to_csv(tmp_path / "HiSeqV2", sep="\t")
    sheet = pd.read_csv(cohort_dir / "samples.tsv", sep="\t", dtype=str, keep_default_na=False)
    sheet.assign(expression_path="", slide_id=[f"s{i}" for i in range(len(sheet))], slide_path="s.svs").to_csv(
        tmp_path / "samples.tsv", sep="\t", index=False)
    (tmp_path / "s.svs").write_bytes(b"")
    logged = build_cohort(load_sample_sheet(tmp_path / "samples.tsv"),
                          CohortParams(matrix=str(tmp_path / "HiSeqV2"), matrix_values="log"))
    assert list(logged.obs_names) == list(cohort.obs_names)
    folds = folds_for(cohort)
    for n_top in (30, 60):
        from_counts = normalize_fold(cohort, folds, 0, NormalizeParams(n_top_genes=n_top, hvg_flavor="seurat"))
        from_log2 = normalize_fold(logged, folds, 0, NormalizeParams(n_top_genes=n_top))  # auto: none + seurat
        assert from_log2.uns["normalization"]["log_base"] == 2.0
        assert from_counts.uns["normalization"]["log_base"] is None  # our own log1p is natural
        shared = set(from_counts.var_names) & set(from_log2.var_names)
        assert len(shared) >= 0.95 * n_top, (n_top, len(shared))
    genes = [g for g in from_log2.var_names if g in shared]
    in_log2, in_ln = from_log2[:, genes].layers["lognorm"], from_counts[:, genes].layers["lognorm"]
    np.testing.assert_allclose(in_log2, in_ln / np.log(2), rtol=1e-4, atol=1e-4)  # the same values, base 2
    with pytest.raises(ValueError, match="log_base must be > 1"):
        NormalizeParams(log_base=1.0)


def test_no_leakage_from_validation_and_test_patients(cohort):
    folds = folds_for(cohort)
    params = NormalizeParams(n_top_genes=50)
    before = normalize_fold(cohort, folds, 0, params)
    held_out = before.obs["role"] != "train"
    assert held_out.sum() >= 4
    perturbed = cohort.copy()
    rng = np.random.default_rng(0)
    counts = perturbed.layers["counts"].copy()
    counts[held_out.to_numpy()] = rng.poisson(200, counts[held_out.to_numpy()].shape)  # nothing like the rest
    perturbed.layers["counts"] = counts
    after = normalize_fold(perturbed, folds, 0, params)
    for key in ("genes", "means", "stds"):
        assert after.uns["normalization"][key] == before.uns["normalization"][key], key
    np.testing.assert_array_equal(after[~held_out.to_numpy()].X, before[~held_out.to_numpy()].X)
    assert not np.allclose(after[held_out.to_numpy()].X, before[held_out.to_numpy()].X)


def test_unlabelled_patients_enter_the_fit_and_test_patients_do_not(cohort):
    """Unlabelled patients (no label, never evaluated) join the training patients in gene selection and
    scaling; val, test and heldout patients still do not."""
    labels = cohort.obs[["label"]].copy()
    withheld = list(cohort.obs_names[[1, 6, 10]])
    labels.loc[withheld, "label"] = ""
    folds = make_splits(labels, SplitParams(n_folds=3, test_fraction=0.2))
    params = NormalizeParams(n_top_genes=50)
    before = normalize_fold(cohort, folds, 0, params)
    role = before.obs["role"]
    fitted_on = set(before.uns["normalization"]["train_patients"])
    assert fitted_on == set(role.index[role.isin(["train", "unlabelled"])]) and set(withheld) <= fitted_on

    def perturbed(rows: np.ndarray) -> ad.AnnData:
        adata = cohort.copy()
        counts = adata.layers["counts"].copy()
        counts[rows] = np.random.default_rng(0).poisson(200, counts[rows].shape)
        adata.layers["counts"] = counts
        return normalize_fold(adata, folds, 0, params)

    evaluated = role.isin(["val", "test", "heldout"]).to_numpy()
    assert perturbed(evaluated).uns["normalization"]["means"] == before.uns["normalization"]["means"]
    assert perturbed(role.eq("unlabelled").to_numpy()).uns["normalization"]["means"] != \
        before.uns["normalization"]["means"]


def test_fitted_parameters_reproduce_the_fold_at_inference(cohort, tmp_path):
    out = normalize_fold(cohort, folds_for(cohort), 2, NormalizeParams(n_top_genes=40, max_value=3.0))
    write_anndata(out, tmp_path / "fold2.zarr")
    back = ad.read_zarr(tmp_path / "fold2.zarr")
    fitted = dict(back.uns["normalization"])
    z, _ = apply_fitted(cohort, None, fitted)
    np.testing.assert_allclose(z, back.X, rtol=1e-5, atol=1e-5)
    assert np.abs(back.X).max() <= 3.0
    with pytest.raises(ExpressionInputError, match="genes differ"):
        apply_fitted(cohort[:, :-1].copy(), None, fitted)


def test_gene_order_list_and_sets(cohort, tmp_path):
    folds = folds_for(cohort)
    genes = list(cohort.var_names)
    (tmp_path / "genes.txt").write_text(f"# my panel\n{genes[9]}.4\n{cohort.var['gene_name'].iloc[3]}\nNOPE\n")
    listed = normalize_fold(cohort, folds, 0, NormalizeParams(gene_selection="list", gene_list=str(tmp_path /
                                                                                                   "genes.txt")))
    assert list(listed.var_names) == [genes[9], genes[3]]
    by_var = normalize_fold(cohort, folds, 0, NormalizeParams(gene_selection="all", gene_order="variance",
                                                              scale=False))
    train = by_var.obs["role"].to_numpy() == "train"
    variances = by_var.layers["lognorm"][train].var(axis=0, ddof=1)
    assert (np.diff(variances) <= 1e-6).all()
    with pytest.raises(ExpressionInputError, match="no gene positions"):
        normalize_fold(cohort, folds, 0, NormalizeParams(gene_order="chromosome"))
    placed = cohort.copy()
    placed.var["chromosome"] = ["chrX", "2", "10", "chr1"] * (N_GENES // 4)
    placed.var["start"] = np.arange(N_GENES)[::-1]
    pd.DataFrame({"gene": [genes[0], genes[1], genes[1]], "group": ["g1", "g1", "g2"]}).to_csv(
        tmp_path / "sets.tsv", sep="\t", index=False)
    ordered = normalize_fold(placed, folds, 0, NormalizeParams(gene_selection="all", gene_order="chromosome",
                                                               gene_sets=str(tmp_path / "sets.tsv")))
    chroms = ordered.var["chromosome"].str.replace("chr", "").tolist()
    assert chroms[: N_GENES // 4] == ["1"] * (N_GENES // 4) and chroms[-1] == "X"
    assert ordered.var.loc[genes[1], "gene_groups"] == "g1;g2"
    assert list(ordered.uns["gene_sets"]["group"]) == ["g1", "g1", "g2"]


def test_count_normalisation_of_log_values_is_refused(tmp_path):
    matrix, sheet_path = xena(tmp_path)
    matrix.to_csv(tmp_path / "HiSeqV2", sep="\t")
    table = build_cohort(load_sample_sheet(sheet_path), CohortParams(matrix=str(tmp_path / "HiSeqV2"),
                                                                     matrix_values="log"))
    folds = folds_for(table, n_folds=2, test_fraction=0)
    out = normalize_fold(table, folds, 0, NormalizeParams(n_top_genes=10))  # auto: none + seurat flavour
    assert out.uns["normalization"]["normalization"] == "none" and out.n_vars == 10
    with pytest.raises(ExpressionInputError, match="already log-normalised"):
        fit(table, list(table.obs_names[:3]), NormalizeParams(normalization="cpm_log1p"))
    with pytest.raises(ExpressionInputError, match="seurat_v3 needs raw counts"):
        fit(table, list(table.obs_names[:3]), NormalizeParams(hvg_flavor="seurat_v3"))


def test_seurat_v3_on_counts_that_do_not_vary_is_an_error_not_a_crash(cohort):
    """skmisc's loess segfaults the job when (almost) no gene varies across the training patients."""
    table = cohort.copy()
    layer = "counts" if "counts" in table.layers else "raw"
    table.layers[layer] = np.tile(np.asarray(table.layers[layer][:1]), (table.n_obs, 1))
    with pytest.raises(ExpressionInputError, match="only 0 genes vary.*hvg_flavor: seurat"):
        fit(table, list(table.obs_names[:4]), NormalizeParams(hvg_flavor="seurat_v3", n_top_genes=10))


# ------------------------------------------------------------------------------------------------ config


def test_config_schema_and_code_defaults_agree():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())["properties"]
    code = {**asdict(CohortParams()), **asdict(NormalizeParams())}
    props = schema["expression"]["properties"]
    assert set(props) == set(code) | {"threads"} and set(config["expression"]) == set(props)
    for key, value in code.items():
        default = props[key]["default"]
        assert (list(value) if isinstance(value, tuple) else value) == default, key


# ------------------------------------------------------------------------------------------------ workflow


@pytest.mark.integration
def test_rules_run_and_outputs_read_back(tmp_path, model):
    cohort_folder = tmp_path / "cohort"
    cohort_folder.mkdir()
    sheet = gdc_cohort(cohort_folder, model, n=9, labels=("x", "y", "z"))
    lines = sheet.read_text().splitlines()
    cells = lines[-1].split("\t")
    cells[4] = ""  # the last patient has a slide-less, expression-less row -> give it a slide instead
    lines[-1] = "\t".join([cells[0], "S1", "s.svs", cells[3], ""])
    (cohort_folder / "s.svs").write_bytes(b"")
    sheet.write_text("\n".join(lines) + "\n")
    work = tmp_path / "work"
    targets = ["results/expression/cohort.zarr", "results/splits/folds.tsv",
               *[f"results/expression/fold{k}.zarr" for k in range(3)]]
    cmd = [str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"), "--cores", "2",
           "--config", f"samples={sheet}", "expression={n_top_genes: 50, gene_types: [protein_coding]}",
           "splits={n_folds: 3}", "--directory", str(work), *targets]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    table = ad.read_zarr(work / "results" / "expression" / "cohort.zarr")
    assert table.n_obs == 8 and set(table.var["gene_type"]) == {"protein_coding"}
    folds = pd.read_csv(work / "results" / "splits" / "folds.tsv", sep="\t", keep_default_na=False)
    assert list(folds.columns) == ["patient_id", "fold", "role", "label"] and folds.patient_id.nunique() == 9
    for k in range(3):
        fold = ad.read_zarr(work / "results" / "expression" / f"fold{k}.zarr")
        assert fold.n_vars == 50 and fold.n_obs == 8 and "provenance" in fold.uns
        train = set(folds[(folds.fold == k) & (folds.role == "train")].patient_id) & set(table.obs_names)
        assert set(fold.uns["normalization"]["train_patients"]) == train
        assert (work / "logs" / "expression" / f"fold{k}.log").is_file()
    rerun = subprocess.run([*cmd, "-n"], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0 and "Nothing to be done" in rerun.stdout + rerun.stderr
    assert patient_table(load_sample_sheet(sheet)).shape[0] == 9
