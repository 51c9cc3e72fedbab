# Paths and command-line options of the splits rule (splits.smk).
from wsiomics.splits import SplitParams

FOLDS = "results/splits/folds.tsv"
N_FOLDS = int(config["splits"]["n_folds"])


def splits_options():
    return _expression_flags("splits", config["splits"], SplitParams)
