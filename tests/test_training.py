"""Training recipe, checkpoints, resume (including after kill -9).  (Presets and config files: tests/test_config.py.)

Fast: a tiny model (1 layer, d=32) on a few dozen real MP crystals taken from the embedded sample.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dgl_crystalframer.checkpoint import load_checkpoint
from dgl_crystalframer.config import TrainConfig
from dgl_crystalframer.errors import CheckpointError, ConfigError
from dgl_crystalframer.schedule import Plan
from dgl_crystalframer.training import SWA, Trainer, train_and_evaluate, weight_decay_groups

from datasets import TINY, tiny_config, write_small_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    return write_small_dataset(tmp_path_factory.mktemp("data") / "small.json")


# ------------------------------------------------------------------------------------ recipe pieces


def test_weight_decay_only_on_weights():
    from dgl_crystalframer.model import CrystalFramer

    model = CrystalFramer(**TINY)
    decay, no_decay = weight_decay_groups(model, 1e-5)
    assert decay["weight_decay"] == 1e-5 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any(names[id(p)].endswith("bias") for p in no_decay["params"])
    assert not any(names[id(p)].endswith("bias") for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lr_schedule_and_swa_average():
    t = Trainer(TrainConfig(epochs=10, swa_epochs=2, schedule="paper", lr=5e-4))
    assert t.lr_at(0) == pytest.approx(5e-4)
    assert t.lr_at(4000) == pytest.approx(5e-4 * math.sqrt(0.5))
    t.plan = Plan(total_steps=10000, swa_start_step=100)  # lr frozen once SWA starts
    assert t.lr_at(5000) == t.lr_at(100) == pytest.approx(5e-4 * math.sqrt(4000 / 4100))

    lin = torch.nn.Linear(2, 1)
    swa = SWA(lin)
    seen = []
    for k in range(3):
        with torch.no_grad():
            lin.weight.fill_(float(k))
        seen.append(lin.weight.detach().clone())
        swa.update(lin)
    assert torch.allclose(swa.module.weight, torch.stack(seen).mean(0))
    assert swa.n_averaged == 3


# --------------------------------------------------------------------------------- a full small run


def test_train_writes_everything_and_checkpoints_load(small_data, tmp_path):
    calls = []
    out = tmp_path / "run"
    res = train_and_evaluate(tiny_config(small_data, out, plots=True), epoch_callback=lambda e, m: calls.append((e, m)))
    for key in ("dataset", "target", "frame", "n_train", "n_val", "n_test", "test_mae", "val_mae", "params",
                "train_seconds", "crystals_per_second", "latency_ms_per_crystal", "best_val_mae", "best_test_mae"):
        assert key in res, key
    assert (res["n_train"], res["n_val"], res["n_test"]) == (40, 12, 12)
    assert res["unit"] == "" or isinstance(res["unit"], str)
    assert math.isfinite(res["test_mae"]) and res["latency_ms_per_crystal"] > 0
    assert [e for e, _ in calls] == [1, 2, 3]
    assert {"val_mae", "train_loss", "train_mae", "lr", "seconds"} <= set(calls[0][1])
    for name in ("model.pt", "best.pt", "swa.pt", "last.pt", "log.csv", "results.json", "test_predictions.csv",
                 "parity.png", "learning_curve.png"):
        assert (out / name).is_file(), name
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 3
    ids = json.loads((out / "split_ids.json").read_text())  # the ids each split used, next to results.json
    assert [len(ids[s]) for s in ("train", "val", "test")] == [40, 12, 12] and ids["split"] == res["split"] == "column"
    assert json.loads((out / "results.json").read_text())["test_mae"] == pytest.approx(res["test_mae"])
    assert not list(out.glob("*.tmp"))

    model, meta = load_checkpoint(str(out / "model.pt"))  # the reported model
    # 12 validation crystals: the final model is reported (config.default_reported_model)
    assert meta["kind"] == res["reported_model"] == "final" and meta["target"] == "e_form"
    assert load_checkpoint(str(out / "swa.pt"))[1]["kind"] == "swa"
    assert meta["cutoff"] == pytest.approx(res["cutoff"]) and meta["normalizer"]["std"] > 0
    assert model.config.num_layers == 1 and not model.training
    # the checkpoint alone reproduces the test predictions of the run
    from dgl_crystalframer.batch import collate
    from dgl_crystalframer.data import load_dataset

    splits = load_dataset(str(small_data), "e_form", cache_dir=str(tmp_path / "cache"), progress=False)
    bg, y = collate([splits.test[i] for i in range(len(splits.test))])
    with torch.no_grad():
        pred = model(bg).double().numpy() * meta["normalizer"]["std"] + meta["normalizer"]["mean"]
    assert float(np.mean(np.abs(pred - y[:, 0].double().numpy()))) == pytest.approx(res["test_mae"], rel=1e-5, abs=1e-7)
    best, bmeta = load_checkpoint(str(out / "best.pt"))
    assert bmeta["kind"] == "best" and bmeta["val_mae"] == pytest.approx(res["best_val_mae"])
    _, lmeta = load_checkpoint(str(out / "last.pt"))
    assert lmeta["epoch"] == 3


def test_same_seed_same_result_and_seed_matters(small_data, tmp_path):
    a = train_and_evaluate(tiny_config(small_data, tmp_path / "a", epochs=2))
    b = train_and_evaluate(tiny_config(small_data, tmp_path / "b", epochs=2))
    c = train_and_evaluate(tiny_config(small_data, tmp_path / "c", epochs=2, seed=7))
    assert a["test_mae"] == b["test_mae"]
    assert a["test_mae"] != c["test_mae"]


def test_an_explicit_reported_model_wins_over_the_validation_size_rule(small_data, tmp_path):
    res = train_and_evaluate(tiny_config(small_data, tmp_path / "b", epochs=2, reported_model="best"))
    assert res["reported_model"] == "best" and res["test_mae"] == res["models"]["best"]["test_mae"]
    assert load_checkpoint(str(tmp_path / "b" / "model.pt"))[1]["kind"] == "best"


def test_callback_exception_propagates_and_nan_loss_raises(small_data, tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        raise Stop(epoch)

    with pytest.raises(Stop):
        train_and_evaluate(tiny_config(small_data, tmp_path / "cb"), epoch_callback=stop)

    from dgl_crystalframer.model import CrystalFramer

    forward = CrystalFramer.forward
    monkeypatch.setattr(CrystalFramer, "forward", lambda self, g: forward(self, g) * float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite training loss"):
        train_and_evaluate(tiny_config(small_data, tmp_path / "nan"))


def test_resume_refuses_a_different_config(small_data, tmp_path):
    out = tmp_path / "r"
    first = train_and_evaluate(tiny_config(small_data, out, epochs=2))
    again = train_and_evaluate(tiny_config(small_data, out, epochs=2, resume=True))  # finished: only re-evaluates
    assert again["test_mae"] == first["test_mae"]
    with pytest.raises(ConfigError, match="lr"):
        train_and_evaluate(tiny_config(small_data, out, epochs=2, lr=1e-3, resume=True))


RESUME_SCRIPT = textwrap.dedent("""
    import os, sys, time, json
    sys.path.insert(0, {tests!r})
    from datasets import tiny_config
    from pathlib import Path
    from dgl_crystalframer.data import load_dataset
    from dgl_crystalframer.training import train_and_evaluate

    data, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cfg = tiny_config(data, out, epochs=5, swa_epochs=2, resume=(mode == "resume"))
    splits = load_dataset(str(data), "e_form", cache_dir=cfg.cache_dir, progress=False)
    state = {{"hang": False, "items": 0}}

    class Slow:  # the training split, but it hangs in the middle of epoch 3 (after one optimiser step)
        def __init__(self, ds):
            self.ds, self.ids, self.targets = ds, ds.ids, ds.targets
        def __len__(self):
            return len(self.ds)
        def __getitem__(self, i):
            if state["hang"]:
                state["items"] += 1
                if state["items"] > cfg.batch_size:
                    (out / "HANGING").write_text("epoch 3")
                    time.sleep(600)
            return self.ds[i]

    def callback(epoch, metrics):
        if mode == "hang" and epoch == 2:
            state["hang"] = True

    if mode == "hang":
        splits = splits._replace(train=Slow(splits.train))
    res = train_and_evaluate(cfg, epoch_callback=callback, data=splits)
    print("RESULT", json.dumps({{"test_mae": res["test_mae"], "val_mae": res["val_mae"]}}))
