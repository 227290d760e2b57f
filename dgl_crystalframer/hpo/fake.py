"""A fast stand-in trainer for tests: ``HPO_TRAINER=hpo.fake:train python -m hpo ...``.

It has the trainer's shape (epoch callback with val_mae/train_loss, result dict with test_mae,
val_mae, latency_ms_per_crystal, ...) and a deterministic, smooth landscape over the search
space, so samplers, pruners, storage and reports can be tested in seconds. It never touches a
model. HPO_FAKE_EPOCH_SECONDS (default 0) sleeps per epoch to make trials take time.
"""
from __future__ import annotations

import math
import os
import time

FRAME_MAE = {"max": 0.030, "static_local": 0.031, "weighted_pca": 0.032, "lattice": 0.034,
             "none": 0.035, "pca": 0.036}


def final_mae(config: dict) -> float:
    layers = int(config.get("num_layers", 4))
    lr = float(config.get("lr", 5e-4))
    d = int(config.get("num_angle_basis", 64))
    bs = int(config.get("batch_size", 64))
    return (
        FRAME_MAE.get(config.get("frame", "max"), 0.04)
        + 0.002 * abs(layers - 5)
        + 0.004 * abs(math.log10(lr / 5e-4))
        + 0.001 * (64 - d) / 48
        + 0.0005 * abs(math.log2(bs / 64))
    )


def train(config: dict, epoch_callback=None) -> dict:
    epochs = int(config.get("epochs") or 4)
    pause = float(os.environ.get("HPO_FAKE_EPOCH_SECONDS", "0"))
    target = final_mae(config)
    val = float("nan")
    for epoch in range(1, epochs + 1):
        if pause:
            time.sleep(pause)
        val = target * (1.0 + 2.0 / epoch)
        if epoch_callback is not None:
            epoch_callback(epoch, {"val_mae": val, "train_loss": val * 0.9})
    layers = int(config.get("num_layers", 4))
    latency = 0.5 * layers * (2.0 if config.get("frame", "max") != "none" else 1.0)
    return {
        "dataset": config.get("dataset"),
        "target": config.get("target"),
        "frame": config.get("frame"),
        "val_mae": val,
        "test_mae": val * 1.05,
        "params": 100_000 * layers,
        "train_seconds": pause * epochs,
        "crystals_per_second": 1000.0,
        "latency_ms_per_crystal": latency,
    }
