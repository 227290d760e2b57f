"""Crystal structure -> periodic-image multigraph (the graph format of docs/ARCHITECTURE.md).

One node per unit-cell atom; one edge per periodic image (j, n) -> i with |r_ij(n)| <= cutoff,
where r_ij(n) = p_j + L^T n - p_i (L: rows are lattice vectors), the self image included.

``build_graph(structure)`` = ``structures.structure_to_arrays`` (any input -> validated arrays)
then ``graph_from_arrays`` (arrays -> ``dgl.DGLGraph``; no pymatgen objects are built here).

The neighbour search is pymatgen's compiled ``find_points_in_spheres`` run on an LLL-reduced,
wrapped copy of the cell (so strongly skewed cells cost no more than reduced ones); image
offsets are mapped back to the basis and the (unwrapped) positions the caller gave.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from ._dgl import dgl
from .basis import default_cutoff
from .lattice import lattice_axes, lll_reduce, primitive_lattice
from .errors import StructureError
from .structures import NUM_SPECIES, MIN_DISTANCE, CrystalArrays, entry_label, structure_to_arrays, validate_arrays

MAX_EDGES = 20_000_000  # safety net against absurd inputs (realistic: ~100 edges per atom)


# --------------------------------------------------------------------------------------------
# neighbour search


def periodic_neighbors(lattice: np.ndarray, cart: np.ndarray, cutoff: float, name: Optional[str] = None):
    """All periodic images (j, n) of all atoms within ``cutoff`` of each atom i, self image included.

    lattice [3, 3], cart [N, 3] (any wrapping).  Returns (src j [E] int64, dst i [E] int64,
    image n [E, 3] int64, rvec [E, 3] float64 = cart[j] + n @ lattice - cart[i]), sorted by
    (dst, src, image).  Raises ``StructureError`` if two distinct images are closer than
    MIN_DISTANCE (checked on the search itself, at no extra cost).
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    label = entry_label(name)
    n_atoms = len(cart)
    # Search on a reduced basis: for skewed cells the image count of the search then stays ~ the
    # sphere volume instead of growing with the skew.  U is unimodular: same lattice.
    u = lll_reduce(lattice)
    reduced = (u @ lattice).astype(np.float64)
    shortest = float(np.linalg.norm(reduced, axis=1).min())
    if shortest < MIN_DISTANCE:
        raise StructureError(f"{label}: lattice vector of length {shortest:.3g} A: every atom overlaps its own periodic image (< {MIN_DISTANCE} A)")
    radius = max(float(cutoff), MIN_DISTANCE)
    volume = abs(float(np.linalg.det(lattice)))
    expected = n_atoms * n_atoms * (4.0 / 3.0 * math.pi * radius**3) / volume
    if expected > MAX_EDGES:
        raise StructureError(f"{label}: about {expected:.3g} edges at cutoff {radius:g} A (limit {MAX_EDGES:g}); is the cell too dense?")

    # Wrap into the reduced cell ourselves (shift s), so the image bookkeeping does not rely on
    # how the search treats positions outside the cell.
    frac = cart @ np.linalg.inv(reduced)
    shift = np.floor(frac)
    wrapped = np.ascontiguousarray(cart - shift @ reduced)
    dst, src, offsets, _ = find_points_in_spheres(
        wrapped, wrapped, r=radius + 1e-6, pbc=np.ones(3, dtype=np.int64), lattice=np.ascontiguousarray(reduced), tol=1e-8
    )
    dst = dst.astype(np.int64)
    src = src.astype(np.int64)
    # wrapped_j + R^T m' - wrapped_i = p_j + R^T (m' - s_j + s_i) - p_i, and R^T m = L^T (U^T m)
    m = np.rint(offsets).astype(np.int64) - shift[src].astype(np.int64) + shift[dst].astype(np.int64)
    image = m @ u
    rvec = cart[src] + image @ lattice - cart[dst]  # recomputed in the caller's basis and positions
    dist = np.sqrt(np.einsum("ij,ij->i", rvec, rvec))

    nonself = (src != dst) | np.any(image != 0, axis=1)
    if np.any(nonself):
        k = int(np.argmin(np.where(nonself, dist, np.inf)))
        if dist[k] < MIN_DISTANCE:
            raise StructureError(
                f"{label}: atoms {int(dst[k])} and {int(src[k])} (image {tuple(int(x) for x in image[k])}) are "
                f"{dist[k]:.3g} A apart (< {MIN_DISTANCE} A)"
            )
    keep = dist <= cutoff
    src, dst, image, rvec = src[keep], dst[keep], image[keep], rvec[keep]
    order = np.lexsort((image[:, 2], image[:, 1], image[:, 0], src, dst))  # last key is primary
    return src[order], dst[order], image[order], rvec[order]


