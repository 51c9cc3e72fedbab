# Targets and command-line options of the feature rule (features.smk).
ENCODER = config["features"]["encoder"]

# Feature stores are named by the configured encoder only: the command line takes its options from config.
wildcard_constraints:
    encoder=re.escape(ENCODER),


def feature_stores(wildcards):
    return expand("results/features/{encoder}/{slide_id}.zarr", encoder=ENCODER, slide_id=slide_table().index)


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


@stage_targets
def features_targets(wildcards):
    return feature_stores(wildcards)
