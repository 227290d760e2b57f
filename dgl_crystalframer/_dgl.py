"""The one place where this package imports DGL.

dgl 2.1.0 (the newest Linux wheel on PyPI) ships native libraries for its optional
``dgl.graphbolt`` and ``dgl.sparse`` subpackages only for torch 2.0-2.2, and ``import dgl``
imports graphbolt eagerly.  The core kernels we use (SDDMM ``u_dot_v``, ``edge_softmax``,
SpMM via ``dgl.ops``/``update_all``, ``dgl.batch``, ``save_graphs``) live in ``libdgl`` and
work with newer torch.  So, when the graphbolt library for the installed torch is missing,
we register an empty placeholder module for ``dgl.graphbolt`` before the first ``import dgl``.
Where the library exists (older torch), the real graphbolt is imported untouched.

Every other module does ``from ._dgl import dgl`` (or ``dglops``, ``edge_softmax``).
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

from . import _openmp

# Must happen before torch and DGL load OpenMP: see _openmp.py (a wrong policy cost 2x-50x).
_openmp.configure()

import torch  # noqa: E402


def _graphbolt_library_missing() -> bool:
    spec = importlib.util.find_spec("dgl")
    if spec is None or spec.origin is None:
        return False  # let the import below raise the usual ModuleNotFoundError
    torch_version = torch.__version__.split("+")[0]
    lib = os.path.join(os.path.dirname(spec.origin), "graphbolt", f"libgraphbolt_pytorch_{torch_version}.so")
    return not os.path.exists(lib)


if "dgl" not in sys.modules and "dgl.graphbolt" not in sys.modules and _graphbolt_library_missing():
    _placeholder = types.ModuleType("dgl.graphbolt")
    _placeholder.__doc__ = "Placeholder: DGL's graphbolt has no native library for this torch version."
    _placeholder.__path__ = []  # a package, so 'import dgl.graphbolt.x' fails cleanly
    sys.modules["dgl.graphbolt"] = _placeholder

try:
    import dgl  # noqa: E402
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(
        "dgl_crystalframer needs DGL (pip install dgl==2.1.0, or a CUDA build from "
        "https://data.dgl.ai/wheels/ for GPUs): " + str(exc)
    ) from exc

import dgl.function as dglfn  # noqa: E402
import dgl.ops as dglops  # noqa: E402
from dgl.nn.functional import edge_softmax  # noqa: E402

GRAPHBOLT_PLACEHOLDER = getattr(sys.modules.get("dgl.graphbolt"), "__path__", None) == []


CUDA_HELP = (
    "Two ways to run on an NVIDIA GPU: (a) any CUDA build of torch with DGL from PyPI (CPU-only): "
    "the sparse operations then run in plain PyTorch on the GPU (backend torch, chosen automatically); "
    "(b) torch 2.4 with DGL 2.4's CUDA build for DGL's own GPU kernels (backend dgl): "
    "pip install torch==2.4.1 --index-url https://download.pytorch.org/whl/cu124 and "
    "pip install dgl==2.4.0 -f https://data.dgl.ai/wheels/torch-2.4/cu124/repo.html "
    "(see https://www.dgl.ai/pages/start.html). Or run with --device cpu."
)


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``auto|cpu|cuda[:N]`` into a torch.device.

    ``auto`` picks CUDA when torch sees a GPU.  Which code runs the sparse operations there (DGL's
    CUDA kernels or plain PyTorch) is ``sparse.select_backend``'s choice, so DGL from PyPI is no
    obstacle.  Asking for ``cuda`` when torch sees no GPU raises a RuntimeError that says how to
    fix it.
    """
    name = (name or "auto").strip().lower()
    if name == "cpu":
        return torch.device("cpu")
    if name != "auto" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        raise RuntimeError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU "
                           f"(a CPU-only build of torch, or no driver). " + CUDA_HELP)
    try:
        device = torch.device("cuda" if name == "auto" else name)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise RuntimeError(f"--device {name}: torch sees only {torch.cuda.device_count()} GPU(s)")
    return device


__all__ = ["dgl", "dglfn", "dglops", "edge_softmax", "resolve_device", "CUDA_HELP", "GRAPHBOLT_PLACEHOLDER"]
