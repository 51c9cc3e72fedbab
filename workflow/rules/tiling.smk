# Tissue detection and tiling: one tiles store + QC picture per slide (the cohort's status table comes after
# feature extraction, in features.smk). An unusable slide still gets a store (status + reason, no tiles)
# unless config strict is true.


include: "inputs/tiling.smk"


rule tile:
    input:
        slide=slide_path,
    output:
        tiles=directory("results/tiles/{slide_id}.zarr"),
        qc=report(
            "results/qc/tiles/{slide_id}.png",
            caption="../report/tile_qc.rst",
            category="QC",
            subcategory="Tissue and tiles",
            labels={"slide": "{slide_id}"},
        ),
    params:
        patient=patient_of,
        mpp=mpp_option,
        strict="--strict" if config["strict"] else "",
        options=tiling_options(),
    log:
        "logs/tile/{slide_id}.log",
    benchmark:
        "benchmarks/tile/{slide_id}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    conda:
        "../../envs/slides.yaml"
    shell:
        "python -m wsiomics.tiling tile --slide {input.slide:q} --slide-id {wildcards.slide_id}"
        " --patient-id {params.patient:q} --out {output.tiles:q} --qc-png {output.qc:q}"
        " {params.mpp} {params.strict} {params.options} > {log:q} 2>&1"
