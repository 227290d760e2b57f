"""``python -m hpo`` from the repository root: a thin wrapper of ``dgl-crystalframer hpo`` /
``dgl-crystalframer report`` (the sweep code lives in ``dgl_crystalframer.hpo``)."""
