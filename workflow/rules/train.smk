# Training: per method and fold, an optional pretraining stage and the fine-tune + evaluation on the
# fold's test patients. A method is a name plus a configuration (python -m wsiomics.train methods);
# `train.run` lists those the workflow runs. Outputs: README "Training and evaluation".


include: "inputs/train.smk"


rule pretrain:
    wildcard_constraints:
        method=PRETRAIN_METHODS,
    input:
        unpack(train_inputs),
    output:
        model="results/models/{method}/fold{fold}/pretrain/model.pt",
        history="results/models/{method}/fold{fold}/pretrain/history.tsv",
        curve=report(
            "results/models/{method}/fold{fold}/pretrain/loss_curve.png",
            caption="../report/loss_curve.rst",
            category="Models",
            subcategory="{method}",
            labels={"stage": "pretrain", "fold": "{fold}"},
        ),
        metrics="results/models/{method}/fold{fold}/pretrain/metrics.json",
        embeddings=directory("results/models/{method}/fold{fold}/pretrain/embeddings.zarr"),
    params:
        options=train_options,
        config=lambda wildcards: method_config(TRAIN, wildcards.method),
        out_dir=lambda wildcards: f"results/models/{wildcards.method}/fold{wildcards.fold}",
    log:
        "logs/train/{method}/fold{fold}/pretrain.log",
    benchmark:
        "benchmarks/train/{method}/fold{fold}/pretrain.tsv"
    threads: TRAIN["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=train_gpu,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m wsiomics.train pretrain --method {wildcards.method} --fold {wildcards.fold}"
        " --folds {input.folds:q} --out-dir {params.out_dir:q} --threads {threads} {params.options} > {log:q} 2>&1"


rule finetune:
    wildcard_constraints:
        method=CLASSIFY_METHODS,
    input:
        unpack(finetune_inputs),
    output:
        metrics="results/models/{method}/fold{fold}/metrics.json",
        predictions="results/models/{method}/fold{fold}/predictions.tsv",
        embeddings=directory("results/models/{method}/fold{fold}/embeddings.zarr"),
        attention=directory("results/models/{method}/fold{fold}/attention"),
        history="results/models/{method}/fold{fold}/history.tsv",
        curve=report(
            "results/models/{method}/fold{fold}/loss_curve.png",
            caption="../report/loss_curve.rst",
            category="Models",
            subcategory="{method}",
            labels={"stage": "fine-tune", "fold": "{fold}"},
        ),
    params:
        options=train_options,
        config=lambda wildcards: method_config(TRAIN, wildcards.method),
        out_dir=lambda wildcards: f"results/models/{wildcards.method}/fold{wildcards.fold}",
    log:
        "logs/train/{method}/fold{fold}/finetune.log",
    benchmark:
        "benchmarks/train/{method}/fold{fold}/finetune.tsv"
    threads: TRAIN["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=train_gpu,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m wsiomics.train finetune --method {wildcards.method} --fold {wildcards.fold}"
        " --folds {input.folds:q} --out-dir {params.out_dir:q} --threads {threads} {params.options} > {log:q} 2>&1"


# Tumour segmentation (task "segment" methods): tile labels from the sheet's GeoJSON annotations; a tumour map
# (zarr + PNG) per test slide; Dice per slide and pooled. mgi_seg starts from the fold's pretrained mgi.
rule finetune_segmentation:
    wildcard_constraints:
        method=SEGMENT_METHODS,
    input:
        unpack(segmentation_inputs),
    output:
        metrics="results/models/{method}/fold{fold}/metrics.json",
        tumour=report(
            directory("results/models/{method}/fold{fold}/tumour"),
            patterns=["{slide_id}.png"],
            caption="../report/tumour_map_fold.rst",
            category="Segmentation",
            subcategory="{method}",
            labels={"slide": "{slide_id}", "fold": "{fold}"},
        ),
        history="results/models/{method}/fold{fold}/history.tsv",
        curve=report(
            "results/models/{method}/fold{fold}/loss_curve.png",
            caption="../report/loss_curve.rst",
            category="Models",
            subcategory="{method}",
            labels={"stage": "fine-tune", "fold": "{fold}"},
        ),
    params:
        options=train_options,
        config=lambda wildcards: method_config(TRAIN, wildcards.method),
        out_dir=lambda wildcards: f"results/models/{wildcards.method}/fold{wildcards.fold}",
    log:
        "logs/train/{method}/fold{fold}/finetune.log",
    benchmark:
        "benchmarks/train/{method}/fold{fold}/finetune.tsv"
    threads: TRAIN["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=train_gpu,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m wsiomics.train finetune --method {wildcards.method} --fold {wildcards.fold}"
        " --folds {input.folds:q} --out-dir {params.out_dir:q} --threads {threads} {params.options} > {log:q} 2>&1"


# Survival (task "survival" methods): follow-up from the sheet's time and event columns; per fold the patients'
# risks (risks.tsv), c-index / td-AUC / IBS in metrics.json and a Kaplan-Meier figure of the test patients.
rule finetune_survival:
    wildcard_constraints:
        method=SURVIVAL_METHODS,
    input:
        unpack(survival_inputs),
    output:
        metrics="results/models/{method}/fold{fold}/metrics.json",
        risks="results/models/{method}/fold{fold}/risks.tsv",
        km=report(
            "results/models/{method}/fold{fold}/km.png",
            caption="../report/km_fold.rst",
            category="Survival",
            subcategory="{method}",
            labels={"fold": "{fold}"},
        ),
        history="results/models/{method}/fold{fold}/history.tsv",
        curve=report(
            "results/models/{method}/fold{fold}/loss_curve.png",
            caption="../report/loss_curve.rst",
            category="Models",
            subcategory="{method}",
            labels={"stage": "fine-tune", "fold": "{fold}"},
        ),
    params:
        options=train_options,
        config=lambda wildcards: method_config(TRAIN, wildcards.method),
        out_dir=lambda wildcards: f"results/models/{wildcards.method}/fold{wildcards.fold}",
    log:
        "logs/train/{method}/fold{fold}/finetune.log",
    benchmark:
        "benchmarks/train/{method}/fold{fold}/finetune.tsv"
    threads: TRAIN["threads"]
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=train_gpu,
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m wsiomics.train finetune --method {wildcards.method} --fold {wildcards.fold}"
        " --folds {input.folds:q} --out-dir {params.out_dir:q} --threads {threads} {params.options} > {log:q} 2>&1"


rule summarize_models:
    input:
        model_metrics,
    output:
        report(
            "results/models/summary.tsv",
            caption="../report/models_summary.rst",
            category="Summary",
            labels={"table": "models/summary.tsv"},
        ),
    log:
        "logs/train/summary.log",
    benchmark:
        "benchmarks/train/summary.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    localrule: True
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m wsiomics.train summarize --out {output:q} {input:q} > {log:q} 2>&1"
