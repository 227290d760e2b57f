"""Configuration: the model's hyperparameters (``ModelConfig``, listed once) and a training run's
settings (``TrainConfig``, whose model fields are derived from ``ModelConfig``).

Plain Python (no torch): the command line, ``--config FILE`` and the hyperparameter search read
it without loading a deep-learning stack.  Every name in a config file or in ``--set KEY=VALUE``
is a ``TrainConfig`` field; ``TrainConfig.model_config()`` turns one into the ``ModelConfig``
that builds the model and is stored in every checkpoint.
"""
import dataclasses
import difflib
import re
import os
import typing
from dataclasses import dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from .datasets import DEFAULT_DATASET, dataset_spec, default_target
from .errors import ConfigError
from .schedule import SCHEDULES, parse_duration

class FrameType(typing.NamedTuple):
    """One frame type: what config, the command line, sweeps and benchmarks know of it (the frame
    itself is ``frames.FRAME_FUNCTIONS[name]``).  ``symmetrised_axes``: the axes whose angular
    features the layer symmetrises over c -> -c where the frame choice was a tie (frames.py says
    why); ``node_inputs``: the ``graph.ndata`` keys it reads besides the model's inputs."""

    name: str
    label: str
    symmetrised_axes: Tuple[int, ...] = (2,)
    node_inputs: Tuple[str, ...] = ()


_LATTICE_INPUTS = ("lattice_frame", "lattice_tied", "prim_lattice", "lattice")
# Adding a frame type: one row here, one function in frames.FRAME_FUNCTIONS.
FRAMES: Dict[str, FrameType] = {f.name: f for f in (
    FrameType("none", "Crystalformer (no frames)", ()),
    FrameType("max", "max frames"),
    FrameType("weighted_pca", "weighted PCA frames"),
    FrameType("static_local", "static local frames"),
    FrameType("pca", "PCA frames", node_inputs=("pos",) + _LATTICE_INPUTS),
    # global, not orthogonal, made right-handed by flipping all three axes: a tie between candidates
    # related by an improper symmetry can reverse every axis
    FrameType("lattice", "lattice frames", (0, 1, 2), _LATTICE_INPUTS),
)}
FRAME_TYPES = tuple(FRAMES)
BACKENDS = ("auto", "dgl", "torch")


@dataclass
class ModelConfig:
    """Every hyperparameter of the CrystalFramer model (docs/METHOD.md 2-4); the defaults are the
    paper's CrystalFramer (max frames, 4 blocks, d = 128, 8 heads, D = 64: 951,809 parameters)."""

    frame: str = "max"  # none | max | weighted_pca | static_local | pca | lattice
    num_layers: int = 4
    dim: int = 128
    num_heads: int = 8
    ffn_dim: int = 512
    num_angle_basis: int = 64  # D, Gaussians on the cosines
    angle_basis_width: float = 4.0  # s_a: width = s_a * 2 / (D - 1)
    c_dist: float = 1.0
    c_angl: float = 1.0
    num_dist_basis: int = 64  # K, Gaussians on |r| with centres k * rmax / K
    dist_basis_rmax: float = 14.0
    dropout: float = 0.0
    symmetrize_ties: bool = True  # average tied frames' e3 features over c -> -c (invariance, docs/METHOD.md 3)
    rvec_key: str = "rvec"  # graph keys: what the model reads from ndata / edata
    species_key: str = "species"

    def validate(self) -> "ModelConfig":
        if self.frame not in FRAME_TYPES:
            raise ConfigError(f"unknown frame type {self.frame!r}; choose one of {', '.join(FRAME_TYPES)}")
        for name in ("num_layers", "dim", "num_heads", "ffn_dim", "num_dist_basis"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim={self.dim} is not divisible by num_heads={self.num_heads}")
        if self.frame != "none" and self.num_angle_basis < 2:
            raise ConfigError(f"num_angle_basis must be >= 2, got {self.num_angle_basis}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        return self

    def as_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# The paper's three models (docs/METHOD.md 4): overrides of the ModelConfig defaults.
MODEL_PRESETS: Dict[str, Dict[str, Any]] = {
    "crystalformer": dict(frame="none"),  # 853,505 parameters
    "default": dict(frame="max", num_angle_basis=64, angle_basis_width=4.0),  # 951,809
    "lightweight": dict(frame="max", num_angle_basis=16, angle_basis_width=1.0, c_angl=6.0, c_dist=1.5),  # 878,081
}
GRAPH_KEYS = ("rvec_key", "species_key")  # fixed by the graphs training builds; not training settings
MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig) if f.name not in GRAPH_KEYS)


