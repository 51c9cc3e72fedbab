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
# methods of its task; pretrain only those with a pretraining stage.
def _methods_of(task):
    return "|".join(re.escape(m) for m, v in METHODS.items() if v.task == task)


CLASSIFY_METHODS = _methods_of("classify")
SEGMENT_METHODS = _methods_of("segment")
SURVIVAL_METHODS = _methods_of("survival")
PRETRAIN_METHODS = "|".join(re.escape(m) for m, v in METHODS.items() if v.pretrain)


def has_follow_up():
    """Some patient of the sheet has survival time and event."""
    sheet = sample_sheet()
    return "time" in sheet.columns and bool((sheet["time"] != "").any())


def train_gpu(wildcards):
    """The job's `gpu` resource: 0 for the scikit-learn baselines and under `train.device: cpu` (a CPU-only
    site), else 1. Locally the profile's `resources: gpu` caps how many such jobs run at once; the SLURM
    plugin turns it into --gpus."""
    method = get_method(wildcards.method)
    device = str(method_config(TRAIN, wildcards.method).get("device", "auto"))
    return 0 if method.is_sklearn or device == "cpu" else 1


def annotation_files():
    """The sheet's tumour GeoJSON files (absolute paths), one per annotated slide."""
    return sorted({p for p in slide_table()["annotation_path"] if p})


def cohort_classes():
    """Distinct non-empty labels of the sheet's patients: the classes of every fold (datasets.class_names)."""
    return sorted({str(x) for x in patient_rows(sample_sheet())["label"] if str(x)})


def label_free_stage(method):
    """What a method still runs on a cohort with fewer than two classes: "finetune" (cca: its retrieval needs
    no label; segmentation: tumour annotations; survival: follow-up), "pretrain" (MGI: the image-gene InfoNCE
    pretraining and its retrieval need none, the fine-tune is a classification), or "" (every other
    classification method)."""
    if method.task != "classify" or method.model == "sklearn_cca":
        return "finetune"
    return "pretrain" if method.pretrain and method.retrieval else ""


_TRAIN_PLAN = None


def train_plan():
    """train.run minus what the cohort cannot run, as method -> the stage whose metrics.json the summary reads
    ("finetune", or "pretrain" for MGI's retrieval on a cohort without two classes). Each skip is logged once,
    with its reason, never silently dropped."""
    global _TRAIN_PLAN
    if _TRAIN_PLAN is not None:
        return _TRAIN_PLAN
    has_genes = expression_enabled()
    has_slides = len(slide_table()) > 0
    classes = cohort_classes()
    no_classes = (f"the cohort has fewer than two classes (sample sheet {config['samples']}, column label: "
                  f"{', '.join(classes) or 'no labels'})")
    plan = {}
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
        stage = "finetune"
        if len(classes) < 2:
            stage = label_free_stage(method)
            if not stage:
                logger.warning(f"train.run: {name} skipped, {no_classes}; its classification needs two")
                continue
            if stage == "pretrain":
                logger.warning(f"train.run: {name} fine-tune skipped, {no_classes}; its pretraining and "
                               "image-gene retrieval still run (summary.tsv reports them)")
            elif method.task == "classify":
                logger.warning(f"train.run: {name} reports retrieval only, {no_classes}")
        plan[name] = stage
    _TRAIN_PLAN = plan
    return plan


def runnable_methods():
    """The methods of train_plan (train.run minus what the cohort cannot run)."""
    return list(train_plan())


@stage_targets
def train_targets(wildcards):
    return ["results/models/summary.tsv"] if runnable_methods() else []


def model_metrics(wildcards):
    """What the summary reads: each method's fine-tuned metrics.json, or its pretraining's (train_plan)."""
    return [f"results/models/{name}/fold{fold}/{'pretrain/' if stage == 'pretrain' else ''}metrics.json"
            for name, stage in train_plan().items() for fold in range(N_FOLDS)]


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
