"""Learning-rate schedules, and planning a run that must finish within a time budget.

Schedules (``TrainConfig.schedule``), both over optimiser steps:

* ``paper`` (docs/METHOD.md 5): lr_t = lr0 * sqrt(T / (T + t)), frozen from the start of the
  stochastic weight averaging (SWA) phase.  Built for hundreds of epochs: cut to a few, it has
  barely decayed when training stops.
* ``cosine``: a linear warm-up over ``warmup_steps``, then lr0 * (1 + cos(pi * p)) / 2 down to
  zero at the planned last step (p = progress after the warm-up).  The weights of the last
  ``swa`` part are averaged as the lr anneals.  It needs the total number of steps in advance:
  from ``epochs``, or from a time budget (``plan_steps``).

A time budget (``--time-budget 10m``) counts everything from the start of the run: loading data
and building graphs, training, the validation after every epoch, the final evaluation and the
files written.  The run measures its own speed on its first steps (``Probe``), plans the number
of steps that fit, and stores the plan, so that a resumed run continues the same schedule.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError

SCHEDULES = ("paper", "cosine")
_UNITS = {"": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0}


def parse_duration(text) -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"10m"``, ``"1.5h"``, ``"2h30m"``, or a number (> 0)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        s = str(text).strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)([a-z]*)", s)
        if not parts or "".join(n + u for n, u in parts) != s or any(u not in _UNITS for _, u in parts):
            raise ConfigError(f"time budget {text!r}: use a duration like 600, 90s, 10m, 1.5h or 2h30m")
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if not seconds > 0 or not math.isfinite(seconds):
        raise ConfigError(f"time budget {text!r} must be a positive duration")
    return seconds


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min"


@dataclass
class Plan:
    """What a run will do, fixed before (or, with a budget, early in) training and stored in the
    checkpoint: the total number of optimiser steps and the step where weight averaging starts."""

    total_steps: int
    swa_start_step: int
    budget_seconds: Optional[float] = None
    planned_at_step: int = 0  # 0: from the epoch count; > 0: from a budget, after this many steps
    seconds_per_step: Optional[float] = None
    seconds_per_eval: Optional[float] = None
    seconds_final: Optional[float] = None

    def as_dict(self):
        return dict(self.__dict__)


class Schedule:
    """The learning rate at each optimiser step, given the plan."""

    def __init__(self, kind: str, lr: float, lr_T: float = 4000.0, warmup_steps: int = 0):
        if kind not in SCHEDULES:
            raise ConfigError(f"unknown schedule {kind!r}: use {' or '.join(SCHEDULES)}")
        self.kind, self.lr, self.lr_T, self.warmup_steps = kind, lr, lr_T, warmup_steps

    def lr_at(self, step: int, plan: Optional[Plan]) -> float:
        if self.kind == "paper":
            t = step if plan is None else min(step, plan.swa_start_step)
            return self.lr * math.sqrt(self.lr_T / (self.lr_T + t))
        warmup = self.warmup_steps
        if step < warmup:
            return self.lr * (step + 1) / (warmup + 1)
        if plan is None:  # a budgeted run before its plan: the start of the cosine
            return self.lr
        span = max(1, plan.total_steps - warmup)
        p = min(1.0, (step - warmup) / span)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * p))


class Probe:
    """Seconds per optimiser step, measured on the steps after the first few (which pay for
    compilation, caches and allocator warm-up)."""

    def __init__(self, skip: int = 3):
        self.skip, self.seen, self.seconds, self.counted = skip, 0, 0.0, 0

    def add(self, seconds: float) -> None:
        self.seen += 1
        if self.seen > self.skip:
            self.seconds += seconds
            self.counted += 1

    @property
    def seconds_per_step(self) -> Optional[float]:
        return self.seconds / self.counted if self.counted else None


def plan_steps(budget: float, elapsed: float, steps_done: int, seconds_per_step: float, steps_per_epoch: int,
               seconds_per_eval: float, seconds_final: float, swa_fraction: float, safety: float = 0.97) -> Plan:
    """The most optimiser steps that fit in ``budget`` seconds, counting what is spent already
    (``elapsed``), one validation pass per epoch, and the final evaluation and files
    (``seconds_final``); aims at ``safety`` of the budget."""
    available = safety * budget - elapsed - seconds_final
    steps = steps_done
    while steps < 100_000_000:  # whole epochs while they fit (their validation pass included), then a part
        n = (steps // steps_per_epoch + 1) * steps_per_epoch - steps
        if n * seconds_per_step + seconds_per_eval > available:
            steps += max(0, int((available - seconds_per_eval) / seconds_per_step))
            break
        available -= n * seconds_per_step + seconds_per_eval
        steps += n
    steps = max(steps, steps_done + 1)
    swa_steps = int(round(swa_fraction * steps))
    return Plan(total_steps=steps, swa_start_step=steps - swa_steps, budget_seconds=budget, planned_at_step=steps_done,
                seconds_per_step=seconds_per_step, seconds_per_eval=seconds_per_eval, seconds_final=seconds_final)


__all__ = ["Plan", "Probe", "SCHEDULES", "Schedule", "format_duration", "parse_duration", "plan_steps"]
