"""The sparse operations of the model, in one place, with two interchangeable backends.

Every message-passing step of the layer and the frames goes through this module; ``nn.py`` and
``frames.py`` never call DGL themselves.  Each operation works on a :class:`Topology` (the
edges j -> i of a batch, grouped by destination atom i) and dense node or edge tensors:

=================  =========================================  ==================================
operation           meaning                                    shapes
=================  =========================================  ==================================
``u_dot_v``         SDDMM  a[e] = u[src(e)] . v[dst(e)]          [N, H, D] x [N, H, D] -> [E, H, 1]
``e_dot_v``         SDDMM  a[e] = x[e] . v[dst(e)]               [E, *, D] x [N, *, D] -> [E, *, 1]
``e_mul_v``         a[e] = x[e] * v[dst(e)]                      [E, *] x [N, *] -> [E, *]
``edge_softmax``    softmax over the incoming edges of each atom  [E, H] -> [E, H]
``u_mul_e_sum``     SpMM   y[i] = sum_{e->i} u[src(e)] * x[e]    [N, H, D] x [E, H, 1] -> [N, H, D]
``edge_sum``        y[i] = sum_{e->i} x[e] * w[e] (broadcast)    [E, 1, K] x [E, H, 1] -> [N, H, K]
``copy_e_sum/max``  y[i] = sum / max over e->i of x[e]          [E, *] -> [N, *]
``graph_mean``      mean over the atoms of each crystal          [N, d] -> [B, d]
=================  =========================================  ==================================

Backends:

* ``dgl``: DGL's fused kernels (``dgl.ops``, ``edge_softmax``, a broadcasting ``gspmm`` over an
  edge -> atom block).  Runs wherever the installed DGL supports the tensors' device: always on
  CPU, on CUDA only with a CUDA build of DGL.
* ``torch``: the same results from plain index tensors (gathers, ``index_add_``,
  ``scatter_reduce``) with hand-written backward passes that keep node-sized tensors only, so
  memory per edge stays that of the DGL kernels.  Any torch, any device.

Each is a class behind one interface (:class:`SparseBackend`: ``DGLBackend``, ``TorchBackend``);
a :class:`Topology` holds the one its batch uses and every operation below dispatches to it.
The choice (``select_backend(device, requested)``) is made once, where a run starts: ``dgl``
where DGL supports the device, ``torch`` otherwise (CUDA tensors with DGL from PyPI, which is
CPU-only); ``--backend dgl|torch`` or ``DGL_CRYSTALFRAMER_BACKEND=dgl|torch`` (read by the entry
points through ``backend_from_env``) override it.  The name is passed down explicitly: the
trainer and the predictor set ``CrystalFramer.sparse_backend``, which the model hands to every
topology it builds.  Both give the same numbers to float rounding (tests/test_sparse.py).

No operation here synchronises a GPU: sizes come from the graph (Python ints), never from
device tensors.  Building a topology does, once per batch: the padded layout needs the largest
number of edges of an atom (and a DGLGraph on a GPU is checked for edges sorted by destination).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional

import torch

from ._dgl import CUDA_HELP, dgl, dglops, edge_softmax as _dgl_edge_softmax
from .config import BACKENDS as _CHOICES
from .errors import ConfigError, DeviceError

BACKENDS = tuple(b for b in _CHOICES if b != "auto")  # ("dgl", "torch")
BACKEND_ENV = "DGL_CRYSTALFRAMER_BACKEND"


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
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]")
    if not torch.cuda.is_available():
        if name == "auto":
            return torch.device("cpu")
        raise DeviceError(f"--device {name}: torch {torch.__version__} sees no CUDA GPU "
                           f"(a CPU-only build of torch, or no driver). " + CUDA_HELP)
    try:
        device = torch.device("cuda" if name == "auto" else name)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from exc
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {name}: torch sees only {torch.cuda.device_count()} GPU(s)")
    return device



def backend_from_env(requested: Optional[str] = "auto") -> str:
    """What the user asked for: ``requested`` (a flag or config value) unless it is ``auto``/None,
    then ``$DGL_CRYSTALFRAMER_BACKEND``, else ``auto``.  Read once, at an entry point (the trainer,
    the predictor, the benchmarks), never inside the model."""
    name = (requested or "auto").strip().lower()
    if name != "auto":
        return _check(name, "unknown backend {!r}: use auto, dgl or torch")
    return _check(os.environ.get(BACKEND_ENV, "").strip().lower() or "auto",
                  BACKEND_ENV + "={!r}: use dgl or torch (or leave it unset)")


def _check(name: str, message: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ConfigError(message.format(name))
    return name


@functools.lru_cache(maxsize=None)
def _dgl_supports(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    try:  # a CPU-only DGL raises "Device API cuda is not enabled"
        dgl.graph(([0], [0]), device=torch.device(device_type, 0))
        return True
    except Exception:
        return False


def dgl_supports(device) -> bool:
    """Whether the installed DGL has kernels for ``device`` (CPU always; CUDA with a CUDA build)."""
    return _dgl_supports(torch.device(device).type)


def select_backend(device, requested: Optional[str] = "auto") -> str:
    """The backend name for tensors on ``device``: ``requested`` (``dgl``, ``torch``), or for
    ``auto``/None ``dgl`` where DGL supports the device and ``torch`` elsewhere.  Asking for
    ``dgl`` on a device DGL lacks raises DeviceError.  A pure function of its arguments: the
    caller chooses once and passes the name down (``CrystalFramer.sparse_backend``)."""
    name = _check((requested or "auto").strip().lower(), "unknown backend {!r}: use auto, dgl or torch")
    if name == "torch":
        return "torch"
    if dgl_supports(device):
        return "dgl"
    if name == "dgl":
        raise DeviceError(f"backend dgl: the installed DGL {dgl.__version__} has no kernels for {device}. "
                           f"Use --backend torch (plain PyTorch, any device), or: {CUDA_HELP}")
    return "torch"


class Topology:
    """The edges of a (batched) crystal graph on one device, with the backend that runs the sparse ops.

    ``src``, ``dst`` [E] int64 in the graph's edge order; ``indptr`` [N + 1] where each atom's
    edges start once they are sorted by destination; ``order`` [E] the sorting permutation, or
    None when the edges already are (graphs from ``build_graph`` always are);
    ``node_graph`` [N] the crystal of each atom and ``batch_num_nodes`` [B] its atom count.
    Build it with :meth:`of`, once per batch: every layer of a model shares it.
    """

    def __init__(self, graph, device=None, backend=None):
        src, dst = graph.edges()
        self.device = torch.device(device) if device is not None else src.device
        self.backend = backend if isinstance(backend, SparseBackend) else get_backend(select_backend(self.device, backend))
        if not self.backend.supports(self.device):
            raise DeviceError(f"backend {self.backend.name}: the installed DGL has no kernels for {self.device}. {CUDA_HELP}")
        self.source = graph
        self.src = src.to(self.device, torch.int64, non_blocking=True)
        self.dst = dst.to(self.device, torch.int64, non_blocking=True)
        self.num_nodes = int(graph.num_nodes())
        self.num_edges = int(self.src.shape[0])
        counts = graph.batch_num_nodes()
        self.batch_size = int(counts.shape[0])
        self.batch_num_nodes = counts.to(self.device, torch.int64, non_blocking=True)
        self.node_graph = torch.repeat_interleave(torch.arange(self.batch_size, device=self.device),
                                                  self.batch_num_nodes, output_size=self.num_nodes)
        sorted_hint = getattr(graph, "sorted_by_dst", None)
        is_sorted = sorted_hint if sorted_hint is not None else not bool((self.dst[1:] < self.dst[:-1]).any())
        self.order = None if is_sorted else torch.argsort(self.dst, stable=True)
        dst_sorted = self.dst if self.order is None else self.dst[self.order]
        self.indptr = torch.searchsorted(dst_sorted, torch.arange(self.num_nodes + 1, device=self.device))
        self._graph = graph if _is_dgl_graph(graph) and graph.device == self.device else None
        # the padded layout's width without reading it back from a GPU: known to a CrystalBatch made
        # on CPU, or counted on a graph still on the CPU
        self._max_degree = getattr(graph, "max_in_degree", None)
        self._host_dst = dst if dst.device.type == "cpu" and self.device.type != "cpu" else None
        self._block = None
        self._pad_index: Optional[torch.Tensor] = None
        self._ndata: Dict[str, torch.Tensor] = {}

    @classmethod
    def of(cls, graph, device=None, backend=None) -> "Topology":
        """The topology of a ``DGLGraph`` (batched or not, on any device) or a
        :class:`~dgl_crystalframer.batch.CrystalBatch`, placed on ``device`` (default: the graph's),
        with ``backend`` (a name, a :class:`SparseBackend`, or None/``auto``: by device)."""
        return cls(graph, device, backend)

    # DGL objects, built on first use (dgl backend only)
    @property
    def graph(self):
        if self._graph is None:
            self._graph = dgl.graph((self.src, self.dst), num_nodes=self.num_nodes, device=self.device)
        return self._graph

    @property
    def block(self):
        """Bipartite graph 'edge e -> its destination atom': a broadcasting SpMM over it sums
        edge features into atoms without forming the broadcast product."""
        if self._block is None:
            eids = torch.arange(self.num_edges, device=self.device)
            self._block = dgl.create_block((eids, self.dst), num_src_nodes=self.num_edges,
                                           num_dst_nodes=self.num_nodes, device=self.device)
        return self._block

    # Each atom's incoming edges as one row of a padded [N, max_degree] layout: sums over edges
    # that broadcast (an edge feature times a per-head weight) become batched matrix products,
    # several times faster than DGL's broadcasting kernels on CPU and fast on GPUs.
    @property
    def max_degree(self) -> int:
        if self._pad_index is None:
            self._build_pad_index()
        return self._max_degree

    def _build_pad_index(self) -> None:
        if self._max_degree is None and self._host_dst is not None:
            self._max_degree = max(1, int(torch.bincount(self._host_dst, minlength=self.num_nodes).max()))
        if self._max_degree is None:
            degree = self.indptr[1:] - self.indptr[:-1]
            self._max_degree = max(1, int(degree.max())) if self.num_nodes else 1  # one device sync per batch
        sorted_pos = torch.arange(self.num_edges, device=self.device)
        if self.order is not None:  # position of each edge in the destination-sorted order
            sorted_pos = torch.empty_like(sorted_pos).index_copy_(0, self.order, sorted_pos)
        slot = sorted_pos - self.indptr[self.dst]
        self._pad_index = self.dst * self._max_degree + slot

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """[E, *] edge tensor -> [N, max_degree, *], zeros where an atom has fewer edges."""
        D = self.max_degree
        out = x.new_zeros((self.num_nodes * D,) + x.shape[1:])
        return out.index_copy(0, self._pad_index, x).view((self.num_nodes, D) + x.shape[1:])

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """[N, max_degree, *] -> [E, *], the inverse of ``pad``."""
        D = self.max_degree
        return y.reshape((self.num_nodes * D,) + y.shape[2:]).index_select(0, self._pad_index)

    def node_data(self, key: str) -> torch.Tensor:
        """``graph.ndata[key]`` on this topology's device (KeyError when absent)."""
        if key not in self._ndata:
            self._ndata[key] = self.source.ndata[key].to(self.device, non_blocking=True)
        return self._ndata[key]

    def has_node_data(self, key: str) -> bool:
        return key in self.source.ndata


def _is_dgl_graph(graph) -> bool:
    return isinstance(graph, dgl.DGLGraph)


def _index(idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """idx [E] viewed and expanded to ``like``'s shape, for scatter along dim 0."""
    return idx.view(-1, *([1] * (like.dim() - 1))).expand_as(like)


# ---------------------------------------------------------------------------------------------
# the torch backend: autograd functions that keep only node-sized tensors for backward


class _UDotV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, dst, u, v):
        ctx.save_for_backward(src, dst, u, v)
        return (u[src] * v[dst]).sum(-1, keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        src, dst, u, v = ctx.saved_tensors
        gu = gv = None
        if ctx.needs_input_grad[2]:
            gu = torch.zeros_like(u).index_add_(0, src, grad * v[dst])
        if ctx.needs_input_grad[3]:
            gv = torch.zeros_like(v).index_add_(0, dst, grad * u[src])
        return None, None, gu, gv


class _UMulESum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, src, dst, num_nodes, u, x):
        ctx.save_for_backward(src, dst, u, x)
        out_shape = (num_nodes,) + torch.broadcast_shapes(u.shape[1:], x.shape[1:])
        return u.new_zeros(out_shape).index_add_(0, dst, u[src] * x)

    @staticmethod
    def backward(ctx, grad):
        src, dst, u, x = ctx.saved_tensors
        g = grad[dst]
        gu = gx = None
        if ctx.needs_input_grad[3]:
            gu = _sum_to(torch.zeros(u.shape[:1] + g.shape[1:], dtype=g.dtype, device=g.device).index_add_(0, src, g * x),
                         u.shape)
        if ctx.needs_input_grad[4]:
            gx = _sum_to(g * u[src], x.shape)
        return None, None, None, gu, gx


def _sum_to(t: torch.Tensor, shape) -> torch.Tensor:
    """Sum a broadcast gradient back to ``shape`` (same number of dims)."""
    dims = [d for d, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1]
    return t.sum(dims, keepdim=True) if dims else t


class _EdgeSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dst, num_nodes, logits):
        shape = (num_nodes,) + logits.shape[1:]
        top = logits.new_zeros(shape).scatter_reduce_(0, _index(dst, logits), logits, "amax", include_self=False)
        ex = (logits - top[dst]).exp_()
        out = ex / ex.new_zeros(shape).index_add_(0, dst, ex)[dst]
        ctx.save_for_backward(dst, out)
        ctx.num_nodes = num_nodes
        return out

    @staticmethod
    def backward(ctx, grad):
        dst, out = ctx.saved_tensors
        go = grad * out
        total = go.new_zeros((ctx.num_nodes,) + go.shape[1:]).index_add_(0, dst, go)
        return None, None, go - out * total[dst]


