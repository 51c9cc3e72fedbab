# Targets, input functions and command-line options of the feature rules (features.smk).
ENCODER = config["features"]["encoder"]

# Feature stores are named by the configured encoder only: the command line takes its options from config.
wildcard_constraints:
    encoder=re.escape(ENCODER),


def feature_stores(wildcards):
    return expand("results/features/{encoder}/{slide_id}.zarr", encoder=ENCODER, slide_id=slide_table().index)


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
    options = stage_options("features", skip=("encoder", "threads", "weights"))
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