def model_config(preset: Optional[str] = None, **overrides: Any) -> ModelConfig:
    """The ModelConfig of a preset (``crystalformer``, ``default``, ``lightweight``) with overrides."""
    if preset is not None and preset not in MODEL_PRESETS:
        raise ConfigError(f"unknown model preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    unknown = [k for k in overrides if k not in {f.name for f in fields(ModelConfig)}]
    if unknown:
        raise ConfigError(f"unknown model setting(s) {unknown}; known: {', '.join(f.name for f in fields(ModelConfig))}")
    return ModelConfig(**{**MODEL_PRESETS.get(preset or "", {}), **overrides}).validate()


# ---------------------------------------------------------------------------------------------
# training runs

# ``paper`` follows docs/METHOD.md 5 (epochs and batch size depend on the dataset, see
# paper_schedule).  ``quick`` (the default) is the paper's model trained for a fixed time (12
# minutes: what the paper recipe's 10-epoch run took on a 2-core laptop), with the recipe that
# gave the lowest error in that time on the embedded sample (README, "Results"): batch 32, lr
# 2e-3 from the first step (T-Fixup needs no warm-up; one measurably hurt), cosine to zero.  ``smoke`` checks the plumbing in seconds with a tiny model.
TRAIN_PRESETS: Dict[str, Dict[str, Any]] = {
    "smoke": dict(epochs=2, batch_size=16, num_layers=1, dim=32, num_heads=4, ffn_dim=64, num_angle_basis=8,
                  max_train=48, max_eval=32, schedule="cosine", lr=5e-4, warmup_steps=0),
    "quick": dict(time_budget="12m", swa_epochs=3, batch_size=32, schedule="cosine", lr=2e-3,
                  warmup_steps=0),
    "paper": dict(schedule="paper", lr=5e-4, warmup_steps=0),
}
REPORTED_MODELS = ("swa", "best", "final")
# Below this many validation crystals, a run that does not name its reported model reports the
# final model, not the best-validation one: the epoch of lowest validation MAE is then mostly noise,
# and it scored worse on test in measurements over seeds (README, "Which model a run reports").
SMALL_VALIDATION = 200


def default_reported_model(schedule: str, n_val: int) -> str:
    """The model a run reports unless ``reported_model`` says: the weight average for the paper
    schedule (its lr never anneals), the final model for small validation sets, else the
    best-validation model."""
    if schedule == "paper":
        return "swa"
    return "final" if n_val < SMALL_VALIDATION else "best"


# Fields that may differ between an interrupted run and its resumption.
RUNTIME_FIELDS = ("device", "backend", "threads", "num_workers", "build_workers", "deterministic", "out_dir", "resume",
                  "overwrite", "progress", "plots", "data_dir",
                  "cache_dir", "reported_model")


def paper_schedule(dataset: str, target: Optional[str], frame: Optional[str]) -> Dict[str, int]:
    """Epochs and batch size of the paper (docs/METHOD.md 5) for this dataset/target/frame; a
    user's dataset gets the Materials Project recipe."""
    spec = dataset_spec(dataset) or dataset_spec("megnet")
    return spec.paper_epochs(target, frame)


@dataclass
class _RunSettings:
    """The data, schedule and runtime part of ``TrainConfig`` (the model part is derived below)."""

    # data
    dataset: str = DEFAULT_DATASET
    target: Optional[str] = None  # None: the dataset's usual target (datasets.default_target)
    data_dir: Optional[str] = None
    cache_dir: Optional[str] = None
    split: str = "auto"
    cutoff: Optional[float] = None  # None: derived from the sigma bound (~6.93 A)
    max_train: Optional[int] = None  # cap on training crystals (a seeded random subset), for quick runs
    max_eval: Optional[int] = None  # cap on validation and test crystals each
    split_seed: int = 123  # the random splits (paper, random, carved validation); `seed` is the training's
    unit: Optional[str] = None  # the target's unit, for data that does not say
    # model: model_preset, then the ModelConfig fields (None: from the preset / the defaults)
    model_preset: Optional[str] = None  # crystalformer | default | lightweight
    # fine-tuning (finetune.py): start from this checkpoint's weights, architecture and cutoff
    init_from: Optional[str] = None
    freeze_blocks: int = 0  # N >= 1: the embedding and the first N attention blocks stay as loaded
    # schedule
    preset: str = "quick"
    schedule: Optional[str] = None  # paper | cosine (schedule.py); None: the preset's
    time_budget: Optional[str] = None  # e.g. "10m", "2h": plan the steps that fit (replaces epochs)
    epochs: Optional[int] = None
    batch_size: Optional[int] = None  # global batch (split across DDP ranks)
    eval_batch_size: Optional[int] = None
    lr: Optional[float] = None  # peak learning rate; None: the preset's (paper: 5e-4)
    betas: Tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 1e-5
    clip: float = 1.0
    lr_T: float = 4000.0
    swa_epochs: Optional[int] = None  # None: min(50, 10% of epochs)
    swa_fraction: float = 0.2  # with a time budget: the part of the planned steps whose weights are averaged
    warmup_steps: Optional[int] = None  # linear warm-up steps (cosine schedule); None: the preset's
    reported_model: Optional[str] = None  # swa | best | final; None: default_reported_model(schedule, n_val)
    seed: int = 123
    # runtime
    device: str = "auto"
    backend: str = "auto"  # sparse operations: auto | dgl | torch (dgl_crystalframer.sparse)
    threads: Optional[int] = None
    deterministic: bool = False  # GPU: reductions in a fixed order (torch.use_deterministic_algorithms)
    num_workers: Optional[int] = None  # DataLoader workers; None: 4 on a GPU (batching overlaps the steps), 0 on CPU
    build_workers: Optional[int] = None  # processes building missing graphs; None: the cores
    out_dir: Optional[str] = None  # None: runs/<dataset>-<target>-<frame>
    resume: bool = False
    overwrite: bool = False  # start over in an out_dir that holds an unfinished run (its last.pt)
    progress: bool = True
    plots: bool = True

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> List[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a mapping; unknown keys and values of the wrong type raise ConfigError."""
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: expected a mapping of TrainConfig keys, got {type(values).__name__}")
        names = cls.field_names()
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = []
            for k in unknown:
                close = difflib.get_close_matches(str(k), names, n=1)
                hints.append(f"{k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise ConfigError(f"{source}: unknown key(s) {', '.join(hints)}. Valid keys: {', '.join(names)}")
        types = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, types[k], source) for k, v in values.items()})

    @classmethod
    def from_file(cls, path: str, **overrides: Any) -> "TrainConfig":
        """Read a YAML or JSON file of TrainConfig keys; ``overrides`` (non-None) win."""
        return cls.from_dict(read_config_file(path), source=f"config file {path}").with_overrides(**overrides)

    def with_overrides(self, **overrides: Any) -> "TrainConfig":
        """A copy with the non-None ``overrides`` applied (unknown keys raise ConfigError)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if not given:
            return replace(self)
        return type(self).from_dict({**self.as_dict(), **given}, source="overrides")

    def as_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # -- presets ----------------------------------------------------------------------------
    def resolved(self) -> "TrainConfig":
        """A copy with every schedule ``None`` filled from the preset, validated.  Model fields
        stay None where the model preset / ModelConfig defaults decide (``model_config()``)."""
        if self.preset not in TRAIN_PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}: use one of {', '.join(TRAIN_PRESETS)}")
        c = replace(self)
        if c.target is None:
            c.target = default_target(c.dataset)
        if c.frame is None and c.model_preset is None and not c.init_from:  # (a checkpoint to start from decides)
            c.frame = ModelConfig.frame  # the default model, stated
        if c.time_budget is not None and c.schedule is None:
            c.schedule = "cosine"  # a budget anneals to zero by its planned end, whatever the preset
        if c.time_budget is not None and c.epochs is not None:
            raise ConfigError("give epochs or a time budget, not both")
        preset = dict(TRAIN_PRESETS[c.preset])
        if c.preset == "paper":
            preset.update(paper_schedule(c.dataset, c.target, self.model_config().frame))
        if c.epochs is not None:  # explicit epochs replace the preset's time budget
            preset.pop("time_budget", None)
        if c.time_budget is not None or "time_budget" in preset:  # a budget plans its own length
            preset.pop("epochs", None)
        for k, v in preset.items():
            if getattr(c, k) is None and not (c.init_from and k in MODEL_FIELDS):  # a checkpoint's model is its own
                setattr(c, k, v)
        c.lr = 5e-4 if c.lr is None else c.lr
        c.warmup_steps = 0 if c.warmup_steps is None else c.warmup_steps
        if c.eval_batch_size is None:
            c.eval_batch_size = max(c.batch_size, 64)
        # reported_model None: decided by the schedule and the validation size (default_reported_model)
        if c.swa_epochs is None:
            c.swa_epochs = 0 if c.epochs is None else max(1, min(50, int(round(0.1 * c.epochs)))) if c.epochs >= 2 else 0
        if c.out_dir is None:
            c.out_dir = default_out_dir(c.dataset, c.target, c.model_preset or c.model_config().frame)
        c.validate()
        return c

    def model_config(self) -> ModelConfig:
        """The model this run trains: ``model_preset``, then every model field that is set."""
        return model_config(self.model_preset, **{k: getattr(self, k) for k in MODEL_FIELDS
                                                  if getattr(self, k) is not None})

    def validate(self) -> None:
        self.model_config()  # model fields (frame, sizes, ...)
        for name in ("epochs", "batch_size", "eval_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 (got {v})")
        for name in ("max_train", "max_eval", "threads", "build_workers"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"{name} must be >= 1 or unset (got {v})")
        if self.epochs is not None and self.swa_epochs is not None and not 0 <= self.swa_epochs <= self.epochs:
            raise ConfigError(f"swa_epochs must be between 0 and epochs={self.epochs} (got {self.swa_epochs})")
        if not self.lr > 0 or not self.lr_T > 0 or not self.clip > 0 or self.weight_decay < 0:
            raise ConfigError("lr, lr_T and clip must be > 0 and weight_decay >= 0")
        if len(self.betas) != 2:
            raise ConfigError(f"betas must be two numbers (got {self.betas})")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0 (got {self.num_workers})")
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown backend {self.backend!r}: use {', '.join(BACKENDS)}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}: use {' or '.join(SCHEDULES)}")
        if self.reported_model is not None and self.reported_model not in REPORTED_MODELS:
            raise ConfigError(f"reported_model must be one of {', '.join(REPORTED_MODELS)}, got {self.reported_model!r}")
        if not 0.0 <= self.swa_fraction < 1.0 or self.warmup_steps < 0:
            raise ConfigError("swa_fraction must be in [0, 1) and warmup_steps >= 0")
        if self.time_budget is not None:
            parse_duration(self.time_budget)  # raises ConfigError on a bad duration
        if self.freeze_blocks < 0:
            raise ConfigError(f"freeze_blocks must be >= 0 (got {self.freeze_blocks})")
        if self.freeze_blocks and not self.init_from:
            raise ConfigError(f"freeze_blocks {self.freeze_blocks} needs init_from: freezing keeps loaded weights, "
                              "and there are none without a checkpoint to start from")
        if self.cutoff is not None and not self.cutoff > 0:
            raise ConfigError(f"cutoff must be > 0 Angstrom (got {self.cutoff})")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(self.device).strip().lower()):
            raise ConfigError(f"unknown device {self.device!r}: use auto, cpu or cuda[:N]")


