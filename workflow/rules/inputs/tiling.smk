# Input functions, targets and command-line options of the tiling rules (tiling.smk).
from wsiomics.tiling import MaskParams, TilingParams


def slide_path(wildcards):
    return _slide(wildcards)["slide_path"]


def patient_of(wildcards):
    return _slide(wildcards)["patient_id"]


def mpp_option(wildcards):
    """`--mpp X` when the sheet overrides the slide's resolution, else nothing (use the metadata)."""
    mpp = slide_mpp_override(_slide(wildcards))
    return "" if mpp is None else f"--mpp {mpp!r}"


def tile_stores(wildcards):
    return expand("results/tiles/{slide_id}.zarr", slide_id=slide_table().index)


# config key -> (flag, type) for `python -m wsiomics.tiling tile`, derived from the same dataclasses the
# command line is built from. A fixed whitelist: values are formatted from schema-validated numbers and
# booleans, never evaluated or passed through as text.
_TYPES = {"int": int, "float": float, "bool": bool}


def _whitelist(cls, prefix=""):
    return {
        f.name: (f"--{prefix}{f.name.replace('_', '-')}", _TYPES[str(f.type)])
        for f in dataclass_fields(cls)
        if str(f.type) in _TYPES
    }


TILING_FLAGS = _whitelist(TilingParams)
TILING_MASK_FLAGS = _whitelist(MaskParams, prefix="mask-")


def _flags(section, values, whitelist):
    out = []
    for key, value in values.items():
        if key not in whitelist:
            raise WorkflowError(f"config {section}.{key}: unknown key (allowed: {', '.join(whitelist)})")
        flag, kind = whitelist[key]
        if kind is bool:
            if not isinstance(value, bool):
                raise WorkflowError(f"config {section}.{key}: {value!r} is not true/false")
            out.append(flag if value else flag.replace("--", "--no-", 1))
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise WorkflowError(f"config {section}.{key}: {value!r} is not a number")
            out.append(f"{flag} {kind(value)!r}")
    return out


def tiling_options():
    """The `tiling:` config section as flags for `python -m wsiomics.tiling tile`."""
    tiling = dict(config["tiling"])
    mask = tiling.pop("mask", {})
    flags = _flags("tiling", tiling, TILING_FLAGS) + _flags("tiling.mask", mask, TILING_MASK_FLAGS)
    return " ".join(flags)


@stage_targets
def tiling_targets(wildcards):
    ids = slide_table().index
    return ["results/qc/slide_status.tsv", *expand("results/qc/tiles/{slide_id}.png", slide_id=ids)]
