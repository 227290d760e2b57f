#!/usr/bin/env bash
# The wheels scripts/gpu_check.sh installs on a GPU machine without network (Python 3.12, x86_64).
#
#   bash scripts/gpu_wheels.sh fetch    # on a machine that reaches PyPI: download into .whl/
#   bash scripts/gpu_wheels.sh verify   # offline: resolve and import the set with Python 3.12
#
# The list is scripts/gpu_wheels.txt.  .whl/ is git-ignored; name it in the device tool's carry.
# verify needs a Python 3.12 interpreter (PY312, default: pyenv's) and a venv that holds what the GPU
# machine has besides torch (SIM, default /tmp/sim312: numpy scipy pandas numba matplotlib and
# torch's own dependencies); it installs .whl/ the way gpu_check.sh does (--no-index --no-deps
# --target), runs pip check, and imports every carried top-level module but DGL (which needs torch;
# tests/test_import.py and the CUDA check cover it).
set -euo pipefail
cd "$(dirname "$0")/.."
list=scripts/gpu_wheels.txt
platforms=()
for p in manylinux1 manylinux2010 manylinux2014 manylinux_2_5 manylinux_2_12 manylinux_2_17 manylinux_2_24 \
         manylinux_2_26 manylinux_2_27 manylinux_2_28; do platforms+=(--platform "${p}_x86_64"); done
case "${1:-}" in
fetch)
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl -r "$list"
  ;;
verify)
  py=${PY312:-/root/.pyenv/versions/3.12.1/bin/python}
  sim=${SIM:-/tmp/sim312}
  site=${SITE:-/tmp/site312}
  wanted=$(grep -v '^#' "$list" | sed 's/==.*//' | sort)
  have=$(ls .whl/*.whl | wc -l)
  echo "wheels: $have files, $(du -sh .whl | cut -f1) ($(du -sb .whl | cut -f1) bytes); list: $(echo "$wanted" | wc -l) names"
  # 1. every pinned name resolves for CPython 3.12 from .whl/ alone, one version each
  python3 -m pip install -q --dry-run --target /tmp/gpu_wheels_dry --no-deps --no-index --find-links .whl --only-binary=:all: \
    --python-version 3.12 --implementation cp "${platforms[@]}" --report /tmp/gpu_wheels_report.json -r "$list"
  python3 -c "import json; r = json.load(open('/tmp/gpu_wheels_report.json')); print('dry run (3.12, no index):', len(r['install']), 'to install')"
  # 2. the simulated machine: install as gpu_check.sh does, then check requirements and imports
  if [ ! -x "$sim/bin/python" ]; then
    "$py" -m venv "$sim"
    "$sim/bin/pip" install -q numpy scipy pandas numba matplotlib filelock typing-extensions sympy networkx jinja2 fsspec setuptools
    # torch itself is not installable here (no CUDA wheels for a CPU machine): its metadata stands in
    info=$("$sim/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/torch-2.11.0.dist-info
    mkdir -p "$info"
    printf 'Metadata-Version: 2.1\nName: torch\nVersion: 2.11.0\n' > "$info/METADATA"
    : > "$info/RECORD"
  fi
  rm -rf "$site"
  PY=$sim/bin/python SITE=$site bash scripts/gpu_check.sh --install-only
  problems=$(PYTHONPATH=$site "$sim/bin/python" -m pip check \
    | grep -v -E '^(No broken|pymatgen-core .* plotly|dgl .* torchdata),' || true)
  [ -z "$problems" ] || { echo "$problems"; echo "pip check: requirements missing"; exit 1; }
  echo "pip check: ok, but for two requirements never imported: plotly (pymatgen's plots), torchdata (dgl.graphbolt)"
  PYTHONPATH=$site:$PWD "$sim/bin/python" - <<'PY'
import importlib, sys
mods = ["psutil", "requests", "tqdm", "pymatgen.core", "pymatgen.io.cif", "pymatgen.symmetry.analyzer", "spglib", "ase",
        "ase.io", "jarvis.core.atoms", "jarvis.db.figshare", "yaml", "pytest", "pytest_timeout", "bibtexparser", "monty",
        "numba", "scipy.sparse", "pandas", "matplotlib"]
for m in mods:
    importlib.import_module(m)
# the package's parts that need no torch: its face, the structure parser (pymatgen, ase), the CLI
import dgl_crystalframer.structures
from dgl_crystalframer.cli import train
train.build_parser()
assert "torch" not in sys.modules
print(f"imports: {len(mods)} modules and the package's torch-free parts ok with Python {sys.version.split()[0]}")
PY
  ;;
*) echo "usage: bash scripts/gpu_wheels.sh fetch|verify" >&2; exit 2 ;;
esac
