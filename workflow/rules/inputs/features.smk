# Targets and command-line options of the feature rule (features.smk).
ENCODER = config["features"]["encoder"]

# Feature stores are named by the configured encoder only: the command line takes its options from config.
wildcard_constraints:
    encoder=re.escape(ENCODER),


def feature_stores(wildcards):
    return expand("results/features/{encoder}/{slide_id}.zarr", encoder=ENCODER, slide_id=slide_table().index)


def features_options():
    """The `features:` config section as flags for `python -m wsiomics.features extract` (threads go apart)."""
    f = config["features"]
    flags = [
        "--pretrained" if f["pretrained"] else "--no-pretrained",
        f"--seed {int(f['seed'])}",
        f"--batch-size {shlex.quote(str(f['batch_size']))}",
        f"--num-workers {shlex.quote(str(f['num_workers']))}",
        f"--chunk-rows {int(f['chunk_rows'])}",
        "--channels-last" if f["channels_last"] else "--no-channels-last",
    ]
    # Enumerated or pattern-checked by the schema; quoted anyway since they reach a shell.
    flags += [f"--{key} {shlex.quote(str(f[key]).lower())}" for key in ("precision", "device", "dtype", "compile")]
    if f["weights"]:
        flags.append(f"--weights {shlex.quote(f['weights'])}")
    return " ".join(flags)


if not config["features"]["pretrained"]:
    logger.warning(
        f"features.pretrained is false: {ENCODER} runs with RANDOM weights. Fine for the demo and tests; "
        "for real results set features.pretrained: true (and features.weights on an offline machine)."
    )


@stage_targets
def features_targets(wildcards):
    return feature_stores(wildcards)