# TrainConfig = the run settings + every ModelConfig field (None = from model_preset / defaults).
TrainConfig = make_dataclass(
    "TrainConfig",
    [(f.name, Optional[f.type], field(default=None)) for f in fields(ModelConfig) if f.name in MODEL_FIELDS],
    bases=(_RunSettings,),
    namespace={"__doc__": """Everything a training run needs; the field names are the keys of ``--config FILE``.

    ``None`` means "from the preset" (``preset`` = smoke | quick | paper) or, for the model fields
    (every ``ModelConfig`` field), "from ``model_preset`` / the ModelConfig defaults".  Explicit
    values always win.""", "__module__": __name__},
)


def read_config_file(path: str) -> Dict[str, Any]:
    """The mapping in a YAML/JSON config file, its keys checked against TrainConfig (ConfigError)."""
    import yaml  # JSON is YAML too

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: cannot parse it as YAML/JSON ({exc})") from exc
    values = {} if values is None else values
    TrainConfig.from_dict(values, source=f"config file {path}")  # raises on unknown keys / bad types
    return values


def default_out_dir(dataset: str, target: Optional[str], frame: Optional[str]) -> str:
    name = Path(dataset).stem if (os.sep in dataset or os.path.exists(dataset)) else dataset
    safe = lambda s: "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in str(s))  # noqa: E731
    return os.path.join("runs", f"{safe(name)}-{safe(target)}-{safe(frame)}")


def _coerce(key: str, value: Any, hint: Any, source: str) -> Any:
    """Check/convert one config value against the field's type hint."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} may not be null")
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base)
    bad = ConfigError(f"{source}: {key} must be {getattr(base, '__name__', base)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
            raise bad
        return tuple(float(x) for x in value)
    if base is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if base is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. time_budget: 600
        if not isinstance(value, (str, os.PathLike)):
            raise bad
        return str(value)
    return value


__all__ = ["BACKENDS", "ConfigError", "FRAMES", "FRAME_TYPES", "FrameType", "SCHEDULES", "MODEL_FIELDS", "MODEL_PRESETS",
           "ModelConfig", "RUNTIME_FIELDS", "SMALL_VALIDATION", "TRAIN_PRESETS", "TrainConfig", "default_out_dir",
           "default_reported_model", "model_config", "paper_schedule", "read_config_file"]
