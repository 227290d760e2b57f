"""graph.py: edge sets against brute-force image enumeration, cutoffs, invariances of the neighbour search."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from dgl_crystalframer._dgl import dgl
from dgl_crystalframer.graph import build_graph, graph_from_arrays, graph_lattices

from crystals import CUTOFF, arrays, check_graph, graph_edges, nacl, random_cell, same_lattice


# ------------------------------------------------------------------------------------------ helpers


def brute_force_edges(lattice, cart, cutoff):
    """{(dst, src, n0, n1, n2)} by an explicit loop over a generous image range (test only)."""
    lattice = np.asarray(lattice, float)
    cart = np.asarray(cart, float)
    frac = cart @ np.linalg.inv(lattice)
    span = frac.max(axis=0) - frac.min(axis=0)  # unwrapped positions need a wider range
    recip = np.linalg.norm(np.linalg.inv(lattice).T, axis=1)  # 1 / plane spacing
    nmax = np.ceil(cutoff * recip + span).astype(int) + 1
    diff = cart[None, :, :] - cart[:, None, :]  # [i, j] = p_j - p_i
    edges = set()
    for n in itertools.product(*(range(-k, k + 1) for k in nmax)):
        r = diff + np.asarray(n, float) @ lattice
        dst, src = np.nonzero(np.linalg.norm(r, axis=-1) <= cutoff)
        edges.update((int(i), int(j), *n) for i, j in zip(dst, src))
    return edges


def rvec_multisets(g, decimals=4):
    """{(dst, src): sorted tuple of rounded rvecs}: independent of image labels."""
    src, dst = (t.numpy() for t in g.edges())
    out = {}
    for i, j, r in zip(dst, src, np.round(g.edata["rvec"].numpy().astype(float), decimals) + 0.0):
        out.setdefault((int(i), int(j)), []).append(tuple(r))
    return {k: sorted(v) for k, v in out.items()}


def perovskite():
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.9), ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])


# ---------------------------------------------------------------------------------------- edge sets


@pytest.mark.parametrize("seed,n_atoms,skew", [(0, 1, 0.0), (1, 2, 0.0), (2, 3, 0.5), (3, 4, 1.5), (4, 5, 3.0),
                                               (5, 6, 0.0), (6, 8, 2.0), (7, 2, 4.0), (8, 3, 0.0), (9, 7, 1.0)])
def test_edges_match_brute_force(seed, n_atoms, skew):
    rng = np.random.default_rng(seed)
    lattice, cart = random_cell(rng, n_atoms, skew)
    if seed % 2:  # unwrapped positions: atoms moved by whole lattice vectors
        cart = cart + rng.integers(-3, 4, cart.shape) @ lattice
    g = graph_from_arrays(arrays(lattice, cart))
    check_graph(g, lattice, cart)
    assert graph_edges(g) == brute_force_edges(lattice, cart, CUTOFF)


def test_strongly_skewed_unreduced_basis():
    # the same simple cubic lattice in a badly reduced basis: same rvec multiset as the cubic cell
    cubic = np.eye(3) * 3.0
    u = np.array([[1, 7, 3], [0, 1, 5], [0, 0, 1]])
    skewed = u @ cubic
    cart = np.array([[0.3, 0.7, 1.1]])
    g1, g2 = graph_from_arrays(arrays(cubic, cart)), graph_from_arrays(arrays(skewed, cart))
    check_graph(g2, skewed, cart)
    assert graph_edges(g2) == brute_force_edges(skewed, cart, CUTOFF)
    assert rvec_multisets(g1) == rvec_multisets(g2)


def test_tiny_cell_many_images():
    lattice, cart = np.eye(3) * 2.0, np.array([[0.1, 0.2, 0.3]])
    g = graph_from_arrays(arrays(lattice, cart))
    check_graph(g, lattice, cart)
    n = np.array(list(itertools.product(range(-4, 5), repeat=3)))
    expected = int(np.sum(np.linalg.norm(n * 2.0, axis=1) <= CUTOFF))
    assert g.num_edges() == expected == len(brute_force_edges(lattice, cart, CUTOFF))
    assert np.abs(g.edata["image"].numpy()).max() == 3


def test_300_atom_cell():
    s = perovskite() * (5, 4, 3)  # 300 atoms
    s.perturb(0.15)
    shear = np.array([[1.0, 0.0, 0.0], [0.3, 1.0, 0.0], [-0.2, 0.25, 1.0]])
    lattice = s.lattice.matrix @ shear  # sheared cell, same fractional positions
    cart = s.frac_coords @ lattice
    assert len(cart) == 300
    g = graph_from_arrays(arrays(lattice, cart))
    check_graph(g, lattice, cart)
    assert graph_edges(g) == brute_force_edges(lattice, cart, CUTOFF)


def test_isolated_atom_is_legal():
    g = build_graph(Structure(Lattice.cubic(10.0), ["Fe"], [[0.5, 0.5, 0.5]]))
    assert g.num_nodes() == 1 and g.num_edges() == 1
    assert torch.all(g.edata["rvec"] == 0)
    # two atoms far apart in a big cell: self edges only
    g = build_graph(Structure(Lattice.cubic(20.0), ["Fe", "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]))
    assert g.num_edges() == 2
    src, dst = g.edges()
    assert torch.equal(src, dst)


# -------------------------------------------------------------------------------------- invariances


def test_wrapping_does_not_change_rvecs():
    s = perovskite()
    lattice, cart = s.lattice.matrix, s.cart_coords
    shifted = cart + np.array([[2, -1, 0], [0, 0, 0], [-3, 1, 5], [1, 1, 1], [0, -2, 0]]) @ lattice
    g1, g2 = graph_from_arrays(arrays(lattice, cart)), graph_from_arrays(arrays(lattice, shifted))
    check_graph(g2, lattice, shifted)
    assert rvec_multisets(g1) == rvec_multisets(g2)
    np.testing.assert_allclose(g2.ndata["pos"].numpy(), shifted, atol=1e-4)  # positions kept as given


def test_rotation_rotates_rvec():
    from scipy.spatial.transform import Rotation

    s = perovskite()
    rot = Rotation.random(random_state=3).as_matrix()
    lattice, cart = s.lattice.matrix, s.cart_coords
    g1 = graph_from_arrays(arrays(lattice, cart))
    g2 = graph_from_arrays(arrays(lattice @ rot.T, cart @ rot.T))
    assert graph_edges(g1) == graph_edges(g2)
    np.testing.assert_allclose(g2.edata["rvec"].numpy(), g1.edata["rvec"].numpy() @ rot.T, atol=1e-4)
    # the primitive lattice turns with the input (same orientation as the given cell); its basis may differ
    assert same_lattice(g2.ndata["prim_lattice"][0].double().numpy(), g1.ndata["prim_lattice"][0].double().numpy() @ rot.T)


# ----------------------------------------------------------------------------- lattices and cutoffs


def test_graph_lattices_batch():
    s1, s2 = nacl(), perovskite()
    bg = dgl.batch([build_graph(s1), build_graph(s2)])
    lat = graph_lattices(bg)
    assert lat.shape == (2, 3, 3)
    np.testing.assert_allclose(lat[1].numpy(), s2.lattice.matrix, atol=1e-5)
    prim = graph_lattices(bg, "prim_lattice")
    assert abs(np.linalg.det(prim[0].double().numpy())) == pytest.approx(5.64**3 / 4, rel=1e-5)


def test_cutoff_argument():
    s = nacl()
    g_small = build_graph(s, cutoff=3.0)
    # rocksalt: self + 6 nearest (2.82 A) within 3 A
    assert g_small.num_edges() == len(s) * 7
    assert build_graph(s).num_edges() > g_small.num_edges()
    lattice, cart = random_cell(np.random.default_rng(5), 4, 2.0)
    for cutoff in (2.5, 9.0):
        g = graph_from_arrays(arrays(lattice, cart), cutoff=cutoff)
        assert graph_edges(g) == brute_force_edges(lattice, cart, cutoff)
