"""config.py: presets, explicit overrides, config files, the paper's schedules."""
from __future__ import annotations

import json
import os

import pytest

from dgl_crystalframer.config import ModelConfig, TrainConfig, paper_schedule
from dgl_crystalframer.errors import ConfigError


def test_paper_preset_follows_spec():
    c = TrainConfig(dataset="dft_3d_2021", target="formation_energy_peratom", preset="paper").resolved()
    assert (c.epochs, c.batch_size, c.swa_epochs, c.frame) == (2000, 256, 50, "max")
    assert (c.num_layers, c.dim) == (None, None)  # the model's defaults (L=4, d=128)
    c = TrainConfig(dataset="dft_3d_2021", target="formation_energy_peratom", frame="none", preset="paper").resolved()
    assert (c.epochs, c.batch_size) == (800, 256)
    assert paper_schedule("dft_3d_2021", "mbj_bandgap", "none")["epochs"] == 1600
    c = TrainConfig(dataset="megnet", target="e_form", preset="paper").resolved()
    assert (c.epochs, c.batch_size, c.swa_epochs, c.lr, c.betas, c.weight_decay, c.clip, c.lr_T, c.seed) == (
        500, 128, 50, 5e-4, (0.9, 0.98), 1e-5, 1.0, 4000.0, 123)
    assert c.out_dir == os.path.join("runs", "megnet-e_form-max")


def test_explicit_fields_override_presets():
    c = TrainConfig(preset="smoke", epochs=7, num_layers=3, batch_size=5).resolved()
    assert (c.epochs, c.num_layers, c.batch_size) == (7, 3, 5)
    assert c.dim == 32 and c.max_train == 48  # the rest from the preset
    assert c.swa_epochs == 1  # 10% of 7, at least 1
    q = TrainConfig(preset="quick").resolved()  # the paper's model, all training crystals, for a fixed time
    assert (q.time_budget, q.batch_size, q.lr, q.warmup_steps, q.schedule) == ("12m", 32, 2e-3, 0, "cosine")
    assert q.model_config() == ModelConfig() and q.max_train is None
    assert q.reported_model is None  # decided at the end, by the validation size (default_reported_model)
    assert q.epochs is None and q.resolved() == q  # a budget plans the length; resolving again changes nothing
    e = TrainConfig(preset="quick", epochs=7).resolved()  # explicit epochs replace the budget
    assert e.resolved() == e
    assert (e.time_budget, e.epochs, e.batch_size) == (None, 7, 32)
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig(epochs=3, time_budget="1m").resolved()
    p = TrainConfig(preset="paper", time_budget="2h").resolved()  # a budget anneals, whatever the preset
    assert (p.schedule, p.lr, p.reported_model) == ("cosine", 5e-4, None)
    s = TrainConfig(preset="smoke").resolved()
    assert s.epochs <= 3 and s.num_layers == 1
    with pytest.raises(ConfigError, match="frame"):
        TrainConfig(frame="bogus").resolved()
    with pytest.raises(ConfigError, match="swa_epochs"):
        TrainConfig(epochs=3, swa_epochs=4).resolved()


def test_reported_model_follows_the_schedule_and_the_validation_size():
    from dgl_crystalframer.config import SMALL_VALIDATION, default_reported_model

    assert default_reported_model("cosine", SMALL_VALIDATION - 1) == "final"  # a small validation set
    assert default_reported_model("cosine", SMALL_VALIDATION) == "best"
    assert default_reported_model("paper", 10 * SMALL_VALIDATION) == "swa"


def test_config_file_yaml_json_and_unknown_keys(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("dataset: megnet_sample\ntarget: gap_pbe\nepochs: 4\nlr: 1.0e-3\nbetas: [0.9, 0.99]\n")
    c = TrainConfig.from_file(str(y), epochs=9)
    assert (c.target, c.epochs, c.lr, c.betas) == ("gap_pbe", 9, 1e-3, (0.9, 0.99))
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"frame": "none", "num_layers": 2}))
    assert TrainConfig.from_file(str(j)).num_layers == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'learning_rate'.*Valid keys"):
        TrainConfig.from_file(str(bad))
    bad.write_text("epochs: three\n")
    with pytest.raises(ConfigError, match="epochs must be int"):
        TrainConfig.from_file(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_file(str(tmp_path / "missing.yaml"))
