"""Graphs on disk as flat records, read back one graph at a time: memory that does not grow with
the dataset.

A chunk file is the concatenation of one record per graph; a record holds everything
``graph.graph_from_arrays`` puts into a graph, as little-endian arrays (4-byte fields first, so
every array is aligned):

    header   int32 [4]       nodes N, edges E, occupants M (nonzero species weights), lattice tie flag
    lattice, prim_lattice, lattice_frame   float32 [3, 3] each (one per crystal)
    pos      float32 [N, 3]
    occ_w    float32 [M]     species weights, node by node
    rvec     float32 [E, 3]
    src      int32 [E]       source atom of each edge (edges are sorted by destination)
    indeg    int32 [N]       incoming edges per atom (the destination of each edge, run-length coded)
    image    int16 [E, 3]
    occ_n    uint8 [N]       occupants per node;   occ_z uint8 [M] their Z - 1;   Z uint8 [N]

A :class:`GraphRef` (file, offset, size, nodes) names a record; :func:`read_graph` fetches it with
one ``pread`` and rebuilds the same DGLGraph that was stored, bit for bit.  Reads go through the
page cache, which DataLoader workers and DDP ranks on one machine share, and count in no
process's resident memory.  About 19 bytes per edge and 30 per atom (a DGL graph file: ~45 per edge).
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, FrozenSet, List, NamedTuple, Sequence, Tuple, Union

import numpy as np
import torch

from ._dgl import dgl
from .structures import NUM_SPECIES

_ALIGN = 8


class GraphRef(NamedTuple):
    path: str
    offset: int
    size: int
    atoms: int


def num_atoms(item) -> int:
    """Atoms of a graph or of a stored one (without reading it)."""
    return item.atoms if isinstance(item, GraphRef) else int(item.num_nodes())


def _fields(n: int, e: int, m: int) -> List[Tuple[str, Any, Tuple[int, ...]]]:
    return [("lattice", np.float32, (3, 3)), ("prim_lattice", np.float32, (3, 3)), ("lattice_frame", np.float32, (3, 3)),
            ("pos", np.float32, (n, 3)), ("occ_w", np.float32, (m,)), ("rvec", np.float32, (e, 3)),
            ("src", np.int32, (e,)), ("indeg", np.int32, (n,)), ("image", np.int16, (e, 3)),
            ("occ_n", np.uint8, (n,)), ("occ_z", np.uint8, (m,)), ("Z", np.uint8, (n,))]


def encode_graph(g) -> bytes:
    """One graph of ``build_graph`` -> its record (raises ValueError for a graph it cannot hold)."""
    n, e = g.num_nodes(), g.num_edges()
    src, dst = (t.numpy() for t in g.edges())
    if e and np.any(np.diff(dst) < 0):
        raise ValueError("edges are not sorted by destination")
    species = g.ndata["species"].numpy()
    rows, cols = np.nonzero(species)
    image = g.edata["image"].numpy()
    if image.size and np.abs(image).max() > np.iinfo(np.int16).max:
        raise ValueError("periodic image offset out of int16 range")
    per_crystal = {k: g.ndata[k][0].numpy() if n else np.zeros((3, 3), np.float32)
                   for k in ("lattice", "prim_lattice", "lattice_frame")}
    values = dict(per_crystal, pos=g.ndata["pos"].numpy(), occ_w=species[rows, cols], rvec=g.edata["rvec"].numpy(),
                  src=src, indeg=np.bincount(dst, minlength=n), image=image, occ_n=np.bincount(rows, minlength=n),
                  occ_z=cols, Z=g.ndata["Z"].numpy())
    tied = bool(g.ndata["lattice_tied"][0]) if n else False
    parts = [np.array([n, e, len(rows), int(tied)], np.int32).tobytes()]
    for name, dtype, shape in _fields(n, e, len(rows)):
        parts.append(np.ascontiguousarray(values[name], dtype=dtype).reshape(shape).tobytes())
    raw = b"".join(parts)
    return raw + b"\0" * (-len(raw) % _ALIGN)


def _arrays(raw: bytes) -> Tuple[int, bool, Dict[str, np.ndarray]]:
    """(atoms, lattice tie flag, {field: read-only view}) of a record."""
    n, e, m, tied = (int(x) for x in np.frombuffer(raw, np.int32, 4))
    a: Dict[str, np.ndarray] = {}
    offset = 16
    for name, dtype, shape in _fields(n, e, m):
        count = math.prod(shape)
        a[name] = np.frombuffer(raw, dtype, count, offset).reshape(shape)
        offset += count * np.dtype(dtype).itemsize
    return n, bool(tied), a


def decode_graph(raw: bytes):
    """A record -> the DGLGraph it was made from."""
    n, tied, a = _arrays(raw)
    dst = np.repeat(np.arange(n, dtype=np.int64), a["indeg"])
    g = dgl.graph((torch.from_numpy(a["src"].astype(np.int64)), torch.from_numpy(dst)), num_nodes=n)
    species = np.zeros((n, NUM_SPECIES), np.float32)
    species[np.repeat(np.arange(n), a["occ_n"]), a["occ_z"]] = a["occ_w"]
    g.ndata["species"] = torch.from_numpy(species)
    g.ndata["Z"] = torch.from_numpy(a["Z"].astype(np.int64))
    g.ndata["pos"] = torch.from_numpy(a["pos"].copy())
    for key in ("lattice", "prim_lattice", "lattice_frame"):
        g.ndata[key] = torch.from_numpy(a[key].copy()).expand(n, 3, 3).contiguous()
    g.ndata["lattice_tied"] = torch.full((n,), tied)
    g.edata["rvec"] = torch.from_numpy(a["rvec"].copy())
    g.edata["image"] = torch.from_numpy(a["image"].astype(np.int32))
    return g


def write_records(path: str, graphs: Sequence[Any]) -> List[Tuple[int, int, int]]:
    """Write graphs to ``path`` (which is replaced); returns (offset, size, nodes) per graph."""
    index = []
    with open(path, "wb") as fh:
        for g in graphs:
            raw = encode_graph(g)
            index.append((fh.tell(), len(raw), int(g.num_nodes())))
            fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    return index


_FILES: Dict[str, int] = {}  # path -> open descriptor, per process (forked workers open their own)
_FILES_PID = [os.getpid()]


def _descriptor(path: str) -> int:
    if _FILES_PID[0] != os.getpid():  # a forked worker: the parent's descriptors share its file offset; ours are fresh
        _FILES.clear()
        _FILES_PID[0] = os.getpid()
    fd = _FILES.get(path)
    if fd is None:
        fd = _FILES[path] = os.open(path, os.O_RDONLY)
    return fd


def _read(ref: GraphRef) -> bytes:
    raw = os.pread(_descriptor(ref.path), ref.size, ref.offset)
    if len(raw) != ref.size:
        raise OSError(f"{ref.path}: short read at offset {ref.offset} (the graph cache changed under a running job?)")
    return raw


def read_graph(ref: GraphRef):
    """The graph a ``GraphRef`` names (one ``pread``)."""
    return decode_graph(_read(ref))


def summary(item) -> Tuple[FrozenSet[int], int, int, int]:
    """(atomic numbers present, atoms, fewest and most incoming edges of an atom) of a graph, or of a
    stored one without building its graph (``domain.domain_of`` reads every training crystal so)."""
    if isinstance(item, GraphRef):
        _, _, a = _arrays(_read(item))
        z, n, degree = a["occ_z"].astype(np.int64) + 1, item.atoms, a["indeg"]
    else:
        z = (item.ndata["species"] > 0).any(dim=0).nonzero().reshape(-1).numpy() + 1
        n, degree = int(item.num_nodes()), item.in_degrees().numpy()
    return frozenset(z.tolist()), n, int(degree.min()), int(degree.max())


def forget_files() -> None:
    """Close the descriptors (before a cache folder's files are deleted or replaced)."""
    for fd in _FILES.values():
        os.close(fd)
    _FILES.clear()


class GraphList(Sequence):
    """A dataset's graphs: stored ones read on access, in-memory ones as they are.

    Holds about 40 bytes per stored graph (file number, offset, size, nodes in arrays), so a
    list of a million stored graphs takes ~40 MB, not the ~40 GB of the graphs themselves.
    """

    def __init__(self, items: Sequence[Union[GraphRef, Any]]):
        paths: Dict[str, int] = {}
        self._file = np.full(len(items), -1, np.int32)  # -1: in memory
        self._offset = np.zeros(len(items), np.int64)
        self._size = np.zeros(len(items), np.int32)
        self._nodes = np.zeros(len(items), np.int32)
        self._memory: Dict[int, Any] = {}
        for i, item in enumerate(items):
            if isinstance(item, GraphRef):
                self._file[i] = paths.setdefault(item.path, len(paths))
                self._offset[i], self._size[i] = item.offset, item.size
            else:
                self._memory[i] = item
            self._nodes[i] = num_atoms(item)
        self._paths = list(paths)

    def __len__(self) -> int:
        return len(self._file)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = int(i)
        item = self.item(i + len(self) if i < 0 else i)
        return read_graph(item) if isinstance(item, GraphRef) else item

    def num_nodes(self, i: int) -> int:
        """Atoms of graph ``i``, without reading it."""
        return int(self._nodes[i])

    def item(self, i: int) -> Union[GraphRef, Any]:
        """Graph ``i`` as held: its ``GraphRef``, or the graph itself if in memory."""
        f = int(self._file[i])
        if f < 0:
            return self._memory[i]
        return GraphRef(self._paths[f], int(self._offset[i]), int(self._size[i]), int(self._nodes[i]))


__all__ = ["GraphList", "GraphRef", "decode_graph", "encode_graph", "forget_files", "num_atoms", "read_graph", "summary",
           "write_records"]
