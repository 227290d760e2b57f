"""Host-device synchronisations of a training step, counted without a GPU.

On a GPU the host waits for the device whenever a value computed there is read on the host
(``.item()``, ``int(t)``, ``bool(t)``, ``.tolist()``), whenever an operation's output size depends
on the data (``nonzero``, boolean-mask indexing), and a tensor made from host data
(``t.new_tensor([...])``, ``torch.tensor(list)``) is a blocking host-to-device copy.
:class:`SyncCounter` is a ``TorchDispatchMode`` that records each of these ATen operations with
the line of package code that caused it, and :func:`simulated_device_path` runs the code that a
CUDA device would take on CPU tensors: the ``torch`` sparse backend, no numba kernels, no DGL
operation (each raises), and the angular histogram in one chunk.  Together they count the syncs
of the CUDA path on a machine without a GPU (tests/test_syncs.py):

    python -m dgl_crystalframer.bench.syncs        # syncs per training step, per frame type
"""
from __future__ import annotations

import contextlib
import sys
import traceback
from typing import Dict, Iterator, List, Tuple
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ATen operations that make a GPU host wait: reading a value back, data-dependent output sizes,
# and tensors made from host data (a blocking host-to-device copy on a GPU).
SYNC_OPS = {
    "aten::_local_scalar_dense": "a device value read on the host (.item(), int(), bool(), .tolist())",
    "aten::nonzero": "data-dependent size (nonzero, boolean-mask indexing)",
    "aten::masked_select": "data-dependent size (boolean-mask indexing)",
    "aten::unique_consecutive": "data-dependent size",
    "aten::_unique2": "data-dependent size",
    "aten::repeat_interleave.Tensor": "data-dependent size (repeat_interleave without output_size)",
    "aten::lift_fresh": "a tensor made from host data (a blocking host-to-device copy on a GPU)",
    "Tensor.tolist": "a device tensor read on the host",
    "Tensor.numpy": "a device tensor read on the host",
    "Tensor.cpu": "a device tensor read on the host",
}


def _caller() -> str:
    """The innermost frame in this package (outside this module), as 'module.py:line (function)'."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        path = frame.filename.replace("\\", "/")
        if "/dgl_crystalframer/" in path and not path.endswith("/bench/syncs.py"):
            return f"{path.rsplit('/dgl_crystalframer/', 1)[1]}:{frame.lineno} ({frame.name})"
    return "outside the package"


def _indices(args):
    idx = args[1] if len(args) > 1 else ()
    return idx if isinstance(idx, (list, tuple)) else (idx,)


class SyncCounter(TorchDispatchMode):
    """Counts the ATen operations in ``SYNC_OPS`` run inside it: ``events`` [(op, where)]."""

    def __init__(self):
        super().__init__()
        self.events: List[Tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("aten::repeat_interleave") and "output_size" in (kwargs or {}):
            name = "aten::repeat_interleave.sized"
        if name.startswith("aten::index") and any(getattr(i, "dtype", None) == torch.bool for i in _indices(args)):
            name = "aten::nonzero"  # boolean-mask indexing runs nonzero below the dispatcher
        if name in SYNC_OPS or name.split(".")[0] in SYNC_OPS:
            self.events.append((name, _caller()))
        return func(*args, **(kwargs or {}))

    # reading a whole tensor back (.tolist(), .numpy(), .cpu()) is no ATen operation on a CPU tensor:
    # the methods are wrapped while the counter is active
    _HOST_READS = ("tolist", "numpy", "cpu")

    def __enter__(self):
        self._saved = {m: getattr(torch.Tensor, m) for m in self._HOST_READS}
        for m, fn in self._saved.items():
            setattr(torch.Tensor, m, self._recording(m, fn))
        return super().__enter__()

    def __exit__(self, *exc):
        for m, fn in self._saved.items():
            setattr(torch.Tensor, m, fn)
        return super().__exit__(*exc)

    def _recording(self, method, fn):
        def wrapper(t, *args, **kwargs):
            self.events.append((f"Tensor.{method}", _caller()))
            return fn(t, *args, **kwargs)
        return wrapper

    @property
    def count(self) -> int:
        return len(self.events)

    def where(self) -> Dict[str, int]:
        """{'op at place': times}."""
        out: Dict[str, int] = {}
        for op, place in self.events:
            key = f"{op} at {place}"
            out[key] = out.get(key, 0) + 1
        return out


class _NoDGL:
    def __getattr__(self, name):
        raise AssertionError(f"DGL's {name} called on the simulated GPU path (the torch backend must not use DGL)")

    def __call__(self, *args, **kwargs):
        raise AssertionError("a DGL function called on the simulated GPU path")


@contextlib.contextmanager
def simulated_device_path() -> Iterator[None]:
    """Run what a CUDA device would run, on CPU tensors: the torch version of the angular kernels
    and of the frames (no numba), one histogram chunk, and DGL's operations raising (the model
    must run with ``sparse_backend = "torch"``, as ``step_syncs`` sets it)."""
    from .. import kernels, nn, sparse

    def one_chunk(indptr, num_edges, nodes_per_chunk):
        return [(0, indptr.shape[0] - 1, 0, num_edges)]

    with mock.patch.object(kernels, "BACKEND", "torch"), mock.patch.object(nn, "_node_chunks", one_chunk), \
            mock.patch.object(sparse, "dglops", _NoDGL()), mock.patch.object(sparse, "_dgl_edge_softmax", _NoDGL()):
        yield


def step_syncs(frame: str, graphs, steps: int = 2, **model_config) -> SyncCounter:
    """The syncs of the last of ``steps`` training steps (forward, backward, optimiser) of a model
    (the default one, or with ``model_config`` overrides) on ``graphs`` batched as one
    ``CrystalBatch`` made on CPU (as DataLoader workers make them), through the simulated GPU path."""
    from .._dgl import dgl
    from ..batch import CrystalBatch
    from ..model import CrystalFramer

    batch = CrystalBatch.from_dgl(dgl.batch(list(graphs)))
    y = torch.linspace(-1, 1, batch.batch_size)
    with simulated_device_path():
        torch.manual_seed(0)
        model = CrystalFramer(frame=frame, **model_config)
        model.sparse_backend = "torch"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        for _ in range(steps):
            counter = SyncCounter()
            with counter:
                loss = torch.nn.functional.l1_loss(model(batch), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()  # the optimiser's step counters live on the host (not capturable): no sync
    return counter


def main(argv=None) -> int:
    from ..config import FRAME_TYPES

    from .perf import sample_graphs

    frames = (argv if argv else sys.argv[1:]) or list(FRAME_TYPES)
    graphs = sample_graphs(64)
    for frame in frames:
        c = step_syncs(frame, graphs)
        print(f"{frame}: {c.count} syncs per training step (batch 64, simulated GPU path)")
        for place, n in c.where().items():
            print(f"    {n} x {place}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
