"""The sparse seam (dgl_crystalframer/sparse.py): both backends give the same numbers and the selector
picks what the README says.  (Plain-tensor batches: tests/test_batch.py.)"""
import numpy as np
import pytest
import torch

from dgl_crystalframer import sparse
from dgl_crystalframer._dgl import dgl
from dgl_crystalframer.graph import build_graph
from dgl_crystalframer.model import CrystalFramer

from crystals import ALL_FRAMES, DEGENERATE, INVARIANT_FRAMES, STRUCTURES, nacl, permuted, random_rotation, rel, rotated, \
    supercell


BATCH = dgl.batch([build_graph(s) for s in STRUCTURES + [nacl()]])


def run_model(frame, graph, backend_name, dtype=torch.float32, steps=0, seed=0):
    """Predictions and gradients of a 2-layer model (sigma normaliser recorded on ``graph``)."""
    torch.manual_seed(seed)
    model = CrystalFramer(frame=frame, num_layers=2).to(dtype)
    model.sparse_backend = backend_name
    model.train()
    out = model(graph)
    (out ** 2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    losses = []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    target = torch.linspace(-1, 1, graph.batch_size, dtype=dtype)
    for _ in range(steps):
        loss = torch.nn.functional.l1_loss(model(graph), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return out.detach(), grads, losses


def worst_gradient(grads_a, grads_b):
    """(name, relative difference) of the parameter whose gradients differ most.  Gradients that
    vanish analytically (the key bias: softmax ignores a constant shift) are float noise on both
    sides, so each is compared against at least 1e-6 of the model's largest gradient."""
    assert grads_a.keys() == grads_b.keys()
    floor = 1e-6 * max(float(g.abs().max()) for g in grads_a.values())
    diffs = {n: rel(grads_a[n], grads_b[n], floor) for n in grads_a}
    name = max(diffs, key=diffs.get)
    return name, diffs[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frame", ALL_FRAMES)
def test_backends_agree_on_real_crystals(frame, dtype, backend):
    out_d, grads_d, _ = run_model(frame, BATCH, "dgl", dtype)
    out_t, grads_t, _ = run_model(frame, BATCH, "torch", dtype)
    assert rel(out_d, out_t) < 1e-5, f"{frame}: outputs differ by {rel(out_d, out_t):.2e}"
    name, diff = worst_gradient(grads_d, grads_t)
    assert diff < 1e-5, f"{frame}: gradient of {name} differs by {diff:.2e}"


@pytest.mark.parametrize("name", list(DEGENERATE))
@pytest.mark.parametrize("frame", ["none", "max", "weighted_pca", "static_local", "pca", "lattice"])
def test_backends_agree_on_degenerate_structures(name, frame, backend):
    g = build_graph(DEGENERATE[name])
    out_d, grads_d, _ = run_model(frame, g, "dgl", torch.float64)
    out_t, grads_t, _ = run_model(frame, g, "torch", torch.float64)
    assert torch.isfinite(out_t).all()
    assert rel(out_d, out_t) < 1e-5
    name, diff = worst_gradient(grads_d, grads_t)
    assert diff < 1e-5, f"{name}: {diff:.2e}"


def test_training_steps_give_the_same_losses(backend):
    _, _, losses_d = run_model("max", BATCH, "dgl", steps=4)
    _, _, losses_t = run_model("max", BATCH, "torch", steps=4)
    assert np.allclose(losses_d, losses_t, rtol=1e-5), (losses_d, losses_t)
    assert losses_d[-1] < losses_d[0]


@pytest.mark.parametrize("frame", INVARIANT_FRAMES)
def test_torch_backend_is_invariant(frame, backend):
    """Rotation, atom order and cell choice, as tests/test_model.py checks for the default backend."""
    torch.manual_seed(0)
    model = CrystalFramer(frame=frame, num_layers=2)
    model.sparse_backend = "torch"
    model.train()
    model(dgl.batch([build_graph(s) for s in STRUCTURES]))
    model.eval()

    def predict(structures):
        with torch.no_grad():
            return model(dgl.batch([build_graph(s) for s in structures]))

    base = predict(STRUCTURES)
    rot = random_rotation(2)
    for what, variant in (("rotation", [rotated(s, rot, np.array([0.5, -1.0, 2.0])) for s in STRUCTURES]),
                          ("atom order", [permuted(s, 1) for s in STRUCTURES]),
                          ("2x1x1 supercell", [supercell(s, (2, 1, 1)) for s in STRUCTURES])):
        assert rel(base, predict(variant)) < 1e-4, f"{frame}: {what}"


def test_selector_picks_dgl_where_dgl_runs_and_torch_elsewhere(monkeypatch, backend):
    assert sparse.select_backend("cpu") == "dgl"
    # a CUDA device with DGL from PyPI (CPU-only): plain PyTorch
    monkeypatch.setattr(sparse, "dgl_supports", lambda device: torch.device(device).type == "cpu")
    assert sparse.select_backend(torch.device("cuda", 0)) == "torch"
    assert sparse.select_backend("cpu") == "dgl"
    # a CUDA build of DGL: DGL's kernels
    monkeypatch.setattr(sparse, "dgl_supports", lambda device: True)
    assert sparse.select_backend(torch.device("cuda", 0)) == "dgl"


def test_selector_overrides(monkeypatch, backend):
    """The request is explicit: a flag wins over the environment, which wins over ``auto``; the
    environment is read by the entry points (``backend_from_env``), never by the selection itself."""
    backend("torch")
    assert sparse.backend_from_env("auto") == "torch" and sparse.backend_from_env(None) == "torch"
    assert sparse.backend_from_env("dgl") == "dgl"  # the command line wins over the environment
    assert sparse.select_backend("cpu") == "dgl"  # not read here
    assert sparse.select_backend("cpu", "torch") == "torch"
    monkeypatch.setattr(sparse, "dgl_supports", lambda device: torch.device(device).type == "cpu")
    with pytest.raises(RuntimeError, match="--backend torch"):
        sparse.select_backend(torch.device("cuda", 0), "dgl")
    backend("tensorflow")
    with pytest.raises(ValueError, match="DGL_CRYSTALFRAMER_BACKEND"):
        sparse.backend_from_env("auto")
    with pytest.raises(ValueError, match="unknown backend"):
        sparse.select_backend("cpu", "jax")


def test_backends_are_objects_behind_one_interface():
    """Each backend is one class; a topology holds the one it uses and every operation goes to it."""
    g = build_graph(nacl())
    calls = []

    class Counting(sparse.TorchBackend):
        def copy_e_sum(self, topo, x):
            calls.append("copy_e_sum")
            return super().copy_e_sum(topo, x)

    topo = sparse.Topology.of(g, backend=Counting())
    assert isinstance(topo.backend, Counting) and topo.backend.name == "torch"
    x = torch.ones(g.num_edges(), 2)
    assert torch.equal(sparse.copy_e_sum(topo, x), sparse.copy_e_sum(sparse.Topology.of(g, backend="dgl"), x))
    assert calls == ["copy_e_sum"]
    assert set(sparse.SPARSE_BACKENDS) == set(sparse.BACKENDS)
    for b in sparse.SPARSE_BACKENDS.values():
        assert all(getattr(type(b), op) is not getattr(sparse.SparseBackend, op)
                   for op in ("u_dot_v", "e_dot_v", "e_mul_v", "edge_softmax", "u_mul_e_sum", "edge_sum", "copy_e_sum",
                              "copy_e_max", "supports")), b


def test_real_dgl_support_query():
    assert sparse.dgl_supports("cpu")
    has_cuda_dgl = torch.cuda.is_available() and sparse.dgl_supports("cuda")
    assert sparse.dgl_supports("cuda") == has_cuda_dgl or not torch.cuda.is_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("frame", ALL_FRAMES)
def test_cuda_matches_cpu(frame, dtype, backend):
    """The model on a GPU (DGL's CUDA kernels or plain PyTorch, whichever the install has) against
    the same weights on the CPU with DGL's kernels: outputs and gradients."""
    cpu_out, cpu_grads, _ = run_model(frame, BATCH, "dgl", dtype)
    torch.manual_seed(0)
    model = CrystalFramer(frame=frame, num_layers=2).to(dtype).cuda()
    model.train()
    out = model(BATCH)  # a CPU graph: the topology and features move with the model's device
    (out ** 2).sum().backward()
    grads = {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}
    tol = 1e-5 if dtype == torch.float64 else 1e-4
    assert rel(cpu_out, out.detach().cpu()) < tol
    name, diff = worst_gradient(cpu_grads, grads)
    assert diff < tol, f"{frame}: gradient of {name} differs by {diff:.2e}"
