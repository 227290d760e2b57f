"""Crystal structure -> periodic-image multigraph (the graph format of docs/ARCHITECTURE.md).

One node per unit-cell atom; one edge per periodic image (j, n) -> i with |r_ij(n)| <= cutoff,
where r_ij(n) = p_j + L^T n - p_i (L: rows are lattice vectors), the self image included.

Two steps, so that data loaders can reuse either:

* ``structure_to_arrays``: pymatgen ``Structure`` / ASE ``Atoms`` / jarvis ``Atoms`` or its dict /
  CIF or POSCAR path  ->  ``CrystalArrays`` (plain float64 numpy arrays), validated.
* ``graph_from_arrays``: ``CrystalArrays`` -> ``dgl.DGLGraph``.  No pymatgen objects are built here.

The neighbour search is pymatgen's compiled ``find_points_in_spheres`` run on an LLL-reduced,
wrapped copy of the cell (so strongly skewed cells cost no more than reduced ones); image
offsets are mapped back to the basis and the (unwrapped) positions the caller gave.
"""
from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ._dgl import dgl
from .basis import default_cutoff
from .frames import lattice_axes

NUM_SPECIES = 98  # Z = 1..98, column Z-1 of the one-hot
MIN_DISTANCE = 0.1  # Angstrom: closer atoms (or images) are treated as a broken structure
MIN_VOLUME = 1e-3  # Angstrom^3: |det L| below this is a degenerate lattice
MAX_EDGES = 20_000_000  # safety net against absurd inputs (realistic: ~100 edges per atom)

# Element symbols for Z = 1..98 (index Z-1); a table so jarvis/ASE input needs no pymatgen.
_SYMBOLS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se "
    "Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb "
    "Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm "
    "Bk Cf"
).split()
_Z_OF_SYMBOL = {s: z for z, s in enumerate(_SYMBOLS, start=1)}
assert len(_SYMBOLS) == NUM_SPECIES


class StructureError(ValueError):
    """A structure that cannot be turned into a graph; the message names the entry and the problem."""


@dataclass
class CrystalArrays:
    """A crystal as plain arrays (float64 unless noted).

    lattice: [3, 3], rows are lattice vectors (Angstrom)
    cart:    [N, 3], Cartesian positions (Angstrom), as given (not wrapped)
    species: [N, 98], occupancy weights, column Z-1 (rows sum to the site occupancy, <= 1)
    Z:       [N] int64, atomic number of the majority species of each site
    name:    label used in error messages (entry id, file path, or None for "structure")
    """

    lattice: np.ndarray
    cart: np.ndarray
    species: np.ndarray
    Z: np.ndarray
    name: Optional[str] = None

    @property
    def num_atoms(self) -> int:
        return int(self.cart.shape[0])


# --------------------------------------------------------------------------------------------
# input -> arrays


def structure_to_arrays(structure: Any, entry_id: Optional[str] = None) -> CrystalArrays:
    """Convert any supported structure type to validated ``CrystalArrays``.

    Accepts a pymatgen ``Structure`` (disordered sites allowed), an ASE ``Atoms`` (periodic in
    all three directions), a jarvis-tools ``Atoms`` or its ``to_dict()`` dict, or a str/Path to
    a CIF / POSCAR / .vasp file (read with pymatgen).  Raises ``StructureError``.
    """
    if isinstance(structure, CrystalArrays):
        name = entry_id or structure.name
        arrays = CrystalArrays(structure.lattice, structure.cart, structure.species, structure.Z, name)
    elif isinstance(structure, (str, os.PathLike)):
        arrays = _from_file(os.fspath(structure), entry_id)
    elif _is_instance(structure, "pymatgen.core.structure", "IStructure"):
        arrays = _from_pymatgen(structure, entry_id)
    elif _is_instance(structure, "ase.atoms", "Atoms"):
        arrays = _from_ase(structure, entry_id)
    elif isinstance(structure, dict) or _is_instance(structure, "jarvis.core.atoms", "Atoms"):
        arrays = _from_jarvis(structure, entry_id)
    else:
        raise StructureError(
            f"{_label(entry_id)}: unsupported structure type {type(structure).__name__} (expected a pymatgen "
            "Structure, ASE Atoms, jarvis Atoms or dict, or a CIF/POSCAR path)"
        )
    validate_arrays(arrays)
    return arrays


