# Figures (wsiomics.figures): one job draws every registered kind into results/figures/<kind>/ after every
# other stage's targets exist. Outputs and report(...) flags come from the figure registry, so a figure a later
# stage registers (a module in src/wsiomics/figures/ + workflow/report/<kind>.rst) joins the run and the report
# without an edit here. Outputs: README "Figures".

include: "inputs/figures.smk"


rule figures:
    input:
        figure_inputs,
    output:
        **{
            name: report(
                directory(spec["path"]),
                caption=spec["caption"],
                category=spec["category"],
                subcategory=spec["subcategory"],
                patterns=spec["patterns"],
                labels=spec["labels"],
            )
            for name, spec in FIGURE_OUTPUTS.items()
        },
    params:
        options=stage_options("figures"),
        samples=lambda wildcards: config["samples"],
        segmentation=json.dumps(config["train"].get("segmentation") or {}, sort_keys=True),
    log:
        "logs/figures.log",
    benchmark:
        "benchmarks/figures.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=60,
    conda:
        "../../envs/figures.yaml"
    shell:
        "python -m wsiomics.figures --results results --out results/figures --samples {params.samples:q}"
        " --segmentation {params.segmentation:q} {params.options} > {log:q} 2>&1"
