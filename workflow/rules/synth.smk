# The built-in synthetic demo cohort, generated only when config["samples"] points at it.


checkpoint synth_cohort:
    output:
        sheet="results/demo_cohort/samples.tsv",
    params:
        options=synth_options(),
    log:
        "logs/synth_cohort.log",
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/slides.yaml"
    shell:
        "python -m wsiomics.synth --out results/demo_cohort {params.options} --workers {threads} > {log} 2>&1"
