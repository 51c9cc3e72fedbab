# Targets, input functions and command-line options of the feature rules (features.smk).
ENCODER = config["features"]["encoder"]

# Feature stores are named by the configured encoder only: the command line takes its options from config.
wildcard_constraints:
    encoder=re.escape(ENCODER),


def feature_stores(wildcards):
    return expand("results/features/{encoder}/{slide_id}.zarr", encoder=ENCODER, slide_id=slide_table().index)


SLIDES_PER_JOB = int(config["features"]["slides_per_job"])
# Where the batches stage their stores: each slide's store is written here, then hard-linked to its usual path by
# place_features. The staged copy stays (hard links: no extra space), so a batch that runs again (killed, one
# slide re-tiled, a failed slide fixed) skips its slides whose staged store is still current.
BATCH_DIR = f"results/features/{ENCODER}/.batches"


def extraction_batches():
    """batch id -> slide_ids: the tiled slides in sheet order, SLIDES_PER_JOB at a time."""
    slides = list(tiled_slides())
    return {f"b{i // SLIDES_PER_JOB:05d}": slides[i : i + SLIDES_PER_JOB] for i in range(0, len(slides), SLIDES_PER_JOB)}


def batch_slides(wildcards):
    batches = extraction_batches()
    if wildcards.batch not in batches:
        raise WorkflowError(f"{BATCH_DIR}/{wildcards.batch}: no such extraction batch (the sheet has {len(batches)})")
    return batches[wildcards.batch]


def batch_input(kind):
    """Input function: the tiles stores (kind tiles) or slide files (kind slides) of the batch's slides."""

    def files(wildcards):
        ids = batch_slides(wildcards)
        if kind == "tiles":
            return [f"results/tiles/{slide_id}.zarr" for slide_id in ids]
        return [slide_table().at[slide_id, "slide_path"] for slide_id in ids]

    return files


def staged_store(slide_id):
    return f"{BATCH_DIR}/{slide_id}.zarr"


def batch_outputs(wildcards):
    """The staged stores the batch job writes, one per --tiles."""
    return [staged_store(slide_id) for slide_id in batch_slides(wildcards)]


def single_slide_tiles(wildcards):
    """extract_features's tiles store; with slides_per_job > 1 an input no rule makes (the batch makes it)."""
    if SLIDES_PER_JOB > 1:
        return not_produced(wildcards, f"features.slides_per_job is {SLIDES_PER_JOB}: extracted in a batch")
    return f"results/tiles/{wildcards.slide_id}.zarr"


def batch_of(wildcards):
    """The done-marker of the extraction batch that encodes this slide; with slides_per_job: 1 an input no rule
    makes (extract_features makes the store)."""
    if SLIDES_PER_JOB == 1:
        return not_produced(wildcards, "features.slides_per_job is 1: one extraction job per slide")
    for batch, ids in extraction_batches().items():
        if wildcards.slide_id in ids:
            return f"{BATCH_DIR}/{batch}.done"
    return not_produced(wildcards, "not a tiled slide of the sheet")


def place_store(slide_id, batch_done, out, log_path):
    """place_features: hard-link the slide's staged store to its usual path (copy where the filesystem has no hard
    links), atomically (a temporary sibling renamed into place). No staged store: the slide failed in its batch."""
    staged = staged_store(slide_id)
    batch_log = f"logs/extract_features/{ENCODER}/{os.path.basename(batch_done)[: -len('.done')]}.log"
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    if not os.path.isfile(os.path.join(staged, "zarr.json")):
        message = (f"place_features: {slide_id} failed in its batch, no store was written: see {batch_log}. Fix "
                   f"the slide (damaged tiles: delete results/tiles/{slide_id}.zarr) and re-run: its batch runs "
                   "again and encodes only the slides whose staged store is not current")
        with open(log_path, "w") as log_file:
            print(message, file=log_file)
        raise WorkflowError(message)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    tmp = f"{out}.placing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(staged, tmp, copy_function=link)
    os.replace(tmp, out)
    with open(log_path, "w") as log_file:
        print(f"{slide_id}: {staged} -> {out}", file=log_file)


def features_source(wildcards):
    """The sheet's features_path of an imported slide; for any other slide an input that does not exist, so
    import_features is passed over and extract_features makes the store."""
    source = _slide(wildcards)["features_path"]
    return source or not_produced(wildcards, "no features_path in the sample sheet (its features are extracted)")


def import_options():
    """Store dtype and chunking of imported features, as extraction's (features.dtype, features.chunk_rows)."""
    return f"--dtype {config['features']['dtype']} --chunk-rows {int(config['features']['chunk_rows'])}"


# As wsiomics.encoders.weights.is_checkpoint_path (not imported: it needs torch): a weights spec that names a file.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")


def weights_input(wildcards):
    """A local `features.weights` checkpoint is an input of every extraction job: replacing the file re-extracts,
    and a missing one stops the run before any job. A hub name is not a file here (the job resolves it)."""
    spec = config["features"]["weights"]
    if spec and (os.path.exists(os.path.expanduser(spec)) or spec.lower().endswith(CHECKPOINT_SUFFIXES)
                 or spec.startswith((".", os.sep, "~"))):
        return [os.path.expanduser(spec)]
    return []


def features_options():
    """The `features:` config section as flags for `python -m wsiomics.features extract` (the encoder is a
    wildcard, threads are the rule's, a local weights file is an input)."""
    options = stage_options("features", skip=("encoder", "threads", "weights", "slides_per_job"))
    weights = config["features"]["weights"]
    return f"{options} --weights {shlex.quote(weights)}" if weights else options


if workflow.is_main_process and not config["features"]["pretrained"]:
    logger.warning(
        f"features.pretrained is false: {ENCODER} runs with RANDOM weights. Fine for the demo and tests; "
        "for real results set features.pretrained: true (and features.weights on an offline machine)."
    )


SLIDE_STATUS = "results/qc/slide_status.tsv"


@stage_targets
def features_targets(wildcards):
    return [*feature_stores(wildcards), SLIDE_STATUS]


def report_feature_precisions():
    """At the end of a run: warn on the console when the cohort's feature stores differ in precision."""
    if not os.path.isfile(SLIDE_STATUS):
        return
    import pandas as pd

    from wsiomics.status import precision_report

    mixed = precision_report(pd.read_csv(SLIDE_STATUS, sep="\t", dtype=str, keep_default_na=False))
    if mixed:
        logger.warning(f"{SLIDE_STATUS}: {mixed}")
