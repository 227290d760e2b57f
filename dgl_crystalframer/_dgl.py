"""The one place where this package imports DGL.

``_graphbolt.install()`` (also run by ``import dgl_crystalframer`` and, for installed copies, at
interpreter start) makes ``import dgl`` work with torch versions DGL ships no graphbolt library
for.  Every other module does ``from ._dgl import dgl`` (or ``dglops``, ``edge_softmax``); the
sparse operations themselves go through ``sparse.py``.
"""
from __future__ import annotations

from . import _graphbolt, _openmp

# Must happen before torch and DGL load OpenMP: see _openmp.py (a wrong policy cost 2x-50x).
_openmp.configure()
_graphbolt.install()

try:
    import dgl  # noqa: E402
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "dgl_crystalframer needs DGL (pip install dgl==2.1.0, or DGL's own wheels/conda packages "
        "from https://www.dgl.ai/pages/start.html): " + str(exc)
    ) from exc

import dgl.ops as dglops  # noqa: E402
from dgl.nn.functional import edge_softmax  # noqa: E402

CUDA_HELP = (
    "Two ways to run on an NVIDIA GPU: (a) any CUDA build of torch with DGL from PyPI (CPU-only): "
    "the sparse operations then run in plain PyTorch on the GPU (backend torch, chosen automatically); "
    "(b) torch 2.4 with DGL 2.4's CUDA build for DGL's own GPU kernels (backend dgl): "
    "pip install torch==2.4.1 --index-url https://download.pytorch.org/whl/cu124 and "
    "pip install dgl==2.4.0 -f https://data.dgl.ai/wheels/torch-2.4/cu124/repo.html "
    "(see https://www.dgl.ai/pages/start.html). Or run with --device cpu."
)

__all__ = ["dgl", "dglops", "edge_softmax", "CUDA_HELP"]
