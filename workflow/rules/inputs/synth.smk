# Command-line options of the demo cohort checkpoint (synth.smk).


def synth_options():
    """The `synth:` config section as flags for `python -m wsiomics.synth` (workers go as threads)."""
    return stage_options("synth", skip=("workers",))
