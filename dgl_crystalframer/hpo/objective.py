"""One Optuna trial = one run of the trainer that ``dgl-crystalframer train`` uses.

The trainer is `dgl_crystalframer.training.train_and_evaluate(TrainConfig, epoch_callback)`.
Test hook: the environment variable HPO_TRAINER="module:function" swaps in another function with
the signature ``fn(config: dict, epoch_callback) -> result dict`` (dgl_crystalframer.hpo.fake:train is a fast
stand-in used by the multi-process tests). Without it, users always get the real trainer.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import optuna

from . import space as space_mod

log = logging.getLogger("hpo")

TRAINER_ENV = "HPO_TRAINER"
OBJECTIVES = {"mae": "val_mae", "latency": "latency_ms_per_crystal"}

TrainFn = Callable[[dict, Callable[[int, dict], None]], Mapping[str, Any]]


class NonFiniteMetric(FloatingPointError):
    """Raised when a loss or MAE is NaN/inf: the trial is recorded as FAIL."""


@dataclass
class Trainer:
    """train(config_dict, epoch_callback) -> result; complete(overrides) -> full config dict.

    defaults: TrainConfig fields hpo sets unless the user does (e.g. progress=False: one log line
    per trial instead of the trainer's per-epoch lines).
    """

    train: TrainFn
    complete: Callable[[dict], dict] = field(default=dict)
    name: str = "custom"
    defaults: dict = field(default_factory=dict)


def real_trainer() -> Trainer:
    """dgl_crystalframer.training, with the dataset split loaded once per worker process."""
    from .. import training
    from ..config import TrainConfig

    def complete(overrides: dict) -> dict:
        cfg = TrainConfig.from_dict(dict(overrides))
        cfg.resolved()  # validates; the stored config keeps None = "from the preset"
        return jsonable(cfg.as_dict())

    cache: dict = {}

    def shared_data(cfg: TrainConfig):
        """The split of this dataset, loaded once and reused by every trial (as the train command
        does for --frame all); None under torchrun, where the trainer loads it on every rank."""
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            return None
        r = cfg.resolved()
        key = (r.dataset, r.target, r.data_dir, r.split, r.cutoff, r.cache_dir, r.split_seed)
        if key not in cache:
            cache.clear()
            cache[key] = training.load_splits(r, progress=False)
        return cache[key]

    def train(config: dict, epoch_callback):
        from ..finetune import checkpoint_config

        cfg = checkpoint_config(TrainConfig.from_dict(dict(config)))  # fine-tuning: the checkpoint's cutoff for the data
        return training.train_and_evaluate(cfg, epoch_callback=epoch_callback, data=shared_data(cfg))

    # overwrite: a trial folder belongs to its trial number; one left by a deleted study is stale
    return Trainer(train=train, complete=complete, name="dgl_crystalframer.training",
                   defaults={"progress": False, "overwrite": True})


def trainer_from_env() -> Trainer:
    spec = os.environ.get(TRAINER_ENV, "").strip()
    if not spec:
        return real_trainer()
    module, _, attr = spec.partition(":")
    fn = getattr(importlib.import_module(module), attr or "train")
    log.warning("%s=%s: trials use this function, NOT the real trainer", TRAINER_ENV, spec)
    return Trainer(train=fn, name=spec)


def jsonable(obj: Any) -> Any:
    """Plain JSON types (Optuna stores user_attrs as JSON): Paths, numpy and torch scalars..."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item") and callable(o.item):
        try:
            return o.item()
        except (TypeError, ValueError):
            pass
    if hasattr(o, "tolist"):
        return o.tolist()
    if dataclasses.is_dataclass(o):
        return dataclasses.asdict(o)
    return repr(o)


def _finite(name: str, value: Any, epoch: int | None = None) -> float:
    where = f" at epoch {epoch}" if epoch is not None else ""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise NonFiniteMetric(f"{name}={value!r}{where} is not a number") from None
    if not math.isfinite(v):
        raise NonFiniteMetric(f"{name}={v}{where}")
    return v


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Objective:
    """Callable for study.optimize. Returns val MAE, or (val MAE, latency) for two objectives."""

    trainer: Trainer
    space: Mapping[str, space_mod.Param]
    base: dict  # fixed TrainConfig fields (dataset, target, preset, epochs, ...)
    objectives: Sequence[str] = ("mae",)
    prune: bool = True
    out_dir: Path | None = None

    def config_for(self, params: Mapping[str, Any], trial_number: int | None = None) -> dict:
        overrides = {**self.trainer.defaults, **self.base, **params}
        if self.out_dir is not None and trial_number is not None:
            overrides["out_dir"] = str(self.out_dir / f"trial_{trial_number:05d}")
        return self.trainer.complete(overrides)

    def __call__(self, trial: optuna.Trial):
        params = space_mod.suggest(trial, self.space)
        trial.set_user_attr("worker", worker_id())
        config = self.config_for(params, trial.number)
        trial.set_user_attr("config", jsonable(config))  # the full TrainConfig
        trial.set_user_attr("train_args", jsonable({**self.base, **params}))  # what hpo chose
        last: dict[str, Any] = {}

        def on_epoch(epoch: int, metrics: Mapping[str, Any]) -> None:
            last.clear()
            last.update(jsonable(dict(metrics)))
            last.setdefault("epoch", epoch)
            if "train_loss" in metrics:
                _finite("train_loss", metrics["train_loss"], epoch)
            val = _finite("val_mae", metrics["val_mae"], epoch)
            if self.prune:
                trial.report(val, step=int(epoch))
                if trial.should_prune():
                    trial.set_user_attr("last_epoch", last)
                    raise optuna.TrialPruned(f"pruned at epoch {epoch} (val_mae={val:.5g})")

        try:
            result = self.trainer.train(config, on_epoch)
        except optuna.TrialPruned:
            raise
        except Exception as e:  # recorded as FAIL by optimize(catch=(Exception,))
            log.debug("trial %d raised", trial.number, exc_info=True)
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:2000])
            if last:
                trial.set_user_attr("last_epoch", last)
            raise
        result = jsonable(dict(result))
        trial.set_user_attr("result", result)
        try:
            values = [_finite(OBJECTIVES[o], result.get(OBJECTIVES[o])) for o in self.objectives]
        except NonFiniteMetric as e:
            trial.set_user_attr("error", f"NonFiniteMetric: {e}")
            raise
        return values[0] if len(values) == 1 else tuple(values)
