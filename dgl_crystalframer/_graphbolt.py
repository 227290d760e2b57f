"""Let ``import dgl`` work with torch versions DGL ships no graphbolt library for.

dgl 2.1.0 (the newest Linux wheel on PyPI) ships native libraries for its optional
``dgl.graphbolt`` subpackage only for torch 2.0-2.2, and ``import dgl`` imports graphbolt eagerly
(``dgl.distributed``), so with a newer torch it fails with FileNotFoundError.  The kernels this
package uses (SDDMM, edge softmax, SpMM, ``dgl.batch``, ``save_graphs``) live in ``libdgl`` and
work.  ``install()`` puts an import hook in front of ``sys.meta_path`` that, when ``dgl.graphbolt``
is imported and its library for the running torch is missing, provides an empty placeholder
package instead.  Where the library exists the real graphbolt is imported untouched.

The hook is installed (a) at interpreter start by ``dgl_crystalframer-graphbolt.pth``, which the
package's install puts into site-packages (see setup.py), so ``import dgl`` works in scripts that
never import this package first, and (b) by ``import dgl_crystalframer``, for checkouts used
without installing.  This file imports nothing heavy and nothing from the package: the ``.pth``
line loads it by path.
"""
import importlib.abc
import importlib.machinery
import os
import sys

TARGET = "dgl.graphbolt"
MARKER = "_dgl_crystalframer_graphbolt_hook"  # set on the finder, and on a placeholder module


def library_path():
    """Where DGL looks for graphbolt's library for the running torch (None if DGL is not found)."""
    dgl = sys.modules.get("dgl")
    origin = getattr(dgl, "__file__", None)
    if origin is None:
        import importlib.util

        spec = importlib.util.find_spec("dgl")
        origin = spec.origin if spec is not None else None
    if origin is None:
        return None
    torch = sys.modules.get("torch")
    if torch is None:
        import torch
    version = torch.__version__.split("+", 1)[0]
    ext = ".dylib" if sys.platform == "darwin" else ".dll" if sys.platform.startswith("win") else ".so"
    prefix = "" if sys.platform.startswith("win") else "lib"
    return os.path.join(os.path.dirname(origin), "graphbolt", f"{prefix}graphbolt_pytorch_{version}{ext}")


def library_missing() -> bool:
    path = library_path()
    return path is not None and not os.path.exists(path)


class _Placeholder(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # the default module object

    def exec_module(self, module):
        module.__doc__ = ("Placeholder registered by dgl_crystalframer: DGL has no graphbolt library for this torch "
                          "version. Everything else in DGL works.")
        module.__path__ = []  # a package, so that 'import dgl.graphbolt.x' fails cleanly
        setattr(module, MARKER, True)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != TARGET or not library_missing():
            return None
        return importlib.machinery.ModuleSpec(fullname, _Placeholder(), is_package=True)


setattr(_Finder, MARKER, True)


def install() -> None:
    """Put the hook in front of sys.meta_path (once per process, whichever copy of this file runs)."""
    if not any(getattr(f, MARKER, False) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def placeholder_active() -> bool:
    """Whether ``dgl.graphbolt`` in this process is the placeholder."""
    return bool(getattr(sys.modules.get(TARGET), MARKER, False))


# The line setup.py writes into site-packages/dgl_crystalframer-graphbolt.pth: find this file
# without importing the package, run it, install the hook.  Never raises.
PTH_LINE = (
    "import importlib.util as _u; _s = _u.find_spec('dgl_crystalframer'); "
    "_f = _s and _s.submodule_search_locations and "
    "__import__('os').path.join(list(_s.submodule_search_locations)[0], '_graphbolt.py'); "
    "_l = _f and __import__('os').path.exists(_f) and _u.spec_from_file_location('_dgl_crystalframer_graphbolt', _f); "
    "_m = _l and _u.module_from_spec(_l); _l and _l.loader.exec_module(_m); _m and _m.install()\n"
)