# ---------------------------------------------------------------------------------------------
# the backends: one class each, behind one interface


class SparseBackend:
    """The sparse operations of one implementation (see the module doc for their meaning).  Adding a
    backend is one subclass and one entry in ``SPARSE_BACKENDS``.  ``e_dot_v`` and ``edge_sum`` get
    only the general forms here; their broadcasting forms are batched matmuls on every backend."""

    name = ""

    def supports(self, device) -> bool:
        raise NotImplementedError

    def u_dot_v(self, topo, u, v):
        raise NotImplementedError

    def e_dot_v(self, topo, x, v):
        raise NotImplementedError

    def e_mul_v(self, topo, x, v):
        raise NotImplementedError

    def edge_softmax(self, topo, logits):
        raise NotImplementedError

    def u_mul_e_sum(self, topo, u, x):
        raise NotImplementedError

    def edge_sum(self, topo, x, weight):
        raise NotImplementedError

    def copy_e_sum(self, topo, x):
        raise NotImplementedError

    def copy_e_max(self, topo, x):
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DGLBackend(SparseBackend):
    """DGL's fused kernels, on the topology's ``DGLGraph`` (and edge -> atom block)."""

    name = "dgl"

    def supports(self, device) -> bool:
        return dgl_supports(device)

    def u_dot_v(self, topo, u, v):
        return dglops.u_dot_v(topo.graph, u, v)

    def e_dot_v(self, topo, x, v):
        return dglops.e_dot_v(topo.graph, x, v)

    def e_mul_v(self, topo, x, v):
        return dglops.e_mul_v(topo.graph, x, v)

    def edge_softmax(self, topo, logits):
        return _dgl_edge_softmax(topo.graph, logits)

    def u_mul_e_sum(self, topo, u, x):
        return dglops.u_mul_e_sum(topo.graph, u, x)

    def edge_sum(self, topo, x, weight):
        return dglops.gspmm(topo.block, "mul", "sum", x, weight)

    def copy_e_sum(self, topo, x):
        return dglops.copy_e_sum(topo.graph, x)

    def copy_e_max(self, topo, x):
        return dglops.copy_e_max(topo.graph, x)


