"""Per-fold normalisation, gene selection and z-scoring, fitted on the fold's training patients only.

The training patients are role ``train`` and role ``unlabelled`` (patients without a label, never validated
on or tested: :mod:`wsiomics.splits`): they are not evaluated in any fold, so fitting on them leaks nothing,
and more patients steady the gene selection. ``val``, ``test`` and ``heldout`` patients never enter a fit.

Steps (scanpy does the computing):

1. per-sample normalisation, which fits nothing: ``cpm_log1p`` = ``sc.pp.normalize_total`` to a fixed
   ``target_sum`` (1e6: counts per million; a fixed target, never the cohort median, which would be a
   fitted quantity) then ``sc.pp.log1p``; ``log1p`` only (for TPM/FPKM; ``normalize_total`` first would
   re-close TPM over the kept genes, use ``cpm_log1p`` for that); ``none`` (values already normalised,
   e.g. Xena log2(x+1)). ``auto`` picks ``cpm_log1p`` for counts, ``log1p`` for TPM/FPKM, ``none`` for log.
2. gene selection on the **training patients**: ``sc.pp.highly_variable_genes`` (``seurat_v3`` on raw
   counts, or ``seurat``/``cell_ranger`` on the log values), a user gene list, or all genes. ``seurat``
   undoes the log with ``expm1`` and so must know its base: natural for our ``log1p``, ``log_base`` (2 for
   Xena's log2(x+1)) for values that came in already logged;
3. z-scoring with means and standard deviations from ``sc.pp.scale`` on the **training patients**, then
   applied to every patient (train, val and test). A gene constant in training (std 0, or below 1e-6
   from rounding) gets std 1, as in scanpy.

The fitted parameters (gene list in output order, means, stds, settings) go to ``uns['normalization']``
so :func:`apply_fitted` can transform new samples at inference exactly as the fold's patients were.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from wsiomics.expression.readers import ExpressionInputError, strip_version
from wsiomics.io import json_safe, provenance

#: The fold roles whose patients the gene selection and the z-scores are fitted on.
FIT_ROLES = ("train", "unlabelled")

log = logging.getLogger("wsiomics.expression")

NORMALIZATIONS = ("auto", "cpm_log1p", "log1p", "none")
SELECTIONS = ("hvg", "list", "all")
HVG_FLAVORS = ("auto", "seurat_v3", "seurat", "cell_ranger")
GENE_ORDERS = ("given", "chromosome", "variance")
MIN_STD = 1e-6


@dataclass(frozen=True)
class NormalizeParams:
    """Field names are the ``expression:`` config keys of the normalize rule."""

    normalization: str = "auto"
    target_sum: float = 1e6
    gene_selection: str = "hvg"
    n_top_genes: int = 2000
    hvg_flavor: str = "auto"
    gene_list: str = ""
    scale: bool = True
    max_value: float = 0.0  # clip z-scores to +-max_value; 0 = no clipping
    gene_order: str = "given"
    gene_sets: str = ""
    log_base: float = 2.0  # base of already-logged input (matrix_values: log; Xena HiSeqV2 is log2(x+1))

    def __post_init__(self) -> None:
        for name, allowed in (("normalization", NORMALIZATIONS), ("gene_selection", SELECTIONS),
                              ("hvg_flavor", HVG_FLAVORS), ("gene_order", GENE_ORDERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"expression.{name} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        if self.gene_selection == "list" and not self.gene_list:
            raise ValueError("expression.gene_selection is 'list' but expression.gene_list is empty")
        if not float(self.log_base) > 1:
            raise ValueError(f"expression.log_base must be > 1 (2 for log2(x+1), 2.718281828 for natural log), "
                             f"not {self.log_base!r}")


def resolve(params: NormalizeParams, value_kind: str) -> tuple[str, str]:
    """The concrete (normalization, hvg flavor) for the cohort's kind of values; refuses bad pairings."""
    norm = params.normalization
    if norm == "auto":
        norm = {"counts": "cpm_log1p", "tpm": "log1p", "fpkm": "log1p", "log": "none"}[value_kind]
    if value_kind == "log" and norm != "none":
        raise ExpressionInputError(f"expression.normalization is {norm}, but the values are already "
                                   "log-normalised (matrix_values: log). Fix: normalization: none (or auto).")
    flavor = params.hvg_flavor
    if flavor == "auto":
        flavor = "seurat_v3" if value_kind == "counts" else "seurat"
    if flavor == "seurat_v3" and value_kind != "counts" and params.gene_selection == "hvg":
        raise ExpressionInputError(f"hvg_flavor seurat_v3 needs raw counts, but the values are {value_kind}. "
                                   "Fix: hvg_flavor: seurat (or auto).")
    return norm, flavor


