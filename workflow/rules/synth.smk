# The built-in synthetic demo cohort. A checkpoint: the slides (and so the tile jobs) are known only
# once it has run. Input functions in common.smk call checkpoints.synth_cohort.get() only when
# config["samples"] is the demo sheet and it does not exist yet; otherwise this rule is not in the DAG.


include: "inputs/synth.smk"


checkpoint synth_cohort:
    output:
        sheet=DEMO_SHEET,
    params:
        out=lambda wildcards, output: os.path.dirname(output.sheet),
        options=synth_options(),
    log:
        "logs/synth_cohort.log",
    threads: config["synth"]["workers"]
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/slides.yaml"
    shell:
        "python -m wsiomics.synth --out {params.out} {params.options} --workers {threads} > {log} 2>&1"
