"""Optuna hyperparameter sweeps for dgl_crystalframer: ``python -m hpo --help``.

Modules: ``space`` (the search space, declared once), ``objective`` (one trial = one
``train_and_evaluate`` run), ``storage`` (RDB storage with heartbeats), ``sweep`` (sampler,
pruner, the optimisation loop), ``report`` (tables, best config, plots), ``fake`` (a fast stand-in
trainer for tests, selected only through the ``HPO_TRAINER`` environment variable).
"""
