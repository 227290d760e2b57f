#!/usr/bin/env bash
# The GPU check, as one command on a machine with an NVIDIA GPU and no network:
#
#   bash scripts/gpu_check.sh OUTDIR          # about 5 minutes on one H100, graph build included
#
# Before: on a machine with network, `bash scripts/gpu_wheels.sh fetch` puts the wheels the GPU
# machine lacks into .whl/ (git-ignored, ~40 MB; the list is scripts/gpu_wheels.txt, checked offline
# by `bash scripts/gpu_wheels.sh verify`); carry .whl with the checkout.  This script installs the
# carried wheels whose packages the machine does not already have into $SITE (default /tmp/site),
# then writes to OUTDIR:
#   machine.txt   GPU, driver, torch, DGL (imported through the package's graphbolt hook), Python
#   parity.txt    tests/test_sparse.py -k cuda: every frame type on the GPU against the CPU (DGL kernels)
#   perf.txt, perf_device.json   python -m benchmarks.perf --device cuda --quick: training crystals/s at
#                 batch 64 and 256 from pre-moved batches and through the DataLoader (num_workers 0
#                 and 4), host vs device time per step, device syncs per step, peak memory
#                 (max_memory_allocated), two identical steps compared bitwise (plain and
#                 --deterministic), inference, supercell scaling, agreement with the CPU
#   profile.txt   torch.profiler table of one training step at batch 256 (none, max)
# Each step has a time limit, so one failure leaves the others' results.
# `--install-only` stops after the install (scripts/gpu_wheels.sh verify uses it).
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
SITE=${SITE:-/tmp/site}
WHEELS=${WHEELS:-.whl}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  # only what the machine lacks: a carried copy of a package it has could shadow the version its
  # other packages were built against
  missing=$("$PY" - "$WHEELS"/*.whl <<'PYEOF'
import importlib.metadata as md, re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
have = {norm(d.metadata["Name"]) for d in md.distributions() if d.metadata["Name"]}
print(" ".join(w for w in sys.argv[1:] if norm(w.rsplit("/", 1)[-1].split("-")[0]) not in have))
PYEOF
) || exit 1
  if [ -n "$missing" ]; then
    echo "installing $(echo $missing | wc -w) of $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $missing || exit 1
  fi
  export PYTHONPATH=$SITE
fi
[ "${1:-}" = "--install-only" ] && exit 0
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, torch; from dgl_crystalframer._dgl import dgl; import pymatgen.core, spglib, ase, numba
print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'dgl', dgl.__version__,
      'numba', numba.__version__, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
} 2>&1 | tee "$out/machine.txt"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_sparse.py -k cuda 2>&1 | tee "$out/parity.txt"
timeout 270 "$PY" -m benchmarks.perf --device cuda --quick --out "$out" 2>&1 | tee "$out/perf.txt"
timeout 60 "$PY" -m benchmarks.perf --profile cuda 2>&1 | tee "$out/profile.txt"
