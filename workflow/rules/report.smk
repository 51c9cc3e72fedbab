# The Snakemake report (README "Report"): every figure and table of the stages is flagged with report(...)
# in its own rule, with a caption in workflow/report/; this stage writes the landing page's text (the
# results table, slide status, package versions, configuration), which workflow/report/workflow.rst
# includes. `make demo` then writes results/report.html (python -m wsiomics.report html).


include: "inputs/report.smk"


rule report_landing:
    input:
        unpack(landing_inputs),
    output:
        landing=report(
            LANDING,
            caption="../report/landing.rst",
            category="Summary",
            labels={"table": "landing page text"},
        ),
        metadata=LANDING_METADATA,
    params:
        options=landing_options,
        config=config_json(),
    log:
        "logs/report_landing.log",
    benchmark:
        "benchmarks/report_landing.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m wsiomics.report landing {params.options} --config-json {params.config:q} --out {output.landing:q}"
        " > {log:q} 2>&1"
