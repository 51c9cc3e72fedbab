"""Patient roles of a fold (``folds.tsv``): who trains, who early-stops, who is evaluated, who only pretrains."""

TRAIN_ROLES = ("train",)
VAL_ROLES = ("val",)
EVAL_ROLES = ("test", "heldout")
ALL_ROLES = (*TRAIN_ROLES, *VAL_ROLES, *EVAL_ROLES)
#: Patients without a label in a cohort where others have one: pretraining only, never fine-tuned or evaluated.
UNLABELLED_ROLES = ("unlabelled",)
#: ``train.pretrain.pool`` -> the roles pretraining trains on: ``all`` adds the unlabelled patients (never
#: ``val``, ``test`` or ``heldout`` ones), ``labelled`` keeps to the fold's ``train`` patients.
PRETRAIN_POOLS = {"all": (*TRAIN_ROLES, *UNLABELLED_ROLES), "labelled": TRAIN_ROLES}


def pretrain_roles(pool: str) -> tuple[str, ...]:
    """The roles of ``train.pretrain.pool``; an unknown pool is an error naming the choices."""
    if pool not in PRETRAIN_POOLS:
        raise ValueError(f"train.pretrain.pool is {pool!r}; choose one of {', '.join(PRETRAIN_POOLS)}")
    return PRETRAIN_POOLS[pool]
