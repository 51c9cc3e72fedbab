# Input functions, targets and command-line options of the tiling rules (tiling.smk).


def slide_path(wildcards):
    slide = _slide(wildcards)
    if slide["features_path"]:
        return not_produced(wildcards, "features imported from the sheet's features_path, not tiled")
    return slide["slide_path"]


def patient_of(wildcards):
    return _slide(wildcards)["patient_id"]


def mpp_option(wildcards):
    """`--mpp X` when the sheet overrides the slide's resolution, else nothing (use the metadata)."""
    mpp = slide_mpp_override(_slide(wildcards))
    return "" if mpp is None else f"--mpp {mpp!r}"


def tile_stores(wildcards):
    return expand("results/tiles/{slide_id}.zarr", slide_id=tiled_slides())


def tiling_options():
    """The `tiling:` config section (mask keys as --mask-...) as flags for `python -m wsiomics.tiling tile`."""
    return stage_options("tiling")


@stage_targets
def tiling_targets(wildcards):
    return expand("results/qc/tiles/{slide_id}.png", slide_id=tiled_slides())
