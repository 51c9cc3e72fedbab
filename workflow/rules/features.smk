# Patch features: every tile of a slide through the configured encoder, one zarr store per slide. A slide
# whose tiling status is not ok gets an empty store carrying that status, so downstream stages see every
# slide. The job asks for one GPU; without one it runs on the CPU. Then the cohort's status table, which
# folds each slide's tiling and feature status together (results/qc/slide_status.tsv). A slide whose sheet row
# names a features_path (TRIDENT/CLAM h5, or a feature store) is imported instead, and never tiled.


include: "inputs/features.smk"


# A slide with a features_path in the sheet is imported (import_features); import_features's input does not
# exist for the others, which Snakemake then gives to place_features (slides_per_job > 1: its batch) or to
# extract_features (slides_per_job: 1); each of the two is given an input that does not exist in the other case.
ruleorder: import_features > place_features > extract_features


rule extract_features:
    input:
        tiles=single_slide_tiles,  # features.slides_per_job: 1 (else the batch rules below make the store)
        slide=slide_path,  # read again for the pixels: must be there on the node that runs the job
        weights=weights_input,
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


# features.slides_per_job > 1: one job encodes a batch of slides with one encoder (start-up paid once per batch)
# into BATCH_DIR, then place_features links each slide's store to its usual path. A slide that fails gets no store
# (--keep-going): only its own place_features job fails, naming the batch's log; with strict: true the batch fails.
# The staged stores outlive the job, so a batch that runs again encodes only its slides that are not current.
rule extract_features_batch:
    input:
        tiles=batch_input("tiles"),
        slides=batch_input("slides"),  # read again for the pixels: must be there on the node that runs the job
        weights=weights_input,
    output:
        temp(f"{BATCH_DIR}/{{batch}}.done"),
    params:
        outs=batch_outputs,
        encoder=ENCODER,
        options=features_options(),
        on_failure="--strict" if config["strict"] else "--keep-going",  # strict: a bad slide fails the batch
    log:
        f"logs/extract_features/{ENCODER}/{{batch}}.log",
    benchmark:
        f"benchmarks/extract_features/{ENCODER}/{{batch}}.tsv"
    threads: config["features"]["threads"]
    resources:
        mem_mb=8000,
        runtime=60 + 60 * SLIDES_PER_JOB,
        gpu=1,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m wsiomics.features extract --tiles {input.tiles:q} --out {params.outs:q} {params.on_failure}"
        " --encoder {params.encoder:q} --threads {threads} {params.options} > {log:q} 2>&1 && touch {output:q}"


rule place_features:
    input:
        batch=batch_of,
        # the slide's own tiles: re-tiling it (a deleted store, a changed sheet row) re-runs its batch and this job
        tiles="results/tiles/{slide_id}.zarr",
    output:
        directory("results/features/{encoder}/{slide_id}.zarr"),
    log:
        "logs/place_features/{encoder}/{slide_id}.log",
    localrule: True
    run:
        place_store(wildcards.slide_id, input.batch, output[0], log[0])


rule import_features:
    input:
        source=features_source,  # a TRIDENT/CLAM h5 file or a wsiomics feature store (the sheet's features_path)
    output:
        directory("results/features/{encoder}/{slide_id}.zarr"),
    params:
        patient=patient_of,
        options=import_options(),
    log:
        "logs/import_features/{encoder}/{slide_id}.log",
    benchmark:
        "benchmarks/import_features/{encoder}/{slide_id}.tsv"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=30,
    conda:
        "../../envs/torch.yaml"
    shell:
        "python -m wsiomics.features import --source {input.source:q} --out {output:q} --encoder {wildcards.encoder:q}"
        " --slide-id {wildcards.slide_id} --patient-id {params.patient:q} {params.options} > {log:q} 2>&1"


rule slide_status:
    input:
        slides=sheet_view("slides"),
        tiles=tile_stores,
        features=feature_stores,
    output:
        report(
            SLIDE_STATUS,
            caption="../report/slide_status.rst",
            category="QC",
            subcategory="Slide status",
            labels={"table": "slide status"},
        ),
    params:
        features_dir=f"results/features/{ENCODER}",
    log:
        "logs/slide_status.log",
    benchmark:
        "benchmarks/slide_status.tsv"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    localrule: True
    conda:
        "../../envs/slides.yaml"
    shell:
        "python -m wsiomics.status --slides {input.slides:q} --tiles-dir results/tiles"
        " --features-dir {params.features_dir:q} --out {output:q} > {log:q} 2>&1"
