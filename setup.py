"""Build steps pyproject.toml cannot declare: put ``dgl_crystalframer-graphbolt.pth`` into
site-packages, in regular and in editable installs, so that ``import dgl`` works with current
torch in any script, before or without ``import dgl_crystalframer`` (dgl_crystalframer/_graphbolt.py).
Everything else is in pyproject.toml."""
import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "dgl_crystalframer-graphbolt.pth"
_spec = importlib.util.spec_from_file_location("_graphbolt", Path(__file__).parent / "dgl_crystalframer" / "_graphbolt.py")
_graphbolt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_graphbolt)


class build_py_with_pth(build_py):
    """The wheel carries the .pth at its root, which installs into site-packages."""

    def run(self):
        super().run()
        Path(self.build_lib, PTH_NAME).write_text(_graphbolt.PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib, PTH_NAME))]


cmdclass = {"build_py": build_py_with_pth}

try:  # editable installs (pip install -e .) build their wheel elsewhere: add the .pth there too
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # pragma: no cover - setuptools < 64
    editable_wheel = None

if editable_wheel is not None and hasattr(editable_wheel, "_select_strategy"):
    class _WithPth:
        def __init__(self, strategy):
            self.strategy = strategy

        def __call__(self, wheel, files, mapping):
            self.strategy(wheel, files, mapping)
            wheel.writestr(PTH_NAME, _graphbolt.PTH_LINE)

        def __enter__(self):
            self.strategy.__enter__()
            return self

        def __exit__(self, *exc):
            return self.strategy.__exit__(*exc)

    class editable_wheel_with_pth(editable_wheel):
        def _select_strategy(self, *args, **kwargs):
            return _WithPth(super()._select_strategy(*args, **kwargs))

    cmdclass["editable_wheel"] = editable_wheel_with_pth

setup(cmdclass=cmdclass)
