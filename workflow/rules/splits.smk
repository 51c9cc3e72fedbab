# Patient-level folds (wsiomics.splits): per fold, roles train / val / test, plus heldout for a fixed test
# set. They depend only on results/sheet/patients.tsv (patient_id, label), which is rewritten only when those
# change: new RNA for a patient, a rebuilt expression cohort or a slide's mpp never move anyone's fold or
# rewrite folds.tsv. No default target of its own: the stages that read the folds pull this rule in.


include: "inputs/splits.smk"


rule splits:
    input:
        patients=sheet_view("patients"),
    output:
        FOLDS,
    params:
        options=splits_options(),
    log:
        "logs/splits.log",
    benchmark:
        "benchmarks/splits.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    localrule: True
    conda:
        "../../envs/expression.yaml"
    shell:
        "python -m wsiomics.splits --patients {input.patients:q} --out {output:q} {params.options} > {log:q} 2>&1"
