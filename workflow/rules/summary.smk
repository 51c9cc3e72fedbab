# The cohort summary (wsiomics.summary): every method that ran, each metric as mean ± std over folds and
# pooled over all test patients with a seeded patient-level bootstrap 95% CI; each pretrained method paired
# with its _no_pretrain ablation and the best baseline; a Markdown results table. Read only from what the
# methods wrote (each fold's metrics.json and the task's files beside it). Outputs: README "Summary".


include: "inputs/summary.smk"


rule summarize:
    input:
        model_metrics,
    output:
        metrics=report(
            "results/summary/metrics.tsv",
            caption="../report/metrics_tsv.rst",
            category="Summary",
            labels={"table": "summary/metrics.tsv"},
        ),
        comparisons=report(
            "results/summary/comparisons.tsv",
            caption="../report/comparisons.rst",
            category="Summary",
            labels={"table": "summary/comparisons.tsv"},
        ),
        table=report(
            "results/summary/metrics.md",
            caption="../report/metrics_md.rst",
            category="Summary",
            labels={"table": "summary/metrics.md"},
        ),
    params:
        options=summary_options(),
    log:
        "logs/summary.log",
    benchmark:
        "benchmarks/summary.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m wsiomics.summary --out-dir results/summary {params.options} {input:q} > {log:q} 2>&1"
