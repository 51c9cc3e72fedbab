"""Every pinned dependency is imported by wsiomics (or its workflow, tests, benches) or is needed at run time
for a stated reason: a pin nothing uses only costs install time and conda solves."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Used without an `import` of their own, and why.
RUNTIME_ONLY = {
    "openslide-bin": "the OpenSlide C library that openslide-python loads",
    "snakemake-executor-plugin-slurm": "snakemake's `executor: slurm` (workflow/profiles/slurm)",
    "numcodecs": "zarr's codecs, pinned because zarr accepts a range",
    "jsonschema": "snakemake.utils.validate checks the config and the sheet against workflow/schemas",
    "imagecodecs": "tifffile's JPEG codec, which writes the synthetic slides",
    "scikit-misc": "the loess fit of scanpy's seurat_v3 gene selection",
}
IMPORT = re.compile(r"^\s*(?:from|import)\s+([A-Za-z_]\w*)", re.MULTILINE)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> list[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [_norm(re.split(r"[=<>!~\[; ]", d, maxsplit=1)[0]) for d in deps]


def _imported_modules() -> set[str]:
    files = [*REPO.glob("src/**/*.py"), *REPO.glob("tests/**/*.py"), *REPO.glob("bench/**/*.py"),
             *REPO.glob("workflow/**/*.smk"), REPO / "Snakefile"]
    return {m for f in files for m in IMPORT.findall(f.read_text(encoding="utf-8"))}


def test_every_pinned_dependency_is_imported_or_needed_at_run_time():
    modules_of: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(_norm(dist), set()).add(module)
    imported = _imported_modules()
    pins = _pins()
    unused = [p for p in pins if p not in RUNTIME_ONLY and not modules_of.get(p, set()) & imported]
    assert not unused, (f"pinned in pyproject.toml but never imported: {unused}; use them or drop them "
                        "(and their envs/*.yaml lines)")
    assert set(RUNTIME_ONLY) <= set(pins), f"stale RUNTIME_ONLY entries: {set(RUNTIME_ONLY) - set(pins)}"
