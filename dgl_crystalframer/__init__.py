"""dgl_crystalframer: CrystalFramer (ICLR 2025) on DGL's fused sparse kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from ._dgl import resolve_device  # noqa: F401  (imports dgl once, with the graphbolt shim)
from .basis import default_cutoff  # noqa: F401
