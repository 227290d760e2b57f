#!/usr/bin/env bash
# The GPU check, as one command on a machine with an NVIDIA GPU (no network needed there):
#
#   bash scripts/gpu_check.sh OUTDIR
#
# 1. installs the wheels found in .whl/ (if any) into /tmp/site: on a machine that has PyTorch but
#    not DGL or pymatgen, fetch them beforehand on a machine with network access, e.g.
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#        --platform manylinux1_x86_64 -d .whl dgl==2.1.0 pymatgen==2026.10.24 pymatgen-core==2026.10.16 \
#        spglib==2.8.0 monty ruamel.yaml ruamel.yaml.clib uncertainties palettable orjson bibtexparser==1.4.4
#    (use the Python version of the GPU machine; about 12 MB);
# 2. runs the CUDA parity tests (tests/test_sparse.py -k cuda: the model on the GPU against the same
#    weights on the CPU with DGL's kernels, every frame type, outputs and gradients);
# 3. runs the GPU benchmark (python -m benchmarks.perf --device cuda): training crystals/s at batch
#    64 and 256, inference ms per crystal at batch 1 and 256, peak GPU memory, device syncs per step,
#    supercell scaling slope, CPU-vs-GPU agreement; and a torch.profiler table of one training step.
# Everything it prints also goes to OUTDIR (parity.txt, perf.txt, perf_device.json, profile.txt).
set -u
out=${1:-${OUT:-runs/gpu_check}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import torch, dgl; print('torch', torch.__version__, 'dgl', dgl.__version__)" 2>&1; } | tee "$out/machine.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_sparse.py -k cuda 2>&1 | tee "$out/parity.txt"
python3 -m benchmarks.perf --device cuda --out "$out" 2>&1 | tee "$out/perf.txt"
python3 - <<'EOF' 2>&1 | tee "$out/profile.txt"
import dgl_crystalframer  # noqa: F401  (OpenMP policy, DGL import)
import torch
from torch.profiler import ProfilerActivity, profile
from dgl_crystalframer.bench.perf import _on, make_model, sample_graphs, train_step_fn
device = torch.device("cuda")
for frame in ("none", "max"):
    step = train_step_fn(make_model(frame).to(device), _on(device, sample_graphs(256), 256, 1))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"frame {frame}, one training step at batch 256")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25))
EOF
