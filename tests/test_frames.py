"""frames.py: the frames themselves (orthonormal, right-handed, rotating with the crystal, degenerate
cases) and frame-specific behaviour: ties between symmetric candidates, the lattice and PCA frames."""
import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from crystals import DEGENERATE, STRUCTURES, assert_same, initialised, layer_frames, nacl, permuted, predict, \
    random_rotation, rotated, sample_by_id, supercell


# -------------------------------------------------------------------------------- frames themselves


@pytest.mark.parametrize("frame", ["max", "weighted_pca", "static_local"])
def test_frames_orthonormal_right_handed(frame):
    f = layer_frames(frame, STRUCTURES + [nacl()])
    gram = f @ f.transpose(-1, -2)
    assert torch.allclose(gram, torch.eye(3).expand_as(gram), atol=1e-5)
    assert torch.allclose(torch.linalg.det(f), torch.ones(f.shape[:2]), atol=1e-5)


def test_pca_frame_orthonormal_or_lattice_fallback():
    """Orthonormal principal axes where the positions spread in 3 distinct directions; the
    lattice frame (unit, right-handed) where they do not (2 atoms are always collinear)."""
    spread = Structure(Lattice([[5.0, 0.3, 0.1], [0.2, 6.0, 0.4], [0.1, 0.5, 7.0]]), ["O", "Si", "Fe", "Mg"],
                       [[0, 0, 0], [0.31, 0.12, 0.05], [0.1, 0.6, 0.2], [0.2, 0.3, 0.7]])
    f = layer_frames("pca", [spread])
    assert torch.allclose(f @ f.transpose(-1, -2), torch.eye(3).expand(1, 4, 3, 3), atol=1e-5)
    two_atoms = layer_frames("pca", [STRUCTURES[0]])
    assert torch.allclose(two_atoms, layer_frames("lattice", [STRUCTURES[0]]))
    assert (torch.linalg.det(two_atoms) > 0).all()


def test_lattice_frame_unit_right_handed_not_orthogonalised():
    hexagonal = Structure(Lattice.hexagonal(3.2, 5.2), ["Zn", "Zn"], [[1 / 3, 2 / 3, 0], [2 / 3, 1 / 3, 0.5]])
    f = layer_frames("lattice", [hexagonal])
    assert torch.allclose(f.norm(dim=-1), torch.ones(f.shape[:3]), atol=1e-6)
    assert (torch.linalg.det(f) > 0).all()
    # a and b of a hexagonal lattice are 60 (or 120) degrees apart: the axes are not orthogonalised
    assert abs(abs(float((f[0, 0, 0] * f[0, 0, 1]).sum())) - 0.5) < 1e-5


def test_weighted_pca_uses_eigenvector_columns():
    """Rotating the crystal must rotate the frame (rows of eigh's result would not)."""
    s = STRUCTURES[0]
    rot = random_rotation(7)
    f0 = layer_frames("weighted_pca", [s])
    f1 = layer_frames("weighted_pca", [rotated(s, rot, np.zeros(3))])
    assert torch.allclose(f0 @ torch.tensor(rot, dtype=torch.float32).T, f1, atol=1e-4)


def test_linear_chain_frame_has_e1_along_chain():
    f = layer_frames("max", [DEGENERATE["linear_chain"]])
    assert torch.allclose(f[..., 0, :].abs(), torch.tensor([1.0, 0, 0]).expand(1, 4, 3), atol=1e-6)


# ----------------------------------------------------------------------------- ties and cell choice


def test_symmetric_ties_give_the_same_features():
    """NaCl: the 6 nearest neighbours tie for e1 and 4 for e2.  Which one wins depends on edge order
    (atom order) and float noise (rotation), and must not change the result."""
    for frame in ["max", "static_local", "weighted_pca", "lattice"]:
        model = initialised(frame)
        base = predict(model, [nacl()])
        for seed in range(3):
            assert_same(base, predict(model, [permuted(nacl(), seed)]), f"{frame}: NaCl permuted")
            assert_same(base, predict(model, [rotated(nacl(), random_rotation(seed), np.zeros(3))]), f"{frame}: NaCl rotated")


def test_lattice_frame_does_not_depend_on_the_basis_spglib_returns():
    """VCu3O4 (I-42m) and Sc6Te2Os (P-62m): spglib returns other primitive bases for a rotated copy
    or a supercell, with equally short vectors that the crystal's symmetry does not relate."""
    hard = sample_by_id("mp-510657", "mp-11754")
    model = initialised("lattice")
    base = predict(model, hard)
    for seed in range(1, 5):
        assert_same(base, predict(model, [rotated(s, random_rotation(seed), np.zeros(3)) for s in hard]), f"rotation {seed}")
    for scale in ((2, 1, 1), (1, 2, 2), (2, 2, 1)):
        assert_same(base, predict(model, [supercell(s, scale) for s in hard]), f"supercell {scale}")


def test_pca_frame_is_not_cell_choice_invariant():
    """The paper's static PCA baseline takes axes from the unit-cell positions: a supercell changes
    them, so predictions change.  Documented behaviour, not a bug."""
    model = initialised("pca")
    base, _ = predict(model, STRUCTURES)
    sup, _ = predict(model, [supercell(s, (2, 1, 1)) for s in STRUCTURES])
    assert ((base - sup).abs() / base.abs().max()).max() > 1e-3
