# Command-line options of the demo cohort checkpoint (synth.smk).


def synth_options():
    """The `synth:` config section as flags for `python -m wsiomics.synth` (workers go as threads)."""
    synth = config["synth"]
    flags = [
        f"--n-patients {int(synth['n_patients'])}",
        f"--seed {int(synth['seed'])}",
        f"--signal {shlex.quote(synth['signal'])}",
        f"--slide-width-um {float(synth['slide_width_um'])!r}",
        f"--slide-height-um {float(synth['slide_height_um'])!r}",
        f"--n-genes {int(synth['n_genes'])}",
        f"--fraction-40x {float(synth['fraction_40x'])!r}",
        f"--fraction-pen {float(synth['fraction_pen'])!r}",
    ]
    if not synth["faults"]:
        flags.append("--no-faults")
    return " ".join(flags)