def raw_layer(cohort: ad.AnnData) -> str:
    for name in ("counts", "raw"):
        if name in cohort.layers:
            return name
    raise ExpressionInputError("the cohort table has neither layers['counts'] nor layers['raw']; was it written "
                               "by the expression_cohort rule?")


def lognormalize(raw: np.ndarray, normalization: str, target_sum: float) -> np.ndarray:
    """Per-sample normalisation (nothing fitted): float64 patients x genes."""
    import scanpy as sc

    a = ad.AnnData(X=np.array(raw, dtype=np.float64))
    if normalization == "cpm_log1p":
        sc.pp.normalize_total(a, target_sum=target_sum)
        sc.pp.log1p(a)
    elif normalization == "log1p":
        sc.pp.log1p(a)
    return np.asarray(a.X)


def _gene_list(path: str, var: pd.DataFrame) -> list[str]:
    """Genes of a one-per-line list (# comments; first tab/comma field), matched by ID or name, in list order."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ExpressionInputError(f"{path}: cannot read the gene list ({exc}).") from None
    by_name = pd.Series(var.index, index=var["gene_name"]) if "gene_name" in var else pd.Series(dtype=str)
    by_name = by_name[~by_name.index.duplicated()]
    genes, unknown = [], []
    for number, line in enumerate(lines, 1):
        item = re.split(r"[\t,]", line.split("#", 1)[0].strip())[0].strip()
        if not item or (number == 1 and item.lower() in ("gene", "gene_id", "gene_name", "symbol")):
            continue
        key = strip_version([item])[0]
        if key in var.index:
            genes.append(key)
        elif item in by_name.index:
            genes.append(by_name[item])
        else:
            unknown.append(f"{item} (line {number})")
    genes = list(dict.fromkeys(genes))
    if not genes:
        raise ExpressionInputError(f"{path}: none of its genes is in the cohort (e.g. {unknown[:5]}). Fix: use "
                                   "Ensembl IDs or gene names of the expression files.")
    if unknown:
        log.warning("%s: %d genes not in the cohort are ignored: %s", path, len(unknown), ", ".join(unknown[:10]))
    return genes


def select_genes(train_lognorm: np.ndarray, train_raw: np.ndarray, var: pd.DataFrame, params: NormalizeParams,
                 flavor: str, log_base: float | None = None) -> tuple[list[str], pd.DataFrame]:
    """Selected gene IDs (cohort order, or list order) and per-gene selection statistics; training data only.

    ``log_base``: the base of ``train_lognorm`` when it is not natural (scanpy's ``seurat`` flavour reads it
    from ``uns['log1p']['base']``; without it log2 values are exponentiated as if natural, which skews every
    dispersion and so the gene set).
    """
    import scanpy as sc

    stats = pd.DataFrame(index=var.index)
    if params.gene_selection == "all":
        return list(var.index), stats
    if params.gene_selection == "list":
        return _gene_list(params.gene_list, var), stats
    n_top = int(params.n_top_genes)
    if n_top >= var.shape[0]:
        log.warning("n_top_genes %d >= %d genes: every gene is kept", n_top, var.shape[0])
        return list(var.index), stats
    train = ad.AnnData(X=train_lognorm, layers={"counts": train_raw}, var=pd.DataFrame(index=var.index))
    train.uns["log1p"] = {"base": log_base}  # None: natural log, as sc.pp.log1p writes it
    if flavor == "seurat_v3":
        _check_loess_fit(train_raw)
        try:
            sc.pp.highly_variable_genes(train, flavor="seurat_v3", n_top_genes=n_top, layer="counts")
        except ValueError as exc:  # skmisc's loess on a degenerate mean-variance cloud
            raise ExpressionInputError(f"hvg_flavor seurat_v3 could not fit its mean-variance trend on the training "
                                       f"patients' counts ({exc}). {_SEURAT_V3_FIX}") from None
    else:
        sc.pp.highly_variable_genes(train, flavor=flavor, n_top_genes=n_top)
    hv = train.var
    chosen = hv["highly_variable"].to_numpy().copy()
    if chosen.sum() > n_top:  # dispersion flavours keep every gene tied at the cut-off: break ties by gene order
        score = hv["dispersions_norm"].to_numpy(dtype=np.float64)
        order = np.lexsort((np.arange(len(score)), -np.nan_to_num(score, nan=-np.inf)))
        chosen[:] = False
        chosen[order[:n_top]] = True
    for col in ("highly_variable_rank", "variances_norm", "dispersions_norm", "means", "variances"):
        if col in hv:
            stats[f"hvg_{col}"] = hv[col].to_numpy(dtype=np.float64)
    return list(var.index[chosen]), stats


# skmisc's loess (behind seurat_v3) crashes the process, not with an exception, when fewer than a handful of genes
# vary across the training patients (measured: segfault at 0-3 varying genes, ValueError at 5-10, fine at 30).
MIN_VARYING_GENES_SEURAT_V3 = 30
_SEURAT_V3_FIX = ("Fix: expression.hvg_flavor: seurat (dispersion-based), or expression.gene_selection: all, "
                  "or check that the counts files differ between patients.")


def _check_loess_fit(train_raw: np.ndarray) -> None:
    varying = int((np.ptp(train_raw, axis=0) > 0).sum()) if train_raw.shape[0] > 1 else 0
    if varying < MIN_VARYING_GENES_SEURAT_V3:
        raise ExpressionInputError(f"hvg_flavor seurat_v3: only {varying} genes vary across the "
                                   f"{train_raw.shape[0]} training patients (need {MIN_VARYING_GENES_SEURAT_V3} "
                                   f"for its loess trend). {_SEURAT_V3_FIX}")


_CHROM = {str(i): i for i in range(1, 23)} | {"X": 23, "Y": 24, "M": 25, "MT": 25}


def order_genes(genes: list[str], var: pd.DataFrame, train_lognorm: pd.DataFrame, how: str,
                keep_list_order: bool) -> list[str]:
    """Stable gene order: as given (cohort or list order), by chromosome position, or by training variance."""
    if how == "given":
        return genes if keep_list_order else [g for g in var.index if g in set(genes)]
    base = genes if keep_list_order else [g for g in var.index if g in set(genes)]
    position = pd.Series(np.arange(len(base)), index=base)
    if how == "variance":
        variance = train_lognorm[base].var(axis=0, ddof=1).fillna(0)
        key = pd.DataFrame({"v": -variance.to_numpy(), "i": position.to_numpy()}, index=base)
        return list(key.sort_values(["v", "i"], kind="stable").index)
    if "chromosome" not in var or "start" not in var:
        raise ExpressionInputError("expression.gene_order is chromosome but the cohort has no gene positions. "
                                   "Fix: give expression.gene_annotation (gene_id, chromosome, start) or choose "
                                   "gene_order: given or variance.")
    chrom = var.loc[base, "chromosome"].astype(str).str.replace(r"^chr", "", regex=True, flags=re.IGNORECASE)
    rank = chrom.map(lambda c: _CHROM.get(c.upper(), 100 if c else 1000))
    other = chrom.where(rank == 100, "")  # unplaced contigs, alphabetically after M
    start = pd.to_numeric(var.loc[base, "start"], errors="coerce").fillna(-1)
    key = pd.DataFrame({"r": rank, "o": other, "s": start, "i": position}, index=base)
    return list(key.sort_values(["r", "o", "s", "i"], kind="stable").index)


def read_gene_sets(path: str, var: pd.DataFrame) -> pd.DataFrame:
    """Gene -> group table (columns gene|gene_id|gene_name, group); genes matched by ID or name. Long format."""
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise ExpressionInputError(f"{path}: cannot read the gene-set table ({exc}).") from None
    gene_col = next((c for c in ("gene", "gene_id", "gene_name") if c in df.columns), None)
    if gene_col is None or "group" not in df.columns:
        raise ExpressionInputError(f"{path}, line 1: header {list(df.columns)} needs a gene (or gene_id/gene_name) "
                                   "column and a group column. Fix: tab-separated, one gene-group pair per line.")
    by_name = pd.Series(var.index, index=var.get("gene_name", pd.Series(dtype=str)).to_numpy())
    by_name = by_name[~by_name.index.duplicated()]
    ids = strip_version(df[gene_col])
    matched = [i if i in var.index else by_name.get(g, "") for i, g in zip(ids, df[gene_col], strict=True)]
    out = pd.DataFrame({"gene_id": matched, "group": df["group"].str.strip()})
    empty = out["group"] == ""
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ExpressionInputError(f"{path}, line {i + 2}: empty group. Fix: give every gene a group.")
    n_unknown = int((out["gene_id"] == "").sum())
    if n_unknown:
        log.warning("%s: %d of %d entries name genes not among the selected genes' cohort; ignored", path,
                    n_unknown, len(out))
    return out[out["gene_id"] != ""].drop_duplicates()


def gene_universe_digest(genes: pd.Index) -> str:
    """Identifies the gene set CPM totals are taken over: inference input must have the same genes."""
    return hashlib.sha1("\n".join(map(str, genes)).encode()).hexdigest()


def fit(cohort: ad.AnnData, train: list[str], params: NormalizeParams) -> dict[str, Any]:
    """Everything learned from data, from the training patients' rows only. JSON-safe."""
    import scanpy as sc

    kind = cohort.uns.get("expression", {}).get("values", "counts")
    norm, flavor = resolve(params, kind)
    missing = [p for p in train if p not in cohort.obs_names]
    if missing:
        raise ExpressionInputError(f"training patients {missing[:5]} are not in the cohort table")
    if len(train) < 2:
        raise ExpressionInputError(f"only {len(train)} training patients with expression: need at least 2 to fit "
                                   "gene selection and z-scores. Fix: fewer folds or more patients.")
    layer = raw_layer(cohort)
    rows = cohort.obs_names.get_indexer(train)
    raw = np.asarray(cohort.layers[layer][rows], dtype=np.float64)
    lognorm = lognormalize(raw, norm, params.target_sum)
    log_base = float(params.log_base) if kind == "log" else None  # our own log1p is natural
    genes, stats = select_genes(lognorm, raw, cohort.var, params, flavor, log_base)
    frame = pd.DataFrame(lognorm, columns=cohort.var_names)
    genes = order_genes(genes, cohort.var, frame, params.gene_order, params.gene_selection == "list")

    selected = ad.AnnData(X=frame[genes].to_numpy(dtype=np.float64))
    means = np.zeros(len(genes))
    stds = np.ones(len(genes))
    if params.scale:
        sc.pp.scale(selected)  # fits mean and std on the training rows; we only keep the parameters
        means = selected.var["mean"].to_numpy(dtype=np.float64)
        stds = selected.var["std"].to_numpy(dtype=np.float64)
        flat = ~np.isfinite(stds) | (stds < MIN_STD)
        stds[flat] = 1.0
    hvg = stats.reindex(genes)
    return {
        "normalization": norm,
        "target_sum": float(params.target_sum),
        "values": kind,
        "raw_layer": layer,
        "gene_selection": params.gene_selection,
        "hvg_flavor": flavor if params.gene_selection == "hvg" else "",
        "log_base": log_base,
        "n_top_genes": int(params.n_top_genes),
        "gene_order": params.gene_order,
        "scale": bool(params.scale),
        "max_value": float(params.max_value),
        "genes": list(genes),
        "means": means.tolist(),
        "stds": stds.tolist(),
        "n_constant_genes": int((stds == 1.0).sum() if params.scale else 0),
        "hvg_stats": {c: hvg[c].fillna(-1).tolist() for c in hvg.columns},
        "train_patients": list(train),
        "n_train": len(train),
        "universe_size": int(cohort.n_vars),
        "universe_sha1": gene_universe_digest(cohort.var_names),
        "params": asdict(params),
    }


