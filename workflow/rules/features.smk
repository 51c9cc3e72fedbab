# Patch features: every tile of a slide through the configured encoder, one zarr store per slide. A slide
# whose tiling status is not ok gets an empty store carrying that status, so downstream stages see every
# slide. The job asks for one GPU; without one it runs on the CPU.


include: "inputs/features.smk"


rule extract_features:
    input:
        tiles="results/tiles/{slide_id}.zarr",
    output:
        directory("results/features/{encoder}/{slide_id}.zarr"),
    params:
        options=features_options(),
        strict="--strict" if config["strict"] else "",
    log:
        "logs/extract_features/{encoder}/{slide_id}.log",
    benchmark:
        "benchmarks/extract_features/{encoder}/{slide_id}.tsv"
    threads: config["features"]["threads"]
    resources:
        mem_mb=8000,
        runtime=120,
        gpu=1,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m wsiomics.features extract --tiles {input.tiles:q} --out {output:q}"
        " --encoder {wildcards.encoder:q} --threads {threads} {params.strict} {params.options} > {log:q} 2>&1"
