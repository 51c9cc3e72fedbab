# Input functions, targets and command-line options of the expression rules (expression.smk).

# Config keys that name files: they become rule inputs (tracked, checked to exist) and are passed from there.
EXPRESSION_PATH_KEYS = ("matrix", "gene_annotation", "gene_list", "gene_sets")


def expression_enabled():
    """Expression rules join the default targets when the cohort has expression (sheet column or matrix)."""
    return bool(config["expression"]["matrix"]) or bool((sample_sheet()["expression_path"] != "").any())


@stage_targets
def expression_targets(wildcards):
    if not expression_enabled():
        return []
    return [
        "results/expression/cohort.zarr",
        FOLDS,
        *expand("results/expression/fold{fold}.zarr", fold=range(N_FOLDS)),
    ]


def expression_cohort_inputs(wildcards):
    """The per-patient view of the sheet, every expression file it names (or the matrix), the gene annotation.

    The job reads the sheet itself (its row numbers make the error messages), but only the view's content
    and the expression files decide whether it reruns: the sheet is ancient()."""
    cfg = config["expression"]
    inputs = {"sheet": ancient(config["samples"]), "patients": sheet_view("expression")(wildcards)}
    if cfg["matrix"]:
        inputs["matrix"] = cfg["matrix"]
    else:
        paths = sample_sheet()["expression_path"]
        inputs["files"] = sorted(set(paths[paths != ""]))
    if cfg["gene_annotation"]:
        inputs["annotation"] = cfg["gene_annotation"]
    return inputs


def normalize_inputs(wildcards):
    cfg = config["expression"]
    inputs = {"cohort": "results/expression/cohort.zarr", "folds": FOLDS}
    for key in ("gene_list", "gene_sets"):
        if cfg[key]:
            inputs[key] = cfg[key]
    return inputs


def expression_cohort_options():
    return stage_options("expression", command="cohort", skip=EXPRESSION_PATH_KEYS + ("threads",))


def expression_path_option(key, flag):
    """`--flag <path>` for a configured file (already a rule input), else nothing."""
    value = config["expression"][key]
    return f"{flag} {shlex.quote(value)}" if value else ""


def normalize_options():
    return stage_options("expression", command="normalize", skip=EXPRESSION_PATH_KEYS + ("threads",))
