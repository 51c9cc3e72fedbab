# Gene expression: the cohort table (patients x genes, raw values) and one normalised table per fold whose
# gene selection and z-scores are fitted on that fold's training patients (folds: splits.smk). Outputs are
# AnnData zarr stores (anndata.read_zarr); see README "Expression stage".

include: "inputs/expression.smk"


rule expression_cohort:
    input:
        unpack(expression_cohort_inputs),
    output:
        directory("results/expression/cohort.zarr"),
    params:
        matrix=expression_path_option("matrix", "--matrix"),
        annotation=expression_path_option("gene_annotation", "--gene-annotation"),
        options=expression_cohort_options(),
    log:
        "logs/expression/cohort.log",
    benchmark:
        "benchmarks/expression/cohort.tsv"
    threads: config["expression"]["threads"]
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/expression.yaml"
    shell:
        "python -m wsiomics.expression cohort --samples {input.sheet:q} --out {output:q} --threads {threads}"
        " {params.matrix} {params.annotation} {params.options} > {log:q} 2>&1"


rule normalize_expression:
    input:
        unpack(normalize_inputs),
    output:
        directory("results/expression/fold{fold}.zarr"),
    wildcard_constraints:
        fold=r"\d+",
    params:
        gene_list=expression_path_option("gene_list", "--gene-list"),
        gene_sets=expression_path_option("gene_sets", "--gene-sets"),
        options=normalize_options(),
    log:
        "logs/expression/fold{fold}.log",
    benchmark:
        "benchmarks/expression/fold{fold}.tsv"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
    conda:
        "../../envs/expression.yaml"
    shell:
        "python -m wsiomics.expression normalize --cohort {input.cohort:q} --folds {input.folds:q}"
        " --fold {wildcards.fold} --out {output:q} {params.gene_list} {params.gene_sets} {params.options}"
        " > {log:q} 2>&1"
