"""Per-patient gene-count files in the GDC STAR "augmented_star_gene_counts" layout.

Counts are negative-binomial around gene-specific means with per-patient library sizes; two expression
programmes (sets of genes raised four-fold) carry the gene-side class signal; a latent gene set follows
each patient's continuous latent factors (log2 fold change 2 x factor), the signal shared with the slides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

GDC_COLUMNS = ["gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second",
               "tpm_unstranded", "fpkm_unstranded", "fpkm_uq_unstranded"]
STAR_SUMMARY_ROWS = ["N_unmapped", "N_multimapping", "N_noFeature", "N_ambiguous"]
GENE_TYPES = (["protein_coding"] * 7) + ["lncRNA", "lncRNA", "processed_pseudogene"]


@dataclass(frozen=True)
class GeneModel:
    """The synthetic genome: identifiers, lengths, baseline means and the two programmes."""

    gene_id: np.ndarray
    gene_name: np.ndarray
    gene_type: np.ndarray
    length_bp: np.ndarray
    base_mean: np.ndarray
    programmes: tuple[np.ndarray, np.ndarray]
    latent_genes: tuple[np.ndarray, np.ndarray]  # genes following latent factor 0 and 1


def gene_model(n_genes: int, seed: int, programme_size: int = 40) -> GeneModel:
    """A reproducible gene set with versioned Ensembl-style IDs."""
    rng = np.random.default_rng(seed)
    ids = np.array([f"ENSG{100000 + 7 * i:011d}.{1 + i % 17}" for i in range(n_genes)])
    names = np.array([f"SYN{i:05d}" for i in range(n_genes)])
    types = np.array(GENE_TYPES)[rng.integers(0, len(GENE_TYPES), n_genes)]
    coding = np.flatnonzero(types == "protein_coding")
    size = min(programme_size, len(coding) // 2)
    chosen = rng.choice(coding, 2 * size, replace=False)
    lengths, base = rng.integers(400, 12000, n_genes), np.exp(rng.normal(3.0, 1.8, n_genes))
    # Latent genes: drawn after everything else so cohorts without latent factors are unchanged.
    rest = np.setdiff1d(coding, chosen)
    latent = np.random.default_rng([seed, 11]).choice(rest, min(2 * size, len(rest) // 2 * 2), replace=False)
    half = len(latent) // 2
    return GeneModel(ids, names, types, lengths, base, (np.sort(chosen[:size]), np.sort(chosen[size:])),
                     (np.sort(latent[:half]), np.sort(latent[half:])))


def sample_counts(model: GeneModel, programme: int, rng: np.random.Generator,
                  dispersion: float = 0.15, latent: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """One patient's unstranded counts: gamma-Poisson (negative binomial) draws."""
    mean = model.base_mean * np.exp(rng.normal(0, 0.3))  # library size
    mean = mean.copy()
    mean[model.programmes[programme]] *= 4.0
    for genes, factor in zip(model.latent_genes, latent, strict=True):
        mean[genes] *= 2.0 ** (2.0 * factor)
    lam = rng.gamma(1.0 / dispersion, mean * dispersion)
    return rng.poisson(lam).astype(np.int64)


def write_gdc_counts(path: str | Path, model: GeneModel, counts: np.ndarray, rng: np.random.Generator) -> Path:
    """Write a TSV exactly as GDC's STAR workflow does: comment, header, N_* rows, then genes."""
    first = rng.binomial(counts, 0.02)
    second = counts - rng.binomial(counts, 0.01)
    rate = counts / (model.length_bp / 1e3)
    tpm = rate / rate.sum() * 1e6
    fpkm = counts * 1e9 / (model.length_bp * counts.sum())
    coding = model.gene_type == "protein_coding"
    upper_quartile = max(1.0, float(np.percentile(counts[coding], 75)))
    fpkm_uq = counts * 1e9 / (model.length_bp * upper_quartile)
    total = int(counts.sum())
    lines = ["# gene-model: GENCODE v36", "\t".join(GDC_COLUMNS)]
    for i, name in enumerate(STAR_SUMMARY_ROWS):
        v = int(total * (0.02 + 0.01 * i))
        lines.append(f"{name}\t\t\t{v}\t{v}\t{v}\t\t\t")
    for i in range(len(counts)):
        lines.append(f"{model.gene_id[i]}\t{model.gene_name[i]}\t{model.gene_type[i]}\t{counts[i]}\t{first[i]}\t"
                     f"{second[i]}\t{tpm[i]:.4f}\t{fpkm[i]:.4f}\t{fpkm_uq[i]:.4f}")
    path = Path(path)
    path.write_text("\n".join(lines) + "\n")
    return path