# --------------------------------------------------------------------------------------------
# arrays -> graph


def graph_from_arrays(arrays: CrystalArrays, cutoff: Optional[float] = None, entry_id: Optional[str] = None) -> "dgl.DGLGraph":
    """Build the periodic multigraph of docs/ARCHITECTURE.md from ``CrystalArrays``.

    ndata: species f32 [N, 98], Z i64 [N], pos f32 [N, 3], lattice f32 [N, 3, 3],
    prim_lattice f32 [N, 3, 3], lattice_frame f32 [N, 3, 3], lattice_tied bool [N].
    edata: rvec f32 [E, 3], image i32 [E, 3].
    Edges (j, n) -> i for |r_ij(n)| <= cutoff (default ``basis.default_cutoff()``), sorted by
    (dst, src, image).
    """
    arrays = CrystalArrays(  # normalise dtypes: loaders may hand in lists or float32
        np.asarray(arrays.lattice, dtype=np.float64),
        np.asarray(arrays.cart, dtype=np.float64).reshape(-1, 3),
        np.asarray(arrays.species, dtype=np.float64),
        np.asarray(arrays.Z, dtype=np.int64),
        entry_id or arrays.name,
    )
    validate_arrays(arrays)
    cutoff = default_cutoff() if cutoff is None else float(cutoff)
    if not cutoff > 0:
        raise ValueError(f"cutoff must be > 0, got {cutoff}")
    src, dst, image, rvec = periodic_neighbors(arrays.lattice, arrays.cart, cutoff, arrays.name)
    prim = primitive_lattice(arrays.lattice, arrays.cart, arrays.species)

    n = arrays.num_atoms
    g = dgl.graph((torch.from_numpy(src), torch.from_numpy(dst)), num_nodes=n)
    # torch.tensor copies: inputs may be read-only views (pymatgen's lattice.matrix)
    g.ndata["species"] = torch.tensor(arrays.species, dtype=torch.float32)
    g.ndata["Z"] = torch.tensor(arrays.Z, dtype=torch.int64)
    g.ndata["pos"] = torch.tensor(arrays.cart, dtype=torch.float32)
    g.ndata["lattice"] = torch.tensor(arrays.lattice, dtype=torch.float32).expand(n, 3, 3).contiguous()
    g.ndata["prim_lattice"] = torch.tensor(prim, dtype=torch.float32).expand(n, 3, 3).contiguous()
    # the static lattice frame, with ties between equally short lattice vectors broken by this
    # structure's own edges (species-weighted, asymmetric in source and destination)
    z = arrays.species @ np.arange(1, NUM_SPECIES + 1, dtype=np.float64)
    frame, tied = lattice_axes(torch.from_numpy(prim), torch.from_numpy(rvec), torch.from_numpy(z[dst] + 0.5 ** 0.5 * z[src]))
    g.ndata["lattice_frame"] = frame.float().expand(n, 3, 3).contiguous()
    g.ndata["lattice_tied"] = torch.tensor(tied).expand(n).contiguous()
    g.edata["rvec"] = torch.from_numpy(rvec).float()
    g.edata["image"] = torch.from_numpy(image.astype(np.int32))
    return g


def build_graph(structure: Any, cutoff: Optional[float] = None, entry_id: Optional[str] = None) -> "dgl.DGLGraph":
    """Structure (pymatgen / ASE / jarvis Atoms or dict / CIF-POSCAR path) -> periodic multigraph.

    ``cutoff`` in Angstrom (None: ``basis.default_cutoff()`` ~ 6.93 A).  ``entry_id`` names the
    entry in error messages.  Raises ``StructureError`` (a ValueError) on unusable input.
    """
    return graph_from_arrays(structure_to_arrays(structure, entry_id), cutoff)


def graph_lattices(bg: "dgl.DGLGraph", key: str = "lattice") -> torch.Tensor:
    """[B, 3, 3] lattice per graph of a ``dgl.batch`` (``key``: "lattice" or "prim_lattice")."""
    counts = bg.batch_num_nodes()
    first = torch.cumsum(counts, 0) - counts  # index of each graph's first node
    return bg.ndata[key][first.to(bg.device)]


__all__ = ["MAX_EDGES", "build_graph", "graph_from_arrays", "graph_lattices", "periodic_neighbors"]
