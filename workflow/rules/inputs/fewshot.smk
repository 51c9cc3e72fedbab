# Input functions, targets and command-line options of the few-shot rules (fewshot.smk). The methods come from
# the training plan (inputs/train.smk): every method it runs that has a pretraining stage.

FEWSHOT = TRAIN["fewshot"]
FEWSHOT_OUTPUTS = ["results/fewshot/summary.tsv", "results/fewshot/curves.png", "results/fewshot/curves.svg"]


def fewshot_methods():
    """The planned methods with a pretraining stage (Method.pretrain in the registry), when train.fewshot.k lists
    some k and the cohort has the two classes a probe needs (train_plan: "pretrain" means it has not)."""
    if not FEWSHOT["k"]:
        return []
    return [name for name, stage in train_plan().items() if get_method(name).pretrain and stage == "finetune"]


@stage_targets
def fewshot_targets(wildcards):
    return FEWSHOT_OUTPUTS if fewshot_methods() else []


def fewshot_tables(wildcards):
    return [f"results/models/{name}/fold{fold}/fewshot.tsv" for name in fewshot_methods() for fold in range(N_FOLDS)]


def fewshot_inputs(wildcards):
    """train_inputs plus the fold's pretrained checkpoint."""
    inputs = train_inputs(wildcards)
    inputs["pretrained"] = f"results/models/{wildcards.method}/fold{wildcards.fold}/pretrain/model.pt"
    return inputs


def fewshot_gpu(wildcards):
    """The job's `gpu` resource: 0 when its networks run on the CPU (train.fewshot.device, else the method's
    train.device, is cpu), else 1 (as train_gpu)."""
    device = FEWSHOT["device"] or str(method_config(TRAIN, wildcards.method).get("device", "auto"))
    return 0 if device == "cpu" else 1


def fewshot_options():
    """train.fewshot as the command's flags (--k 1,2,4 --draws 10 --c 1.0)."""
    try:
        flags = config_flags(FEWSHOT, CONFIG_SCHEMA["properties"]["train"]["properties"]["fewshot"],
                             where="train.fewshot")
    except ConfigFlagError as e:
        raise WorkflowError(str(e)) from None
    return " ".join(flags)
