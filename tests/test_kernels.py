"""kernels.py: the fused aggregations against the per-edge definitions, numba against torch."""
import pytest
import torch

from dgl_crystalframer._dgl import dgl
from dgl_crystalframer.graph import build_graph

from crystals import STRUCTURES, initialised


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_aggregations_match_the_exact_bases(backend, monkeypatch):
    """The fused distance sum and the histogram angular sum (both kernels of kernels.py) equal the
    per-edge definitions (docs/METHOD.md 2.2) computed naively with index_add: values, and gradients with
    respect to the attention weights and the projections, with and without the c -> -c symmetrisation."""
    from dgl_crystalframer import basis as B, kernels
    from dgl_crystalframer.nn import _AngularAggregate, _DistAggregate
    from dgl_crystalframer.sparse import Topology

    if backend == "numba" and kernels.numba is None:
        pytest.skip("numba is not installed")
    monkeypatch.setattr(kernels, "BACKEND", backend)
    g = dgl.batch([build_graph(s) for s in STRUCTURES])
    dst, N, E, H, dh = g.edges()[1], g.num_nodes(), g.num_edges(), 4, 8
    topo = Topology.of(g)
    indptr = topo.indptr
    torch.manual_seed(0)
    cos = torch.rand(E, H, 3) * 2 - 1
    cos[:5] = torch.tensor([-1.0, 0.0, 1.0])  # the ends of the range and the centre
    w = torch.rand(E, H, requires_grad=True)
    sym = torch.rand(N, H, 3) < 0.3
    for D, width in ((64, 4.0), (16, 1.0)):
        W = torch.randn(3, H, dh, D, requires_grad=True)
        table, half = B.angle_basis_table(D, width)
        proj = torch.einsum("xm,khdm->hkxd", table.float().flatten(0, 1), W)
        fast = _AngularAggregate.apply(indptr, cos, w, sym, proj, half, 1 << 14, (0, 1, 2))  # several atom chunks
        basis = B.gaussian_angle_basis(cos, D, width)
        basis = torch.where(sym[dst].unsqueeze(-1), 0.5 * (basis + B.gaussian_angle_basis(-cos, D, width)), basis)
        agg = torch.zeros(N, H, 3, D).index_add(0, dst, w[:, :, None, None] * basis)
        exact = torch.einsum("nhkm,khdm->nhd", agg, W)
        assert (fast - exact).abs().max() < 1e-5 * exact.abs().max()
        probe = torch.randn(N, H, dh)
        (gw_f, gW_f), (gw_e, gW_e) = (torch.autograd.grad((t * probe).sum(), (w, W)) for t in (fast, exact))
        assert (gw_f - gw_e).abs().max() < 1e-5 * gw_e.abs().max()
        assert (gW_f - gW_e).abs().max() < 1e-5 * gW_e.abs().max()
    dist_basis = B.gaussian_distance_basis(g.edata["rvec"].norm(dim=-1))
    fast = _DistAggregate.apply(topo, topo.pad(dist_basis), w)
    exact = torch.zeros(N, H, dist_basis.shape[1]).index_add(0, dst, w[:, :, None] * dist_basis[:, None, :])
    assert torch.allclose(fast, exact, atol=1e-5)
    gf, ge = (torch.autograd.grad((t * t).sum(), w)[0] for t in (fast, exact))
    assert torch.allclose(gf, ge, rtol=1e-4, atol=1e-5)


def test_numba_and_torch_kernels_give_the_same_model(monkeypatch):
    """The fused CPU kernel and the torch version (GPU, or no numba) give the same predictions and
    gradients for a whole model, on crystals whose frames are tied (symmetrised features)."""
    from dgl_crystalframer import kernels
    if kernels.numba is None:
        pytest.skip("numba is not installed")
    bg = dgl.batch([build_graph(s) for s in STRUCTURES])
    model = initialised("max")
    results = []
    for backend in ("numba", "torch"):
        monkeypatch.setattr(kernels, "BACKEND", backend)
        model.zero_grad()
        out = model(bg)
        out.sum().backward()
        results.append((out.detach(), model.blocks[0].attn.angle_proj.grad.clone()))
    (a, ga), (b, gb) = results
    assert (a - b).abs().max() < 1e-5 * a.abs().max()
    assert (ga - gb).abs().max() < 1e-4 * ga.abs().max()


@pytest.mark.parametrize("frame", ["max", "static_local", "weighted_pca"])
def test_numba_and_torch_frames_agree(frame, monkeypatch):
    """The fused CPU frame kernel picks the same axes and flags the same ties as the torch
    operations (GPU, or no numba), on real, symmetric (tied), degenerate and hard crystals, with
    the edges in the graph's order and shuffled."""
    from dgl_crystalframer import kernels, nn
    from dgl_crystalframer.frames import compute_frames
    from dgl_crystalframer.nn import CrystalFramerConv

    from crystals import DEGENERATE, HARD, STRUCTURES, nacl

    if kernels.numba is None:
        pytest.skip("numba is not installed")
    calls = []
    monkeypatch.setattr(nn, "compute_frames", lambda *args: calls.append(args) or compute_frames(*args))
    graphs = [build_graph(s) for s in STRUCTURES + [nacl()] + list(DEGENERATE.values()) + HARD]
    for bg in (dgl.batch(graphs), _shuffled(dgl.batch(graphs))):
        torch.manual_seed(0)
        conv = CrystalFramerConv(32, 4, frame=frame)
        conv.train()
        conv(bg, torch.randn(bg.num_nodes(), 32))
        args = calls[-1]  # (kind, topology, rhat, candidate, logits, weights, distance logits) of that layer
        monkeypatch.setattr(kernels, "BACKEND", "numba")
        f_numba, tied_numba = compute_frames(*args)
        monkeypatch.setattr(kernels, "BACKEND", "torch")
        f_torch, tied_torch = compute_frames(*args)
        assert (f_numba - f_torch).abs().max() < 1e-6  # the same float64 comparisons on both paths
        assert torch.equal(tied_numba, tied_torch) and tied_numba.any()


def _shuffled(g, seed=0):
    perm = torch.randperm(g.num_edges(), generator=torch.Generator().manual_seed(seed))
    src, dst = g.edges()
    out = dgl.graph((src[perm], dst[perm]), num_nodes=g.num_nodes())
    out.ndata.update(g.ndata)
    out.edata.update({k: v[perm] for k, v in g.edata.items()})
    out.set_batch_num_nodes(g.batch_num_nodes())
    return out
