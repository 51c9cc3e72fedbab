# wsiomics: whole-slide images + gene expression -> image-omic models.
# Stages live in workflow/rules/; config.yaml next to this file is the demo default, found from any
# --directory. Override it with --configfile FILE and/or --config key=value.
from snakemake.utils import min_version

min_version("9.0")


configfile: f"{workflow.basedir}/config.yaml"


# The landing page of `snakemake --report` (README "Report"); figures and tables join it with report(...).
report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/synth.smk"
include: "workflow/rules/tiling.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/splits.smk"
include: "workflow/rules/expression.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/fewshot.smk"
include: "workflow/rules/summary.smk"
include: "workflow/rules/figures.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/deploy.smk"


localrules:
    all,


rule all:
    input:
        all_targets,
    default_target: True


onsuccess:
    report_feature_precisions()
