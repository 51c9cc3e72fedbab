# Input functions, targets and command-line options of the training rules (train.smk).
import json

from wsiomics.train.methods import METHODS, get_method, method_config, pretrained_source

TRAIN = config["train"]
TRAIN_METHODS = list(TRAIN["run"])
for _name in TRAIN_METHODS:
    if _name not in METHODS:
        raise WorkflowError(f"config train.run: unknown method {_name!r}; known: {', '.join(sorted(METHODS))}")


wildcard_constraints:
    method="|".join(re.escape(m) for m in METHODS),
    fold=r"\d+",


# finetune, finetune_segmentation and finetune_survival write the same metrics.json: each rule takes only the
# methods of its task.
def _methods_of(task):
    return "|".join(re.escape(m) for m, v in METHODS.items() if v.task == task)


CLASSIFY_METHODS = _methods_of("classify")
SEGMENT_METHODS = _methods_of("segment")
SURVIVAL_METHODS = _methods_of("survival")


def has_follow_up():
    """Some patient of the sheet has survival time and event."""
    sheet = sample_sheet()
    return "time" in sheet.columns and bool((sheet["time"] != "").any())


def annotation_files():
    """The sheet's tumour GeoJSON files (absolute paths), one per annotated slide."""
    return sorted({p for p in slide_table()["annotation_path"] if p})


def runnable_methods():
    """train.run minus methods whose modality the cohort lacks (logged, not silently dropped)."""
    has_genes = expression_enabled()
    has_slides = len(slide_table()) > 0
    keep = []
    for name in TRAIN_METHODS:
        method = get_method(name)
        need = method.modalities
        if ("gene" in need and not has_genes and "image" not in need) or (
            "image" in need and not has_slides and "gene" not in need
        ):
            logger.warning(f"train.run: {name} skipped, the cohort has no {'expression' if 'gene' in need else 'slides'}")
            continue
        if method.model == "sklearn_cca" and not (has_genes and has_slides):
            logger.warning(f"train.run: {name} skipped, CCA needs both slides and expression")
            continue
        if method.task == "survival" and not has_follow_up():
            logger.warning(f"train.run: {name} skipped, no patient has survival time and event in the sheet")
            continue
        if method.task == "segment" and not (has_slides and annotation_files()):
            logger.warning(f"train.run: {name} skipped, no slide has an annotation_path (tumour GeoJSON)")
            continue
        keep.append(name)
    return keep


@stage_targets
def train_targets(wildcards):
    return ["results/models/summary.tsv"] if runnable_methods() else []


def model_metrics(wildcards):
    return expand("results/models/{method}/fold{fold}/metrics.json", method=runnable_methods(), fold=range(N_FOLDS))


def train_inputs(wildcards):
    """Folds, the sheet (slide -> patient), the cohort status after features and the fold's expression, as
    present. The status table stands for every feature store (it is rebuilt whenever one changes), so a
    training job has a handful of inputs however many slides the cohort has."""
    need = get_method(wildcards.method).modalities
    inputs = {"folds": FOLDS}
    if "image" in need and len(slide_table()):
        inputs["sheet"] = ancient(config["samples"])  # slide -> patient; the status table decides reruns
        inputs["slide_status"] = SLIDE_STATUS
    if "gene" in need and expression_enabled():
        inputs["expression"] = f"results/expression/fold{wildcards.fold}.zarr"
    return inputs


def finetune_inputs(wildcards):
    """train_inputs plus the pretrained checkpoint (own, or another method's: mgi_seg starts from mgi) and its
    evaluation (retrieval, linear probe), which the fine-tuned metrics.json repeats."""
    inputs = train_inputs(wildcards)
    source = pretrained_source(get_method(wildcards.method))
    if source:
        inputs["pretrained"] = f"results/models/{source}/fold{wildcards.fold}/pretrain/model.pt"
        inputs["pretrain_metrics"] = f"results/models/{source}/fold{wildcards.fold}/pretrain/metrics.json"
    return inputs


def segmentation_inputs(wildcards):
    """finetune_inputs plus the sheet (always: it lists the annotations) and every annotation file."""
    inputs = finetune_inputs(wildcards)
    inputs["sheet"] = ancient(config["samples"])
    inputs.setdefault("slide_status", SLIDE_STATUS)
    inputs["annotations"] = annotation_files()
    return inputs


def survival_inputs(wildcards):
    """finetune_inputs plus the sheet (always: it holds the follow-up)."""
    inputs = finetune_inputs(wildcards)
    inputs["sheet"] = ancient(config["samples"])
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
