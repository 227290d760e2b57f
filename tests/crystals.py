"""Shared test helpers (not a test file): real and model crystals, symmetry operations on them,
models with a recorded sigma normaliser, and graph checks.  Imported as ``from crystals import ...``
(pytest puts tests/ on sys.path)."""
import gzip
import json
from importlib import resources

import numpy as np
import torch
from pymatgen.core import Lattice, Structure

from dgl_crystalframer._dgl import dgl
from dgl_crystalframer.basis import default_cutoff
from dgl_crystalframer.graph import CrystalArrays, build_graph
from dgl_crystalframer.model import CrystalFramer
from dgl_crystalframer.nn import CrystalFramerConv

INVARIANT_FRAMES = ["none", "max", "weighted_pca", "static_local", "lattice"]
ALL_FRAMES = INVARIANT_FRAMES + ["pca"]
REL_TOL = 1e-4
CUTOFF = default_cutoff()


# ----------------------------------------------------------------------------------------- crystals


def sample_structures(n=6, max_sites=8):
    """A few real MP crystals from the embedded sample (small cells keep the tests fast)."""
    with resources.files("dgl_crystalframer").joinpath("sample/megnet_sample.json.gz").open("rb") as fh:
        entries = json.load(gzip.open(fh))["entries"]
    picked = [e for e in entries if 2 <= len(e["species"]) <= max_sites][: 40 : 40 // n]
    return [Structure(Lattice(e["lattice"]), e["species"], e["frac_coords"]) for e in picked][:n]


STRUCTURES = sample_structures()


def nacl():
    return Structure.from_spacegroup("Fm-3m", Lattice.cubic(5.64), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])


def sample_by_id(*ids):
    with resources.files("dgl_crystalframer").joinpath("sample/megnet_sample.json.gz").open("rb") as fh:
        entries = {e["id"]: e for e in json.load(gzip.open(fh))["entries"]}
    return [Structure(Lattice(entries[i]["lattice"]), entries[i]["species"], entries[i]["frac_coords"]) for i in ids]


# Sites whose tied frame candidates are not related by a site symmetry: LiTaO3 and Ba2Mn2As2O (a
# 3-fold axis without a mirror: e2 ties come in two classes of opposite handedness) and RbBiO2,
# YAlGe, Re3B (PCA axes whose sign no moment fixes).  Found by python -m benchmarks.invariance.
HARD = sample_by_id("mp-3666", "mp-561597", "mp-29521", "mp-29736", "mp-15671")


DEGENERATE = {
    "single_atom": Structure(Lattice.cubic(3.35), ["Po"], [[0, 0, 0]]),
    "linear_chain": Structure(Lattice.tetragonal(2.5, 9.0), ["C"], [[0, 0, 0]]),  # c, b > cutoff: collinear neighbours
    "isolated_atom": Structure(Lattice.cubic(10.0), ["Ar"], [[0, 0, 0]]),  # only its self image
    "cubic_nacl": nacl(),
    "near_equal_eigenvalues": Structure(Lattice([[4.0, 0, 0], [0, 4.0001, 0], [0, 0, 3.9999]]), ["Cu"], [[0, 0, 0]]),
}


# ------------------------------------------------------------------------------ symmetry operations


def random_rotation(seed=0):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def rotated(s, rot, shift):
    """The same crystal, rotated and translated in Cartesian space."""
    lat = s.lattice.matrix @ rot.T
    cart = s.cart_coords @ rot.T + shift
    return Structure(Lattice(lat), s.species, cart, coords_are_cartesian=True)


def permuted(s, seed=0):
    order = np.random.default_rng(seed).permutation(len(s))
    return Structure(s.lattice, [s.species[i] for i in order], s.frac_coords[order])


def unwrapped(s, seed=0):
    """Atoms moved by whole lattice vectors, out of the [0, 1) cell."""
    shifts = np.random.default_rng(seed).integers(-2, 3, size=(len(s), 3))
    return Structure(s.lattice, s.species, s.frac_coords + shifts)


def supercell(s, scale):
    return s.copy().make_supercell(scale)


# ------------------------------------------------------------------------------------------- models


def initialised(frame, seed=0, **kw):
    """A model whose sigma normaliser was recorded on a training batch, then put in eval mode."""
    torch.manual_seed(seed)
    model = CrystalFramer(frame=frame, **kw)
    model.train()
    model(dgl.batch([build_graph(s) for s in STRUCTURES]))
    return model.eval()


def predict(model, structures):
    with torch.no_grad():
        bg = dgl.batch([build_graph(s) for s in structures])
        x = model.node_features(bg)
        with bg.local_scope():
            bg.ndata["h"] = x
            pooled = dgl.mean_nodes(bg, "h")
        return model(bg), pooled


def assert_same(a, b, what):
    (ya, pa), (yb, pb) = a, b
    rel_pooled = ((pa - pb).norm(dim=-1) / pa.norm(dim=-1)).max().item()
    rel_y = ((ya - yb).abs().max() / ya.abs().max().clamp_min(1e-3)).item()
    assert rel_pooled < REL_TOL and rel_y < REL_TOL, f"{what}: relative error pooled {rel_pooled:.2e}, prediction {rel_y:.2e}"


def layer_frames(frame, structures, seed=0):
    torch.manual_seed(seed)
    conv = CrystalFramerConv(32, 4, frame=frame)
    conv.train()
    bg = dgl.batch([build_graph(s) for s in structures])
    feat = torch.randn(bg.num_nodes(), 32)
    conv(bg, feat)
    return conv.frames(bg, feat)


def rel(a, b, floor=1e-12):
    return float((a - b).abs().max() / a.abs().max().clamp_min(floor))


# ------------------------------------------------------------------------------------------- graphs


def graph_edges(g):
    src, dst = (t.numpy() for t in g.edges())
    img = g.edata["image"].numpy()
    return {(int(i), int(j), *map(int, n)) for i, j, n in zip(dst, src, img)}


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


def arrays(lattice, cart, z=14):
    species = np.zeros((len(cart), 98))
    species[:, z - 1] = 1
    return CrystalArrays(np.asarray(lattice, float), np.asarray(cart, float), species, np.full(len(cart), z))


def same_lattice(a, b):
    m = np.asarray(a, float) @ np.linalg.inv(np.asarray(b, float))
    return np.allclose(m, np.rint(m), atol=1e-3) and abs(abs(np.linalg.det(np.rint(m))) - 1) < 1e-6
