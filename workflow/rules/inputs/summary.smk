# Targets and command-line options of the summary rule (summary.smk); its inputs are the training stage's
# metrics.json files (model_metrics, inputs/train.smk).

SUMMARY_OUTPUTS = ["results/summary/metrics.tsv", "results/summary/comparisons.tsv", "results/summary/metrics.md"]


@stage_targets
def summary_targets(wildcards):
    return SUMMARY_OUTPUTS if runnable_methods() else []


def summary_options():
    return stage_options("summary")
