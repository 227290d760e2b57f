"""Host-device synchronisations of a training step on the GPU path, counted on CPU
(dgl_crystalframer/bench/syncs.py: the torch backend, no numba, DGL raising, a dispatch mode that
records every operation that would make a GPU host wait)."""
import pytest
import torch

from dgl_crystalframer.bench.syncs import SyncCounter, simulated_device_path, step_syncs
from dgl_crystalframer.graph import build_graph

from crystals import STRUCTURES, nacl

# what each frame type may cost per training step (forward + backward), with 2 layers: weighted_pca
# reads `degenerate.any()` once per layer (frames.weighted_pca_frames says why); every other sync
# is gone (the padded layout's width comes with the batch, made on CPU).  A new sync fails here.
ALLOWED = {"none": 0, "max": 0, "static_local": 0, "lattice": 0, "pca": 0, "weighted_pca": 2}

GRAPHS = [build_graph(s) for s in STRUCTURES + [nacl()]]


@pytest.mark.parametrize("frame", list(ALLOWED))
def test_no_new_sync_in_a_training_step(frame):
    counter = step_syncs(frame, GRAPHS, num_layers=2)
    assert counter.count <= ALLOWED[frame], f"{frame}: new host syncs: {counter.where()}"


def test_the_counter_sees_what_syncs_on_a_gpu():
    x = torch.arange(6.0)
    with SyncCounter() as c:
        x.sum().item()
        x.new_tensor([1.0, 0.0])
        (x > 2).nonzero()
        x[x > 2]
        torch.repeat_interleave(torch.tensor([1, 2]))
        x.tolist()
        torch.repeat_interleave(torch.arange(2), torch.full((2,), 2), output_size=4)  # sized: no sync
        x.new_zeros(3).select(0, 1).fill_(1.0)  # a scalar argument: no copy
    ops = [op for op, _ in c.events]
    assert ops.count("aten::_local_scalar_dense") == 1 and ops.count("aten::nonzero") == 2
    assert ops.count("aten::lift_fresh") == 2 and "Tensor.tolist" in ops
    assert "aten::repeat_interleave.sized" not in ops


def test_the_simulated_path_uses_neither_dgl_nor_numba():
    from dgl_crystalframer import kernels, sparse

    with simulated_device_path():
        assert kernels.BACKEND == "torch"
        with pytest.raises(AssertionError, match="DGL"):
            sparse.dglops.u_dot_v
    assert kernels.BACKEND != "torch" or kernels.numba is None
