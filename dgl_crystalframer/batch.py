"""Batches of crystal graphs, and moving them to the device the model runs on.

``collate`` turns dataset items ``(graph, target)`` into ``(batched graph, targets [B, T])``.
The batched graph is a ``dgl.DGLGraph`` (``dgl.batch``) or, for the torch backend, a
:class:`CrystalBatch`: the same topology and features as plain tensors, which any torch device
takes.  That is how a GPU is used with DGL from PyPI (CPU-only): graphs are built and batched on
CPU, in DataLoader workers, and only tensors cross to the GPU (pinned, non-blocking); no
``DGLGraph.to("cuda")`` is needed.  The model, the layer and the frames accept either type.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Dict, Sequence, Tuple

import torch

from ._dgl import dgl
from . import sparse


def host_max_in_degree(dst: torch.Tensor, num_nodes: int) -> int:
    """The most incoming edges of one atom, from CPU destination indices (at least 1)."""
    return max(1, int(torch.bincount(dst, minlength=num_nodes).max())) if dst.numel() else 1


class CrystalBatch:
    """A batched crystal graph as plain tensors: the part of the ``DGLGraph`` API the model uses.

    ``src``/``dst`` [E] int64 edges j -> i, ``ndata``/``edata`` dicts of node [N, ...] and edge
    [E, ...] tensors, ``batch_num_nodes()`` [B] atoms per crystal (kept on CPU as well, so that
    no size ever has to be read back from a GPU).  ``sorted_by_dst`` tells the topology that
    the edges are grouped by destination (``build_graph`` sorts them), which saves a check;
    ``max_in_degree`` (the most edges of one atom, counted on CPU) saves reading it back from a GPU
    for the padded layout (``sparse.Topology.pad``).
    """

    def __init__(self, src: torch.Tensor, dst: torch.Tensor, batch_num_nodes: torch.Tensor,
                 ndata: Dict[str, torch.Tensor], edata: Dict[str, torch.Tensor], sorted_by_dst=None,
                 max_in_degree=None):
        self.src, self.dst = src, dst
        self._batch_num_nodes = batch_num_nodes
        self._num_nodes = int(batch_num_nodes.sum()) if batch_num_nodes.device.type == "cpu" else None
        self.ndata, self.edata = dict(ndata), dict(edata)
        self.sorted_by_dst = sorted_by_dst
        self.max_in_degree = max_in_degree

    @classmethod
    def from_dgl(cls, graph, keys=None) -> "CrystalBatch":
        """The topology and features of a (batched) DGLGraph as plain tensors (no copies); with
        ``keys`` = (ndata keys, edata keys) only those (what a model reads: ``CrystalFramer.input_keys``),
        so that nothing else is pinned and copied to a GPU."""
        src, dst = graph.edges()
        ndata, edata = dict(graph.ndata), dict(graph.edata)
        if keys is not None:
            ndata = {k: v for k, v in ndata.items() if k in keys[0]}
            edata = {k: v for k, v in edata.items() if k in keys[1]}
        sorted_by_dst = max_in_degree = None
        if graph.device.type == "cpu":  # free here (DataLoader workers), a device sync each on a GPU
            sorted_by_dst = not bool((dst[1:] < dst[:-1]).any())
            max_in_degree = host_max_in_degree(dst, graph.num_nodes())
        return cls(src, dst, graph.batch_num_nodes(), ndata, edata, sorted_by_dst, max_in_degree)

    # -- the DGLGraph API subset ----------------------------------------------------------------
    def edges(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.src, self.dst

    def num_nodes(self) -> int:
        if self._num_nodes is None:
            self._num_nodes = int(self._batch_num_nodes.sum())
        return self._num_nodes

    def num_edges(self) -> int:
        return int(self.src.shape[0])

    def batch_num_nodes(self) -> torch.Tensor:
        return self._batch_num_nodes

    @property
    def batch_size(self) -> int:
        return int(self._batch_num_nodes.shape[0])

    @property
    def device(self) -> torch.device:
        return self.src.device

    def local_scope(self):
        return contextlib.nullcontext()

    # -- moving -----------------------------------------------------------------------------------
    def _map(self, fn) -> "CrystalBatch":
        out = CrystalBatch(fn(self.src), fn(self.dst), fn(self._batch_num_nodes),
                           {k: fn(v) for k, v in self.ndata.items()}, {k: fn(v) for k, v in self.edata.items()},
                           self.sorted_by_dst, self.max_in_degree)
        out._num_nodes = self._num_nodes  # known on CPU: kept, so a GPU batch never reads it back
        return out

    def to(self, device, non_blocking: bool = False) -> "CrystalBatch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "CrystalBatch":
        """Page-locked copies, so that ``to(cuda, non_blocking=True)`` overlaps with compute
        (DataLoader(pin_memory=True) calls this)."""
        return self._map(lambda t: t.pin_memory())

    def __repr__(self) -> str:
        return (f"CrystalBatch({self.batch_size} crystals, {self.num_nodes()} atoms, {self.num_edges()} edges, "
                f"device {self.device})")


def collate(items: Sequence[Tuple[Any, torch.Tensor]], as_tensors: bool = False, keys=None):
    """``[(graph, target [T])] -> (batched graph, targets [B, T])``; the batched graph is a
    :class:`CrystalBatch` when ``as_tensors`` (for the torch backend; ``keys``: the features it keeps,
    see ``CrystalBatch.from_dgl``), else ``dgl.batch(graphs)``."""
    graphs, targets = zip(*items)
    bg = dgl.batch(list(graphs))
    y = torch.stack([torch.as_tensor(t, dtype=torch.float32).reshape(-1) for t in targets])
    return (CrystalBatch.from_dgl(bg, keys) if as_tensors else bg), y


def tensor_collate(items):
    """``collate(items, as_tensors=True)``, picklable for DataLoader workers."""
    return collate(items, as_tensors=True)


def collate_for(device, backend=None, keys=None):
    """The collate function for a model on ``device`` with ``backend`` (None: by device): plain
    tensors for the torch backend (only ``keys``, when given), picklable for DataLoader workers."""
    backend = sparse.select_backend(device, backend)
    if backend != "torch":
        return collate
    return tensor_collate if keys is None else functools.partial(collate, as_tensors=True, keys=keys)


def to_device(graph, device, non_blocking: bool = False, backend=None):
    """A batched graph on ``device`` in the form ``backend`` (None: by device) needs: a DGLGraph
    moved with DGL for ``dgl``, else a :class:`CrystalBatch` of the same tensors."""
    device = torch.device(device)
    if isinstance(graph, CrystalBatch):
        return graph if graph.device == device else graph.to(device, non_blocking)
    if graph.device == device:
        return graph
    if sparse.select_backend(device, backend) == "dgl":
        return graph.to(device)
    return CrystalBatch.from_dgl(graph).to(device, non_blocking)


__all__ = ["CrystalBatch", "collate", "collate_for", "tensor_collate", "to_device"]