def _is_instance(obj: Any, module: str, cls: str) -> bool:
    # If the module was never imported, obj cannot be an instance of its class: no import needed.
    mod = sys.modules.get(module)
    return mod is not None and isinstance(obj, getattr(mod, cls))


def _label(name: Optional[str]) -> str:
    return str(name) if name else "structure"


def _from_file(path: str, entry_id: Optional[str]) -> CrystalArrays:
    name = entry_id or path
    if not os.path.isfile(path):
        raise StructureError(f"{name}: no such file {path!r}")
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():  # pymatgen's notes (e.g. coordinates rounded) would flood stderr
            warnings.simplefilter("ignore")
            structure = Structure.from_file(path)
    except Exception as exc:  # pymatgen raises many kinds (ValueError, IndexError, CifParserError...)
        raise StructureError(f"{name}: cannot read a crystal structure from {path!r} ({type(exc).__name__}: {exc})") from exc
    return _from_pymatgen(structure, name)


def _from_pymatgen(structure: Any, entry_id: Optional[str]) -> CrystalArrays:
    name = _label(entry_id)
    pbc = getattr(structure.lattice, "pbc", (True, True, True))
    if not all(pbc):
        raise StructureError(f"{name}: structure is not periodic in all three directions (pbc={tuple(pbc)})")
    lattice = np.array(structure.lattice.matrix, dtype=np.float64)
    cart = np.array(structure.cart_coords, dtype=np.float64).reshape(-1, 3)
    species = np.zeros((len(structure), NUM_SPECIES))
    for i, site in enumerate(structure):  # per-site Python loop: cheap next to the search
        for sp, occ in site.species.items():
            z = getattr(sp, "Z", 0)
            if not (isinstance(z, (int, np.integer)) and 1 <= z <= NUM_SPECIES):
                raise StructureError(f"{name}: site {i} has species {sp} (need an element with Z in 1..{NUM_SPECIES})")
            species[i, z - 1] += float(occ)
    return CrystalArrays(lattice, cart, species, _majority_z(species), entry_id)


def _from_ase(atoms: Any, entry_id: Optional[str]) -> CrystalArrays:
    name = _label(entry_id)
    if not np.all(atoms.pbc):
        raise StructureError(f"{name}: ASE Atoms is not periodic in all three directions (pbc={tuple(atoms.pbc)})")
    z = np.asarray(atoms.numbers, dtype=np.int64)
    return _one_hot_arrays(np.array(atoms.cell.array, dtype=np.float64), np.array(atoms.positions, dtype=np.float64), z, entry_id)


def _from_jarvis(obj: Any, entry_id: Optional[str]) -> CrystalArrays:
    name = _label(entry_id)
    get = obj.get if isinstance(obj, dict) else (lambda key, default=None: getattr(obj, key, default))
    try:
        lattice = np.array(get("lattice_mat"), dtype=np.float64).reshape(3, 3)
        coords = np.array(get("coords"), dtype=np.float64).reshape(-1, 3)
        elements = list(get("elements"))
    except Exception as exc:
        raise StructureError(f"{name}: not a jarvis Atoms dict with lattice_mat, coords, elements ({exc})") from exc
    if len(elements) != len(coords):
        raise StructureError(f"{name}: {len(elements)} elements but {len(coords)} coordinates")
    z = np.array([_Z_OF_SYMBOL.get(str(e).strip(), 0) for e in elements], dtype=np.int64)
    if np.any(z == 0):
        bad = elements[int(np.argmax(z == 0))]
        raise StructureError(f"{name}: unknown element {bad!r} (need an element with Z in 1..{NUM_SPECIES})")
    cartesian = bool(get("cartesian", False))
    cart = coords if cartesian else coords @ lattice
    return _one_hot_arrays(lattice, cart, z, entry_id)


def _one_hot_arrays(lattice: np.ndarray, cart: np.ndarray, z: np.ndarray, entry_id: Optional[str]) -> CrystalArrays:
    bad = (z < 1) | (z > NUM_SPECIES)
    if np.any(bad):
        k = int(np.argmax(bad))
        raise StructureError(f"{_label(entry_id)}: atom {k} has Z = {int(z[k])} (need Z in 1..{NUM_SPECIES})")
    species = np.zeros((len(z), NUM_SPECIES))
    species[np.arange(len(z)), z - 1] = 1.0
    return CrystalArrays(lattice, cart.reshape(-1, 3), species, z, entry_id)


