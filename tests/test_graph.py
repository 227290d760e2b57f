"""graph.py: edge sets against brute-force image enumeration, input kinds, invariances, errors."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from ase import Atoms as AseAtoms
from pymatgen.core import Lattice, Structure

from dgl_crystalframer._dgl import dgl
from dgl_crystalframer.basis import default_cutoff
from dgl_crystalframer.graph import (
    CrystalArrays,
    StructureError,
    build_graph,
    graph_from_arrays,
    graph_lattices,
    structure_to_arrays,
)

CUTOFF = default_cutoff()


# ---------------------------------------------------------------- helpers


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


def graph_edges(g):
    src, dst = (t.numpy() for t in g.edges())
    img = g.edata["image"].numpy()
    return {(int(i), int(j), *map(int, n)) for i, j, n in zip(dst, src, img)}


def rvec_multisets(g, decimals=4):
    """{(dst, src): sorted tuple of rounded rvecs}: independent of image labels."""
    src, dst = (t.numpy() for t in g.edges())
    out = {}
    for i, j, r in zip(dst, src, np.round(g.edata["rvec"].numpy().astype(float), decimals) + 0.0):
        out.setdefault((int(i), int(j)), []).append(tuple(r))
    return {k: sorted(v) for k, v in out.items()}


def check_graph(g, lattice, cart):
    """Invariants every graph must satisfy: sorted edges, rvec from image, one self image per atom."""
    src, dst = (t.numpy() for t in g.edges())
    img = g.edata["image"].numpy().astype(np.int64)
    keys = np.column_stack([dst, src, img])
    assert np.all(np.diff(np.lexsort(keys.T[::-1])) == 1), "edges must be sorted by (dst, src, image)"
    assert len(np.unique(keys, axis=0)) == len(keys), "duplicate edges"
    rvec = np.asarray(cart)[src] + img @ np.asarray(lattice) - np.asarray(cart)[dst]
    np.testing.assert_allclose(g.edata["rvec"].numpy(), rvec, atol=1e-4)
    assert np.all(np.linalg.norm(rvec, axis=1) <= CUTOFF + 1e-6)
    self_mask = (src == dst) & np.all(img == 0, axis=1)
    assert sorted(dst[self_mask].tolist()) == list(range(g.num_nodes())), "exactly one self image per atom"
    assert np.all(g.edata["rvec"].numpy()[self_mask] == 0)
    assert g.edata["rvec"].dtype == torch.float32 and g.edata["image"].dtype == torch.int32
    assert g.ndata["species"].shape == (g.num_nodes(), 98) and g.ndata["species"].dtype == torch.float32
    assert g.ndata["Z"].dtype == torch.int64
    assert g.ndata["lattice"].shape == (g.num_nodes(), 3, 3)
    assert g.ndata["prim_lattice"].shape == (g.num_nodes(), 3, 3)
    np.testing.assert_allclose(g.ndata["pos"].numpy(), cart, atol=1e-4)


def random_cell(rng, n_atoms, skew=0.0, scale=None):
    """Random lattice (skew adds off-diagonal shear) and random fractional positions with a min distance."""
    scale = scale or (12.0 * n_atoms) ** (1 / 3)
    while True:
        lattice = np.diag(rng.uniform(0.8, 1.2, 3) * scale) + rng.normal(0, 0.15 * scale, (3, 3))
        lattice[1, 0] += skew * scale
        lattice[2, 0] += 0.7 * skew * scale
        lattice[2, 1] += 0.5 * skew * scale
        if abs(np.linalg.det(lattice)) < 0.3 * scale**3:
            continue
        frac = rng.random((n_atoms, 3))
        s = Structure(lattice, ["Si"] * n_atoms, frac)
        if n_atoms == 1 or np.min(s.distance_matrix + np.eye(n_atoms) * 99) > 1.0:
            return lattice, frac @ lattice


def nacl():
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def perovskite():
    return Structure.from_spacegroup("Pm-3m", Lattice.cubic(3.9), ["Sr", "Ti", "O"], [[0, 0, 0], [0.5, 0.5, 0.5], [0.5, 0.5, 0]])


def arrays(lattice, cart, z=14):
    species = np.zeros((len(cart), 98))
    species[:, z - 1] = 1
    return CrystalArrays(np.asarray(lattice, float), np.asarray(cart, float), species, np.full(len(cart), z))


# ---------------------------------------------------------------- edge sets


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


# ---------------------------------------------------------------- inputs and invariances


def test_four_input_kinds_agree(tmp_path):
    from jarvis.core.atoms import Atoms as JarvisAtoms

    s = Structure(Lattice.from_parameters(4.1, 5.2, 6.3, 80, 95, 105), ["Ba", "Ti", "O", "O"],
                  [[0.1, 0.2, 0.3], [0.6, 0.55, 0.45], [0.3, 0.8, 0.7], [0.85, 0.15, 0.9]])
    ase_atoms = AseAtoms(numbers=s.atomic_numbers, positions=s.cart_coords, cell=s.lattice.matrix, pbc=True)
    jatoms = JarvisAtoms(lattice_mat=s.lattice.matrix, coords=s.cart_coords, elements=[e.symbol for e in s.species], cartesian=True)
    jfrac = {"lattice_mat": s.lattice.matrix.tolist(), "coords": s.frac_coords.tolist(),
             "elements": [e.symbol for e in s.species], "cartesian": False}
    s.to(filename=str(tmp_path / "x.cif"))
    s.to(filename=str(tmp_path / "POSCAR"))
    s.to(filename=str(tmp_path / "y.vasp"))
    inputs = [s, ase_atoms, jatoms, jatoms.to_dict(), jfrac, str(tmp_path / "x.cif"), tmp_path / "POSCAR", tmp_path / "y.vasp"]
    ref = build_graph(s)
    check_graph(ref, s.lattice.matrix, s.cart_coords)
    for inp in inputs:
        g = build_graph(inp)
        assert graph_edges(g) == graph_edges(ref), type(inp)
        np.testing.assert_allclose(g.edata["rvec"].numpy(), ref.edata["rvec"].numpy(), atol=1e-5)
        for key in ("species", "Z", "pos", "lattice", "prim_lattice"):
            np.testing.assert_allclose(g.ndata[key].numpy(), ref.ndata[key].numpy(), atol=1e-5, err_msg=key)


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


def same_lattice(a, b):
    m = np.asarray(a, float) @ np.linalg.inv(np.asarray(b, float))
    return np.allclose(m, np.rint(m), atol=1e-3) and abs(abs(np.linalg.det(np.rint(m))) - 1) < 1e-6


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


def test_disordered_site():
    s = Structure(Lattice.cubic(3.0), [{"Fe": 0.5, "Co": 0.3}, "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    g = build_graph(s)
    sp = g.ndata["species"]
    assert sp[0].sum().item() == pytest.approx(0.8)
    assert sp[0, 25].item() == pytest.approx(0.5) and sp[0, 26].item() == pytest.approx(0.3)
    assert sp[1].sum().item() == pytest.approx(1.0) and sp[1, 7].item() == 1.0
    assert g.ndata["Z"].tolist() == [26, 8]


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


# ---------------------------------------------------------------- errors


def error_cases(tmp_path):
    bad_file = tmp_path / "garbage.cif"
    bad_file.write_text("this is not a cif\n")
    cubic = np.eye(3) * 5.0
    return [
        ("unreadable", str(bad_file), None, "cannot read"),
        ("missing", str(tmp_path / "nope.cif"), None, "no such file"),
        ("empty", {"lattice_mat": cubic.tolist(), "coords": [], "elements": [], "cartesian": True}, "E1", "no atoms"),
        ("nan-coords", AseAtoms("Si2", positions=[[0, 0, 0], [np.nan, 1, 1]], cell=cubic, pbc=True), "E2", "non-finite"),
        ("inf-lattice", {"lattice_mat": [[np.inf, 0, 0], [0, 5, 0], [0, 0, 5]], "coords": [[0, 0, 0]], "elements": ["Si"], "cartesian": True}, "E3", "non-finite"),
        ("singular", AseAtoms("Si", positions=[[0, 0, 0]], cell=[[5, 0, 0], [0, 5, 0], [5, 5, 0]], pbc=True), "E4", "degenerate"),
        ("unknown-element", {"lattice_mat": cubic.tolist(), "coords": [[0, 0, 0]], "elements": ["Xx"], "cartesian": True}, "E5", "unknown element"),
        ("Z=0", AseAtoms("X", positions=[[0, 0, 0]], cell=cubic, pbc=True), "E6", "Z = 0"),
        ("Z=99", AseAtoms(numbers=[99], positions=[[0, 0, 0]], cell=cubic, pbc=True), "E7", "Z = 99"),
        ("dummy-species", Structure(Lattice.cubic(5), ["X0+"], [[0, 0, 0]]), "E8", "species"),
        ("close-pair", AseAtoms("Si2", positions=[[1, 1, 1], [1.05, 1, 1]], cell=cubic, pbc=True), "E9", "apart"),
        ("close-image", AseAtoms("Si2", positions=[[0.005, 1, 1], [4.99, 1, 1]], cell=cubic, pbc=True), "E10", "apart"),
        ("own-image", AseAtoms("Si", positions=[[0, 0, 0]], cell=[[0.05, 0, 0], [0, 10, 0], [0, 0, 10]], pbc=True), "E11", "own periodic image"),
        # |a2 - a1| = 0.05 A although both basis vectors are long: the reduced basis exposes it
        ("own-image-skewed", AseAtoms("Si", positions=[[0, 0, 0]], cell=[[3, 0, 0], [3, 0.05, 0], [0, 0, 3]], pbc=True), "E12", "own periodic image"),
        ("not-periodic", AseAtoms("Si", positions=[[0, 0, 0]], cell=cubic, pbc=[True, True, False]), "E13", "periodic"),
        ("wrong-type", 42, "E14", "unsupported"),
        ("pymatgen-slab", Structure(Lattice(cubic, pbc=(True, True, False)), ["Si"], [[0, 0, 0]]), "E15", "periodic"),
        ("jarvis-missing-keys", {"coords": [[0, 0, 0]]}, "E16", "lattice_mat"),
    ]


def test_structure_errors(tmp_path):
    for label, inp, entry_id, fragment in error_cases(tmp_path):
        with pytest.raises(StructureError) as info:
            build_graph(inp, entry_id=entry_id)
        msg = str(info.value)
        name = entry_id or str(inp)
        assert name in msg, (label, msg)
        if fragment:
            assert fragment in msg, (label, msg)
        assert isinstance(info.value, ValueError)


def test_structure_error_default_name():
    with pytest.raises(StructureError, match="^structure: "):
        build_graph(AseAtoms("Si2", positions=[[1, 1, 1], [1, 1, 1.01]], cell=np.eye(3) * 5, pbc=True))


def test_arrays_roundtrip():
    s = nacl()
    a = structure_to_arrays(s, entry_id="mp-22862")
    assert a.lattice.shape == (3, 3) and a.cart.shape == (8, 3) and a.species.shape == (8, 98)
    assert a.Z.dtype == np.int64 and a.name == "mp-22862"
    g1, g2 = graph_from_arrays(a), build_graph(s)
    assert graph_edges(g1) == graph_edges(g2)
