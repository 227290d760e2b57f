"""How idle OpenMP threads wait, decided before torch and DGL load their OpenMP runtime(s).

torch and DGL both parallelise their CPU kernels with OpenMP, and the wait policy matters a lot
on few cores:

* Two runtimes in one process (torch wheels that bundle a renamed ``libgomp-<hash>.so.1`` or
  Intel's ``libiomp5``, next to the system ``libgomp.so.1`` that DGL links): with the default
  (spinning) policy their idle threads fight over the cores -- measured on 2 cores: 3x slower
  training, 50x slower batch-1 inference.  Only ``OMP_WAIT_POLICY=passive`` is safe there.
* One runtime (torch bundles ``libgomp.so.1`` itself, which DGL's ``libgomp.so.1`` dependency then
  resolves to): threads should spin briefly before sleeping.  Measured on 2 cores (torch 2.13,
  dgl 2.1): ``GOMP_SPINCOUNT=10000`` trained 1.2x faster and predicted single crystals 1.8x faster
  than ``passive``, and as fast as unbounded spinning; the bound keeps the cost of spinning
  against other processes (data-loader workers, a second job) small.

``configure()`` picks the second only when it can see the shared runtime, else ``passive``.  A
user's own ``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT`` or ``KMP_BLOCKTIME`` is never overridden.  This
module imports nothing heavy: ``_dgl.py`` calls it before ``import torch``.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from typing import List

SPIN_COUNT = "10000"  # ~10-30 microseconds of spinning before an idle libgomp thread sleeps
USER_KEYS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")

setting = "not configured"  # what configure() chose, for benchmarks and logs


def torch_openmp_libraries() -> List[str]:
    """File names of the OpenMP runtimes bundled in torch/lib (without importing torch)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return []
    lib = os.path.join(list(spec.submodule_search_locations)[0], "lib")
    try:
        names = os.listdir(lib)
    except OSError:
        return []
    return sorted(n for n in names if n.startswith(("libgomp", "libiomp", "libomp")) and ".so" in n)


def configure() -> str:
    """Set the wait policy in ``os.environ`` (only where the user set none) and return it."""
    global setting
    for key in USER_KEYS:  # an empty value counts as unset (libgomp would complain about it)
        if key in os.environ and not os.environ[key].strip():
            del os.environ[key]
    user = {k: os.environ[k] for k in USER_KEYS if k in os.environ}
    if user:
        setting = "user: " + ", ".join(f"{k}={v}" for k, v in user.items())
    elif torch_openmp_libraries() == ["libgomp.so.1"]:  # one shared GNU OpenMP runtime
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
        setting = f"GOMP_SPINCOUNT={SPIN_COUNT} (torch and DGL share one libgomp)"
    else:
        os.environ["OMP_WAIT_POLICY"] = "passive"
        setting = "OMP_WAIT_POLICY=passive (torch's OpenMP runtime may not be DGL's)"
        if "torch" in sys.modules:  # its runtime has read the environment already
            warnings.warn("torch was imported before dgl_crystalframer, too late to set OMP_WAIT_POLICY=passive; "
                          "if training or batch-1 prediction is slow, set OMP_WAIT_POLICY=passive in the environment "
                          "or import dgl_crystalframer first (see dgl_crystalframer/_openmp.py)", RuntimeWarning, stacklevel=3)
    return setting