def _majority_z(species: np.ndarray) -> np.ndarray:
    # argmax picks the lowest Z on ties: deterministic
    return (np.argmax(species, axis=1) + 1).astype(np.int64) if len(species) else np.zeros(0, dtype=np.int64)


def validate_arrays(arrays: CrystalArrays) -> None:
    """Shape, finiteness, species and lattice checks (cheap; overlaps are checked during the search)."""
    name = _label(arrays.name)
    lattice, cart, species = arrays.lattice, arrays.cart, arrays.species
    if np.shape(lattice) != (3, 3):
        raise StructureError(f"{name}: lattice must be 3x3, got shape {np.shape(lattice)}")
    if cart.ndim != 2 or cart.shape[1] != 3 or cart.shape[0] == 0:
        raise StructureError(f"{name}: structure has no atoms" if cart.size == 0 else f"{name}: positions must be [N, 3], got {cart.shape}")
    n = cart.shape[0]
    if species.shape != (n, NUM_SPECIES) or np.shape(arrays.Z) != (n,):
        raise StructureError(f"{name}: species must be [{n}, {NUM_SPECIES}] and Z [{n}], got {species.shape} and {np.shape(arrays.Z)}")
    if not np.all(np.isfinite(lattice)):
        raise StructureError(f"{name}: lattice has non-finite entries")
    if not np.all(np.isfinite(cart)):
        raise StructureError(f"{name}: atom {int(np.argmax(~np.isfinite(cart).all(axis=1)))} has non-finite coordinates")
    if not np.all(np.isfinite(species)) or np.any(species < 0) or np.any(species.sum(axis=1) <= 0):
        raise StructureError(f"{name}: species occupancies must be finite, >= 0 and not all zero on a site")
    z = np.asarray(arrays.Z)
    if np.any((z < 1) | (z > NUM_SPECIES)):
        raise StructureError(f"{name}: atomic numbers must be in 1..{NUM_SPECIES}, got {int(z.min())}..{int(z.max())}")
    volume = abs(float(np.linalg.det(lattice)))
    if not volume >= MIN_VOLUME:
        raise StructureError(f"{name}: degenerate lattice (|det| = {volume:.3g} A^3 < {MIN_VOLUME:g})")


# --------------------------------------------------------------------------------------------
# neighbour search


def lll_reduce(lattice: np.ndarray, delta: float = 0.75) -> np.ndarray:
    """Integer unimodular U [3, 3] such that U @ lattice is LLL-reduced (short, near-orthogonal rows)."""
    basis = np.array(lattice, dtype=np.float64)
    u = np.eye(3, dtype=np.int64)

    def gram_schmidt(b: np.ndarray):
        q = b.copy()
        mu = np.zeros((3, 3))
        for i in range(3):
            for j in range(i):
                mu[i, j] = b[i] @ q[j] / (q[j] @ q[j])
                q[i] -= mu[i, j] * q[j]
        return q, mu

    # Both tests carry a small slack, so an already reduced basis is returned unchanged instead
    # of being flipped by rounding noise at exact ties (|mu| = 1/2 in hexagonal cells).
    eps = 1e-6
    k, steps = 1, 0
    while k < 3 and steps < 1000:  # the step cap only guards against float pathologies
        steps += 1
        for j in range(k - 1, -1, -1):  # size reduction of row k
            _, mu = gram_schmidt(basis)
            if abs(mu[k, j]) > 0.5 + eps:
                q = round(mu[k, j])
                basis[k] -= q * basis[j]
                u[k] -= q * u[j]
        q_vecs, mu = gram_schmidt(basis)
        if q_vecs[k] @ q_vecs[k] >= (delta - mu[k, k - 1] ** 2 - eps) * (q_vecs[k - 1] @ q_vecs[k - 1]):
            k += 1
        else:  # Lovasz condition fails: swap and step back
            basis[[k - 1, k]] = basis[[k, k - 1]]
            u[[k - 1, k]] = u[[k, k - 1]]
            k = max(k - 1, 1)
    return u