class TorchBackend(SparseBackend):
    """Plain index tensors (gathers, ``index_add_``, ``scatter_reduce``) with hand-written backward
    passes that keep node-sized tensors only: any torch, any device."""

    name = "torch"

    def supports(self, device) -> bool:
        return True

    def u_dot_v(self, topo, u, v):
        return _UDotV.apply(topo.src, topo.dst, u, v)

    def e_dot_v(self, topo, x, v):
        return (x * v[topo.dst]).sum(-1, keepdim=True)

    def e_mul_v(self, topo, x, v):
        return x * v[topo.dst]

    def edge_softmax(self, topo, logits):
        return _EdgeSoftmax.apply(topo.dst, topo.num_nodes, logits)

    def u_mul_e_sum(self, topo, u, x):
        return _UMulESum.apply(topo.src, topo.dst, topo.num_nodes, u, x)

    def edge_sum(self, topo, x, weight):
        prod = x * weight
        return prod.new_zeros((topo.num_nodes,) + prod.shape[1:]).index_add_(0, topo.dst, prod)

    def copy_e_sum(self, topo, x):
        return x.new_zeros((topo.num_nodes,) + x.shape[1:]).index_add_(0, topo.dst, x)

    def copy_e_max(self, topo, x):
        return x.new_zeros((topo.num_nodes,) + x.shape[1:]).scatter_reduce_(0, _index(topo.dst, x), x, "amax",
                                                                            include_self=False)


