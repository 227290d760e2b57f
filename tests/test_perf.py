"""The device report of ``benchmarks.perf`` (what scripts/gpu_check.sh runs on a GPU), run on CPU with
the torch backend at toy sizes: every measurement runs and gives a sane number."""
import math

import torch

from dgl_crystalframer.bench import perf
from dgl_crystalframer.graph import build_graph

from crystals import STRUCTURES, nacl


def test_device_report_runs_every_measurement_on_cpu(monkeypatch):
    monkeypatch.setattr(perf, "make_model", lambda frame, seed=0, backend=None: _small(frame, backend))
    items = [(build_graph(s), torch.tensor([float(k)])) for k, s in enumerate(STRUCTURES + [nacl()])]
    graphs = [g for g, _ in items]
    rep = perf.bench_device(graphs, torch.device("cpu"), ["max"], repeats=1, batch_sizes=(3,), n_single=2,
                            dataset=items, workers=(0, 2), backend="torch", scaling=False)
    assert rep["backend"] == "torch"
    for frame, row in rep["frames"].items():
        for key in ("train_crystals_per_s_b3", "loader_w0_crystals_per_s_b3", "loader_w2_crystals_per_s_b3",
                    "host_ms_per_step_b3", "wall_ms_per_step_b3", "aten_calls_per_step_b3", "infer_ms_batched"):
            assert math.isfinite(row[key]) and row[key] > 0, (frame, key, row[key])
        assert row["bitwise_identical_steps"] == 1.0 and row["bitwise_identical_steps_deterministic"] == 1.0
        assert row["syncs_per_step_b3"] == 0  # counted on CUDA only
    assert "loader_w2_crystals_per_s_b3" in perf.format_device_report(rep)


def _small(frame, backend):
    torch.manual_seed(0)
    model = perf.CrystalFramer(frame=frame, num_layers=1, dim=32, num_heads=4, ffn_dim=32, num_angle_basis=8)
    model.sparse_backend = backend
    return model
