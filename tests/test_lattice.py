"""lattice.py: the primitive lattice stored on graphs (same lattice, same basis, LLL-reduced)."""
from __future__ import annotations

import numpy as np
import pytest
from pymatgen.core import Structure

from dgl_crystalframer.graph import build_graph, graph_from_arrays

from crystals import arrays, nacl, random_cell, same_lattice


def test_supercell_primitive_lattice():
    from scipy.spatial.transform import Rotation

    rot = Rotation.random(random_state=7).as_matrix()
    prim = nacl().get_primitive_structure()
    prim = Structure(prim.lattice.matrix @ rot.T, prim.species, prim.frac_coords)
    sup = prim * (2, 1, 1)
    gp, gs = build_graph(prim), build_graph(sup)
    pl_p, pl_s = gp.ndata["prim_lattice"][0].double().numpy(), gs.ndata["prim_lattice"][0].double().numpy()
    assert abs(np.linalg.det(pl_s)) == pytest.approx(abs(np.linalg.det(pl_p)), rel=1e-5)
    assert same_lattice(pl_s, pl_p)
    assert same_lattice(pl_p, prim.lattice.matrix)
    # not just the same lattice: the same basis, so that the lattice frame breaks ties identically
    np.testing.assert_allclose(pl_s, pl_p, atol=1e-4)
    lattice, cart = random_cell(np.random.default_rng(12), 4, 1.0)
    tri = Structure(lattice @ rot.T, ["Si", "O", "O", "Mg"], cart @ rot.T, coords_are_cartesian=True)
    bases = [build_graph(tri * m).ndata["prim_lattice"][0].numpy() for m in [(1, 1, 1), (2, 1, 1), (1, 2, 2)]]
    for b in bases[1:]:
        np.testing.assert_allclose(b, bases[0], atol=1e-4)
    # the conventional 8-atom cell also reduces to the 2-atom primitive volume
    gc = build_graph(nacl())
    assert abs(np.linalg.det(gc.ndata["prim_lattice"][0].double().numpy())) == pytest.approx(5.64**3 / 4, rel=1e-5)
    # a low-symmetry cell is its own primitive; a badly reduced basis comes back reduced
    lattice, cart = random_cell(np.random.default_rng(11), 5, 0.5)
    skewed = np.array([[1, 4, 0], [0, 1, 0], [2, 3, 1]]) @ lattice
    for lat in (lattice, skewed):
        pl = graph_from_arrays(arrays(lat, cart)).ndata["prim_lattice"][0].double().numpy()
        assert same_lattice(pl, lattice)
        lengths = np.sort(np.linalg.norm(pl, axis=1))
        assert lengths[0] <= np.sort(np.linalg.norm(lattice, axis=1))[0] * 1.5