SPARSE_BACKENDS: Dict[str, SparseBackend] = {b.name: b for b in (DGLBackend(), TorchBackend())}
assert tuple(SPARSE_BACKENDS) == BACKENDS, "config.BACKENDS and sparse.SPARSE_BACKENDS list other backends"


def get_backend(name: str) -> SparseBackend:
    """The backend object of a name from ``select_backend``."""
    return SPARSE_BACKENDS[name]


# ---------------------------------------------------------------------------------------------
# the operations, each run by the topology's backend


def u_dot_v(topo: Topology, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """a[e] = u[src(e)] . v[dst(e)] over the last dim: [N, H, D] x [N, H, D] -> [E, H, 1]."""
    return topo.backend.u_dot_v(topo, u, v)


def e_dot_v(topo: Topology, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """a[e] = x[e] . v[dst(e)] over the last dim, broadcasting: [E, 1, D] x [N, K, D] -> [E, K, 1]."""
    if x.dim() == 3 and x.shape[1] == 1 and v.dim() == 3:  # one batched matmul per atom, both backends
        return topo.unpad(torch.bmm(topo.pad(x[:, 0]), v.transpose(1, 2))).unsqueeze(-1)
    return topo.backend.e_dot_v(topo, x, v)


def e_mul_v(topo: Topology, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """a[e] = x[e] * v[dst(e)], broadcasting: [E, 1] x [N, H] -> [E, H]."""
    return topo.backend.e_mul_v(topo, x, v)


def edge_softmax(topo: Topology, logits: torch.Tensor) -> torch.Tensor:
    """Softmax of ``logits`` [E, H] over the incoming edges of each destination atom."""
    return topo.backend.edge_softmax(topo, logits)


def u_mul_e_sum(topo: Topology, u: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y[i] = sum_{e -> i} u[src(e)] * x[e]: [N, H, D] x [E, H, 1] -> [N, H, D]."""
    return topo.backend.u_mul_e_sum(topo, u, x)


def edge_sum(topo: Topology, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """y[i] = sum_{e -> i} x[e] * weight[e], broadcasting ([E, 1, K] x [E, H, 1] -> [N, H, K]).
    The broadcast form [E, 1, K] x [E, H, 1] is one batched matmul over each atom's padded edge
    list (both backends); others use the backend's kernel."""
    if x.dim() == 3 and weight.dim() == 3 and x.shape[1] == 1 and weight.shape[2] == 1:
        return torch.bmm(topo.pad(weight[:, :, 0]).transpose(1, 2), topo.pad(x[:, 0]))
    return topo.backend.edge_sum(topo, x, weight)


def copy_e_sum(topo: Topology, x: torch.Tensor) -> torch.Tensor:
    """y[i] = sum_{e -> i} x[e]: [E, *] -> [N, *] (0 for atoms without edges)."""
    return topo.backend.copy_e_sum(topo, x)


def copy_e_max(topo: Topology, x: torch.Tensor) -> torch.Tensor:
    """y[i] = max_{e -> i} x[e]: [E, *] -> [N, *] (0 for atoms without edges, as DGL).  No gradient."""
    return topo.backend.copy_e_max(topo, x)


def graph_mean(topo: Topology, x: torch.Tensor) -> torch.Tensor:
    """Mean of the node features of each crystal: [N, d] -> [B, d] (the readout; same on both backends)."""
    total = x.new_zeros((topo.batch_size,) + x.shape[1:]).index_add_(0, topo.node_graph, x)
    return total / topo.batch_num_nodes.clamp_min(1).to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def per_graph_to_nodes(topo: Topology, values: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [N, ...]: each crystal's value repeated on its atoms."""
    return values[topo.node_graph]


__all__ = ["BACKENDS", "BACKEND_ENV", "DGLBackend", "SPARSE_BACKENDS", "SparseBackend", "Topology", "TorchBackend",
           "backend_from_env", "copy_e_max", "copy_e_sum", "dgl_supports", "e_dot_v", "e_mul_v", "edge_softmax",
           "edge_sum", "get_backend", "graph_mean", "per_graph_to_nodes", "resolve_device", "select_backend", "u_dot_v",
           "u_mul_e_sum"]
