"""Training and evaluation: one dataset, one loop, one evaluation for every method (wsiomics.train.methods)."""
