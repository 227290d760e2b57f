"""Create or join a study and run trials: sampler, pruner, trial budget, per-trial log lines.

Trial budget (`n_trials`) is STUDY-WIDE: a worker stops once the study holds n_trials trials that
ended COMPLETE or PRUNED (optuna MaxTrialsCallback), whoever ran them. So the same command
resumes an interrupted study, and N workers running the same command share one budget (they may
overshoot it by up to N-1 trials that were already running). A worker also stops after running
n_trials trials itself (so a setting that always fails cannot loop forever) or after `timeout`.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from . import space as space_mod
from .objective import OBJECTIVES, Objective, Trainer, jsonable, trainer_from_env
from ..errors import ConfigError
from .storage import GRACE_PERIOD, HEARTBEAT_INTERVAL, default_url, make_storage, redact, warn_if_shared_sqlite

log = logging.getLogger("hpo")

SAMPLERS = ("auto", "tpe", "random", "grid", "nsga2")
PRUNERS = ("median", "hyperband", "none")
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
SETTINGS_ATTR = "hpo_settings"


@dataclass
class SweepSettings:
    study: str
    dataset: str
    target: str | None  # None: the dataset's usual target
    n_trials: int
    storage: str | None = None  # default: sqlite:///OUT/hpo.db
    preset: str = "quick"
    timeout: float | None = None
    sampler: str = "auto"  # auto = tpe (one objective) / nsga2 (two)
    objectives: Sequence[str] = ("mae",)
    pruner: str = "median"
    pruner_warmup: int = 2  # median pruner: epochs before a trial can be pruned
    space: Mapping[str, space_mod.Param] = field(default_factory=lambda: dict(space_mod.SPACE))
    fixed: Mapping[str, Any] = field(default_factory=dict)  # other TrainConfig fields
    out: Path = Path("runs/hpo")
    heartbeat_interval: int = HEARTBEAT_INTERVAL
    grace_period: int = GRACE_PERIOD
    max_retry: int = 1
    sampler_seed: int | None = None  # leave None when several workers share a study

    def storage_url(self) -> str:
        return self.storage or default_url(self.out)


def make_sampler(s: SweepSettings) -> optuna.samplers.BaseSampler:
    name = s.sampler
    if name == "auto":
        name = "nsga2" if len(s.objectives) > 1 else "tpe"
    if name == "tpe":
        # constant_liar: workers running in parallel avoid proposing the same point
        return optuna.samplers.TPESampler(multivariate=True, constant_liar=True, seed=s.sampler_seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=s.sampler_seed)
    if name == "grid":
        g = space_mod.grid(s.space)
        log.info("grid sampler: %d points (%s)", space_mod.grid_size(s.space), g)
        return optuna.samplers.GridSampler(g, seed=s.sampler_seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=s.sampler_seed)
    raise ValueError(f"unknown sampler {s.sampler!r}; choose from {SAMPLERS}")


def make_pruner(s: SweepSettings) -> optuna.pruners.BasePruner:
    if len(s.objectives) > 1:
        if s.pruner != "none":
            log.info("pruning disabled: Optuna does not prune multi-objective studies")
        return optuna.pruners.NopPruner()
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=s.pruner_warmup)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    if s.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {s.pruner!r}; choose from {PRUNERS}")


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_trial(t: optuna.trial.FrozenTrial, objectives: Sequence[str]) -> str:
    """The one log line per trial: number, state, value(s), params, duration."""
    if t.state == TrialState.COMPLETE and t.values:
        what = " ".join(f"{OBJECTIVES[o]}={_fmt(v)}" for o, v in zip(objectives, t.values))
    elif t.state == TrialState.PRUNED:
        step = t.last_step
        val = t.intermediate_values.get(step) if step is not None else None
        what = f"at epoch {step} val_mae={_fmt(val)}"
    else:
        what = t.user_attrs.get("error", "")
    secs = f" ({t.duration.total_seconds():.1f} s)" if t.duration else ""
    if "failed_trial" in t.system_attrs:
        secs += f" [retry of trial {t.system_attrs['failed_trial']}]"
    params = " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
    return f"trial {t.number} {t.state.name} {what}{secs} | {params}"


def _check_settings(study: optuna.Study, record: dict) -> None:
    """Every worker and every resume of a study must search the same thing."""
    if len(study.directions) != len(record["objectives"]):
        raise ConfigError(
            f"study {study.study_name!r} has {len(study.directions)} objective(s), "
            f"--objectives asks for {','.join(record['objectives'])}; use another --study name"
        )
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, record)
        return
    diff = [k for k in record if stored.get(k) != record[k]]
    if diff:
        lines = [f"  {k}: study has {stored.get(k)!r}, this command {record[k]!r}" for k in diff]
        raise ConfigError(
            f"study {study.study_name!r} was created with other settings:\n"
            + "\n".join(lines)
            + "\nRun the same command to resume it, or choose a new --study name."
        )


def run_sweep(s: SweepSettings, trainer: Trainer | None = None) -> optuna.Study:
    for o in s.objectives:
        if o not in OBJECTIVES:
            raise ConfigError(f"unknown objective {o!r}; choose from {','.join(OBJECTIVES)}")
    trainer = trainer or trainer_from_env()
    multi = len(s.objectives) > 1
    base = {"dataset": s.dataset, "target": s.target, "preset": s.preset, **s.fixed}
    out_dir = Path(s.out).resolve() / s.study
    objective = Objective(trainer, s.space, base, s.objectives, prune=not multi, out_dir=out_dir)
    try:  # fail now, not in every trial, on a config TrainConfig rejects
        objective.config_for({k: v[0] for k, v in space_mod.grid(s.space).items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid training settings {base}: {e}") from e

    url = s.storage_url()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = make_storage(url, s.heartbeat_interval, s.grace_period, s.max_retry)
        study = optuna.create_study(
            study_name=s.study,
            storage=storage,
            sampler=make_sampler(s),
            pruner=make_pruner(s),
            directions=["minimize"] * len(s.objectives),
            load_if_exists=True,
        )
        record = jsonable(
            {
                "dataset": s.dataset,
                "target": s.target,
                "preset": s.preset,
                "objectives": list(s.objectives),
                "space": space_mod.to_jsonable(s.space),
                "fixed": dict(s.fixed),
            }
        )
        _check_settings(study, record)
        warn_if_shared_sqlite(study, url)
        done = len(study.get_trials(deepcopy=False, states=COUNTED))
        log.info(
            "study %r on %s (trainer: %s): %d/%d trials done; space: %s",
            s.study, redact(url), trainer.name, done, s.n_trials, space_mod.describe(s.space),
        )
        if done >= s.n_trials:
            log.info("nothing to do: raise --n-trials to continue this study")
            return study

        def log_trial(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
            log.info(format_trial(t, s.objectives))

        study.optimize(
            objective,
            n_trials=s.n_trials,
            timeout=s.timeout,
            catch=(Exception,),
            callbacks=[optuna.study.MaxTrialsCallback(s.n_trials, states=COUNTED), log_trial],
            gc_after_trial=True,
        )
    counts = {st.name: len(study.get_trials(deepcopy=False, states=(st,))) for st in TrialState}
    log.info("study %r: %s", s.study, ", ".join(f"{k}={v}" for k, v in counts.items() if v))
    return study
