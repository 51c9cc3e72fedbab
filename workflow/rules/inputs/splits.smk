# Paths and command-line options of the splits rule (splits.smk).

FOLDS = "results/splits/folds.tsv"
N_FOLDS = int(config["splits"]["n_folds"])


def splits_options():
    return stage_options("splits")
