"""dgl_crystalframer: CrystalFramer (ICLR 2025) on DGL, for crystal property prediction.

    import dgl_crystalframer as dcf
    graph = dcf.build_graph("NaCl.cif")                         # periodic-image multigraph
    model = dcf.CrystalFramer(frame="max")                      # the paper's model
    result = dcf.train_and_evaluate(dcf.TrainConfig(preset="smoke"))
    predictor = dcf.Predictor(result["checkpoint"]); predictor.predict_files(["NaCl.cif"])

The names below are imported on first use, so that importing the package (and the command
line's ``--help``) stays fast.  Importing it first sets the OpenMP wait policy (``_openmp.py``)
and lets ``import dgl`` work with current torch (``_graphbolt.py``).
"""
__version__ = "0.1.0"

from . import _graphbolt, _openmp

_openmp.configure()  # before torch loads its OpenMP runtime
_graphbolt.install()

_PUBLIC = {  # name -> module that defines it
    "build_graph": "graph",
    "StructureError": "errors",
    "CrystalFramer": "model",
    "CrystalFramerConv": "nn",
    "ModelConfig": "config",
    "TrainConfig": "config",
    "load_dataset": "data",
    "train_and_evaluate": "training",
    "load_checkpoint": "checkpoint",
    "Predictor": "predict",
    "CrystalBatch": "batch",
    "resolve_device": "sparse",
    "default_cutoff": "basis",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dgl_crystalframer' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
