"""structures.py: every input kind gives the same graph, disordered sites, validation errors, arrays."""
from __future__ import annotations

import re

import numpy as np
import pytest
from ase import Atoms as AseAtoms
from pymatgen.core import Lattice, Structure

from dgl_crystalframer.graph import StructureError, build_graph, graph_from_arrays, structure_to_arrays

from crystals import check_graph, graph_edges, nacl


# -------------------------------------------------------------------------------------- input kinds


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


def test_disordered_site():
    s = Structure(Lattice.cubic(3.0), [{"Fe": 0.5, "Co": 0.3}, "O"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    g = build_graph(s)
    sp = g.ndata["species"]
    assert sp[0].sum().item() == pytest.approx(0.8)
    assert sp[0, 25].item() == pytest.approx(0.5) and sp[0, 26].item() == pytest.approx(0.3)
    assert sp[1].sum().item() == pytest.approx(1.0) and sp[1, 7].item() == 1.0
    assert g.ndata["Z"].tolist() == [26, 8]


# ------------------------------------------------------------------------------------------- errors


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


# ------------------------------------------------------------------------------------------- arrays


def test_arrays_roundtrip():
    s = nacl()
    a = structure_to_arrays(s, entry_id="mp-22862")
    assert a.lattice.shape == (3, 3) and a.cart.shape == (8, 3) and a.species.shape == (8, 98)
    assert a.Z.dtype == np.int64 and a.name == "mp-22862"
    g1, g2 = graph_from_arrays(a), build_graph(s)
    assert graph_edges(g1) == graph_edges(g2)


def test_a_cif_with_two_atoms_on_one_site_reaches_the_overlap_check(tmp_path):
    """pymatgen merges the two atoms and drops the structure ("Invalid CIF file with no structures!");
    the user gets the package's own message, naming the file and the atoms."""
    from dgl_crystalframer.graph import build_graph

    cell = "".join(f"_cell_length_{a} 4.0\n" for a in "abc") + "".join(f"_cell_angle_{a} 90\n" for a in ("alpha", "beta", "gamma"))
    head = "data_x\n" + cell + "_symmetry_space_group_name_H-M 'P 1'\nloop_\n_atom_site_label\n_atom_site_type_symbol\n" \
           "_atom_site_fract_x\n_atom_site_fract_y\n_atom_site_fract_z\n"
    for name, sites in (("two.cif", "Na1 Na 0 0 0\nCl1 Cl 0 0 0\n"),
                        ("three.cif", "Na1 Na 0 0 0\nNa2 Na 0.0 0.0 0.0(1)\nCl1 Cl 0.5 0.5 0.5\n")):
        path = tmp_path / name
        path.write_text(head + sites)
        with pytest.raises(StructureError, match=rf"^{re.escape(str(path))}: atoms 0 and 1 .* are 0 A apart"):
            build_graph(str(path))
    ok = tmp_path / "ok.cif"
    ok.write_text(head + "Na1 Na 0 0 0\nCl1 Cl 0.5 0.5 0.5\n")
    assert build_graph(str(ok)).num_nodes() == 2
    # a CIF broken otherwise keeps pymatgen's reason
    bad = tmp_path / "bad.cif"
    bad.write_text("data_x\n" + cell + "loop_\n_atom_site_label\nNa1\n")
    with pytest.raises(StructureError, match="cannot read a crystal structure"):
        build_graph(str(bad))
