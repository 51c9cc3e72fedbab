# Input functions, targets and command-line options of the training rules (train.smk).
import json

from wsiomics.train.methods import METHODS, get_method, method_config

TRAIN = config["train"]
TRAIN_METHODS = list(TRAIN["run"])
for _name in TRAIN_METHODS:
    if _name not in METHODS:
        raise WorkflowError(f"config train.run: unknown method {_name!r}; known: {', '.join(sorted(METHODS))}")


wildcard_constraints:
    method="|".join(re.escape(m) for m in METHODS),
    fold=r"\d+",


def runnable_methods():
    """train.run minus methods whose modality the cohort lacks (logged, not silently dropped)."""
    has_genes = expression_enabled()
    has_slides = len(slide_table()) > 0
    keep = []
    for name in TRAIN_METHODS:
        need = get_method(name).modalities
        if ("gene" in need and not has_genes and "image" not in need) or (
            "image" in need and not has_slides and "gene" not in need
        ):
            logger.warning(f"train.run: {name} skipped, the cohort has no {'expression' if 'gene' in need else 'slides'}")
            continue
        keep.append(name)
    return keep


@stage_targets
def train_targets(wildcards):
    return ["results/models/summary.tsv"] if runnable_methods() else []


def model_metrics(wildcards):
    return expand("results/models/{method}/fold{fold}/metrics.json", method=runnable_methods(), fold=range(N_FOLDS))


def train_inputs(wildcards):
    """Folds, the sheet (slide -> patient), every slide's features and the fold's expression, as present."""
    need = get_method(wildcards.method).modalities
    inputs = {"folds": FOLDS}
    if "image" in need and len(slide_table()):
        inputs["sheet"] = ancient(config["samples"])  # slide -> patient; the feature stores decide reruns
        inputs["features"] = feature_stores(wildcards)
    if "gene" in need and expression_enabled():
        inputs["expression"] = f"results/expression/fold{wildcards.fold}.zarr"
    return inputs


def finetune_inputs(wildcards):
    inputs = train_inputs(wildcards)
    if get_method(wildcards.method).pretrain:
        inputs["pretrained"] = f"results/models/{wildcards.method}/fold{wildcards.fold}/pretrain/model.pt"
    return inputs


def train_options(wildcards, input):
    """Paths that exist for this method (sheet, feature folder, expression, pretrained weights) and its config."""
    opts = []
    if "sheet" in input.keys():
        opts += ["--samples", shlex.quote(input.sheet), "--features", shlex.quote(f"results/features/{ENCODER}")]
    if "expression" in input.keys():
        opts += ["--expression", shlex.quote(input.expression)]
    if "pretrained" in input.keys():
        opts += ["--pretrained", shlex.quote(input.pretrained)]
    opts += ["--config", shlex.quote(json.dumps(method_config(TRAIN, wildcards.method), sort_keys=True))]
    return " ".join(opts)
