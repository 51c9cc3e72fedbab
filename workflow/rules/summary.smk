# The cohort summary (wsiomics.summary): every method that ran, each metric as mean ± std over folds and
# pooled over all test patients with a seeded patient-level bootstrap 95% CI; each pretrained method paired
# with its _no_pretrain ablation and the best baseline; a Markdown results table. Read only from what the
# methods wrote (each fold's metrics.json and the task's files beside it). Outputs: README "Summary".


include: "inputs/summary.smk"


rule summarize:
    input:
        model_metrics,
    output:
        metrics="results/summary/metrics.tsv",
        comparisons="results/summary/comparisons.tsv",
        table="results/summary/metrics.md",
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
