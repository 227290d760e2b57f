"""batch.py: CrystalBatch, the plain-tensor batch (the GPU path without a CUDA build of DGL), runs the
same model as the DGLGraph it came from, and is sorted by its topology."""
import torch

from dgl_crystalframer import sparse
from dgl_crystalframer.batch import CrystalBatch, collate, to_device
from dgl_crystalframer.graph import build_graph
from dgl_crystalframer.model import CrystalFramer

from crystals import STRUCTURES, rel


def test_plain_tensor_batch_runs_the_same_model(backend):
    """A CrystalBatch (what a GPU gets with DGL from PyPI) and the DGLGraph it came from give the
    same prediction, with either backend."""
    items = [(build_graph(s), torch.tensor([0.0])) for s in STRUCTURES]
    bg, _ = collate(items)
    tb, _ = collate(items, as_tensors=True)
    assert isinstance(tb, CrystalBatch) and tb.sorted_by_dst
    assert tb.num_nodes() == bg.num_nodes() and tb.num_edges() == bg.num_edges() and tb.batch_size == bg.batch_size
    torch.manual_seed(0)
    model = CrystalFramer(frame="max", num_layers=2)
    model.train()
    model(bg)
    model.eval()
    with torch.no_grad():
        ref = model(bg)
        for name in ("dgl", "torch"):
            model.sparse_backend = name
            assert rel(ref, model(tb)) < 1e-6, name
    assert to_device(tb, "cpu") is tb


def test_unsorted_plain_batch_is_sorted_by_the_topology():
    g = build_graph(STRUCTURES[1])
    perm = torch.randperm(g.num_edges(), generator=torch.Generator().manual_seed(0))
    src, dst = g.edges()
    tb = CrystalBatch(src[perm], dst[perm], g.batch_num_nodes(), dict(g.ndata), {k: v[perm] for k, v in g.edata.items()})
    topo = sparse.Topology.of(tb, backend="torch")
    assert topo.order is not None
    assert torch.equal(topo.dst[topo.order], dst) and topo.indptr[-1] == g.num_edges()
