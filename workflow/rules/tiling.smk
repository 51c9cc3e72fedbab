# Tissue detection and tiling: one tiles store + QC picture per slide, then the cohort's status table.
# An unusable slide still gets a store (status + reason, no tiles) unless config strict is true.


include: "inputs/tiling.smk"


rule tile:
    input:
        slide=slide_path,
    output:
        tiles=directory("results/tiles/{slide_id}.zarr"),
        qc=report(
            "results/qc/tiles/{slide_id}.png",
            caption="../report/tile_qc.rst",
            category="Tiling QC",
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


rule slide_status:
    input:
        stores=tile_stores,
    output:
        report(
            "results/qc/slide_status.tsv",
            caption="../report/slide_status.rst",
            category="Tiling QC",
            labels={"table": "slide status"},
        ),
    log:
        "logs/slide_status.log",
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    localrule: True
    conda:
        "../../envs/slides.yaml"
    shell:
        "python -m wsiomics.tiling status --out {output:q} {input.stores:q} > {log:q} 2>&1"
