"""examples/cgcnn_style.py: CrystalFramerConv inside a CGCNN-style DGL model (edges centre -> neighbour,
displacements under edata["r"]) runs, trains, and sees the crystal the right way round."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from dgl_crystalframer._dgl import dgl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cgcnn_style.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("cgcnn_style_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_runs():
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "3", "--num-crystals", "32"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("final train MAE ") and "eV/atom (initial " in last, proc.stdout


def test_training_reduces_loss(ex):
    out = ex.main(["--steps", "40", "--num-crystals", "64", "--seed", "0"])
    losses = out["losses"]
    assert out["steps"] == 40 and len(losses) == 40 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    assert out["final_mae"] < out["initial_mae"]


def _perturbed_sample_structures(num=3, seed=0):
    """Small sample crystals with jittered positions: no site symmetry, so no frame ties and no
    inversion centre (an inversion-symmetric environment looks the same through +r and -r)."""
    rng = np.random.default_rng(seed)
    path = resources.files("dgl_crystalframer") / "sample" / "megnet_sample.json.gz"
    with path.open("rb") as f:
        entries = json.loads(gzip.decompress(f.read()))["entries"]
    picked = [e for e in entries if 3 <= len(e["species"]) <= 6 and all(isinstance(s, str) for s in e["species"])]
    out = []
    for e in picked[:num]:
        frac = np.asarray(e["frac_coords"]) + rng.normal(scale=0.02, size=(len(e["species"]), 3))
        out.append(Structure(Lattice(e["lattice"]), e["species"], frac))
    return out


def _random_rotation(rng):
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@pytest.fixture(scope="module")
def setup(ex):
    torch.manual_seed(0)
    structs = _perturbed_sample_structures()
    graphs = [ex.build_radius_graph(s) for s in structs]
    assert all(g is not None for g in graphs)
    model = ex.CGCNNWithFramer(edge_dim=graphs[0].edata["dist"].shape[1], frame="max")
    model.train()
    model(dgl.batch(graphs))  # records the sigma normaliser, as the first training batch would
    model.eval()
    return structs, graphs, model


def test_all_parameters_get_finite_gradients(ex, setup):
    _, graphs, model = setup
    model.train()
    try:
        model.zero_grad()
        model(dgl.batch(graphs)).square().sum().backward()
    finally:
        model.eval()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.attn.angle_proj.grad.abs().sum() > 0  # the frame term is in use


def _close(a, b, rtol=1e-4):
    return (a - b).abs().max() <= rtol * max(a.abs().max(), b.abs().max(), 1e-12)


@torch.no_grad()
def test_rotation_invariance(ex, setup):
    structs, graphs, model = setup
    rng = np.random.default_rng(1)
    g = dgl.batch(graphs)
    h = model.node_features(g)
    ref_conv, ref_out = model.attn(g, h, rvec=-g.edata["r"]), model(g)
    for _ in range(3):
        rot = _random_rotation(rng)  # proper: det +1
        rotated = [Structure(Lattice(s.lattice.matrix @ rot.T), s.species, s.frac_coords) for s in structs]
        for s, t in zip(structs, rotated):
            assert np.allclose(t.cart_coords, s.cart_coords @ rot.T, atol=1e-8)
        g2 = dgl.batch([ex.build_radius_graph(s) for s in rotated])
        assert g2.num_edges() == g.num_edges()
        assert torch.allclose(g2.edata["r"], g.edata["r"] @ torch.tensor(rot.T, dtype=torch.float32), atol=1e-4)
        h2 = model.node_features(g2)
        assert _close(h2, h)  # the CGCNN part sees distances only
        assert _close(model.attn(g2, h2, rvec=-g2.edata["r"]), ref_conv)
        assert _close(model(g2), ref_out)


@torch.no_grad()
def test_sign_convention(setup):
    """-r on the centre -> neighbour graph is the layer's own convention on the reversed graph
    (edge neighbour -> centre, displacement source image - destination = +r), and +r is not."""
    _, graphs, model = setup
    g = dgl.batch(graphs)
    h = model.node_features(g)
    right = model.attn(g, h, rvec=-g.edata["r"])
    rev = dgl.reverse(g, copy_edata=True)
    assert _close(model.attn(rev, h, rvec=rev.edata["r"]), right)
    wrong = model.attn(g, h, rvec=g.edata["r"])
    # +r mirrors every environment through its atom: distances and attention weights are the same,
    # max frames flip e1, e2 but keep e3 = e1 x e2, so only the e3 features (handedness) differ
    assert (wrong - right).abs().max() > 1e-3 * right.abs().max()
