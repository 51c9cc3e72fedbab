# Few-shot protocol: per pretrained method and fold, a logistic-regression probe on frozen embeddings (the
# pretrained network's fused, image and gene; the same network untrained; mean-pooled patch features), fitted on
# k labelled training patients per class over seeded draws and scored on the fold's test patients; then a cohort
# summary with 95% CIs and the curves. Outputs: README "Few-shot protocol".


include: "inputs/fewshot.smk"


rule fewshot:
    wildcard_constraints:
        method=PRETRAIN_METHODS,
    input:
        unpack(fewshot_inputs),
    output:
        "results/models/{method}/fold{fold}/fewshot.tsv",
    params:
        options=train_options,
        fewshot=fewshot_options(),
        out_dir=lambda wildcards: f"results/models/{wildcards.method}/fold{wildcards.fold}",
    log:
        "logs/fewshot/{method}/fold{fold}.log",
    benchmark:
        "benchmarks/fewshot/{method}/fold{fold}.tsv"
    threads: TRAIN["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=fewshot_gpu,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m wsiomics.fewshot run --method {wildcards.method} --fold {wildcards.fold}"
        " --folds {input.folds:q} --out-dir {params.out_dir:q} --threads {threads} {params.options}"
        " {params.fewshot} > {log:q} 2>&1"


rule summarize_fewshot:
    input:
        fewshot_tables,
    output:
        summary=report(
            "results/fewshot/summary.tsv",
            caption="../report/fewshot_summary.rst",
            category="Few-shot",
            labels={"table": "few-shot summary"},
        ),
        png=report(
            "results/fewshot/curves.png",
            caption="../report/fewshot_curves.rst",
            category="Few-shot",
            labels={"figure": "few-shot curves"},
        ),
        svg="results/fewshot/curves.svg",
    log:
        "logs/fewshot/summary.log",
    benchmark:
        "benchmarks/fewshot/summary.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m wsiomics.fewshot summarize --out-dir results/fewshot {input:q} > {log:q} 2>&1"