def periodic_neighbors(lattice: np.ndarray, cart: np.ndarray, cutoff: float, name: Optional[str] = None):
    """All periodic images (j, n) of all atoms within ``cutoff`` of each atom i, self image included.

    lattice [3, 3], cart [N, 3] (any wrapping).  Returns (src j [E] int64, dst i [E] int64,
    image n [E, 3] int64, rvec [E, 3] float64 = cart[j] + n @ lattice - cart[i]), sorted by
    (dst, src, image).  Raises ``StructureError`` if two distinct images are closer than
    MIN_DISTANCE (checked on the search itself, at no extra cost).
    """
    from pymatgen.optimization.neighbors import find_points_in_spheres

    label = _label(name)
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
# primitive lattice (for the lattice frame)


def primitive_lattice(lattice: np.ndarray, cart: np.ndarray, species: np.ndarray, symprec: float = 1e-3) -> np.ndarray:
    """A primitive lattice [3, 3] (rows) of the crystal, in the caller's Cartesian orientation.

    spglib (standardize_cell, to_primitive, no_idealize) finds it; distinct occupancy rows count
    as distinct atom types.  The result is accepted only if every given lattice vector is an
    integer combination of it (so it is the same crystal lattice, not rotated); it is then
    re-derived exactly from the given lattice.  Any failure falls back to the given lattice.

    spglib is called even when the cell is already primitive: its standardised basis depends on
    the crystal, not on the cell it was given, so a primitive cell and its supercells get the
    same basis (the ``lattice`` frame breaks ties between equally short vectors by basis
    order).  The basis is then LLL-reduced (a no-op on spglib's already short bases), so the
    shortest lattice vectors are small integer combinations of its rows.
    """
    lattice = np.asarray(lattice, dtype=np.float64)
    if np.all(species.max(axis=1) == 1.0):  # ordered: the element is the type (np.unique(axis=0) is slow)
        types = np.argmax(species, axis=1)
    else:
        _, types = np.unique(np.round(species, 6), axis=0, return_inverse=True)
        types = types.reshape(-1)
    frac = cart @ np.linalg.inv(lattice)
    prim = _spglib_primitive(lattice, frac - np.floor(frac), types, symprec)
    if prim is None:
        prim = lattice
    return lll_reduce(prim) @ prim


def _spglib_primitive(lattice: np.ndarray, frac: np.ndarray, types: np.ndarray, symprec: float) -> Optional[np.ndarray]:
    # spglib's C code prints notes like "spglib: ssm_get_exact_positions failed." on stderr for
    # cells it cannot standardise; we handle that ourselves (fallback below), so keep them quiet
    os.environ.setdefault("SPGLIB_WARNING", "OFF")
    import spglib

    cell = (lattice, frac, types.astype(np.int32) + 1)
    try:
        with warnings.catch_warnings():  # spglib 2.x warns about its legacy error handling on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            result = spglib.standardize_cell(cell, to_primitive=True, no_idealize=True, symprec=symprec)
    except Exception:  # newer spglib raises instead of returning None
        return None
    if result is None:
        return None
    prim = np.asarray(result[0], dtype=np.float64)
    det_prim = abs(np.linalg.det(prim))
    if det_prim < MIN_VOLUME:
        return None
    m = lattice @ np.linalg.inv(prim)  # given = m @ prim, m integer iff prim is a (non-rotated) superlattice
    m_int = np.rint(m)
    ratio = abs(np.linalg.det(lattice)) / det_prim
    if np.abs(m - m_int).max() > 1e-3 or round(ratio) < 1 or abs(ratio - round(ratio)) > 1e-3 or abs(abs(np.linalg.det(m_int)) - round(ratio)) > 0.5:
        return None  # rotated, or not the same lattice: do not trust it
    return np.linalg.solve(m_int, lattice)  # prim re-derived so that lattice = m_int @ prim exactly


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


__all__ = [
    "CrystalArrays",
    "StructureError",
    "build_graph",
    "graph_from_arrays",
    "graph_lattices",
    "periodic_neighbors",
    "primitive_lattice",
    "structure_to_arrays",
    "validate_arrays",
]
