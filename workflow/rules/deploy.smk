# Deployment: the run's fold models applied to a new cohort (config deploy: {name, samples}). The new cohort's
# slides go through the run's own tiling and feature rules, in results/deploy/<name>/ (so its slide ids cannot
# collide with the run's); its RNA through the run's cohort reader, then each fold's fitted normalisation (in
# `predict`, never refitted). Outputs: README "Applying a trained model to a new cohort".


include: "inputs/deploy.smk"


if DEPLOY_NAME:

    ruleorder: deploy_import_features > deploy_extract_features

    use rule tile as deploy_tile with:
        input:
            slide=deploy_slide_path,
        output:
            tiles=directory(f"{DEPLOY_DIR}/tiles/{{slide_id}}.zarr"),
            qc=f"{DEPLOY_DIR}/qc/tiles/{{slide_id}}.png",
        params:
            patient=deploy_patient_of,
            mpp=deploy_mpp_option,
            strict="--strict" if config["strict"] else "",
            options=tiling_options(),
        log:
            f"logs/deploy/{DEPLOY_NAME}/tile/{{slide_id}}.log",
        benchmark:
            f"benchmarks/deploy/{DEPLOY_NAME}/tile/{{slide_id}}.tsv"

    use rule extract_features as deploy_extract_features with:
        input:
            tiles=f"{DEPLOY_DIR}/tiles/{{slide_id}}.zarr",
            slide=deploy_slide_path,
            weights=weights_input,
        output:
            directory(f"{DEPLOY_DIR}/features/{{encoder}}/{{slide_id}}.zarr"),
        log:
            f"logs/deploy/{DEPLOY_NAME}/extract_features/{{encoder}}/{{slide_id}}.log",
        benchmark:
            f"benchmarks/deploy/{DEPLOY_NAME}/extract_features/{{encoder}}/{{slide_id}}.tsv"

    use rule import_features as deploy_import_features with:
        input:
            source=deploy_features_source,
        output:
            directory(f"{DEPLOY_DIR}/features/{{encoder}}/{{slide_id}}.zarr"),
        params:
            patient=deploy_patient_of,
            options=import_options(),
        log:
            f"logs/deploy/{DEPLOY_NAME}/import_features/{{encoder}}/{{slide_id}}.log",
        benchmark:
            f"benchmarks/deploy/{DEPLOY_NAME}/import_features/{{encoder}}/{{slide_id}}.tsv"

    # The new cohort's raw expression table, read as the run's (expression: settings) from the sheet's
    # expression_path files, so its genes are the run's gene universe.
    use rule expression_cohort as deploy_expression_cohort with:
        input:
            sheet=DEPLOY["samples"],
            files=deploy_expression_files,
            **({"annotation": config["expression"]["gene_annotation"]} if config["expression"]["gene_annotation"] else {}),
        output:
            directory(f"{DEPLOY_DIR}/expression/cohort.zarr"),
        params:
            matrix="",
            annotation=expression_path_option("gene_annotation", "--gene-annotation"),
            options=expression_cohort_options(),
        log:
            f"logs/deploy/{DEPLOY_NAME}/expression_cohort.log",
        benchmark:
            f"benchmarks/deploy/{DEPLOY_NAME}/expression_cohort.tsv"

    rule predict:
        wildcard_constraints:
            method=CLASSIFY_METHODS,
        input:
            unpack(deploy_inputs),
        output:
            predictions=report(
                f"{DEPLOY_DIR}/{{method}}/predictions.tsv",
                caption="../report/deploy_predictions.rst",
                category="Deployment",
                subcategory="{method}",
            ),
            folds=f"{DEPLOY_DIR}/{{method}}/fold_predictions.tsv",
            metrics=f"{DEPLOY_DIR}/{{method}}/metrics.json",
            attention=directory(f"{DEPLOY_DIR}/{{method}}/attention"),
        params:
            options=deploy_options,
            out_dir=lambda wildcards: f"{DEPLOY_DIR}/{wildcards.method}",
        log:
            f"logs/deploy/{DEPLOY_NAME}/{{method}}/predict.log",
        benchmark:
            f"benchmarks/deploy/{DEPLOY_NAME}/{{method}}/predict.tsv"
        threads: TRAIN["threads"]
        resources:
            mem_mb=8000,
            runtime=60,
            gpu=train_gpu,
        conda:
            "../../envs/train.yaml"
        shell:
            "python -m wsiomics.train predict --method {wildcards.method} --samples {input.samples:q}"
            " --out-dir {params.out_dir:q} --threads {threads} {params.options} > {log:q} 2>&1"

    # Segmentation methods: the fold ensemble's tumour map of every deploy slide (as the fine-tune's tumour/),
    # one row per slide in tumour_slides.tsv, Dice in metrics.json where the deploy sheet has annotations.
    use rule predict as predict_tumour with:
        wildcard_constraints:
            method=SEGMENT_METHODS,
        output:
            slides=report(
                f"{DEPLOY_DIR}/{{method}}/tumour_slides.tsv",
                caption="../report/deploy_tumour_slides.rst",
                category="Deployment",
                subcategory="{method}",
            ),
            metrics=f"{DEPLOY_DIR}/{{method}}/metrics.json",
            tumour=report(
                directory(f"{DEPLOY_DIR}/{{method}}/tumour"),
                patterns=["{slide_id}.png"],
                caption="../report/deploy_tumour_map.rst",
                category="Deployment",
                subcategory="{method}",
                labels={"slide": "{slide_id}"},
            ),
        log:
            f"logs/deploy/{DEPLOY_NAME}/{{method}}/predict_tumour.log",
        benchmark:
            f"benchmarks/deploy/{DEPLOY_NAME}/{{method}}/predict_tumour.tsv"

    # Survival networks: the ensemble risk of every deploy patient (each fold's risk as a percentile of its fitted
    # patients' risks, averaged), fold_risks.tsv, and the c-index in metrics.json where the sheet has follow-up.
    use rule predict as predict_risks with:
        wildcard_constraints:
            method=SURVIVAL_METHODS,
        output:
            risks=report(
                f"{DEPLOY_DIR}/{{method}}/risks.tsv",
                caption="../report/deploy_risks.rst",
                category="Deployment",
                subcategory="{method}",
            ),
            folds=f"{DEPLOY_DIR}/{{method}}/fold_risks.tsv",
            metrics=f"{DEPLOY_DIR}/{{method}}/metrics.json",
        log:
            f"logs/deploy/{DEPLOY_NAME}/{{method}}/predict_risks.log",
        benchmark:
            f"benchmarks/deploy/{DEPLOY_NAME}/{{method}}/predict_risks.tsv"
