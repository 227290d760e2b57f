"""nn.py: CrystalFramerConv as a drop-in layer: edata key, errors, sigma normaliser, gradcheck, edge order."""
import math

import pytest
import torch
from pymatgen.core import Lattice, Structure

from dgl_crystalframer._dgl import dgl
from dgl_crystalframer.graph import build_graph
from dgl_crystalframer.nn import CrystalFramerConv

from crystals import REL_TOL, STRUCTURES, initialised, nacl


# --------------------------------------------------------------------------- the layer as a drop-in


def test_layer_reads_user_chosen_edata_key_and_reports_attention():
    g = build_graph(STRUCTURES[0])
    g.edata["disp"] = g.edata.pop("rvec")
    conv = CrystalFramerConv(16, 2, frame="max", rvec_key="disp")
    feat = torch.randn(g.num_nodes(), 16)
    out, att = conv(g, feat, get_attention=True)
    assert out.shape == (g.num_nodes(), 16) and att.shape == (g.num_edges(), 2, 1)
    per_node = torch.zeros(g.num_nodes(), 2).index_add_(0, g.edges()[1], att.squeeze(-1))
    assert torch.allclose(per_node, torch.ones_like(per_node), atol=1e-5)
    assert "rvec" not in g.edata and set(g.edata.keys()) == {"disp", "image"}  # local_scope: nothing leaks


def test_layer_errors_are_clear():
    g = build_graph(STRUCTURES[0])
    conv = CrystalFramerConv(16, 2, rvec_key="r")
    with pytest.raises(KeyError, match="edata has no 'r'"):
        conv(g, torch.randn(g.num_nodes(), 16))
    with pytest.raises(ValueError, match="rvec must be"):
        conv(g, torch.randn(g.num_nodes(), 16), rvec=torch.randn(3, 3))
    with pytest.raises(ValueError, match="feat must be"):
        conv(g, torch.randn(g.num_nodes(), 8), rvec=g.edata["rvec"])
    with pytest.raises(ValueError, match="divisible"):
        CrystalFramerConv(10, 3)


def test_sigma_normaliser_recorded_once_and_bounded():
    model = initialised("max")
    attn = model.blocks[0].attn
    shift, scale = float(attn.sigma_shift), float(attn.sigma_scale)
    assert bool(attn.sigma_initialized) and math.isfinite(shift) and scale > 0
    model.train()
    model(build_graph(nacl()))  # a second training batch does not re-record
    assert float(attn.sigma_shift) == shift and float(attn.sigma_scale) == scale
    # sigma < r0 / sqrt(b): 1/(2 sigma^2) > b / (2 r0^2)
    q = attn.fc_q(torch.randn(50, 128)).view(50, 8, 16) * 100
    assert (attn._sigma_inv2(q) > 0.5 / (2 * 1.4 ** 2) - 1e-6).all()


def _shuffled_edges(g, seed=0):
    perm = torch.randperm(g.num_edges(), generator=torch.Generator().manual_seed(seed))
    src, dst = g.edges()
    out = dgl.graph((src[perm], dst[perm]), num_nodes=g.num_nodes())
    out.ndata.update(g.ndata)
    out.edata.update({k: v[perm] for k, v in g.edata.items()})
    return out


@pytest.mark.parametrize("frame", ["none", "max", "weighted_pca"])
def test_edge_order_does_not_matter(frame):
    """A user's graph need not be sorted by destination: shuffled edges give the same prediction
    (tied frame candidates are then met in another order, which must not matter either)."""
    graphs = [build_graph(s) for s in STRUCTURES]
    model = initialised(frame)
    with torch.no_grad():
        a = model(dgl.batch(graphs))
        b = model(dgl.batch([_shuffled_edges(g, k) for k, g in enumerate(graphs)]))
    assert (a - b).abs().max() < REL_TOL * a.abs().max()


# ---------------------------------------------------------------------------------------- gradients


# weighted_pca's frame is a smooth function of the attention weights and, per docs/METHOD.md 3, carries no
# gradient; a finite-difference check would see the frame move, so it is left out here.
@pytest.mark.parametrize("frame", ["none", "max", "static_local", "pca", "lattice"])
def test_gradcheck_float64(frame):
    torch.manual_seed(1)
    s = Structure(Lattice([[3.1, 0.2, 0.1], [0.3, 3.5, 0.0], [0.2, -0.4, 4.1]]), ["O", "Si", "Fe"],
                  [[0, 0, 0], [0.31, 0.52, 0.43], [0.7, 0.1, 0.8]])
    g = build_graph(s, cutoff=4.5)
    conv = CrystalFramerConv(8, 2, frame=frame, num_angle_basis=8, num_dist_basis=8).double()
    conv.train()
    x = torch.randn(g.num_nodes(), 8, dtype=torch.float64, requires_grad=True)
    rvec = g.edata["rvec"].double()
    conv(g, x, rvec=rvec)  # records the sigma normaliser
    assert torch.autograd.gradcheck(lambda x: conv(g, x, rvec=rvec), (x,), eps=1e-6, atol=1e-5)
