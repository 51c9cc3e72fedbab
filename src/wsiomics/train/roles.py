"""Patient roles of a fold (``folds.tsv``): who trains, who early-stops, who is evaluated."""

TRAIN_ROLES = ("train",)
VAL_ROLES = ("val",)
EVAL_ROLES = ("test", "heldout")
ALL_ROLES = (*TRAIN_ROLES, *VAL_ROLES, *EVAL_ROLES)
