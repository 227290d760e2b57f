"""Lattices: LLL reduction, a primitive lattice of a crystal, and the ``lattice`` frame's axes.

Used when graphs are built (``graph.py``: the reduced search cell, the primitive lattice and the
stored lattice frame) and by ``frames.py`` for user graphs that lack the stored frame.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional

import numpy as np
import torch

from .basis import CANDIDATE_MIN_D2, TIE_TOL
from .structures import MIN_VOLUME


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


def normalize(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit length (zero rows stay ~0)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


_OFFSETS = torch.stack(torch.meshgrid(*[torch.arange(-3, 4)] * 3, indexing="ij"), -1).reshape(-1, 3)
_OFFSETS = _OFFSETS[_OFFSETS.abs().sum(-1) > 0]
# enumerate short vectors first, so that a tie (same length) is resolved the same way in every cell
_OFFSETS = _OFFSETS[torch.argsort(_OFFSETS.abs().sum(-1) * 1000 + _OFFSETS.abs().amax(-1), stable=True)]


def _first_within(length: torch.Tensor, valid: torch.Tensor, tie_breakers=None, tol: float = TIE_TOL):
    """(index, tied) of the shortest valid vector.  Ties (within ``tol`` relative) are narrowed
    down by maximising, in turn, each row of ``tie_breakers(candidates)`` ([K, len(candidates)],
    computed only for the tied candidates), then go to the lowest index (``tied``)."""
    lv = torch.where(valid, length, torch.full_like(length, float("inf")))
    candidates = torch.nonzero(valid & (lv <= lv.min() * (1 + tol))).squeeze(-1)
    if len(candidates) > 1 and tie_breakers is not None:
        near = torch.ones_like(candidates, dtype=torch.bool)
        for values in tie_breakers(candidates):
            v = torch.where(near, values, torch.full_like(values, -float("inf")))
            near = near & (v >= v.max() - 1e-9 * (1.0 + v.max().abs()))
        candidates = candidates[near]
    return int(candidates[0]), len(candidates) > 1


def lattice_axes(lattice: torch.Tensor, rvec=None, weight=None):
    """The ``lattice`` frame of one structure: (axes [3, 3] float64, rows e1 e2 e3; tied bool).

    lattice: [3, 3] rows, a primitive basis (any).  Equally short lattice vectors are common
    (cubic, hexagonal, tetragonal cells), and the basis a symmetry finder returns can differ
    between a structure, its rotated copy and its supercells.  So ties are broken by moments of
    the structure's own edges (rvec [E, 3], weight [E]): sum_e w_e (rhat_e . u)^p, p = 1..4, and,
    for e2 and e3, moments mixed with the axes already chosen and the turning sense about the
    weighted mean direction.  These are the same for candidates related by a symmetry of the
    crystal and generically differ otherwise, so the choice does not depend on the cell or its
    orientation.  Without rvec (a user's graph) ties go to the lowest index in the given basis.
    ``tied`` says that the index was needed (symmetry-related candidates, see the module doc).
    """
    lattice = lattice.double()
    vecs = _OFFSETS.to(lattice.device, lattice.dtype) @ lattice  # [M, 3]
    length = vecs.norm(dim=-1)
    unit = vecs / length.unsqueeze(-1)
    breakers = None
    if rvec is not None:
        rvec, weight = rvec.double(), weight.double()
        d = rvec.norm(dim=-1)
        keep = d > CANDIDATE_MIN_D2 ** 0.5
        rhat, w = rvec[keep] / d[keep].unsqueeze(-1), weight[keep] / weight[keep].sum().clamp_min(1e-300)
        mean_dir = w @ rhat

        def breakers(candidates, *chosen):
            u = unit[candidates]
            proj = rhat @ u.T  # [E, K]
            out = [w @ proj.pow(p) for p in (1, 2, 3, 4)]
            for axis in chosen:
                pa = rhat @ axis
                out += [(w * pa) @ proj, (w * pa) @ proj.pow(2), (w * pa.pow(2)) @ proj,
                        torch.cross(axis.expand_as(u), u, dim=-1) @ mean_dir]
            return out

    def tie_breakers(*chosen):
        return None if breakers is None else (lambda candidates: breakers(candidates, *chosen))

    eps = 1e-6
    i1, tied1 = _first_within(length, torch.ones_like(length, dtype=torch.bool), tie_breakers())
    e1 = unit[i1]
    c1 = unit @ e1
    i2, tied2 = _first_within(length, (c1.abs() < 1 - eps) & (c1 >= -eps), tie_breakers(e1))
    e2 = unit[i2]
    coplanar = (unit @ normalize(torch.cross(e1, e2, dim=-1))).abs() < eps
    i3, tied3 = _first_within(length, ~coplanar & (c1 >= -eps), tie_breakers(e1, e2))
    axes = torch.stack([e1, e2, unit[i3]])
    return (-axes if torch.linalg.det(axes) < 0 else axes), tied1 or tied2 or tied3


__all__ = ["lattice_axes", "lll_reduce", "normalize", "primitive_lattice"]
