# Targets and input functions of the figures rule (figures.smk).
from wsiomics.figures import report_outputs

FIGURE_OUTPUTS = report_outputs("results/figures")


@stage_targets
def figure_targets(wildcards):
    return [spec["path"] for spec in FIGURE_OUTPUTS.values()]


def figure_inputs(wildcards):
    """Every other stage's default targets (whatever stages are registered, later ones included) and the
    sheet's views: the figures come last and read whatever those wrote."""
    targets = [t for func in STAGE_TARGETS if func is not figure_targets for t in func(wildcards)]
    return [*targets, sheet_view("patients")(wildcards), sheet_view("slides")(wildcards)]
