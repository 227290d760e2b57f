"""Optuna hyperparameter sweeps: ``dgl-crystalframer hpo --help`` (``python -m hpo`` in a checkout).

Needs the ``[hpo]`` extra: ``pip install 'dgl_crystalframer[hpo]'``.

Modules: ``space`` (the search space, declared once), ``objective`` (one trial = one
``train_and_evaluate`` run), ``storage`` (RDB storage with heartbeats), ``sweep`` (sampler,
pruner, the optimisation loop), ``report`` (tables, best config, plots), ``fake`` (a fast stand-in
trainer for tests, selected only through the ``HPO_TRAINER`` environment variable).
"""