""")


def _run_script(script: Path, *args: str, timeout: float = 120) -> dict:
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_resume_after_kill_9_gives_the_uninterrupted_result(small_data, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(Path(__file__).parent)))
    ref = _run_script(script, str(small_data), str(tmp_path / "ref"), "plain")

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(small_data), str(out), "hang"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not (out / "HANGING").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "the run never reached epoch 3"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # mid-epoch 3, one optimiser step after the epoch-2 checkpoint
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    _, meta = load_checkpoint(str(out / "last.pt"))
    assert meta["epoch"] == 2
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 2

    resumed = _run_script(script, str(small_data), str(out), "resume")
    assert resumed["test_mae"] == pytest.approx(ref["test_mae"], rel=1e-6, abs=1e-9)
    assert resumed["val_mae"] == pytest.approx(ref["val_mae"], rel=1e-6, abs=1e-9)
    a = torch.load(tmp_path / "ref" / "model.pt", weights_only=True)["model"]
    b = torch.load(out / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=1e-6, atol=1e-7), k
    assert len((out / "log.csv").read_text().strip().splitlines()) == 1 + 5


# --------------------------------------------------------------------------------- a time budget


def test_time_budget_plans_the_steps_and_a_resume_keeps_the_plan(small_data, tmp_path):
    """A budgeted run measures its speed, plans its steps (cosine to zero, SWA over the last part)
    and reports where the time went; interrupted and resumed, it finishes the same plan."""
    out = tmp_path / "budget"
    cfg = tiny_config(small_data, out, time_budget="25s", epochs=None, swa_fraction=0.25)

    class Stop(Exception):
        pass

    def stop_after_six(epoch, metrics):  # 30 steps: past the speed probe's 3 + 20
        if epoch == 6:
            raise Stop

    with pytest.raises(Stop):
        train_and_evaluate(cfg, epoch_callback=stop_after_six)
    stored = torch.load(out / "last.pt", weights_only=True)["train_state"]["plan"]
    assert stored["budget_seconds"] == 25.0 and stored["planned_at_step"] > 0
    assert stored["swa_start_step"] == stored["total_steps"] - round(0.25 * stored["total_steps"])

    res = train_and_evaluate(cfg.with_overrides(resume=True))
    plan = res["plan"]
    # the same plan, unless the resumed run found itself behind or ahead of it and planned again
    assert plan == stored or plan["planned_at_step"] > 30
    assert res["steps"] == plan["total_steps"] and plan["budget_seconds"] == 25.0
    assert res["epochs"] == math.ceil(plan["total_steps"] / 5)  # 40 crystals at batch 8: 5 steps an epoch
    assert res["swa_steps"] == plan["total_steps"] - plan["swa_start_step"] > 0
    assert res["schedule"] == "cosine" and res["reported_model"] == "final" and res["time_budget_seconds"] == 25.0
    assert set(res["models"]) == {"swa", "best", "final"} and res["test_mae"] == res["models"]["final"]["test_mae"]
    assert {"data", "train", "validation", "checkpoints", "final", "total"} <= set(res["seconds"])
    lr_last = [float(line.split(",")[6]) for line in (out / "log.csv").read_text().splitlines()[1:]][-1]
    assert lr_last < 0.05 * 5e-4  # annealed to (near) zero by the planned end


# ------------------------------------------------------------------ an out dir that holds a run


def test_a_damaged_last_pt_stops_a_resume_with_one_line_naming_the_file(small_data, tmp_path):
    done = tmp_path / "done"
    train_and_evaluate(tiny_config(small_data, done, epochs=1))
    out = tmp_path / "damaged"
    out.mkdir()
    last = out / "last.pt"
    for content in (np.random.default_rng(1).bytes(3000), (done / "last.pt").read_bytes()[:4000], b""):
        last.write_bytes(content)
        with pytest.raises(CheckpointError) as err:
            train_and_evaluate(tiny_config(small_data, out, epochs=1, resume=True))
        msg = str(err.value)
        assert msg.startswith("cannot resume") and str(last) in msg and f"delete {last}" in msg, msg
        assert "weights_only" not in msg and "\n" not in msg


def test_a_killed_run_is_not_overwritten_without_resume(small_data, tmp_path):
    out = tmp_path / "killed"

    class Stop(Exception):
        pass

    def stop(epoch, metrics):
        raise Stop

    with pytest.raises(Stop):
        train_and_evaluate(tiny_config(small_data, out, epochs=3), epoch_callback=stop)
    before = (out / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=r"unfinished run .* --resume, start over with --overwrite"):
        train_and_evaluate(tiny_config(small_data, out, epochs=3))
    assert (out / "last.pt").read_bytes() == before  # untouched
    res = train_and_evaluate(tiny_config(small_data, out, epochs=2, overwrite=True))
    assert res["epochs"] == 2 and load_checkpoint(str(out / "last.pt"))[1]["epoch"] == 2
    again = train_and_evaluate(tiny_config(small_data, out, epochs=2))  # a finished run may be run again
    assert again["test_mae"] == res["test_mae"]


def test_parity_plot_names_the_source_of_the_true_values(small_data, tmp_path, monkeypatch):
    import matplotlib.figure

    labels = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, path, **kw: labels.update({Path(path).name: fig.axes[0].get_xlabel()}))
    train_and_evaluate(tiny_config(small_data, tmp_path / "p", epochs=1, plots=True))
    assert labels["parity.png"] == "true e_form"  # the user's own data: not "DFT"


def test_workers_and_losses_read_back_in_groups_give_the_same_run(small_data, tmp_path, monkeypatch):
    """DataLoader workers (one loader kept across epochs) and the GPU's grouped loss read-back
    (here forced on CPU) change nothing in the results; a non-finite step is still named."""
    from dgl_crystalframer import training

    base = train_and_evaluate(tiny_config(small_data, tmp_path / "a", epochs=2))
    monkeypatch.setattr(training, "READ_EVERY", {"cpu": 3, "cuda": 16})
    grouped = train_and_evaluate(tiny_config(small_data, tmp_path / "b", epochs=2, num_workers=2))
    assert grouped["test_mae"] == base["test_mae"]
    assert grouped["best_val_mae"] == base["best_val_mae"] and grouped["steps"] == base["steps"]

    from dgl_crystalframer.model import CrystalFramer

    forward, calls = CrystalFramer.forward, []

    def nan_from_step_2(self, g):
        calls.append(self.training)
        return forward(self, g) * (float("nan") if sum(calls) == 2 else 1.0)

    monkeypatch.setattr(CrystalFramer, "forward", nan_from_step_2)
    with pytest.raises(FloatingPointError, match="epoch 1, step 2 "):
        train_and_evaluate(tiny_config(small_data, tmp_path / "nan"))


@pytest.mark.parametrize("backend", ["dgl", "torch"])
def test_deterministic_runs_every_operation_and_changes_nothing_on_cpu(small_data, tmp_path, backend):
    """--deterministic: torch's deterministic algorithms accept every operation of a training step
    (both backends), and on CPU, whose sums already run in a fixed order, the numbers are the same."""
    plain = train_and_evaluate(tiny_config(small_data, tmp_path / "a", epochs=1, backend=backend))
    det = train_and_evaluate(tiny_config(small_data, tmp_path / "b", epochs=1, backend=backend, deterministic=True))
    assert det["test_mae"] == plain["test_mae"]
    assert not torch.are_deterministic_algorithms_enabled()  # the process is left as it was


def test_deterministic_refuses_dgl_kernels_on_a_gpu():
    from dgl_crystalframer.training import use_deterministic

    with pytest.raises(ConfigError, match="--backend torch"):
        use_deterministic(torch.device("cuda"), "dgl")
