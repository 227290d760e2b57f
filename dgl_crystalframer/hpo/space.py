"""The search space, declared in one place (SPACE), and how it is narrowed.

Parameter names are TrainConfig field names (the model ones are ``config.ModelConfig`` fields), so
a trial's params drop straight into TrainConfig.

Narrowing (command line ``--frames max,none --layers 2..4`` or a YAML ``--space FILE``) may only
shrink the declared space: a subset of the choices, a sub-range of a range, or one value. Spec
forms, in both places:

    "a..b" or {low: a, high: b}   a sub-range        (num_layers, lr)
    "a,b,c" or [a, b, c]          a subset of values  (any parameter)
    a                             one fixed value     (any parameter)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

from ..config import FRAME_TYPES as FRAMES
from ..config import MODEL_PRESETS
from ..errors import ConfigError


@dataclass(frozen=True)
class Choice:
    """A categorical parameter (Optuna needs the same choices for the whole study)."""

    values: tuple

    def suggest(self, trial, name: str):
        return trial.suggest_categorical(name, list(self.values))

    def grid(self) -> list:
        return list(self.values)

    def describe(self) -> str:
        return ",".join(str(v) for v in self.values)


@dataclass(frozen=True)
class IntRange:
    low: int
    high: int

    def suggest(self, trial, name: str):
        return trial.suggest_int(name, self.low, self.high)

    def grid(self) -> list:
        return list(range(self.low, self.high + 1))

    def describe(self) -> str:
        return f"{self.low}..{self.high}"


@dataclass(frozen=True)
class LogRange:
    """A positive float sampled on a log scale; the grid sampler uses grid_points geometric steps."""

    low: float
    high: float
    grid_points: int = 3

    def suggest(self, trial, name: str):
        return trial.suggest_float(name, self.low, self.high, log=True)

    def grid(self) -> list:
        if self.low == self.high or self.grid_points < 2:
            return [self.low]
        n = self.grid_points
        ratio = self.high / self.low
        inner = [float(f"{self.low * ratio ** (i / (n - 1)):.3g}") for i in range(1, n - 1)]
        return [self.low, *inner, self.high]

    def describe(self) -> str:
        return f"{self.low:g}..{self.high:g} (log)"


Param = Union[Choice, IntRange, LogRange]

# THE search space. Keys are TrainConfig field names. num_angle_basis (D) has no effect when
# frame == "none" (no angular term); it is still sampled so that every trial has the same params
# (which keeps the grid finite and TPE/importances simple).
SPACE: dict[str, Param] = {
    "frame": Choice(FRAMES),
    "num_layers": IntRange(1, 8),
    "num_angle_basis": Choice((16, 32, 64)),
    "lr": LogRange(1e-4, 4e-3),
    "batch_size": Choice((32, 64, 128, 256)),
}

# Searched only when narrowed (``--models lightweight,default``): the paper's model presets, each
# of which fixes the frame type and the angular basis, so those two leave the space.
OPTIONAL: dict[str, tuple[Param, tuple[str, ...]]] = {
    "model_preset": (Choice(tuple(MODEL_PRESETS)), ("frame", "num_angle_basis")),
}
# What a checkpoint fixes when a sweep fine-tunes it (``--set init_from=PATH``): not searched then.
ARCHITECTURE = ("model_preset", "frame", "num_layers", "num_angle_basis")

# Command-line flag -> parameter name (the flags `dgl-crystalframer hpo` offers for narrowing).
CLI_FLAGS = {
    "models": "model_preset",
    "frames": "frame",
    "layers": "num_layers",
    "angle_basis": "num_angle_basis",
    "lr": "lr",
    "batch_sizes": "batch_size",
}


class SpaceError(ConfigError):
    pass


def _as_number(value: Any, kind: type, name: str):
    try:
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        return float(value)
    except (TypeError, ValueError):
        raise SpaceError(f"{name}: {value!r} is not a valid {kind.__name__}") from None


def _split(spec: Any) -> tuple[str, Any]:
    """-> ("range", (a, b)) | ("values", [..])."""
    if isinstance(spec, Mapping):
        if set(spec) - {"low", "high"} or not {"low", "high"} <= set(spec):
            raise SpaceError(f"a range must be {{low: ..., high: ...}}, got {dict(spec)}")
        return "range", (spec["low"], spec["high"])
    if isinstance(spec, str):
        text = spec.strip()
        if ".." in text:
            a, _, b = text.partition("..")
            return "range", (a.strip(), b.strip())
        return "values", [v.strip() for v in text.split(",") if v.strip()]
    if isinstance(spec, Sequence):
        return "values", list(spec)
    return "values", [spec]


def narrow_param(name: str, declared: Param, spec: Any) -> Param:
    """Shrink one declared parameter to `spec`; SpaceError if spec leaves the declared space."""
    form, val = _split(spec)
    if isinstance(declared, Choice):
        if form == "range":
            raise SpaceError(f"{name}: a list of values is expected (choices {declared.describe()})")
        kind = type(declared.values[0])
        picked = []
        for v in val:
            v = v if kind is str else _as_number(v, kind, name)
            if v not in declared.values:
                raise SpaceError(f"{name}: {v!r} is not one of {declared.describe()}")
            if v not in picked:
                picked.append(v)
        if not picked:
            raise SpaceError(f"{name}: no values given")
        # keep the declared order so that the same subset always gives the same distribution
        return Choice(tuple(v for v in declared.values if v in picked))
    kind = int if isinstance(declared, IntRange) else float
    if form == "values":
        nums = [_as_number(v, kind, name) for v in val]
        if len(nums) == 1:
            lo = hi = nums[0]
        elif kind is int:
            for v in nums:
                if not declared.low <= v <= declared.high:
                    raise SpaceError(f"{name}: {v} is outside {declared.describe()}")
            return Choice(tuple(sorted(set(nums))))
        else:
            raise SpaceError(f"{name}: give a range a..b or one value, not a list")
    else:
        lo, hi = (_as_number(v, kind, name) for v in val)
    if lo > hi:
        raise SpaceError(f"{name}: empty range {lo}..{hi}")
    if lo < declared.low or hi > declared.high:
        raise SpaceError(f"{name}: {lo}..{hi} is outside the declared {declared.describe()}")
    if isinstance(declared, IntRange):
        return IntRange(lo, hi)
    return LogRange(lo, hi, declared.grid_points)


def narrow(space: Mapping[str, Param], specs: Mapping[str, Any]) -> dict[str, Param]:
    """A new space with each parameter in `specs` narrowed; unknown names are an error."""
    out = dict(space)
    for name, spec in specs.items():
        if spec is None:
            continue
        if name not in space:
            raise SpaceError(f"unknown search parameter {name!r}; known: {', '.join(space)}")
        out[name] = narrow_param(name, space[name], spec)
    return out


def build_space(specs: Mapping[str, Any], fine_tuning: bool = False) -> dict[str, Param]:
    """SPACE narrowed by ``specs``, with the optional parameters the specs name (a model preset
    replaces frame and num_angle_basis); fine-tuning drops the ARCHITECTURE parameters."""
    specs = {k: v for k, v in specs.items() if v is not None}
    space = dict(SPACE)
    for name, (param, replaces) in OPTIONAL.items():
        if name in specs:
            both = [r for r in replaces if r in specs]
            if both:
                raise SpaceError(f"{name} fixes {', '.join(both)}: narrow one or the other")
            space = {k: v for k, v in space.items() if k not in replaces}
            space[name] = param
    if fine_tuning:
        named = [k for k in ARCHITECTURE if k in specs]
        if named:
            raise SpaceError(f"init_from: the checkpoint fixes the architecture, so {', '.join(named)} cannot be searched")
        space = {k: v for k, v in space.items() if k not in ARCHITECTURE}
    return narrow(space, specs)


def load_space_file(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a YAML (or JSON) space file -> (narrowing specs, fixed TrainConfig settings).

    Top-level keys are search parameter names; an optional ``fixed:`` mapping holds other
    TrainConfig fields that every trial uses (e.g. ``fixed: {epochs: 30}``).
    """
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
        raise SpaceError(f"{path}: expected a mapping of parameter names")
    data = dict(data)
    fixed = data.pop("fixed", None) or {}
    if not isinstance(fixed, Mapping):
        raise SpaceError(f"{path}: 'fixed' must be a mapping of TrainConfig fields")
    return data, dict(fixed)


def suggest(trial, space: Mapping[str, Param]) -> dict[str, Any]:
    return {name: p.suggest(trial, name) for name, p in space.items()}


def grid(space: Mapping[str, Param]) -> dict[str, list]:
    return {name: p.grid() for name, p in space.items()}


def grid_size(space: Mapping[str, Param]) -> int:
    return math.prod(len(v) for v in grid(space).values())


def to_jsonable(space: Mapping[str, Param]) -> dict[str, Any]:
    """A plain description, stored on the study so that resuming workers can check it."""
    out = {}
    for name, p in space.items():
        if isinstance(p, Choice):
            out[name] = {"choices": list(p.values)}
        elif isinstance(p, IntRange):
            out[name] = {"int": [p.low, p.high]}
        else:
            out[name] = {"log": [p.low, p.high]}
    return out


def describe(space: Mapping[str, Param]) -> str:
    return "; ".join(f"{name}={p.describe()}" for name, p in space.items())
