"""Fine-tuning (``init_from``): the checkpoint's weights and architecture, a fresh normaliser, frozen
blocks, provenance in results.json, resume, and one-line errors.  Tiny models on real MP crystals."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dgl_crystalframer import cli
from dgl_crystalframer.checkpoint import load_checkpoint
from dgl_crystalframer.errors import ConfigError
from dgl_crystalframer.training import Trainer, train_and_evaluate

from datasets import TINY, tiny_config, write_small_dataset

UNSET_MODEL = {k: None for k in (*TINY, "frame")}  # a fine-tuning run names no model setting


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """The small e_form dataset, a copy with other targets (y -> 3 y + 1), and a 2-block checkpoint
    trained on the first."""
    root = tmp_path_factory.mktemp("ft")
    small = write_small_dataset(root / "small.json")
    records = json.loads(small.read_text())
    for r in records:
        r["e_form"] = 3.0 * r["e_form"] + 1.0
    shifted = root / "shifted.json"
    shifted.write_text(json.dumps(records))
    res = train_and_evaluate(tiny_config(small, root / "pre", epochs=2, num_layers=2))
    return {"small": small, "shifted": shifted, "ckpt": Path(res["checkpoint"]), "pre": res, "root": root}


def _ft(data, out, **kw):
    return tiny_config(data["shifted"], out, init_from=str(data["ckpt"]), **{**UNSET_MODEL, **kw})


def test_init_from_starts_from_the_checkpoint_and_records_where_it_came_from(data, tmp_path, monkeypatch):
    first = []
    train_epoch = Trainer._train_epoch

    def spy(self, epoch):  # the model the first optimiser step sees
        if epoch == 0:
            first.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", spy)
    res = train_and_evaluate(_ft(data, tmp_path / "ft", epochs=2))
    ckpt_model, ckpt_meta = load_checkpoint(str(data["ckpt"]))
    expected = ckpt_model.state_dict()
    assert first[0].keys() == expected.keys()
    assert all(torch.equal(first[0][k], expected[k]) for k in expected)
    # the architecture is the checkpoint's (2 blocks), although the run names none
    assert res["config"]["num_layers"] == 2 and res["params"] == ckpt_model.num_parameters()
    assert res["cutoff"] == pytest.approx(ckpt_meta["cutoff"])
    # a fresh normaliser, fitted on the new training targets (3 y + 1), not the checkpoint's
    old = ckpt_meta["normalizer"]
    assert res["normalizer"]["mean"] == pytest.approx(3 * old["mean"] + 1, rel=1e-5)
    assert res["normalizer"]["std"] == pytest.approx(3 * old["std"], rel=1e-5)
    # provenance: results.json and the fine-tuned checkpoints
    src = json.loads((tmp_path / "ft" / "results.json").read_text())["init_from"]
    assert src["path"] == str(data["ckpt"].resolve())
    assert src["sha256"] == hashlib.sha256(data["ckpt"].read_bytes()).hexdigest()
    assert (src["dataset"], src["target"], src["frozen_parameters"]) == (str(data["small"]), "e_form", [])
    assert load_checkpoint(str(tmp_path / "ft" / "model.pt"))[1]["init_from"] == src
    # and the run did train away from the checkpoint
    tuned = load_checkpoint(str(tmp_path / "ft" / "last.pt"))[0].state_dict()
    assert not torch.equal(tuned["head.2.weight"], expected["head.2.weight"])


def test_frozen_blocks_stay_bit_identical_and_leave_the_optimiser(data, tmp_path):
    cfg = _ft(data, tmp_path / "fz", epochs=3, freeze_blocks=1)
    trainer = Trainer(cfg)
    res = trainer.fit()
    start_model = load_checkpoint(str(data["ckpt"]))[0]
    start = start_model.state_dict()  # parameters and buffers
    frozen = {k for k, _ in start_model.named_parameters() if k.startswith(("embedding.", "blocks.0."))}
    assert frozen and set(res["init_from"]["frozen_parameters"]) == frozen
    optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    named = dict(trainer.model.named_parameters())
    assert not any(id(named[k]) in optimised for k in frozen)
    assert all(id(p) in optimised for k, p in named.items() if k not in frozen)
    for name in ("model.pt", "swa.pt", "last.pt", "best.pt"):
        state = load_checkpoint(str(tmp_path / "fz" / name))[0].state_dict()
        assert all(torch.equal(state[k], start[k]) for k in start if k.startswith(("embedding.", "blocks.0."))), name
    state = load_checkpoint(str(tmp_path / "fz" / "last.pt"))[0].state_dict()
    assert not torch.equal(state["blocks.1.ffn.0.weight"], start["blocks.1.ffn.0.weight"])
    assert res["init_from"]["frozen_values"] == sum(start[k].numel() for k in frozen)


def test_a_fine_tuning_run_resumes_to_the_uninterrupted_result(data, tmp_path):
    class Stop(Exception):
        pass

    def stop_after_first(epoch, metrics):
        if epoch == 1:
            raise Stop

    full = train_and_evaluate(_ft(data, tmp_path / "full", epochs=3, freeze_blocks=1))
    with pytest.raises(Stop):
        train_and_evaluate(_ft(data, tmp_path / "cut", epochs=3, freeze_blocks=1), epoch_callback=stop_after_first)
    resumed = train_and_evaluate(_ft(data, tmp_path / "cut", epochs=3, freeze_blocks=1, resume=True))
    assert resumed["test_mae"] == full["test_mae"] and resumed["init_from"]["sha256"] == full["init_from"]["sha256"]


def test_settings_that_contradict_the_checkpoint_are_errors(data, tmp_path):
    with pytest.raises(ConfigError, match=r"frame 'none' \(the checkpoint has 'max'\)"):
        Trainer(_ft(data, tmp_path / "a", frame="none"))
    with pytest.raises(ConfigError, match=r"num_layers 4 \(the checkpoint has 2\)"):
        Trainer(_ft(data, tmp_path / "a", num_layers=4))
    with pytest.raises(ConfigError, match=r"frame 'none' \(model crystalformer\) \(the checkpoint has 'max'\)"):
        Trainer(_ft(data, tmp_path / "a", model_preset="crystalformer"))
    with pytest.raises(ConfigError, match="cutoff"):
        Trainer(_ft(data, tmp_path / "a", cutoff=5.0))
    with pytest.raises(ConfigError, match="has only 2 blocks"):
        Trainer(_ft(data, tmp_path / "a", freeze_blocks=3))
    with pytest.raises(ConfigError, match="freeze_blocks 1 needs init_from"):
        Trainer(tiny_config(data["small"], tmp_path / "a", freeze_blocks=1))
    # a config resolved before the checkpoint is read states no model of its own
    Trainer(_ft(data, tmp_path / "b").resolved())
    # the settings a checkpoint agrees with are fine (tiny_config names the tiny model's own sizes)
    Trainer(tiny_config(data["shifted"], tmp_path / "b", init_from=str(data["ckpt"]), num_layers=2))


def _train_cli(capsys, *args):
    rc = cli.main(["train", *args])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_command_line_errors_are_one_line(data, tmp_path, capsys):
    common = ["--dataset", str(data["shifted"]), "--target", "e_form", "--preset", "smoke", "--quiet",
              "--out", str(tmp_path / "o"), "--cache-dir", str(data["root"] / "cache")]
    rc, err = _train_cli(capsys, *common, "--init-from", str(data["ckpt"]), "--frame", "none")
    assert rc == 2 and len(err) == 1 and "frame 'none' (the checkpoint has 'max')" in err[0], err
    rc, err = _train_cli(capsys, *common, "--init-from", str(data["ckpt"]), "--layers", "4")
    assert rc == 2 and len(err) == 1 and "num_layers 4 (the checkpoint has 2)" in err[0], err
    rc, err = _train_cli(capsys, *common, "--init-from", str(data["ckpt"]), "--frame", "all")
    assert rc == 2 and len(err) == 1 and "--frame all" in err[0], err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data["ckpt"].read_bytes()[:3000])
    foreign = tmp_path / "foreign.pt"  # a pickle that weights_only loading refuses
    import argparse

    torch.save({"model": argparse.Namespace(a=1)}, foreign)
    for bad in (junk, truncated, foreign, tmp_path / "missing.pt"):
        rc, err = _train_cli(capsys, *common, "--init-from", str(bad))
        assert rc == 2 and len(err) == 1 and str(bad) in err[0] and "weights_only=False" not in err[0], err
    assert not (tmp_path / "o").exists()


def test_command_line_fine_tunes_with_frozen_blocks(data, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli.main(["train", "--dataset", str(data["shifted"]), "--target", "e_form", "--preset", "smoke", "--quiet",
                   "--epochs", "1", "--init-from", str(data["ckpt"]), "--freeze-blocks", "2", "--out", str(out),
                   "--cache-dir", str(data["root"] / "cache"), "--threads", "1"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["num_layers"] == 2 and res["config"]["freeze_blocks"] == 2  # not the smoke preset's 1 block
    assert res["init_from"]["sha256"] == hashlib.sha256(data["ckpt"].read_bytes()).hexdigest()


def test_finetune_table_script_compares_fine_tuned_with_scratch(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune_table", Path(__file__).parents[1] / "scripts" / "finetune_table.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for k, (start, maes) in enumerate([(None, (0.4, 0.5, 0.6)), ({"dataset": "megnet_sample", "target": "e_form"},
                                                                  (0.2, 0.3, 0.1))]):
        models = {"best": {"test_mae": maes[0]}, "final": {"test_mae": maes[1]}, "swa": {"test_mae": maes[2]}}
        run = tmp_path / f"run{k}"
        run.mkdir()
        (run / "results.json").write_text(json.dumps(dict(
            dataset="dft_3d_2021", target="formation_energy_peratom", unit="eV/atom", init_from=start, config={"lr": 2e-3}, frame="max",
            n_train=210, n_val=18, n_test=23, steps=210, test_mae=maes[0], models=models, seconds={"total": 61.0})))
    assert script.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert ("| max | fine-tuned from megnet_sample/e_form, lr 0.002 | 1 | 210/18/23 | 210 | 0.200 eV/atom | -50% | "
            "1 min 01 s |") in out
    assert "| 0.400 | 0.500 | 0.600 | best 1 |" in out and "| 0.200 | 0.300 | 0.100 | swa 1 |" in out
    assert script.main([str(tmp_path), "--model", "swa"]) == 0
    assert "| 0.100 eV/atom | -83% |" in capsys.readouterr().out
    assert script.main([str(tmp_path / "run0" / "nothing")]) == 2
