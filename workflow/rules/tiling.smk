# Tissue detection and tiling: one store + QC picture per slide, then the cohort's status table.


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
        options=tiling_options(),
        mpp=mpp_option,
        patient=patient_of,
        strict="--strict" if config["strict"] else "",
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
        " --patient-id {params.patient:q} --out {output.tiles} --qc-png {output.qc}"
        " {params.mpp} {params.strict} {params.options} > {log} 2>&1"


rule slide_status:
    input:
        stores=tile_stores,
    output:
        report("results/qc/slide_status.tsv", caption="../report/slide_status.rst", category="Tiling QC",
               labels={"table": "slide status"}),
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
        "python -m wsiomics.tiling status --out {output} {input.stores} > {log} 2>&1"
