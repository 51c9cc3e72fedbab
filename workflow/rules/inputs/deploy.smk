# Input functions, targets and command-line options of the deployment rules (deploy.smk).

DEPLOY = config["deploy"]
DEPLOY_NAME = DEPLOY["name"]
if bool(DEPLOY_NAME) != bool(DEPLOY["samples"]):
    raise WorkflowError(f"config deploy: name ({DEPLOY_NAME!r}) and samples ({DEPLOY['samples']!r}) go together; "
                        "set both to deploy the run's models to a new cohort, or neither")
DEPLOY_DIR = f"results/deploy/{DEPLOY_NAME}"

_DEPLOY_SHEET = None


def deploy_sheet():
    """The new cohort's sheet, validated as the run's (wsiomics.samples, then the row schema)."""
    global _DEPLOY_SHEET
    if _DEPLOY_SHEET is None:
        _DEPLOY_SHEET = _load_sheet(DEPLOY["samples"])
    return _DEPLOY_SHEET


_DEPLOY_SLIDES = None


def deploy_slide_table():
    global _DEPLOY_SLIDES
    if _DEPLOY_SLIDES is None:
        _DEPLOY_SLIDES = slide_rows(deploy_sheet())
    return _DEPLOY_SLIDES


def _deploy_slide(wildcards):
    table = deploy_slide_table()
    if wildcards.slide_id not in table.index:
        raise WorkflowError(f"slide_id '{wildcards.slide_id}' is not in the deploy sample sheet {DEPLOY['samples']}")
    return table.loc[wildcards.slide_id]


def deploy_slide_path(wildcards):
    slide = _deploy_slide(wildcards)
    if slide["features_path"]:
        return not_produced(wildcards, "features imported from the deploy sheet's features_path, not tiled")
    return slide["slide_path"]


def deploy_patient_of(wildcards):
    return _deploy_slide(wildcards)["patient_id"]


def deploy_mpp_option(wildcards):
    mpp = slide_mpp_override(_deploy_slide(wildcards))
    return "" if mpp is None else f"--mpp {mpp!r}"


def deploy_features_source(wildcards):
    source = _deploy_slide(wildcards)["features_path"]
    return source or not_produced(wildcards, "no features_path in the deploy sheet (its features are extracted)")


def deploy_feature_stores():
    return expand(f"{DEPLOY_DIR}/features/{{encoder}}/{{slide_id}}.zarr", encoder=ENCODER,
                  slide_id=deploy_slide_table().index)


def deploy_has_expression():
    return bool((deploy_sheet()["expression_path"] != "").any())


def deploy_expression_files(wildcards):
    paths = deploy_sheet()["expression_path"]
    return sorted(set(paths[paths != ""]))


def deploy_methods():
    """The classification methods the run trained and fine-tuned (train_plan), in train.run order."""
    return [m for m, stage in train_plan().items() if get_method(m).task == "classify" and stage == "finetune"]


def deploy_tumour_methods():
    """The segmentation methods the run fine-tuned, when the deploy sheet has slides to map."""
    if not len(deploy_slide_table()):
        return []
    return [m for m, stage in train_plan().items() if get_method(m).task == "segment" and stage == "finetune"]


def deploy_risk_methods():
    """The survival networks the run fine-tuned (coxph, a refitted baseline, is not deployed)."""
    return [m for m, stage in train_plan().items()
            if get_method(m).task == "survival" and not get_method(m).is_sklearn and stage == "finetune"]


def deploy_annotation_files():
    """The deploy sheet's tumour GeoJSON files (its Dice), one per annotated slide."""
    return sorted({p for p in deploy_slide_table()["annotation_path"] if p})


def deploy_inputs(wildcards):
    """The run's finished folds (metrics.json, written with model.pt, which rule finetune does not declare; a
    scikit-learn baseline is refitted), folds, sheet, feature stores (status table) and fold expression, as the
    method uses them; the new cohort's sheet, feature stores and expression cohort."""
    method = get_method(wildcards.method)
    need = method.modalities
    inputs = {"models": [f"results/models/{method.name}/fold{k}/metrics.json" for k in range(N_FOLDS)],
              "folds": FOLDS, "samples": DEPLOY["samples"]}
    if "image" in need and len(slide_table()):
        inputs["train_sheet"] = ancient(config["samples"])
        inputs["slide_status"] = SLIDE_STATUS
    if "gene" in need and expression_enabled():
        inputs["fold_expression"] = expand("results/expression/fold{fold}.zarr", fold=range(N_FOLDS))
    if "image" in need and len(deploy_slide_table()):
        inputs["features"] = deploy_feature_stores()
    if "gene" in need and deploy_has_expression() and expression_enabled():
        inputs["expression"] = f"{DEPLOY_DIR}/expression/cohort.zarr"
    if method.task == "segment":
        inputs["annotations"] = deploy_annotation_files()
    if method.task == "survival":  # each fold's risks.tsv (written with metrics.json) places the deploy risks
        inputs["models"] = [f"results/models/{method.name}/fold{k}/risks.tsv" for k in range(N_FOLDS)]
    return inputs


def deploy_options(wildcards, input):
    method = get_method(wildcards.method)
    opts = ["--n-folds", str(N_FOLDS), "--models-dir", shlex.quote(f"results/models/{method.name}")]
    if "slide_status" in input.keys():
        opts += ["--train-features", shlex.quote(f"results/features/{ENCODER}")]
    if "fold_expression" in input.keys():
        opts += ["--fold-expression", "results/expression"]
    if method.is_sklearn:
        opts += ["--train-folds", shlex.quote(input.folds)]
        if "train_sheet" in input.keys():
            opts += ["--train-samples", shlex.quote(input.train_sheet)]
    if "features" in input.keys():
        opts += ["--features", shlex.quote(f"{DEPLOY_DIR}/features/{ENCODER}")]
    if "expression" in input.keys():
        opts += ["--expression", shlex.quote(input.expression)]
    opts += ["--config", shlex.quote(json.dumps(method_config(TRAIN, method.name), sort_keys=True))]
    return " ".join(opts)


@stage_targets
def deploy_targets(wildcards):
    if not DEPLOY_NAME:
        return []
    return [f"{DEPLOY_DIR}/{m}/predictions.tsv" for m in deploy_methods()] + [
        f"{DEPLOY_DIR}/{m}/tumour_slides.tsv" for m in deploy_tumour_methods()] + [
        f"{DEPLOY_DIR}/{m}/risks.tsv" for m in deploy_risk_methods()]
