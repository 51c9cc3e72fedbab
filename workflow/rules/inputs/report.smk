# Targets and inputs of the report's landing page (report.smk).
import json

LANDING = "results/report/landing.rst"
LANDING_METADATA = "results/report/metadata.yaml"  # the run's counts, for snakemake --report-metadata


@stage_targets
def report_targets(wildcards):
    return [LANDING, LANDING_METADATA]


def landing_inputs(wildcards):
    """The slide status table, and the summary's table and the folds (labelled and unlabelled patients) when
    methods ran."""
    inputs = {"slide_status": SLIDE_STATUS}
    if runnable_methods():
        inputs["summary"] = "results/summary/metrics.md"
        inputs["metrics"] = "results/summary/metrics.tsv"
        inputs["folds"] = FOLDS
    return inputs


def landing_options(wildcards, input):
    return " ".join(f"--{name.replace('_', '-')} {shlex.quote(path)}" for name, path in input.items())


def config_json():
    return json.dumps(config, sort_keys=True, default=str)