def apply_fitted(raw: ad.AnnData | np.ndarray, var_names: pd.Index | None, fitted: dict[str, Any],
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(z-scored, log-normalised) values of ``fitted['genes']`` for samples with the cohort's gene universe.

    ``raw``: an AnnData whose raw values are in ``fitted['raw_layer']`` (or X), or an array with
    ``var_names``. The samples must have exactly the cohort's genes (CPM totals are taken over all of them).
    """
    if isinstance(raw, ad.AnnData):
        layer = fitted["raw_layer"]
        values = raw.layers.get(layer, raw.X)
        var_names = raw.var_names
    else:
        values = raw
    if var_names is None or gene_universe_digest(pd.Index(var_names)) != fitted["universe_sha1"]:
        raise ExpressionInputError(f"the samples' genes differ from the cohort's {fitted['universe_size']} genes; "
                                   "harmonise them with the expression_cohort reader first.")
    lognorm = lognormalize(np.asarray(values), fitted["normalization"], fitted["target_sum"])
    cols = pd.Index(var_names).get_indexer(fitted["genes"])
    selected = lognorm[:, cols]
    z = (selected - np.asarray(fitted["means"])) / np.asarray(fitted["stds"]) if fitted["scale"] else selected.copy()
    if fitted["max_value"] > 0:
        np.clip(z, -fitted["max_value"], fitted["max_value"], out=z)
    return z, selected


def normalize_fold(cohort: ad.AnnData, folds: pd.DataFrame, fold: int, params: NormalizeParams) -> ad.AnnData:
    """The fold's AnnData: every cohort patient, X = z-scores of the selected genes, fitted on train only."""
    this = folds[folds["fold"] == fold]
    if this.empty:
        raise ExpressionInputError(f"fold {fold} is not in the folds table (folds {sorted(folds['fold'].unique())})")
    role = this.set_index("patient_id")["role"]
    absent = [p for p in cohort.obs_names if p not in role.index]
    if absent:
        raise ExpressionInputError(f"cohort patients {absent[:5]} are not in the folds table; re-run the splits rule")
    train = [p for p in cohort.obs_names if role[p] in FIT_ROLES]
    fitted = fit(cohort, train, params)
    fitted["fold"] = int(fold)
    z, lognorm = apply_fitted(cohort, None, fitted)
    genes = fitted["genes"]
    var = cohort.var.loc[genes].copy()
    var["mean"] = fitted["means"]
    var["std"] = fitted["stds"]
    var["position"] = np.arange(len(genes))
    for col, values in fitted["hvg_stats"].items():
        var[col] = values
    obs = cohort.obs.copy()
    obs["role"] = role.reindex(obs.index).to_numpy()
    obs["fold"] = int(fold)
    layer = fitted["raw_layer"]
    out = ad.AnnData(X=z.astype(np.float32), obs=obs, var=var,
                     layers={"lognorm": lognorm.astype(np.float32),
                             layer: cohort[:, genes].layers[layer]})
    uns_norm = {k: v for k, v in fitted.items() if k != "hvg_stats"}
    out.uns["normalization"] = uns_norm
    out.uns["expression"] = dict(cohort.uns.get("expression", {}))
    out.uns["provenance"] = json_safe(provenance())
    if params.gene_sets:
        sets = read_gene_sets(params.gene_sets, cohort.var)
        sets = sets[sets["gene_id"].isin(genes)]
        sets = sets.assign(pos=sets["gene_id"].map(var["position"])).sort_values(["group", "pos"], kind="stable")
        out.uns["gene_sets"] = {"gene_id": sets["gene_id"].tolist(), "group": sets["group"].tolist()}
        groups = sets.groupby("gene_id")["group"].apply(lambda g: ";".join(sorted(g)))
        out.var["gene_groups"] = groups.reindex(out.var_names).fillna("").to_numpy()
    log.info("fold %d: %d train (with unlabelled) / %d val / %d test patients with expression; %d genes (%s, %s)",
             fold, len(train),
             int((obs["role"] == "val").sum()), int((obs["role"] == "test").sum()), len(genes),
             fitted["normalization"], params.gene_selection)
    return out
