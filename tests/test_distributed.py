"""DistributedDataParallel under torchrun: 2 CPU processes (gloo), each on its own shard of crystals."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from datasets import write_small_dataset

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import os, sys, json
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from datasets import tiny_config
    from dgl_crystalframer.training import Trainer

    data, out = Path(sys.argv[1]), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    trainer = Trainer(tiny_config(data, out, epochs=2, batch_size=8, swa_epochs=1, progress=True, plots=False))
    seen = []
    orig = trainer._train_epoch
    def spy(epoch):  # record which crystals this rank trained on (the sampler is set per epoch inside)
        result = orig(epoch)
        seen.append(list(trainer.sampler))
        return result
    trainer._train_epoch = spy
    res = trainer.fit()
    torch.save({{"model": trainer.model.state_dict(), "swa": trainer.swa.module.state_dict(), "seen": seen,
                "world": res["world_size"], "test_mae": res["test_mae"]}}, out.parent / f"rank{{rank}}.pt")
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch without gloo")
@pytest.mark.parametrize("backend", ["dgl", "torch"])
def test_two_cpu_ranks_train_identical_weights(tmp_path, backend):
    """Both sparse backends: ``torch`` sends plain-tensor batches through DDP, as on GPUs without a
    CUDA build of DGL (NCCL there, gloo here)."""
    data = write_small_dataset(tmp_path / "small.json")
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DGL_CRYSTALFRAMER_BACKEND": backend}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script), str(data),
                           str(out)], capture_output=True, text=True, timeout=240, cwd=REPO, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert r0["world"] == r1["world"] == 2
    for part in ("model", "swa"):
        for k in r0[part]:
            assert torch.equal(r0[part][k], r1[part][k]), (part, k)
    # each rank trained on its own half of every epoch's permutation
    for e0, e1 in zip(r0["seen"], r1["seen"]):
        assert len(e0) == len(e1) == 20 and not set(e0) & set(e1)
    assert r0["seen"][0] != r0["seen"][1]  # reshuffled per epoch
    assert r0["test_mae"] == r1["test_mae"]
    # only rank 0 wrote files and printed progress
    res = json.loads((out / "results.json").read_text())
    assert res["world_size"] == 2 and res["n_train"] == 40 and res["backend"] == backend
    assert proc.stderr.count("epoch 1/2 ") == 1
    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "last.pt", "log.csv", "model.pt", "results.json",
                                                     "split_ids.json", "swa.pt", "test_predictions.csv"]
